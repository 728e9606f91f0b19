"""Starting, connecting and stopping the worker processes of a multi-device executor.

One executor = one *driver* (the object the service talks to, in the service's process) and W
worker processes, one per device, started here with torch.multiprocessing (spawn). Rendezvous
is a TCPStore the driver hosts on 127.0.0.1 and a free port chosen by the OS. Two kinds of
process groups are built on it:

* control: gloo, driver + workers (driver = rank 0, worker stage s = rank s + 1). Small pickled
  frames: commands, session options, timings, results. Works without GPUs and across nodes.
* data: workers only, NCCL when the workers sit on GPUs, gloo on CPU; two groups ("down" along
  the pipeline, "back" against it) so that two directions between the same pair never share one
  NCCL communicator (NCCL runs one stream per communicator and would deadlock).

Start-up: each worker loads its part of the model, writes `ready/<stage>` into the store (with
its device, pid and what the driver must know), then joins the groups. The driver waits for
every ready key while watching the processes, so a worker that fails to load is reported at once.

Faults: every group has `timeout_s`; gloo fails a recv or send that waits longer and closes the
pair, NCCL's watchdog aborts. A worker that sees a broken link exits with EXIT_PEER_LOST, which
takes its neighbours down in turn, so one dead or hung worker ends the whole group within the
timeout; the driver's own watchdog (pipelines/executors/remote.py) fails the streams and kills
what is left. Every worker also exits on its own when the driver's process goes away, so no
orphan outlives the service even after `kill -9` of the service.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from models.errors import ConfigError, DiffstreamError, ExecutorError
from pipelines.executors.wire import TAG_BACK, TAG_DOWN, Link, LinkError, Message

log = logging.getLogger(__name__)

EXIT_ERROR = 1  # an unexpected error in the worker itself
EXIT_PEER_LOST = 75  # a link broke: a neighbour died or hung (the culprit is someone else)
EXIT_ORPHAN = 76  # the driver's process went away

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a spawned worker needs; small and picklable (it crosses `spawn`)."""

    executor: str  # module under pipelines.executors with run_worker(ctx) and load(ctx)
    stage: int
    workers: int
    devices: tuple[str, ...]
    model: str
    options: dict[str, Any]
    store_host: str
    store_port: int
    timeout_s: float
    startup_timeout_s: float
    threads: int
    parent_pid: int
    serial_load: bool = False  # load one worker after another (bounds host memory for big models)
    cpu_affinity: tuple[int, ...] = ()  # CPU cores the worker may run on (empty: any)
    store_prefix: str = ""  # a generation's keys in a long-lived store (torchrun mode)
    started_by_driver: bool = True  # False under torchrun: watch the store, not the parent

    @property
    def device(self) -> torch.device:
        return torch.device(self.devices[self.stage])


def gloo_device(host: str) -> Any:
    """The gloo transport device: GLOO_SOCKET_IFNAME's interface when set (several nodes),
    loopback when everything runs on this machine, else the host name's address."""
    import torch.distributed as dist

    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    if ifname and host not in (LOOPBACK, "localhost"):
        return dist.ProcessGroupGloo.create_device(interface=ifname)
    if host in (LOOPBACK, "localhost"):
        return dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)
    return dist.ProcessGroupGloo.create_default_device()


def control_group(store: Any, rank: int, size: int, timeout_s: float, host: str) -> Any:
    """A standalone gloo group (no torch.distributed global state), so the driver can build a
    fresh one after a failure inside the same long-running service process."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [gloo_device(host)]
    return dist.ProcessGroupGloo(dist.PrefixStore("ctrl", store), rank, size, opts)


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


class WorkerGroup:
    """The processes of one executor generation, its store and the driver's control group."""

    def __init__(
        self,
        *,
        executor: str,
        devices: list[torch.device],
        model: str,
        options: dict[str, Any],
        timeout_s: float,
        startup_timeout_s: float,
        threads: int | None = None,
        cpu_affinity: tuple[int, ...] = (),
    ) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        self.executor = executor
        self.devices = [str(d) for d in devices]
        self.workers = len(devices)
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.ctrl: Any = None
        self.ready: list[dict[str, Any]] = []
        cuda = any(d.type == "cuda" for d in devices)
        if threads is None:
            threads = 1 if cuda else max(1, (os.cpu_count() or 1) // self.workers)
        # Port 0: the OS picks a free port; the workers learn it from their spec.
        self.store = dist.TCPStore(
            LOOPBACK,
            0,
            None,
            True,
            timeout=datetime.timedelta(seconds=startup_timeout_s),
            wait_for_workers=False,
        )
        ctx = mp.get_context("spawn")
        self.processes: list[Any] = []
        for stage in range(self.workers):
            spec = WorkerSpec(
                executor=executor,
                stage=stage,
                workers=self.workers,
                devices=tuple(self.devices),
                model=model,
                options=dict(options),
                store_host=LOOPBACK,
                store_port=self.store.port,
                timeout_s=timeout_s,
                startup_timeout_s=startup_timeout_s,
                threads=threads,
                parent_pid=os.getpid(),
                serial_load=cuda,
                cpu_affinity=tuple(cpu_affinity),
            )
            p = ctx.Process(
                target=worker_main, args=(spec,), name=f"diffstream-{executor}-{stage}", daemon=True
            )
            p.start()
            self.processes.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def dead(self) -> list[tuple[int, int | None]]:
        """(stage, exit code) of every worker that has exited."""
        out = []
        for s, p in enumerate(self.processes):
            try:
                if not p.is_alive():
                    out.append((s, p.exitcode))
            except ValueError:  # closed by kill(): reaped, gone
                out.append((s, None))
        return out

    def describe_death(self) -> str:
        """Name the worker most likely at fault: a signal or an error before a lost peer."""
        dead = self.dead()
        if not dead:
            return ""

        def rank(item: tuple[int, int | None]) -> int:
            code = item[1]
            return 0 if code is not None and code < 0 else 2 if code == EXIT_PEER_LOST else 1

        stage, code = sorted(dead, key=rank)[0]
        who = f"worker rank {stage} ({self.devices[stage]})"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"{who} was killed by {signal.Signals(-code).name}"
        if code == EXIT_PEER_LOST:
            return f"{who} gave up on a neighbour that died or hung: {self.exit_reason(stage)}"
        if code == EXIT_ERROR:
            return f"{who} failed: {self.exit_reason(stage)}"
        what = {EXIT_ORPHAN: "lost the driver"}.get(code or 0, f"exited with code {code}")
        return f"{who} {what}"

    def exit_reason(self, stage: int) -> str:
        """The last words a worker left in the store before exiting (which link broke)."""
        key = f"exit/{stage}"
        with contextlib.suppress(Exception):
            if self.store is not None and self.store.check([key]):
                return self.store.get(key).decode()
        return "no reason recorded"

    def _startup_error(self) -> DiffstreamError:
        """The user's own error (bad option, missing weights) as its own type when a worker
        reported one; otherwise an ExecutorError naming the worker."""
        import models.errors as errors

        for stage, code in self.dead():
            if code == EXIT_ERROR:
                name, _, text = self.exit_reason(stage).partition(": ")
                cls = getattr(errors, name, None)
                if isinstance(cls, type) and issubclass(cls, DiffstreamError) and text:
                    return cls(text)
        return ExecutorError(f"start-up failed: {self.describe_death()}")

    def wait_ready(self) -> list[dict[str, Any]]:
        """Wait for every worker's ready key, failing fast when one dies first."""
        keys = [f"ready/{s}" for s in range(self.workers)]
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.store.check(keys):
            if self.dead():
                raise self._startup_error()
            if time.monotonic() > deadline:
                raise ExecutorError(
                    f"start-up timed out after {self.startup_timeout_s:.0f} s waiting for "
                    f"{self.workers} workers to load the model (raise --startup-timeout)"
                )
            time.sleep(0.05)
        self.ready = [json.loads(self.store.get(k).decode()) for k in keys]
        return self.ready

    def connect(self) -> Any:
        """Join the control group as rank 0 (the workers are waiting in it)."""
        result: dict[str, Any] = {}

        def build() -> None:
            try:
                result["pg"] = control_group(
                    self.store, 0, self.workers + 1, self.timeout_s, LOOPBACK
                )
            except Exception as exc:  # reported below
                result["error"] = exc

        t = threading.Thread(target=build, name="diffstream-rendezvous", daemon=True)
        t.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while t.is_alive():
            t.join(0.05)
            if self.dead():
                raise ExecutorError(f"start-up failed: {self.describe_death()}")
            if time.monotonic() > deadline:
                raise ExecutorError("start-up timed out joining the control group")
        if "error" in result:
            raise ExecutorError(f"start-up failed joining the control group: {result['error']}")
        self.ctrl = result["pg"]
        return self.ctrl

    def join(self, timeout: float) -> bool:
        """Wait for every process to exit; True when all did."""
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        return all(not p.is_alive() for p in self.processes)

    def kill(self) -> None:
        """SIGTERM, a short grace, then SIGKILL; reaps every child (no zombies)."""
        for p in self.processes:
            if p.is_alive():
                with contextlib.suppress(OSError):
                    p.terminate()
        if not self.join(2.0):
            for p in self.processes:
                if p.is_alive():
                    with contextlib.suppress(OSError):
                        p.kill()
            self.join(5.0)
        for p in self.processes:
            with contextlib.suppress(ValueError, OSError):
                p.close()

    def release(self) -> None:
        """Drop the control group and the store (after the processes are gone)."""
        self.ctrl = None
        self.store = None


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


@dataclass
class StageEvent:
    """One unit of work a rank did, for occupancy checks: what, and when (perf_counter, which is
    the system-wide monotonic clock on Linux, so stamps of all ranks on a node compare)."""

    what: str
    session_id: str
    block_index: int
    start: float
    end: float


@dataclass
class WorkerContext:
    """What a role's code sees: its place in the group, its device and its links."""

    spec: WorkerSpec
    device: torch.device
    dtype: torch.dtype
    ctrl: Any = None
    down: Any = None
    back: Any = None
    events: deque = field(default_factory=lambda: deque(maxlen=4096))
    inbox: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=4096))
    model_info: dict[str, Any] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)
    idle_seconds: float = 0.0  # the rank's loop waiting for its next message (next_message)

    @property
    def stage(self) -> int:
        return self.spec.stage

    @property
    def workers(self) -> int:
        return self.spec.workers

    @property
    def last(self) -> bool:
        return self.spec.stage == self.spec.workers - 1

    def _keep(self, link: Link) -> Link:
        self.links.append(link)
        return link

    def link_in(self) -> Link:
        """From the previous stage (the driver for stage 0)."""
        s = self.stage
        if s == 0:
            return self._keep(
                Link(self.ctrl, 0, tag=TAG_DOWN, device=self.device, name="the driver")
            )
        return self._keep(
            Link(
                self.ctrl,
                s,
                tag=TAG_DOWN,
                data=self.down,
                data_peer=s - 1,
                device=self.device,
                name=f"rank {s - 1}",
            )
        )

    def link_out(self) -> Link:
        """To the next stage (the driver for the last stage)."""
        s = self.stage
        if self.last:
            return self._keep(
                Link(self.ctrl, 0, tag=TAG_DOWN, device=self.device, name="the driver")
            )
        return self._keep(
            Link(
                self.ctrl,
                s + 2,
                tag=TAG_DOWN,
                data=self.down,
                data_peer=s + 1,
                device=self.device,
                name=f"rank {s + 1}",
            )
        )

    def link_back(self, stage: int, *, max_pending: int | None = 2) -> Link:
        """Against the pipeline, to or from worker `stage` (a separate channel and group).
        max_pending=None: posted sends are not bounded (see Link), for a peer that receives
        only when it needs the message."""
        return self._keep(
            Link(
                self.ctrl,
                stage + 1,
                tag=TAG_BACK,
                data=self.back,
                data_peer=stage,
                device=self.device,
                name=f"rank {stage} (back channel)",
                max_pending=max_pending,
            )
        )

    def flush_links(self) -> None:
        """Wait for every send posted without waiting on a bounded link (LinkError if one
        failed); a rank does this before it stops. Unbounded links (a peer that receives only
        when it needs the message) are not waited for: that receive may never come."""
        for link in self.links:
            if link.max_pending is not None:
                link.flush()

    def listen(self, link: Link, source: str, inbox: queue.Queue | None = None) -> threading.Thread:
        """Receive from `link` on a thread, so a recv is always posted while the rank computes
        (gloo's send waits for it) and a broken link is noticed even when idle. The messages go
        to `inbox` (default: the rank's, read by `next_message`) as (source, message), a
        LinkError as (source, error), and the thread ends after a `stop`."""
        inbox = self.inbox if inbox is None else inbox

        def loop() -> None:
            if self.device.type == "cuda":  # the CUDA current device is per thread
                torch.cuda.set_device(self.device)
            while True:
                try:
                    msg = link.recv()
                except LinkError as exc:
                    inbox.put((source, exc))
                    return
                inbox.put((source, msg))
                if msg.kind == "stop":
                    return

        t = threading.Thread(target=loop, name=f"diffstream-recv-{source}", daemon=True)
        t.start()
        return t

    def next_message(self, timeout: float | None = None) -> tuple[str, Message] | None:
        """The next received (source, message); LinkError when a receiver saw its link break.
        The time spent waiting here is the rank's idle time (`idle_seconds` in stats)."""
        t0 = time.perf_counter()
        try:
            source, item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            self.idle_seconds += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        return source, item

    def record(self, what: str, session_id: str, block_index: int, start: float) -> None:
        self.events.append(StageEvent(what, session_id, block_index, start, time.perf_counter()))

    def stats(self, events: bool = True) -> dict[str, Any]:
        """This rank's occupancy record (`events`: its stage events too) and memory, for
        Message("stats")."""
        mem = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _rss()
        sent = [lk.stats for lk in self.links]
        return {
            "stage": self.stage,
            "device": str(self.device),
            "pid": os.getpid(),
            "events": [e.__dict__ for e in self.events] if events else [],
            "peak_memory_bytes": mem,
            "messages_sent": sum(st.messages for st in sent),
            "messages_received": sum(st.received for st in sent),
            "tensor_bytes_sent": sum(st.tensor_bytes for st in sent),
            "send_seconds": sum(st.send_seconds for st in sent),
            "link_cpu_seconds": sum(st.cpu_seconds for st in sent),
            "send_cpu_seconds": sum(st.send_cpu_seconds for st in sent),
            "sends_posted": sum(st.posted for st in sent),
            "post_seconds": sum(st.post_seconds for st in sent),
            "pending_wait_seconds": sum(st.pending_wait_seconds for st in sent),
            # Receives happen on listener threads, which keep a recv posted while the rank
            # computes: their wait is the gap between arrivals, not the rank's own idle time
            # (that is idle_seconds: the rank's loop waiting for its next message).
            "recv_waits": sum(st.recv_waits for st in sent),
            "recv_wait_seconds": sum(st.recv_wait_seconds for st in sent),
            "recv_seconds": sum(st.recv_seconds for st in sent),
            "idle_seconds": self.idle_seconds,
            "links": [
                dict(
                    asdict(lk.stats),
                    name=lk.name,
                    tag=lk.tag,
                    max_pending=lk.max_pending,
                    pending=lk.pending,
                )
                for lk in self.links
            ],
        }


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


_STORE: list[Any] = []  # this worker's store client, for its last words (see worker_main)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the driver's process is gone (re-parented), whatever state this rank is in."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(EXIT_ORPHAN)
        time.sleep(0.5)


def _watch_store() -> None:
    """torchrun mode: exit when the driver's store stops answering (the service is gone)."""
    misses = 0
    while True:
        time.sleep(2.0)
        if not _STORE:
            continue
        try:
            _STORE[0].check(["ready/0"])
            misses = 0
        except Exception:
            misses += 1
            if misses >= 3:
                os._exit(EXIT_ORPHAN)


def _last_words(stage: int, text: str) -> None:
    """Leave the reason for exiting in the store, where the driver reads it."""
    if _STORE:
        with contextlib.suppress(Exception):
            _STORE[0].set(f"exit/{stage}", text[:500])


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (spawned by the driver, or started by torchrun)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    watch = _watch_parent if spec.started_by_driver else _watch_store
    args = (spec.parent_pid,) if spec.started_by_driver else ()
    threading.Thread(target=watch, args=args, daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format=f"[rank {spec.stage}] %(message)s")
    code = EXIT_ERROR
    try:
        code = _run_worker(spec)
    except LinkError as exc:
        print(f"diffstream worker rank {spec.stage}: {exc}", file=sys.stderr, flush=True)
        _last_words(spec.stage, str(exc))
        code = EXIT_PEER_LOST
    except DiffstreamError as exc:  # a bad model or option: one line, not a traceback
        print(f"diffstream worker rank {spec.stage}: {exc}", file=sys.stderr, flush=True)
        _last_words(spec.stage, f"{type(exc).__name__}: {exc}")
        code = EXIT_ERROR
    except BaseException as exc:
        print(f"diffstream worker rank {spec.stage} failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        _last_words(spec.stage, f"{type(exc).__name__}: {exc}")
        code = EXIT_ERROR
    finally:
        if code == 0 and _STORE:  # a clean stop; torchrun-mode drivers wait for it
            with contextlib.suppress(Exception):
                _STORE[0].set(f"stopped/{spec.stage}", "1")
        sys.stdout.flush()
        sys.stderr.flush()
        # No graceful teardown of possibly broken groups: it can block on dead peers.
        os._exit(code)


def _run_worker(spec: WorkerSpec) -> int:
    import torch.distributed as dist

    if spec.cpu_affinity and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cpu_affinity)
    torch.set_num_threads(max(1, spec.threads))
    device = spec.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, spec.options.get("dtype") or "", dtype)
    role = importlib.import_module(f"pipelines.executors.{spec.executor}")
    store = dist.TCPStore(
        spec.store_host,
        spec.store_port,
        None,
        False,
        timeout=datetime.timedelta(seconds=spec.startup_timeout_s),
    )
    if spec.store_prefix:
        store = dist.PrefixStore(spec.store_prefix, store)
    _STORE.append(store)
    ctx = WorkerContext(spec=spec, device=device, dtype=dtype)

    if spec.serial_load and spec.stage > 0:
        store.wait([f"loaded/{spec.stage - 1}"])
    state = role.load(ctx)
    store.set(f"loaded/{spec.stage}", "1")
    info = {
        "stage": spec.stage,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": str(device),
        **ctx.model_info,
    }
    store.set(f"ready/{spec.stage}", json.dumps(info))

    timeout = datetime.timedelta(seconds=spec.timeout_s)
    ctx.ctrl = control_group(
        store, spec.stage + 1, spec.workers + 1, spec.timeout_s, spec.store_host
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and spec.store_host == LOOPBACK:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("data", store),
        rank=spec.stage,
        world_size=spec.workers,
        timeout=timeout,
    )
    ctx.down = dist.group.WORLD
    ctx.back = dist.new_group(backend=backend, timeout=timeout)
    code = int(role.run_worker(ctx, state) or 0)
    ctx.flush_links()  # no posted send is left behind when the rank stops
    return code


def _loopback_interface() -> str:
    """Name of the loopback interface (gloo binds the data group to it on one machine)."""
    with contextlib.suppress(OSError):
        for name in os.listdir("/sys/class/net"):
            with open(f"/sys/class/net/{name}/type") as f:
                if f.read().strip() == "772":  # ARPHRD_LOOPBACK
                    return name
    return "lo"


def check_devices(devices: list[torch.device], minimum: int, what: str) -> None:
    if len(devices) < minimum:
        raise ConfigError(
            f"{what} needs at least {minimum} devices, got {len(devices)} "
            f"(e.g. --devices cpu:{minimum} or --devices "
            + ",".join(f"cuda:{i}" for i in range(minimum))
            + ")"
        )
