"""Causal Wan 2.1-layout diffusion transformer for block-wise streaming generation.

The architecture and parameter names are those of diffusers' `WanTransformer3DModel` (3-D patch
embedding, timestep embedding with adaptive modulation, self-attention with RMS q/k norm and 3-D
rotary positions, cross-attention to condition tokens, GELU FFN), so a diffusers state dict loads
with the identity key map. What is added for streaming:

* rotary positions are passed explicitly per call (`frame_positions`), so a block, its cached
  history and the sink can sit at any temporal index, however long the stream runs;
* self-attention reads extra keys/values from a `KVCache` (sink + ring buffer) and can write the
  block's own keys/values into it, as an `AttentionPlan` says;
* optional audio conditioning: frame-aligned cross-attention to audio tokens at chosen layers
  (zero-initialised output, so a pretrained video model starts unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import WanConfig
from models.errors import ConfigError
from models.kv_cache import KVCache


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (as Wan does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProjection(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """cos/sin timestep features (cos first), as Wan's `Timesteps(flip_sin_to_cos=True)`."""
    half = dim // 2
    exponent = (
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int, text_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = TextProjection(text_dim, dim)

    def time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [N] → (temb [N, D], modulation [N, 6, D]), both float32."""
        feats = sinusoidal_embedding(timestep.flatten(), self.freq_dim)
        feats = feats.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(feats).float()
        mod = self.time_proj(F.silu(temb).to(self.time_proj.weight.dtype)).float()
        return temb, mod.unflatten(1, (6, -1))


@dataclass
class RotaryEmbedding:
    """cos/sin of shape [1, tokens, 1, head_dim/2] (float32) for a set of token positions."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved channel pairs of x [B, N, H, Dh]."""
        pairs = x.float().unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x1 * self.cos - x2 * self.sin, x1 * self.sin + x2 * self.cos], dim=-1)
        return out.flatten(-2).to(x.dtype)


class RotaryPositions(nn.Module):
    """3-D rotary frequencies split over (t, h, w) as Wan does, computed for explicit positions.

    Angles are computed in float64 from integer positions, so a frame at index 10^5 is rotated
    as accurately as frame 3: relative geometry is exact however long the stream.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.h_dim = self.w_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - self.h_dim - self.w_dim
        self.theta = theta

    def _inv_freq(self, dim: int, device: torch.device) -> torch.Tensor:
        return 1.0 / (
            self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        )

    def forward(self, frame_positions: torch.Tensor, height: int, width: int) -> RotaryEmbedding:
        device = frame_positions.device
        return self.grid(
            frame_positions,
            torch.arange(height, device=device),
            torch.arange(width, device=device),
        )

    def angles(self, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Rotation angles [F*H*W, head_dim/2] (float64) of the tokens of a (frames x rows x
        cols) grid, frame-major, for any integer positions (negative and sparse ones included:
        Live Avatar's packed motion tokens sit at such positions)."""
        t_ang = frames.to(torch.float64)[:, None] * self._inv_freq(self.t_dim, frames.device)[None]
        h_ang = rows.to(torch.float64)[:, None] * self._inv_freq(self.h_dim, rows.device)[None]
        w_ang = cols.to(torch.float64)[:, None] * self._inv_freq(self.w_dim, cols.device)[None]
        nf, nh, nw = t_ang.shape[0], h_ang.shape[0], w_ang.shape[0]
        return torch.cat(
            [
                t_ang[:, None, None].expand(nf, nh, nw, -1),
                h_ang[None, :, None].expand(nf, nh, nw, -1),
                w_ang[None, None, :].expand(nf, nh, nw, -1),
            ],
            dim=-1,
        ).reshape(nf * nh * nw, -1)

    def grid(self, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> RotaryEmbedding:
        ang = self.angles(frames, rows, cols)[None, :, None]
        return RotaryEmbedding(cos=ang.cos().float(), sin=ang.sin().float())


class Attention(nn.Module):
    """Multi-head attention with RMS norm over all heads' q and k (Wan's qk norm)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, kv_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim or dim, inner)
        self.to_v = nn.Linear(kv_dim or dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, self.head_dim))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.to_k(x)).unflatten(-1, (self.heads, self.head_dim))
        v = self.to_v(x).unflatten(-1, (self.heads, self.head_dim))
        return k, v

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](x.flatten(-2))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA on [B, N, H, Dh] tensors (flash kernels on GPU when the layout allows)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


@dataclass
class AttentionPlan:
    """How one forward uses a KVCache; built by the pipeline, read by every layer.

    read_history: attend to the cache's filled ring. sink_position: temporal index the unrotated
    sink keys are rotated to (None: no sink). write_start: absolute frame index at which the
    block's rotated keys/values are written into the ring (None: no write). store_sink: store
    this forward's *unrotated* keys/values as the sink. mask: an explicit boolean mask over
    (block tokens × block tokens), used only by the uncached reference forward. layer_offset:
    the cache holds layers from this index on, so a rank that runs a slice of the layers
    (DualParal) keeps caches for its own layers only. write_index: the ring slots to write, as
    a tensor (KVCache.ring_index), used instead of write_start by the generator, so that a
    compiled step sees the position as data and never recompiles for it.
    """

    cache: KVCache | None = None
    read_history: bool = False
    sink_position: int | None = None
    write_start: int | None = None
    store_sink: bool = False
    mask: torch.Tensor | None = None
    layer_offset: int = 0
    write_index: torch.Tensor | None = None


def cached_attention(
    q: torch.Tensor,
    k_raw: torch.Tensor,
    v: torch.Tensor,
    rope: RotaryEmbedding,
    sink_rope: RotaryEmbedding | None,
    plan: AttentionPlan,
    layer: int,
) -> torch.Tensor:
    """Self-attention of a block's tokens over the sink, the cached history and themselves.

    q: rotated queries; k_raw: unrotated keys; v: values, all [B, N, H, Dh]. Reads the sink
    (rotated to its position now) and the ring as `plan` says, then writes the block's rotated
    keys into the ring and/or its unrotated keys as the sink. Every transformer family of the
    project (Wan 2.1 layout, Live Avatar's S2V layout) runs its self-attention through here.
    """
    k = rope.apply(k_raw)
    cache = plan.cache
    slot = layer - plan.layer_offset  # this layer's index inside the cache
    keys, values = [k], [v]
    if cache is not None:
        if plan.read_history and cache.filled_frames:
            hk, hv = cache.history(slot)
            keys.insert(0, hk)
            values.insert(0, hv)
        if sink_rope is not None and cache.has_sink:
            keys.insert(0, sink_rope.apply(cache.sink_keys[slot]))
            values.insert(0, cache.sink_values[slot])
    k_all = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)
    v_all = values[0] if len(values) == 1 else torch.cat(values, dim=1)
    mask = plan.mask
    if mask is not None and k_all.shape[1] != mask.shape[-1]:
        extra = k_all.shape[1] - mask.shape[-1]
        mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=-1)
    out = attend(q, k_all, v_all, mask)
    if cache is not None:
        if plan.store_sink:
            cache.write_sink(slot, k_raw, v)
        if plan.write_index is not None:
            cache.write_at(slot, plan.write_index, k, v)
        elif plan.write_start is not None:
            cache.write(slot, plan.write_start, k, v)
    return out


class TransformerBlock(nn.Module):
    def __init__(self, cfg: WanConfig, audio: bool) -> None:
        super().__init__()
        dim, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, hd, cfg.eps)
        self.attn2 = Attention(dim, heads, hd, cfg.eps)
        self.norm2 = (
            FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)
            if cfg.cross_attn_norm
            else nn.Identity()
        )
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.audio_norm: nn.Module | None = None
        self.audio_attn: Attention | None = None
        if audio:
            self.audio_norm = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)
            self.audio_attn = Attention(dim, heads, hd, cfg.eps)
            nn.init.zeros_(self.audio_attn.to_out[0].weight)
            nn.init.zeros_(self.audio_attn.to_out[0].bias)

    def self_attention(
        self,
        x: torch.Tensor,
        layer: int,
        rope: RotaryEmbedding,
        sink_rope: RotaryEmbedding | None,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        a = self.attn1
        k_raw, v = a.key_value(x)
        out = cached_attention(rope.apply(a.query(x)), k_raw, v, rope, sink_rope, plan, layer)
        return a.out(out)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        mod: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        rope: RotaryEmbedding,
        sink_rope: RotaryEmbedding | None,
        plan: AttentionPlan,
        audio_kv: tuple[torch.Tensor, torch.Tensor] | None,
        frames: int,
    ) -> torch.Tensor:
        if mod.ndim == 3:  # one timestep per sample: [B, 6, D]
            parts = (self.scale_shift_table + mod).chunk(6, dim=1)
        else:  # one timestep per token: [B, N, 6, D]
            parts = [p.squeeze(2) for p in (self.scale_shift_table[None] + mod).chunk(6, dim=2)]
        shift, scale, gate, c_shift, c_scale, c_gate = parts

        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.self_attention(h, layer, rope, sink_rope, plan) * gate).type_as(x)

        h = self.norm2(x.float()).type_as(x)
        q = self.attn2.query(h)
        x = x + self.attn2.out(attend(q, *context_kv))

        if self.audio_attn is not None and audio_kv is not None:
            # Frame-aligned: tokens of latent frame f attend only to audio tokens of frame f.
            b, n, d = x.shape
            h = self.audio_norm(x.float()).type_as(x).reshape(b * frames, n // frames, d)
            q = self.audio_attn.query(h)
            o = self.audio_attn.out(attend(q, *audio_kv))
            x = x + o.reshape(b, n, d)

        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        x = (x.float() + self.ffn(h).float() * c_gate).type_as(x)
        return x


@dataclass
class PreparedContext:
    """Per-layer cross-attention keys/values of a session's condition tokens, computed once."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]


class CausalWanTransformer(nn.Module):
    """Wan 2.1 DiT with explicit positions, a KV cache and optional audio cross-attention."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = config.validate()
        cfg = self.config
        dim = cfg.inner_dim
        self.rope = RotaryPositions(cfg.attention_head_dim, cfg.rope_theta)
        self.patch_embedding = nn.Conv3d(
            cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.condition_embedder = ConditionEmbedder(dim, cfg.freq_dim, cfg.text_dim)
        audio_layers = set(cfg.audio_layers)
        self.blocks = nn.ModuleList(
            [TransformerBlock(cfg, audio=i in audio_layers) for i in range(cfg.num_layers)]
        )
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.audio_embedder: TextProjection | None = (
            TextProjection(cfg.audio_dim, dim) if audio_layers else None
        )

    # ---- shapes -------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) → token grid; ConfigError when the patch does not divide it."""
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw:
            raise ConfigError(
                f"latent size {height}x{width} is not divisible by the patch size {ph}x{pw}"
            )
        return height // ph, width // pw

    def tokens_per_frame(self, height: int, width: int) -> int:
        gh, gw = self.grid(height, width)
        return gh * gw

    # ---- conditions, computed once per session --------------------------------------------
    def prepare_context(
        self, context: torch.Tensor, layers: range | None = None
    ) -> PreparedContext:
        """Project condition tokens [B, L, text_dim] to per-layer cross-attention K/V (for
        `layers` only, None elsewhere: a DualParal rank holds only its own)."""
        ctx = self.condition_embedder.text_embedder(context.to(self.proj_out.weight.dtype))
        layers = range(len(self.blocks)) if layers is None else layers
        return PreparedContext(
            kv=[
                blk.attn2.key_value(ctx) if i in layers else None
                for i, blk in enumerate(self.blocks)
            ]
        )

    def prepare_audio(
        self, audio: torch.Tensor, layers: range | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Audio tokens [B, F, A, audio_dim] → per-layer K/V of shape [B*F, A, H, Dh]."""
        if self.audio_embedder is None:
            return [None] * len(self.blocks)
        layers = range(len(self.blocks)) if layers is None else layers
        tokens = self.audio_embedder(audio.to(self.proj_out.weight.dtype)).flatten(0, 1)
        return [
            blk.audio_attn.key_value(tokens)
            if i in layers and getattr(blk, "audio_attn", None) is not None
            else None
            for i, blk in enumerate(self.blocks)
        ]

    def rotary(self, frame_positions: torch.Tensor, height: int, width: int) -> RotaryEmbedding:
        gh, gw = self.grid(height, width)
        return self.rope(frame_positions, gh, gw)

    def sink_rotary(
        self, position: int, height: int, width: int, device: torch.device, sink_frames: int = 1
    ) -> RotaryEmbedding:
        """The sink's rotation: its frame(s) at temporal `position`. torch.full fills on the
        device; torch.tensor([...]) would be a synchronous copy from the host."""
        gh, gw = self.grid(height, width)
        return self.rope(torch.full((max(1, sink_frames),), position, device=device), gh, gw)

    # ---- forward -----------------------------------------------------------------------
    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | PreparedContext,
        *,
        frame_positions: torch.Tensor | None = None,
        audio: torch.Tensor | list | None = None,
        plan: AttentionPlan | None = None,
        rope: RotaryEmbedding | None = None,
        layers: range | None = None,
        hidden: torch.Tensor | None = None,
        sink_rope: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity of `latent` [B, C, F, h, w].

        timestep: [B] (one per sample) or [B, F] (one per latent frame). context: condition
        tokens [B, L, text_dim] or their PreparedContext. audio: [B, F, A, audio_dim] tokens or
        the list from prepare_audio. plan: how self-attention uses a KVCache (default: none).
        layers/hidden: run only a contiguous range of layers starting from `hidden` (DualParal
        splits layers over ranks); the first range embeds, the last one projects out.
        rope/sink_rope: the block's and the sink's rotations when the caller made them (the
        generator does, outside a compiled step: positions there are data, not constants).
        """
        cfg = self.config
        b, _, nf, h, w = latent.shape
        gh, gw = self.grid(h, w)
        plan = plan or AttentionPlan()
        if rope is None:
            if frame_positions is None:
                frame_positions = torch.arange(nf, device=latent.device)
            rope = self.rope(frame_positions, gh, gw)
        if sink_rope is None and plan.sink_position is not None:
            n_sink = plan.cache.sink_frames if plan.cache is not None else 1
            sink_rope = self.sink_rotary(plan.sink_position, h, w, latent.device, n_sink)
        if not isinstance(context, PreparedContext):
            context = self.prepare_context(context)
        audio_kv = audio if isinstance(audio, list) else None
        if audio is not None and audio_kv is None:
            audio_kv = self.prepare_audio(audio)
        layers = layers or range(len(self.blocks))

        temb, mod = self.condition_embedder.time(timestep)
        tokens = gh * gw
        if timestep.ndim == 2:  # per-frame timesteps → per-token modulation
            temb = temb.unflatten(0, (b, nf)).repeat_interleave(tokens, dim=1)
            mod = mod.unflatten(0, (b, nf)).repeat_interleave(tokens, dim=1)

        if layers.start == 0:
            x = self.patch_embedding(latent.to(self.patch_embedding.weight.dtype))
            x = x.flatten(2).transpose(1, 2).contiguous()
        else:
            assert hidden is not None, "a layer range after the first needs `hidden`"
            x = hidden
        for i in layers:
            x = self.blocks[i](
                x,
                i,
                mod,
                context.kv[i],
                rope,
                sink_rope,
                plan,
                audio_kv[i] if audio_kv is not None else None,
                nf,
            )
        if layers.stop < len(self.blocks):
            return x

        if temb.ndim == 2:
            shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        else:
            shift, scale = [
                p.squeeze(2)
                for p in (self.scale_shift_table[None] + temb[:, :, None]).chunk(2, dim=2)
            ]
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        pt, ph, pw = cfg.patch_size
        x = x.reshape(b, nf, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
