"""50 cycles of connect, stream, disconnect against one service: the service's process and the
engine's worker process keep their threads and resident memory flat, the event loop its task
count, and the engine holds no session once the service has closed them all.

Measured from outside, as an operator would: /proc/<pid>/status for threads and RSS of both
processes (the worker's pid from /healthz), /healthz for the event loop's task count, /metrics
for the sessions each engine rank says it holds. The first cycles warm up lazily created things
(thread pools, codec contexts, allocator arenas); the comparison is between cycle 10 and cycle 50.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from stream.client import AvatarClient, http
from stream.harness import ServiceProcess

CYCLES = 50
WARMUP = 10
# Thresholds: a leaked peer connection (encoder, transports, tasks) or session (generator state,
# caches) per cycle would cost several MB and several tasks per cycle, i.e. >= 40 of each here.
MAX_RSS_GROWTH_MB = 15.0
MAX_THREAD_GROWTH = 2
MAX_TASK_GROWTH = 0


async def _cycle(base: str, tone: np.ndarray, *, delete: bool) -> int:
    client = AvatarClient(base)
    await client.create()
    await client.watch()
    await asyncio.wait_for(client.first_video.wait(), 30)
    await client.open_audio(16000)
    await client.send_pcm(tone, 16000)
    frames = len(client.received.video)
    # Half the cycles DELETE the session, half just leave (the server notices the peer closing).
    await client.close(delete=delete)
    return frames


def _wait_idle(svc: ServiceProcess, timeout: float = 20.0) -> None:
    """Until the service has no session and the engine's worker holds none either (it drops a
    session's state when the driver's "close" reaches it, a moment after the service forgets it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.health()["sessions"] == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"sessions still open: {http('GET', svc.base + '/v1/sessions')[1]}")
    held = None
    while time.monotonic() < deadline:
        held = svc.engine_sessions()
        if held == [0]:
            return
        time.sleep(0.1)
    raise AssertionError(f"the service closed every session but the engine still holds {held}")


def _sample(svc: ServiceProcess, worker: int) -> dict[str, float]:
    time.sleep(0.5)  # let closing tasks finish and the encoder pool go quiet
    status = svc.proc_status()
    engine = svc.proc_status(worker)
    return {
        "threads": status["Threads"],
        "rss_mb": status["VmRSS"] / 1024,
        "tasks": svc.health()["tasks"],
        "worker_threads": engine["Threads"],
        "worker_rss_mb": engine["VmRSS"] / 1024,
    }


def test_fifty_sessions_leave_threads_tasks_and_memory_flat(tmp_path) -> None:
    """Fails if the engine's worker keeps a session's state after its close (e.g. the "close"
    branch of WholeGenerator.run no longer pops the session: the engine reports 1 held session
    after the first cycle), or if either process grows threads or memory per session."""
    t = np.arange(int(0.6 * 16000)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    with ServiceProcess("--max-sessions", "2", log_path=tmp_path / "serve.log") as svc:
        (worker,) = svc.worker_pids()  # --executor local: one engine process
        assert svc.engine_sessions() == [0]
        baseline = _sample(svc, worker)
        samples: dict[int, dict[str, float]] = {}
        for i in range(1, CYCLES + 1):
            frames = asyncio.run(_cycle(svc.base, tone, delete=i % 2 == 0))
            assert frames > 0, f"cycle {i}: no video"
            _wait_idle(svc)
            if i in (WARMUP, 30, CYCLES):
                samples[i] = _sample(svc, worker)
        warm, end = samples[WARMUP], samples[CYCLES]
        print(f"baseline {baseline}")
        for i, s in samples.items():
            print(f"after cycle {i}: {s}")
        # The same worker all along: a restarted one would start from scratch and hide a leak.
        assert svc.worker_pids() == [worker]
        ended = svc.metrics()
        assert ended['diffstream_sessions_total{outcome="deleted"}'] == CYCLES // 2
        assert ended['diffstream_sessions_total{outcome="viewer_gone"}'] == CYCLES // 2
        assert end["threads"] - warm["threads"] <= MAX_THREAD_GROWTH, samples
        assert end["tasks"] - warm["tasks"] <= MAX_TASK_GROWTH, samples
        assert end["tasks"] <= baseline["tasks"], (baseline, end)
        assert end["rss_mb"] - warm["rss_mb"] <= MAX_RSS_GROWTH_MB, samples
        assert end["worker_threads"] - warm["worker_threads"] <= MAX_THREAD_GROWTH, samples
        assert end["worker_rss_mb"] - warm["worker_rss_mb"] <= MAX_RSS_GROWTH_MB, samples
