"""The compiled block step: static shapes, no graph breaks, no recompiles in steady state.

The compiled unit is one transformer forward of a block (every denoise step, and the re-encode
pass that writes the KV cache). Its graphs: with and without the cache write, at each fill level
of the ring until it is full (0, 3 and 6 latent frames here). After that the shapes never
change, and the values that change from block to block (the ring slots written, the sink's
rotation, the timestep) are tensors, not Python numbers a graph would bake in as constants.
These are the only tests that compile (tens of seconds on two cores); the rest of the suite
runs eager (DIFFSTREAM_COMPILE=0 in conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from pipelines.generator import StreamingGenerator
from pipelines.reference import default_reference

STEADY_BLOCKS = 50


def _audio(gen: StreamingGenerator, i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return (0.1 * rng.standard_normal(gen.block_samples(i))).astype(np.float32)


@pytest.mark.parametrize("mode", ["reencode", "timestep_forcing"])
def test_no_recompile_and_no_graph_break_over_50_blocks(tiny_bundle, mode):
    """After the warm-up blocks (the ring filling), 50 more blocks of the session and a new
    session's first blocks compile nothing: the compile counters do not move and no graph
    breaks. The compiled frames equal eager ones to a grey level. Fails if a ring position
    reaches the graph as a Python int (tried: AttentionPlan(write_start=start_frame) instead
    of write_index in block_forward: a graph per ring slot, 7 where 6), if the sink position
    does (tried: plan.sink_position set and sink_rope left None: 8 graphs, one per position
    until the recompile limit), or if the first step's input is an ordinary tensor and the
    next ones inference tensors (tried: the clone in block_forward removed: 8 graphs)."""
    torch._dynamo.reset()
    counters.clear()
    gen = StreamingGenerator.from_bundle(tiny_bundle, compile=True, cache_mode=mode)
    eager = StreamingGenerator.from_bundle(tiny_bundle, cache_mode=mode)
    assert gen.compile_mode == "default" and eager.compile_mode is None
    ref = default_reference(gen.height, gen.width)
    state = gen.new_session(ref, seed=3)
    warmup = gen.config.window_frames // gen.config.frames_per_block + 2
    for i in range(warmup):
        gen.generate_block(state, _audio(gen, i))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == (6 if mode == "reencode" else 3), graphs
    frames_before = counters["aot_autograd"]["total"]
    for _ in range(STEADY_BLOCKS):
        gen.generate_block(state, _audio(gen, state.block_index))
    other, check = gen.new_session(ref, seed=4), eager.new_session(ref, seed=4)
    for i in range(warmup):
        got, _ = gen.generate_block(other, _audio(gen, i))
        want, _ = eager.generate_block(check, _audio(gen, i))
        assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["aot_autograd"]["total"] == frames_before
    assert dict(counters["graph_break"]) == {}
    assert "recompiles" not in counters or not counters["recompiles"]


def test_compile_mode_choice():
    """True picks CUDA graphs (reduce-overhead) on a GPU and the default mode on the CPU; a
    mode name is taken as given; anything else is a ConfigError naming the choices."""
    from models.errors import ConfigError
    from pipelines.generator import compile_mode

    assert compile_mode(True, torch.device("cuda")) == "reduce-overhead"
    assert compile_mode(True, torch.device("cpu")) == "default"
    assert compile_mode(False, torch.device("cuda")) is None
    assert compile_mode("max-autotune", torch.device("cpu")) == "max-autotune"
    with pytest.raises(ConfigError, match="reduce-overhead"):
        compile_mode("fast", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager():
    """With a GPU: the compiled step in reduce-overhead mode (CUDA graphs replayed from the
    third call of a graph on) gives the eager frames, to 2 grey levels (inductor fuses and
    reorders bf16 arithmetic), over blocks past the ring filling and a second session."""
    from models.registry import load_model

    bundle = load_model("default").to("cuda", torch.bfloat16)
    graphs = StreamingGenerator.from_bundle(bundle, device="cuda", compile=True)
    eager = StreamingGenerator.from_bundle(bundle, device="cuda")
    assert graphs.compile_mode == "reduce-overhead"
    ref = default_reference(graphs.height, graphs.width)
    for seed in (1, 2):
        a, b = graphs.new_session(ref, seed=seed), eager.new_session(ref, seed=seed)
        for i in range(8):
            got, _ = graphs.generate_block(a, _audio(graphs, i))
            want, _ = eager.generate_block(b, _audio(graphs, i))
            assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 2, (seed, i)


# ---- on by default for the service and the CLI, off with --no-compile, warmed up at start ------


def test_serve_render_bench_turn_compile_off_with_no_compile(monkeypatch):
    """serve: on by default (DIFFSTREAM_COMPILE unset or 1), --no-compile or
    DIFFSTREAM_COMPILE=0 turns it off, and the executor gets compile=True only when on. render
    and bench take the same flag and the same default. Fails if the default is off (tried:
    Settings.compile = False) or --no-compile is not passed through (tried: serve's
    _SWITCHES left out of settings_from_args)."""
    from stream.cli import build_parser
    from stream.commands.bench import compile_default
    from stream.commands.serve import settings_from_args

    def serve(*flags):
        argv = ["serve", *flags]
        return settings_from_args(build_parser(argv).parse_args(argv))

    monkeypatch.setenv("DIFFSTREAM_COMPILE", "1")
    assert serve().compile and serve().executor_options()["compile"] is True
    assert compile_default()
    off = serve("--no-compile")
    assert not off.compile and "compile" not in off.executor_options()
    monkeypatch.setenv("DIFFSTREAM_COMPILE", "0")
    assert not serve().compile and not compile_default()
    assert serve("--compile").compile
    for cmd in ("render", "bench"):
        extra = ["--image", "a", "--audio", "b", "-o", "c"] if cmd == "render" else []
        argv = [cmd, *extra, "--no-compile"]
        assert build_parser(argv).parse_args(argv).compile is False


def test_bench_no_compile_reports_eager():
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", "bench", "--model", "tiny", "--no-compile"]
        + ["--blocks", "1", "--warmup", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["compile"] is None and data["quant"] == "none" and data["step_tflop"] > 0


def test_build_executor_warms_up_a_compiled_engine(monkeypatch, tiny_bundle):
    """With compile, build_executor runs one throwaway session of info.warmup_blocks blocks
    (the ring filling plus one full-ring block: every graph) before it returns, and leaves no
    session behind; without, it runs none. Fails if the warm-up is skipped (tried: the
    `if options.get("compile")` branch removed) or too short to build every graph (tried:
    warmup_blocks = window / frames_per_block: the full-ring graphs come later), or if
    warm_up=False (render) still warms up (tried: the option ignored)."""
    import pipelines.executors as executors

    calls = []
    real = executors.warm_up
    monkeypatch.setattr(executors, "warm_up", lambda ex: calls.append(real(ex)))
    # Eager underneath (the compiled forward is swapped back), so no compile is paid here.
    from pipelines import generator

    monkeypatch.setattr(generator, "compile_mode", lambda c, d: None)
    with executors.build_executor("local", model="tiny", compile=True) as ex:
        assert len(calls) == 1 and ex.info.warmup_blocks == 6 // 3 + 2
        assert ex.held_sessions() == [0]
    with executors.build_executor("local", model="tiny") as ex:
        assert len(calls) == 1
    with executors.build_executor("local", model="tiny", compile=True, warm_up=False) as ex:
        assert len(calls) == 1  # what render asks for: its own blocks compile
