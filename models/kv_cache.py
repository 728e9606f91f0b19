"""Self-attention key/value caches for block-wise causal generation.

`KVCache` is a preallocated ring buffer holding the keys and values of the last `window_frames`
latent frames for every layer, plus a sink: the keys/values of an anchor frame, stored *without*
rotary position so they can be rotated to any temporal index at read time.

Keys in the ring are stored already rotated at their absolute temporal positions. Attention is
invariant to the order of keys, so the ring is read in slot order: no roll, no copy, no mask.
All bookkeeping (how many frames are filled, where the next block goes) is plain Python ints on
the host, so reading and writing never synchronise with the device. A compiled block step takes
the write position as a tensor of ring slots (`ring_index`) instead: an int that changes from
block to block would be a new constant, and a recompile, every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.errors import ConfigError


@dataclass
class KVCache:
    keys: torch.Tensor  # [layers, B, window_frames * tokens_per_frame, heads, head_dim]
    values: torch.Tensor
    sink_keys: (
        torch.Tensor
    )  # [layers, B, sink_frames * tokens_per_frame, heads, head_dim], unrotated
    sink_values: torch.Tensor
    tokens_per_frame: int
    window_frames: int
    sink_frames: int
    filled_frames: int = 0
    has_sink: bool = False

    @classmethod
    def allocate(
        cls,
        *,
        layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        window_frames: int,
        sink_frames: int = 1,
        sink_tokens: int | None = None,
        frames_per_block: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        if window_frames < 0 or sink_frames < 0:
            raise ConfigError("window_frames and sink_frames must not be negative")
        if frames_per_block < 1:
            raise ConfigError(f"frames_per_block must be positive, got {frames_per_block}")
        if window_frames % frames_per_block:
            raise ConfigError(
                f"window_frames ({window_frames}) must be a multiple of frames_per_block "
                f"({frames_per_block}) so that a block never wraps around the ring"
            )
        shape = (layers, batch, window_frames * tokens_per_frame, heads, head_dim)
        # sink_tokens: a sink that is not whole frames of the block's grid (Live Avatar's sink is
        # the reference frame plus packed motion tokens at coarser grids).
        n_sink = sink_frames * tokens_per_frame if sink_tokens is None else sink_tokens
        sink_shape = (layers, batch, n_sink, heads, head_dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            sink_keys=torch.zeros(sink_shape, device=device, dtype=dtype),
            sink_values=torch.zeros(sink_shape, device=device, dtype=dtype),
            tokens_per_frame=tokens_per_frame,
            window_frames=window_frames,
            sink_frames=sink_frames,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.values, self.sink_keys, self.sink_values)

    def history(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of the filled part of the window for one layer."""
        n = self.filled_frames * self.tokens_per_frame
        return self.keys[layer, :, :n], self.values[layer, :, :n]

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block's rotated keys/values (frames start_frame…) into the ring."""
        if self.window_frames == 0:
            return
        t = self.tokens_per_frame
        slot = (start_frame % self.window_frames) * t
        n = k.shape[1]
        self.keys[layer, :, slot : slot + n].copy_(k)
        self.values[layer, :, slot : slot + n].copy_(v)

    def ring_index(self, start_frame: int, frames: int, device: torch.device | str) -> torch.Tensor:
        """Token slots [frames * tokens_per_frame] of the ring that a block starting at
        `start_frame` writes, as a LongTensor on `device` (built there by arange: no copy from
        the host). Empty for a zero-length ring."""
        if self.window_frames == 0:
            return torch.empty(0, dtype=torch.long, device=device)
        t = self.tokens_per_frame
        first = (start_frame % self.window_frames) * t
        return torch.arange(first, first + frames * t, device=device)

    def write_at(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block's rotated keys/values at the ring slots `index` (from ring_index): the
        same write as `write`, with the position as data rather than as a Python int."""
        if index.numel() == 0:
            return
        self.keys[layer].index_copy_(1, index, k)
        self.values[layer].index_copy_(1, index, v)

    def advance(self, frames: int) -> None:
        """Mark `frames` more frames as written (called once per block, after all layers)."""
        self.filled_frames = min(self.window_frames, self.filled_frames + frames)

    def write_sink(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store unrotated sink keys/values for one layer."""
        self.sink_keys[layer, :, : k.shape[1]].copy_(k)
        self.sink_values[layer, :, : v.shape[1]].copy_(v)
        self.has_sink = True

    def reset(self) -> None:
        self.filled_frames = 0
        self.has_sink = False
