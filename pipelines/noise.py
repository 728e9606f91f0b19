"""Initial noise for each block, optionally coordinated across blocks (DualParal).

Independent noise per block is the default. Coordinated noise draws one template per session and
gives every block a permutation of the template's frames, so neighbouring blocks share noise
statistics and the seams between blocks are smoother. Noise is always drawn on the CPU from the
session's own generator, so the same seed gives the same video on any device or executor.
"""

from __future__ import annotations

import torch


class BlockNoise:
    def __init__(self, shape: tuple[int, ...], seed: int, coordinated: bool = False) -> None:
        self.shape = shape  # [1, C, F, h, w]
        self.coordinated = coordinated
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.template = torch.randn(shape, generator=self.generator) if coordinated else None

    def next(self) -> torch.Tensor:
        if self.template is None:
            return torch.randn(self.shape, generator=self.generator)
        perm = torch.randperm(self.shape[2], generator=self.generator)
        return self.template[:, :, perm].clone()
