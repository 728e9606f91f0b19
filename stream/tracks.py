"""The two outgoing WebRTC tracks of a session, both paced by the session's MediaTimeline.

Pacing happens here, at the sink: each `recv()` sleeps until its own frame's time on the shared
clock. When a track wakes far behind that time (event loop stalled, encoder slow) it jumps to the
present instead of bursting the backlog (drift reset); the skipped slots are counted. A track never
waits on generation: a slot with no new frame repeats the last one, so the picture never stalls.
"""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from stream.timeline import (
    AUDIO_FRAME_SAMPLES,
    AUDIO_RATE,
    VIDEO_CLOCK_RATE,
    MediaTimeline,
    Slot,
)

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
DEFAULT_MAX_DRIFT_S = 0.25


class AvatarVideoTrack(MediaStreamTrack):
    """Video frames at the model's fps, pts on the 90 kHz clock from the slot index."""

    kind = "video"

    def __init__(
        self,
        timeline: MediaTimeline,
        *,
        max_drift_s: float = DEFAULT_MAX_DRIFT_S,
        on_sent: Callable[[Slot], None] | None = None,
        on_skipped: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self.timeline = timeline
        self.max_drift_s = max_drift_s
        self.on_sent = on_sent
        self.on_skipped = on_skipped
        self.on_first: Callable[[], None] | None = None
        self._next: int | None = None
        self.sent = 0
        self.skipped = 0
        self.first_pts: int | None = None  # of the first frame sent: a receiver's pts origin

    def pts_of(self, k: int) -> int:
        return round(k * VIDEO_CLOCK_RATE / self.timeline.fps)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        tl = self.timeline
        if not await tl.wait_started():
            self.stop()
            raise MediaStreamError
        k = tl.current_slot() if self._next is None else self._next
        delay = tl.slot_time(k) - tl.clock()
        if delay < -self.max_drift_s or k < tl.oldest_slot:
            now_slot = tl.current_slot()
            self._skip(now_slot - k)
            k = now_slot
        elif delay > 0:
            await asyncio.sleep(delay)
        slot = tl.slot(k)
        frame = av.VideoFrame.from_ndarray(slot.frame, format="rgb24")
        frame.pts = self.pts_of(k)
        frame.time_base = VIDEO_TIME_BASE
        self._next = k + 1
        self.sent += 1
        if self.first_pts is None:
            self.first_pts = frame.pts
            if self.on_first is not None:
                self.on_first()
        if self.on_sent is not None:
            self.on_sent(slot)
        return frame

    def _skip(self, n: int) -> None:
        if n > 0:
            self.skipped += n
            if self.on_skipped is not None:
                self.on_skipped(n)


class DrivingAudioTrack(MediaStreamTrack):
    """The audio that drove the frames on screen: 48 kHz mono s16, 20 ms per frame."""

    kind = "audio"

    def __init__(
        self,
        timeline: MediaTimeline,
        *,
        max_drift_s: float = DEFAULT_MAX_DRIFT_S,
    ) -> None:
        super().__init__()
        self.timeline = timeline
        self.max_drift_s = max_drift_s
        self.on_first: Callable[[], None] | None = None
        self._next: int | None = None  # first sample of the next frame on the 48 kHz clock
        self.sent = 0
        self.skipped_samples = 0
        self.first_pts: int | None = None  # of the first frame sent: a receiver's pts origin

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        tl = self.timeline
        if not await tl.wait_started():
            self.stop()
            raise MediaStreamError
        if self._next is None:
            # Start on a 20 ms boundary of the shared clock.
            now_sample = tl.audio_sample_at(tl.clock())
            self._next = now_sample - now_sample % AUDIO_FRAME_SAMPLES
        start = self._next
        delay = tl.slot_time(0) + start / AUDIO_RATE - tl.clock()
        if delay < -self.max_drift_s or tl.slot_of_sample(start) < tl.oldest_slot:
            now_sample = tl.audio_sample_at(tl.clock())
            jumped = now_sample - now_sample % AUDIO_FRAME_SAMPLES
            self.skipped_samples += max(0, jumped - start)
            start = jumped
        elif delay > 0:
            await asyncio.sleep(delay)
        samples = tl.audio(start, AUDIO_FRAME_SAMPLES)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = AUDIO_TIME_BASE
        self._next = start + AUDIO_FRAME_SAMPLES
        self.sent += 1
        if self.first_pts is None:
            self.first_pts = start
            if self.on_first is not None:
                self.on_first()
        return frame
