"""The planner for Live Avatar (`liveavatar-14b`, `liveavatar:DIR`): its sizes come from the S2V
model built on the meta device, its sink is the reference frame plus packed motion tokens, each
part sits on the device that holds it, and the plan command prints every strategy."""

from __future__ import annotations

import json

import pytest
import torch

from models.s2v import LiveAvatarTransformer, S2VConfig
from pipelines import planner
from pipelines.meta_memory import traced_bytes

GiB = 2**30
SIZES = {  # width x height: (tokens per frame, sink tokens), counted by hand below
    (704, 384): (1056, 2640),
    (720, 400): (1125, 2778),
    (832, 480): (1560, 3874),
}


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return LiveAvatarTransformer(S2VConfig())


@pytest.fixture(scope="module")
def la():
    return planner.model_shape("liveavatar-14b")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from models.liveavatar import write_tiny_liveavatar

    return write_tiny_liveavatar(tmp_path_factory.mktemp("la") / "base")


def _costs(shape, step=0.5, decode=0.1):
    L = shape.config.num_layers
    return planner.Costs(
        step_s=step,
        layer_plain_s=step / L,
        layer_audio_s=step / L,
        overhead_s=0.0,
        decode_s=decode,
        features_s=0.01,
        device="cuda",
    )


LINK = planner.LinkModel(gbps=400, latency_s=10e-6)


@pytest.mark.parametrize(("wh", "expected"), SIZES.items())
def test_tokens_and_sink_at_live_avatars_sizes(wh, expected, meta_model):
    """Tokens per frame are the 16-pixel patch grid; the sink is the reference frame's tokens
    plus the packed motion tokens (1 frame at 1x, 1 at 2x, 4 at 4x per side: 704x384 gives
    24x44 + 24x44 + 12x22 + 4*6x11 = 2640), as LiveAvatarTransformer.sink_tokens says.
    Fails if the sink is counted as one frame, or the grid floors differently from the model's."""
    w, h = wh
    shape = planner.model_shape("liveavatar-14b", height=h, width=w)
    tokens, sink = expected
    assert (shape.width, shape.height) == (w, h)
    assert shape.tokens_per_frame == tokens
    assert shape.sink_tokens == sink == meta_model.sink_tokens(h // 8, w // 8)
    assert shape.sink_tokens > shape.tokens_per_frame
    assert shape.tokens_per_block == 3 * tokens
    assert shape.sink_kv_bytes(40) == 2 * sink * 5120 * 2 * 40


def test_default_size_and_pipeline_are_live_avatars(la, base):
    """704x384 (Live Avatar's streaming size), 25 fps, 3 latent frames (12 video frames, 9 for
    the first block), 4 steps, window 9, timestep forcing: the bundle's own defaults.
    Fails if the planner's defaults drift from load_liveavatar's."""
    from models.liveavatar import load_liveavatar

    d = load_liveavatar(base, parts=()).defaults
    assert (la.width, la.height) == (d.width, d.height) == (704, 384)
    assert (la.fps, la.frames_per_block, la.steps, la.window_frames) == (
        d.fps,
        d.frames_per_block,
        d.steps,
        d.window_frames,
    )
    assert la.cache_mode == d.pipeline["cache_mode"] == "timestep_forcing"
    assert (la.video_frames, la.first_video_frames) == (12, 9)
    assert la.text_tokens == 512  # prepare_context pads every prompt to text_len
    assert la.audio_tokens == 5  # 4 audio tokens + the padding token per latent frame
    assert la.audio_bytes == 12 * 25 * 1024 * 2  # wav2vec2's 25 layers per video frame


def test_parameters_come_from_the_meta_model(la, meta_model):
    """The transformer, audio encoder, injectors and frame packer, counted on the meta device:
    about 16.3B (the 40 blocks alone 14.1B). Each injected layer carries its injector, so a
    DualParal rank is charged for the injectors of its own layers.
    Fails if the injectors are left out of the count or charged to every rank as shared."""
    total = sum(p.numel() for p in meta_model.parameters())
    blocks = sum(p.numel() for p in meta_model.blocks.parameters())
    injectors = sum(p.numel() for p in meta_model.audio_injector.parameters())
    assert la.dit_params == total
    assert 15.5e9 < la.dit_params < 17.0e9
    assert sum(la.layer_params) == blocks + injectors
    audio = set(la.config.audio_layers)
    plain = [n for i, n in enumerate(la.layer_params) if i not in audio]
    injected = [n for i, n in enumerate(la.layer_params) if i in audio]
    assert len(set(plain)) == 1 and len(set(injected)) == 1 and injected[0] > plain[0]
    assert la.shared_params < 0.5e9
    parts = {c.name: c for c in la.components}
    assert 300e6 < parts["wav2vec2"].params < 330e6
    assert 5.5e9 < parts["umT5"].params < 5.9e9
    assert 120e6 < la.vae_params < 135e6


def test_tpp_rank_memory(la):
    """A TPP step rank at 704x384 in bf16 holds the whole transformer, its step's ring (9
    frames) plus the sink (2640 tokens) for 40 layers, the prompt's keys/values and the working
    set: more than the weights, under Live Avatar's 80 GB per GPU. wav2vec2 and umT5 sit on
    rank 0 only, the VAE on the decode rank only.
    Fails if the sink is counted as one frame, the VAE or an encoder is put on a denoise rank,
    or a rank is charged all four steps' rings."""
    tpp = planner.predict_tpp(la, _costs(la), 5, LINK)
    weights = la.dit_params * 2 / GiB
    kv = (9 * 1056 + 2640) * 2 * 5120 * 2 * 40 / GiB
    *steps, decode = tpp.memory_parts
    assert len(steps) == 4
    for i, parts in enumerate(steps):
        assert parts["transformer"] == pytest.approx(weights)
        assert parts["KV cache"] == pytest.approx(kv)
        assert "VAE" not in parts and "decode cache" not in parts
        assert ("wav2vec2" in parts) == ("umT5" in parts) == (i == 0)
    assert set(decode) == {"VAE", "decode cache", "decode working set"}
    assert decode["decode cache"] > 0.5  # the causal VAE keeps ~1.2 GiB of frames per session
    for total, parts in zip(tpp.memory_gb, tpp.memory_parts, strict=True):
        assert total == pytest.approx(sum(parts.values()))
    assert min(tpp.memory_gb[:-1]) > weights + kv
    assert max(tpp.memory_gb) * GiB < 80e9
    # umT5 kept on the CPU (text_encoder=cpu) leaves every device.
    cpu_t5 = planner.model_shape("liveavatar-14b", text_encoder="cpu")
    rank0 = planner.predict_tpp(cpu_t5, _costs(cpu_t5), 5, LINK).memory_parts[0]
    assert "umT5" not in rank0 and "wav2vec2" in rank0


def test_dualparal_rank_holds_its_layers(la):
    """4 layer ranks hold ~1/4 of the transformer each (10 layers, their injectors, the shared
    embeddings), keys/values of (3 history + 4 queued) blocks plus the sink for their layers.
    Fails if a rank is charged every layer or every injector."""
    from pipelines.executors.staggered import split_layers

    dp = planner.predict_dualparal(la, _costs(la), 5, LINK)
    parts = split_layers(40, 4)
    quarter = la.dit_params * 2 / GiB / 4
    for r, mem in zip(parts, dp.memory_parts[:-1], strict=True):
        held = (la.shared_params + sum(la.layer_params[i] for i in r)) * 2 / GiB
        assert mem["transformer"] == pytest.approx(held)
        assert abs(mem["transformer"] / quarter - 1) < 0.15
        frames = (9 // 3 + 4) * 3
        expected_kv = (frames * 1056 + 2640) * 2 * 5120 * 2 * len(r) / GiB
        assert mem["KV cache"] == pytest.approx(expected_kv)
    assert "VAE" not in dp.memory_parts[0] and "VAE" in dp.memory_parts[-1]
    tpp = planner.predict_tpp(la, _costs(la), 5, LINK)
    held = max(m["transformer"] for m in dp.memory_parts[:-1])
    assert held < tpp.memory_parts[0]["transformer"] / 3


def test_every_strategy_and_sessions(la):
    """All four strategies at 5 devices; caches scale with sessions, weights do not."""
    preds = planner.predict_all(la, _costs(la), 5, LINK)
    assert [p.strategy for p in preds] == list(planner.STRATEGIES)
    two = planner.predict_all(la, _costs(la), 5, LINK, sessions=2)
    for one, both in zip(preds, two, strict=True):
        for a, b in zip(one.memory_parts, both.memory_parts, strict=True):
            assert b.get("transformer") == a.get("transformer")
            if "KV cache" in a:
                assert b["KV cache"] == pytest.approx(2 * a["KV cache"])


def test_meta_trace_counts_new_storage_only():
    """New tensors add their bytes until they die; views and in-place results add nothing.
    Fails if views or in-place outputs are counted, or freed tensors are not given back."""

    def fn():
        a = torch.zeros(1000, device="meta")  # 4000 B
        b = a + 1  # 4000 B
        a.add_(1)  # in place
        c = b.view(10, 100)  # a view
        del a
        d = c * 2  # 4000 B while b (and its view) are alive
        return d

    peak, alive = traced_bytes(fn)
    assert peak == 8000  # b and d; 12000 if a's view, its in-place add or its death miscounted
    assert alive == 4000


def test_decode_trace_equals_a_real_decode(base):
    """The decode cache traced on the meta device equals what a real decode keeps per session
    (the tiny folder's VAE on the CPU, same size). Fails if the trace misses cache entries."""
    from models.liveavatar import VAE_FILE
    from models.wan_vae_checkpoint import load_wan21_vae
    from pipelines.model_shape import trace_decode

    shape = planner.model_shape(f"liveavatar:{base}", height=64, width=96, dtype="float32")
    real = load_wan21_vae(base / VAE_FILE)
    state = real.new_state()
    z = torch.randn(1, 16, 3, 8, 12)
    real.decode_block(z, state)
    real.decode_block(z, state)
    kept = sum(t.numel() * t.element_size() for t in state.feat_cache if t is not None)
    cache, work = trace_decode(load_wan21_vae(base / VAE_FILE, device="meta"), shape)
    assert cache == kept == shape.decode_cache_bytes
    assert work > 0


def test_working_set_includes_per_token_modulation(la):
    """The traced forward of a 704x384 block holds the S2V per-token modulation in float32
    ([N, 6, D], twice within a layer) besides one layer's temporaries; under a few GiB."""
    n, d = la.tokens_per_block, 5120
    assert la.forward_working_bytes > 2 * n * 6 * d * 4
    assert la.activation_bytes("cuda") < 3 * GiB


def test_profiler_runs_the_s2v_model(base):
    """Layer-range profiling builds the S2V model on meta and materialises it (here the tiny
    folder on the CPU): audio layers, sink pass, wav2vec2 features, decode and the reference
    encode are all timed; the 12-of-40 split of audio layers shapes the step.
    Fails if the probe model loses its audio layer or the sink pass is not timed."""
    from pipelines.probe import build_on_meta, probe_config

    shape = planner.model_shape(f"liveavatar:{base}", height=64, width=64, dtype="float32")
    probe = build_on_meta(shape, probe_config(shape))
    assert probe.slots == {1: 0}  # layer 1 of the probe is an audio-injected layer
    costs = planner.profile_costs(shape, device="cpu", dtype=torch.float32, repeats=1)
    assert costs.sink_s > costs.forward_fixed_s  # the fixed part plus the layers' sink pass
    assert costs.reference_s > 0 and costs.features_s > 0
    assert costs.decode_s > 0
    n_audio = len(shape.config.audio_layers)
    L = shape.config.num_layers
    assert costs.step_s == pytest.approx(
        costs.overhead_s + n_audio * costs.layer_audio_s + (L - n_audio) * costs.layer_plain_s
    )
    big = planner.model_shape("liveavatar-14b")
    assert sum(planner.layer_flops(big, audio=True)) > sum(planner.layer_flops(big, audio=False))


def test_profile_agrees_with_the_live_avatar_engine(base):
    """The layer-range profile of the S2V model adds up to what one engine step of the Live
    Avatar pipeline costs, the decode profile to its decode, and reference encode + sink pass
    to opening a session (tiny folder, 64x64, CPU). Profile and engine alternate and the
    fastest of three rounds counts; both are timed in the thread's CPU time (the profiler's
    clock on a one-thread CPU, see test_planner.py). Fails if the profiled model, block
    or sink differ in kind from what the engine runs (e.g. no history or sink in the probe's
    cache, or the reference encode counting the 5 x 73 frames wrongly)."""
    import time

    import numpy as np

    from models.registry import load_model
    from pipelines.generator import StreamingGenerator
    from tests.multidevice_helpers import engine_cpu

    gen = StreamingGenerator.from_bundle(load_model(f"liveavatar:{base}"), height=64, width=64)
    shape = planner.model_shape(f"liveavatar:{base}", height=64, width=64, dtype="float32")
    assert (
        shape.tokens_per_frame == gen.tokens_per_frame and gen.config.cache_mode == shape.cache_mode
    )
    rounds = []
    for i in range(3):
        costs = planner.profile_costs(shape, device="cpu", dtype=torch.float32, repeats=3)
        engine = engine_cpu(gen, 3)
        image = (np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)
        t0 = time.thread_time()
        gen.new_session(image)  # a new image: encoded, not taken from the VAE's cache
        engine["open"] = time.thread_time() - t0
        rounds.append((costs, engine))
    step = min(c.step_s for c, _ in rounds) / min(m["step"] for _, m in rounds)
    decode = min(c.decode_s for c, _ in rounds) / min(m["decode"] for _, m in rounds)
    opened = min(c.reference_s + c.sink_s for c, _ in rounds) / min(m["open"] for _, m in rounds)
    assert 0.5 < step < 2.0, rounds
    assert 0.5 < decode < 2.0, rounds
    assert 0.5 < opened < 2.0, rounds


def test_probe_sizes_respect_the_motion_grid():
    """Downscaled probes keep at least 64 pixels a side (the 4x-packed motion grid needs 4
    patches), and the second probe for the FLOPs fit differs from the first."""
    from pipelines.profiler import _second_probe, probe_shape

    big = planner.model_shape("liveavatar-14b")
    p = probe_shape(big, 1, 8)
    assert min(p.height, p.width) >= 64 and p.sink_tokens > p.tokens_per_frame
    q = _second_probe(big, p, 8)
    assert q is not None and q.tokens_per_block != p.tokens_per_block
    assert q.video_frames == 4 * q.frames_per_block


def _bench(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(
        json.dumps(
            dict(
                denoise_step_s=[0.25] * 4,
                decode_s=0.2,
                features_s=0.02,
                device="cuda",
                dtype="bfloat16",
                steps=4,
                cache_mode="timestep_forcing",
            )
        )  # fmt: skip
    )
    return str(path)


@pytest.mark.parametrize(("wh", "tokens"), [((704, 384), 1056), ((832, 480), 1560)])
def test_plan_command_liveavatar_14b(wh, tokens, tmp_path, capsys):
    """`diffstream plan --model liveavatar-14b --devices 5`: every strategy with memory per
    device and a recommendation, at 704x384 by default and at --width/--height."""
    from stream.cli import main

    args = ["plan", "--model", "liveavatar-14b", "--devices", "5", "--bench-json", _bench(tmp_path)]
    if wh != (704, 384):
        args += ["--width", str(wh[0]), "--height", str(wh[1])]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["resolution"] == list(wh)
    assert out["model"]["tokens_per_block"] == 3 * tokens
    assert [p["strategy"] for p in out["predictions"]] == list(planner.STRATEGIES)
    for p in out["predictions"]:
        assert len(p["memory_gb"]) == p["devices"] and all(g > 0 for g in p["memory_gb"])
    assert out["recommendation"]["strategy"] in planner.STRATEGIES
    assert main(args) == 0
    text = capsys.readouterr().out
    for strategy in planner.STRATEGIES:
        assert f"\n{strategy} " in text
    assert "-> " in text


def test_plan_command_liveavatar_folder(base, capsys):
    """A released folder is planned from its config.json and file headers (tiny here)."""
    from stream.cli import main

    args = ["plan", "--model", f"liveavatar:{base}", "--devices", "5", "--height", "64"]
    args += ["--width", "64", "--profile-repeats", "1", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["name"] == f"liveavatar:{base}"
    assert out["model"]["layers"] == 3
    assert [p["strategy"] for p in out["predictions"]] == list(planner.STRATEGIES)


@pytest.mark.parametrize("kind", ["missing", "not_s2v", "bad_json", "bad_size"])
def test_plan_command_bad_folder_is_one_line(kind, tmp_path, base, capsys):
    """A missing folder, a folder of another model, unreadable JSON, or a size the model cannot
    run: exit 2 and one line naming the problem, no traceback."""
    from stream.cli import main

    folder = tmp_path / "m"
    extra: list[str] = []
    if kind == "not_s2v":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": 8}))
    elif kind == "bad_json":
        folder.mkdir()
        (folder / "config.json").write_text("{not json")
    elif kind == "bad_size":
        folder, extra = base, ["--height", "40", "--width", "64"]
    assert main(["plan", "--model", f"liveavatar:{folder}", "--devices", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffstream plan: error: ") and "\n" not in err
    assert "Traceback" not in err
