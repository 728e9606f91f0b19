"""FP8 (--quant fp8): which layers it converts, and a one-line refusal where it cannot run.

The conversion itself (torchao's float8 kernels) needs a GPU with FP8 tensor cores; its drift
from bf16 is measured by benchmarks/fp8_drift.py there (benchmarks/gpu.sh runs it). On the CPU
what can be tested is tested: the selection of layers and the refusal, from every entry point.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from models.errors import ConfigError
from models.quant import check_quant, fp8_layers, fp8_unsupported, quantize_fp8
from models.registry import load_model


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_fp8_converts_the_block_linears_only():
    """Default model (dim 128, FFN 384, audio at every layer): per layer the self-attention's
    q/k/v/out, the cross-attention's four, the FFN's two and the audio cross-attention's four;
    never the embeddings (patch, timestep, text, audio), the output projection or a norm.
    Fails if the selection takes every Linear (tried: the `blocks.` prefix check removed: the
    timestep and text embedders, audio embedder and proj_out join)."""
    model = load_model("default").dit
    names = fp8_layers(model)
    per_layer = {n.split(".", 2)[2] for n in names}
    assert per_layer == {
        *(f"attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
        *(f"attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
        *(f"audio_attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
        "ffn.net.0.proj",
        "ffn.net.2",
    }
    assert len(names) == 14 * model.config.num_layers
    outside = set(_linears(model)) - set(names)
    assert outside and all(not n.startswith("blocks.") for n in outside)
    assert {"proj_out", "condition_embedder.time_proj"} <= outside


def test_fp8_layers_of_the_big_layouts():
    """Wan 1.3B (30 layers, audio every third) and Live Avatar's 14B layout, on the meta
    device: every block linear qualifies (sizes 1536/5120, FFN 8960/13824, all multiples of
    16); Live Avatar's audio injectors sit outside the blocks and stay bf16."""
    from models.config import wan_1_3b_config
    from models.dit import CausalWanTransformer
    from models.s2v import LiveAvatarTransformer, S2VConfig

    with torch.device("meta"):
        wan = CausalWanTransformer(
            wan_1_3b_config(audio_dim=41, audio_layers=tuple(range(0, 30, 3)))
        )
        s2v = LiveAvatarTransformer(S2VConfig())
    assert len(fp8_layers(wan)) == 30 * 10 + 10 * 4
    names = fp8_layers(s2v)
    assert len(names) == 40 * 10
    assert not any("audio_injector" in n for n in names)


def test_fp8_skips_sizes_the_fp8_matmul_cannot_take():
    """The tiny model's width is 24 (2 heads x 12): not a multiple of 16, so nothing is
    converted. Fails if the size rule is dropped (tried: only the prefix check kept)."""
    assert fp8_layers(load_model("tiny").dit) == []


def test_fp8_is_refused_in_one_line_on_this_cpu(monkeypatch):
    """On the CPU, and on a GPU older than Ada (faked: an A100, 8.0), quantize_fp8 raises a
    ConfigError of one line that says what is needed and what to do; torchao is not needed to
    refuse (faked absent)."""
    monkeypatch.setitem(sys.modules, "torchao", None)
    model = load_model("default").dit.to(torch.bfloat16)
    with pytest.raises(ConfigError) as err:
        quantize_fp8(model, "fp8", "cpu")
    text = str(err.value)
    assert "\n" not in text and "8.9" in text and "drop --quant fp8" in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    reason = fp8_unsupported("cuda:0")
    assert reason is not None and "A100" in reason and "8.0" in reason and "\n" not in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert "torchao" in fp8_unsupported("cuda:0")  # Hopper without torchao: says to install it
    assert quantize_fp8(model, "none", "cpu") == []
    with pytest.raises(ConfigError, match="fp8-weight"):
        check_quant("int4")


def test_executors_refuse_fp8_before_starting_anything():
    """build_executor refuses before loading a model or spawning a worker (a TPP launch takes
    seconds; this takes milliseconds and leaves no child process)."""
    import multiprocessing

    from pipelines.executors import build_executor

    start = time.perf_counter()
    for kind, devices in (("local", "cpu"), ("tpp", "cpu:3"), ("dualparal", "cpu:3")):
        with pytest.raises(ConfigError, match="8.9"):
            build_executor(kind, model="tiny", devices=devices, quant="fp8")
    assert time.perf_counter() - start < 2.0
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--model", "tiny", "--quant", "fp8", "--blocks", "1"],
        ["render", "--image", "x.png", "--audio", "x.wav", "-o", "out", "--quant", "fp8"],
        ["serve", "--model", "tiny", "--quant", "fp8", "--port", "0"],
    ],
    ids=["bench", "render", "serve"],
)
def test_cli_refuses_fp8_on_the_cpu_in_one_line(argv, tmp_path):
    """Exit 2 and one error line on stderr (serve also logs that it is loading), before
    anything is served or rendered."""
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and "--quant fp8" in lines[0] and "8.9" in lines[0], r.stderr
