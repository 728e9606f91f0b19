"""Face controls per video frame, driven by audio: mouth, blinks and head motion.

Openness follows loudness, width/roundness follows the spectral shape (rounded vowels have
little energy above ~1.2 kHz), eyes blink every few seconds and the head drifts slowly. The
controls are plain arrays, so the same track can be rendered for any identity and size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .speech import loudness_envelope, num_video_frames

MAX_HEAD_SHIFT = 0.025  # largest head offset in either direction, as a fraction of frame size
NEUTRAL_ROUND = 0.3  # mouth roundness at rest (reference image, silence)


class FaceTrack(NamedTuple):
    """Per-video-frame face controls (float32 [T] each), as `render_frame` takes them."""

    mouth_open: np.ndarray
    mouth_round: np.ndarray
    blink: np.ndarray
    head_dx: np.ndarray
    head_dy: np.ndarray


def _smooth3(x: np.ndarray, side: float = 0.2) -> np.ndarray:
    """Zero-phase three-tap smoothing (no lag, unlike a causal filter)."""
    if x.size < 3:
        return x.copy()
    padded = np.pad(x, 1, mode="edge")
    return side * padded[:-2] + (1 - 2 * side) * padded[1:-1] + side * padded[2:]


def mouth_openness_from_loudness(envelope: np.ndarray, release: float = 0.5) -> np.ndarray:
    """Map the loudness envelope to mouth openness: instant attack, a short release.

    Quiet frames (below ~0.15 of the envelope: about 34 dB under loud speech) keep the mouth
    closed; a little centred smoothing and a decay of `release` per frame avoid a jittery mouth
    without delaying its opening.
    """
    target = np.clip((envelope - 0.15) / 0.8, 0.0, 1.0)
    target = _smooth3(target, 0.15)
    out = np.empty_like(target)
    level = 0.0
    for i, value in enumerate(target):
        level = max(float(value), level * release)
        out[i] = level
    return out.astype(np.float32)


def spectral_roundness(
    audio: np.ndarray, sample_rate: int, fps: float, envelope: np.ndarray
) -> np.ndarray:
    """Mouth roundness per frame from how much voiced energy lies below ~1.2 kHz.

    Rounded vowels (o, u) have a low second formant, spread ones (i, e) a high one, so the ratio
    of 300-1200 Hz to 1200-3500 Hz energy, normalised over the clip's voiced frames, tracks lip
    rounding. Quiet frames relax to the neutral roundness.
    """
    n = envelope.size
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    win = int(math.ceil(sample_rate / fps))
    starts = np.floor(np.arange(n) * (sample_rate / fps) + 0.5).astype(np.int64)
    x = np.pad(x, (0, max(0, int(starts[-1]) + win - x.size)))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[starts] * np.hanning(win).astype(
        np.float32
    )
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(win, 1.0 / sample_rate)
    low = power[:, (freqs >= 300) & (freqs < 1200)].sum(axis=1)
    high = power[:, (freqs >= 1200) & (freqs < 3500)].sum(axis=1)
    ratio = 10.0 * np.log10((low + 1e-10) / (high + 1e-10))
    voiced = envelope > 0.35
    if voiced.sum() < 3:
        return np.full(n, NEUTRAL_ROUND, dtype=np.float32)
    lo, hi = np.percentile(ratio[voiced], [15.0, 85.0])
    raw = np.clip((ratio - lo) / max(hi - lo, 1.0), 0.0, 1.0)
    weight = np.clip((envelope - 0.2) / 0.3, 0.0, 1.0)
    return _smooth3(weight * raw + (1.0 - weight) * NEUTRAL_ROUND).astype(np.float32)


def blink_track(num_frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """Blinks every ~3-5 s, each 3-4 frames at 25 fps (about 0.12-0.16 s)."""
    blink = np.zeros(num_frames, dtype=np.float32)
    t = rng.uniform(0.3, 4.0)
    while True:
        start = int(round(t * fps))
        if start >= num_frames:
            break
        length = max(3, int(round(rng.uniform(0.11, 0.165) * fps)))
        shape = np.sin(np.pi * (np.arange(length) + 1) / (length + 1)) ** 0.6
        shape = np.minimum(shape / shape.max(), 1.0)
        end = min(num_frames, start + length)
        blink[start:end] = shape[: end - start]
        t += rng.uniform(2.8, 5.2)
    return blink


def head_motion(
    num_frames: int, fps: float, rng: np.random.Generator, envelope: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Slow, small head drift (sums of 0.05-0.4 Hz sinusoids), with a slight nod on loud speech."""
    t = np.arange(num_frames) / fps
    out = []
    for axis in range(2):
        wave = np.zeros(num_frames)
        for _ in range(3):
            wave += rng.uniform(0.3, 1.0) * np.sin(
                2 * np.pi * rng.uniform(0.05, 0.4) * t + rng.uniform(0, 2 * np.pi)
            )
        peak = np.max(np.abs(wave)) if num_frames else 1.0
        wave *= rng.uniform(0.3, 0.8) * MAX_HEAD_SHIFT / max(peak, 1e-6)
        if axis == 1 and envelope is not None and envelope.size == num_frames:
            wave += 0.15 * MAX_HEAD_SHIFT * np.convolve(envelope, np.ones(5) / 5, mode="same")
        out.append(np.clip(wave, -MAX_HEAD_SHIFT, MAX_HEAD_SHIFT).astype(np.float32))
    return out[0], out[1]


def drive_from_audio(
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    rng: np.random.Generator | None = None,
    num_frames: int | None = None,
) -> FaceTrack:
    """Face controls for every video frame of `audio` (frame i covers samples round(i*sr/fps)...).

    Openness follows the loudness envelope, roundness the spectral shape; blinks and head motion
    are random (from `rng`) and independent of the audio apart from a slight nod.
    """
    rng = rng if rng is not None else np.random.default_rng()
    if num_frames is None:
        num_frames = num_video_frames(np.asarray(audio).size, sample_rate, fps)
    env = loudness_envelope(audio, sample_rate, fps, num_frames=num_frames)
    mouth_open = mouth_openness_from_loudness(env)
    mouth_round = spectral_roundness(audio, sample_rate, fps, env)
    blink = blink_track(num_frames, fps, rng)
    dx, dy = head_motion(num_frames, fps, rng, env)
    return FaceTrack(mouth_open, mouth_round, blink, dx, dy)
