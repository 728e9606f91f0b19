"""Live Avatar's LoRA (models/lora.py) against upstream's PEFT merge.

Fixtures (scripts/golden/lora.py): a tiny random CausalWanModel_S2V base, a rank-4 alpha-2 LoRA
(scale 0.5) in upstream's key spelling with four non-LoRA tensors (one per load_state_dict
case), and what upstream's `WanS2V.add_lora_to_model` made of them on a float32 and a bfloat16
model, plus PEFT's unmerged Linear outputs. Tolerances: merges are compared exactly (measured
bit-equal in float32 and bfloat16: same float32 arithmetic as PEFT, same rounding point);
unmerged outputs to rtol 1e-5 / atol 1e-6 (float32, different summation order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoints import load_sharded_safetensors
from models.errors import ConfigError, ModelNotFoundError
from models.lora import (
    DEFAULT_ALPHA,
    LORA_FILE,
    LoraLinear,
    load_with_lora,
    read_lora,
    write_tiny_lora,
)
from tests.liveavatar_standin import FIXTURES, fixture_base_state, fixture_meta, fixture_standin

BASE, LORA = FIXTURES / "base", FIXTURES / "lora"
ALPHA = 2.0  # the golden LoRA's; upstream passes alpha from its yaml, the file carries none


def upstream(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / f"{name}.safetensors")


def assert_merge_matches(model: torch.nn.Module, merged: dict[str, torch.Tensor], dtype) -> None:
    """Keys upstream changed or targeted equal upstream's; every other key equals the base."""
    state, base = model.state_dict(), fixture_base_state()
    assert state.keys() == base.keys()
    for key, value in state.items():
        want = merged[key] if key in merged else base[key].to(dtype)
        assert value.dtype == dtype and torch.equal(value, want), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_merge_equals_upstream(dtype):
    """LoRA merged while the shards stream in == upstream's merge_and_unload, bit for bit, in
    both dtypes; this covers the suffix targets (audio_injector.injector.N.q), the
    replacements (norm3, q.base_layer.bias), replace-then-merge (cross_attn.k) and the
    ignored X.weight spelling. Fails if (each tried): scale is 1 instead of alpha/r; A and B
    are swapped (B.T @ A.T); the ignored blocks.2.ffn.0.weight is applied; the replacement
    comes after the merge; the bf16 merge adds the delta to the unrounded float32 weight."""
    model = load_with_lora(fixture_standin(), BASE, LORA, dtype=dtype, alpha=ALPHA)
    name = "fp32" if dtype == torch.float32 else "bf16"
    merged = upstream(f"merged_{name}")
    assert set(fixture_meta()[f"changed_{name}"]) <= set(merged)
    assert_merge_matches(model, merged, dtype)


def test_merge_into_loaded_model_equals_upstream():
    """The same merge applied to an already loaded model. Fails if merge_into skips the
    replacements or merges a weight twice."""
    model = load_sharded_safetensors(fixture_standin(), BASE, dtype=torch.float32)
    read_lora(LORA, alpha=ALPHA).merge_into(model)
    assert_merge_matches(model, upstream("merged_fp32"), torch.float32)


def test_parsed_lora_matches_upstream_reading():
    """Rank from the tensors, alpha 64 when nothing says otherwise, 38 targeted modules (the
    audio injector's q/k/v/o among them), and the one tensor upstream drops. Fails if the
    suffix rule misses the injector or the default alpha changes."""
    meta = fixture_meta()
    lora = read_lora(LORA)
    assert (lora.rank, lora.alpha, lora.scale) == (4, DEFAULT_ALPHA, 16.0)
    assert sorted(lora.pairs) == meta["targeted_modules"] and len(lora.pairs) == 38
    assert lora.ignored == ("base_model.model.blocks.2.ffn.0.weight",)
    assert sorted(lora.replacements) == [
        "blocks.0.cross_attn.k.weight",
        "blocks.0.self_attn.q.bias",
        "blocks.1.norm3.weight",
    ]
    assert read_lora(LORA, alpha=ALPHA).scale == 0.5


def test_unmerged_equals_peft_and_merged():
    """LoraLinear == PEFT's unmerged LoRA Linear on the same inputs == the merged Linear; the
    model's state dict keeps the base names and values. Fails if (tried) the LoRA branch is
    dropped, scaled by 1, or the replacement (q.base_layer.bias) is not applied."""
    model = load_with_lora(
        fixture_standin(), BASE, LORA, dtype=torch.float32, alpha=ALPHA, mode="unmerged"
    )
    peft = upstream("unmerged_outputs")
    merged = upstream("merged_fp32")
    targets = fixture_meta()["targeted_modules"]
    for name in targets:
        mod = model.get_submodule(name)
        assert isinstance(mod, LoraLinear), name
        x = peft[f"input.{mod.in_features}"]
        with torch.no_grad():
            y = mod(x)
            y_merged = torch.nn.functional.linear(x, merged[f"{name}.weight"], mod.bias)
        torch.testing.assert_close(y, peft[f"output.{name}"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, y_merged, rtol=1e-5, atol=1e-6)
    state, base = model.state_dict(), fixture_base_state()
    assert state.keys() == base.keys()
    assert torch.equal(state["blocks.0.self_attn.q.bias"], merged["blocks.0.self_attn.q.bias"])
    assert torch.equal(state["blocks.1.self_attn.q.weight"], base["blocks.1.self_attn.q.weight"])


def test_key_filter_merges_only_loaded_layers():
    """A rank that loads only block 1 gets block 1 merged and leaves the rest on meta; unmerged
    mode wraps only loaded Linears. Fails if the LoRA forces loading of filtered layers."""
    model = load_with_lora(
        fixture_standin(), BASE, LORA, dtype=torch.float32, alpha=ALPHA,
        key_filter=lambda k: k.startswith("blocks.1."),
    )  # fmt: skip
    merged, base = upstream("merged_fp32"), fixture_base_state()
    for key, value in model.state_dict().items():
        if key.startswith("blocks.1."):
            assert torch.equal(value, merged.get(key, base[key])), key
        else:
            assert value.is_meta, key
    unmerged = load_with_lora(
        fixture_standin(), BASE, LORA, dtype=torch.float32, alpha=ALPHA, mode="unmerged",
        key_filter=lambda k: k.startswith("blocks.1."),
    )  # fmt: skip
    wrapped = [n for n, m in unmerged.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(n.startswith("blocks.1.") for n in wrapped)


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("adapter", ["default", None], ids=["default", "no-adapter"])
def test_key_spellings_all_merge_the_same(tmp_path, prefix, adapter):
    """The golden LoRA's tensors rewritten with/without "base_model.model." and with/without
    ".default." merge exactly like the golden file. Fails if (tried) the prefix is required,
    or the adapter segment is required (the no-adapter spelling then parses no pairs)."""
    golden = load_file(LORA / LORA_FILE)
    respelled = {}
    for key, value in golden.items():
        key = key if prefix else key.removeprefix("base_model.model.")
        key = key if adapter else key.replace(".default.", ".")
        respelled[key] = value
    (tmp_path / "l").mkdir()
    save_file(respelled, tmp_path / "l" / "other_name.safetensors")  # the only *.safetensors
    model = load_with_lora(fixture_standin(), BASE, tmp_path / "l", dtype=torch.float32, alpha=2)
    assert_merge_matches(model, upstream("merged_fp32"), torch.float32)


def test_lora_for_another_base_is_refused(tmp_path):
    """A LoRA written for a wider model (dim 32, not 24) is refused before any base tensor is
    read, naming the file and its first key. Fails if shapes are not checked (tried: the
    size check removed -> the merge raises a raw matmul error mid-load)."""
    other = {k: torch.zeros([32 if s == 24 else s for s in v.shape]) for k, v in
             fixture_base_state().items()}  # fmt: skip
    path = write_tiny_lora(tmp_path / "other", other, rank=4, alpha=2, seed=0)
    model = fixture_standin()
    first = "base_model.model.audio_injector.injector.0.k.lora_A.default.weight"
    with pytest.raises(ConfigError, match=rf"{path}: {first}: LoRA .* does not fit"):
        load_with_lora(model, BASE, path.parent, dtype=torch.float32)
    assert all(t.is_meta for t in model.state_dict().values())


def test_lora_on_missing_or_non_linear_module_is_refused(tmp_path):
    """LoRA pairs for a block the base lacks, or for a targeted name that is not a Linear.
    Fails if validate only checks shapes of modules it finds."""
    base = fixture_base_state()
    extra_block = {k.replace("blocks.2.", "blocks.7."): v for k, v in base.items()}
    path = write_tiny_lora(tmp_path / "a", extra_block, rank=4, alpha=2, seed=0)
    with pytest.raises(ConfigError, match=rf"{path}: .*blocks\.7\..*has no such module"):
        read_lora(path).validate(fixture_standin())
    model = fixture_standin()
    model.blocks.get_submodule("0.self_attn").q = torch.nn.Identity()
    with pytest.raises(ConfigError, match=r"has a Identity at 'blocks.0.self_attn.q'"):
        read_lora(LORA).validate(model)


def test_malformed_lora_files(tmp_path):
    """Each a ConfigError/ModelNotFoundError naming the file, never a raw error: lone lora_A,
    two adapters, a LoRA outside the targets, mixed ranks, unsupported DoRA tensors, a
    truncated file, a folder without a LoRA, an adapter_config rank that disagrees."""
    a = torch.zeros(4, 24)
    b = torch.zeros(24, 4)
    cases = {
        "lone": ({"blocks.0.ffn.0.lora_A.weight": a}, "must come in pairs"),
        "two": (
            {"x.q.lora_A.one.weight": a, "x.q.lora_B.one.weight": b,
             "y.q.lora_A.two.weight": a, "y.q.lora_B.two.weight": b},
            "several adapters",
        ),
        "target": (
            {"head.head.lora_A.weight": a, "head.head.lora_B.weight": b}, "not among the targets"
        ),
        "ranks": (
            {"x.q.lora_A.weight": a, "x.q.lora_B.weight": b,
             "y.q.lora_A.weight": a[:2], "y.q.lora_B.weight": b[:, :2]},
            "rank 2, expected 4",
        ),
        "dora": ({"x.q.lora_magnitude_vector.weight": b[:, 0]}, "unsupported LoRA tensor"),
    }  # fmt: skip
    for name, (tensors, message) in cases.items():
        path = tmp_path / name / LORA_FILE
        path.parent.mkdir()
        save_file({k: v.clone() for k, v in tensors.items()}, path)
        with pytest.raises(ConfigError, match=rf"{path}: .*{message}"):
            read_lora(path.parent)
    truncated = tmp_path / "truncated" / LORA_FILE
    truncated.parent.mkdir()
    truncated.write_bytes((LORA / LORA_FILE).read_bytes()[:-10])
    with pytest.raises(ConfigError, match=str(truncated)):
        read_lora(truncated.parent)
    with pytest.raises(ModelNotFoundError, match="expected liveavatar.safetensors"):
        read_lora(tmp_path)  # folders only, no safetensors at the top
    folder = Path(shutil.copytree(LORA, tmp_path / "cfg"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 2}))
    with pytest.raises(ConfigError, match="rank 4, expected 8"):
        read_lora(folder)
    with pytest.raises(ConfigError, match="'merged' or 'unmerged'"):
        load_with_lora(fixture_standin(), BASE, LORA, dtype=None, mode="fused")


def test_adapter_config_sets_alpha_and_targets(tmp_path):
    """adapter_config.json gives alpha and targets; an explicit alpha overrides it. With the
    config's alpha the merge equals upstream's. Fails if the config is not read (alpha would
    be 64: scale 16 instead of 0.5)."""
    folder = Path(shutil.copytree(LORA, tmp_path / "cfg"))
    config = {"r": 4, "lora_alpha": 2, "target_modules": ["q", "k", "v", "o", "ffn.0", "ffn.2"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert read_lora(folder).scale == 0.5 and read_lora(folder, alpha=8).scale == 2.0
    model = load_with_lora(fixture_standin(), BASE, folder, dtype=torch.float32)
    assert_merge_matches(model, upstream("merged_fp32"), torch.float32)
    config["target_modules"] = ["q", "k", "v", "o"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"ffn\.0.* is not among the targets q,k,v,o"):
        read_lora(folder)


def test_writer_round_trip(tmp_path):
    """write_tiny_lora's spellings and config read back to the same pairs. Fails if the writer
    and reader disagree on a spelling (the golden relies on the writer's upstream spelling)."""
    base = fixture_base_state()
    path = write_tiny_lora(
        tmp_path, base, rank=2, alpha=3, seed=1, peft_prefix=False, adapter_name=None,
        adapter_config=True,
    )  # fmt: skip
    keys = load_file(path).keys()
    assert "blocks.0.ffn.2.lora_B.weight" in keys
    lora = read_lora(tmp_path)
    assert (lora.rank, lora.alpha) == (2, 3.0)
    assert sorted(lora.pairs) == fixture_meta()["targeted_modules"]
