"""Graceful shutdown of a real `diffstream serve`: SIGTERM while two clients stream.

One client talks and then sends `stop`: its session plays out and ends normally (1000) during
the drain. The other idles with its socket open and never stops: it is told `closing` and is
ended at the drain deadline with 1001. Meanwhile /healthz says "draining" and new sessions are
refused; at the end the process exits 0 and leaves no process behind (the engine's worker).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from stream.client import AvatarClient, ServiceError, ahttp
from stream.harness import ServiceProcess

SR = 16000
DRAIN_S = 8.0


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (what psutil's children(recursive=True) gives)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("PPid:"):
                        parents[int(entry.name)] = int(line.split()[1])
            except OSError:
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, exited and waiting to be reaped, does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.timeout(240)
def test_sigterm_drains_sessions_tells_clients_and_exits_zero_with_no_children(tmp_path) -> None:
    """Fails if SIGTERM shuts down at once (e.g. DrainingServer.handle_exit passing SIGTERM to
    uvicorn's: /healthz never says draining and both sockets end with 1001 at once), if the
    clients are not told (`announce_closing` not called), if the idle session outlives the
    deadline, if the process exits non-zero (uvicorn re-raising SIGTERM: -15), or if the
    engine's worker is left running."""
    flags = ["--drain-seconds", str(DRAIN_S), "--max-sessions", "3"]
    flags += ["--max-sessions-per-client", "3"]
    svc = ServiceProcess(*flags, log_path=tmp_path / "serve.log")
    with svc:
        children = _descendants(svc.proc.pid)
        assert set(svc.worker_pids()) <= children and children, (children, svc.worker_pids())

        async def run() -> None:
            talker, idler = AvatarClient(svc.base), AvatarClient(svc.base)
            for client in (talker, idler):
                await client.create()
                await client.watch()
                await asyncio.wait_for(client.first_video.wait(), 60)
                await client.open_audio(SR)

            async def talk() -> None:
                await talker.send_pcm(_tone(3.0), SR)
                await talker.control("stop", reply="stopping")

            talking = asyncio.create_task(talk())
            await asyncio.sleep(0.5)
            svc.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            deadline = signalled + 10
            while time.monotonic() < deadline:
                status, body = await asyncio.to_thread(svc.health_status)
                if status == 503:
                    break
                await asyncio.sleep(0.05)
            assert (status, body["status"]) == (503, "draining"), (status, body)
            # Liveness stays 200: an orchestrator must not restart a replica for draining.
            assert await asyncio.to_thread(svc.health_status, "/livez") == (200, {"status": "ok"})
            with pytest.raises(ServiceError) as refused:
                await ahttp("POST", f"{svc.base}/v1/sessions")
            assert refused.value.status == 503 and "shutting down" in refused.value.detail

            for client in (talker, idler):
                closing = await client.wait_message("closing", timeout=10)
                assert closing["message"] == "server is shutting down", closing
            await talking
            talked = await talker.wait_socket_closed(DRAIN_S + 10)
            assert talked == 1000, f"the talking session did not play out: {talked}"
            late = [t for t, _ in talker.received.video if t > signalled + 1.0]
            assert len(late) > 10, "the talking client stopped receiving video at SIGTERM"

            idled = await idler.wait_socket_closed(DRAIN_S + 15)
            assert idled == 1001, idled
            assert time.monotonic() - signalled > DRAIN_S / 2, "ended long before the deadline"
            assert [s for s in idler.received.stats if s.get("type") == "closing"], (
                "the viewer's stats channel was not told"
            )
            for client in (talker, idler):
                await client.close(delete=False)

        asyncio.run(run())
        assert svc.proc.wait(timeout=60) == 0, svc.log_tail()
        left = [pid for pid in children if _alive(pid)]
        assert not left, f"processes left after exit: {left}"
    log = (tmp_path / "serve.log").read_text()
    assert "draining" in log
