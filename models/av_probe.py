"""`av-probe`: a test instrument, not a model of anything. Each frame's brightness is the
loudness of the audio that drove it, so a receiver can check that every frame arrives with its
own audio (tests/test_stream_pairing.py does, through the real service and WebRTC).

    block's audio window ──LoudnessFeatures──▶ rms of each video frame's own samples  [F, 1, 1]
        │
    ProbeTransformer: v = (x - c) / σ  with  c = 2·min(rms / FULL_SCALE_RMS, 1) - 1
        │             on every value of that latent frame; each Euler step x + (σ' - σ)·v
        │             moves x toward c in proportion, and the last one (σ' = 0) lands on c
    ProbeAutoencoder: latent frame → one flat video frame of brightness 255·(c + 1)/2
                      = 255·rms / FULL_SCALE_RMS (one latent frame per video frame)

Everything else is the real engine: the StreamingGenerator's schedule, noise, caches and sink
(the probe writes no keys and reads none), the executors and the service. Only the network is a
formula, so the frames say exactly which audio made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn

from models.config import tiny_config
from models.dit import AttentionPlan, CausalWanTransformer
from models.errors import ConfigError, InvalidAudioError
from models.vae import StreamingVAE

FULL_SCALE_RMS = 0.5  # the loudness that decodes to white (a sine of amplitude 0.71)
LATENT_CHANNELS = 4


def brightness_of(rms: float | np.ndarray) -> float | np.ndarray:
    """The pixel value (0-255) a frame driven by audio of this loudness decodes to."""
    return 255.0 * np.clip(np.asarray(rms) / FULL_SCALE_RMS, 0.0, 1.0)


def loudness_of(brightness: float | np.ndarray) -> float | np.ndarray:
    """The inverse: the loudness of the audio that drove a frame of this mean pixel value."""
    return np.asarray(brightness) / 255.0 * FULL_SCALE_RMS


@dataclass
class _NoState:
    """The loudness of a frame needs no left context; kept for the AudioEncoder protocol."""


class LoudnessFeatures:
    """Audio encoder: one token per video frame, the rms of exactly that frame's samples."""

    feature_dim = 1
    tokens_per_latent_frame = 1

    def __init__(self, sample_rate: int = 16000) -> None:
        self.sample_rate = sample_rate

    def new_state(self) -> _NoState:
        return _NoState()

    def encode(
        self, window: np.ndarray, video_frames: int, latent_frames: int, state: Any
    ) -> torch.Tensor:
        window = np.asarray(window, dtype=np.float32).reshape(-1)
        if window.shape[0] < video_frames:
            raise InvalidAudioError(f"a window of {window.shape[0]} samples for {video_frames}")
        if video_frames != latent_frames:
            raise ConfigError("the probe decodes one video frame per latent frame")
        n = window.shape[0]
        edges = [round(j * n / video_frames) for j in range(video_frames + 1)]
        rms = [float(np.sqrt(np.mean(np.square(window[a:b])))) for a, b in pairwise(edges)]
        return torch.tensor(rms, dtype=torch.float32).reshape(latent_frames, 1, 1)


class ProbeTransformer(CausalWanTransformer):
    """A one-layer Wan transformer shell (shapes, rotary, caches as the engine expects) whose
    forward is the formula above instead of the network."""

    def __init__(self) -> None:
        super().__init__(
            tiny_config(
                num_layers=1,
                num_attention_heads=1,
                ffn_dim=8,
                in_channels=LATENT_CHANNELS,
                out_channels=LATENT_CHANNELS,
                audio_dim=LoudnessFeatures.feature_dim,
                audio_layers=(0,),
            )
        )

    def prepare_audio(self, audio: torch.Tensor, layers: range | None = None) -> torch.Tensor:
        """The loudness tokens [B, F, 1, 1] themselves: forward reads them directly."""
        return audio

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        context: Any,
        *,
        frame_positions: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        plan: AttentionPlan | None = None,
        rope: Any = None,
        layers: range | None = None,
        hidden: torch.Tensor | None = None,
        sink_rope: Any = None,
    ) -> torch.Tensor:
        b, _, nf = latent.shape[:3]
        if audio is None or (plan is not None and plan.store_sink):
            return torch.zeros_like(latent)  # the sink pass: nothing to store
        level = audio.reshape(b, nf).float()
        target = 2.0 * (level / FULL_SCALE_RMS).clamp(0.0, 1.0) - 1.0
        target = target[:, None, :, None, None]
        sigma = (timestep.float() / 1000.0).clamp_min(1e-6)
        sigma = sigma.reshape(b, 1, -1, 1, 1)  # [B] or per frame [B, F]
        return ((latent.float() - target) / sigma).to(latent.dtype)


@dataclass
class ProbeDecodeState:
    frames_decoded: int = 0


class ProbeAutoencoder(StreamingVAE, nn.Module):
    """Each latent frame decodes to one flat frame: the mean of its latent values as grey."""

    def __init__(self, spatial_factor: int = 8) -> None:
        super().__init__()
        self._factor = spatial_factor

    @property
    def latent_channels(self) -> int:
        return LATENT_CHANNELS

    @property
    def spatial_factor(self) -> int:
        return self._factor

    @property
    def temporal_factor(self) -> int:
        return 1

    def new_state(self) -> ProbeDecodeState:
        return ProbeDecodeState()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        self._check_image(image)
        h, w = image.shape[-2] // self._factor, image.shape[-1] // self._factor
        return torch.zeros(1, LATENT_CHANNELS, 1, h, w, device=image.device, dtype=image.dtype)

    def decode_block(self, latents: torch.Tensor, state: ProbeDecodeState) -> torch.Tensor:
        self._check_latents(latents)
        b, _, nf, h, w = latents.shape
        level = latents.float().mean(dim=(1, 3, 4)).clamp(-1.0, 1.0)  # [B, F]
        video = level[:, None, :, None, None].expand(b, 3, nf, h * self._factor, w * self._factor)
        state.frames_decoded += nf
        return video.to(latents.dtype)


def build_av_probe() -> Any:
    """The `av-probe` bundle: 64x64 at 25 fps, 3 frames per block, 4 steps, 16 kHz audio."""
    from models.registry import ModelBundle, StreamDefaults

    dit = ProbeTransformer().eval()
    return ModelBundle(
        name="av-probe",
        dit=dit,
        vae=ProbeAutoencoder().eval(),
        audio_encoder=LoudnessFeatures(),
        context=torch.zeros(1, 1, dit.config.text_dim),
        defaults=StreamDefaults(height=64, width=64),
        notice=(
            "av-probe: a test instrument (each frame's brightness is the loudness of the audio "
            "that drove it), not an avatar"
        ),
    )
