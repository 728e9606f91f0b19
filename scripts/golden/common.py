"""Helpers shared by the golden-fixture scripts (scratch environment only).

The tiny S2V config keeps every module type and key name of Wan2.2-S2V-14B / Live Avatar, with
small sizes: 3 layers of width 24 (2 heads of 12), audio injected after layers 0 and 2, a
16-wide text and audio feature space, 8x16 latents (64x128 pixels).
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

TINY_S2V = dict(
    model_type="s2v",
    patch_size=(1, 2, 2),
    text_len=512,
    in_dim=16,
    dim=24,
    ffn_dim=32,
    freq_dim=16,
    text_dim=16,
    out_dim=16,
    num_heads=2,
    num_layers=3,
    window_size=(-1, -1),
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
    cond_dim=16,
    audio_dim=16,
    num_audio_token=4,
    enable_adain=True,
    adain_mode="attn_norm",
    audio_inject_layers=[0, 2],
    zero_init=True,
    zero_timestep=True,
    enable_motioner=False,
    add_last_motion=True,
    enable_tsm=False,
    trainable_token_pos_emb=False,
    enable_framepack=True,
    framepack_drop_mode="padd",
)
# What diffusers' register_to_config writes for WanModel_S2V (patch_size, text_dim, ... are in
# its ignore_for_config, so the released config.json does not carry them).
CONFIG_JSON_IGNORED = ("patch_size", "cross_attn_norm", "qk_norm", "text_dim", "window_size")
LATENT_HW = (8, 16)


def upstream_commit(path: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def setup(upstream: Path) -> None:
    """Make the upstream checkout importable, with the CPU shim loaded first."""
    here = Path(__file__).resolve().parent
    for p in (str(here), str(here.parents[1]), str(upstream)):
        if p not in sys.path:
            sys.path.insert(0, p)
    importlib.import_module("_shim")


def exact_attention_stubs() -> None:
    """flash-attn / cuDNN kernels are CUDA-only: compute the same attention with SDPA in the
    inputs' dtype (the function is softmax(q k^T / sqrt(d)) v either way)."""
    import torch
    import torch.nn.functional as F

    def sdpa(q, k, v, *args, **kwargs):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2).contiguous().type(q.dtype)

    for name in (
        "liveavatar.models.wan.causal_model_s2v",
        "liveavatar.models.wan.wan_2_2.modules.model",
        "liveavatar.models.wan.wan_2_2.modules.s2v.model_s2v",
    ):
        mod = importlib.import_module(name)
        for attr in ("attention", "flash_attention"):
            if hasattr(mod, attr):
                setattr(mod, attr, sdpa)
    del torch


def patch_source(cls: type, method: str, replacements: list[tuple]) -> None:
    """Re-define an upstream method with literal replacements (tiny configs: upstream hard-codes
    the 14B's sizes in a few places). Each (old, new[, count]) must match exactly `count` times
    (default once), so a changed upstream fails loudly instead of running unpatched."""
    src = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    for old, new, *count in replacements:
        expected = count[0] if count else 1
        if src.count(old) != expected:
            raise RuntimeError(f"patch of {cls.__name__}.{method}: {old!r} found {src.count(old)}x")
        src = src.replace(old, new)
    module = sys.modules[cls.__module__]
    namespace: dict[str, Any] = {}
    exec(compile(src, f"<patched {cls.__name__}.{method}>", "exec"), module.__dict__, namespace)
    func = namespace[method]
    setattr(cls, method, getattr(func, "__wrapped__", func))


def randomize(module, seed: int) -> None:
    """Deterministic random weights for every parameter, including the ones upstream
    zero-initialises (audio injector outputs, token-type embedding, pose encoder), so that
    every path changes the output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                scale = 1.0 / max(1, p[0].numel()) ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name.endswith("weight") and ("norm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def config_json(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tiny config as the released config.json spells it."""
    out = {"_class_name": "WanModel_S2V", "_diffusers_version": "0.35.0"}
    out.update({k: v for k, v in cfg.items() if k not in CONFIG_JSON_IGNORED})
    out.setdefault("motion_token_num", 1024)
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
