"""Workers started by torchrun, for executors that span several machines.

torch.multiprocessing starts workers on the service's own machine only. For several nodes the
service hosts the rendezvous (a TCPStore on a fixed, reachable address) and torchrun starts the
workers on every node; each worker takes its stage from torchrun's RANK and its GPU from
LOCAL_RANK, reads the executor, model and options the service published, and from then on is
exactly a spawned worker (launch.worker_main):

    # the service's machine (node 0), 5 workers wanted
    diffstream serve --executor tpp --devices torchrun:5@0.0.0.0:29400
    # node 0 and node 1 (static rendezvous of torchrun itself; ranks 0-2 here, 3-4 there)
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 3 --master-addr NODE0 --master-port 29500 \\
        --max-restarts 3 -m pipelines.executors.torchrun --connect NODE0:29400
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2 ... (same)

(torchrun's --nproc-per-node must then be equal on all nodes for RANK to be contiguous; use
--nnodes with equal counts, or one torchrun per node with --node-rank and equal counts.)

Failures: the service cannot kill remote processes. When it gives a generation up it sets that
generation's `abort` key; every worker polls its store and exits, and torchrun (--max-restarts)
starts fresh workers, which wait for the service to publish the next generation and join it.
Workers also exit when the store stops answering (the service is gone).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import threading
import time
from typing import Any

import torch

from models.errors import ConfigError, ExecutorError
from pipelines.executors.launch import (
    EXIT_ERROR,
    EXIT_PEER_LOST,
    WorkerSpec,
    control_group,
    worker_main,
)

PREFIX = "diffstream/torchrun/"


def parse_external(devices: str) -> tuple[int, str, int] | None:
    """'torchrun:N@HOST:PORT' → (N, HOST, PORT); None for any other device string."""
    text = (devices or "").strip()
    if not text.startswith("torchrun:"):
        return None
    try:
        count, address = text[len("torchrun:") :].split("@", 1)
        host, port = address.rsplit(":", 1)
        n, p = int(count), int(port)
    except ValueError:
        raise ConfigError(
            f"--devices {devices!r}: expected torchrun:N@HOST:PORT, e.g. torchrun:5@0.0.0.0:29400"
        ) from None
    if n < 1 or not 0 < p < 65536:
        raise ConfigError(f"--devices {devices!r}: N must be positive and PORT a port number")
    return n, host, p


class ExternalWorkers:
    """launch.WorkerGroup's interface for one generation of workers that torchrun started."""

    def __init__(
        self,
        *,
        store: Any,
        generation: int,
        executor: str,
        workers: int,
        model: str,
        options: dict[str, Any],
        timeout_s: float,
        startup_timeout_s: float,
        host: str,
        threads: int | None = None,
    ) -> None:
        import torch.distributed as dist

        self.executor = executor
        self.workers = workers
        self.devices = [f"torchrun rank {s}" for s in range(workers)]
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.host = host
        self.ctrl: Any = None
        self.ready: list[dict[str, Any]] = []
        self.root = store
        self.prefix = f"{PREFIX}g{generation}"
        self.store = dist.PrefixStore(self.prefix, store)
        spec = {
            "executor": executor,
            "workers": workers,
            "model": model,
            "options": options,
            "timeout_s": timeout_s,
            "startup_timeout_s": startup_timeout_s,
            "threads": threads or 1,
        }
        self.store.set("spec", json.dumps(spec))
        store.set(f"{PREFIX}generation", str(generation))

    @property
    def pids(self) -> list[int]:
        return []  # remote processes: not ours to watch or kill

    def dead(self) -> list[tuple[int, int | None]]:
        """Workers that reported a broken link before exiting (others show as silence)."""
        out = []
        for s in range(self.workers):
            with contextlib.suppress(Exception):
                if self.store.check([f"exit/{s}"]):
                    out.append((s, EXIT_PEER_LOST))
        return out

    def exit_reason(self, stage: int) -> str:
        with contextlib.suppress(Exception):
            return self.store.get(f"exit/{stage}").decode()
        return "no reason recorded"

    def describe_death(self) -> str:
        dead = self.dead()
        if not dead:
            return ""
        stage = dead[0][0]
        return f"torchrun worker rank {stage} gave up on a neighbour: {self.exit_reason(stage)}"

    def wait_ready(self) -> list[dict[str, Any]]:
        keys = [f"ready/{s}" for s in range(self.workers)]
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                missing = [k for k in keys if not self.store.check([k])]
                raise ExecutorError(
                    f"start-up timed out after {self.startup_timeout_s:.0f} s: {len(missing)} of "
                    f"{self.workers} torchrun workers never reported ready (is torchrun running "
                    "with --connect pointing at this service?)"
                )
            time.sleep(0.05)
        self.ready = [json.loads(self.store.get(k).decode()) for k in keys]
        self.devices = [r["device"] for r in self.ready]
        return self.ready

    def connect(self) -> Any:
        result: dict[str, Any] = {}

        def build() -> None:
            try:
                result["pg"] = control_group(
                    self.store, 0, self.workers + 1, self.timeout_s, self.host
                )
            except Exception as exc:
                result["error"] = exc

        t = threading.Thread(target=build, name="diffstream-rendezvous", daemon=True)
        t.start()
        t.join(self.startup_timeout_s)
        if t.is_alive() or "error" in result:
            raise ExecutorError(f"start-up failed joining the control group: {result.get('error')}")
        self.ctrl = result["pg"]
        return self.ctrl

    def join(self, timeout: float) -> bool:
        keys = [f"stopped/{s}" for s in range(self.workers)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.store.check(keys):
                    return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """Tell every worker of this generation to exit (they poll for it)."""
        with contextlib.suppress(Exception):
            self.store.set("abort", "1")

    def release(self) -> None:
        self.ctrl = None


# ---------------------------------------------------------------------------------------------
# Worker side: python -m pipelines.executors.torchrun --connect HOST:PORT (under torchrun)
# ---------------------------------------------------------------------------------------------


def _current_generation(store: Any, timeout: float) -> int:
    """The newest generation that has not been given up (wait for the service to publish one)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if store.check([f"{PREFIX}generation"]):
                g = int(store.get(f"{PREFIX}generation").decode())
                if not store.check([f"{PREFIX}g{g}/abort"]):
                    return g
        if time.monotonic() > deadline:
            raise ExecutorError("no executor generation was published by the service in time")
        time.sleep(0.2)


def _watch_abort(store: Any) -> None:
    while True:
        time.sleep(0.5)
        with contextlib.suppress(Exception):
            if store.check(["abort"]):
                os._exit(EXIT_PEER_LOST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.executors.torchrun",
        description="A diffstream executor worker under torchrun (see the module docstring).",
    )
    parser.add_argument("--connect", required=True, help="HOST:PORT of the service's rendezvous")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    import torch.distributed as dist

    host, port = args.connect.rsplit(":", 1)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    store = dist.TCPStore(
        host, int(port), None, False, timeout=datetime.timedelta(seconds=args.startup_timeout)
    )
    g = _current_generation(store, args.startup_timeout)
    gstore = dist.PrefixStore(f"{PREFIX}g{g}", store)
    published = json.loads(gstore.get("spec").decode())
    if published["workers"] != world:
        raise ConfigError(
            f"the service expects {published['workers']} workers, torchrun started {world}"
        )
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    devices = tuple(device if s == rank else "cpu" for s in range(world))
    spec = WorkerSpec(
        executor=published["executor"],
        stage=rank,
        workers=world,
        devices=devices,
        model=published["model"],
        options=published["options"],
        store_host=host,
        store_port=int(port),
        timeout_s=float(published["timeout_s"]),
        startup_timeout_s=float(published["startup_timeout_s"]),
        threads=int(published["threads"]),
        parent_pid=os.getppid(),
        serial_load=False,
        store_prefix=f"{PREFIX}g{g}",
        started_by_driver=False,
    )
    threading.Thread(target=_watch_abort, args=(gstore,), daemon=True).start()
    worker_main(spec)  # exits the process
    return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
