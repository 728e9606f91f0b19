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
    """Bytes and seconds spent in sends; the planner's communication model is checked on it."""

    messages: int = 0  # sent
    received: int = 0
    tensor_bytes: int = 0
    control_bytes: int = 0
    send_seconds: float = 0.0  # wall time in send, waiting for the peer included
    cpu_seconds: float = 0.0  # CPU time of this process's thread in send and recv


class Link:
    """One direction of a point-to-point connection to `peer` (ranks in the control group).

    `data` is the process group for tensors (None on driver links) with `data_peer` the peer's
    rank in it. A link is used by one thread at a time (a lock makes that so), because the
    control frame and the tensors that follow it must not interleave with another message's.
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
        self._pending: list[tuple[Any, Any]] = []  # async sends: (work, buffers kept alive)

    # ---- sending ----------------------------------------------------------------------------
    def send(self, msg: Message, *, wait: bool = True) -> None:
        """Send `msg`; wait=False returns before the peer has posted its recv (used where the
        peer only receives later, e.g. the sink refresh), keeping the buffers alive until done.

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
            layout, packed = pack(tensors)
        payload = pickle.dumps((msg.kind, meta, layout), protocol=pickle.HIGHEST_PROTOCOL)
        frame = torch.zeros(FRAME, dtype=torch.uint8)
        frame[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
        first = min(len(payload), FRAME - 8)
        frame[8 : 8 + first] = torch.frombuffer(bytearray(payload[:first]), dtype=torch.uint8)
        rest = None
        if len(payload) > first:
            rest = torch.frombuffer(bytearray(payload[first:]), dtype=torch.uint8)
        with self._lock:
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
            if not wait:
                self._pending.append((works, (frame, rest, packed)))
            self._reap()
        self.stats.messages += 1
        self.stats.control_bytes += FRAME + (rest.numel() if rest is not None else 0)
        self.stats.tensor_bytes += packed.numel() if packed is not None else 0
        self.stats.send_seconds += time.perf_counter() - t0
        self.stats.cpu_seconds += time.thread_time() - c0

    def _reap(self) -> None:
        keep = []
        for works, bufs in self._pending:
            try:
                done = all(w.is_completed() for w in works)
            except RuntimeError as exc:
                raise LinkError(f"send to {self.name} failed: {_short(exc)}") from exc
            if not done:
                keep.append((works, bufs))
            else:
                for w in works:
                    w.wait()  # raises if the send failed
        self._pending = keep

    # ---- receiving --------------------------------------------------------------------------
    def recv(self) -> Message:
        """Block until the next message arrives (at most the group's timeout)."""
        try:
            frame = torch.empty(FRAME, dtype=torch.uint8)
            self.ctrl.recv([frame], self.peer, self.tag).wait()
            c0 = time.thread_time()  # the wait above is idle time, what follows is work
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
