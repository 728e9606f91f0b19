"""Hyperparameters of the causal Wan-layout transformer.

Field names follow diffusers' `WanTransformer3DModel` config, so a diffusers `config.json` maps
onto this dataclass directly; the audio fields are this project's additions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models.errors import ConfigError


@dataclass
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # Audio conditioning (Live Avatar style): frame-aligned cross-attention at these layers.
    audio_dim: int = 0  # 0 disables audio conditioning
    audio_layers: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # unknown diffusers keys, kept for saving

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> WanConfig:
        """Raise ConfigError, naming the field, when sizes are inconsistent."""
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ConfigError(f"patch_size must be three positive integers, got {self.patch_size}")
        if self.patch_size[0] != 1:
            raise ConfigError(
                "patch_size[0] (temporal patch) must be 1 for block-wise causal generation, "
                f"got {self.patch_size[0]}"
            )
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.attention_head_dim % 2:
            raise ConfigError(
                f"attention_head_dim must be even for rotary positions, got {self.attention_head_dim}"
            )
        if self.attention_head_dim < 6:
            raise ConfigError(
                "attention_head_dim must be at least 6 (rotary dims are split over t, h, w), "
                f"got {self.attention_head_dim}"
            )
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim must be even, got {self.freq_dim}")
        bad = [i for i in self.audio_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(
                f"audio_layers {bad} are outside the model's {self.num_layers} layers"
            )
        if self.audio_layers and self.audio_dim < 1:
            raise ConfigError("audio_layers are set but audio_dim is 0; set audio_dim")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WanConfig:
        """Build from a diffusers or project config dict; unknown keys are kept in `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = dict(data.get("extra", {}))
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key != "extra" and not key.startswith("_"):
                extra[key] = value
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(int(p) for p in kwargs["patch_size"])
        if "audio_layers" in kwargs:
            kwargs["audio_layers"] = tuple(int(i) for i in kwargs["audio_layers"])
        unsupported = {
            k: extra[k]
            for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
            if extra.get(k) is not None
        }
        if unsupported:
            raise ConfigError(
                f"config uses {sorted(unsupported)} (image-conditioned Wan variants), which this "
                "causal model does not support; use a text/audio-conditioned Wan 2.1 checkpoint"
            )
        try:
            return cls(**kwargs, extra=extra).validate()
        except TypeError as exc:  # wrong value types in a hand-written config
            raise ConfigError(f"invalid model config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        out["patch_size"] = list(self.patch_size)
        out["audio_layers"] = list(self.audio_layers)
        return {**extra, **out}


def tiny_config(**overrides: Any) -> WanConfig:
    """A 2-layer config for tests and CPU smoke runs (diffusers' test sizes)."""
    base: dict[str, Any] = dict(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        audio_dim=0,
        audio_layers=(),
    )
    base.update(overrides)
    return WanConfig(**base).validate()


def wan_1_3b_config(**overrides: Any) -> WanConfig:
    """Wan 2.1 T2V 1.3B sizes (dim 1536, 30 layers, 12 heads)."""
    base: dict[str, Any] = dict(
        num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30
    )
    base.update(overrides)
    return WanConfig(**base).validate()


def wan_14b_config(**overrides: Any) -> WanConfig:
    """Wan 14B sizes (dim 5120, 40 layers, 40 heads), as in Wan2.2-S2V / Live Avatar."""
    base: dict[str, Any] = dict(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40
    )
    base.update(overrides)
    return WanConfig(**base).validate()
