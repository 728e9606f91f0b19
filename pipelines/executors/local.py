"""Local executor: one device, one worker thread running the generator's loop.

All torch work happens on the worker thread, in submission order, so blocks of one session are
generated in order and the event loop never waits on the model. The queue is bounded: submit()
raises ExecutorBusy instead of letting work pile up behind a slow device.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from models.errors import DiffstreamError, ExecutorError, SessionError
from pipelines.executors.base import Executor, ExecutorBusy, ModelInfo
from pipelines.generator import SessionState, StreamingGenerator
from pipelines.messages import BlockRequest, BlockResult, SessionSpec

log = logging.getLogger(__name__)


def model_info(gen: StreamingGenerator, name: str) -> ModelInfo:
    return ModelInfo(
        fps=gen.fps,
        height=gen.height,
        width=gen.width,
        audio_sample_rate=gen.audio_sample_rate,
        frames_per_block=gen.block_video_frames(1),
        first_block_frames=gen.block_video_frames(0),
        steps=gen.config.steps,
        name=name,
        warmup_blocks=gen.config.window_frames // gen.config.frames_per_block + 2,
    )


@dataclass
class _Open:
    spec: SessionSpec
    future: Future


@dataclass
class _Close:
    session_id: str


@dataclass
class _Count:
    future: Future


@dataclass
class _Block:
    request: BlockRequest
    future: Future


_STOP = object()


class LocalExecutor(Executor):
    def __init__(self, generator: StreamingGenerator, *, name: str = "model", max_queue: int = 32):
        self.generator = generator
        self.info = model_info(generator, name)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._sessions: dict[str, SessionState] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="diffstream-local", daemon=True)
        self._thread.start()

    # ---- interface -----------------------------------------------------------------------
    def open_session(self, spec: SessionSpec) -> None:
        """Blocks until the session's sink is encoded (call it from a thread in async code)."""
        fut: Future = Future()
        self._put(_Open(spec, fut), block=True)
        fut.result()

    def submit(self, request: BlockRequest) -> Future[BlockResult]:
        fut: Future[BlockResult] = Future()
        self._put(_Block(request, fut), block=False)
        return fut

    def close_session(self, session_id: str) -> None:
        if not self._closed:
            self._put(_Close(session_id), block=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=5)
        self._thread.join(timeout=30)
        # Anything still queued is answered, so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._fail(item, "the executor was shut down")

    def healthy(self) -> bool:
        return not self._closed and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def held_sessions(self, timeout: float = 2.0) -> list[int] | None:
        """The engine thread's own table, read by that thread after everything queued before
        (a close_session just made is counted as done); None if it does not answer in time."""
        if self._closed:
            return [len(self._sessions)]
        fut: Future = Future()
        try:
            self._put(_Count(fut), block=True)
            return [fut.result(timeout=timeout)]
        except (ExecutorBusy, TimeoutError):
            return None

    # ---- worker --------------------------------------------------------------------------
    def _put(self, item: Any, *, block: bool) -> None:
        if self._closed:
            raise ExecutorError("the executor is shut down")
        try:
            self._queue.put(item, block=block, timeout=30 if block else None)
        except queue.Full:
            raise ExecutorBusy(f"executor queue is full ({self._queue.maxsize} items)") from None

    @staticmethod
    def _fail(item: Any, message: str) -> None:
        if isinstance(item, _Block) and not item.future.done():
            r = item.request
            item.future.set_result(
                BlockResult(
                    r.session_id, r.block_index, None, submitted_at=r.submitted_at, error=message
                )
            )
        elif isinstance(item, _Open) and not item.future.done():
            item.future.set_exception(ExecutorError(message))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._handle(item)
            except Exception as exc:  # keep serving other sessions whatever one block does
                log.exception("local executor: unexpected error")
                self._fail(item, f"internal error: {exc}")

    def _handle(self, item: Any) -> None:
        gen = self.generator
        if isinstance(item, _Open):
            spec = item.spec
            try:
                self._sessions[spec.session_id] = gen.new_session(
                    spec.reference,
                    session_id=spec.session_id,
                    seed=spec.seed,
                    steps=spec.steps,
                    sink_refresh=spec.sink_refresh,
                    prompt=spec.prompt,
                )
            except DiffstreamError as exc:
                item.future.set_exception(exc)
            else:
                item.future.set_result(None)
        elif isinstance(item, _Close):
            self._sessions.pop(item.session_id, None)
        elif isinstance(item, _Count):
            item.future.set_result(len(self._sessions))
        elif isinstance(item, _Block):
            req = item.request
            state = self._sessions.get(req.session_id)
            if state is None:
                self._fail(item, f"session {req.session_id!r} is not open")
                return
            if req.block_index != state.block_index:
                self._fail(
                    item,
                    f"block {req.block_index} submitted out of order (expected {state.block_index})",
                )
                return
            try:
                frames, timings = gen.generate_block(state, req.audio)
            except DiffstreamError as exc:
                self._sessions.pop(req.session_id, None)
                item.future.set_exception(SessionError(str(exc)))
                return
            item.future.set_result(
                BlockResult(
                    req.session_id,
                    req.block_index,
                    frames,
                    timings=timings,
                    submitted_at=req.submitted_at or time.perf_counter(),
                )
            )
