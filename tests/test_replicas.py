"""Many replicas behind a real load balancer (docs/service.md, Scaling out).

Two `diffstream serve` processes, `--replica-id r1` and `r2`, behind Debian's HAProxy started
with the configuration stream/replicas.py generates: sessions are created, watched (aiortc;
the SDP offer goes through the balancer, the media directly to the replica) and talked to (the
audio websocket) only through the balancer. One replica is killed with SIGKILL; the other's
sessions never notice, and new sessions go to the survivor. Smaller checks: session ids, the
settings, and that the generated configuration is one HAProxy accepts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import numpy as np
import pytest

from models.errors import ConfigError, SessionError
from stream.client import AvatarClient, ServiceError, ahttp, http
from stream.harness import ServiceProcess, free_port
from stream.replicas import (
    check_session_id,
    derived_replica_id,
    haproxy_config,
    main,
    new_session_id,
)
from stream.settings import load_settings

SR = 16000
HAPROXY = "/usr/sbin/haproxy"  # Debian's haproxy (scripts/install-browser.sh installs it)
MAX_GAP_S = 1.5  # the longest the surviving replica's viewer may go without a frame


def haproxy_binary() -> str:
    binary = shutil.which("haproxy") or (HAPROXY if Path(HAPROXY).exists() else None)
    if binary is None:
        pytest.skip("haproxy not installed (Debian's haproxy; scripts/install-browser.sh)")
    return binary


def haproxy_check(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    return subprocess.run(
        [haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )


# Ids and settings ------------------------------------------------------------------------------


def test_session_ids_carry_the_replica_and_bad_ids_are_not_found() -> None:
    """Fails if the id loses its prefix, or if a malformed id or another replica's id is
    anything but SessionError (the routes' 404)."""
    sid = new_session_id("r1")
    assert sid.startswith("r1-") and len(sid) == 3 + 32
    check_session_id(sid, "r1")
    plain = new_session_id(None)
    assert len(plain) == 32
    check_session_id(plain, None)
    for bad in ["nope", "", "r1-", "R1-" + "a" * 32, "r1-" + "g" * 32, "x" * 5000, "../../etc"]:
        with pytest.raises(SessionError, match="not found"):
            check_session_id(bad, "r1")
    with pytest.raises(SessionError, match="belongs to replica 'r2'"):
        check_session_id(new_session_id("r2"), "r1")
    with pytest.raises(SessionError, match="belongs to replica 'r1'"):
        check_session_id(sid, None)
    # a dashed id (a StatefulSet's pod name) is told apart from a shorter one it starts with
    check_session_id(new_session_id("diffstream-10"), "diffstream-10")
    with pytest.raises(SessionError):
        check_session_id(new_session_id("diffstream-10"), "diffstream-1")


def test_replica_id_setting() -> None:
    assert load_settings().replica_id is None
    assert load_settings(replica_id="diffstream-0").replica_id == "diffstream-0"
    assert load_settings(replica_id="auto").replica_id == derived_replica_id()
    assert derived_replica_id("Pod_7.example.com") == "pod-7"
    for bad in ["R1", "-r1", "r1-", "a" * 64, "r 1"]:
        with pytest.raises(ConfigError, match="replica_id"):
            load_settings(replica_id=bad)


def test_generated_config_is_valid_haproxy(tmp_path, capsys) -> None:
    """Fails if the generator writes something HAProxy refuses (`haproxy -c`), or drops the
    per-replica route of a session path."""
    replicas = [("r1", "127.0.0.1:8001"), ("diffstream-1", "10.0.0.2:8000")]
    config = haproxy_config(replicas, bind="127.0.0.1:8080")
    checked = haproxy_check(config, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "use_backend replica_diffstream-1 if session_diffstream-1" in config
    assert "path_reg ^/v1/sessions/diffstream-1-[0-9a-f]{32}(/|$)" in config
    with pytest.raises(ValueError, match="twice"):
        haproxy_config([("r1", "a:1"), ("r1", "b:1")])
    assert main(["r1=127.0.0.1:8001", "--bind", "127.0.0.1:8080"]) == 0
    assert capsys.readouterr().out == haproxy_config(
        [("r1", "127.0.0.1:8001")], bind="127.0.0.1:8080"
    )


# Two replicas, one killed ----------------------------------------------------------------------


class HAProxy:
    """haproxy in the foreground (-db) with a generated configuration; a context manager."""

    def __init__(self, config: str, tmp_path: Path) -> None:
        self.path = tmp_path / "haproxy.cfg"
        self.path.write_text(config)
        self.log = tmp_path / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HAProxy:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(self.path)], stdout=log, stderr=log
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _replica_of(session_id: str) -> str:
    return session_id.rsplit("-", 1)[0]


def _max_gap(arrivals: list[float], since: float, until: float) -> float:
    times = [since] + [t for t in arrivals if since < t < until] + [until]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def _wait_both_up(base: str, timeout: float = 30.0) -> None:
    """Until the balancer's round robin has reached both replicas' /healthz."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and seen != {"r1", "r2"}:
        with suppress(OSError, ServiceError):
            seen.add(http("GET", f"{base}/healthz", timeout=5)[1]["replica"])
        time.sleep(0.2)
    assert seen == {"r1", "r2"}, f"the balancer reached only {seen}"


@pytest.mark.timeout(300)
def test_two_replicas_behind_haproxy_one_killed(tmp_path) -> None:
    """Fails if the balancer routes session paths like any other (tried: the frontend without
    its `use_backend replica_*` lines: the second GET of a session, the offer or the audio
    websocket reach the other replica, 404 'belongs to replica'), if session ids lose their
    replica prefix (tried: `new_session_id` ignoring the replica: no route, the prefix check
    fails), if a killed replica's death reaches the other's sessions (a frame gap over
    MAX_GAP_S, the audio socket closed), or if new sessions after the kill fail instead of
    going to the survivor (tried: without `retry-on`/`redispatch`, the first POST after the
    kill is sent to the dead replica: 502)."""
    flags = ["--no-compile", "--max-sessions", "3", "--max-sessions-per-client", "3"]
    replicas = {
        name: ServiceProcess(*flags, "--replica-id", name, log_path=tmp_path / f"{name}.log")
        for name in ("r1", "r2")
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = haproxy_config(
        [(name, f"127.0.0.1:{svc.port}") for name, svc in replicas.items()],
        bind=f"127.0.0.1:{port}",
        check_interval_ms=500,
    )
    victim_workers: list[int] = []
    with ExitStack() as stack:
        started = [threading.Thread(target=svc.start) for svc in replicas.values()]
        for thread in started:
            thread.start()
        for thread in started:
            thread.join()
        for svc in replicas.values():
            stack.callback(svc.stop)
        for svc in replicas.values():
            assert svc.proc is not None and svc.proc.poll() is None, svc.log_tail()
        victim_workers += replicas["r1"].worker_pids()
        stack.enter_context(HAProxy(config, tmp_path))
        _wait_both_up(base)

        async def run() -> None:
            clients = [AvatarClient(base), AvatarClient(base)]
            try:
                await scenario(clients)
            finally:
                for client in clients:
                    await client.close(delete=False)

        async def scenario(clients: list[AvatarClient]) -> None:
            for client in clients:
                await client.create()
            by_replica = {_replica_of(c.session_id or ""): c for c in clients}
            assert set(by_replica) == {"r1", "r2"}, [c.session_id for c in clients]
            for client in clients:  # twice each: round robin would send one to the other
                for _ in range(2):
                    _, body = await ahttp("GET", f"{base}/v1/sessions/{client.session_id}")
                    assert body["session_id"] == client.session_id
            for client in clients:
                await client.watch()
                await asyncio.wait_for(client.first_video.wait(), 60)
                started = await client.open_audio(SR)
                assert started["type"] == "started", started
            # a replica refuses another's session (what a balancer routing wrongly gets)
            with pytest.raises(ServiceError) as wrong:
                await ahttp(
                    "GET", f"{replicas['r2'].base}/v1/sessions/{by_replica['r1'].session_id}"
                )
            assert wrong.value.status == 404 and "belongs to replica 'r1'" in wrong.value.detail

            victim, survivor = replicas["r1"], by_replica["r2"]
            talking = asyncio.create_task(survivor.send_pcm(_tone(8.0), SR))
            await asyncio.sleep(2.0)
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()

            # New sessions go to the survivor at once, and work there.
            fresh = [AvatarClient(base), AvatarClient(base)]
            clients += fresh
            for client in fresh:
                await client.create()
                assert _replica_of(client.session_id or "") == "r2", client.session_id
            await fresh[0].watch()
            await asyncio.wait_for(fresh[0].first_video.wait(), 60)
            # The dead replica's sessions are gone: the balancer says so, the survivor is not
            # asked (it would answer 404).
            with pytest.raises(ServiceError) as gone:
                await ahttp("GET", f"{base}/v1/sessions/{by_replica['r1'].session_id}")
            assert gone.value.status == 503, (gone.value.status, gone.value.detail)

            await talking
            reply = await survivor.control("segment", reply="segment_ended", timeout=15)
            assert reply["type"] == "segment_ended", reply
            watched_until = time.monotonic()
            assert watched_until - killed > 4.0
            arrivals = [t for t, _ in survivor.received.video]
            gap = _max_gap(arrivals, killed - 1.0, watched_until)
            print(f"the survivor's longest wait for a frame around the kill: {gap:.3f} s")
            assert gap < MAX_GAP_S, f"the survivor's viewer waited {gap:.2f} s for a frame"
            assert not survivor.socket_closed.is_set(), survivor.socket_close_code
            told = survivor.received.of_type("error", "closing")
            assert not told, f"the survivor's audio socket was told {told}"
            _, body = await ahttp("GET", f"{base}/v1/sessions/{survivor.session_id}")
            assert body["session_id"] == survivor.session_id
            _, health = await ahttp("GET", f"{base}/healthz")
            assert health["replica"] == "r2" and health["sessions"] in (2, 3), health
            for client in clients:
                await client.delete()  # the dead replica's: 503, ignored

        asyncio.run(run())
        assert replicas["r1"].proc is not None and replicas["r1"].proc.wait(5) == -9
    for pid in victim_workers:  # the killed replica's engine worker, if it outlived it
        with suppress(OSError):
            if b"python" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
