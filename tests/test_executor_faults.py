"""Faults of the multi-process executors: a worker killed or hung mid-stream ends the streams with
a clear error within the timeout, leaves no process behind, and the executor streams again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from models.errors import ExecutorError
from pipelines.executors.tpp import TPPExecutor
from pipelines.messages import SessionSpec
from pipelines.reference import default_reference
from tests.multidevice_helpers import (
    audio_blocks,
    children_of,
    free_port,
    pid_alive,
    request,
    submit_all,
    wait_gone,
)

TIMEOUT_S = 5.0
pytestmark = pytest.mark.distributed


def _worker_children() -> list[int]:
    """Spawned executor workers still alive under this test process (not mp's resource tracker)."""
    out = []
    for pid in children_of(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmd:
            out.append(pid)
    return out


@pytest.fixture(scope="module")
def tpp():
    ex = TPPExecutor.launch(
        model="tiny",
        devices="cpu:3",
        threads=1,
        timeout_s=TIMEOUT_S,
        heartbeat_s=1.0,
        max_restarts=5,
        verbose=False,
    )
    yield ex
    pids = ex.pids()
    ex.close()
    assert wait_gone(pids, 10) == []


def _stream_until_first_result(ex, sid: str, n: int = 8):
    info = ex.info
    ex.open_session(SessionSpec(sid, default_reference(info.height, info.width), seed=1))
    audio = audio_blocks(info, n, 0)
    futs = submit_all(ex, [request(sid, i, audio[i]) for i in range(n)])
    first = futs[sid, 0].result(timeout=60)
    assert first.ok, first.error
    return futs


def _streams_again(ex, sid: str) -> None:
    info = ex.info
    ex.open_session(SessionSpec(sid, default_reference(info.height, info.width), seed=2))
    audio = audio_blocks(info, 3, 0)
    futs = submit_all(ex, [request(sid, i, audio[i]) for i in range(3)])
    for f in futs.values():
        r = f.result(timeout=60)
        assert r.ok, r.error
        assert r.frames.shape[1:] == (info.height, info.width, 3)
    ex.close_session(sid)


def test_killed_worker_ends_streams_and_executor_restarts(tpp):
    futs = _stream_until_first_result(tpp, "victim")
    pids = tpp.pids()
    killed = pids[1]
    t0 = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    errors = []
    for f in futs.values():
        r = f.result(timeout=TIMEOUT_S + 5)  # every future resolves, none hangs
        if not r.ok:
            errors.append(r.error)
    elapsed = time.monotonic() - t0
    assert errors, "the kill landed after the stream ended; nothing was tested"
    assert elapsed < TIMEOUT_S + 2
    assert all("rank 1" in e and "SIGKILL" in e for e in errors), errors
    assert not tpp.healthy()
    assert "rank 1" in tpp.failure
    assert wait_gone(pids, 10) == []  # the other ranks were stopped too
    assert _worker_children() == []
    with pytest.raises(ExecutorError):
        tpp.submit(request("victim", 99, audio_blocks(tpp.info, 1, 0)[0]))
    _streams_again(tpp, "after-kill")  # open_session starts a fresh group
    assert tpp.healthy() and set(tpp.pids()).isdisjoint(pids)


def test_killed_dualparal_worker_ends_streams_and_executor_restarts():
    """The same fault for DualParal: a layer rank killed while blocks sit in its queue."""
    from pipelines.executors.dualparal import DualParalExecutor

    others = set(_worker_children())  # the module's TPP workers, when its fixture is up
    ex = DualParalExecutor.launch(
        model="tiny",
        devices="cpu:3",
        threads=1,
        timeout_s=TIMEOUT_S,
        heartbeat_s=1.0,
        max_restarts=2,
        verbose=False,
    )
    try:
        futs = _stream_until_first_result(ex, "dp-victim", n=12)
        pids = ex.pids()
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        errors = [
            r.error for r in (f.result(timeout=TIMEOUT_S + 5) for f in futs.values()) if not r.ok
        ]
        elapsed = time.monotonic() - t0
        assert errors, "the kill landed after the stream ended; nothing was tested"
        assert elapsed < TIMEOUT_S + 2
        assert all("rank 1" in e for e in errors), errors
        assert not ex.healthy()
        assert wait_gone(pids, 10) == []
        _streams_again(ex, "dp-after-kill")
        assert ex.healthy() and set(ex.pids()).isdisjoint(pids)
    finally:
        pids = ex.pids()
        ex.close()
    assert wait_gone(pids, 10) == []
    assert set(_worker_children()) <= others


def test_hung_worker_is_detected_within_the_timeout(tpp):
    futs = _stream_until_first_result(tpp, "frozen")
    pids = tpp.pids()
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)  # alive, holds its sockets, answers nothing
    try:
        errors = [
            r.error for r in (f.result(timeout=3 * TIMEOUT_S) for f in futs.values()) if not r.ok
        ]
        elapsed = time.monotonic() - t0
    finally:
        if pid_alive(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    assert errors
    assert elapsed < TIMEOUT_S + 4, elapsed
    assert not tpp.healthy()
    assert wait_gone(pids, 10) == []
    _streams_again(tpp, "after-hang")


def test_close_leaves_no_process_and_refuses_work():
    ex = TPPExecutor.launch(
        model="tiny", devices="cpu:2", threads=1, timeout_s=TIMEOUT_S, verbose=False
    )
    pids = ex.pids()
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    ex.close()
    ex.close()  # idempotent
    assert wait_gone(pids, 10) == []
    assert not ex.healthy()
    with pytest.raises(ExecutorError):
        ex.open_session(SessionSpec("x", default_reference(ex.info.height, ex.info.width)))


def test_workers_exit_when_the_service_process_is_killed(tmp_path):
    """kill -9 of the service: no cleanup code runs there, the workers still go away."""
    script = textwrap.dedent(
        """
        import sys, time
        from pipelines.executors.tpp import TPPExecutor
        if __name__ == "__main__":
            ex = TPPExecutor.launch(model="tiny", devices="cpu:2", threads=1, verbose=False)
            print(" ".join(map(str, ex.pids())), flush=True)
            time.sleep(600)
        """
    )
    path = tmp_path / "service.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=os.getcwd()
    )
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        proc.kill()
        proc.wait(10)
        assert wait_gone(pids, 10) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_torchrun_workers_stream_and_come_back_after_a_failure(tmp_path):
    """Several-node mode on one machine: torchrun starts the workers, which join the service's
    rendezvous; a killed worker fails the stream, torchrun (--max-restarts) starts new workers,
    they join the next generation and the executor streams again."""
    from pipelines.executors import build_executor

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    log = open(tmp_path / "torchrun.log", "w")  # noqa: SIM115 - closed below
    torchrun = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "3",
            "--max-restarts",
            "1",
            "-m",
            "pipelines.executors.torchrun",
            "--connect",
            f"127.0.0.1:{port}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ex = None
    try:
        ex = build_executor(
            "tpp",
            model="tiny",
            devices=f"torchrun:3@127.0.0.1:{port}",
            timeout_s=TIMEOUT_S,
            heartbeat_s=1.0,
            startup_timeout_s=120,
            verbose=False,
        )
        assert len(ex.placement) == 3
        futs = _stream_until_first_result(ex, "remote", n=30)  # the kill lands mid-stream
        victim = int(ex.placement[1].split("pid")[1].split()[0])
        os.kill(victim, signal.SIGKILL)
        errors = [
            r.error for r in (f.result(timeout=TIMEOUT_S + 5) for f in futs.values()) if not r.ok
        ]
        assert errors and all("rank" in e for e in errors)
        assert not ex.healthy()
        _streams_again(ex, "remote-again")  # a new generation of torchrun's restarted workers
        ex.close()
        assert torchrun.wait(30) == 0  # the workers stopped cleanly, so did torchrun
    finally:
        if ex is not None:
            ex.close()
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait(10)
        log.close()


def test_bad_option_is_reported_as_the_users_error_and_leaves_nothing():
    from models.errors import ConfigError, ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        TPPExecutor.launch(model="no-such-model", devices="cpu:2")  # before any process starts
    before = set(_worker_children())
    with pytest.raises(ConfigError, match="steps"):
        TPPExecutor.launch(model="tiny", devices="cpu:2", steps=0, threads=1, verbose=False)
    assert wait_gone(list(set(_worker_children()) - before), 10) == []
