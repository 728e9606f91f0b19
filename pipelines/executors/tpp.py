"""Timestep-forcing pipeline parallelism (TPP): one denoising step per device, one more decodes.

    driver ─▶ rank 0 (step 0) ─▶ rank 1 (step 1) ─▶ … ─▶ rank S-1 (step S-1) ─▶ decode rank ─▶ driver

In timestep-forcing mode step s reads and writes only cache s, written from that step's own noisy
input, so rank s holds exactly the caches of its steps and no cache ever crosses a device: only
the block's latent travels (torch.distributed point-to-point, NCCL between GPUs, gloo on CPU),
together with the block's audio tokens, computed once on rank 0, which every rank needs for its
audio cross-attention. While rank 1 runs step 1 of block b, rank 0 already runs step 0 of block
b+1 (of the same session, or another's): once the pipeline is full one block leaves per stage
time, and latency stays one block's S steps plus the hops. A rank posts the latent without
waiting for the next rank to take it (wire.Link, wait=False): the transfer overlaps its next
block.

With fewer ranks than steps, rank r owns a contiguous range of steps (the later ranks take the
extra ones, rank 0 also encodes audio). Every rank keeps per-session state (its step caches and
the shared sink, built from the reference image it receives with the open) and drops it when the
session closes; messages travel in one FIFO order, so a close or open reaches each rank exactly
between the blocks it belongs between.

Sink refresh (replace the sink by block 0's first clean frame) is the one backward dependency:
the rank that finishes the last step (always the last denoise rank, see split_steps) sends that
frame back to the earlier ranks, and each of them waits for it before it starts the session's
refresh block (block 1, or Live Avatar's first block of its second clip), exactly where the
single-process engine refreshes. Other sessions' blocks are not held up by more than that wait,
and with a later refresh block, not at all. The back channel is bounded like the forward links
(at most `max_pending` posted frames outstanding): every earlier rank keeps a receive posted on
it (a listener thread) and keeps only the frames of its open sessions, so a session that closes
before its refresh block leaves nothing behind on either side. The last denoise rank sends the
driver's pings back as well (keeping those receives from gloo's timeout) and, when it stops, a
`stop`, which the earlier ranks wait for before they stop: no refresh is sent to a rank gone.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from models.errors import ConfigError, DiffstreamError
from models.transfer import to_device
from pipelines.executors import parse_devices
from pipelines.executors.base import ModelInfo
from pipelines.executors.launch import WorkerContext, check_devices
from pipelines.executors.remote import PipelineExecutor
from pipelines.executors.stages import (
    block_inputs,
    check_model,
    encode_audio,
    error_message,
    guarded,
    held_params,
    load_decoder,
    load_generator,
    run_decoder,
    split_options,
)
from pipelines.executors.torchrun import parse_external
from pipelines.executors.wire import Link, LinkError, Message
from pipelines.generator import BlockInputs, SessionState, StreamingGenerator


def split_steps(steps: int, ranks: int) -> list[range]:
    """Contiguous step ranges, one per denoise rank, as even as possible; the later ranks take
    the remainder (rank 0 also encodes audio). A rank may own no step when steps < ranks."""
    if steps < 1 or ranks < 1:
        raise ConfigError(f"cannot split {steps} steps over {ranks} ranks")
    base, extra = divmod(steps, ranks)
    out, start = [], 0
    for r in range(ranks):
        n = base + (1 if r >= ranks - extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class TPPExecutor(PipelineExecutor):
    """S denoise ranks + 1 decode rank behind the one Executor interface."""

    worker_module: ClassVar[str] = "tpp"
    strategy: ClassVar[str] = "tpp"
    min_devices: ClassVar[int] = 2

    @classmethod
    def launch(
        cls, *, model: str = "default", devices: str = "cpu:2", **options: Any
    ) -> TPPExecutor:
        """Start the workers (torch.multiprocessing, spawn) and wait until they are ready."""
        check_model(model)
        executor_opts, pipeline = split_options(options)
        mode = pipeline.get("cache_mode", "timestep_forcing")
        if mode != "timestep_forcing":
            raise ConfigError(
                f"the tpp executor needs cache_mode=timestep_forcing (one cache per step), got "
                f"{mode!r}; use --executor local for the re-encode mode"
            )
        pipeline["cache_mode"] = "timestep_forcing"
        external = parse_external(devices)
        devs = [torch.device("cpu")] * external[0] if external else parse_devices(devices)
        check_devices(devs, cls.min_devices, "--executor tpp (steps + one decode rank)")
        return cls(model=model, devices=devs, options=pipeline, external=external, **executor_opts)

    def roles(self, info: ModelInfo, ready: list[dict[str, Any]]) -> list[str]:
        ranks = len(self.devices) - 1
        parts = split_steps(info.steps, ranks)
        roles = [
            f"denoise step{'s' if len(r) != 1 else ''} {_fmt(r)}"
            + (" + audio features" if i == 0 else "")
            for i, r in enumerate(parts)
        ]
        return [*roles, "VAE decode"]


def _fmt(r: range) -> str:
    if len(r) == 0:
        return "(none: forwards only)"
    return str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def load(ctx: WorkerContext) -> Any:
    """Denoise ranks load the whole transformer (every step runs every layer), rank 0 also the
    audio and prompt encoders; the decode rank only the autoencoder. (Models too small to split
    load whole everywhere.)"""
    if ctx.last:
        return load_decoder(ctx)
    parts = ("transformer", "audio", "text") if ctx.stage == 0 else ("transformer",)
    return load_generator(ctx, parts=parts, cache_mode="timestep_forcing")


def run_worker(ctx: WorkerContext, state: Any) -> int:
    if ctx.last:
        return run_decoder(ctx, state)
    return StepRank(ctx, state).run()


@dataclass
class _Session:
    state: SessionState  # on a rank that owns no step: positions, noise and audio state only
    own: range
    awaiting_refresh: bool = False  # the sink refresh frame has not come back from the last rank


class StepRank:
    """One denoise rank: receive a block, run its own steps, pass the latent on."""

    def __init__(self, ctx: WorkerContext, gen: StreamingGenerator) -> None:
        self.ctx = ctx
        self.gen = gen
        self.ranks = ctx.workers - 1
        self.rank = ctx.stage
        self.sessions: dict[str, _Session] = {}
        self.out = ctx.link_out()
        # The sink refresh's back channel, last denoise rank → each earlier one (ranks > 1).
        self._refresh_out: dict[int, Link] = {}  # on the last denoise rank
        self._refresh_in: queue.Queue = queue.Queue()  # on the others: filled by a listener
        self._back_stopped = False  # the last denoise rank's `stop` came back
        self._refreshes: dict[str, torch.Tensor] = {}  # arrived before they were needed

    def run(self) -> int:
        ctx = self.ctx
        ctx.listen(ctx.link_in(), "up")
        if self._last:
            # Bounded like the forward links (Link's default max_pending): the earlier ranks
            # always have a receive posted, so waiting for the oldest frame never waits on
            # a session reaching its refresh block.
            self._refresh_out = {r: ctx.link_back(r) for r in range(self.rank)}
        else:
            ctx.listen(ctx.link_back(self.ranks - 1), "refresh", self._refresh_in)
        while True:
            got = ctx.next_message()
            self._take_refreshes()  # keeps the back channel's queue down to the open sessions
            if got is None:
                continue
            msg = got[1]
            kind = msg.kind
            if kind in ("block", "open", "reference"):
                handler = {"block": self.block, "open": self.open, "reference": self.reference}
                guarded(self.rank, msg, handler[kind], self._drop, self.out.send)
            elif kind == "close":
                self.sessions.pop(msg.meta["session_id"], None)
                self._refreshes.pop(msg.meta["session_id"], None)
                self.out.send(msg)
                for link in self._refresh_out.values():
                    link.flush()  # the posted refresh frames: none outlives the session
            elif kind == "error":
                if msg.meta.get("drop"):
                    self.sessions.pop(msg.meta["session_id"], None)
                self.out.send(msg)
            elif kind == "stats":
                info = dict(
                    ctx.stats(msg.meta.get("events", True)),
                    role=f"steps {_fmt(split_steps(self.gen.config.steps, self.ranks)[self.rank])}",
                    sessions=len(self.sessions),
                    refresh_frames_held=len(self._refreshes),
                    cache_bytes=sum(s.state.cache_bytes() for s in self.sessions.values()),
                    params=held_params(self.gen),
                )
                msg.meta["ranks"] = [*msg.meta["ranks"], info]
                self.out.send(msg)
            elif kind == "ping":
                self.out.send(msg)
                for link in self._refresh_out.values():
                    link.send(msg)  # keeps the earlier ranks' refresh receives alive
            elif kind == "stop":
                self.out.send(msg)
                for link in self._refresh_out.values():
                    link.send(msg)  # after every refresh frame: the earlier ranks may stop
                while not self._last and not self._back_stopped:
                    self._take_refreshes(wait=True)
                return 0
            else:
                raise LinkError(f"rank {self.rank}: unexpected message {kind!r}")

    # ---- sessions ------------------------------------------------------------------------------
    def _drop(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self._refreshes.pop(sid, None)

    def open(self, msg: Message) -> None:
        m = msg.meta
        sid = m["session_id"]
        gen = self.gen
        steps = m.get("steps") or gen.config.steps
        prompt = m.get("prompt")
        tokens = msg.tensors.get("prompt_tokens")
        try:
            own = split_steps(steps, self.ranks)[self.rank]
            if prompt is not None and tokens is None:  # rank 0 holds the prompt encoder
                tokens = gen.prompt_tokens(prompt)
            state = gen.new_session(
                m["reference"] if gen.can_encode else None,  # else it comes as 'reference'
                session_id=sid,
                seed=m.get("seed", 0),
                steps=steps,
                sink_refresh=m.get("sink_refresh"),
                cache_mode="timestep_forcing",
                cache_steps=own,
                prompt=prompt,
                prompt_tokens=tokens,
            )
        except DiffstreamError as exc:
            self.out.send(error_message(sid, None, exc, drop=True, what="open"))
            return
        self.sessions[sid] = _Session(state, own)
        # The decode rank needs no image, unless its VAE primes a session from it (Live Avatar).
        if self.rank == self.ranks - 1 and not getattr(self.gen.vae, "needs_reference", False):
            m = {k: v for k, v in m.items() if k != "reference"}
        tensors = {"prompt_tokens": tokens} if tokens is not None and not self._last else {}
        self.out.send(Message("open", m, tensors))

    @property
    def _last(self) -> bool:
        return self.rank == self.ranks - 1

    def reference(self, msg: Message) -> None:
        """The reference encoded on the decode rank (sent on by the driver): build the sink."""
        sess = self.sessions.get(msg.meta["session_id"])
        if sess is not None:
            self.gen.set_source(sess.state, self.gen.source_from_message(msg.tensors))
        if not self._last:
            self.out.send(msg)

    # ---- one block -------------------------------------------------------------------------------
    def block(self, msg: Message) -> None:
        start = time.perf_counter()
        m = msg.meta
        sid, index = m["session_id"], m["block_index"]
        sess = self.sessions.get(sid)
        if sess is None:
            self.out.send(error_message(sid, index, f"session {sid!r} is not open", drop=False))
            return
        gen = self.gen
        timings = dict(m.get("timings", {}))
        try:
            if sess.awaiting_refresh and index >= gen.config.sink_refresh_block:
                self._apply_refresh(sid, sess)
            state = sess.state
            expected = state.block_index
            if index != expected:
                self.out.send(
                    error_message(
                        sid,
                        index,
                        f"block {index} submitted out of order (expected {expected})",
                        drop=False,
                    )
                )
                return
            features = msg.tensors.get("features")
            if self.rank == 0:
                t0 = time.perf_counter()
                features = encode_audio(gen, state, m.get("audio"), index)
                noise = to_device(state.noise.next(), gen.device, gen.dtype)
                latent = noise
                timings["features"] = time.perf_counter() - t0
                start_frame = state.next_frame
            else:
                latent = msg.tensors["latent"]
                start_frame = m["start_frame"]
            steps_done = list(timings.get("denoise_steps", []))
            inputs = block_inputs(gen, index, start_frame, features, latent)
            for step in sess.own:
                ts = time.perf_counter()
                latent = gen.denoise_step(state, inputs, step, latent)
                steps_done.append(time.perf_counter() - ts)
            self._finish(sid, sess, inputs, latent)
        except DiffstreamError as exc:
            self.sessions.pop(sid, None)
            self.out.send(error_message(sid, index, exc, drop=True))
            return
        timings["denoise_steps"] = steps_done
        timings["denoise"] = sum(steps_done)
        out_meta = {
            "session_id": sid,
            "block_index": index,
            "start_frame": start_frame,
            "submitted_at": m.get("submitted_at", 0.0),
            "started": m.get("started", start),
            "timings": timings,
        }
        tensors = {"latent": latent}
        if features is not None and self.rank < self.ranks - 1:
            tensors["features"] = features
        # Posted, not waited for: the latent travels while this rank starts its next block
        # (the link keeps the order and at most two such sends outstanding, see wire.Link).
        self.out.send(Message("block", out_meta, tensors), wait=False)
        self.ctx.record("block", sid, index, start)

    def _finish(self, sid: str, sess: _Session, inputs: BlockInputs, latent: torch.Tensor) -> None:
        """Advance the session past this block; the sink refresh needs the clean latent, which
        only the last step's rank has."""
        gen, state = self.gen, sess.state
        refresh = state.sink_refresh and inputs.block_index == 0 and gen.config.sink
        last_step = sess.own.stop == state.steps
        if not len(sess.own):  # no step here, so no sink to refresh: just move on
            state.block_index += 1
            state.next_frame += gen.config.frames_per_block
        elif not refresh:
            gen.finish_block(state, inputs, None)  # timestep forcing: only advances positions
        elif last_step:
            gen.finish_block(state, inputs, latent)  # latent is clean: refreshes the sink here
            frame = latent[:, :, :1].contiguous()
            for r in range(self.rank):
                if len(split_steps(state.steps, self.ranks)[r]):
                    self._back_to(r).send(
                        Message("refresh", {"session_id": sid}, {"frame": frame}), wait=False
                    )
        else:
            gen.finish_block(state, inputs, None)
            sess.awaiting_refresh = True  # the clean frame comes back before the refresh block

    def _apply_refresh(self, sid: str, sess: _Session) -> None:
        """Wait for block 0's clean first frame (sent back by the last denoise rank)."""
        while sid not in self._refreshes:
            if self._back_stopped:
                raise LinkError(f"rank {self.rank}: no sink refresh for session {sid!r}")
            self._take_refreshes(wait=True)
        sess.awaiting_refresh = False
        sess.state.pending_sink = self._refreshes.pop(sid)
        self.gen.refresh_sink(sess.state)

    def _take_refreshes(self, *, wait: bool = False) -> None:
        """Move what the back channel's listener received into `_refreshes` (wait: at least
        one message): the frames of open sessions still waiting for theirs; others (a session
        closed or dropped meanwhile) and pings are dropped, a `stop` is noted."""
        while True:
            try:
                _, got = self._refresh_in.get(block=wait)
            except queue.Empty:
                break
            wait = False
            if isinstance(got, BaseException):
                raise got
            if got.kind == "stop":
                self._back_stopped = True
            elif got.kind == "refresh":
                sid = got.meta["session_id"]
                sess = self.sessions.get(sid)
                if sess is not None and sess.awaiting_refresh:
                    self._refreshes[sid] = got.tensors["frame"]
        for sid in [k for k in self._refreshes if k not in self.sessions]:
            del self._refreshes[sid]  # a frame kept for a session that ended meanwhile

    def _back_to(self, rank: int) -> Link:
        return self._refresh_out[rank]
