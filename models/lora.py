"""Live Avatar's LoRA on the Wan2.2-S2V-14B transformer: read, check, merge or keep unmerged.

Live Avatar ships one PEFT LoRA (rank 128, alpha 64, targets q,k,v,o,ffn.0,ffn.2) that upstream
applies with `get_peft_model` + `load_state_dict(strict=False)` + `merge_and_unload`. We do the
same arithmetic without PEFT:

    merged:    W <- W + (alpha / r) * B @ A       (float32, then cast back to W's dtype)
    unmerged:  y  = x W^T + b + (alpha / r) * (x A^T) B^T

PEFT's target rule is a suffix match on module names, so "q" also hits the audio injector's
`audio_injector.injector.N.q`. Key spellings accepted, per key: with or without the
"base_model.model." prefix, with or without an adapter name ("lora_A.default.weight" or
"lora_A.weight"). A non-LoRA tensor in the file replaces the base tensor upstream's
`load_state_dict` would replace: `X.attr` for a module PEFT did not wrap, `X.base_layer.attr` for
one it wrapped. Upstream silently drops the other spellings (`X.weight` of a wrapped X, its model
having renamed it `X.base_layer.weight`); so do we, with a warning, so merges stay equal.

The merge streams: `LoraWeights.merge_tensor` is the `transform` of
`models.checkpoints.load_sharded_safetensors`, applied to each weight as its shard is read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import KeyFilter, load_sharded_safetensors, open_safetensors
from models.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

LORA_FILE = "liveavatar.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
DEFAULT_ALPHA = 64.0  # liveavatar/configs/s2v_causal_sft.yaml; the released file has no config
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def targeted(module: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target names: the full name or a dotted suffix of it."""
    return any(module == t or module.endswith("." + t) for t in targets)


def _lora_path(folder: Path) -> Path:
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such LoRA folder")
    if (folder / LORA_FILE).is_file():
        return folder / LORA_FILE
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise ModelNotFoundError(
            f"{folder}: expected {LORA_FILE} or exactly one *.safetensors, found {len(found)}"
        )
    return found[0]


def _adapter_config(folder: Path, path: Path) -> dict:
    cfg_path = (folder if folder.is_dir() else folder.parent) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: unreadable ({exc})") from None
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise ConfigError(f"{cfg_path}: {flag}=true is not supported for {path.name}")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pattern):
            raise ConfigError(f"{cfg_path}: per-module {pattern} is not supported")
    if isinstance(cfg.get("target_modules"), str):
        raise ConfigError(f"{cfg_path}: a regex target_modules is not supported; pass targets=")
    return cfg


@dataclass
class LoraWeights:
    """One LoRA file, parsed against nothing but its own keys; `validate` checks it on a base.

    Tensors are views of the file mapping (safetensors), read from disk only when used.
    """

    path: Path
    rank: int
    alpha: float
    targets: tuple[str, ...]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])
    pair_keys: dict[str, str]  # module -> its lora_A key in the file, for messages
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # base key -> tensor
    ignored: tuple[str, ...] = ()  # file keys upstream's load_state_dict drops too

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, model: nn.Module, key_filter: KeyFilter | None = None) -> None:
        """Every LoRA pair sits on a Linear of `model` with matching sizes, every replacement on
        a tensor of the same shape; the first violation (in key order) raises ConfigError.
        With `key_filter` (a rank loading part of the model) only the pairs and replacements
        of the weights it loads are checked."""
        modules = dict(model.named_modules())
        for name in sorted(self.pairs, key=self.pair_keys.__getitem__):
            if key_filter is not None and not key_filter(f"{name}.weight"):
                continue
            key, mod = self.pair_keys[name], modules.get(name)
            if not isinstance(mod, nn.Linear):
                what = "has no such module" if mod is None else f"has a {type(mod).__name__}"
                raise ConfigError(f"{self.path}: {key}: the base model {what} at {name!r}")
            a, b = self.pairs[name]
            if a.shape != (self.rank, mod.in_features) or b.shape != (mod.out_features, self.rank):
                raise ConfigError(
                    f"{self.path}: {key}: LoRA {tuple(b.shape)} @ {tuple(a.shape)} does not fit "
                    f"the base's {name} Linear({mod.in_features}, {mod.out_features})"
                )
        state = dict(model.named_parameters())
        state.update(model.named_buffers())
        for key in sorted(self.replacements):
            if key_filter is not None and not key_filter(key):
                continue
            if key not in state:
                raise ConfigError(f"{self.path}: {key}: the base model has no such tensor")
            if self.replacements[key].shape != state[key].shape:
                raise ConfigError(
                    f"{self.path}: {key} has shape {tuple(self.replacements[key].shape)}, "
                    f"the base's is {tuple(state[key].shape)}"
                )

    def delta(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """(alpha / r) * B @ A in float32, PEFT's order of operations."""
        a, b = self.pairs[module]
        return (b.to(device, torch.float32) @ a.to(device, torch.float32)) * self.scale

    def replace_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Loader transform for unmerged mode: only the file's non-LoRA replacements, cast to the
        model's dtype as upstream's load_state_dict copies them."""
        if key in self.replacements:
            return self.replacements[key].to(tensor.device, tensor.dtype)
        return tensor

    def merge_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Loader transform for merged mode: replacement first (upstream loads it before merging),
        then W + delta in float32 from W in the model's dtype; the loader casts the sum back."""
        tensor = self.replace_tensor(key, tensor)
        module, _, attr = key.rpartition(".")
        if attr == "weight" and module in self.pairs:
            return tensor.to(torch.float32) + self.delta(module, tensor.device)
        return tensor

    def merge_into(self, model: nn.Module) -> None:
        """Merge into an already loaded model, one weight at a time (no second copy)."""
        self.validate(model)
        state = dict(model.named_parameters())
        state.update(model.named_buffers())
        with torch.no_grad():
            for key, value in self.replacements.items():
                if not state[key].is_meta:
                    state[key].copy_(value)
            for name in self.pairs:
                weight = model.get_submodule(name).weight
                if not weight.is_meta:
                    weight.copy_(self.merge_tensor(f"{name}.weight", weight))

    def apply_unmerged(self, model: nn.Module, *, dtype: torch.dtype = torch.float32) -> list[str]:
        """Swap each LoRA-carrying Linear for a LoraLinear (same state-dict names, LoRA in
        `dtype`; PEFT keeps adapters in float32). Linears still on the meta device (left out by
        a key filter) are skipped. Returns the swapped module names."""
        self.validate(model)
        swapped = []
        for name in sorted(self.pairs):
            base = model.get_submodule(name)
            if base.weight.is_meta:
                continue
            a, b = self.pairs[name]
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, LoraLinear(base, a, b, self.scale, dtype=dtype))
            swapped.append(name)
        return swapped


class LoraLinear(nn.Linear):
    """A Linear plus an unmerged low-rank update. It keeps the base's `weight` and `bias`
    parameters under their own names, so state dicts and checkpoint loads see a plain Linear;
    the LoRA factors are non-persistent buffers that follow `.to()`."""

    def __init__(
        self,
        base: nn.Linear,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.register_buffer("lora_a", lora_a.to(device, dtype).clone(), persistent=False)
        self.register_buffer("lora_b", lora_b.to(device, dtype).clone(), persistent=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        low = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return (out + low * self.scale).to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def read_lora(
    folder: str | Path,
    *,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
) -> LoraWeights:
    """Parse a LoRA folder (liveavatar.safetensors, or its only *.safetensors; a file path works
    too). Rank comes from the tensors; alpha and targets from the arguments, else
    adapter_config.json, else Live Avatar's training config (alpha 64, q,k,v,o,ffn.0,ffn.2)."""
    folder = Path(folder)
    path = _lora_path(folder)
    cfg = _adapter_config(folder, path)
    targets = tuple(targets or cfg.get("target_modules") or DEFAULT_TARGETS)
    alpha = float(alpha if alpha is not None else cfg.get("lora_alpha", DEFAULT_ALPHA))

    with open_safetensors(path) as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapters: set[str] = set()
    replacements: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key in sorted(tensors):
        bare = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.fullmatch(bare)
        if match:
            adapters.add(match["adapter"] or "")
            halves.setdefault(match["module"], {})[match["ab"]] = (key, tensors[key])
            continue
        if "lora_" in bare:
            raise ConfigError(f"{path}: {key}: unsupported LoRA tensor (only lora_A/lora_B)")
        if ".base_layer." in bare:  # a wrapped module's own weight, as PEFT names it
            base = bare.replace(".base_layer.", ".")
            if targeted(base.rpartition(".")[0], targets):
                replacements[base] = tensors[key]
            else:
                ignored.append(key)  # upstream's PEFT model has no such name
        elif targeted(bare.rpartition(".")[0], targets):
            ignored.append(key)  # upstream's PEFT model calls it X.base_layer.attr
        else:
            replacements[bare] = tensors[key]
    if len(adapters) > 1:
        raise ConfigError(f"{path}: several adapters in one file: {sorted(adapters)}")
    if not halves:
        raise ConfigError(f"{path}: no lora_A/lora_B weights")

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pair_keys: dict[str, str] = {}
    rank = cfg.get("r")
    for module in sorted(halves, key=lambda m: min(k for k, _ in halves[m].values())):
        half = halves[module]
        first_key = min(k for k, _ in half.values())
        if set(half) != {"A", "B"}:
            raise ConfigError(f"{path}: {first_key}: lora_A and lora_B must come in pairs")
        if not targeted(module, targets):
            raise ConfigError(
                f"{path}: {first_key}: {module!r} is not among the targets {','.join(targets)}"
            )
        (a_key, a), (_, b) = half["A"], half["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(f"{path}: {a_key}: A {tuple(a.shape)} and B {tuple(b.shape)} differ")
        rank = rank or a.shape[0]
        if a.shape[0] != rank:
            raise ConfigError(f"{path}: {a_key}: rank {a.shape[0]}, expected {rank}")
        pairs[module] = (a, b)
        pair_keys[module] = a_key
    if ignored:
        log.warning(
            "%s: %d tensors ignored as upstream ignores them, e.g. %s",
            path,
            len(ignored),
            ignored[0],
        )
    log.info("%s: LoRA on %d modules, rank %d, alpha %g", path, len(pairs), rank, alpha)
    return LoraWeights(
        path, int(rank), alpha, targets, pairs, pair_keys, replacements, tuple(ignored)
    )


def load_with_lora(
    model: nn.Module,
    base_folder: str | Path,
    lora_folder: str | Path,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    mode: str = "merged",
    key_filter: KeyFilter | None = None,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load the base checkpoint into `model` (meta) with the LoRA merged as shards stream in
    (`mode="merged"`, upstream's choice) or kept beside each Linear (`mode="unmerged"`). The
    LoRA is checked against the model before any base tensor is read."""
    if mode not in ("merged", "unmerged"):
        raise ConfigError(f"LoRA mode must be 'merged' or 'unmerged', got {mode!r}")
    lora = read_lora(lora_folder, alpha=alpha, targets=targets)
    lora.validate(model, key_filter)
    transform = lora.merge_tensor if mode == "merged" else lora.replace_tensor
    load_sharded_safetensors(
        model, base_folder, dtype=dtype, device=device, key_filter=key_filter, transform=transform
    )
    if mode == "unmerged":
        lora.apply_unmerged(model, dtype=lora_dtype)
    return model


def write_tiny_lora(
    folder: str | Path,
    base_state_dict: Mapping[str, torch.Tensor],
    rank: int,
    alpha: float,
    seed: int,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    peft_prefix: bool = True,
    adapter_name: str | None = "default",
    extra: Mapping[str, torch.Tensor] | None = None,
    adapter_config: bool = False,
    std: float = 0.1,
) -> Path:
    """Write a random LoRA for every targeted 2-D weight of `base_state_dict` as
    `folder/liveavatar.safetensors`, spelled as upstream's loader needs it by default
    ("base_model.model.X.lora_A.default.weight"). `extra` tensors are written under their
    given names (with the prefix when `peft_prefix`). Returns the file."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    pfx = PEFT_PREFIX if peft_prefix else ""
    mid = f".{adapter_name}" if adapter_name else ""
    out: dict[str, torch.Tensor] = {}
    for key, weight in base_state_dict.items():
        module, _, attr = key.rpartition(".")
        if attr != "weight" or weight.ndim != 2 or not targeted(module, targets):
            continue
        out_f, in_f = weight.shape
        out[f"{pfx}{module}.lora_A{mid}.weight"] = torch.randn(rank, in_f, generator=gen) * std
        out[f"{pfx}{module}.lora_B{mid}.weight"] = torch.randn(out_f, rank, generator=gen) * std
    for key, tensor in (extra or {}).items():
        out[f"{pfx}{key}"] = tensor.detach().to("cpu").contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_FILE
    save_file(out, str(path), metadata={"format": "pt"})
    if adapter_config:
        cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
        (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return path
