"""Golden fixtures for the sharded checkpoint loader and Live Avatar's LoRA merge.

Runs in the scratch environment (upstream Live Avatar + PEFT importable, see _shim.py). Builds
upstream's CausalWanModel_S2V at a tiny size with every parameter random (the zero-initialised
ones too), writes it as a sharded release-layout folder with our writer, writes a tiny LoRA with
our writer (rank 4, alpha 2: scale 0.5, not 1), lets upstream's `WanS2V.add_lora_to_model` (PEFT
get_peft_model + load_state_dict + merge_and_unload) merge it, and saves what came out:

    lora/base/            sharded tiny base (3 shards + index + config.json); other tests reuse it
    lora/lora/            liveavatar.safetensors, upstream's key spelling, plus non-LoRA tensors
    lora/merged_fp32.safetensors   upstream's merge (float32 model): every targeted weight and
                                   every tensor the merge changed
    lora/merged_bf16.safetensors   the same merge on a bfloat16 model
    lora/unmerged_outputs.safetensors  PEFT's unmerged LoRA Linears on fixed inputs (float32)
    lora/meta.json        config, LoRA settings, Linear module names, changed and ignored keys

Usage: PYTHONPATH=scripts/golden:.:<upstream> <scratch python> scripts/golden/lora.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import types
from pathlib import Path

import _shim  # noqa: F401  (before any upstream module: CUDA -> CPU, stubs)
import torch
from torch import nn

from models.checkpoints import write_sharded_safetensors
from models.lora import DEFAULT_TARGETS, LORA_FILE, targeted, write_tiny_lora

UPSTREAM = "Alibaba-Quark/LiveAvatar@9c2c38de1715e553127b42c82cb959f756b02595"
CONFIG = dict(
    model_type="s2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=24, ffn_dim=32,
    freq_dim=16, text_dim=16, out_dim=16, num_heads=2, num_layers=3, window_size=(-1, -1),
    qk_norm=True, cross_attn_norm=True, eps=1e-6, cond_dim=16, audio_dim=16, num_audio_token=4,
    enable_adain=True, adain_mode="attn_norm", audio_inject_layers=[0, 2], zero_init=True,
    zero_timestep=True, enable_motioner=False, add_last_motion=True, enable_tsm=False,
    trainable_token_pos_emb=False, enable_framepack=True, framepack_drop_mode="padd",
)  # fmt: skip
RANK, ALPHA, SEED = 4, 2.0, 0
# Non-LoRA tensors in the LoRA file, one per case of upstream's load_state_dict(strict=False):
EXTRA = {
    "blocks.1.norm3.weight": "replaces (module not wrapped by PEFT)",
    "blocks.0.self_attn.q.base_layer.bias": "replaces (PEFT's name of a wrapped module's bias)",
    "blocks.0.cross_attn.k.base_layer.weight": "replaces, then the LoRA merges on top",
    "blocks.2.ffn.0.weight": "ignored (the wrapped module's weight is base_layer.weight)",
}


def random_base(seed: int) -> nn.Module:
    from liveavatar.models.wan.causal_model_s2v import CausalWanModel_S2V

    torch.manual_seed(seed)
    model = CausalWanModel_S2V(**CONFIG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + 1.0 if "norm" in name and p.ndim == 1 else noise)
    return model


def upstream_merge(model: nn.Module, lora_file: Path, record: dict | None) -> nn.Module:
    """Upstream's own entry point; `record` (if given) gets PEFT's unmerged Linear outputs."""
    from liveavatar.models.wan.causal_s2v_pipeline_tpp_blockwise import WanS2V
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.merge_and_unload

    def recording_merge(self, *args, **kwargs):
        if record is not None:
            gen = torch.Generator().manual_seed(SEED + 1)
            for name, mod in self.model.named_modules():
                if hasattr(mod, "lora_A") and not name.endswith(("lora_A", "lora_B")):
                    x = record.setdefault(
                        f"input.{mod.in_features}",
                        torch.randn(2, 3, mod.in_features, generator=gen),
                    )
                    with torch.no_grad():
                        record[f"output.{name}"] = mod(x.to(mod.weight.dtype)).float()
        return original(self, *args, **kwargs)

    BaseTuner.merge_and_unload = recording_merge
    try:
        return WanS2V.add_lora_to_model(
            types.SimpleNamespace(), model, lora_rank=RANK, lora_alpha=ALPHA,
            lora_target_modules=",".join(DEFAULT_TARGETS), init_lora_weights="kaiming",
            pretrained_lora_path=str(lora_file.resolve()),  # upstream resolves relative paths oddly
        )  # fmt: skip
    finally:
        BaseTuner.merge_and_unload = original


def run(upstream: Path, out: Path) -> dict:
    from safetensors.torch import save_file

    sys.path.insert(0, str(upstream))
    out = out / "lora"
    out.mkdir(parents=True, exist_ok=True)
    model = random_base(SEED)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    targets = [n for n in linears if targeted(n, DEFAULT_TARGETS)]

    base_dir = out / "base"
    write_sharded_safetensors(base, base_dir, max_shard_bytes=400 * 1024)
    config = {"_class_name": "WanModel_S2V", **CONFIG}
    (base_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Our layout must be what upstream's own from_pretrained reads. Upstream's class lists
    # text_dim, patch_size, ... in ignore_for_config: from_pretrained drops them from config.json
    # and builds its defaults (text_dim 4096), so the tiny model needs a subclass that keeps them.
    from liveavatar.models.wan.causal_model_s2v import CausalWanModel_S2V

    class TinyReader(CausalWanModel_S2V):
        ignore_for_config = ["args", "kwargs"]

    reread = TinyReader.from_pretrained(str(base_dir)).state_dict()
    assert reread.keys() == base.keys() and all(torch.equal(reread[k], base[k]) for k in base)

    gen = torch.Generator().manual_seed(SEED + 2)
    extra = {}
    for key in EXTRA:
        shape = base[key.replace(".base_layer.", ".")].shape
        extra[key] = torch.randn(shape, generator=gen) * 0.1
    lora_file = write_tiny_lora(out / "lora", base, RANK, ALPHA, SEED, extra=extra)

    meta: dict = {"upstream": UPSTREAM, "config": CONFIG, "rank": RANK, "alpha": ALPHA}
    record: dict[str, torch.Tensor] = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        start = copy.deepcopy(model).to(dtype)
        start_sd = {k: v.clone() for k, v in start.state_dict().items()}
        merged = upstream_merge(start, lora_file, record if dtype == torch.float32 else None)
        merged_sd = merged.state_dict()
        assert merged_sd.keys() == start_sd.keys(), "merge_and_unload changed the key set"
        changed = sorted(k for k in merged_sd if not torch.equal(merged_sd[k], start_sd[k]))
        keep = sorted(set(changed) | {f"{n}.weight" for n in targets})
        save_file(
            {k: merged_sd[k].contiguous() for k in keep},
            str(out / f"merged_{name}.safetensors"),
            metadata={"upstream": UPSTREAM},
        )
        meta[f"changed_{name}"] = changed
    save_file(record, str(out / "unmerged_outputs.safetensors"), metadata={"upstream": UPSTREAM})

    import peft

    meta.update(
        lora_file=f"lora/{LORA_FILE}",
        linear_modules=linears,
        targeted_modules=targets,
        extra=EXTRA,
        versions={"torch": torch.__version__, "peft": peft.__version__},
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, default=Path("/tmp/up/LiveAvatar"))
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/liveavatar"))
    args = parser.parse_args()
    result = run(args.upstream, args.out)
    print(json.dumps({k: result[k] for k in ("changed_fp32", "changed_bf16")}, indent=1))
