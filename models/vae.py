"""Streaming video VAEs: decode one block of latents at a time, carrying the decoder's causal
cache in a per-session state so a stream decodes exactly as if it were decoded in one piece.

Two implementations share one interface: `WanStreamingVAE` wraps diffusers' AutoencoderKLWan (the
Wan 2.1 VAE, optional dependency), `TinyAutoencoder` is the small CPU-friendly VAE of the embedded
default model. One loaded VAE serves many sessions; all mutable decode state lives in the state
objects, never on the module.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models.errors import ConfigError, InvalidImageError, ModelNotFoundError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan


class StreamingVAE(ABC):
    """A video VAE whose decoder is causal in time and can be resumed block by block."""

    @property
    @abstractmethod
    def latent_channels(self) -> int: ...

    @property
    @abstractmethod
    def spatial_factor(self) -> int: ...

    @property
    @abstractmethod
    def temporal_factor(self) -> int: ...

    @abstractmethod
    def new_state(self) -> object:
        """A fresh decode cache for one session (one stream)."""

    @abstractmethod
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Reference image [1, 3, H, W] in [-1, 1] -> normalised latent [1, C, 1, h, w]."""

    @abstractmethod
    def decode_block(self, latents: torch.Tensor, state: Any) -> torch.Tensor:
        """Normalised latents [1, C, F, h, w] -> video [1, 3, N, H, W] in [-1, 1]; updates state."""

    def frames_for(self, latent_frames: int, first: bool) -> int:
        """Video frames a block of `latent_frames` decodes to: the first latent frame of a stream
        is a single video frame, every later one `temporal_factor` frames."""
        if latent_frames < 1:
            raise ConfigError(f"a block needs at least one latent frame, got {latent_frames}")
        if first:
            return 1 + self.temporal_factor * (latent_frames - 1)
        return self.temporal_factor * latent_frames

    @staticmethod
    def to_uint8(video: torch.Tensor) -> np.ndarray:
        """Video [1, 3, N, H, W] in [-1, 1] -> frames [N, H, W, 3] uint8, what the video track sends."""
        if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
            raise ConfigError(f"expected video [1, 3, N, H, W], got {tuple(video.shape)}")
        frames = ((video[0].detach().float().clamp(-1, 1) + 1) * 127.5).round()
        return frames.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()

    def _check_image(self, image: torch.Tensor) -> None:
        if (
            not isinstance(image, torch.Tensor)
            or image.ndim != 4
            or tuple(image.shape[:2]) != (1, 3)
        ):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InvalidImageError(f"expected a reference image tensor [1, 3, H, W], got {shape}")
        h, w = image.shape[-2:]
        f = self.spatial_factor
        if h % f or w % f or h == 0 or w == 0:
            raise InvalidImageError(
                f"image size {w}x{h} is not a multiple of {f}: resize or crop it to a multiple of {f}"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels or latents.shape[2] < 1:
            raise ConfigError(
                f"expected latents [B, {self.latent_channels}, F>=1, h, w], got {tuple(latents.shape)}"
            )


# --------------------------------------------------------------------------------------------
# Wan 2.1 VAE (diffusers)
# --------------------------------------------------------------------------------------------


@dataclass
class WanDecodeState:
    """One session's Wan decoder cache: the causal convolutions' last input frames, by conv index."""

    feat_cache: list[Any]
    latent_frames_decoded: int = 0


def _import_wan() -> Any:
    try:
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    except ImportError as exc:
        raise ConfigError(
            "the Wan VAE needs diffusers, a dependency of diffstream: reinstall it with `make install`"
        ) from exc
    return AutoencoderKLWan, WanCausalConv3d


class WanStreamingVAE(StreamingVAE):
    """Wan 2.1's causal 3D VAE, decoded one block at a time.

    diffusers' `decode` already runs the decoder one latent frame at a time with a cache of each
    causal conv's last input frames, but it clears that cache on every call. Here the cache list
    lives in a WanDecodeState, so block b resumes exactly where block b-1 stopped, and each
    session owns its own list. Latents in and out are normalised like the Wan pipelines do:
    z_normalised = (z - latents_mean) / latents_std.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        wan_cls, causal_conv = _import_wan()
        if not isinstance(vae, wan_cls):
            raise ConfigError(
                f"WanStreamingVAE wraps an AutoencoderKLWan, got {type(vae).__name__}"
            )
        cfg = vae.config
        if cfg.patch_size is not None:
            raise ConfigError(
                "this Wan VAE uses patch_size (Wan 2.2 layout), which streaming decode does not "
                "support yet: use a Wan 2.1 VAE"
            )
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ConfigError(
                f"latents_mean/latents_std have {len(cfg.latents_mean)}/{len(cfg.latents_std)} "
                f"entries but z_dim is {cfg.z_dim}"
            )
        self.vae = vae.eval()
        self._decoder_convs = sum(isinstance(m, causal_conv) for m in vae.decoder.modules())
        self._encoder_convs = sum(isinstance(m, causal_conv) for m in vae.encoder.modules())
        # Derived from the layers, not from scale_factor_* which a custom config may not update.
        self._spatial = 2 ** (len(cfg.dim_mult) - 1)
        self._temporal = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        stats = torch.tensor([cfg.latents_mean, cfg.latents_std], dtype=torch.float32)
        self._mean = stats[0].view(1, -1, 1, 1, 1)
        self._std = stats[1].view(1, -1, 1, 1, 1)

    def to(self, *args: object, **kwargs: object) -> WanStreamingVAE:
        """Move the wrapped AutoencoderKLWan (device and/or dtype, as nn.Module.to; diffusers'
        own .to warns about float32-kept modules this model does not have)."""
        torch.nn.Module.to(self.vae, *args, **kwargs)
        # The latent statistics follow to the device (in float32): a copy from the host at
        # every block would make the decode wait for it.
        device = self._param().device
        self._mean, self._std = self._mean.to(device), self._std.to(device)
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        return self._spatial

    @property
    def temporal_factor(self) -> int:
        return self._temporal

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def new_state(self) -> WanDecodeState:
        return WanDecodeState(feat_cache=[None] * self._decoder_convs)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Encode one frame with a private cache (the model's own cache is shared by sessions)
        and return the normalised posterior mean."""
        self._check_image(image)
        p = self._param()
        x = image.to(device=p.device, dtype=p.dtype).unsqueeze(2)
        cache: list[Any] = [None] * self._encoder_convs
        moments = self.vae.quant_conv(self.vae.encoder(x, feat_cache=cache, feat_idx=[0]))
        mean = moments[:, : self.latent_channels].float()
        return (mean - self._mean.to(mean.device)) / self._std.to(mean.device)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video [1, 3, T, H, W] in [-1, 1], T = 1 + k * temporal_factor -> normalised posterior
        mean [1, C, 1 + k, h, w].

        Wan's encoder is causal: the first frame is encoded alone and every later latent frame
        from the next `temporal_factor` frames, carrying the convolutions' cache between chunks.
        The cache is private to the call, so one loaded VAE serves many sessions. Live Avatar
        encodes its reference image repeated 5 and 73 times this way.
        """
        if (
            not isinstance(video, torch.Tensor)
            or video.ndim != 5
            or tuple(video.shape[:2]) != (1, 3)
        ):
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ConfigError(f"expected a video tensor [1, 3, T, H, W], got {shape}")
        t, f = video.shape[2], self._temporal
        if t < 1 or (t - 1) % f:
            raise ConfigError(
                f"a video of {t} frames does not encode whole: the VAE takes 1 + k*{f} frames "
                f"(1, {1 + f}, {1 + 2 * f}, ...)"
            )
        self._check_image(video[:, :, 0])
        p = self._param()
        x = video.to(device=p.device, dtype=p.dtype)
        cache: list[Any] = [None] * self._encoder_convs
        chunks = [x[:, :, :1]] + [x[:, :, s : s + f] for s in range(1, t, f)]
        out = torch.cat(
            [self.vae.encoder(c, feat_cache=cache, feat_idx=[0]) for c in chunks], dim=2
        )
        mean = self.vae.quant_conv(out)[:, : self.latent_channels].float()
        return (mean - self._mean.to(mean.device)) / self._std.to(mean.device)

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor, state: WanDecodeState) -> torch.Tensor:
        """Decode normalised latents, continuing the session's stream from `state`."""
        self._check_latents(latents)
        p = self._param()
        z = latents.float() * self._std.to(latents.device) + self._mean.to(latents.device)
        x = self.vae.post_quant_conv(z.to(device=p.device, dtype=p.dtype))
        frames = []
        for i in range(x.shape[2]):
            frames.append(
                self.vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=state.feat_cache,
                    feat_idx=[0],
                    first_chunk=state.latent_frames_decoded == 0,
                )
            )
            state.latent_frames_decoded += 1
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0)


def load_wan_vae(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WanStreamingVAE:
    """Load a Wan VAE from a local diffusers folder (config.json + safetensors), or from the `vae`
    subfolder of a whole Wan pipeline folder. Never touches the network."""
    wan_cls, _ = _import_wan()
    root = Path(path)
    if not root.exists():
        raise ModelNotFoundError(f"VAE folder not found: {root}")
    folder = root if (root / "config.json").is_file() else root / "vae"
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{root} has no config.json (nor vae/config.json): point at a diffusers VAE folder"
        )
    try:
        vae = wan_cls.from_pretrained(
            str(folder), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot load a Wan VAE from {folder}: {exc}") from exc
    return WanStreamingVAE(vae.to(device))


# --------------------------------------------------------------------------------------------
# Tiny autoencoder (embedded default)
# --------------------------------------------------------------------------------------------


@dataclass
class TinyDecodeState:
    """One session's TinyAutoencoder cache: the previous frame's low-res decoder feature."""

    previous: torch.Tensor | None = field(default=None)
    frames_decoded: int = 0


class TinyAutoencoder(StreamingVAE, nn.Module):
    """A small per-frame autoencoder (8x spatial, no temporal compression) that decodes a 16x16
    latent to a 128x128 frame in a few milliseconds on one CPU core.

    Each encoder level is a strided and a plain 3x3 convolution. The decoder spends its width at
    the lowest resolution (two 3x3 convolutions, where pixels are few) and upsamples with 4x4
    stride-2 transposed convolutions, whose kernels overlap, so neighbouring latent cells blend
    instead of decoding to visible 8x8 tiles. It smooths its lowest-resolution features over
    time with a depthwise kernel-2 causal convolution; that is the only temporal coupling, so
    the state is one feature map. Its latents are used as they come (no mean/std normalisation).
    """

    CONFIG_NAME = "config.json"
    WEIGHTS_NAME = "model.safetensors"

    def __init__(
        self,
        latent_channels: int = 8,
        channels: Sequence[int] = (32, 64, 96),
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if latent_channels < 1 or not channels or min(channels) < 1:
            raise ConfigError(
                f"TinyAutoencoder needs positive sizes, got latent_channels={latent_channels}, "
                f"channels={channels}"
            )
        self.config = {
            "latent_channels": int(latent_channels),
            "channels": list(channels),
            "image_channels": int(image_channels),
        }
        act = nn.SiLU

        enc: list[nn.Module] = []
        c_in = image_channels
        for c in channels:
            enc += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), act()]
            enc += [nn.Conv2d(c, c, 3, padding=1), act()]
            c_in = c
        enc.append(nn.Conv2d(c_in, latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*enc)

        top = channels[-1]
        self.decoder_in = nn.Conv2d(latent_channels, top, 3, padding=1)
        # Weight [C, 1, 2, 1, 1]: index 0 of the time axis is the previous frame.
        self.temporal_smooth = nn.Conv3d(top, top, (2, 1, 1), groups=top)
        with torch.no_grad():
            self.temporal_smooth.weight[:, 0, 0].fill_(0.3)
            self.temporal_smooth.weight[:, 0, 1].fill_(0.7)
            self.temporal_smooth.bias.zero_()
        dec: list[nn.Module] = [act(), nn.Conv2d(top, top, 3, padding=1), act()]
        # The full-resolution stage dominates the cost, so it runs at half the first width.
        outs = [*reversed(channels[:-1]), max(channels[0] // 2, 4)]
        c_in = top
        for c in outs:
            dec += [nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1), act()]
            c_in = c
        dec.append(nn.Conv2d(c_in, image_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self._factor = 2 ** len(channels)

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    @property
    def spatial_factor(self) -> int:
        return self._factor

    @property
    def temporal_factor(self) -> int:
        return 1

    def new_state(self) -> TinyDecodeState:
        return TinyDecodeState()

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [N, 3, H, W] -> latents [N, C, h, w]; differentiable, for training."""
        return self.encoder(frames)

    def decode_frames(
        self, latents: torch.Tensor, previous: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B, C, F, h, w] -> (unclamped video [B, 3, F, H, W], last low-res feature).

        `previous` is the feature of the frame before this block (None at a stream start, where
        the first frame stands in for it). Differentiable, for training.
        """
        b, c, f, h, w = latents.shape
        x = self.decoder_in(latents.transpose(1, 2).reshape(b * f, c, h, w))
        x = x.view(b, f, -1, h, w).transpose(1, 2)  # [B, C', F, h, w]
        last = x[:, :, -1:]
        prev = x[:, :, :1] if previous is None else previous.to(x)
        x = self.temporal_smooth(torch.cat([prev, x], dim=2))
        x = self.decoder(x.transpose(1, 2).reshape(b * f, -1, h, w))
        video = x.view(b, f, *x.shape[1:]).transpose(1, 2)
        return video, last

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruct a clip [B, 3, F, H, W] from a stream start (training objective's input)."""
        b, _, f, hh, ww = video.shape
        z = self.encode_frames(video.transpose(1, 2).reshape(b * f, -1, hh, ww))
        z = z.view(b, f, *z.shape[1:]).transpose(1, 2)
        return self.decode_frames(z, None)[0]

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        self._check_image(image)
        p = next(self.parameters())
        return self.encode_frames(image.to(device=p.device, dtype=p.dtype)).unsqueeze(2)

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor, state: TinyDecodeState) -> torch.Tensor:
        self._check_latents(latents)
        p = next(self.parameters())
        video, state.previous = self.decode_frames(
            latents.to(device=p.device, dtype=p.dtype), state.previous
        )
        state.frames_decoded += latents.shape[2]
        return video.clamp(-1.0, 1.0)

    def save(self, path: str | Path) -> None:
        """Write config.json and model.safetensors into the folder `path`."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / self.WEIGHTS_NAME))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TinyAutoencoder:
        """Rebuild from a folder written by `save`; weights that do not fit the config are a
        ConfigError naming the first mismatching tensor."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        config_path, weights_path = folder / cls.CONFIG_NAME, folder / cls.WEIGHTS_NAME
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise ModelNotFoundError(f"TinyAutoencoder file not found: {needed}")
        try:
            config = json.loads(config_path.read_text())
            model = cls(**config)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"bad TinyAutoencoder config {config_path}: {exc}") from exc
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"cannot read weights {weights_path}: {exc}") from exc
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ConfigError(
                f"weights in {weights_path} do not match the config: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        for name, tensor in expected.items():
            if tensors[name].shape != tensor.shape:
                raise ConfigError(
                    f"weight {name} in {weights_path} has shape {tuple(tensors[name].shape)}, "
                    f"the config needs {tuple(tensor.shape)}: config and weights are from "
                    "different models"
                )
        model.load_state_dict(tensors)
        return model.to(device).eval()


__all__ = [
    "StreamingVAE",
    "TinyAutoencoder",
    "TinyDecodeState",
    "WanDecodeState",
    "WanStreamingVAE",
    "load_wan_vae",
]
