"""Host-to-device copies on the hot path: pinned and non-blocking, so the host never waits.

A copy from ordinary (pageable) host memory to a GPU is synchronous: the host blocks until the
bytes are on the device, which stalls the queue of kernels the host was ahead by. From pinned
(page-locked) memory the copy is queued like a kernel and the host moves on. PyTorch's caching
host allocator keeps a pinned block alive until its copy has finished, so a pinned staging copy
can be dropped right after the call.
"""

from __future__ import annotations

import torch


def to_device(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`tensor` on `device` in `dtype` (cast once, on the host, before the copy: fewer bytes to
    move for bfloat16). To a CUDA device the copy is non-blocking from pinned memory; on the
    CPU it is the plain cast (no copy when nothing changes)."""
    device = torch.device(device)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
