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


class ClipNoise:
    """Live Avatar's noise: one draw per clip of `blocks_per_clip` blocks, from a generator on
    the model's device seeded with seed + clip index, in the model dtype; block b takes its
    frames of its clip. Drawn this way a stream's noise equals upstream's for the same seed on
    the same kind of device (CUDA and CPU generators differ, so this mode is device-bound)."""

    def __init__(
        self,
        shape: tuple[int, ...],
        seed: int,
        blocks_per_clip: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shape = shape  # [1, C, F, h, w] of one block
        self.seed = int(seed)
        self.blocks_per_clip = int(blocks_per_clip)
        self.device = torch.device(device)
        self.dtype = dtype
        self.block = 0
        self._clip: torch.Tensor | None = None

    def next(self) -> torch.Tensor:
        _, c, f, h, w = self.shape
        clip, k = divmod(self.block, self.blocks_per_clip)
        if k == 0:
            g = torch.Generator(device=self.device).manual_seed(self.seed + clip)
            self._clip = torch.randn(
                c,
                f * self.blocks_per_clip,
                h,
                w,
                generator=g,
                device=self.device,
                dtype=self.dtype,
            )
        self.block += 1
        return self._clip[None, :, k * f : (k + 1) * f].clone()
