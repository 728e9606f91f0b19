"""The staggered block schedule of DualParal, its per-rank feature cache, and a single-process
reference of the whole schedule (what the distributed executor must reproduce).

Schedule. A session's queue holds up to S blocks one noise level apart. Each *iteration* every
queued block advances one denoising step, head (most denoised) first; a new block enters the tail
at step 0 when its audio has arrived, and the head leaves clean after its step S-1:

    iteration i:  (block i-S+1, step S-1) (block i-S+2, step S-2) … (block i, step 0)

Attention. Block b attends to the sink, to itself, and to the keys/values of its H = W/F previous
blocks *as they are now*: b-1 was just advanced one step further in this same iteration (head
first), b-2 two steps further, and blocks that already left hold the keys/values of their last
step. That is causal (a block never sees a later one), and it is local: the keys/values a layer
needs were computed by that same layer, on the rank that owns it, a moment earlier. So a rank's
`FeatureCache` holds only its own layers' keys/values of the last few blocks, and only the
current block's hidden states travel between ranks.

Sink refresh (optional): when block 0 has left, the sink is rebuilt from its first clean frame
before the next iteration starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.dit import AttentionPlan, CausalWanTransformer, PreparedContext
from models.errors import ConfigError
from models.kv_cache import KVCache
from models.transfer import to_device
from pipelines.executors.stages import encode_audio
from pipelines.generator import StreamingGenerator
from pipelines.noise import BlockNoise


def split_layers(layers: int, ranks: int) -> list[range]:
    """Contiguous layer ranges, as even as possible (the first ranks take the remainder)."""
    if ranks < 1 or layers < ranks:
        raise ConfigError(
            f"cannot split {layers} transformer layers over {ranks} ranks: every rank needs at "
            "least one layer (use fewer devices)"
        )
    base, extra = divmod(layers, ranks)
    out, start = [], 0
    for r in range(ranks):
        n = base + (1 if r < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class StaggeredQueue:
    """One session's queue of blocks one noise level apart (plain CPU bookkeeping)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.next_block = 0
        self._queued: list[tuple[int, int]] = []  # (block, step) of the next iteration, head first

    def __len__(self) -> int:
        return len(self._queued)

    def next_iteration(self, admit: bool) -> list[tuple[int, int]]:
        """The (block, step) forwards of the next iteration, head first; `admit` lets the next
        block enter the tail at step 0. A block whose step is S-1 here leaves after it."""
        if admit:
            self._queued.append((self.next_block, 0))
            self.next_block += 1
        plan = list(self._queued)
        self._queued = [(b, k + 1) for b, k in plan if k + 1 < self.steps]
        return plan


class _WindowCache(KVCache):
    """A KVCache view for one forward: history = the selected blocks' keys/values, and writes
    are captured (not stored in a ring) so the caller files them under the block's index."""

    captured: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.captured[layer] = (k, v)


@dataclass
class FeatureCache:
    """One session's keys/values on one rank, for that rank's layers only."""

    sink: KVCache  # window 0, sink_frames 1; layer index = model layer - layers.start
    layers: range
    tokens_per_frame: int
    frames_per_block: int
    history_blocks: int
    steps: int
    blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def allocate(
        cls,
        model: CausalWanTransformer,
        layers: range,
        *,
        tokens_per_frame: int,
        frames_per_block: int,
        window_frames: int,
        steps: int,
        device: torch.device,
        dtype: torch.dtype,
        latent_hw: tuple[int, int] | None = None,
    ) -> FeatureCache:
        cfg = model.config
        sink_tokens = getattr(model, "sink_tokens", None)
        sink = KVCache.allocate(
            layers=len(layers),
            batch=1,
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            tokens_per_frame=tokens_per_frame,
            window_frames=0,
            sink_frames=1,
            sink_tokens=sink_tokens(*latent_hw) if sink_tokens and latent_hw else None,
            frames_per_block=frames_per_block,
            device=device,
            dtype=dtype,
        )
        return cls(
            sink=sink,
            layers=layers,
            tokens_per_frame=tokens_per_frame,
            frames_per_block=frames_per_block,
            history_blocks=window_frames // frames_per_block,
            steps=steps,
        )

    def sink_plan(self) -> AttentionPlan:
        return AttentionPlan(cache=self.sink, store_sink=True, layer_offset=self.layers.start)

    def block_plan(
        self, block: int, start_frame: int, sink_position: int | None
    ) -> tuple[AttentionPlan, _WindowCache]:
        """The attention plan of one forward of `block`, reading its history blocks' latest
        keys/values; the block's own keys/values are captured in the returned cache."""
        hist = [b for b in range(block - self.history_blocks, block) if b in self.blocks]
        s = self.sink
        if hist:
            keys = torch.cat([self.blocks[b][0] for b in hist], dim=2)
            values = torch.cat([self.blocks[b][1] for b in hist], dim=2)
        else:
            keys = s.keys
            values = s.values  # empty rings
        frames = len(hist) * self.frames_per_block
        cache = _WindowCache(
            keys=keys,
            values=values,
            sink_keys=s.sink_keys,
            sink_values=s.sink_values,
            tokens_per_frame=self.tokens_per_frame,
            window_frames=frames,
            sink_frames=1,
            filled_frames=frames,
            has_sink=s.has_sink,
        )
        cache.captured = {}
        plan = AttentionPlan(
            cache=cache,
            read_history=True,
            sink_position=sink_position,
            write_start=start_frame,
            layer_offset=self.layers.start,
        )
        return plan, cache

    def store(self, block: int, cache: _WindowCache) -> None:
        """File the block's freshly computed keys/values; forget blocks no one can read again
        (every queued block is within S of this one, and reads at most H blocks back)."""
        n = len(self.layers)
        keys = torch.stack([cache.captured[i][0] for i in range(n)])
        values = torch.stack([cache.captured[i][1] for i in range(n)])
        self.blocks[block] = (keys, values)
        oldest = block - self.steps - self.history_blocks + 1
        for b in [b for b in self.blocks if b < oldest]:
            del self.blocks[b]

    def nbytes(self) -> int:
        total = self.sink.nbytes
        for k, v in self.blocks.values():
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
        return total


def context_for(model: Any, tokens: torch.Tensor, layers: range) -> PreparedContext:
    """Cross-attention keys/values of the condition tokens, for `layers` only."""
    with torch.inference_mode():
        return model.prepare_context(tokens, layers)


def audio_for(model: Any, features: torch.Tensor | None, layers: range) -> list | None:
    """Audio keys/values (and whatever else the model's injection needs) of one block, for
    `layers` only."""
    if features is None or not model.config.audio_layers:
        return None
    with torch.inference_mode():
        return model.prepare_audio(features, layers)


def keep_layers(model: CausalWanTransformer, layers: range) -> CausalWanTransformer:
    """Drop every transformer block outside `layers` (before the model reaches the device), so a
    rank holds 1/R of the weights. Embedding and head stay: they are small."""
    for i in range(len(model.blocks)):
        if i not in layers:
            model.blocks[i] = nn.Identity()
    return model


# ---------------------------------------------------------------------------------------------
# Single-process reference
# ---------------------------------------------------------------------------------------------


@dataclass
class StaggeredSession:
    session_id: str
    cache: FeatureCache
    context: PreparedContext
    noise: BlockNoise
    audio_state: Any
    vae_state: Any
    steps: int
    sink_refresh: bool
    queue: StaggeredQueue


class StaggeredReference:
    """The DualParal schedule on one device with all layers: the executor's equivalence target.

    Deliberately plain: a loop over iterations, a loop over the queue, one full forward each.
    """

    def __init__(self, gen: StreamingGenerator) -> None:
        self.gen = gen

    def new_session(
        self,
        reference: np.ndarray,
        *,
        session_id: str = "session",
        seed: int = 0,
        steps: int | None = None,
        sink_refresh: bool = False,
    ) -> StaggeredSession:
        gen = self.gen
        steps = steps or gen.config.steps
        model = gen.model
        layers = range(len(model.blocks))
        cfg = gen.config
        cache = FeatureCache.allocate(
            model,
            layers,
            tokens_per_frame=gen.tokens_per_frame,
            frames_per_block=cfg.frames_per_block,
            window_frames=cfg.window_frames,
            steps=steps,
            device=gen.device,
            dtype=gen.dtype,
        )
        session = StaggeredSession(
            session_id=session_id,
            cache=cache,
            context=context_for(model, gen._context_tokens.to(gen.device, gen.dtype), layers),
            noise=BlockNoise(
                (1, model.config.in_channels, cfg.frames_per_block, gen.latent_h, gen.latent_w),
                seed,
                cfg.coordinated_noise,
            ),
            audio_state=gen.audio_encoder.new_state() if gen.audio_encoder is not None else None,
            vae_state=gen.vae.new_state(),
            steps=steps,
            sink_refresh=sink_refresh,
            queue=StaggeredQueue(steps),
        )
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(reference)).to(gen.device)
            image = image.permute(2, 0, 1)[None].to(gen.dtype) / 127.5 - 1.0
            ref_latent = gen.vae.encode_image(image).to(gen.dtype)
        if cfg.sink:
            self._store_sink(session, ref_latent)
        return session

    def _store_sink(self, session: StaggeredSession, latent: torch.Tensor) -> None:
        gen = self.gen
        t = torch.full((1,), gen.config.context_timestep, device=gen.device)
        with torch.inference_mode():
            gen.model(
                latent,
                t,
                session.context,
                frame_positions=torch.zeros(1, dtype=torch.long, device=gen.device),
                plan=session.cache.sink_plan(),
            )

    def generate(
        self, session: StaggeredSession, audio: list[np.ndarray]
    ) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Run the schedule over all blocks (block i enters at iteration i), then drain; returns
        (clean latent, frames) per block in order."""
        gen = self.gen
        sched = gen.schedule(session.steps)
        f = gen.config.frames_per_block
        latents: dict[int, torch.Tensor] = {}
        conditions: dict[int, Any] = {}
        out: list[tuple[torch.Tensor, np.ndarray]] = []
        queue = session.queue
        while queue.next_block < len(audio) or len(queue):
            admit = queue.next_block < len(audio)
            if admit:
                b = queue.next_block
                feats = encode_audio(gen, session, audio[b], b)
                latents[b] = to_device(session.noise.next(), gen.device, gen.dtype)
                positions = torch.arange(b * f, (b + 1) * f, device=gen.device)
                conditions[b] = (
                    positions,
                    gen.model.rotary(positions, gen.latent_h, gen.latent_w),
                    audio_for(gen.model, feats, range(len(gen.model.blocks))),
                )
            left = None
            for b, k in queue.next_iteration(admit):
                positions, rope, audio_kv = conditions[b]
                plan, cache = session.cache.block_plan(b, b * f, gen.sink_position(b * f))
                t = torch.full((1,), sched.timesteps[k], device=gen.device)
                with torch.inference_mode():
                    v = gen.model(
                        latents[b],
                        t,
                        session.context,
                        frame_positions=positions,
                        audio=audio_kv,
                        plan=plan,
                        rope=rope,
                    )
                    latents[b] = sched.euler(latents[b], v, k)
                session.cache.store(b, cache)
                if k == session.steps - 1:
                    clean = latents.pop(b)
                    conditions.pop(b)
                    with torch.inference_mode():
                        frames = gen.vae.to_uint8(gen.vae.decode_block(clean, session.vae_state))
                    out.append((clean.float().clone(), frames))
                    left = (b, clean)
            if left is not None and left[0] == 0 and session.sink_refresh and gen.config.sink:
                self._store_sink(session, left[1][:, :, :1])
        return out
