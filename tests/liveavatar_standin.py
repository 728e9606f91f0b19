"""Stand-in for the Live Avatar transformer in checkpoint and LoRA tests: a module tree with the
base checkpoint's dotted names, nn.Linear where upstream has one (listed in the golden meta.json),
bare parameters elsewhere. The loaders only see names, shapes and Linear-ness, so this tests them
without the S2V model itself."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

FIXTURES = Path(__file__).parent / "fixtures" / "liveavatar" / "lora"


def _child(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else []:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    return module


def standin_model(
    shapes: Mapping[str, torch.Size], linear_modules: Iterable[str], device: str = "meta"
) -> nn.Module:
    """`shapes`: state-dict key -> shape. Every tensor is float32 on `device` (uninitialised)."""
    root = nn.Module()
    linears = set(linear_modules)
    for name in sorted(linears):
        out_f, in_f = shapes[f"{name}.weight"]
        parent, _, child = name.rpartition(".")
        bias = f"{name}.bias" in shapes
        _child(root, parent).add_module(child, nn.Linear(in_f, out_f, bias=bias, device=device))
    for key, shape in shapes.items():
        module, _, attr = key.rpartition(".")
        if module not in linears:
            param = nn.Parameter(torch.empty(shape, device=device), requires_grad=False)
            _child(root, module).register_parameter(attr, param)
    return root


def fixture_meta() -> dict:
    return json.loads((FIXTURES / "meta.json").read_text())


def fixture_base_state() -> dict[str, torch.Tensor]:
    """The tiny base, read independently of the loader under test."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted((FIXTURES / "base").glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def fixture_standin(device: str = "meta") -> nn.Module:
    shapes = {k: v.shape for k, v in fixture_base_state().items()}
    return standin_model(shapes, fixture_meta()["linear_modules"], device)
