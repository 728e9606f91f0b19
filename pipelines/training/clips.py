"""Training clips for the default model: a rendered talking avatar with the audio that drove it.

The face is driven by the clean synthetic speech; the model hears an augmented copy (room,
microphone, noise, gain), so it learns to follow loudness rather than the synthesiser's exact
signal. Identities are drawn from a seed, so the same seed gives the same data everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .avatar import Identity, mouth_box, reference_image, render_clip, sample_identity
from .speech import augment_audio, num_audio_samples, synth_speech

SAMPLE_RATE = 16000
FPS = 25.0


@dataclass
class Clip:
    """One training clip: frames [T, H, W, 3] uint8, the audio the model hears, the reference."""

    identity: Identity
    reference: np.ndarray
    frames: np.ndarray
    audio: np.ndarray
    mouth: tuple[int, int, int, int]


def make_clip(rng: np.random.Generator, frames: int, size: int = 128) -> Clip:
    """Render one clip of `frames` video frames; a fresh identity and speaker each time."""
    identity = sample_identity(rng)
    n = num_audio_samples(frames, SAMPLE_RATE, FPS)
    clean = synth_speech(n / SAMPLE_RATE + 0.05, SAMPLE_RATE, rng)[:n]
    clean = np.pad(clean, (0, n - clean.shape[0]))
    if rng.random() < 0.15:  # some silence-only stretches: a closed mouth must be learnt too
        a = int(rng.integers(0, n // 2))
        clean[a : a + n // 3] *= 1e-3
    video = render_clip(identity, clean, SAMPLE_RATE, FPS, size, rng)[:frames]
    heard = augment_audio(clean, rng, SAMPLE_RATE, speed=False) if rng.random() < 0.7 else clean
    return Clip(identity, reference_image(identity, size), video, heard, mouth_box(identity, size))
