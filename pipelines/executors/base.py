"""The one interface every executor offers; the service never knows which one it talks to.

`submit` is non-blocking and returns a `concurrent.futures.Future` (the service awaits it with
`asyncio.wrap_future`), so a worker thread, a pool of processes or a torch.distributed pipeline
all look the same from the event loop.
"""

from __future__ import annotations

import abc
from concurrent.futures import Future
from dataclasses import dataclass

from pipelines.messages import BlockRequest, BlockResult, SessionSpec


class ExecutorBusy(Exception):
    """Raised by submit() when the bounded in-flight queue is full (the caller degrades)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the service needs to know about the loaded model to pace and shape a stream."""

    fps: float
    height: int
    width: int
    audio_sample_rate: int
    frames_per_block: int  # video frames a steady-state block produces
    first_block_frames: int  # video frames of block 0 (causal VAEs emit fewer for the first)
    steps: int
    name: str
    # Blocks of one session after which every graph of a compiled step exists (the ring has
    # filled and one block ran at full ring): what a warm-up at start-up runs.
    warmup_blocks: int = 1

    def block_frame_start(self, block_index: int) -> int:
        """Index of the first video frame of block `block_index`."""
        if block_index == 0:
            return 0
        return self.first_block_frames + (block_index - 1) * self.frames_per_block

    def block_samples(self, block_index: int) -> int:
        """Audio samples (at audio_sample_rate) that drive block `block_index`; boundaries are
        rounded from the cumulative frame count, so rounding never drifts over a long stream."""
        start = self.block_frame_start(block_index)
        frames = self.first_block_frames if block_index == 0 else self.frames_per_block
        sr, fps = self.audio_sample_rate, self.fps
        return round((start + frames) * sr / fps) - round(start * sr / fps)


class Executor(abc.ABC):
    """open_session → submit blocks (in order per session) → close_session; close() at the end."""

    info: ModelInfo

    @abc.abstractmethod
    def open_session(self, spec: SessionSpec) -> None:
        """Prepare per-session state (caches, sink) on every worker that needs it."""

    @abc.abstractmethod
    def submit(self, request: BlockRequest) -> Future[BlockResult]:
        """Queue one block; raises ExecutorBusy when the bounded queue is full."""

    @abc.abstractmethod
    def close_session(self, session_id: str) -> None:
        """Drop the session's state everywhere; pending blocks of it resolve with an error."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop workers and release every resource; idempotent."""

    def healthy(self) -> bool:
        """False once a worker has died and the executor must be restarted."""
        return True

    def pids(self) -> list[int]:
        """Process ids of the engine's worker processes; none when it runs in this process."""
        return []

    def held_sessions(self, timeout: float = 2.0) -> list[int] | None:
        """Sessions whose state each engine rank holds now, as the ranks count them themselves
        (not the caller's bookkeeping), so state a worker forgot to drop shows; None when the
        engine cannot answer within `timeout` (busy, failed or shut down)."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
