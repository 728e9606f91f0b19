"""Flow-matching timesteps for few-step sampling.

x_t = (1 - σ) x_0 + σ ε, the model predicts v = ε - x_0, and one Euler step is
x_{σ'} = x_σ + (σ' - σ) v. Few-step students (Self-Forcing, Live Avatar) use a shifted schedule:
σ ↦ shift·σ / (1 + (shift - 1)·σ), which spends more steps at high noise.

Two spacings: ``shifted`` (the project's own: S+1 evenly spaced levels from 1 to 0, shifted) and
``diffusers`` (what diffusers' FlowMatchEulerDiscreteScheduler does, which Live Avatar samples
with: the levels span the shifted training range [σ(1/1000), 1] and are shifted a second time,
in float32, ending at 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from models.errors import ConfigError

SPACINGS = ("shifted", "diffusers")


@dataclass(frozen=True)
class FlowMatchSchedule:
    steps: int = 4
    shift: float = 5.0
    num_train_timesteps: int = 1000
    spacing: str = "shifted"

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"steps must be between 1 and 1000, got {self.steps}")
        if self.shift <= 0:
            raise ConfigError(f"shift must be positive, got {self.shift}")
        if self.spacing not in SPACINGS:
            raise ConfigError(
                f"unknown schedule spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}"
            )

    @cached_property
    def sigmas(self) -> list[float]:
        """steps + 1 noise levels from 1 down to 0 (the last is the clean sample)."""
        if self.spacing == "diffusers":
            return self._diffusers_sigmas()
        raw = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        shifted = self.shift * raw / (1 + (self.shift - 1) * raw)
        return [float(s) for s in shifted]

    def _diffusers_sigmas(self) -> list[float]:
        n, shift = self.num_train_timesteps, self.shift
        lowest = np.float32(1.0) / np.float32(n)  # the smallest training level, then shifted
        sigma_min = np.float32(shift) * lowest / (np.float32(1) + np.float32(shift - 1) * lowest)
        levels = np.linspace(1.0 * n, float(sigma_min) * n, self.steps) / n
        levels = shift * levels / (1 + (shift - 1) * levels)
        return [float(np.float32(s)) for s in levels] + [0.0]

    @cached_property
    def timesteps(self) -> list[float]:
        """Model timesteps (σ·1000) of the `steps` denoising steps."""
        return [s * self.num_train_timesteps for s in self.sigmas[:-1]]

    def euler(self, x: torch.Tensor, velocity: torch.Tensor, step: int) -> torch.Tensor:
        s = self.sigmas
        if self.spacing == "diffusers":  # float32 levels, float32 difference, as diffusers
            dt = float(np.float32(s[step + 1]) - np.float32(s[step]))
            return (x.float() + dt * velocity).to(velocity.dtype)
        return (x.float() + (s[step + 1] - s[step]) * velocity.float()).to(x.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return (1 - sigma) * x0 + sigma * noise
