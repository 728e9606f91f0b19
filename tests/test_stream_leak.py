"""50 cycles of connect, stream, disconnect against one service process: its threads, asyncio
tasks and resident memory stay flat.

Measured from outside, as an operator would: /proc/<pid>/status for threads and RSS, /healthz
for the event loop's task count. The first cycles warm up lazily created things (thread pools,
codec contexts, allocator arenas); the comparison is between cycle 10 and cycle 50.
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.health()["sessions"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"sessions still open: {http('GET', svc.base + '/v1/sessions')[1]}")


def _sample(svc: ServiceProcess) -> dict[str, float]:
    time.sleep(0.5)  # let closing tasks finish and the encoder pool go quiet
    status = svc.proc_status()
    return {
        "threads": status["Threads"],
        "rss_mb": status["VmRSS"] / 1024,
        "tasks": svc.health()["tasks"],
    }


def test_fifty_sessions_leave_threads_tasks_and_memory_flat(tmp_path) -> None:
    t = np.arange(int(0.6 * 16000)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    with ServiceProcess("--max-sessions", "2", log_path=tmp_path / "serve.log") as svc:
        baseline = _sample(svc)
        samples: dict[int, dict[str, float]] = {}
        for i in range(1, CYCLES + 1):
            frames = asyncio.run(_cycle(svc.base, tone, delete=i % 2 == 0))
            assert frames > 0, f"cycle {i}: no video"
            _wait_idle(svc)
            if i in (WARMUP, 30, CYCLES):
                samples[i] = _sample(svc)
        warm, end = samples[WARMUP], samples[CYCLES]
        print(f"baseline {baseline}")
        for i, s in samples.items():
            print(f"after cycle {i}: {s}")
        ended = svc.metrics()
        assert ended['diffstream_sessions_total{outcome="deleted"}'] == CYCLES // 2
        assert ended['diffstream_sessions_total{outcome="viewer_gone"}'] == CYCLES // 2
        assert end["threads"] - warm["threads"] <= MAX_THREAD_GROWTH, samples
        assert end["tasks"] - warm["tasks"] <= MAX_TASK_GROWTH, samples
        assert end["tasks"] <= baseline["tasks"], (baseline, end)
        assert end["rss_mb"] - warm["rss_mb"] <= MAX_RSS_GROWTH_MB, samples
