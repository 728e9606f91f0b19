"""Messages between the driver and the worker ranks, and the point-to-point links that carry them.

A `Message` is a kind, a small picklable `meta` dict (ids, indices, timings, numpy arrays on
driver links) and named tensors. A `Link` is one direction of one connection:

* control travels on a gloo process group (CPU, works on every machine and across nodes): an
  int64 length, then the pickled (kind, meta, tensor specs);
* tensors travel on a data process group (NCCL between GPUs, gloo on CPU), so a latent never
  leaves its device; links to and from the driver have no data group and pickle tensors instead.

gloo's send waits until the receiver has posted its recv, and every recv waits at most the
group's timeout, after which the pair is closed for good. So every failure here is final for the
group: it is raised as `LinkError`, and the worker that sees it exits (see launch.py).

Overlapped sends: the hot path (a block's latent or hidden states on to the next rank, the
DualParal ring) posts with `send(msg, wait=False)`, so the transfer runs on the transport while
the rank computes its next block. Order is kept: gloo matches the sends of one pair and tag in
the order they were posted, and the link's lock keeps a message's control frame and tensors
together. At most `max_pending` posted sends are outstanding on a link (gloo reports a send as
completed only once it is waited for, so the oldest is waited for before a new one is posted:
memory stays bounded); `flush()` waits for every one (the workers flush before they stop), and a
blocking send waits for them as well. A failed send surfaces as `LinkError` wherever it is
waited for.
"""

from __future__ import annotations

import pickle
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from models.errors import ExecutorError

# Tags keep the two channels of one pair apart on gloo (NCCL ignores tags; there the channels
# use separate groups, see launch.WorkerContext).
TAG_DOWN = 0  # along the pipeline: driver → stage 0 → … → last stage → driver
TAG_BACK = 1  # against it: the DualParal ring's return, TPP's sink refresh


class LinkError(ExecutorError):
    """A send or recv failed or timed out; the process group is broken and must be rebuilt."""


@dataclass
class Message:
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LinkStats:
    """Bytes and seconds spent in sends and receives; the planner's communication model is
    checked on it, and the overlap of sends with compute shows in it."""

    messages: int = 0  # sent
    received: int = 0
    tensor_bytes: int = 0
    control_bytes: int = 0
    send_seconds: float = 0.0  # wall time in send (blocking: waiting for the peer included)
    cpu_seconds: float = 0.0  # CPU time of this process's thread in send and recv
    send_cpu_seconds: float = 0.0  # the part of cpu_seconds spent in send (pack, pickle, post)
    posted: int = 0  # sends posted without waiting for the peer (wait=False)
    post_seconds: float = 0.0  # the part of send_seconds in those (packing, posting, the bound)
    pending_max: int = 0  # most posted sends outstanding at once (bounded by max_pending)
    pending_wait_seconds: float = 0.0  # wall time waiting for earlier posted sends to complete
    recv_waits: int = 0  # receives whose wait for the message is in recv_wait_seconds
    recv_wait_seconds: float = 0.0  # wall time in recv until a message's first frame arrived
    recv_seconds: float = 0.0  # wall time in recv after it: the rest of the message coming in


class Link:
    """One direction of a point-to-point connection to `peer` (ranks in the control group).

    `data` is the process group for tensors (None on driver links) with `data_peer` the peer's
    rank in it. A link is used by one thread at a time (a lock makes that so), because the
    control frame and the tensors that follow it must not interleave with another message's.

    `max_pending` bounds the sends posted with wait=False and not yet waited for (None: no
    bound, for a link whose peer receives only when it needs the message: there a bound could
    wait on a receive that never comes; a peer with a listener thread, as every link here has,
    keeps a receive posted, so the bound only waits for the transport).
    """

    def __init__(
        self,
        ctrl: Any,
        peer: int,
        *,
        tag: int = TAG_DOWN,
        data: Any | None = None,
        data_peer: int | None = None,
        device: torch.device | None = None,
        name: str = "",
        max_pending: int | None = 2,
    ) -> None:
        self.ctrl = ctrl
        self.peer = peer
        self.tag = tag
        self.data = data
        self.data_peer = data_peer
        self.device = device or torch.device("cpu")
        self.name = name or f"peer {peer}"
        self.stats = LinkStats()
        self._lock = threading.Lock()
        self.max_pending = max_pending
        self._pending: list[tuple[Any, Any]] = []  # async sends: (works, buffers kept alive)

    # ---- sending ----------------------------------------------------------------------------
    def send(self, msg: Message, *, wait: bool = True) -> None:
        """Send `msg`. wait=True returns once the peer has it (and every message posted before
        it); wait=False returns once it is posted, keeping the buffers alive until it is done,
        so the transfer overlaps what the caller does next. A failure raises LinkError, here or
        at the next send or flush that waits for it.

        One control frame (FRAME bytes; a longer payload follows in a second send) and, when
        there are tensors, one packed buffer on the data group: every gloo send is a rendezvous
        with the receiver, so a message costs two of them whatever it carries."""
        t0, c0 = time.perf_counter(), time.thread_time()
        tensors = {k: v.detach().contiguous() for k, v in msg.tensors.items()}
        if self.data is None:  # driver link: tensors ride in the pickle, on the CPU
            meta = dict(msg.meta, _tensors={k: v.cpu() for k, v in tensors.items()})
            layout: list[tuple[str, tuple[int, ...], str, int]] = []
            packed = None
        else:
            meta = msg.meta
            layout, packed = pack(tensors)  # a copy: the caller may reuse its tensors at once
        payload = pickle.dumps((msg.kind, meta, layout), protocol=pickle.HIGHEST_PROTOCOL)
        frame = torch.zeros(FRAME, dtype=torch.uint8)
        frame[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
        first = min(len(payload), FRAME - 8)
        frame[8 : 8 + first] = torch.frombuffer(bytearray(payload[:first]), dtype=torch.uint8)
        rest = None
        if len(payload) > first:
            rest = torch.frombuffer(bytearray(payload[first:]), dtype=torch.uint8)
        with self._lock:
            if not wait:
                self._reap()
                bound = self.max_pending
                while bound is not None and len(self._pending) >= max(1, bound):
                    self._wait_oldest()  # bounded: the oldest is usually long done
            try:
                works = [self.ctrl.send([frame], self.peer, self.tag)]
                if rest is not None:
                    works.append(self.ctrl.send([rest], self.peer, self.tag))
                if packed is not None:
                    works.append(self.data.send([packed], self.data_peer, self.tag))
                if wait:
                    for w in works:
                        w.wait()
            except RuntimeError as exc:
                raise LinkError(f"send to {self.name} failed: {_short(exc)}") from exc
            st = self.stats
            if wait:
                self._drain()  # delivered in order before this one: just collect them
            else:
                self._pending.append((works, (frame, rest, packed)))
                st.posted += 1
                st.pending_max = max(st.pending_max, len(self._pending))
            st.messages += 1
            st.control_bytes += FRAME + (rest.numel() if rest is not None else 0)
            st.tensor_bytes += packed.numel() if packed is not None else 0
            wall = time.perf_counter() - t0
            st.send_seconds += wall
            if not wait:
                st.post_seconds += wall
            cpu = time.thread_time() - c0
            st.cpu_seconds += cpu
            st.send_cpu_seconds += cpu

    @property
    def pending(self) -> int:
        """Posted sends not yet waited for."""
        return len(self._pending)

    def flush(self) -> None:
        """Wait for every posted send (each at most the group's timeout); LinkError if one
        failed. The workers flush their links before they stop."""
        with self._lock:
            self._drain()

    def _wait_oldest(self) -> None:
        works, _ = self._pending[0]
        t0 = time.perf_counter()
        try:
            for w in works:
                w.wait()
        except RuntimeError as exc:
            self._pending.clear()  # the pair is closed for good; nothing more will complete
            raise LinkError(f"send to {self.name} failed: {_short(exc)}") from exc
        finally:
            self.stats.pending_wait_seconds += time.perf_counter() - t0
        self._pending.pop(0)

    def _drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _reap(self) -> None:
        """Drop the posted sends known to be complete, oldest first (NCCL reports that; gloo
        only once waited for, so there the bound in send does the reaping)."""
        while self._pending:
            works = self._pending[0][0]
            try:
                done = all(w.is_completed() for w in works)
            except RuntimeError as exc:
                raise LinkError(f"send to {self.name} failed: {_short(exc)}") from exc
            if not done:
                return
            self._wait_oldest()  # returns at once; raises if the send failed

    # ---- receiving --------------------------------------------------------------------------
    def recv(self) -> Message:
        """Block until the next message arrives (at most the group's timeout)."""
        try:
            frame = torch.empty(FRAME, dtype=torch.uint8)
            t0 = time.perf_counter()
            self.ctrl.recv([frame], self.peer, self.tag).wait()
            t1, c0 = time.perf_counter(), time.thread_time()  # waited so far, work from here
            self.stats.recv_waits += 1
            self.stats.recv_wait_seconds += t1 - t0
            size = int(frame[:8].view(torch.int64).item())
            payload = frame[8 : 8 + min(size, FRAME - 8)].numpy().tobytes()
            if size > FRAME - 8:
                rest = torch.empty(size - (FRAME - 8), dtype=torch.uint8)
                self.ctrl.recv([rest], self.peer, self.tag).wait()
                payload += rest.numpy().tobytes()
            kind, meta, layout = pickle.loads(payload)
            tensors: dict[str, torch.Tensor] = {}
            if layout:
                nbytes = layout[-1][3] + _nbytes(layout[-1][1], layout[-1][2])
                packed = torch.empty(_aligned(nbytes), dtype=torch.uint8, device=self.device)
                self.data.recv([packed], self.data_peer, self.tag).wait()
                tensors = unpack(layout, packed)
        except RuntimeError as exc:
            raise LinkError(f"receive from {self.name} failed: {_short(exc)}") from exc
        if "_tensors" in meta:
            tensors = {k: v.to(self.device) for k, v in meta.pop("_tensors").items()}
        self.stats.received += 1
        self.stats.recv_seconds += time.perf_counter() - t1
        self.stats.cpu_seconds += time.thread_time() - c0
        return Message(kind, meta, tensors)


FRAME = 4096  # bytes of a control frame: fits every message but the ones with images or frames
ALIGN = 64  # byte alignment of each tensor inside a packed buffer


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def pack(
    tensors: dict[str, torch.Tensor],
) -> tuple[list[tuple[str, tuple[int, ...], str, int]], torch.Tensor | None]:
    """All tensors of a message in one aligned uint8 buffer on their device, and its layout
    (name, shape, dtype, byte offset)."""
    if not tensors:
        return [], None
    layout, offset = [], 0
    for name, t in tensors.items():
        layout.append((name, tuple(t.shape), str(t.dtype).replace("torch.", ""), offset))
        offset = _aligned(offset + t.numel() * t.element_size())
    device = next(iter(tensors.values())).device
    buf = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, _, _, start), t in zip(layout, tensors.values(), strict=True):
        flat = t.reshape(-1).view(torch.uint8)
        buf[start : start + flat.numel()].copy_(flat)
    return layout, buf


def unpack(
    layout: list[tuple[str, tuple[int, ...], str, int]], buf: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Views into the received buffer, one per tensor (no copy)."""
    out = {}
    for name, shape, dtype, start in layout:
        n = _nbytes(shape, dtype)
        out[name] = buf[start : start + n].view(getattr(torch, dtype)).view(shape)
    return out


def _short(exc: BaseException) -> str:
    """gloo's message without its source location and advice: what broke, with whom."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(" This is typically caused")[0]
    return text[:300]
