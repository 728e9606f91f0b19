"""Sharded safetensors loading (models/checkpoints.py) on the tiny Live Avatar base written by
scripts/golden/lora.py, whose layout upstream's own from_pretrained read back (the golden script
asserts that), and on random checkpoints written here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from models.checkpoints import (
    INDEX_NAME,
    SINGLE_NAME,
    checkpoint_keys,
    load_sharded_safetensors,
    write_sharded_safetensors,
)
from models.errors import ConfigError, ModelNotFoundError
from tests.liveavatar_standin import (
    FIXTURES,
    fixture_base_state,
    fixture_meta,
    fixture_standin,
    standin_model,
)

BASE = FIXTURES / "base"
SHARD_1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD_2 = "diffusion_pytorch_model-00002-of-00002.safetensors"


def all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in model.state_dict().values())


@pytest.fixture
def base_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(BASE, tmp_path / "base"))


def test_fixture_is_the_release_layout():
    """Two shards named like the release plus an index whose total_size is the byte count.
    Fails if the writer names shards differently or miscounts total_size."""
    index = json.loads((BASE / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == [SHARD_1, SHARD_2]
    state = fixture_base_state()
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    assert set(index["weight_map"]) == set(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_load_equals_state_dict(dtype):
    """Every tensor of both shards lands under its own name, cast to dtype, and nothing is left
    on the meta device. Fails if the loader skips a shard (tried: only the first shard read ->
    missing-key check of the result) or assigns a tensor to another name."""
    state = fixture_base_state()
    model = load_sharded_safetensors(fixture_standin(), BASE, dtype=dtype)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == dtype, key
        assert torch.equal(loaded[key], value.to(dtype)), key


def test_loaded_weights_do_not_alias_the_file(base_copy):
    """safetensors hands out views of its file mapping; the loader owns copies, so rewriting a
    shard after loading cannot change the weights. Fails without the clone in the loader
    (tried: the rewrite then shows through in the loaded weights)."""
    model = load_sharded_safetensors(fixture_standin(), base_copy, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for shard in (SHARD_1, SHARD_2):
        path = base_copy / shard
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        data[header:] = bytes(len(data) - header)  # zero every tensor byte in place
        with open(path, "r+b") as fh:
            fh.write(data)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_key_filter_reads_only_its_keys(base_copy):
    """A rank that runs only block 1 loads block 1 and never opens the other shard: here that
    shard is truncated and the load still succeeds; everything else stays on meta. Fails if
    the filter is ignored (tried: the truncated shard is read and raises) or if strict mode
    counts filtered-out keys as missing."""
    state = fixture_base_state()
    index = json.loads((base_copy / INDEX_NAME).read_text())["weight_map"]
    assert {index[k] for k in state if k.startswith("blocks.1.")} == {SHARD_1}
    (base_copy / SHARD_2).write_bytes((base_copy / SHARD_2).read_bytes()[:1000])

    model = load_sharded_safetensors(
        fixture_standin(), base_copy, dtype=torch.float32, key_filter=lambda k: "blocks.1." in k
    )
    for key, value in model.state_dict().items():
        if key.startswith("blocks.1."):
            assert torch.equal(value, state[key]), key
        else:
            assert value.is_meta, key


def test_single_file_fallback(tmp_path):
    """A folder with diffusion_pytorch_model.safetensors and no index loads the same. Fails if
    the writer shards a state dict that fits one file, or the loader needs an index."""
    state = fixture_base_state()
    written = write_sharded_safetensors(state, tmp_path, max_shard_bytes=1 << 30)
    assert written == tmp_path / SINGLE_NAME and not (tmp_path / INDEX_NAME).exists()
    model = load_sharded_safetensors(fixture_standin(), tmp_path, dtype=None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_writer_shards_by_size(tmp_path):
    """Shards respect max_shard_bytes (a bigger tensor alone), names count the shards, the index
    maps every key. Fails if a shard overflows or the -of- count is wrong."""
    state = {f"w{i}": torch.full((i + 1, 256), float(i)) for i in range(6)}  # 1..6 KiB
    write_sharded_safetensors(state, tmp_path, max_shard_bytes=5 * 1024, prefix="m")
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"m-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert index["weight_map"]["w0"] == index["weight_map"]["w1"] == shards[0]
    from safetensors.torch import load_file

    for shard in shards:
        tensors = load_file(tmp_path / shard)
        assert sum(t.numel() * 4 for t in tensors.values()) <= 5 * 1024 or len(tensors) == 1


def test_missing_shard_names_it(base_copy):
    """Fails if a missing shard is found only after reading the others, or the message does not
    name it (tried: existence check removed -> the error comes from safe_open mid-load)."""
    (base_copy / SHARD_2).unlink()
    model = fixture_standin()
    with pytest.raises(ConfigError, match=rf"{SHARD_2}: shard named by .* is missing"):
        load_sharded_safetensors(model, base_copy, dtype=torch.float32)
    assert all_meta(model)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_shard_names_it_and_keeps_nothing(base_copy, damage):
    """A truncated or garbled second shard raises ConfigError naming it, after the first shard
    was loaded, and the model is back to all-meta. Fails without the restore on error (tried:
    block tensors of shard 1 survive) or when safetensors' own error escapes."""
    path = base_copy / SHARD_2
    path.write_bytes(path.read_bytes()[:-100] if damage == "truncate" else b"\xff" * 4096)
    model = fixture_standin()
    with pytest.raises(ConfigError, match=SHARD_2):
        load_sharded_safetensors(model, base_copy, dtype=torch.float32)
    assert all_meta(model)


def test_unexpected_keys_name_the_index():
    """A model without block 2 (a checkpoint of a bigger model) is refused before any tensor is
    read. Fails if unexpected keys are dropped silently in strict mode."""
    state = fixture_base_state()
    shapes = {k: v.shape for k, v in state.items() if not k.startswith("blocks.2.")}
    linears = [n for n in fixture_meta()["linear_modules"] if not n.startswith("blocks.2.")]
    with pytest.raises(ConfigError, match=rf"{INDEX_NAME}: \d+ keys the model does not.*blocks\.2"):
        load_sharded_safetensors(standin_model(shapes, linears), BASE, dtype=torch.float32)
    model = load_sharded_safetensors(
        standin_model(shapes, linears), BASE, dtype=torch.float32, strict=False
    )
    assert not any(t.is_meta for t in model.state_dict().values())


def test_missing_keys_name_the_index():
    """A model with a tensor the checkpoint lacks is refused. Fails if missing keys pass."""
    state = fixture_base_state()
    shapes = {k: v.shape for k, v in state.items()} | {"blocks.0.extra_gate": torch.Size([24])}
    model = standin_model(shapes, fixture_meta()["linear_modules"])
    with pytest.raises(ConfigError, match=rf"{INDEX_NAME}: 1 keys of the model are missing.*gate"):
        load_sharded_safetensors(model, BASE, dtype=torch.float32)
    assert all_meta(model)


def test_shape_mismatch_names_shard_and_key():
    """Fails if a tensor of the wrong shape is assigned (tried: shape check removed -> the model
    silently gets a [24, 32] weight where it declared [24, 24])."""
    state = fixture_base_state()
    shapes = {k: v.shape for k, v in state.items()}
    shapes["blocks.1.self_attn.o.weight"] = torch.Size([24, 32])
    model = standin_model(shapes, fixture_meta()["linear_modules"])
    with pytest.raises(ConfigError, match=rf"{SHARD_1}: 'blocks.1.self_attn.o.weight' has shape"):
        load_sharded_safetensors(model, BASE, dtype=torch.float32)
    assert all_meta(model)


def test_index_that_lies_names_the_shard(base_copy):
    """An index mapping a key to a shard that lacks it. Fails if the loader trusts the index."""
    index = json.loads((base_copy / INDEX_NAME).read_text())
    index["weight_map"]["blocks.0.norm3.weight"] = SHARD_2
    (base_copy / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"{SHARD_2}: lacks 1 keys.*blocks\.0\.norm3\.weight"):
        load_sharded_safetensors(fixture_standin(), base_copy, dtype=torch.float32)


def test_bad_index_and_empty_folder(base_copy, tmp_path):
    """Fails if a broken index or a folder without weights surfaces as a raw JSON/OS error."""
    (base_copy / INDEX_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match=INDEX_NAME):
        checkpoint_keys(base_copy)
    (base_copy / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../escape.safetensors"}}))
    with pytest.raises(ConfigError, match="not a file name"):
        checkpoint_keys(base_copy)
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nothing")):
        checkpoint_keys(tmp_path / "nothing")


_MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from models.checkpoints import load_sharded_safetensors

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    folder, layers, width, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    device = "meta" if mode == "ours" else "cpu"
    before = rss()  # before the model: the naive way pays for its host copy here
    model = nn.Sequential(*[nn.Linear(width, width, bias=False, device=device)
                            for _ in range(layers)])
    if mode == "ours":
        load_sharded_safetensors(model, folder, dtype=torch.float32)
    else:  # the naive way: model on the host, whole checkpoint in a dict, then copied in
        import glob
        from safetensors.torch import load_file
        state = {}
        for shard in sorted(glob.glob(folder + "/*.safetensors")):
            state.update(load_file(shard))
        model.load_state_dict(state)
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would start at the parent's size
    # (a big test process) at fork time.
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print(json.dumps({"delta": peak - before, "sum": float(model[-1].weight.detach().sum())}))
    """
)


def test_peak_memory_is_model_plus_a_shard(tmp_path):
    """A 256 MiB float32 checkpoint in four 64 MiB shards loads in a fresh process with peak
    RSS growth under model + 2 shards (384 MiB). Negative control, same harness: the naive load
    (host model + whole state dict) needs about twice the model and exceeds that bound, so the
    measurement can fail. Measured here: ours ~ model + 1 shard (see the assertion message)."""
    layers, width = 16, 2048
    gen = torch.Generator().manual_seed(0)
    state = {f"{i}.weight": torch.randn(width, width, generator=gen) for i in range(layers)}
    model_bytes = layers * width * width * 4
    shard_bytes = model_bytes // 4
    write_sharded_safetensors(state, tmp_path, max_shard_bytes=shard_bytes)
    expected = float(state[f"{layers - 1}.weight"].sum())
    del state
    budget = model_bytes + 2 * shard_bytes
    root = Path(__file__).resolve().parent.parent
    result = {}
    for mode in ("ours", "naive"):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path), str(layers), str(width), mode],
            capture_output=True, text=True, cwd=root, timeout=300, check=True,
            env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        assert result[mode]["sum"] == pytest.approx(expected, rel=1e-6)
    mib = {m: round(r["delta"] / 2**20) for m, r in result.items()}
    assert result["ours"]["delta"] < budget, f"peak growth MiB {mib}, budget {budget >> 20}"
    assert result["naive"]["delta"] > budget, f"negative control did not exceed: {mib}"
