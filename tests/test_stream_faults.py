"""Faults at the service: the engine's worker process dies under a real `diffstream serve` while
a client streams. The client must be told (an error on its websocket, not a frozen picture),
/healthz must say so, and the next session must get a fresh worker and stream.

The executor-level half (the driver notices, fails pending blocks, restarts) is in
tests/test_executor_faults.py; this file checks what a client and an operator see.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from models.errors import ExecutorError
from pipelines.executors.base import Executor, ModelInfo
from stream.client import AvatarClient
from stream.harness import ServiceProcess

SR = 16000


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


async def _until_closed(client: AvatarClient, timeout: float) -> tuple[list[dict], int | None]:
    """Every JSON message the server sends on the audio socket until it closes it."""
    code = await client.wait_socket_closed(timeout)
    return [m for _, m in client.received.messages], code


async def _wait_health(svc: ServiceProcess, status: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(svc.health_status)
        if seen[0] == status:
            return seen[1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"/healthz never answered {status} within {timeout} s; last {seen}")


@pytest.mark.parametrize("talking", [True, False], ids=["talking", "idle"])
def test_killed_worker_fails_the_stream_and_the_next_session_gets_a_fresh_one(
    tmp_path, talking: bool
) -> None:
    """The worker dies while the client talks (blocks in flight) or while the avatar idles
    between utterances (often no block in flight: the next submit meets the failed executor).

    Fails if a session whose worker died keeps idling with no word to its client (e.g. the
    scheduler's task dies on the executor's error at submit without closing the session, or the
    session closes without sending the error), if /healthz stays 200 with the worker gone, or if
    the next session does not restart the worker and stream, or if /livez (the liveness
    probe) stays 200 with the worker gone (tried: livez answering 200 always)."""
    with ServiceProcess("--max-sessions", "2", log_path=tmp_path / "serve.log") as svc:
        (worker,) = svc.worker_pids()

        async def run() -> None:
            doomed = AvatarClient(svc.base)
            await doomed.create()
            await doomed.watch()
            await asyncio.wait_for(doomed.first_video.wait(), 30)
            await doomed.open_audio(SR)
            speech = _tone(60) if talking else np.zeros(0, np.float32)
            sender = asyncio.create_task(doomed.send_pcm(speech, SR))
            await asyncio.sleep(1.5)  # mid-stream
            assert len(doomed.received.video) > 10

            os.kill(worker, signal.SIGKILL)
            health = await _wait_health(svc, 503, timeout=10)
            assert health["status"] == "unhealthy"
            live = await asyncio.to_thread(svc.health_status, "/livez")
            assert live == (503, {"status": "unhealthy"}), live
            messages, code = await _until_closed(doomed, timeout=15)
            errors = [m for m in messages if m.get("type") == "error"]
            assert errors, f"no error reached the client (got {messages}, close {code})"
            assert "killed by SIGKILL" in errors[-1]["message"], errors
            assert code == 1011, code
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await doomed.close(delete=False)
            _, health = await asyncio.to_thread(svc.health_status)
            assert health["sessions"] == 0, "the failed session was not released"

            # The next session restarts the engine on a fresh worker and streams.
            fresh = AvatarClient(svc.base)
            await fresh.create()
            await fresh.watch()
            await asyncio.wait_for(fresh.first_video.wait(), 60)
            await fresh.open_audio(SR)
            t0 = time.monotonic()
            await fresh.send_pcm(_tone(3.0), SR)
            t1 = time.monotonic()
            fps = fresh.video_fps(t0 + 0.5, t1)
            assert fps >= 20, f"the session after the restart streams {fps:.1f} fps"
            loud = [r for _, _, r in fresh.received.audio if r > 0.1]
            assert len(loud) > 50, "the new session's driving audio did not come back"
            health = await _wait_health(svc, 200, timeout=5)
            assert health["sessions"] == 1
            await fresh.close()

        asyncio.run(run())
        workers = svc.worker_pids()
        assert len(workers) == 1 and worker not in workers, (worker, workers)
        samples = svc.metrics()
        assert samples['diffstream_sessions_total{outcome="error"}'] == 1
        assert svc.proc.poll() is None  # the service itself never went down


class _FailedExecutor(Executor):
    """An executor whose worker already died: every submit is refused, as PipelineExecutor does
    between the failure and the next restart."""

    info = ModelInfo(
        fps=25.0,
        height=16,
        width=16,
        audio_sample_rate=SR,
        frames_per_block=3,
        first_block_frames=3,
        steps=1,
        name="failed",
    )

    def open_session(self, spec) -> None:  # noqa: ANN001
        pass

    def submit(self, request):  # noqa: ANN001, ANN201
        raise ExecutorError("the local executor failed: worker rank 0 (cpu) was killed by SIGKILL")

    def close_session(self, session_id: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_scheduler_reports_an_executor_that_failed_between_two_blocks() -> None:
    """No block in flight when the worker dies (an idle avatar between two blocks): the next
    submit meets the failed executor. Fails if that error escapes the scheduler's task instead
    of ending the session through on_error (the session would idle on a frozen frame, its
    client never told)."""
    from stream.ingest import AudioIngest
    from stream.metrics import ServiceMetrics
    from stream.protocol import StartMessage
    from stream.scheduler import BlockScheduler
    from stream.timeline import MediaTimeline

    executor = _FailedExecutor()
    info = executor.info
    errors: list[str] = []

    async def run() -> None:
        ingest = AudioIngest(SR, max_buffer_s=5, jitter_s=0.08)
        ingest.start(StartMessage(type="start", sample_rate=SR, channels=1, format="s16le"))
        timeline = MediaTimeline(info.fps, info.height, info.width, max_queued_frames=32)
        sched = BlockScheduler(
            "s", executor, ingest, timeline, ServiceMetrics(), on_error=errors.append
        )
        await asyncio.wait_for(sched.run(), 5)

    asyncio.run(run())
    assert len(errors) == 1 and "killed by SIGKILL" in errors[0], errors
