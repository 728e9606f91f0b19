"""FP8 for the transformer's linear layers (torchao), on GPUs with FP8 tensor cores.

What is quantised: every nn.Linear inside a transformer block (self- and cross-attention
projections, the feed-forward, a block's audio cross-attention) whose both sizes are multiples
of 16, as the FP8 matrix multiply needs. What stays in bfloat16: the attention itself (softmax
of q·k), every norm, the embeddings (patch, timestep, text), the output head, the audio
encoder and injectors outside the blocks, the VAE. Those are a small share of the FLOPs and the
most sensitive to rounding.

Two modes: ``fp8`` (dynamic activations and weights, per-row scales: both operands of the
matmul in FP8, the fast one) and ``fp8-weight`` (weights stored in FP8, activations in bf16:
half the weight memory, less drift, no FP8 matmul).
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import ConfigError

QUANT_MODES = ("none", "fp8", "fp8-weight")
FP8_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) and later have FP8 tensor cores


def check_quant(mode: str | None) -> str:
    """The mode's canonical name; ConfigError naming the choices otherwise."""
    mode = (mode or "none").lower()
    if mode not in QUANT_MODES:
        raise ConfigError(f"unknown --quant {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    return mode


def fp8_unsupported(device: torch.device | str) -> str | None:
    """Why `device` cannot run FP8 matmuls, in one line; None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"--quant fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or "
            f"newer: Ada, Hopper), and this runs on {device.type}; drop --quant fp8"
        )
    if not torch.cuda.is_available():
        return "--quant fp8: CUDA is not available on this machine; drop --quant fp8"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"--quant fp8 needs compute capability 8.9 or newer (Ada, Hopper); {name} is "
            f"{major}.{minor}; drop --quant fp8"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        return (
            "--quant fp8 needs torchao, which `make install` adds on a machine with an NVIDIA "
            "GPU: pip install -e '.[gpu]'"
        )
    return None


def fp8_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers `quantize_fp8` converts: those inside a transformer block
    (`blocks.N.`) whose input and output sizes are both multiples of 16."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and name.startswith("blocks.")
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
    ]


def quantize_fp8(model: nn.Module, mode: str, device: torch.device | str) -> list[str]:
    """Convert the model's block linears to FP8 in place (torchao); returns their names.
    Raises ConfigError, in one line, on a device that cannot run it."""
    mode = check_quant(mode)
    if mode == "none":
        return []
    reason = fp8_unsupported(device)
    if reason is not None:
        raise ConfigError(reason)
    weight = next(model.parameters())
    if weight.dtype != torch.bfloat16:
        raise ConfigError(
            f"--quant {mode} keeps the rest of the model in bfloat16, but it is in "
            f"{str(weight.dtype).replace('torch.', '')}: use --dtype bfloat16"
        )
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    names = set(fp8_layers(model))
    config = (
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if mode == "fp8"
        else Float8WeightOnlyConfig()
    )
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    return sorted(names)
