"""The local executor in a worker process (what the service runs): the same frames as the
in-thread engine, bad input ends only its session, a killed worker restarts, and the service's
busy Python threads do not slow it down the way they slow an engine thread."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from models.errors import ExecutorError, SessionError
from pipelines.executors import build_executor
from pipelines.messages import BlockRequest, SessionSpec
from pipelines.reference import default_reference
from tests.multidevice_helpers import audio_blocks, wait_gone

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def worker():
    ex = build_executor("local", model="tiny", process=True, threads=1, timeout_s=10)
    yield ex
    pids = ex.pids()
    ex.close()
    assert wait_gone(pids, 10) == []


def _frames(ex, sid: str, blocks: int, **spec) -> np.ndarray:
    info = ex.info
    ex.open_session(SessionSpec(sid, default_reference(info.height, info.width), **spec))
    audio = audio_blocks(info, blocks, seed=4)
    out = []
    for i in range(blocks):
        r = ex.submit(BlockRequest(sid, i, audio[i])).result(timeout=60)
        assert r.ok, r.error
        out.append(r.frames)
    ex.close_session(sid)
    return np.concatenate(out)


@pytest.mark.parametrize("mode", ["reencode", "timestep_forcing"])
def test_worker_process_gives_the_in_thread_frames(mode):
    here = build_executor("local", model="tiny", cache_mode=mode)
    there = build_executor("local", model="tiny", cache_mode=mode, process=True, threads=1)
    try:
        assert there.info == here.info
        for spec in ({"seed": 2}, {"seed": 3, "sink_refresh": True}):
            a, b = _frames(here, "a", 6, **spec), _frames(there, "b", 6, **spec)
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(_frames(there, "c", 2, seed=9), a[: len(a) // 3])
    finally:
        here.close()
        there.close()


def test_bad_input_ends_only_its_session(worker):
    info = worker.info
    ref = default_reference(info.height, info.width)
    worker.open_session(SessionSpec("good", ref, seed=1))
    with pytest.raises(ExecutorError, match="internal error in the local worker"):
        worker.open_session(SessionSpec("odd", default_reference(2 * info.height, info.width)))
    worker.open_session(SessionSpec("short", ref))
    with pytest.raises(SessionError, match="audio samples"):
        worker.submit(BlockRequest("short", 0, np.zeros(5, np.float32))).result(timeout=30)
    r = worker.submit(BlockRequest("good", 0, audio_blocks(info, 1, 0)[0])).result(timeout=30)
    assert r.ok and r.frames.shape[1:] == (info.height, info.width, 3)
    late = worker.submit(BlockRequest("good", 5, audio_blocks(info, 6, 0)[5])).result(timeout=30)
    assert not late.ok and "out of order" in late.error
    assert worker.healthy()
    assert [s["sessions"] for s in worker.worker_stats()] == [1]
    worker.close_session("good")


def test_killed_worker_fails_its_blocks_and_restarts(worker):
    info = worker.info
    worker.open_session(SessionSpec("victim", default_reference(info.height, info.width)))
    pid = worker.pids()[0]
    os.kill(pid, signal.SIGKILL)
    audio = audio_blocks(info, 1, 0)[0]
    deadline = time.monotonic() + 15
    while worker.healthy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not worker.healthy() and "SIGKILL" in worker.failure
    with pytest.raises(ExecutorError):
        worker.submit(BlockRequest("victim", 0, audio))
    assert _frames(worker, "after", 2).shape[0] > 0  # open_session started a fresh worker
    assert worker.healthy() and worker.pids()[0] != pid


def test_busy_python_threads_do_not_hold_up_the_worker(worker):
    """A thread spinning in Python (as an event loop under load does) next to the engine: the
    worker process keeps its pace, an engine thread in this process would crawl (GIL). The
    two speeds are measured alternately against the same spinning thread, so machine load
    cancels out of the ratio."""
    info = worker.info
    ref = default_reference(info.height, info.width)
    here = build_executor("local", model="tiny")
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    try:
        for ex in (worker, here):
            ex.open_session(SessionSpec("spin", ref))
        audio = audio_blocks(info, 2, 0)
        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        took = {id(worker): [], id(here): []}
        for i in range(2):
            for ex in (worker, here):
                t0 = time.perf_counter()
                assert ex.submit(BlockRequest("spin", i, audio[i])).result(timeout=120).ok
                took[id(ex)].append(time.perf_counter() - t0)
    finally:
        stop.set()
        for ex in (worker, here):
            ex.close_session("spin")
        here.close()
    ratio = np.median(took[id(here)]) / np.median(took[id(worker)])
    assert ratio > 2, f"thread/process block time ratio {ratio:.2f}"
