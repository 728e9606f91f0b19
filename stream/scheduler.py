"""The per-session engine loop of the service: plan → submit → collect, on the event loop.

`plan` decides from the playout clock whether the next block must be submitted now: a block is
due when the frames already queued or in flight will run out before it could be generated (its
deadline), and may go one block early when its audio is complete. `submit` hands the window to
the executor (never running torch here); `collect` turns finished blocks, strictly in order, into
media units on the timeline. When video falls behind real time while audio piles up, whole
windows are dropped on purpose (degrade policy "drop") and counted, so latency stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.audio import StreamingResampler
from models.errors import DiffstreamError
from pipelines.executors.base import Executor, ExecutorBusy, ModelInfo
from pipelines.messages import BlockRequest, BlockResult
from stream.ingest import AudioIngest, AudioWindow
from stream.metrics import ServiceMetrics
from stream.timeline import AUDIO_RATE, MediaTimeline, MediaUnit

log = logging.getLogger(__name__)

BUSY_RETRY_S = 0.01
REPEAT_WINDOW_S = 2.0  # how far back "behind real time" looks
REPEAT_SHARE = 0.1  # share of repeated frames in that window that means behind


@dataclass
class _InFlight:
    index: int
    future: asyncio.Future[BlockResult]
    window: AudioWindow
    audio48: np.ndarray  # int16, the window at 48 kHz, for the viewer's audio track
    frames: int
    submitted: float
    epoch: int


class BlockScheduler:
    """Feeds one session's windows to the executor at real-time pace and collects its frames."""

    def __init__(
        self,
        session_id: str,
        executor: Executor,
        ingest: AudioIngest,
        timeline: MediaTimeline,
        metrics: ServiceMetrics,
        *,
        max_in_flight: int = 2,
        degrade: str = "drop",
        max_backlog_s: float = 1.5,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.executor = executor
        self.info: ModelInfo = executor.info
        self.ingest = ingest
        self.timeline = timeline
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.degrade = degrade
        self.max_backlog_s = max_backlog_s
        self.clock = clock
        self.on_error = on_error
        self.on_drained = on_drained
        self.block_duration = self.info.frames_per_block / self.info.fps
        self.margin = max(0.04, 1.0 / self.info.fps)
        self.latency_estimate = 0.5 * self.block_duration
        self.next_index = 0
        self.epoch = 0
        self._in_flight: deque[_InFlight] = deque()
        self._held: AudioWindow | None = None
        self._wake = asyncio.Event()
        self._draining = False
        self._stopped = False
        self._repeat_history: deque[tuple[float, int]] = deque()
        self._out_resampler: StreamingResampler | None = StreamingResampler(
            self.info.audio_sample_rate, 1, "f32le", AUDIO_RATE
        )
        self._out_fifo = np.zeros(0, dtype=np.float32)
        self._out_frames = 0  # generated frames whose audio was cut from the 48 kHz stream
        self._out_primed = False
        # Figures for stats.
        self.blocks_done = 0
        self.blocks_dropped = 0
        self.frames_dropped = 0
        self.recent_block_latency: deque[float] = deque(maxlen=64)

    # Control ----------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def interrupt(self) -> int:
        """Forget blocks not yet shown: queued frames now, in-flight ones when they return.

        The viewer's audio path restarts too: the 48 kHz resampler's held-back tail and the
        FIFO's leftover are the cut speech, and would otherwise sound at the start of the next
        block (the first block after the cut is padded in front again, as at the start)."""
        self.epoch += 1
        self._held = None
        if self._out_resampler is not None:
            self._out_resampler.flush()
        self._out_fifo = np.zeros(0, dtype=np.float32)
        self._out_primed = False
        dropped = self.timeline.clear()
        self.metrics.frames_dropped.labels(reason="interrupt").inc(dropped)
        self.wake()
        return dropped

    def drain(self) -> None:
        """No more audio is coming: generate what is buffered, show it, then report drained."""
        self._draining = True
        self.wake()

    def stop(self) -> None:
        self._stopped = True
        self.wake()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def release(self) -> None:
        """Forget blocks still in flight; close_session makes the executor drop them.

        The futures are not cancelled: that would reach into the executor's own futures, which
        its worker still completes.
        """
        self._in_flight.clear()
        self._out_resampler = None  # native threads of PyAV's filter graph go with it

    # Loop -------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self._stopped:
                self._wake.clear()
                if not self._collect():
                    return
                if self._draining and self._drained():
                    if self.on_drained is not None:
                        self.on_drained()
                    return
                delay = self._plan()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            self.release()

    def _drained(self) -> bool:
        return (
            self.ingest.buffered_samples == 0
            and self._held is None
            and not self._in_flight
            and self.timeline.queued_frames == 0
        )

    def _frames_of(self, index: int) -> int:
        return self.info.first_block_frames if index == 0 else self.info.frames_per_block

    def _plan(self) -> float:
        """Submit the next block if it is due; returns seconds until it is worth looking again."""
        if len(self._in_flight) >= self.max_in_flight:
            return 1.0  # a completion wakes us
        if self._draining and self.ingest.buffered_samples == 0 and self._held is None:
            return 1.0
        now = self.clock()
        in_flight_frames = sum(item.frames for item in self._in_flight)
        deadline = self.timeline.dry_at(in_flight_frames) - self.latency_estimate - self.margin
        self._maybe_degrade()
        window = self._held
        if window is None:
            early = deadline - self.block_duration
            if now < early:
                return early - now
            n = self.info.block_samples(self.next_index)
            window = self.ingest.take(n, force=now >= deadline or self._draining)
            if window is None:
                return max(0.002, deadline - now)
            if self._draining and window.silent:
                return 1.0
        return 0.0 if self._submit(window) else BUSY_RETRY_S

    def behind_real_time(self) -> bool:
        """True when over the last REPEAT_WINDOW_S more than REPEAT_SHARE of the slots repeated
        a frame. A hiccup repeats a frame or two; an engine slower than real time repeats
        continuously. (A client sending faster than real time is not behind: it fills the
        buffer, but the video keeps up.)"""
        now = self.clock()
        repeats = self.timeline.repeated_slots
        history = self._repeat_history
        if not history or now - history[-1][0] >= 0.1:
            history.append((now, repeats))
        while len(history) > 1 and now - history[0][0] > REPEAT_WINDOW_S:
            history.popleft()
        span = now - history[0][0]
        if span < REPEAT_WINDOW_S / 2:
            return False
        return (repeats - history[0][1]) > REPEAT_SHARE * span * self.info.fps

    def _maybe_degrade(self) -> None:
        """Policy "drop": when behind real time with audio piling up past max_backlog_s, drop
        whole windows of the oldest audio (never generated, never shown), down to half the limit,
        so the viewer's delay stays bounded instead of growing with the stream."""
        if self.degrade != "drop" or not self.behind_real_time():
            return
        if self.ingest.buffered_seconds <= self.max_backlog_s:
            return
        n = self.info.block_samples(max(1, self.next_index))
        keep = max(n, int(self.max_backlog_s / 2 * self.info.audio_sample_rate))
        windows = (self.ingest.buffered_samples - keep) // n
        if windows <= 0:
            return
        self.ingest.drop(windows * n)
        frames = windows * self.info.frames_per_block
        self.blocks_dropped += windows
        self.frames_dropped += frames
        self.metrics.blocks_dropped.labels(reason="behind_real_time").inc(windows)
        self.metrics.frames_dropped.labels(reason="behind_real_time").inc(frames)
        log.info(
            "session %s behind real time: dropped %d blocks of audio", self.session_id, windows
        )

    def _submit(self, window: AudioWindow) -> bool:
        index = self.next_index
        request = BlockRequest(
            session_id=self.session_id,
            block_index=index,
            audio=window.audio,
            submitted_at=time.perf_counter(),
        )
        try:
            cf = self.executor.submit(request)
        except ExecutorBusy:
            self._held = window
            return False
        except DiffstreamError as exc:  # e.g. the worker died while no block was in flight
            self._fail(f"generation failed: {exc}")
            return False
        self._held = None
        future = asyncio.wrap_future(cf)
        future.add_done_callback(lambda _f: self._wake.set())
        self._in_flight.append(
            _InFlight(
                index=index,
                future=future,
                window=window,
                audio48=self._to_viewer_audio(window.audio),
                frames=self._frames_of(index),
                submitted=self.clock(),
                epoch=self.epoch,
            )
        )
        self.next_index += 1
        return True

    def _to_viewer_audio(self, audio: np.ndarray) -> np.ndarray:
        if self._out_resampler is None:
            return np.zeros(0, dtype=np.float32)
        out = self._out_resampler.push(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        return np.asarray(out, dtype=np.float32)

    def _collect(self) -> bool:
        """Move finished blocks, in order, onto the timeline; False once the session failed."""
        while self._in_flight and self._in_flight[0].future.done():
            item = self._in_flight.popleft()
            try:
                result = item.future.result()
            except asyncio.CancelledError:
                continue
            except Exception as exc:
                self._fail(f"generation failed: {exc}")
                return False
            if not result.ok or result.frames is None:
                self._fail(f"generation failed: {result.error or 'no frames'}")
                return False
            latency = self.clock() - item.submitted
            self.recent_block_latency.append(latency)
            # Plan for a slow block, not the average one: a late block shows as a frozen frame.
            recent = sorted(list(self.recent_block_latency)[-32:])
            self.latency_estimate = recent[int(0.9 * (len(recent) - 1))]
            self.metrics.block_latency.observe(latency)
            if item.epoch != self.epoch:  # its audio went with the interrupt's reset
                self.metrics.frames_dropped.labels(reason="interrupt").inc(item.frames)
                continue
            units = self._units(item, result.frames)
            self.blocks_done += 1
            self.metrics.blocks.inc()
            self.metrics.frames_generated.inc(len(units))
            overflow = self.timeline.push(units)
            if overflow:
                self.frames_dropped += overflow
                self.metrics.frames_dropped.labels(reason="queue_full").inc(overflow)
        return True

    def _units(self, item: _InFlight, frames: np.ndarray) -> list[MediaUnit]:
        """Pair each frame with its exact share of the driving audio at 48 kHz."""
        self._out_fifo = np.concatenate([self._out_fifo, item.audio48])
        fps = self.info.fps
        n = int(frames.shape[0])
        if not self._out_primed:
            # The resampler's start-up delay: pad once at the very start so later frames line up.
            need = round(n * AUDIO_RATE / fps)
            if len(self._out_fifo) < need:
                pad = np.zeros(need - len(self._out_fifo), np.float32)
                self._out_fifo = np.concatenate([pad, self._out_fifo])
            self._out_primed = True
        onset_frame = None
        if item.window.first_real_offset is not None:
            onset_frame = min(
                n - 1, int(item.window.first_real_offset * fps / self.info.audio_sample_rate)
            )
        spans = _frame_spans(item.window, n)
        units: list[MediaUnit] = []
        for j in range(n):
            g = self._out_frames
            count = round((g + 1) * AUDIO_RATE / fps) - round(g * AUDIO_RATE / fps)
            chunk = self._out_fifo[:count]
            self._out_fifo = self._out_fifo[count:]
            if len(chunk) < count:
                chunk = np.concatenate([chunk, np.zeros(count - len(chunk), np.float32)])
            pcm = (np.clip(chunk, -1.0, 1.0) * 32767.0).astype(np.int16)
            self._out_frames += 1
            units.append(
                MediaUnit(
                    frame=frames[j],
                    audio=pcm,
                    block_index=item.index,
                    audio_arrival=item.window.first_real_arrival if j == onset_frame else None,
                    span=spans[j],
                )
            )
        return units

    def _fail(self, message: str) -> None:
        self._stopped = True
        log.warning("session %s: %s", self.session_id, message)
        if self.on_error is not None:
            self.on_error(message)


def _frame_spans(window: AudioWindow, frames: int) -> list[tuple[int, int] | None]:
    """Per frame of a block, the sample indices (the ingest's counter) of the real audio that
    drove it: frame j is driven by window samples [j n / F, (j + 1) n / F), of which those
    between the front padding and the end of the real audio were sent by the client."""
    if window.first_real_index is None or window.first_real_offset is None:
        return [None] * frames
    n, pad, real = len(window.audio), window.first_real_offset, window.real_samples
    spans: list[tuple[int, int] | None] = []
    for j in range(frames):
        a = min(max(round(j * n / frames) - pad, 0), real)
        b = min(max(round((j + 1) * n / frames) - pad, 0), real)
        spans.append((window.first_real_index + a, window.first_real_index + b) if b > a else None)
    return spans
