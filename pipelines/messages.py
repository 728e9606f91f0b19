"""The small vocabulary of typed messages that flow between the service and the executors.

Everything that crosses a thread or process boundary is one of these: plain dataclasses of
tensors and numbers, cheap to pickle, with no sockets or model objects inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SessionSpec:
    """What an executor needs to open a session: the reference image and sampling options."""

    session_id: str
    reference: np.ndarray  # uint8 [H, W, 3], already at the model's resolution
    seed: int = 0
    steps: int | None = None  # None: the pipeline's default
    sink_refresh: bool | None = None  # None: the model's default (Live Avatar refreshes)
    prompt: str | None = None  # None: the model's default prompt


@dataclass(frozen=True)
class BlockRequest:
    """Generate block `block_index` of a session from the audio that drives it.

    `audio` is the raw mono window at the model's audio rate covering exactly this block's video
    frames (so the service can send the same samples to the viewer); features are computed by the
    executor, next to the model.
    """

    session_id: str
    block_index: int
    audio: np.ndarray  # float32 [samples], mono, at the pipeline's audio sample rate
    submitted_at: float = 0.0  # time.perf_counter() on the submitting side


@dataclass
class BlockTimings:
    """Wall-clock seconds spent in each stage of one block (measured where it ran)."""

    features: float = 0.0
    denoise: float = 0.0
    denoise_steps: list[float] = field(default_factory=list)
    cache_update: float = 0.0
    decode: float = 0.0
    total: float = 0.0


@dataclass
class BlockResult:
    """The decoded frames of one block, or the error that ended its session."""

    session_id: str
    block_index: int
    frames: np.ndarray | None  # uint8 [N, H, W, 3]
    timings: BlockTimings = field(default_factory=BlockTimings)
    submitted_at: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LatentBlock:
    """A block's latent between pipeline stages (TPP ranks, DualParal queue)."""

    session_id: str
    block_index: int
    step: int
    latent: torch.Tensor  # [1, C, F, h, w]
