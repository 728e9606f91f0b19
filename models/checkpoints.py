"""Sharded safetensors checkpoints (the Hugging Face release layout), loaded lazily.

A released 14B transformer is four ~10 GB shards plus an index::

    folder/
      diffusion_pytorch_model.safetensors.index.json   {"metadata": {"total_size": N},
                                                         "weight_map": {key: shard file}}
      diffusion_pytorch_model-00001-of-00004.safetensors
      ...

`load_sharded_safetensors` fills a model built on the meta device shard by shard, tensor by
tensor, so the host never holds more than the model plus the shard being read (safetensors maps
the file; its pages count as resident only while that shard is open). A `key_filter` loads part
of a model, e.g. only the layers a pipeline rank runs. A `transform` hook sees each tensor on its
way in; the LoRA merge uses it, so merging costs no second copy of the model. Every fault a user
can cause (missing shard, truncated file, keys of another model) raises ConfigError naming the
file, and a failed load leaves the model exactly as it was given: nothing half-loaded survives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.errors import ConfigError, ModelNotFoundError

WEIGHTS_PREFIX = "diffusion_pytorch_model"
INDEX_NAME = f"{WEIGHTS_PREFIX}.safetensors.index.json"
SINGLE_NAME = f"{WEIGHTS_PREFIX}.safetensors"

KeyFilter = Callable[[str], bool]
# (checkpoint key, tensor on the target device in the target dtype) -> tensor to assign.
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def checkpoint_keys(folder: str | Path, index_name: str = INDEX_NAME) -> dict[str, Path]:
    """Every key of a checkpoint folder -> the shard file that holds it.

    Reads only the index (or the single file's header). Raises ModelNotFoundError for a folder
    without weights and ConfigError for an unreadable index or a shard the index names but the
    folder lacks, before any tensor is read.
    """
    folder = Path(folder)
    index_path = folder / index_name
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index_path}: not a safetensors index ({exc})") from None
        keys: dict[str, Path] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise ConfigError(
                    f"{index_path}: shard name {shard!r} of {key!r} is not a file name"
                )
            keys[key] = folder / shard
        for shard in sorted(set(keys.values())):
            if not shard.is_file():
                raise ConfigError(f"{shard}: shard named by {index_path.name} is missing")
        return keys
    single = folder / SINGLE_NAME
    if single.is_file():
        with open_safetensors(single) as f:
            return {key: single for key in f.keys()}  # noqa: SIM118 (not a dict)
    raise ModelNotFoundError(f"{folder}: no {index_name} and no {SINGLE_NAME}")


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """safe_open whose failures (truncated, corrupt, unreadable) become ConfigError naming it."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError
        raise ConfigError(f"{path}: unreadable safetensors file ({exc})") from None
    with handle as f:
        yield f


@dataclass
class _Slot:
    """Where one state-dict entry lives on the module, and what was there before loading."""

    module: nn.Module
    attr: str
    is_param: bool
    original: torch.Tensor

    def assign(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            grad = self.original.requires_grad
            self.module._parameters[self.attr] = nn.Parameter(tensor, requires_grad=grad)
        else:
            self.module._buffers[self.attr] = tensor

    def restore(self) -> None:
        if self.is_param:
            self.module._parameters[self.attr] = self.original
        else:
            self.module._buffers[self.attr] = self.original


def _slots(model: nn.Module) -> dict[str, _Slot]:
    """State-dict names (parameters and persistent buffers) -> slots, shared tensors once."""
    slots: dict[str, _Slot] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(prefix + attr, _Slot(module, attr, True, p))
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                slots.setdefault(prefix + attr, _Slot(module, attr, False, b))
    return slots


def load_sharded_safetensors(
    model: nn.Module,
    folder: str | Path,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    index_name: str = INDEX_NAME,
    key_filter: KeyFilter | None = None,
    strict: bool = True,
    transform: Transform | None = None,
) -> nn.Module:
    """Fill `model` (built on the meta device) from a sharded or single-file checkpoint.

    Floating tensors are cast to `dtype` (None keeps the stored dtype) and moved to `device` one
    at a time. Keys `key_filter` rejects are neither read nor required; the matching parameters
    stay on the meta device. With `strict`, keys the filter accepts must match the model's both
    ways (missing and unexpected keys raise ConfigError before any tensor is read); shapes must
    always match. `transform(key, tensor)` gets each tensor already on `device` in `dtype`, as a
    loaded model would hold it, and returns what to assign (cast back to `dtype`); so a LoRA
    merges into the rounded weights exactly as upstream merges into its loaded model. On any
    error the model is restored to the tensors it was given and the error propagates.
    """
    folder = Path(folder)
    device = torch.device(device)
    keys = checkpoint_keys(folder, index_name)
    source = folder / index_name if (folder / index_name).is_file() else folder / SINGLE_NAME

    def wanted(key: str) -> bool:
        return key_filter is None or key_filter(key)

    slots = _slots(model)
    file_keys = {k for k in keys if wanted(k)}
    model_keys = {k for k in slots if wanted(k)}
    if strict:
        if unexpected := file_keys - model_keys:
            raise ConfigError(
                f"{source}: {len(unexpected)} keys the model does not have, e.g. {_few(unexpected)}"
            )
        if missing := model_keys - file_keys:
            raise ConfigError(
                f"{source}: {len(missing)} keys of the model are missing, e.g. {_few(missing)}"
            )
    to_load = sorted(file_keys & model_keys)
    by_shard: dict[Path, list[str]] = {}
    for key in to_load:
        by_shard.setdefault(keys[key], []).append(key)

    loaded: list[_Slot] = []
    try:
        for shard in sorted(by_shard):
            with open_safetensors(shard) as f:
                present = set(f.keys())
                if absent := [k for k in by_shard[shard] if k not in present]:
                    raise ConfigError(
                        f"{shard}: lacks {len(absent)} keys its index lists, e.g. {_few(absent)}"
                    )
                for key in by_shard[shard]:
                    slot = slots[key]
                    try:
                        raw = f.get_tensor(key)
                    except Exception as exc:
                        raise ConfigError(f"{shard}: cannot read {key!r} ({exc})") from None
                    if raw.shape != slot.original.shape:
                        raise ConfigError(
                            f"{shard}: {key!r} has shape {tuple(raw.shape)}, "
                            f"the model expects {tuple(slot.original.shape)}"
                        )
                    target = dtype if dtype is not None and raw.is_floating_point() else raw.dtype
                    tensor = raw.to(device, target)
                    if transform is not None:
                        tensor = transform(key, tensor).to(device, target)
                    if tensor.data_ptr() == raw.data_ptr():
                        # Still a view of the file mapping: own it, so the shard can be unmapped
                        # and a later rewrite of the file cannot change the weights.
                        tensor = tensor.clone()
                    slot.assign(tensor)
                    loaded.append(slot)
                    # A view left alive here would keep this shard mapped (and its pages
                    # resident) while the next shard is read.
                    del raw, tensor
    except BaseException:
        for slot in loaded:
            slot.restore()
        raise
    return model


def write_sharded_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | Path,
    *,
    prefix: str = WEIGHTS_PREFIX,
    max_shard_bytes: int,
) -> Path:
    """Write `state_dict` in the release layout: shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own) named `{prefix}-0000i-of-0000n.safetensors` plus
    `{prefix}.safetensors.index.json`, or `{prefix}.safetensors` alone when one shard suffices,
    as Hugging Face writes them. Returns the index (or the single file)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes

    def tensors(group: list[str]) -> dict[str, torch.Tensor]:
        return {k: state_dict[k].detach().to("cpu").contiguous() for k in group}

    if len(groups) == 1:
        path = folder / f"{prefix}.safetensors"
        save_file(tensors(groups[0]), str(path), metadata={"format": "pt"})
        return path
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        name = f"{prefix}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors(group), str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    path = folder / f"{prefix}.safetensors.index.json"
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path
