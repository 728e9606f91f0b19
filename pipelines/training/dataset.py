"""Training and evaluation clips: a reference image, the frames of the avatar talking, and audio.

Clips are made on the fly (about 1,000+ frames/s of rendering on one core), so a training set
never touches the disk. Identities and speakers come from seeded draws over a space of 2^31
seeds each; every `HELD_OUT_EVERY`-th seed is kept out of training, so evaluation uses faces
and voices the model never saw.

Alignment: video frame i covers the clip's audio samples [round(i*sr/fps), round((i+1)*sr/fps)),
rounded half up (`speech.frame_bounds`). The audio the model hears is augmented (room, mic,
noise, gain); the mouth follows the clean speech it came from, which each clip also carries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .avatar import (
    FaceTrack,
    Identity,
    drive_from_audio,
    mouth_box,
    reference_image,
    render_track,
    sample_identity,
)
from .speech import (
    augment_audio,
    change_speed,
    frame_bounds,
    sample_speaker,
    synth_speech,
)

SEED_SPACE = 2**31
HELD_OUT_EVERY = 16  # seeds divisible by this are evaluation-only (identities and speakers)
_IDENTITY_STREAM = 0x1D
_SPEECH_STREAM = 0x5BEEC
_CLIP_STREAM = 0xC11B


def is_held_out(seed: int) -> bool:
    """Whether an identity or speech seed belongs to the evaluation split."""
    return seed % HELD_OUT_EVERY == 0


def identity_from_seed(seed: int) -> Identity:
    """The identity a seed stands for (the same on every machine and run)."""
    return sample_identity(np.random.default_rng([_IDENTITY_STREAM, seed]))


def eval_identity_seeds(count: int) -> list[int]:
    """The first `count` held-out identity seeds, for a fixed evaluation set."""
    return [HELD_OUT_EVERY * (j + 1) for j in range(count)]


def _draw_seed(rng: np.random.Generator, split: str) -> int:
    if split == "eval":
        return HELD_OUT_EVERY * int(rng.integers(1, SEED_SPACE // HELD_OUT_EVERY))
    seed = int(rng.integers(0, SEED_SPACE - 1))
    return seed + 1 if is_held_out(seed) else seed


@dataclass(frozen=True)
class TrainingClip:
    """One example: what the model is given (reference, audio) and must produce (frames)."""

    reference: np.ndarray  # uint8 [H, W, 3]: mouth closed, eyes open, centred
    frames: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray  # float32 [round(T * sr / fps)]: what the model hears (augmented)
    clean_audio: np.ndarray  # float32, same span: the speech that drove the mouth
    track: FaceTrack  # the controls the frames were rendered from (for debugging, not training)
    mouth_box: tuple[int, int, int, int]
    identity_seed: int
    speech_seed: int


class ClipSampler:
    """Endless stream of clips of random identities saying random synthetic speech.

    `split="train"` never draws a held-out seed; `split="eval"` draws only held-out ones. The
    stream is deterministic for a given `seed`, and `clip(identity_seed, speech_seed)` rebuilds
    any single clip exactly.
    """

    def __init__(
        self,
        size: int = 128,
        fps: int = 25,
        sample_rate: int = 16000,
        clip_frames: int = 48,
        seed: int | Sequence[int] = 0,
        split: str = "train",
        augment: bool = True,
        preroll_frames: int = 25,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError("split must be 'train' or 'eval'")
        if clip_frames < 1 or size < 32 or fps <= 0 or sample_rate < 8000:
            raise ValueError("clip_frames >= 1, size >= 32, fps > 0 and sample_rate >= 8000 needed")
        self.size = size
        self.fps = fps
        self.sample_rate = sample_rate
        self.clip_frames = clip_frames
        self.split = split
        self.augment = augment
        # Pre-roll gives the mouth and loudness normalisation some history; a multiple of the
        # frames-per-whole-sample period keeps the clip's frame boundaries exactly round(i*sr/fps).
        period = Fraction(sample_rate) / Fraction(fps).limit_denominator(1000)
        step = period.denominator
        self.preroll_frames = int(math.ceil(preroll_frames / step) * step)
        self._rng = np.random.default_rng(seed)

    def sample(self) -> TrainingClip:
        """The next clip of the stream."""
        return self.clip(_draw_seed(self._rng, self.split), _draw_seed(self._rng, self.split))

    def __iter__(self) -> Iterator[TrainingClip]:
        while True:
            yield self.sample()

    def clip(self, identity_seed: int, speech_seed: int) -> TrainingClip:
        """The clip of one identity saying one utterance (deterministic)."""
        sr, fps, pre, n = self.sample_rate, self.fps, self.preroll_frames, self.clip_frames
        rng = np.random.default_rng([_CLIP_STREAM, identity_seed, speech_seed])
        speech_rng = np.random.default_rng([_SPEECH_STREAM, speech_seed])
        bounds = frame_bounds(pre + n, sr, fps)
        total = int(bounds[-1])

        factor = float(rng.uniform(0.94, 1.06)) if self.augment else 1.0
        speaker = sample_speaker(speech_rng)
        clean = synth_speech(total * factor / sr + 0.05, sr, speech_rng, speaker)
        if factor != 1.0:
            clean = change_speed(clean, factor)
        clean = np.pad(clean, (0, max(0, total - clean.size)))[:total]
        heard = augment_audio(clean, rng, sr, speed=False) if self.augment else clean

        track = drive_from_audio(clean, sr, fps, rng, num_frames=pre + n)
        track = FaceTrack(*(c[pre:] for c in track))
        identity = identity_from_seed(identity_seed)
        start = int(bounds[pre])
        return TrainingClip(
            reference=reference_image(identity, self.size),
            frames=render_track(identity, track, self.size),
            audio=np.ascontiguousarray(heard[start:], dtype=np.float32),
            clean_audio=np.ascontiguousarray(clean[start:], dtype=np.float32),
            track=track,
            mouth_box=mouth_box(identity, self.size),
            identity_seed=identity_seed,
            speech_seed=speech_seed,
        )


class ClipDataset(IterableDataset):
    """`ClipSampler` as a torch IterableDataset; each DataLoader worker gets its own stream.

    Items are dicts of tensors: reference uint8 [H, W, 3], frames uint8 [T, H, W, 3], audio
    float32 [samples], identity_seed int64 — the default collate stacks them into batches.
    """

    def __init__(self, seed: int = 0, **sampler_kwargs: object) -> None:
        super().__init__()
        self.seed = seed
        self.sampler_kwargs = sampler_kwargs

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        sampler = ClipSampler(seed=(self.seed, worker), **self.sampler_kwargs)  # type: ignore[arg-type]
        for clip in sampler:
            yield {
                "reference": torch.from_numpy(clip.reference),
                "frames": torch.from_numpy(clip.frames),
                "audio": torch.from_numpy(clip.audio),
                "identity_seed": torch.tensor(clip.identity_seed, dtype=torch.int64),
            }
