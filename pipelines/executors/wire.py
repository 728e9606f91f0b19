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

    messages: int = 0
    tensor_bytes: int = 0
    control_bytes: int = 0
    send_seconds: float = 0.0


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
        peer only receives later, e.g. the sink refresh), keeping the buffers alive until done."""
        t0 = time.perf_counter()
        tensors = {k: v.detach().contiguous() for k, v in msg.tensors.items()}
        if self.data is None:  # driver link: tensors ride in the pickle, on the CPU
            meta = dict(msg.meta, _tensors={k: v.cpu() for k, v in tensors.items()})
            specs: list[tuple[str, tuple[int, ...], str]] = []
        else:
            meta = msg.meta
            specs = [
                (k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in tensors.items()
            ]
        payload = pickle.dumps((msg.kind, meta, specs), protocol=pickle.HIGHEST_PROTOCOL)
        body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        head = torch.tensor([body.numel()], dtype=torch.int64)
        with self._lock:
            try:
                works = [self.ctrl.send([head], self.peer, self.tag)]
                if wait:
                    works[-1].wait()
                works.append(self.ctrl.send([body], self.peer, self.tag))
                if wait:
                    works[-1].wait()
                for _, t in specs_tensors(specs, tensors):
                    works.append(self.data.send([t], self.data_peer, self.tag))
                    if wait:
                        works[-1].wait()
            except RuntimeError as exc:
                raise LinkError(f"send to {self.name} failed: {_short(exc)}") from exc
            if not wait:
                self._pending.append((works, (head, body, tensors)))
            self._reap()
        self.stats.messages += 1
        self.stats.control_bytes += body.numel() + 8
        self.stats.tensor_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self.stats.send_seconds += time.perf_counter() - t0

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
            head = torch.empty(1, dtype=torch.int64)
            self.ctrl.recv([head], self.peer, self.tag).wait()
            body = torch.empty(int(head.item()), dtype=torch.uint8)
            self.ctrl.recv([body], self.peer, self.tag).wait()
            kind, meta, specs = pickle.loads(body.numpy().tobytes())
            tensors: dict[str, torch.Tensor] = {}
            for name, shape, dtype in specs:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self.data.recv([t], self.data_peer, self.tag).wait()
                tensors[name] = t
        except RuntimeError as exc:
            raise LinkError(f"receive from {self.name} failed: {_short(exc)}") from exc
        if "_tensors" in meta:
            tensors = {k: v.to(self.device) for k, v in meta.pop("_tensors").items()}
        return Message(kind, meta, tensors)


def specs_tensors(
    specs: list[tuple[str, tuple[int, ...], str]], tensors: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """Tensors in the order their specs were written (the receiver reads them in that order)."""
    return [(name, tensors[name]) for name, _, _ in specs]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
