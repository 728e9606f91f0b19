"""The Wan 2.1 VAE as Wan ships it (`Wan2.1_VAE.pth`, also inside Wan2.2-S2V-14B, which Live Avatar
uses) loaded into diffusers' AutoencoderKLWan through a key map.

The original file is a plain torch state dict of Wan's own `WanVAE_` module; diffusers names the
same tensors differently and nests the decoder's flat list of up blocks by stage:

```
original Wan (Wan2.1_VAE.pth)              diffusers AutoencoderKLWan
-----------------------------------------  ------------------------------------------------
encoder.conv1 / decoder.conv1              encoder.conv_in / decoder.conv_in
conv1 / conv2 (around the latent)          quant_conv / post_quant_conv
<side>.middle.0 | .1 | .2                  <side>.mid_block.resnets.0 | attentions.0 | resnets.1
<side>.head.0 / .head.2                    <side>.norm_out / conv_out
encoder.downsamples.{i}                    encoder.down_blocks.{i}           (same flat index)
decoder.upsamples.{k}  (flat: per stage    decoder.up_blocks.{s}.resnets.{j}  (k = s*(R+2)+j)
  R+1 residual blocks, then a resample)    decoder.up_blocks.{s}.upsamplers.0 (k = s*(R+2)+R+1)
inside a residual block:                   R = num_res_blocks
  residual.0 / .2 / .3 / .6, shortcut     norm1 / conv1 / norm2 / conv2, conv_shortcut
inside attention and resample blocks:
  norm, to_qkv, proj, resample.1, time_conv  the same names
```

The config (channel widths, stages, residual blocks per stage, temporal downsampling) is read from
the tensors' shapes, so any model of this family loads; what the file does not say falls back to
AutoencoderKLWan's defaults, which are Wan 2.1's released values.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from models.errors import ConfigError, ModelNotFoundError
from models.vae import WanStreamingVAE, _import_wan

T = TypeVar("T")

CHECKPOINT_NAME = "Wan2.1_VAE.pth"

# Residual block: original Sequential index -> diffusers attribute. Attention and resample
# blocks use the same names in both layouts.
_RESIDUAL = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}
_RESIDUAL_BACK = {v: k for k, v in _RESIDUAL.items()}
_SAME_NAME = {"norm", "to_qkv", "proj", "resample.1", "time_conv"}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MIDDLE_BACK = {v: k for k, v in _MIDDLE.items()}
_HEAD = {"head.0": "norm_out", "head.2": "conv_out", "conv1": "conv_in"}
_HEAD_BACK = {v: k for k, v in _HEAD.items()}
_QUANT = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_QUANT_BACK = {v: k for k, v in _QUANT.items()}


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _inner(name: str, table: Mapping[str, str]) -> str | None:
    """Translate the part of a key inside one block (e.g. `residual.2` -> `conv1`)."""
    if name in table:
        return table[name]
    return name if name in _SAME_NAME else None


def to_diffusers_key(key: str, num_res_blocks: int = 2) -> str | None:
    """Original Wan VAE key -> AutoencoderKLWan key; None for a key of no known block.

    `num_res_blocks` is needed because the original decoder numbers its blocks in one flat list.
    """
    module, param = _split(key)
    if module in _QUANT:
        return f"{_QUANT[module]}.{param}"
    side, _, rest = module.partition(".")
    if side not in ("encoder", "decoder") or not param:
        return None
    if rest in _HEAD:
        return f"{side}.{_HEAD[rest]}.{param}"
    m = re.fullmatch(r"middle\.([012])\.(.+)", rest)
    if m:
        block = _MIDDLE[m[1]]
        inner = _inner(m[2], _RESIDUAL if block.startswith("resnets") else {})
        return None if inner is None else f"{side}.mid_block.{block}.{inner}.{param}"
    m = re.fullmatch(r"(downsamples|upsamples)\.(\d+)\.(.+)", rest)
    if m is None or (m[1] == "downsamples") != (side == "encoder"):
        return None
    index, inner = int(m[2]), _inner(m[3], _RESIDUAL)
    if inner is None:
        return None
    if side == "encoder":
        return f"encoder.down_blocks.{index}.{inner}.{param}"
    stage, slot = divmod(index, num_res_blocks + 2)
    if slot <= num_res_blocks:
        return f"decoder.up_blocks.{stage}.resnets.{slot}.{inner}.{param}"
    return f"decoder.up_blocks.{stage}.upsamplers.0.{inner}.{param}"


def to_original_key(key: str, num_res_blocks: int = 2) -> str | None:
    """AutoencoderKLWan key -> original Wan VAE key; None for a key of no known block."""
    module, param = _split(key)
    if module in _QUANT_BACK:
        return f"{_QUANT_BACK[module]}.{param}"
    side, _, rest = module.partition(".")
    if side not in ("encoder", "decoder") or not param:
        return None
    if rest in _HEAD_BACK:
        return f"{side}.{_HEAD_BACK[rest]}.{param}"
    m = re.fullmatch(r"mid_block\.(resnets\.[01]|attentions\.0)\.(.+)", rest)
    if m:
        inner = _inner(m[2], _RESIDUAL_BACK if m[1].startswith("resnets") else {})
        return None if inner is None else f"{side}.middle.{_MIDDLE_BACK[m[1]]}.{inner}.{param}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if m and side == "encoder":
        inner = _inner(m[2], _RESIDUAL_BACK)
        return None if inner is None else f"encoder.downsamples.{m[1]}.{inner}.{param}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", rest)
    if m is None or side != "decoder":
        return None
    if m[3] is not None and int(m[3]) > num_res_blocks:
        return None
    slot = int(m[3]) if m[3] is not None else num_res_blocks + 1
    inner = _inner(m[4], _RESIDUAL_BACK)
    index = int(m[1]) * (num_res_blocks + 2) + slot
    return None if inner is None else f"decoder.upsamples.{index}.{inner}.{param}"


def original_to_diffusers(
    state: Mapping[str, T], num_res_blocks: int = 2
) -> tuple[dict[str, T], list[str]]:
    """Rename a whole original state dict. Returns (renamed tensors, original keys of no known
    block); the latter are reported as unexpected when loading, never matched by name."""
    renamed: dict[str, T] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        new = to_diffusers_key(key, num_res_blocks)
        if new is None:
            unmapped.append(key)
        elif new in renamed:
            raise ConfigError(f"two original keys map to {new}, one of them {key}")
        else:
            renamed[new] = value
    return renamed, unmapped


def diffusers_to_original(state: Mapping[str, T], num_res_blocks: int = 2) -> dict[str, T]:
    """Rename an AutoencoderKLWan state dict to the original Wan layout (what `Wan2.1_VAE.pth` holds)."""
    out: dict[str, T] = {}
    for key, value in state.items():
        new = to_original_key(key, num_res_blocks)
        if new is None:
            raise ConfigError(f"AutoencoderKLWan key {key} has no place in the original Wan layout")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------
# Config from shapes
# --------------------------------------------------------------------------------------------


def _encoder_blocks(state: Mapping[str, Any]) -> list[str]:
    """Kinds of the original encoder's flat block list, in order: res, attn, down2d, down3d."""
    kinds = []
    for i in range(len(state)):
        prefix = f"encoder.downsamples.{i}."
        if f"{prefix}residual.2.weight" in state:
            kinds.append("res")
        elif f"{prefix}to_qkv.weight" in state:
            kinds.append("attn")
        elif f"{prefix}time_conv.weight" in state:
            kinds.append("down3d")
        elif f"{prefix}resample.1.weight" in state:
            kinds.append("down2d")
        else:
            break
    return kinds


def infer_wan21_vae_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKLWan keyword arguments read from an original-layout state dict's shapes.

    Only what the tensors show is returned; the rest is left to AutoencoderKLWan's defaults (Wan
    2.1 as released). A state dict of another model yields an incomplete config, and loading then
    reports its missing and unexpected keys.
    """
    config: dict[str, Any] = {}
    conv_in = state.get("encoder.conv1.weight")
    if conv_in is not None and conv_in.ndim == 5:
        config["base_dim"] = int(conv_in.shape[0])
    post_quant = state.get("conv2.weight")
    if post_quant is not None and post_quant.ndim == 5:
        config["z_dim"] = int(post_quant.shape[0])

    kinds = _encoder_blocks(state)
    stages: list[list[int]] = [[]]  # indices of each stage's residual blocks
    temporal, attn_stages = [], set()
    for index, kind in enumerate(kinds):
        if kind == "res":
            stages[-1].append(index)
        elif kind == "attn":
            attn_stages.add(len(stages) - 1)
        else:
            temporal.append(kind == "down3d")
            stages.append([])
    if "base_dim" not in config or not all(stages):
        return config
    base = config["base_dim"]
    widths = [int(state[f"encoder.downsamples.{s[0]}.residual.2.weight"].shape[0]) for s in stages]
    if any(w % base for w in widths):
        return config
    config["dim_mult"] = [w // base for w in widths]
    config["num_res_blocks"] = len(stages[0])
    config["temperal_downsample"] = temporal
    config["attn_scales"] = [1.0 / 2**s for s in sorted(attn_stages)]
    return config


# --------------------------------------------------------------------------------------------
# Loading and writing
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only (no code runs from the file) and, for the zip format every
    torch.save since 1.6 writes, mmap: tensors stay in the page cache instead of a second copy."""
    try:
        state = torch.load(
            file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)
        )
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(
            f"cannot read {file} as a torch checkpoint (truncated or not a state dict?): "
            f"{_first_line(exc)}"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"{file} does not hold a plain state dict of tensors")
    return dict(state)


def _few(keys: Sequence[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_wan21_vae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanStreamingVAE:
    """Load `Wan2.1_VAE.pth` (the file, or a model folder holding it) as a WanStreamingVAE.

    The diffusers model is built on the meta device and the file's (memory-mapped) tensors are
    assigned to it, so the weights never sit in memory twice. Every mismatch between file and
    model is a ConfigError naming the file.
    """
    wan_cls, _ = _import_wan()
    file = Path(path)
    if file.is_dir():
        file = file / CHECKPOINT_NAME
    if not file.is_file():
        raise ModelNotFoundError(f"Wan 2.1 VAE checkpoint not found: {file}")
    state = _read_state_dict(file)
    config = infer_wan21_vae_config(state)
    if config.get("attn_scales"):
        raise ConfigError(
            f"{file} has attention blocks in its down/up stages, which diffusers' "
            "AutoencoderKLWan cannot hold: only Wan 2.1-style VAEs without them load"
        )
    num_res_blocks = config.get("num_res_blocks", 2)
    renamed, unmapped = original_to_diffusers(state, num_res_blocks)
    try:
        with torch.device("meta"):
            model = wan_cls(**config)
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise ConfigError(f"{file}: inconsistent Wan VAE shapes ({_first_line(exc)})") from exc
    expected = model.state_dict()
    missing = sorted(to_original_key(k, num_res_blocks) or k for k in expected if k not in renamed)
    unexpected = sorted(
        unmapped + [str(to_original_key(k, num_res_blocks)) for k in renamed if k not in expected]
    )
    if missing or unexpected:
        raise ConfigError(
            f"{file} is not a Wan 2.1 VAE state dict: {len(missing)} missing keys"
            f"{' (' + _few(missing) + ')' if missing else ''}, {len(unexpected)} unexpected keys"
            f"{' (' + _few(unexpected) + ')' if unexpected else ''}"
        )
    for key, target in expected.items():
        if renamed[key].shape != target.shape:
            raise ConfigError(
                f"{file}: tensor {to_original_key(key, num_res_blocks)} has shape {tuple(renamed[key].shape)}, the other "
                f"tensors imply {tuple(target.shape)}"
            )
    model.load_state_dict(renamed, strict=True, assign=True)
    model.requires_grad_(False)
    # nn.Module.to: ModelMixin.to warns about float32-kept modules on every dtype cast, and this
    # model has none. A no-op for float32 on the CPU, so the weights stay memory-mapped.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    return WanStreamingVAE(model)


def write_tiny_wan21_vae(
    path: str | Path,
    seed: int = 0,
    base_dim: int = 8,
    dim_mult: Sequence[int] = (1, 1, 1, 1),
    num_res_blocks: int = 1,
    temperal_downsample: Sequence[bool] = (False, True, True),
) -> Path:
    """Write a random Wan 2.1-layout VAE (about 330 KB at the defaults) for tests.

    Its keys follow `Wan2.1_VAE.pth`'s layout (released: base_dim 96, dim_mult (1, 2, 4, 4), two
    residual blocks per stage; the defaults here are 8 channels and one block), keeps z_dim=16 (the transformer and Wan's latent statistics use 16
    channels) and the released temporal downsampling, so its latents are 4x in time and 8x in
    space. Norm scales are drawn around 1 rather than left at 1, so a swapped norm shows.
    """
    wan_cls, _ = _import_wan()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = wan_cls(
            base_dim=base_dim,
            z_dim=16,
            dim_mult=list(dim_mult),
            num_res_blocks=num_res_blocks,
            temperal_downsample=list(temperal_downsample),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(1.0 + 0.25 * torch.randn_like(p))
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(diffusers_to_original(tensors, num_res_blocks), out)
    return out


__all__ = [
    "CHECKPOINT_NAME",
    "diffusers_to_original",
    "infer_wan21_vae_config",
    "load_wan21_vae",
    "original_to_diffusers",
    "to_diffusers_key",
    "to_original_key",
    "write_tiny_wan21_vae",
]
