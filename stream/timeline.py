"""One media clock per session, shared by the video and the audio track so they cannot drift apart.

Time is cut into *slots*, one per video frame: slot k starts at `start + k / fps`. The content of
a slot (a generated frame and the 48 kHz audio that drove it, or the last frame again with
silence when generation is late) is decided once, in order, by whichever track asks first, and
both tracks read the same decision. Video pts come from the slot index, audio pts from the
sample index on the same clock, so the viewer hears exactly the audio of the frame it sees.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

AUDIO_RATE = 48_000
AUDIO_PTIME = 0.020
AUDIO_FRAME_SAMPLES = int(AUDIO_RATE * AUDIO_PTIME)
VIDEO_CLOCK_RATE = 90_000


@dataclass
class MediaUnit:
    """One generated frame waiting to be shown, with the audio that drove it."""

    frame: np.ndarray  # uint8 [H, W, 3]
    audio: np.ndarray  # int16 [samples] at 48 kHz, about 1 / fps seconds
    block_index: int
    audio_arrival: float | None = None  # clock time the first real sample of it arrived
    span: tuple[int, int] | None = None  # sample indices of the real audio it covers (ingest's)


@dataclass(frozen=True)
class Slot:
    """What is shown during one frame period; `fresh` is False for a repeated frame."""

    index: int
    frame: np.ndarray
    audio: np.ndarray  # int16, exactly samples_in_slot(index) long
    audio_start: int  # index of its first sample on the 48 kHz clock
    fresh: bool
    block_index: int | None
    latency: float | None  # audio arrival to this slot's start, when known
    span: tuple[int, int] | None = None  # the frame's MediaUnit.span; None when repeated


class MediaTimeline:
    """Bounded queue of generated frames plus the clock that releases them one slot at a time."""

    def __init__(
        self,
        fps: float,
        height: int,
        width: int,
        max_queued_frames: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        history_slots: int | None = None,
        on_slot: Callable[[Slot], None] | None = None,
    ) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.fps = float(fps)
        self.clock = clock
        self.max_queued_frames = max_queued_frames
        self.on_slot = on_slot
        self._queue: deque[MediaUnit] = deque()
        self._decided: deque[Slot] = deque()
        self._history = history_slots or max(8, int(self.fps * 2))
        self._next_slot = 0
        self._last_frame = np.zeros((height, width, 3), dtype=np.uint8)
        self._start: float | None = None
        self._has_frames = asyncio.Event()
        self._closed = False
        # Counters read by the session's stats.
        self.fresh_slots = 0
        self.repeated_slots = 0
        self.overflow_dropped = 0

    # Producer side -----------------------------------------------------------------------------

    def push(self, units: list[MediaUnit]) -> int:
        """Queue a block's frames; returns how many of the oldest were dropped to stay bounded."""
        self._queue.extend(units)
        dropped = 0
        while len(self._queue) > self.max_queued_frames:
            self._queue.popleft()
            dropped += 1
        self.overflow_dropped += dropped
        if self._queue:
            self._has_frames.set()
        return dropped

    def clear(self) -> int:
        """Drop every frame not yet shown (interrupt); returns how many."""
        n = len(self._queue)
        self._queue.clear()
        return n

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    @property
    def started(self) -> bool:
        return self._start is not None

    @property
    def next_slot(self) -> int:
        """The first slot not yet decided: what an interrupt can still change starts here."""
        return self._next_slot

    def dry_at(self, extra_frames: int = 0) -> float:
        """Clock time of the first slot with nothing to show, counting `extra_frames` coming."""
        now = self.clock()
        if self._start is None:
            return now + (len(self._queue) + extra_frames) / self.fps
        current = int((now - self._start) * self.fps)
        # The queue's head goes to the next undecided slot, which is never before the current one.
        first_free = max(self._next_slot, current) + len(self._queue) + extra_frames
        return self._start + first_free / self.fps

    # Clock -------------------------------------------------------------------------------------

    async def wait_started(self) -> bool:
        """Wait for the first frame; the first track to get here starts the clock.

        Returns False when the timeline was closed instead (the session ended first).
        """
        if self._start is None:
            await self._has_frames.wait()
            if self._closed:
                return False
            if self._start is None:
                self._start = self.clock()
        return not self._closed

    def close(self) -> None:
        """Release tracks waiting for a first frame that will never come."""
        self._closed = True
        self._has_frames.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def slot_time(self, k: int) -> float:
        assert self._start is not None
        return self._start + k / self.fps

    def current_slot(self) -> int:
        """Index of the slot the clock is in now."""
        assert self._start is not None
        return max(0, int((self.clock() - self._start) * self.fps))

    def audio_sample_at(self, t: float) -> int:
        """48 kHz sample index at clock time t."""
        assert self._start is not None
        return max(0, int((t - self._start) * AUDIO_RATE))

    def slot_audio_start(self, k: int) -> int:
        return round(k * AUDIO_RATE / self.fps)

    def samples_in_slot(self, k: int) -> int:
        return self.slot_audio_start(k + 1) - self.slot_audio_start(k)

    def slot_of_sample(self, sample: int) -> int:
        k = int(sample * self.fps / AUDIO_RATE)
        while self.slot_audio_start(k + 1) <= sample:
            k += 1
        while k > 0 and self.slot_audio_start(k) > sample:
            k -= 1
        return k

    # Decisions ---------------------------------------------------------------------------------

    @property
    def oldest_slot(self) -> int:
        """Oldest slot still held; asking for an older one means the asker fell far behind."""
        return self._decided[0].index if self._decided else self._next_slot

    def slot(self, k: int) -> Slot:
        """The content of slot k, deciding it (and every slot before it) if not yet decided."""
        if k < self.oldest_slot:
            raise LookupError(f"slot {k} was released; oldest held is {self.oldest_slot}")
        while self._next_slot <= k:
            self._decide(self._next_slot)
        return self._decided[k - self._decided[0].index]

    def _decide(self, k: int) -> None:
        need = self.samples_in_slot(k)
        if self._queue:
            unit = self._queue.popleft()
            audio = _fit(unit.audio, need)
            self._last_frame = unit.frame
            latency = None
            if unit.audio_arrival is not None and self._start is not None:
                latency = self.slot_time(k) - unit.audio_arrival
            slot = Slot(
                k,
                unit.frame,
                audio,
                self.slot_audio_start(k),
                True,
                unit.block_index,
                latency,
                unit.span,
            )
            self.fresh_slots += 1
        else:
            slot = Slot(
                k,
                self._last_frame,
                np.zeros(need, dtype=np.int16),
                self.slot_audio_start(k),
                False,
                None,
                None,
            )
            self.repeated_slots += 1
        self._decided.append(slot)
        self._next_slot = k + 1
        while len(self._decided) > self._history:
            self._decided.popleft()
        if self.on_slot is not None:
            self.on_slot(slot)

    def audio(self, first_sample: int, count: int) -> np.ndarray:
        """`count` int16 samples from `first_sample` on the 48 kHz clock, deciding slots as needed."""
        last_slot = self.slot_of_sample(first_sample + count - 1)
        self.slot(last_slot)
        out = np.empty(count, dtype=np.int16)
        k = self.slot_of_sample(first_sample)
        written = 0
        while written < count:
            s = self.slot(k)
            offset = first_sample + written - s.audio_start
            take = min(count - written, len(s.audio) - offset)
            out[written : written + take] = s.audio[offset : offset + take]
            written += take
            k += 1
        return out


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    """Pad or trim a frame's audio to the slot's length (they differ by at most a sample)."""
    if len(audio) == n:
        return audio
    if len(audio) > n:
        return audio[:n]
    return np.concatenate([audio, np.zeros(n - len(audio), dtype=np.int16)])
