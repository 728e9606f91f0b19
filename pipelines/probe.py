"""A few layers of a model at its real widths, and one block's inputs, for timing and sizing.

Both the profiler (which times layer ranges on a real device) and the model's shape (which
traces the working memory of a forward on the meta device) build the same thing here:

    model:   4 layers [plain, audio, plain, plain], the real widths, embeddings and head
    block:   F noisy latent frames, a full history ring of W frames and the sink in the cache,
             the prompt's and the block's audio keys/values prepared once, as the engine does

The model is always built on the meta device first (nothing allocated) and, for a real device,
materialised there in the wanted dtype with random weights: speed does not depend on values,
and a 14B layer never passes through host memory on its way to a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines.model_shape import ModelShape

PROBE_LAYERS = 4
PROBE_AUDIO_LAYER = 1


def probe_config(shape: ModelShape, layers: int = PROBE_LAYERS) -> Any:
    """The model's config cut to `layers` layers, with audio at layer 1 when it has audio."""
    cfg = shape.config
    audio = (PROBE_AUDIO_LAYER,) if cfg.audio_layers else ()
    if shape.family == "s2v":
        return dataclasses.replace(cfg, num_layers=layers, audio_inject_layers=audio)
    return dataclasses.replace(cfg, num_layers=layers, audio_layers=audio)


def build_on_meta(shape: ModelShape, config: Any | None = None) -> nn.Module:
    """The transformer of `shape`'s family for `config` (default: the whole model), on meta."""
    config = config or shape.config
    with torch.device("meta"):
        if shape.family == "s2v":
            from models.s2v import LiveAvatarTransformer

            return LiveAvatarTransformer(config).eval()
        from models.dit import CausalWanTransformer

        return CausalWanTransformer(config).eval()


def materialize(
    model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """Meta model -> `device` in `dtype`, random weights drawn there (fan-in scaled, so the
    activations of a deep stack stay finite; norm weights one, biases zero)."""
    # nn.Module.to: diffusers' ModelMixin.to warns about float32-kept modules on a dtype cast
    model = nn.Module.to(model, dtype)
    if device.type == "meta":
        return model
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(max(1, p[0].numel())), generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model


@dataclass
class ProbeBlock:
    """One block's inputs for a probe model, prepared as the engine prepares them."""

    latent: torch.Tensor
    timestep: torch.Tensor
    context: Any  # PreparedContext
    audio: list | None
    plan: Any  # AttentionPlan reading history and sink
    rope: Any
    sink_source: Any  # what the sink pass runs on: a latent frame, or an S2VReference
    cache: Any  # the KVCache, history and sink filled with noise

    def forward(self, model: nn.Module, layers: range, hidden: torch.Tensor | None = None) -> Any:
        return model(
            self.latent,
            self.timestep,
            self.context,
            audio=self.audio,
            plan=self.plan,
            rope=self.rope,
            layers=layers,
            hidden=hidden if layers.start > 0 else None,
        )

    def sink_pass(self, model: nn.Module) -> Any:
        """The once-per-session pass that writes the sink's keys/values (every layer)."""
        from models.dit import AttentionPlan

        plan = AttentionPlan(cache=self.cache, store_sink=True)
        if hasattr(model, "sink_forward"):
            return model.sink_forward(self.sink_source, self.context, plan)
        t = torch.zeros(1, device=self.latent.device)
        pos = torch.zeros(1, dtype=torch.long, device=self.latent.device)
        return model(self.sink_source, t, self.context, frame_positions=pos, plan=plan)


def audio_features(shape: ModelShape, frames: int, device: Any, dtype: torch.dtype) -> Any:
    """Random audio features of a block of `frames` latent frames, in the layout the model's
    prepare_audio takes (None without audio)."""
    cfg = shape.config
    if not cfg.audio_layers:
        return None
    if shape.family == "s2v":  # wav2vec2 hidden states per video frame
        n = shape.temporal_factor * frames
        return torch.randn(1, n, cfg.audio_feature_layers, cfg.audio_dim, device=device)
    return torch.randn(1, frames, shape.audio_tokens, cfg.audio_dim, device=device, dtype=dtype)


def probe_block(
    model: nn.Module, shape: ModelShape, device: Any, dtype: torch.dtype, layers: int
) -> ProbeBlock:
    """A steady-state block of `shape`'s size (the probe's: frames, window, grid): history and
    sink present, prompt and audio prepared."""
    from models.dit import AttentionPlan
    from models.kv_cache import KVCache

    cfg = shape.config
    f, window = shape.frames_per_block, shape.window_frames
    h, w = shape.latent_hw
    latent = torch.randn(1, cfg.in_channels, f, h, w, device=device, dtype=dtype)
    context = model.prepare_context(
        torch.randn(1, shape.text_tokens, cfg.text_dim, device=device, dtype=dtype)
    )
    feats = audio_features(shape, f, device, dtype)
    audio = model.prepare_audio(feats) if feats is not None else None
    cache = KVCache.allocate(
        layers=layers,
        batch=1,
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        tokens_per_frame=shape.tokens_per_frame,
        window_frames=window,
        sink_frames=1,
        sink_tokens=shape.sink_tokens,
        frames_per_block=f,
        device=device,
        dtype=dtype,
    )
    for t in cache.tensors():
        t.normal_()
    cache.filled_frames, cache.has_sink = window, True
    rope = model.rotary(torch.arange(window, window + f, device=device), h, w)
    plan = AttentionPlan(cache=cache, read_history=True, sink_position=window + 3)
    if shape.family == "s2v":
        from models.s2v import MOTION_BUCKETS, S2VReference

        ref = torch.randn(1, cfg.in_channels, 1, h, w, device=device, dtype=dtype)
        motion = torch.randn(1, cfg.in_channels, sum(MOTION_BUCKETS), h, w, device=device)
        sink_source: Any = S2VReference(reference=ref, motion=motion.to(dtype))
    else:
        sink_source = torch.randn(1, cfg.in_channels, 1, h, w, device=device, dtype=dtype)
    return ProbeBlock(
        latent=latent,
        timestep=torch.full((1,), 500.0, device=device),
        context=context,
        audio=audio,
        plan=plan,
        rope=rope,
        sink_source=sink_source,
        cache=cache,
    )
