"""Peak working memory of a computation, found by running it on the meta device.

Meta tensors carry shapes and dtypes but no data, so a 14B model's forward or a VAE decode at
full size runs here in a second without allocating anything. A dispatch mode sees every op's
outputs: each new tensor adds its bytes when it is made and gives them back when it dies, and
the highest total is the working set the computation needs on top of what existed before
(weights, caches). Views and in-place results share their input's storage and add nothing.

Fused attention (scaled_dot_product_attention) reaches the mode as one op whose only output is
the attention result, so the score matrix is not counted, as on a GPU with flash attention.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors made inside the mode and still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new storage
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def traced_bytes(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak, still alive after) bytes of the tensors `fn` makes; run it on meta tensors."""
    mode = LiveBytes()
    with torch.inference_mode(), mode:
        result = fn()
    alive = mode.live
    del result
    return mode.peak, alive
