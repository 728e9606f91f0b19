"""The driver: the Executor object in the service's process that fronts a group of worker ranks.

Plan → execute → collect, across processes: `submit` admits a block (bounded: ExecutorBusy past
`max_inflight`), a sender thread ships it to stage 0, and a receiver thread resolves its Future
when the last stage sends the frames back. Both strategies (TPP, DualParal) share this class;
they differ only in what their workers do (pipelines/executors/tpp.py, dualparal.py).

Watchdog: a monitor thread sends a ping through the whole pipeline every `heartbeat_s`. Pings
keep every rank's receive from idling into gloo's timeout, and their return proves every rank is
alive and moving. When a worker dies, or nothing (result or ping) has come back for `timeout_s`
while something was owed, the driver fails every pending block with a clear error, kills the
remaining workers and reports unhealthy; the next `open_session` (or `restart()`) starts a new
group, up to `max_restarts` times.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from models.errors import ConfigError, DiffstreamError, ExecutorError, SessionError
from pipelines.executors.base import Executor, ExecutorBusy, ModelInfo
from pipelines.executors.launch import WorkerGroup
from pipelines.executors.wire import TAG_DOWN, Link, LinkError, Message
from pipelines.messages import BlockRequest, BlockResult, BlockTimings, SessionSpec

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: BlockRequest
    future: Future
    sent_at: float


@dataclass
class _Generation:
    """One started worker group and the driver's threads, links and outbox that belong to it; a
    restart makes a new one, so a thread of the old group can never touch the new one's queue."""

    group: WorkerGroup
    outbox: queue.Queue
    to_first: Link
    from_last: Link
    last_heard: float
    last_ping: float = 0.0
    pings_out: int = 0


class PipelineExecutor(Executor):
    """Driver of a multi-process executor; subclasses name the worker module and the layout."""

    worker_module: ClassVar[str] = ""
    strategy: ClassVar[str] = ""
    min_devices: ClassVar[int] = 2

    def __init__(
        self,
        *,
        model: str,
        devices: list[torch.device],
        options: dict[str, Any],
        timeout_s: float = 60.0,
        startup_timeout_s: float = 600.0,
        heartbeat_s: float | None = None,
        max_inflight: int = 32,
        max_restarts: int = 3,
        threads: int | None = None,
        verbose: bool = True,
        keep_latents: int = 0,
        cpu_affinity: tuple[int, ...] | list[int] = (),
        external: tuple[int, str, int] | None = None,
    ) -> None:
        if timeout_s <= 0 or startup_timeout_s <= 0:
            raise ConfigError("timeouts must be positive")
        if max_inflight < 1:
            raise ConfigError(f"max_inflight must be at least 1, got {max_inflight}")
        self.model = model
        self.devices = list(devices)
        self.options = dict(options)
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.heartbeat_s = float(heartbeat_s or min(5.0, self.timeout_s / 4))
        self.max_inflight = int(max_inflight)
        self.max_restarts = int(max_restarts)
        self.threads = threads
        self.cpu_affinity = tuple(int(c) for c in cpu_affinity)
        self.external = external  # (workers, host, port): torchrun starts them, see torchrun.py
        self._root_store: Any = None
        self.verbose = verbose
        # Debugging tap: the clean latents of the last `keep_latents` blocks, by (session, block).
        self.keep_latents = int(keep_latents)
        self.latents: dict[tuple[str, int], Any] = {}
        if self.keep_latents:
            self.options["keep_latents"] = True
        self.restarts = 0
        self.placement: list[str] = []
        self._lock = threading.RLock()
        self._gen: _Generation | None = None
        self._closed = False
        self._failure: str | None = "not started"
        self._seq = itertools.count()
        self._start()

    # ---- layout, overridden by the strategies --------------------------------------------------
    def roles(self, info: ModelInfo, ready: list[dict[str, Any]]) -> list[str]:
        """What each worker rank does, for the placement printout (`ready`: what each worker
        reported when it had loaded its part)."""
        raise NotImplementedError

    # ---- life cycle -----------------------------------------------------------------------------
    def _start(self) -> None:
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._opening: dict[str, Future] = {}
        self._requests: dict[int, Future] = {}
        self._sessions: set[str] = set()
        self._stopping = False
        group = self._new_group()
        try:
            ready = group.wait_ready()
            ctrl = group.connect()
        except BaseException:
            group.kill()
            raise
        self.info = ModelInfo(**ready[0]["info"])
        roles = self.roles(self.info, ready)
        where = (
            (lambda r: f"{r.get('host', '?')}:{r['device']}")
            if self.external
            else (lambda r: r["device"])
        )
        self.placement = [
            f"rank {r['stage']}  {where(r):<8} pid {r['pid']:<7} {role}"
            for r, role in zip(ready, roles, strict=True)
        ]
        gen = _Generation(
            group=group,
            outbox=queue.Queue(maxsize=self.max_inflight + 64),
            to_first=Link(ctrl, 1, tag=TAG_DOWN, name="rank 0"),
            from_last=Link(ctrl, group.workers, tag=TAG_DOWN, name=f"rank {group.workers - 1}"),
            last_heard=time.monotonic(),
        )
        self._gen = gen
        self._failure = None
        for target, name in (
            (self._send_loop, "send"),
            (self._recv_loop, "recv"),
            (self._monitor_loop, "monitor"),
        ):
            threading.Thread(
                target=target,
                args=(gen,),
                name=f"diffstream-{self.strategy}-{name}-{self.restarts}",
                daemon=True,
            ).start()
        if self.verbose:
            print(
                f"diffstream {self.strategy}: model {self.info.name}, {group.workers} worker "
                f"processes (control: gloo; data: {'nccl' if self._cuda() else 'gloo'}; "
                f"timeout {self.timeout_s:g} s)\n  " + "\n  ".join(self.placement),
                file=sys.stderr,
                flush=True,
            )

    def _new_group(self) -> Any:
        if self.external is None:
            return WorkerGroup(
                executor=self.worker_module,
                devices=self.devices,
                model=self.model,
                options=self.options,
                timeout_s=self.timeout_s,
                startup_timeout_s=self.startup_timeout_s,
                threads=self.threads,
                cpu_affinity=self.cpu_affinity,
            )
        import datetime

        import torch.distributed as dist

        from pipelines.executors.torchrun import ExternalWorkers

        workers, host, port = self.external
        if self._root_store is None:  # one rendezvous for every generation: torchrun reconnects
            self._root_store = dist.TCPStore(
                host,
                port,
                None,
                True,
                timeout=datetime.timedelta(seconds=self.startup_timeout_s),
                wait_for_workers=False,
            )
        if self.verbose:
            print(
                f"diffstream {self.strategy}: waiting for {workers} torchrun workers "
                f"(python -m pipelines.executors.torchrun --connect HOST:{port})",
                file=sys.stderr,
                flush=True,
            )
        return ExternalWorkers(
            store=self._root_store,
            generation=self.restarts,
            executor=self.worker_module,
            workers=workers,
            model=self.model,
            options=self.options,
            timeout_s=self.timeout_s,
            startup_timeout_s=self.startup_timeout_s,
            host=host,
            threads=self.threads,
        )

    def _cuda(self) -> bool:
        gen = self._gen
        devices = gen.group.devices if gen is not None else [str(d) for d in self.devices]
        return any(str(d).startswith("cuda") for d in devices)

    def restart(self) -> None:
        """Tear the worker group down (if any) and start a fresh one with the same settings."""
        with self._lock:
            if self._closed:
                raise ExecutorError("the executor is shut down")
            self._teardown("restarting")
            self.restarts += 1
            self._start()

    def healthy(self) -> bool:
        return not self._closed and self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the executor is unhealthy (None while healthy)."""
        return self._failure

    def pids(self) -> list[int]:
        gen = self._gen
        return gen.group.pids if gen is not None else []

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            gen = self._gen
            if gen is not None and self._failure is None:
                self._stopping = True
                with contextlib.suppress(queue.Full):
                    gen.outbox.put(Message("stop"), timeout=1.0)
                    gen.group.join(min(10.0, self.timeout_s))
            self._teardown("the executor was shut down")

    def _teardown(self, reason: str) -> None:
        gen, self._gen = self._gen, None
        self._failure = self._failure or reason
        self._fail_pending(reason)
        if gen is not None:
            with contextlib.suppress(queue.Full):
                gen.outbox.put_nowait(None)  # wakes the sender
            gen.group.kill()
            gen.group.release()

    def _fail(self, gen: _Generation, reason: str) -> None:
        """A worker died or hung: end every affected stream now and clear the group away."""
        with self._lock:
            if self._gen is not gen or self._failure is not None:
                return
            self._failure = reason
            log.error("%s executor failed: %s", self.strategy, reason)
            if self.verbose:
                print(f"diffstream {self.strategy}: {reason}", file=sys.stderr, flush=True)
            self._teardown(reason)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            r = p.request
            _resolve(
                p.future,
                BlockResult(
                    r.session_id, r.block_index, None, submitted_at=r.submitted_at, error=reason
                ),
            )
        for fut in list(self._opening.values()) + list(self._requests.values()):
            if not fut.done():
                fut.set_exception(ExecutorError(reason))
        self._opening.clear()
        self._requests.clear()
        self._sessions.clear()

    # ---- interface --------------------------------------------------------------------------------
    def open_session(self, spec: SessionSpec) -> None:
        """Blocks until every rank holds the session (sink encoded, caches allocated)."""
        with self._lock:
            if self._closed:
                raise ExecutorError("the executor is shut down")
            if self._failure is not None:
                if self.restarts >= self.max_restarts:
                    raise ExecutorError(
                        f"the {self.strategy} executor failed ({self._failure}) and was already "
                        f"restarted {self.restarts} times; restart the service"
                    )
                log.warning("restarting the %s executor after: %s", self.strategy, self._failure)
                self._teardown(self._failure)
                self.restarts += 1
                self._start()
            if spec.session_id in self._sessions or spec.session_id in self._opening:
                raise SessionError(f"session {spec.session_id!r} is already open")
            fut: Future = Future()
            self._opening[spec.session_id] = fut
            self._post(
                Message(
                    "open",
                    {
                        "session_id": spec.session_id,
                        "seed": spec.seed,
                        "steps": spec.steps,
                        "sink_refresh": spec.sink_refresh,
                        "prompt": spec.prompt,
                        "reference": spec.reference,
                    },
                )
            )
        try:
            fut.result(timeout=self.timeout_s + self.heartbeat_s)
        except FutureTimeout:
            self._opening.pop(spec.session_id, None)
            raise ExecutorError(
                f"opening session {spec.session_id!r} took longer than {self.timeout_s:g} s"
            ) from None
        with self._lock:
            self._sessions.add(spec.session_id)

    def submit(self, request: BlockRequest) -> Future[BlockResult]:
        fut: Future[BlockResult] = Future()
        with self._lock:
            self._check_open()
            if request.session_id not in self._sessions:
                _resolve(
                    fut,
                    BlockResult(
                        request.session_id,
                        request.block_index,
                        None,
                        submitted_at=request.submitted_at,
                        error=f"session {request.session_id!r} is not open",
                    ),
                )
                return fut
            if len(self._pending) >= self.max_inflight:
                raise ExecutorBusy(f"{self.max_inflight} blocks already in flight")
            key = (request.session_id, request.block_index)
            if key in self._pending:
                raise SessionError(
                    f"block {request.block_index} of {request.session_id!r} is already queued"
                )
            self._pending[key] = _Pending(request, fut, time.monotonic())
            self._post(
                Message(
                    "block",
                    {
                        "session_id": request.session_id,
                        "block_index": request.block_index,
                        "audio": request.audio,
                        "submitted_at": request.submitted_at or time.perf_counter(),
                    },
                )
            )
        return fut

    def close_session(self, session_id: str) -> None:
        with self._lock:
            if self._closed or self._failure is not None:
                return
            self._sessions.discard(session_id)
            for key in [k for k in self._pending if k[0] == session_id]:
                p = self._pending.pop(key)
                _resolve(
                    p.future,
                    BlockResult(
                        session_id,
                        key[1],
                        None,
                        submitted_at=p.request.submitted_at,
                        error=f"session {session_id!r} was closed",
                    ),
                )
            self._post(Message("close", {"session_id": session_id}))

    def worker_stats(
        self, timeout: float | None = None, *, events: bool = True
    ) -> list[dict[str, Any]]:
        """Every rank's figures in pipeline order: sessions held, memory, traffic and (with
        `events`) its recorded stage events, a few thousand per rank."""
        fut: Future = Future()
        timeout = timeout or self.timeout_s
        # Bounded: a (re)start holds the lock while the workers load the model, maybe minutes.
        if not self._lock.acquire(timeout=timeout):
            raise ExecutorBusy("the executor is starting its workers")
        try:
            self._check_open()
            rid = next(self._seq)
            self._requests[rid] = fut
            self._post(Message("stats", {"request": rid, "ranks": [], "events": events}))
        finally:
            self._lock.release()
        try:
            return fut.result(timeout=timeout)
        except FutureTimeout:
            self._requests.pop(rid, None)  # a late answer is dropped
            raise

    def held_sessions(self, timeout: float = 2.0) -> list[int] | None:
        try:
            ranks = self.worker_stats(timeout, events=False)
        except (ExecutorError, ExecutorBusy, FutureTimeout):
            return None
        return [int(r.get("sessions", 0)) for r in ranks]

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # ---- internals ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ExecutorError("the executor is shut down")
        if self._failure is not None:
            raise ExecutorError(f"the {self.strategy} executor failed: {self._failure}")

    def _post(self, msg: Message) -> None:
        gen = self._gen
        if gen is None:
            raise ExecutorError(f"the {self.strategy} executor is not running")
        try:
            gen.outbox.put_nowait(msg)
        except queue.Full:
            raise ExecutorBusy("the executor's outbox is full") from None

    def _send_loop(self, gen: _Generation) -> None:
        while True:
            msg = gen.outbox.get()
            if msg is None or self._gen is not gen:
                return
            try:
                gen.to_first.send(msg)
            except LinkError as exc:
                self._fail(gen, self._death_or(gen.group, str(exc)))
                return
            if msg.kind == "stop":
                return

    def _recv_loop(self, gen: _Generation) -> None:
        while self._gen is gen:
            try:
                msg = gen.from_last.recv()
            except LinkError as exc:
                if not self._stopping:
                    self._fail(gen, self._death_or(gen.group, str(exc)))
                return
            if self._gen is not gen:
                return  # a late message of a generation already given up
            gen.last_heard = time.monotonic()
            if msg.kind == "stop":
                return
            if msg.kind == "pong":
                gen.pings_out = max(0, gen.pings_out - 1)
                continue
            try:
                self._dispatch(msg)
            except Exception:  # a malformed reply must not stop result delivery
                log.exception("driver: cannot handle %s", msg.kind)

    def _dispatch(self, msg: Message) -> None:
        m = msg.meta
        with self._lock:
            if msg.kind == "result":
                if m.get("dropped") or m.get("error_kind") == "session":
                    self._end_session(m["session_id"], m["block_index"], m.get("error", ""))
                p = self._pending.pop((m["session_id"], m["block_index"]), None)
                if p is None:
                    return  # its session was closed meanwhile
                timings = BlockTimings(**m.get("timings", {}))
                if m.get("latent") is not None and self.keep_latents:
                    self.latents[(m["session_id"], m["block_index"])] = m["latent"]
                    while len(self.latents) > self.keep_latents:
                        self.latents.pop(next(iter(self.latents)))
                if m.get("error_kind") == "session":
                    p.future.set_exception(SessionError(m["error"]))
                    return
                _resolve(
                    p.future,
                    BlockResult(
                        m["session_id"],
                        m["block_index"],
                        m.get("frames"),
                        timings=timings,
                        submitted_at=p.request.submitted_at,
                        error=m.get("error"),
                    ),
                )
            elif msg.kind == "opened":
                fut = self._opening.pop(m["session_id"], None)
                if fut is None or fut.done():
                    return
                if m.get("error"):
                    fut.set_exception(_user_error(m))
                    # Ranks before the one that failed hold the session: let them drop it.
                    with contextlib.suppress(ExecutorError):
                        self._post(Message("close", {"session_id": m["session_id"]}))
                else:
                    if msg.tensors:  # the reference, encoded on the decode rank: to the others
                        try:
                            self._post(
                                Message("reference", {"session_id": m["session_id"]}, msg.tensors)
                            )
                        except (ExecutorError, ExecutorBusy) as exc:
                            fut.set_exception(ExecutorError(f"cannot pass the reference on: {exc}"))
                            return
                    fut.set_result(None)
            elif msg.kind == "stats":
                fut = self._requests.pop(m["request"], None)
                if fut is not None and not fut.done():
                    fut.set_result(m["ranks"])

    def _end_session(self, session_id: str, failed_block: int, error: str) -> None:
        """A worker dropped the session: its other pending blocks will never come back."""
        self._sessions.discard(session_id)
        for key in [k for k in self._pending if k[0] == session_id and k[1] != failed_block]:
            p = self._pending.pop(key)
            _resolve(
                p.future,
                BlockResult(
                    session_id,
                    key[1],
                    None,
                    submitted_at=p.request.submitted_at,
                    error=f"session ended by an earlier block's error: {error}",
                ),
            )

    def _monitor_loop(self, gen: _Generation) -> None:
        group = gen.group
        while self._gen is gen and not self._closed:
            time.sleep(0.05)
            if self._stopping:
                continue
            if group.dead():
                self._fail(gen, group.describe_death())
                return
            now = time.monotonic()
            if now - gen.last_ping >= self.heartbeat_s:
                gen.last_ping = now
                with contextlib.suppress(queue.Full):
                    gen.outbox.put_nowait(Message("ping", {"sent": time.perf_counter()}))
                    gen.pings_out += 1
            owed = gen.pings_out > 0 or self._pending or self._opening or self._requests
            if owed and now - gen.last_heard > self.timeout_s:
                self._fail(
                    gen,
                    f"no answer from the worker ranks for {self.timeout_s:g} s: a worker is hung "
                    "(its neighbours' receives time out, and it is killed now)",
                )
                return

    def _death_or(self, group: WorkerGroup, text: str) -> str:
        """Prefer naming the dead worker over the symptom a link shows."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if group.dead():
                return group.describe_death()
            time.sleep(0.02)
        return text


def _resolve(fut: Future, result: BlockResult) -> None:
    if not fut.done():
        fut.set_result(result)


def _user_error(meta: dict[str, Any]) -> DiffstreamError:
    """Rebuild the project's exception a worker reported (by name, never by unpickling code)."""
    import models.errors as errors

    cls = getattr(errors, str(meta.get("error_type", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, DiffstreamError)):
        cls = ExecutorError
    return cls(meta["error"])
