"""A model's sizes, read from its config alone (nothing big is loaded): what the planner
multiplies costs with (tokens, bytes of latents, hidden states and caches, parameters)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import WanConfig, wan_1_3b_config, wan_14b_config
from models.errors import ModelNotFoundError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    name: str
    config: WanConfig
    fps: float
    height: int
    width: int
    frames_per_block: int  # latent frames F
    steps: int
    window_frames: int
    video_frames: int  # video frames of a steady-state block
    first_video_frames: int
    latent_channels: int
    spatial_factor: int
    text_tokens: int
    audio_tokens: int  # audio tokens per latent frame
    vae_params: int
    dtype: str = "bfloat16"
    cache_mode: str = "reencode"
    vae_kind: str = "tiny"  # "tiny" or "wan"
    layer_params: tuple[int, ...] = ()
    shared_params: int = 0  # embedding, head, condition embedders

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.spatial_factor, self.width // self.spatial_factor

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.config.patch_size
        h, w = self.latent_hw
        return (h // ph) * (w // pw)

    @property
    def tokens_per_block(self) -> int:
        return self.tokens_per_frame * self.frames_per_block

    @property
    def dit_params(self) -> int:
        return self.shared_params + sum(self.layer_params)

    @property
    def block_seconds(self) -> float:
        return self.video_frames / self.fps

    @property
    def first_block_seconds(self) -> float:
        return self.first_video_frames / self.fps

    @property
    def latent_bytes(self) -> int:
        h, w = self.latent_hw
        return self.latent_channels * self.frames_per_block * h * w * self.bytes

    @property
    def hidden_bytes(self) -> int:
        return self.tokens_per_block * self.config.inner_dim * self.bytes

    @property
    def audio_bytes(self) -> int:
        if not self.config.audio_layers:
            return 0
        return self.frames_per_block * self.audio_tokens * self.config.audio_dim * self.bytes

    def kv_bytes(self, frames: int, layers: int) -> int:
        """Keys + values of `frames` latent frames for `layers` layers."""
        return 2 * frames * self.tokens_per_frame * self.config.inner_dim * self.bytes * layers

    def activation_bytes(self, device: str = "cuda") -> int:
        """Working set of one layer's forward of one block (FFN and attention inputs); on CPU the
        SDPA math path also materialises the attention scores."""
        n, d = self.tokens_per_block, self.config.inner_dim
        kv = (1 + self.window_frames + self.frames_per_block) * self.tokens_per_frame
        act = n * (self.config.ffn_dim + 8 * d) * self.bytes
        if device == "cpu":
            act += n * kv * self.config.num_attention_heads * 4
        return act


def _meta_params(cfg: WanConfig) -> tuple[tuple[int, ...], int]:
    from models.dit import CausalWanTransformer

    with torch.device("meta"):
        model = CausalWanTransformer(cfg)
    layers = tuple(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    total = sum(p.numel() for p in model.parameters())
    return layers, total - sum(layers)


def _wan_vae_params() -> int:
    try:
        from diffusers import AutoencoderKLWan

        with torch.device("meta"):
            return sum(p.numel() for p in AutoencoderKLWan().parameters())
    except Exception:  # diffusers missing: Wan 2.1's VAE has about 127M parameters
        return 127_000_000


def model_shape(
    model: str,
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    dtype: str = "bfloat16",
    cache_mode: str = "reencode",
) -> ModelShape:
    """Sizes of a model by registry name or folder, without loading its weights."""
    from models.audio import build_audio_encoder
    from models.registry import StreamDefaults

    audio = build_audio_encoder("logmel", n_mels=40, tokens_per_latent_frame=4)
    name = model
    if model in ("wan-1.3b", "wan-14b"):
        make = wan_1_3b_config if model == "wan-1.3b" else wan_14b_config
        n = 30 if model == "wan-1.3b" else 40
        cfg = make(audio_dim=audio.feature_dim, audio_layers=tuple(range(0, n, 3)))
        defaults = StreamDefaults(fps=16.0, height=480, width=832, window_frames=6)
        vae = dict(channels=16, spatial=8, temporal=4, params=_wan_vae_params(), kind="wan")
        text_tokens, audio_tokens = 512, audio.tokens_per_latent_frame
    elif model in ("tiny", "default") or (Path(model) / "model.json").is_file():
        if model in ("tiny", "default") and not (Path(model) / "model.json").is_file():
            from models.registry import load_model

            bundle = load_model(model)
            cfg, defaults = bundle.dit.config, bundle.defaults
            name = bundle.name
            vae = dict(
                channels=bundle.vae.latent_channels,
                spatial=bundle.vae.spatial_factor,
                temporal=bundle.vae.temporal_factor,
                params=sum(p.numel() for p in bundle.vae.parameters()),
            )
            text_tokens = bundle.context.shape[1]
            audio_tokens = getattr(bundle.audio_encoder, "tokens_per_latent_frame", 0)
        else:
            meta = json.loads((Path(model) / "model.json").read_text())
            cfg = WanConfig.from_dict(meta["dit"])
            defaults = StreamDefaults(**meta.get("defaults", {}))
            from models.vae import TinyAutoencoder

            tiny_vae = TinyAutoencoder(**meta.get("vae", {}))
            vae = dict(
                channels=tiny_vae.latent_channels,
                spatial=tiny_vae.spatial_factor,
                temporal=tiny_vae.temporal_factor,
                params=sum(p.numel() for p in tiny_vae.parameters()),
            )
            text_tokens = 4
            audio_tokens = int(meta.get("audio", {}).get("tokens_per_latent_frame", 4))
    elif (Path(model) / "transformer" / "config.json").is_file():
        data = json.loads((Path(model) / "transformer" / "config.json").read_text())
        cfg = WanConfig.from_dict(data)
        defaults = StreamDefaults(fps=16.0, height=480, width=832)
        vae = dict(channels=16, spatial=8, temporal=4, params=_wan_vae_params(), kind="wan")
        text_tokens, audio_tokens = 512, audio.tokens_per_latent_frame
        name = Path(model).name
    else:
        raise ModelNotFoundError(
            f"model {model!r} is neither tiny, default, wan-1.3b, wan-14b nor a model folder"
        )
    layer_params, shared = _meta_params(cfg)
    f = defaults.frames_per_block
    t = vae["temporal"]
    return ModelShape(
        name=name,
        config=cfg,
        fps=defaults.fps,
        height=height or defaults.height,
        width=width or defaults.width,
        frames_per_block=f,
        steps=steps or defaults.steps,
        window_frames=defaults.window_frames,
        video_frames=t * f,
        first_video_frames=1 + t * (f - 1),
        latent_channels=vae["channels"],
        spatial_factor=vae["spatial"],
        text_tokens=text_tokens,
        audio_tokens=audio_tokens,
        vae_params=vae["params"],
        dtype=dtype,
        cache_mode=cache_mode,
        vae_kind=str(vae.get("kind", "tiny")),
        layer_params=layer_params,
        shared_params=shared,
    )
