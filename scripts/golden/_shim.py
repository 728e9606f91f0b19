"""Scratch-environment shim for running the upstream Live Avatar code on a CPU-only machine.

The upstream code hard-codes CUDA devices (``.to("cuda")``, ``torch.cuda.current_device()`` as a
default argument, KV caches allocated on ``cuda:N``) and imports packages that its forward passes
never call. Importing this module first maps every CUDA device to the CPU and stubs those
packages. It changes where tensors live, never what is computed. Import it before any upstream
module, and only in the scratch environment: nothing in the project imports it.
"""

from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("ENABLE_COMPILE", "false")  # upstream wraps forwards in torch.compile

import torch  # noqa: E402


def _cpu(device):
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


for _name in (
    "zeros", "ones", "empty", "full", "randn", "rand", "randint", "tensor", "arange",
    "zeros_like", "ones_like", "empty_like", "randn_like", "linspace", "as_tensor",
):  # fmt: skip
    setattr(torch, _name, _factory(getattr(torch, _name)))

_tensor_to = torch.Tensor.to


def _to(self, *args, **kwargs):
    args = tuple(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
    if "device" in kwargs:
        kwargs["device"] = _cpu(kwargs["device"])
    return _tensor_to(self, *args, **kwargs)


torch.Tensor.to = _to
torch.Tensor.cuda = lambda self, *a, **k: self

_module_to = torch.nn.Module.to


def _module_to_cpu(self, *args, **kwargs):
    args = tuple(
        _cpu(a) if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool) else a
        for a in args
    )
    if "device" in kwargs:
        kwargs["device"] = _cpu(kwargs["device"])
    return _module_to(self, *args, **kwargs)


torch.nn.Module.to = _module_to_cpu
torch.nn.Module.cuda = lambda self, *a, **k: self

_Generator = torch.Generator


class _CpuGenerator(_Generator):
    def __new__(cls, device="cpu"):
        return _Generator(device=_cpu(device))


torch.Generator = _CpuGenerator
torch.cuda.current_device = lambda: "cpu"
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.empty_cache = lambda *a, **k: None
torch.cuda.set_device = lambda *a, **k: None


class _NotUsed:
    """Stands in for a class of a stubbed package; fails loudly if anything calls it."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__}: stubbed in the scratch environment")


def stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


stub("decord", VideoReader=_NotUsed)  # video reading (pose videos), not used here
