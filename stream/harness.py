"""Run the real service in a child process on localhost, for the tests and the benchmark.

A separate process keeps the service's event loop, engine thread and encoders off the client's
GIL (on a 2-core machine that matters), and lets callers read its thread count and memory from
/proc exactly as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from stream.client import ServiceError, http


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """`diffstream serve` with the given flags; a context manager that waits until healthy."""

    def __init__(
        self,
        *flags: str,
        model: str = "tiny",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "stream.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model",
            model,
            *flags,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args, cwd=root, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _ = http("GET", f"{self.base}/healthz", timeout=2)
                if status == 200:
                    return
            except (OSError, ServiceError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"service not healthy after {self.startup_timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return "(no log kept)"

    # What an operator can see from outside -----------------------------------------------------

    def proc_status(self, pid: int | None = None) -> dict[str, int]:
        """Threads and resident memory (kB) from /proc/<pid>/status: the service's process, or
        another one such as the engine's worker (`worker_pids`)."""
        assert self.proc is not None
        out: dict[str, int] = {}
        for line in Path(f"/proc/{pid or self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS"):
                out[key] = int(value.split()[0])
        return out

    def health(self) -> dict[str, Any]:
        return http("GET", f"{self.base}/healthz")[1]

    def health_status(self, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
        """(status, body) of /healthz (or /livez), whether 200 or 503."""
        try:
            with urllib.request.urlopen(f"{self.base}{path}", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def worker_pids(self) -> list[int]:
        """The engine's worker processes, as /healthz lists them (none while it is down)."""
        return list(self.health_status()[1].get("workers", []))

    def engine_sessions(self) -> list[int] | None:
        """Sessions each engine rank says it holds (diffstream_engine_sessions), rank by rank;
        None when the engine did not answer the scrape."""
        samples = self.metrics()
        ranks = sorted(
            (int(k.split('rank="')[1].split('"')[0]), int(v))
            for k, v in samples.items()
            if k.startswith("diffstream_engine_sessions{")
        )
        return [count for _, count in ranks] or None

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {name{labels}: value}."""
        _, text = http("GET", f"{self.base}/metrics")
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples
