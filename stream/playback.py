"""Playback of utterances on the session's media clock: what the viewer was shown, and when.

A client delimits utterances in the audio it sends with `segment` markers (and `stop`,
`interrupt`, or the socket closing). Every sample the ingest buffers has an index on one counter
per session; each generated frame carries the span of those indices its driving audio covered;
when the media clock decides a slot, this tracker learns how much of each utterance the viewer
has been shown, and says so on the audio socket:

    audio socket ─ PCM ─▶ AudioIngest: samples [a, b) ─ on_audio ─▶ PlaybackTracker.audio
         │ segment/stop ───────────────────────────────────────────▶ PlaybackTracker.delimit
         │ interrupt ──────────────────────────────────────────────▶ PlaybackTracker.interrupt
    window [g, g + r) ─▶ BlockScheduler ─▶ frames with spans [lo, hi) ─▶ MediaTimeline
    slot k decided (shown from k / fps on) ─────────────────────────▶ PlaybackTracker.slot
                                 PlaybackTracker ─ playback_started / playback_finished ─▶ socket

A decided slot always plays out, even across an interrupt (the interrupt only clears the slots
not yet decided), so "shown" here is what the viewer hears, on the clock the viewer sees. The
tracker is plain CPU bookkeeping: no clock, no I/O; the session feeds it and posts its events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_PENDING_UTTERANCES = 256


class TooManyUtterances(Exception):
    """More delimited utterances wait to be played than the tracker holds."""


@dataclass
class Utterance:
    number: int
    start: int  # index of its first sample
    end: int | None = None  # one past its last sample, once delimited
    received: int = 0  # samples of it buffered so far
    shown: int = 0  # samples of it the viewer has been shown
    started: bool = False
    last_slot: int | None = None  # the slot that showed its last sample


class PlaybackTracker:
    """Turns slot decisions into per-utterance playback events (see the module docstring)."""

    def __init__(
        self,
        sample_rate: int,
        fps: float,
        emit: Callable[[dict[str, Any]], None],
        *,
        max_pending: int = MAX_PENDING_UTTERANCES,
    ) -> None:
        self.rate = sample_rate
        self.fps = float(fps)
        self.emit = emit
        self.max_pending = max_pending
        self._utterances: deque[Utterance] = deque()
        self._open: Utterance | None = None
        self._numbers = 0
        self._shown_until = 0  # highest sample index any decided slot has shown
        self.finished = 0

    # Input side --------------------------------------------------------------------------------

    def audio(self, first: int, end: int) -> None:
        """Samples [first, end) were buffered; they belong to the open utterance (or open one)."""
        if end <= first:
            return
        if self._open is None:
            self._numbers += 1
            self._open = Utterance(self._numbers, first)
            self._utterances.append(self._open)
        self._open.received += end - first

    def delimit(self, end: int, now_slot: int | None, *, bounded: bool = True) -> dict[str, Any]:
        """The open utterance ends at sample `end` (segment, stop, socket gone); returns what it
        was, for the reply. If the viewer was already shown all of it, it finishes now.

        With `bounded`, raises TooManyUtterances when `max_pending` delimited utterances already
        wait, which bounds what the tracker holds (the next audio would open one more)."""
        u = self._open
        if u is None:
            return {"utterance": None, "duration_s": 0.0}
        if bounded and len(self._utterances) > self.max_pending:
            raise TooManyUtterances(
                f"{len(self._utterances) - 1} utterances already wait to be played; send "
                "segment markers between utterances, not between chunks of one"
            )
        self._open = None
        u.end = end
        if self._shown_until >= end:
            self._finish(u, "played", now_slot)
        return {"utterance": u.number, "duration_s": self._seconds(u.received)}

    @property
    def open_utterance(self) -> int | None:
        return self._open.number if self._open is not None else None

    @property
    def pending(self) -> int:
        return len(self._utterances)

    # Media side --------------------------------------------------------------------------------

    def slot(self, k: int, span: tuple[int, int] | None) -> None:
        """Slot k was decided; `span` is the sample range its frame's driving audio covered."""
        # Utterances whose last frame was the previous slot have now played out.
        for u in list(self._utterances):
            if u.last_slot is not None and u.last_slot < k:
                self._finish(u, "played", u.last_slot + 1)
        if span is None:
            return
        lo, hi = span
        self._shown_until = max(self._shown_until, hi)
        for u in self._utterances:
            if u.start >= hi:
                break
            overlap = min(hi, u.end if u.end is not None else hi) - max(lo, u.start)
            if overlap > 0:
                u.shown += overlap
                if not u.started:
                    u.started = True
                    self.emit(
                        {
                            "type": "playback_started",
                            "utterance": u.number,
                            "media_time_s": self._media_time(k),
                        }
                    )
            if u.end is not None and u.last_slot is None and hi >= u.end:
                u.last_slot = k

    # Cuts --------------------------------------------------------------------------------------

    def interrupt(self, resume_slot: int | None) -> None:
        """Everything not yet decided is dropped: utterances that already had their last frame
        decided still play out; the others end here with what the viewer was shown of them."""
        self._open = None
        self._end_all("interrupt", resume_slot)

    def close(self, now_slot: int | None) -> None:
        """The session ended: every utterance still waiting finishes now."""
        self._open = None
        self._end_all("ended", now_slot)

    # Internals ---------------------------------------------------------------------------------

    def _end_all(self, reason: str, slot: int | None) -> None:
        for u in list(self._utterances):
            if u.last_slot is not None:
                self._finish(u, "played", u.last_slot + 1)
            else:
                self._finish(u, reason, slot)

    def _finish(self, u: Utterance, reason: str, slot: int | None) -> None:
        self._utterances.remove(u)
        if self._open is u:
            self._open = None
        self.finished += 1
        total = u.end - u.start if u.end is not None else u.received
        if reason == "played" and u.shown == 0:
            reason = "dropped"  # skipped on purpose (behind real time) or never reached a frame
        self.emit(
            {
                "type": "playback_finished",
                "utterance": u.number,
                "position_s": self._seconds(min(u.shown, total)),
                "duration_s": self._seconds(total),
                "interrupted": reason == "interrupt",
                "reason": reason,
                "media_time_s": self._media_time(slot),
            }
        )

    def _seconds(self, samples: int) -> float:
        return round(samples / self.rate, 4)

    def _media_time(self, slot: int | None) -> float | None:
        return None if slot is None else round(slot / self.fps, 4)
