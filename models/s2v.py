"""Live Avatar's transformer: Wan2.2-S2V-14B's layout, run block-causally for streaming.

Parameter names are those of the released checkpoint (`blocks.{i}.self_attn.q`,
`blocks.{i}.modulation`, `head.head`, `casual_audio_encoder.*`, `audio_injector.*`,
`frame_packer.*`, `trainable_cond_mask`), so its safetensors load with the identity key map.
Attention, rotary positions and the KV ring cache are the ones of models/dit.py.

Tokens of one streaming forward (one block of F latent frames, h x w patches per frame):

    query:  [ block: F*h*w noisy tokens, modulated at timestep t, type 0 ]
    keys:   [ sink ][ history ring: the last W latent frames ][ the block itself ]
    sink:   [ reference: h*w tokens, type 1 ][ motion: packed 1x + 2x + 4x tokens, type 2 ]

The sink is computed once per session by `sink_forward` (reference and packed motion latents
through every layer at the zero timestep, attending only to each other) and kept as unrotated
keys/values. At every forward the reference part is rotated to temporal position P (the
pipeline's rolling sink position, a fixed distance ahead of the block) while the motion tokens
keep their fixed negative positions, as upstream's rollout does. After every layer listed in
`audio_inject_layers` an audio cross-attention adds the block's audio tokens frame by frame.

Upstream numerics kept on purpose (they change outputs, so equality needs them): rotary cos/sin
rounded to float16, the cross-attention input rounded to bfloat16 before its LayerNorm, the
block's residual stream in float32 inside a layer and in the model dtype between layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.dit import (
    AttentionPlan,
    PreparedContext,
    RotaryEmbedding,
    RotaryPositions,
    attend,
    cached_attention,
)
from models.errors import ConfigError

LIVE_AVATAR_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
MOTION_BUCKETS = (1, 2, 16)  # latent frames packed 1x, 2x and 4x (nearest first)


@dataclass
class S2VConfig:
    """Hyperparameters as the released config.json names them (WanModel_S2V)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    cond_dim: int = 16
    audio_dim: int = 1024
    audio_feature_layers: int = 25  # wav2vec2 hidden states weighted by the audio encoder
    num_audio_token: int = 4
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    audio_inject_layers: tuple[int, ...] = LIVE_AVATAR_INJECT_LAYERS
    zero_timestep: bool = True
    enable_motioner: bool = False
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"
    add_last_motion: bool = True
    enable_tsm: bool = False
    model_type: str = "s2v"
    rope_theta: float = 10000.0
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- the names the pipeline and the executors use for every model family ----------------
    @property
    def in_channels(self) -> int:
        return self.in_dim

    @property
    def out_channels(self) -> int:
        return self.out_dim

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def attention_head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def inner_dim(self) -> int:
        return self.dim

    @property
    def audio_layers(self) -> tuple[int, ...]:
        return tuple(self.audio_inject_layers)

    def validate(self) -> S2VConfig:
        if self.model_type != "s2v":
            raise ConfigError(
                f"model_type is {self.model_type!r}, not 's2v': this is not a Wan2.2-S2V config"
            )
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise ConfigError(
                f"patch_size must be (1, ph, pw) for block-causal generation, got {self.patch_size}"
            )
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ConfigError(f"dim {self.dim} must split into {self.num_heads} even-sized heads")
        if self.dim // self.num_heads < 6:
            raise ConfigError("head size must be at least 6 (rotary dims split over t, h, w)")
        if self.dim % 4 or self.dim % self.num_audio_token:
            raise ConfigError(f"dim {self.dim} must be divisible by 4 and by num_audio_token")
        bad = [i for i in self.audio_inject_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"audio_inject_layers {bad} are outside the {self.num_layers} layers")
        unsupported = {
            "enable_motioner": self.enable_motioner,
            "enable_framepack": not self.enable_framepack,
            "zero_timestep": not self.zero_timestep,
            "enable_tsm": self.enable_tsm,
        }
        off = [k for k, v in unsupported.items() if v]
        if off or (self.enable_adain and self.adain_mode != "attn_norm"):
            raise ConfigError(
                f"this S2V config uses {off or ['adain_mode=' + self.adain_mode]}, which Live "
                "Avatar's release does not; only frame-pack motion, zero-timestep references and "
                "attn_norm AdaIN are supported"
            )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> S2VConfig:
        """From the released config.json; keys this port does not use are kept in `extra`."""
        import dataclasses

        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif not key.startswith("_"):
                extra[key] = value
        for key in ("patch_size", "audio_inject_layers"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        try:
            return cls(**kwargs, extra=extra).validate()
        except TypeError as exc:
            raise ConfigError(f"invalid S2V config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        out["patch_size"] = list(self.patch_size)
        out["audio_inject_layers"] = list(self.audio_inject_layers)
        return {**extra, **out}


@dataclass
class S2VReference:
    """What a session's sink is built from: the reference frame's latent [1, C, 1, h, w] and the
    motion latents [1, C, T, h, w] (the reference repeated, as Live Avatar starts a stream)."""

    reference: torch.Tensor
    motion: torch.Tensor

    def with_reference(self, frame: torch.Tensor) -> S2VReference:
        """Live Avatar's sink update: a generated frame replaces the reference, motion stays."""
        return S2VReference(reference=frame[:, :, :1], motion=self.motion)

    def to_message(self) -> dict[str, torch.Tensor]:
        """The part a denoise rank needs (the frame packer reads only the newest motion
        latents), as tensors for a pipeline message."""
        return {
            "reference": self.reference.contiguous(),
            "motion": self.motion[:, :, -sum(MOTION_BUCKETS) :].contiguous(),
        }

    @classmethod
    def from_message(cls, tensors: dict[str, torch.Tensor]) -> S2VReference:
        return cls(reference=tensors["reference"], motion=tensors["motion"])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> S2VReference:
        return S2VReference(
            self.reference.to(device=device, dtype=dtype),
            self.motion.to(device=device, dtype=dtype),
        )


# ---- small layers with upstream's names and numerics -------------------------------------------
class WanRMSNorm(nn.Module):
    """RMS norm computed in float32, rounded to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm in float32, rounded once to the input dtype (what the CPU and CUDA kernels do
    for a bfloat16 input)."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


class AffineLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.eps, self.weight, self.bias)


class WanAttention(nn.Module):
    """q/k/v/o projections with RMS-normalised queries and keys, in the released key layout."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.q(x)).unflatten(-1, (self.heads, self.head_dim))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.k(x)).unflatten(-1, (self.heads, self.head_dim))
        return k, self.v(x).unflatten(-1, (self.heads, self.head_dim))

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x.flatten(-2))


class S2VBlock(nn.Module):
    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = AffineLayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        rope: RotaryEmbedding,
        sink_rope: RotaryEmbedding | None,
        plan: AttentionPlan,
        layer: int,
    ) -> torch.Tensor:
        """x [B, N, D] in the model dtype; mod [B, N, 6, D] float32 (timestep modulation per
        token, before this block's own table is added)."""
        dtype = x.dtype
        m = (self.modulation[:, None] + mod).unbind(dim=2)  # float32
        h = layer_norm(x, self.eps).float() * (1 + m[1]) + m[0]
        a = self.self_attn
        k_raw, v = a.key_value(h.to(dtype))
        q = rope.apply(a.query(h.to(dtype)))
        y = a.out(cached_attention(q, k_raw, v, rope, sink_rope, plan, layer))
        xf = x.float() + y.float() * m[2]
        # Upstream rounds the cross-attention input to bfloat16 whatever the model dtype.
        c = self.norm3(xf.to(torch.bfloat16)).to(dtype)
        xf = xf + self.cross_attn.out(attend(self.cross_attn.query(c), *context_kv)).float()
        h = layer_norm(xf, self.eps) * (1 + m[4]) + m[3]
        xf = xf + self.ffn(h.to(dtype)).float() * m[5]
        return xf.to(dtype)


class S2VHead(nn.Module):
    def __init__(self, dim: int, out: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B, F*n, D]; temb [B*F, D] float32: each frame's own shift and scale."""
        b = x.shape[0]
        shift, scale = (self.modulation.float() + temb[:, None]).unbind(dim=1)
        h = layer_norm(x, self.eps).unflatten(1, (frames, -1)).float()
        h = (
            h * (1 + scale.unflatten(0, (b, frames))[:, :, None])
            + shift.unflatten(0, (b, frames))[:, :, None]
        )
        return self.head(h.flatten(1, 2).to(self.head.weight.dtype)).to(x.dtype)


# ---- audio: causal encoder over wav2vec2 layers, injectors ---------------------------------------
class CausalConv1d(nn.Module):
    """Conv1d padded on the left only (replicating the first frame), so no frame sees later ones."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class AudioTokenEncoder(nn.Module):
    """Video-rate audio features -> per-latent-frame tokens: two stride-2 causal convolutions
    (4 video frames per latent frame), `heads` local tokens plus a learned padding token, and a
    global token per frame for the injectors' adaptive norms."""

    def __init__(self, in_dim: int, dim: int, heads: int, need_global: bool) -> None:
        super().__init__()
        self.heads = heads
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * heads, 3)
        self.conv1_global = CausalConv1d(in_dim, dim // 4, 3) if need_global else None
        self.conv2 = CausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        self.final_linear = nn.Linear(dim, dim) if need_global else None
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """[N, c, T] after the first conv -> [N, T/4, dim]."""
        x = F.silu(layer_norm(x.transpose(1, 2), 1e-6)).transpose(1, 2)
        x = F.silu(layer_norm(self.conv2(x).transpose(1, 2), 1e-6)).transpose(1, 2)
        return F.silu(layer_norm(self.conv3(x).transpose(1, 2), 1e-6))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """feats [B, T, in_dim] -> (global [B, T', 1, dim] or None, local [B, T', heads+1, dim])."""
        b = feats.shape[0]
        x = feats.transpose(1, 2)
        local = self.conv1_local(x)  # [B, heads*c, T]
        local = local.unflatten(1, (self.heads, -1)).flatten(0, 1)  # [(B heads), c, T]
        local = self._tail(local).unflatten(0, (b, self.heads)).transpose(1, 2)  # [B, T', n, D]
        pad = self.padding_tokens.expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad.to(local.dtype)], dim=2)
        if self.conv1_global is None:
            return None, local
        glob = self.final_linear(self._tail(self.conv1_global(x)))
        return glob[:, :, None], local


class CausalAudioEncoder(nn.Module):
    """Learned softmax-free weighting of the wav2vec2 layers, then the token encoder."""

    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__()
        self.encoder = AudioTokenEncoder(
            cfg.audio_dim, cfg.dim, cfg.num_audio_token, need_global=cfg.enable_adain
        )
        self.weights = nn.Parameter(torch.full((1, cfg.audio_feature_layers, 1, 1), 0.01))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """features [B, layers, audio_dim, T] at the video rate."""
        w = F.silu(self.weights)
        mixed = (features * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, audio_dim, T]
        return self.encoder(mixed.transpose(1, 2))


class AdaptiveNorm(nn.Module):
    """LayerNorm whose shift and scale come from the frame's global audio token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim * 2)

    def shift_scale(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)
        return shift[:, None], scale[:, None]


class AudioInjector(nn.Module):
    def __init__(self, cfg: S2VConfig, count: int) -> None:
        super().__init__()
        self.injector = nn.ModuleList(
            WanAttention(cfg.dim, cfg.num_heads, 1e-6) for _ in range(count)
        )
        self.injector_adain_layers = (
            nn.ModuleList(AdaptiveNorm(cfg.dim) for _ in range(count)) if cfg.enable_adain else None
        )


def injector_slots(inject_layers: tuple[int, ...], num_layers: int) -> dict[int, int]:
    """Layer -> injector index, by upstream's rule (a block named `transformer_blocks.{i}` is
    matched by every listed id whose name it contains, in block order), so the number of
    injectors always equals the checkpoint's."""
    slots: dict[int, int] = {}
    count = 0
    for i in range(num_layers):
        for j in inject_layers:
            if f"transformer_blocks.{j}" in f"root.transformer_blocks.{i}":
                slots[j] = count
                count += 1
    return slots


@dataclass
class BlockAudio:
    """One block's audio conditioning for one injected layer (computed once per block)."""

    kv: tuple[torch.Tensor, torch.Tensor]  # injector keys/values of the tokens [B*F, n, H, Dh]
    shift: torch.Tensor | None  # adaptive-norm shift/scale [B*F, 1, D]
    scale: torch.Tensor | None


# ---- motion frame packing ------------------------------------------------------------------------
class FramePacker(nn.Module):
    """The motion latents packed at three rates: the newest frame at full patch resolution, the
    next two at 2x (time and space), the oldest sixteen at 4x."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [B, C, T, h, w] -> tokens [B, M, D] (post, 2x, 4x)."""
        total = sum(MOTION_BUCKETS)
        padded = motion.new_zeros(*motion.shape[:2], total, *motion.shape[3:])
        n = min(total, motion.shape[2])
        if n:
            padded[:, :, -n:] = motion[:, :, -n:]
        far, mid, near = padded.split(list(MOTION_BUCKETS)[::-1], dim=2)
        w = self.proj.weight.dtype
        parts = [self.proj(near.to(w)), self.proj_2x(mid.to(w)), self.proj_4x(far.to(w))]
        return torch.cat([p.flatten(2).transpose(1, 2) for p in parts], dim=1)


def _sampled(start: int, count: int, span: int) -> np.ndarray:
    """`count` integer positions spread over `span` units from `start` (negative starts count
    backwards), truncated as upstream's rotary table lookup does."""
    if start >= 0:
        return np.linspace(start, start + span - 1, count).astype(int)
    return -np.linspace(-start, -span - start + 1, count).astype(int)


def motion_positions(h: int, w: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(frames, rows, cols) positions of the packed motion tokens of an h x w patch grid."""
    b0, b1, b2 = MOTION_BUCKETS
    rows = [(h, h), (h // 2, h), (h // 4, h)]  # (tokens, span) per bucket
    cols = [(w, w), (w // 2, w), (w // 4, w)]
    frames = [(-b0, 1, b0), (-(b0 + b1), b1 // 2, b1), (-(b0 + b1 + b2), b2 // 4, b2)]
    out = []
    for (f0, nf, span), (nh, sh), (nw, sw) in zip(frames, rows, cols, strict=True):
        out.append((_sampled(f0, nf, span), _sampled(0, nh, sh), _sampled(0, nw, sw)))
    return out


def _half_rounded(angles: torch.Tensor) -> RotaryEmbedding:
    """cos/sin rounded to float16, as upstream's complex32 frequency table holds them."""
    ang = angles[None, :, None]
    return RotaryEmbedding(cos=ang.cos().half().float(), sin=ang.sin().half().float())


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """cos/sin timestep features computed in float64 (as upstream), returned as float32."""
    half = dim // 2
    pos = t.flatten().to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(pos, freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


class LiveAvatarTransformer(nn.Module):
    """Wan2.2-S2V-14B (+ Live Avatar LoRA) with explicit positions, a KV ring cache and a sink."""

    REFERENCE_POSITION = 30  # the reference frame's temporal index when the sink is computed

    def __init__(self, config: S2VConfig) -> None:
        super().__init__()
        self.config = cfg = config.validate()
        dim, patch = cfg.dim, cfg.patch_size
        self.rope = RotaryPositions(cfg.attention_head_dim, cfg.rope_theta)
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(S2VBlock(cfg) for _ in range(cfg.num_layers))
        self.head = S2VHead(dim, cfg.out_dim * math.prod(patch), cfg.eps)
        self.cond_encoder = (
            nn.Conv3d(cfg.cond_dim, dim, kernel_size=patch, stride=patch) if cfg.cond_dim else None
        )
        self.casual_audio_encoder = CausalAudioEncoder(cfg)  # sic: the checkpoint's spelling
        self.slots = injector_slots(cfg.audio_inject_layers, cfg.num_layers)
        count = sum(
            1
            for i in range(cfg.num_layers)
            for j in cfg.audio_inject_layers
            if f"transformer_blocks.{j}" in f"root.transformer_blocks.{i}"
        )
        self.audio_injector = AudioInjector(cfg, count)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePacker(cfg.in_dim, dim)
        self._motion_angles: dict[tuple[int, int, str], torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        """Random init for architecture-only runs (benchmarks, tests); checkpoints overwrite it."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))

    # ---- shapes ----------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) -> patch grid. Like upstream, the packed motion tokens' coarser grids
        floor odd sizes (720x400 pixels: 45x25 patches, 22x12 and 11x6 motion tokens)."""
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw or height < 4 * ph or width < 4 * pw:
            raise ConfigError(
                f"latent size {height}x{width} must be a multiple of the patch size {ph}x{pw} "
                f"and at least {4 * ph}x{4 * pw}: pick a resolution divisible by "
                f"{8 * ph} pixels, at least {32 * ph}"
            )
        return height // ph, width // pw

    def tokens_per_frame(self, height: int, width: int) -> int:
        gh, gw = self.grid(height, width)
        return gh * gw

    def sink_tokens(self, height: int, width: int) -> int:
        """Reference frame tokens + packed motion tokens."""
        gh, gw = self.grid(height, width)
        return gh * gw + sum(len(f) * len(r) * len(c) for f, r, c in motion_positions(gh, gw))

    # ---- rotary positions --------------------------------------------------------------------------
    def rotary(self, frame_positions: torch.Tensor, height: int, width: int) -> RotaryEmbedding:
        gh, gw = self.grid(height, width)
        dev = frame_positions.device
        ang = self.rope.angles(
            frame_positions, torch.arange(gh, device=dev), torch.arange(gw, device=dev)
        )
        return _half_rounded(ang)

    def sink_rotary(
        self, position: int, height: int, width: int, device: torch.device, sink_frames: int = 1
    ) -> RotaryEmbedding:
        """The sink's rotation: the reference frame at `position`, motion tokens where they
        always are (upstream never moves them). sink_frames: always one reference frame here
        (the argument keeps CausalWanTransformer's signature)."""
        gh, gw = self.grid(height, width)
        key = (gh, gw, str(device))
        if key not in self._motion_angles:
            parts = [
                self.rope.angles(*(torch.as_tensor(p, device=device) for p in group))
                for group in motion_positions(gh, gw)
            ]
            self._motion_angles[key] = torch.cat(parts)
        ref = self.rope.angles(
            torch.full((1,), position, device=device),
            torch.arange(gh, device=device),
            torch.arange(gw, device=device),
        )
        return _half_rounded(torch.cat([ref, self._motion_angles[key]]))

    # ---- conditions, computed once per session / per block --------------------------------------
    def _dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def prepare_context(
        self, context: torch.Tensor, layers: range | None = None
    ) -> PreparedContext:
        """Prompt embeddings [B, L, text_dim] (L <= text_len) -> per-layer cross-attention K/V;
        upstream zero-pads every prompt to text_len tokens and attends to all of them."""
        b, n, d = context.shape
        if n > self.config.text_len:
            raise ConfigError(f"prompt has {n} tokens, more than text_len={self.config.text_len}")
        padded = context.new_zeros(b, self.config.text_len, d)
        padded[:, :n] = context
        ctx = self.text_embedding(padded.to(self._dtype()))
        layers = range(len(self.blocks)) if layers is None else layers
        return PreparedContext(
            kv=[
                self.blocks[i].cross_attn.key_value(ctx) if i in layers else None
                for i in range(len(self.blocks))
            ]
        )

    def prepare_audio(
        self, features: torch.Tensor, layers: range | None = None
    ) -> list[BlockAudio | None]:
        """Audio features [B, 4F, layers, audio_dim] (video rate) -> per-layer injector inputs.

        Like upstream, the block's first feature frame is repeated `motion_frames` times in
        front (the causal convolutions see a steady past) and only the block's F latent frames
        of the encoder's output are kept."""
        cfg = self.config
        feats = features.permute(0, 2, 3, 1).to(self._dtype())  # [B, layers, dim, T]
        lead = cfg.extra.get("motion_frames", 73)
        feats = torch.cat([feats[..., :1].repeat(1, 1, 1, lead), feats], dim=-1)
        glob, local = self.casual_audio_encoder(feats)
        skip = (lead + 3) // 4
        local = local[:, skip:].to(self._dtype())
        frames = local.shape[1]
        tokens = local.flatten(0, 1)  # [B*F, n, D]
        temb = glob[:, skip:, 0].flatten(0, 1).to(self._dtype()) if glob is not None else None
        layers = range(len(self.blocks)) if layers is None else layers
        out: list[BlockAudio | None] = [None] * len(self.blocks)
        for i, slot in self.slots.items():
            if i not in layers:
                continue
            kv = self.audio_injector.injector[slot].key_value(tokens)
            shift = scale = None
            if temb is not None:
                shift, scale = self.audio_injector.injector_adain_layers[slot].shift_scale(temb)
            out[i] = BlockAudio(kv=kv, shift=shift, scale=scale)
        self._audio_frames = frames
        return out

    def _inject(self, i: int, x: torch.Tensor, audio: BlockAudio, frames: int) -> torch.Tensor:
        b, n, d = x.shape
        h = x.reshape(b * frames, n // frames, d)
        if audio.shift is not None:
            h = layer_norm(h, 1e-5) * (1 + audio.scale) + audio.shift
        else:
            h = layer_norm(h, 1e-6)
        inj = self.audio_injector.injector[self.slots[i]]
        out = inj.out(attend(inj.query(h.to(x.dtype)), *audio.kv))
        return x + out.reshape(b, n, d).to(x.dtype)

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps [N] -> (embedding [N, D], modulation [N, 6, D]), both float32."""
        w = self._dtype()
        temb = self.time_embedding(sinusoid(t, self.config.freq_dim).to(w)).float()
        mod = self.time_projection(temb.to(w)).float()
        return temb, mod.unflatten(1, (6, -1))

    @staticmethod
    def source_from_message(tensors: dict[str, torch.Tensor]) -> S2VReference:
        return S2VReference.from_message(tensors)

    # ---- the sink -----------------------------------------------------------------------------------
    def sink_forward(
        self,
        source: S2VReference,
        context: torch.Tensor | PreparedContext,
        plan: AttentionPlan,
        *,
        layers: range | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the reference and motion tokens through `layers` at the zero timestep, attending
        only to each other, and store each layer's unrotated keys/values as the sink (plan must
        have store_sink). Returns the tokens' hidden states (the next layer range's input)."""
        ref, motion = source.reference, source.motion
        h, w = ref.shape[-2:]
        if not isinstance(context, PreparedContext):
            context = self.prepare_context(context)
        layers = layers or range(len(self.blocks))
        dev = ref.device
        if layers.start == 0:
            x_ref = self.patch_embedding(ref.to(self._dtype())).flatten(2).transpose(1, 2)
            x_mot = self.frame_packer(motion)
            kinds = torch.tensor(
                [1] * x_ref.shape[1] + [2] * x_mot.shape[1], device=dev, dtype=torch.long
            )
            x = torch.cat([x_ref, x_mot.to(x_ref.dtype)], dim=1)
            x = x + self.trainable_cond_mask(kinds)[None].to(x.dtype)
        else:
            assert hidden is not None, "a layer range after the first needs `hidden`"
            x = hidden
        _, mod = self._time(torch.zeros(1, device=dev))
        mod = mod[:, None].expand(x.shape[0], x.shape[1], -1, -1)
        rope = self.sink_rotary(self.REFERENCE_POSITION, h, w, dev)
        plan = AttentionPlan(
            cache=plan.cache, store_sink=True, layer_offset=plan.layer_offset
        )  # attend to nothing but themselves
        for i in layers:
            x = self.blocks[i](x, mod, context.kv[i], rope, None, plan, i)
        return x

    # ---- a block of noisy frames ----------------------------------------------------------------
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
        """Flow-matching velocity of `latent` [B, C, F, h, w] (the same contract as
        CausalWanTransformer.forward; plan.sink_position is the reference frame's position)."""
        cfg = self.config
        b, _, nf, h, w = latent.shape
        gh, gw = self.grid(h, w)
        plan = plan or AttentionPlan()
        dev = latent.device
        if rope is None:
            if frame_positions is None:
                frame_positions = torch.arange(nf, device=dev)
            rope = self.rotary(frame_positions, h, w)
        if sink_rope is None and plan.sink_position is not None:
            sink_rope = self.sink_rotary(plan.sink_position, h, w, dev)
        if not isinstance(context, PreparedContext):
            context = self.prepare_context(context)
        blocks_audio = audio if isinstance(audio, list) else None
        if audio is not None and blocks_audio is None:
            blocks_audio = self.prepare_audio(audio)
        layers = layers or range(len(self.blocks))

        t = timestep.reshape(b, -1).expand(b, nf) if timestep.numel() in (1, b) else timestep
        temb, mod = self._time(t.reshape(-1))
        tokens = gh * gw
        mod = mod.unflatten(0, (b, nf)).repeat_interleave(tokens, dim=1)  # [B, N, 6, D]

        if layers.start == 0:
            x = self.patch_embedding(latent.to(self._dtype()))
            if self.cond_encoder is not None:  # no pose video: the pose latents are zeros
                x = x + self.cond_encoder.bias.view(1, -1, 1, 1, 1).to(x.dtype)
            x = x.flatten(2).transpose(1, 2)
            x = x + self.trainable_cond_mask.weight[0].to(x.dtype)
        else:
            assert hidden is not None, "a layer range after the first needs `hidden`"
            x = hidden
        for i in layers:
            x = self.blocks[i](x, mod, context.kv[i], rope, sink_rope, plan, i)
            if blocks_audio is not None and blocks_audio[i] is not None:
                x = self._inject(i, x, blocks_audio[i], nf)
        if layers.stop < len(self.blocks):
            return x
        x = self.head(x, temb, nf)
        pt, ph, pw = cfg.patch_size
        x = x.reshape(b, nf, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
