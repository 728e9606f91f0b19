"""DualParal, block-wise: the transformer's layers split over R ranks, a queue of blocks one noise
level apart flowing through them, one more rank decoding.

    driver ─▶ rank 0 (layers 0…a, scheduler) ─▶ rank 1 (a…b) ─▶ … ─▶ rank R-1 (…L, head) ─▶ decode
                 ▲                                                        │
                 └──────────── latent after the Euler step (back) ────────┘

Rank 0 runs each session's staggered schedule (pipelines/executors/staggered.py): per iteration
it sends every queued block, head first, through its layers and on; rank R-1 finishes the
forward, takes the Euler step and returns the new latent to rank 0, or, after the last step,
sends the clean block to the decode rank (these sends are posted without waiting, so each
transfer overlaps the sender's next forward: wire.Link). The queue's S blocks are S independent
micro-batches, so the R layer ranks work on different blocks at once: with S >= R the ring stays
full. Only the current block's hidden states travel; each rank keeps the keys/values of recent
blocks for its own layers (FeatureCache), which is what later blocks attend to. Each rank holds
1/R of the transformer: the strategy for models that do not fit one device.

Latency is the price: a block leaves after S iterations and an iteration needs the next block's
audio, so in live streaming the first frame waits S-1 more blocks of audio than with TPP. When no
new block arrives for `drain_after_s` the queue advances without one (the stream has paused or
ended); a block arriving after such a drain attends to its neighbours as they are then.

Noise is coordinated by default (PipelineConfig.coordinated_noise): every block's noise is a
permutation of one template per session, so neighbouring blocks share noise statistics.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from models.errors import DiffstreamError
from models.transfer import to_device
from pipelines.executors import parse_devices
from pipelines.executors.base import ModelInfo
from pipelines.executors.launch import WorkerContext, check_devices
from pipelines.executors.remote import PipelineExecutor
from pipelines.executors.stages import (
    check_model,
    encode_audio,
    error_message,
    guarded,
    load_bundle,
    load_decoder,
    load_generator,
    run_decoder,
    split_options,
)
from pipelines.executors.staggered import (
    FeatureCache,
    StaggeredQueue,
    audio_for,
    context_for,
    keep_layers,
    split_layers,
)
from pipelines.executors.torchrun import parse_external
from pipelines.executors.wire import Link, LinkError, Message
from pipelines.generator import StreamingGenerator


class DualParalExecutor(PipelineExecutor):
    """R layer ranks + 1 decode rank behind the one Executor interface."""

    worker_module: ClassVar[str] = "dualparal"
    strategy: ClassVar[str] = "dualparal"
    min_devices: ClassVar[int] = 2

    @classmethod
    def launch(
        cls, *, model: str = "default", devices: str = "cpu:3", **options: Any
    ) -> DualParalExecutor:
        """Start the workers (torch.multiprocessing, spawn) and wait until they are ready.
        Extra option: drain_after_s, seconds without a new block before the queue advances
        without one (default: two block durations, so live audio's jitter does not drain)."""
        drain = options.pop("drain_after_s", None)
        check_model(model)
        executor_opts, pipeline = split_options(options)
        pipeline.setdefault("coordinated_noise", True)
        pipeline.pop("cache_mode", None)  # the schedule defines its own caching
        external = parse_external(devices)
        devs = [torch.device("cpu")] * external[0] if external else parse_devices(devices)
        check_devices(devs, cls.min_devices, "--executor dualparal (layers + one decode rank)")
        if drain is not None:
            pipeline["drain_after_s"] = float(drain)
        return cls(model=model, devices=devs, options=pipeline, external=external, **executor_opts)

    def roles(self, info: ModelInfo, ready: list[dict[str, Any]]) -> list[str]:
        layers = [r["layers"] for r in ready if "layers" in r]
        roles = []
        for i, (a, b) in enumerate(layers):
            extra = " + embedding, scheduler, audio features" if i == 0 else ""
            extra += " + head, Euler step" if i == len(layers) - 1 else ""
            roles.append(f"layers {a}-{b - 1}{extra}")
        return [*roles, "VAE decode"]


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def load(ctx: WorkerContext) -> Any:
    """Layer ranks load their own layers only (a model too small to split loads whole and
    drops the rest before it reaches the device); rank 0 also the audio and prompt encoders,
    the decode rank only the autoencoder."""
    if ctx.last:
        return load_decoder(ctx)
    from models.registry import model_num_layers

    layers = split_layers(model_num_layers(ctx.spec.model), ctx.workers - 1)[ctx.stage]
    parts = ("transformer", "audio", "text") if ctx.stage == 0 else ("transformer",)
    bundle = load_bundle(ctx, parts=parts, layers=layers)
    keep_layers(bundle.dit, layers)
    gen = load_generator(ctx, bundle)
    ctx.model_info["layers"] = [layers.start, layers.stop]
    return gen, layers


def run_worker(ctx: WorkerContext, state: Any) -> int:
    if ctx.last:
        return run_decoder(ctx, state)
    gen, layers = state
    return LayerRank(ctx, gen, layers).run()


@dataclass
class _Block:
    """What a rank keeps about a queued block between its forwards."""

    positions: torch.Tensor
    rope: Any
    audio_kv: list | None
    features: torch.Tensor | None = None  # rank 0: shipped with the block's first forward
    submitted_at: float = 0.0
    started: float = 0.0
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Session:
    cache: FeatureCache
    context: Any
    steps: int
    seed: int = 0
    blocks: dict[int, _Block] = field(default_factory=dict)
    source: Any = None  # what the sink is made of (rank 0 keeps it for the refresh)
    # rank 0 only: the schedule
    queue: StaggeredQueue | None = None
    noise: Any = None
    audio_state: Any = None
    sink_refresh: bool = False
    requests: deque = field(default_factory=deque)  # (block index, audio, submitted_at)
    next_request: int = 0
    last_request_at: float = 0.0
    plan: deque = field(default_factory=deque)  # forwards left in the current iteration
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # ready at rank 0
    refresh_pending: bool = False  # block 0 left; rebuild the sink before the next iteration
    refresh_frame: torch.Tensor | None = None


class LayerRank:
    """A layer rank; rank 0 also schedules, the last also projects out and steps."""

    def __init__(self, ctx: WorkerContext, gen: StreamingGenerator, layers: range) -> None:
        self.ctx = ctx
        self.gen = gen
        self.layers = layers
        self.ranks = ctx.workers - 1
        self.first = ctx.stage == 0
        self.last = ctx.stage == self.ranks - 1
        self.sessions: dict[str, _Session] = {}
        self.out = ctx.link_out()
        block_s = gen.block_video_frames(1) / gen.fps
        self.drain_after = float(ctx.spec.options.get("drain_after_s", 2 * block_s))
        self._ring_out: Link | None = None
        self._order: deque[str] = deque()  # round-robin over sessions (rank 0)
        cfg = gen.config
        self.frames = cfg.frames_per_block
        self._tokens = gen._context_tokens.to(gen.device, gen.dtype)
        # Live Avatar's layer ranks hold no VAE: the decode rank encodes the reference and the
        # driver sends it back to rank 0 ('reference'), which starts the sink pass then.
        self.deferred = not gen.can_encode

    # ---- loop -------------------------------------------------------------------------------
    def run(self) -> int:
        ctx = self.ctx
        ctx.listen(ctx.link_in(), "up")
        if self.first and not self.last:
            ctx.listen(ctx.link_back(self.ranks - 1), "ring")
        if self.last and not self.first:
            self._ring_out = ctx.link_back(0)
        if not self.first:  # purely reactive
            while True:
                got = ctx.next_message()
                if got is not None and self.handle(*got):
                    return 0
        while True:  # rank 0: take in whatever has arrived, issue one forward, repeat
            got = ctx.next_message(0)
            while got is not None:
                if self.handle(*got):
                    return 0
                got = ctx.next_message(0)
            if self._schedule_one():
                continue
            got = ctx.next_message(self._drain_wait())  # nothing to do: wait for news
            if got is not None and self.handle(*got):
                return 0

    def handle(self, source: str, msg: Message) -> bool:
        """React to one message; True when the rank must stop."""
        kind, m = msg.kind, msg.meta
        if kind in ("fwd", "sink", "open", "reference"):
            handler = {
                "fwd": self.forward,
                "sink": self.sink_pass,
                "open": self.open,
                "reference": self.reference,
            }[kind]
            guarded(self.ctx.stage, msg, handler, self._drop, self.out.send)
        elif kind in ("returned", "left"):
            self.on_return(msg)
        elif kind == "block":
            self.on_request(msg)
        elif kind == "close":
            self._drop(m["session_id"])
            self.out.send(msg)
            self.ctx.flush_links()  # the ring's posted returns too: none outlives the session
        elif kind == "error":
            if m.get("drop"):
                self._drop(m["session_id"])
            self.out.send(msg)
        elif kind == "ping":
            if source == "ring":
                return False  # a heartbeat around the ring: it kept the receive alive
            self.out.send(msg)
            if self._ring_out is not None:
                self._ring_out.send(msg)
        elif kind == "stats":
            info = dict(
                self.ctx.stats(m.get("events", True)),
                role=f"layers {self.layers.start}-{self.layers.stop - 1}",
                sessions=len(self.sessions),
                cache_bytes=sum(s.cache.nbytes() for s in self.sessions.values()),
                params=sum(p.numel() for p in self.gen.model.parameters()),
            )
            msg.meta["ranks"] = [*m["ranks"], info]
            self.out.send(msg)
        elif kind == "stop":  # rank 0's ring receiver just ends with its process
            self.out.send(msg)
            return True
        else:
            raise LinkError(f"rank {self.ctx.stage}: unexpected message {kind!r}")
        return False

    def _drop(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        if sid in self._order:
            self._order.remove(sid)

    # ---- sessions -------------------------------------------------------------------------------
    def _new_session(self, m: dict[str, Any], prompt_tokens: torch.Tensor | None) -> _Session:
        gen = self.gen
        steps = m.get("steps") or gen.config.steps
        gen.schedule(steps)  # validates
        cache = FeatureCache.allocate(
            gen.model,
            self.layers,
            tokens_per_frame=gen.tokens_per_frame,
            frames_per_block=self.frames,
            window_frames=gen.config.window_frames,
            steps=steps,
            device=gen.device,
            dtype=gen.dtype,
            latent_hw=(gen.latent_h, gen.latent_w),
        )
        tokens = self._tokens if prompt_tokens is None else prompt_tokens.to(gen.device, gen.dtype)
        return _Session(
            cache=cache,
            context=context_for(gen.model, tokens, self.layers),
            steps=steps,
            seed=int(m.get("seed", 0)),
        )

    def open(self, msg: Message) -> None:
        """Rank 0: a new session from the driver; encode the reference and start the sink pass
        (or, without a VAE here, open the session on every rank and wait for the reference)."""
        m = msg.meta
        sid = m["session_id"]
        gen = self.gen
        tokens = None
        try:
            if m.get("prompt") is not None:
                tokens = gen.prompt_tokens(m["prompt"])
            sess = self._new_session(m, tokens)
            sess.queue = StaggeredQueue(sess.steps)
            sess.noise = gen._noise(m.get("seed", 0))
            sess.audio_state = gen.audio_encoder.new_state() if gen.audio_encoder else None
            refresh = m.get("sink_refresh")
            sess.sink_refresh = gen.config.sink_refresh if refresh is None else bool(refresh)
            source = None if self.deferred else gen.encode_reference(m["reference"])
        except DiffstreamError as exc:
            self.out.send(error_message(sid, None, exc, drop=True, what="open"))
            return
        self.sessions[sid] = sess
        self._order.append(sid)
        meta = dict(m if self.deferred else {k: v for k, v in m.items() if k != "reference"})
        extra = {"prompt_tokens": tokens} if tokens is not None else {}
        if self.deferred:  # the sink waits for the reference; the session opens everywhere now
            self._after_sink(Message("sink", dict(meta, what="open", deferred=True), extra))
            return
        self._start_sink_pass(sid, sess, source, dict(meta, what="open"), extra)

    def reference(self, msg: Message) -> None:
        """Rank 0: the reference, encoded on the decode rank: build the sink on every rank."""
        sid = msg.meta["session_id"]
        sess = self.sessions.get(sid)
        if sess is None:
            return
        source = self.gen.source_from_message(msg.tensors)
        self._start_sink_pass(sid, sess, source, {"session_id": sid, "what": "reference"})

    def _source_tensors(self, source: Any) -> dict[str, torch.Tensor]:
        if hasattr(source, "to_message"):
            return source.to_message()
        return {"reference": source}

    def _start_sink_pass(
        self, sid: str, sess: _Session, source: Any, meta: dict, extra: dict | None = None
    ) -> None:
        sess.source = source
        if not self.gen.config.sink:
            hidden = torch.zeros(0)
        else:
            hidden = self._sink_layers(sess, source, None)
        tensors = {**self._source_tensors(source), "hidden": hidden, **(extra or {})}
        self._after_sink(Message("sink", meta, tensors))

    def sink_pass(self, msg: Message) -> None:
        """Ranks after 0: open the session here and store the sink keys/values of this rank's
        layers (a deferred open carries no sink yet: the 'reference' pass brings it)."""
        m = msg.meta
        sid = m["session_id"]
        if m["what"] == "open":
            try:
                self.sessions[sid] = self._new_session(m, msg.tensors.get("prompt_tokens"))
            except DiffstreamError as exc:
                self.out.send(error_message(sid, None, exc, drop=True, what="open"))
                return
        sess = self.sessions.get(sid)
        if sess is None:
            return  # closed meanwhile
        if m.get("deferred"):
            self._after_sink(msg)
            return
        hidden = msg.tensors["hidden"]
        if self.gen.config.sink:
            source = self.gen.source_from_message(msg.tensors)
            hidden = self._sink_layers(sess, source, hidden)
        self._after_sink(Message("sink", m, {**msg.tensors, "hidden": hidden}))

    def _sink_layers(
        self, sess: _Session, source: Any, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        gen = self.gen
        plan = sess.cache.sink_plan()
        with torch.inference_mode():
            if hasattr(gen.model, "sink_forward"):
                return gen.model.sink_forward(
                    source, sess.context, plan, layers=self.layers, hidden=hidden
                )
            t = torch.full((1,), gen.config.context_timestep, device=gen.device)
            return gen.model(
                source,
                t,
                sess.context,
                frame_positions=torch.zeros(1, dtype=torch.long, device=gen.device),
                plan=plan,
                layers=self.layers,
                hidden=hidden,
            )

    def _after_sink(self, msg: Message) -> None:
        if not self.last:
            self.out.send(msg)
        elif msg.meta["what"] == "open":  # every layer rank holds the session: tell the decoder
            keep = ("session_id", "reference") if msg.meta.get("deferred") else ("session_id",)
            self.out.send(Message("open", {k: msg.meta[k] for k in keep if k in msg.meta}))

    # ---- rank 0: requests and the schedule ------------------------------------------------------
    def on_request(self, msg: Message) -> None:
        m = msg.meta
        sid, index = m["session_id"], m["block_index"]
        sess = self.sessions.get(sid)
        if sess is None:
            self.out.send(error_message(sid, index, f"session {sid!r} is not open", drop=False))
            return
        if index != sess.next_request:
            self.out.send(
                error_message(
                    sid,
                    index,
                    f"block {index} submitted out of order (expected {sess.next_request})",
                    drop=False,
                )
            )
            return
        sess.next_request += 1
        sess.last_request_at = time.monotonic()
        sess.requests.append((index, m.get("audio"), m.get("submitted_at", 0.0)))

    def on_return(self, msg: Message) -> None:
        """Rank 0: a block came back around the ring (or left, clean)."""
        m = msg.meta
        sess = self.sessions.get(m["session_id"])
        if sess is None:
            return
        b = m["block_index"]
        if msg.kind == "returned":
            sess.latents[b] = msg.tensors["latent"]
            blk = sess.blocks.get(b)
            if blk is not None:
                blk.timings["denoise_steps"] = [*blk.timings.get("denoise_steps", []), m["step_s"]]
        else:
            sess.blocks.pop(b, None)
            if "frame" in msg.tensors:
                sess.refresh_frame = msg.tensors["frame"]

    def _drain_wait(self) -> float | None:
        """How long rank 0 may wait for a message before some session's drain is due."""
        waits = [
            s.last_request_at + self.drain_after - time.monotonic()
            for s in self.sessions.values()
            if not s.plan and not s.requests and s.queue is not None and len(s.queue)
        ]
        return max(0.001, min(waits)) if waits else None

    def _ready(self, sess: _Session) -> bool:
        """True when the session's next forward can be issued now (may start an iteration)."""
        if not sess.plan and not self._next_iteration(sess):
            return False
        b, _ = sess.plan[0]
        return b in sess.latents

    def _next_iteration(self, sess: _Session) -> bool:
        # The refreshed sink is used from the first iteration, after block 0 has left, that
        # holds a block at or past sink_refresh_block (at one step: exactly the local engine).
        due = sess.queue.next_block > self.gen.config.sink_refresh_block or (
            bool(sess.requests) and sess.queue.next_block >= self.gen.config.sink_refresh_block
        )
        if sess.refresh_pending and due:
            if sess.refresh_frame is None:
                return False  # block 0's clean frame is still on its way back
            sid = next(k for k, v in self.sessions.items() if v is sess)
            frame, sess.refresh_frame, sess.refresh_pending = sess.refresh_frame, None, False
            old = sess.source
            source = old.with_reference(frame) if hasattr(old, "with_reference") else frame
            self._start_sink_pass(sid, sess, source, {"session_id": sid, "what": "refresh"})
        admit = bool(sess.requests)
        drain_due = time.monotonic() >= sess.last_request_at + self.drain_after
        if not admit and not (len(sess.queue) and drain_due):
            return False  # nothing queued, or the next block may still come
        if admit:
            index, audio, submitted_at = sess.requests[0]
            gen = self.gen
            start = time.perf_counter()
            feats = encode_audio(gen, sess, audio, index)  # may raise InvalidAudioError
            sess.requests.popleft()
            sess.latents[index] = to_device(sess.noise.next(), gen.device, gen.dtype)
            blk = self._block_entry(index, feats)
            blk.features, blk.submitted_at, blk.started = feats, submitted_at, start
            blk.timings["features"] = time.perf_counter() - start
            blk.timings["denoise_steps"] = []
            sess.blocks[index] = blk
        plan = sess.queue.next_iteration(admit)
        sess.plan.extend(plan)
        if (
            sess.sink_refresh
            and self.gen.config.sink
            and any(b == 0 and k == sess.steps - 1 for b, k in plan)
        ):
            sess.refresh_pending = True
        return True

    def _block_entry(self, index: int, features: torch.Tensor | None) -> _Block:
        gen = self.gen
        positions = torch.arange(index * self.frames, (index + 1) * self.frames, device=gen.device)
        return _Block(
            positions=positions,
            rope=gen.model.rotary(positions, gen.latent_h, gen.latent_w),
            audio_kv=audio_for(gen.model, features, self.layers),
        )

    def _schedule_one(self) -> bool:
        """Issue one ready forward, round-robin over sessions; False when none is ready."""
        for _ in range(len(self._order)):
            sid = self._order[0]
            self._order.rotate(-1)
            sess = self.sessions[sid]
            try:
                ready = self._ready(sess)
            except DiffstreamError as exc:  # bad audio: this session ends, the others go on
                index = sess.requests[0][0] if sess.requests else None
                self._drop(sid)
                self.out.send(error_message(sid, index, exc, drop=True))
                return True
            if ready:
                b, k = sess.plan.popleft()
                issue = Message("issue", {"session_id": sid, "block_index": b, "step": k})
                guarded(0, issue, self._issue, self._drop, self.out.send)
                return True
        return False

    def _issue(self, issue: Message) -> None:
        sid, b, k = (issue.meta[key] for key in ("session_id", "block_index", "step"))
        sess = self.sessions[sid]
        latent = sess.latents.pop(b)
        blk = sess.blocks[b]
        meta = {
            "session_id": sid,
            "block_index": b,
            "step": k,
            "issued": time.perf_counter(),
            "submitted_at": blk.submitted_at,
            "started": blk.started,
            "timings": blk.timings,
        }
        tensors = {"latent": latent}
        if k == 0 and blk.features is not None:
            tensors["features"] = blk.features
        self.forward(Message("fwd", meta, tensors))

    # ---- every rank: one forward through this rank's layers ---------------------------------------
    def forward(self, msg: Message) -> None:
        """One block's forward through this rank's layers; the hidden states (or, on the last
        rank, the stepped latent) are posted on without waiting (wire.Link, wait=False), so
        their transfer overlaps this rank's next forward.

        Not done: TokenWeave's token halves (send half A's hidden states while half B is still
        computed). Only the per-token parts of a layer could run per half: self-attention mixes
        every token of the block (and attends to the cached ones), so the next rank's first
        layer needs both halves before its attention, and this rank's last layer has both only
        after its own attention. What could overlap is the last layer's feed-forward on this
        rank and the norm and q/k/v projections of the next rank's first layer: a fraction of
        one layer per hop, for a forward split into pre-attention, attention and post-attention
        pieces in both models (models/dit.py, Live Avatar's). And the halves would not be
        bit-identical: a matmul over half the rows may pick other kernels and blocking than
        over all of them (oneDNN on the CPU, cuBLAS's heuristics on a GPU), so the frames would
        drift from the single-process engine's, which the equality tests pin. The whole-block
        send overlapped with the next block's forward keeps that equality.
        """
        start = time.perf_counter()
        m = msg.meta
        sid, b, k = m["session_id"], m["block_index"], m["step"]
        sess = self.sessions.get(sid)
        if sess is None:
            return  # closed or dropped while this block was in flight
        gen = self.gen
        hidden = msg.tensors.get("hidden")  # None on rank 0: it embeds the latent
        blk = sess.blocks.get(b)
        if blk is None:
            blk = sess.blocks[b] = self._block_entry(b, msg.tensors.get("features"))
        latent = msg.tensors["latent"]
        start_frame = b * self.frames
        plan, cache = sess.cache.block_plan(b, start_frame, gen.sink_position(start_frame, sess, k))
        sched = gen.schedule(sess.steps)
        t = torch.full((1,), sched.timesteps[k], device=gen.device)
        with torch.inference_mode():
            out = gen.model(
                latent,
                t,
                sess.context,
                frame_positions=blk.positions,
                audio=blk.audio_kv,
                plan=plan,
                rope=blk.rope,
                layers=self.layers,
                hidden=hidden,
            )
        sess.cache.store(b, cache)
        leaving = k == sess.steps - 1
        if leaving and not self.first:
            sess.blocks.pop(b, None)
        timings = dict(m.get("timings", {}))
        if not self.last:
            onward = {"latent": latent, "hidden": out}
            if msg.tensors.get("features") is not None:  # every later rank injects audio too
                onward["features"] = msg.tensors["features"]
            self.out.send(Message("fwd", dict(m, timings=timings), onward), wait=False)
            self.ctx.record(f"step{k}", sid, b, start)
            return
        with torch.inference_mode():
            latent = sched.euler(latent, out, k)
        step_s = time.perf_counter() - m.get("issued", start)  # rank 0's issue → Euler step here
        timings["denoise_steps"] = [*timings.get("denoise_steps", []), step_s]
        back = {"session_id": sid, "block_index": b, "step": k, "step_s": step_s}
        if leaving:
            timings["denoise"] = sum(timings["denoise_steps"])
            self.out.send(
                Message(
                    "block",
                    {
                        "session_id": sid,
                        "block_index": b,
                        "submitted_at": m.get("submitted_at", 0.0),
                        "started": m.get("started", start),
                        "timings": timings,
                    },
                    {"latent": latent},
                ),
                wait=False,
            )
            frame = {"frame": latent[:, :, :1].contiguous()} if b == 0 else {}
            self._ring(Message("left", back, frame))
        else:
            self._ring(Message("returned", back, {"latent": latent}))
        self.ctx.record(f"step{k}", sid, b, start)

    def _ring(self, msg: Message) -> None:
        """Last rank → rank 0 (a local hand-over when one rank holds every layer), posted
        without waiting: rank 0's ring receiver takes it while this rank goes on."""
        if self._ring_out is None:
            self.on_return(msg)
        else:
            self._ring_out.send(msg, wait=False)
