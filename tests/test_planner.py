"""The planner: its sizes come from the real model, its arithmetic follows the layouts, its
profiler agrees with the engine, and its predictions agree with the CPU executors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

from pipelines import planner
from pipelines.executors.tpp import split_steps
from pipelines.generator import StreamingGenerator
from pipelines.reference import default_reference
from tests.multidevice_helpers import engine_cpu, save_test_model

# Agreement bands: a prediction within 25 % of the measurement, either way.
LOW, HIGH = 0.8, 1.25


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("tiny-plan"))


@pytest.fixture(scope="module")
def gen(model_dir):
    from models.registry import load_model

    return StreamingGenerator.from_bundle(load_model(model_dir), cache_mode="timestep_forcing")


@pytest.fixture(scope="module")
def shape(model_dir):
    return planner.model_shape(model_dir, dtype="float32", cache_mode="timestep_forcing")


def test_shape_matches_the_real_model_and_session(shape, gen):
    assert shape.tokens_per_frame == gen.tokens_per_frame
    assert shape.dit_params == sum(p.numel() for p in gen.model.parameters())
    assert shape.vae_params == sum(p.numel() for p in gen.vae.parameters())
    state = gen.new_session(default_reference(gen.height, gen.width))
    latent = state.noise.next()
    assert shape.latent_bytes == latent.numel() * latent.element_size()
    layers = gen.model.config.num_layers
    rings = shape.steps * shape.kv_bytes(shape.window_frames, layers)
    assert rings + shape.kv_bytes(1, layers) == state.cache_bytes()  # S rings + the shared sink
    assert shape.video_frames == gen.block_video_frames(1)
    assert shape.first_video_frames == gen.block_video_frames(0)


def test_big_model_shapes_need_no_weights():
    big = planner.model_shape("wan-14b")
    assert big.config.inner_dim == 5120 and big.config.num_layers == 40
    assert 13e9 < big.dit_params < 20e9
    assert big.tokens_per_frame == (480 // 16) * (832 // 16)


def _costs(step=1.0, decode=0.0, features=0.0, layers=2, device="cpu"):
    return planner.Costs(
        step_s=step,
        layer_plain_s=step / layers,
        layer_audio_s=step / layers,
        overhead_s=0.0,
        decode_s=decode,
        features_s=features,
        device=device,
    )


def test_link_model():
    link = planner.LinkModel(gbps=8.0, latency_s=1e-3)
    assert link.seconds(1e9) == pytest.approx(1.0 + 1e-3)
    assert link.seconds(0, messages=3) == pytest.approx(3e-3)


def test_tpp_period_is_the_slowest_stage(shape):
    fast = planner.LinkModel(gbps=1e9, latency_s=0.0)
    costs = _costs(step=0.01, decode=0.0)
    local = planner.predict_local(shape, costs)
    assert local.period_s == pytest.approx(shape.steps * 0.01)
    for devices in range(2, shape.steps + 3):
        p = planner.predict_tpp(shape, costs, devices, fast)
        ranks = min(devices - 1, shape.steps)
        most = max(len(r) for r in split_steps(shape.steps, ranks))
        assert p.period_s == pytest.approx(most * 0.01)
        assert p.block_latency_s == pytest.approx(shape.steps * 0.01)
        assert p.fps == pytest.approx(local.fps * shape.steps / most)
        assert ("idle" in p.notes) == (devices - 1 > shape.steps)
    # A slow decode becomes the bottleneck; a slow link shows up in every stage.
    slow = planner.predict_tpp(shape, _costs(step=0.01, decode=0.05), 5, fast)
    assert slow.period_s == pytest.approx(0.05)
    # Sends overlap the next block: a hop shorter than the stage hides behind it (only the
    # posting stays), a longer one sets the period; blocking sends add it. Latency pays it.
    link = planner.LinkModel(gbps=1e9, latency_s=0.002)
    hop = planner.predict_tpp(shape, costs, 5, link)
    assert hop.period_s == pytest.approx(0.01)
    parts = split_steps(shape.steps, min(4, shape.steps))
    trips = sum(len(r) * 0.01 + 2 * 0.002 for r in parts) + 2 * 0.002  # + decode's hop
    assert hop.block_latency_s == pytest.approx(trips)
    posting = dataclasses.replace(link, post_s=0.001)
    assert planner.predict_tpp(shape, costs, 5, posting).period_s == pytest.approx(0.011)
    slow_link = planner.LinkModel(gbps=1e9, latency_s=0.008)
    assert planner.predict_tpp(shape, costs, 5, slow_link).period_s == pytest.approx(0.016)
    blocking = dataclasses.replace(link, overlap=False)
    assert planner.predict_tpp(shape, costs, 5, blocking).period_s == pytest.approx(0.014)
    # CPU processes sharing two cores cannot beat twice one core.
    shared = planner.predict_tpp(shape, costs, 5, fast, cores=2)
    assert shared.period_s == pytest.approx(shape.steps * 0.01 / 2)


def test_dualparal_splits_memory_and_pays_latency():
    big = planner.model_shape("wan-14b")
    costs = _costs(step=0.5, decode=0.1, layers=big.config.num_layers, device="cuda")
    link = planner.LinkModel(gbps=400, latency_s=10e-6)
    local = planner.predict_local(big, costs)
    dp = planner.predict_dualparal(big, costs, 5, link)
    tpp = planner.predict_tpp(big, costs, 5, link)
    weights = big.dit_params * big.bytes / 2**30
    # Each layer rank holds a quarter of the layers (plus its caches), every TPP rank all of them.
    assert max(dp.memory_gb[:-1]) < local.memory_gb[0] - 0.6 * weights
    assert min(tpp.memory_gb[:-1]) > weights
    # The queue: the first frame waits for S-1 more blocks of live audio than TPP's.
    extra = dp.time_to_first_frame_s - dp.block_latency_s
    assert extra == pytest.approx(big.first_block_seconds + (big.steps - 1) * big.block_seconds)


def test_recommendation_respects_memory_and_target():
    big = planner.model_shape("wan-14b")
    costs = _costs(step=0.05, decode=0.05, layers=big.config.num_layers)
    preds = planner.predict_all(big, costs, 5, planner.LinkModel(400, 10e-6))
    assert {p.strategy for p in preds} == set(planner.STRATEGIES)
    rec = planner.recommend(preds, target_fps=big.fps)
    assert rec.choice is not None and rec.choice.runnable and rec.choice.realtime(big.fps)
    assert rec.choice.time_to_first_frame_s == min(
        p.time_to_first_frame_s for p in preds if p.runnable and p.realtime(big.fps)
    )
    tight = min(max(p.memory_gb) for p in preds if p.runnable) * 1.01
    rec = planner.recommend(preds, target_fps=big.fps, device_memory_gb=tight)
    assert rec.choice is not None and max(rec.choice.memory_gb) <= tight
    none = planner.recommend(preds, target_fps=1e6)
    assert "nothing reaches" in none.reason


def test_profiler_agrees_with_the_engine(shape, gen):
    """The layer-range profile adds up to what one engine step costs, and the profiled decode
    to the engine's, within 25 %. Both sides are timed in the thread's CPU time, the
    profiler's clock on a one-thread CPU (wall-clock medians of the same profile came out up
    to 2x apart on this shared machine). Profile and engine runs alternate, 21 rounds of about
    half a second, and the median of the per-round ratios counts: the few rounds a burst of
    load hits unevenly cannot move it. Five runs in a row on two cores loaded by other work
    (load average 4-6): step 0.91-0.96, decode 0.95-1.03 (single rounds 0.5-1.4). Fails if
    the profile leaves one layer out of a step (0.52) or times the decode at half the block's
    latent frames (0.60)."""
    rounds = []
    for _ in range(21):
        costs = planner.profile_costs(shape, device="cpu", dtype=torch.float32)
        engine = engine_cpu(gen, 4)
        rounds.append((costs.step_s / engine["step"], costs.decode_s / engine["decode"]))
    step = statistics.median(r[0] for r in rounds)
    decode = statistics.median(r[1] for r in rounds)
    assert LOW < step < HIGH, dict(step=step, rounds=rounds)
    assert LOW < decode < HIGH, dict(decode=decode, rounds=rounds)


def test_plan_command_prints_every_strategy(model_dir, capsys):
    from stream.cli import main

    code = main(["plan", "--model", model_dir, "--devices", "cpu:3", "--cores", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["strategy"] for p in out["predictions"]] == list(planner.STRATEGIES)
    assert out["recommendation"]["strategy"] in planner.STRATEGIES
    assert main(["plan", "--model", "nope", "--devices", "2"]) == 2


def _agreement_rounds(model_dir, strategy: str, rounds: int) -> list[dict[str, float]]:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "tests.planner_agreement", str(model_dir), strategy, str(rounds)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["tpp", "dualparal"])
def test_agreement_harness_measures_every_part(strategy, model_dir):
    """The suite's short version of the agreement check below (which is timed, so slow-marked:
    the machine is shared, and twice in full CI runs its median fell under the band, 0.80 and
    0.67, with the code unchanged). One round: the harness must run both executors and return
    a prediction made from what it measured (the workers' cores, the gloo link's CPU, the
    pipeline's period), not from defaults. Asserts no timing band."""
    (r,) = _agreement_rounds(model_dir, strategy, 1)
    for key in ("predicted", "measured", "period_ms", "predicted_period_ms", "one_device_ms"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert 0.2 < r["cores"] <= (os.cpu_count() or 1) + 0.05, r
    assert r["link_cpu_ms"] > 0, r  # the workers timed their gloo messages
    assert r["ratio"] == pytest.approx(r["measured"] / r["predicted"])
    assert r["measured"] == pytest.approx(r["one_device_ms"] / r["period_ms"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["tpp", "dualparal"])
def test_predictions_agree_with_the_cpu_executors(strategy, model_dir):
    """Predicted speed-up over one device vs. the measured one, within 25 %, from this run:
    costs profiled here, the gloo link as the workers measured it (its transport threads
    included; the hot path's sends are posted without waiting, so what stays on a stage is
    their posting time, measured_link's post_s), the CPU executors' steady state (3 worker
    processes, threads=1, two sessions fed as a live stream feeds them), all on this machine's
    cores.

    The machine is shared, so load must cancel. Seven rounds alternate a profile, one device,
    the pipeline and one device again; each round compares like with like: one device's CPU
    seconds per block (what it takes at full speed, however often it was descheduled) against
    the pipeline's period, and the prediction is made for the cores the workers had in that
    very window (their CPU seconds + the machine's idle seconds, per second; 0.9-1.7 here),
    not for a core count probed before or after (that missed by up to 2x when other work came
    and went in between). The median of the seven per-round ratios counts. Five runs in a row
    on two cores loaded by other work: tpp 0.90-1.01, dualparal 0.87-1.01 (single rounds
    0.65-1.4).

    Fails if predict_tpp (predict_dualparal) claims a 2x better period (0.47; 0.42), if the
    planner skips the link's cost (0.78; 0.64), or if the link's CPU is only the time of the
    threads that call send and recv, as measured before (dualparal 0.72: gloo's transport
    threads do two thirds of a message's work; tpp 0.89, which the band lets through).
    With the sends overlapped (wire.Link, wait=False), skipping the link's cost was tried
    again (measured_link returning a free link): dualparal 0.71 fails; tpp 0.99 passes, as a
    TPP stage's link share is now its posting time, well inside the band's noise here. That
    a hop hides behind the stage (max, not sum) is checked by
    test_tpp_period_is_the_slowest_stage: a 1-2 ms hop against stages of tens of ms is not
    visible within 25 %.

    The rounds run in a fresh interpreter (tests/planner_agreement.py: the driver is a stage
    of the pipeline, and inside a long pytest run it measured 25 % slow)."""
    rounds = _agreement_rounds(model_dir, strategy, 7)
    ratio = statistics.median(x["ratio"] for x in rounds)
    assert LOW < ratio < HIGH, json.dumps(dict(median=ratio, rounds=rounds), indent=1)


def test_profiler_times_the_wan_vae_and_audio_of_a_steady_block():
    """Wan models: the decode profile runs the real Wan VAE (downscaled, scaled back by pixels)
    and the audio features of a steady-state block (a Wan stream's first block is shorter)."""
    from pipelines.profiler import _profile_vae_and_audio

    wan = planner.model_shape("wan-1.3b", dtype="float32", cache_mode="timestep_forcing")
    assert wan.vae_kind == "wan" and wan.video_frames != wan.first_video_frames
    decode, features, reference = _profile_vae_and_audio(
        wan, torch.device("cpu"), torch.float32, repeats=2, downscale=30
    )
    assert decode > 0 and features > 0 and reference > 0
