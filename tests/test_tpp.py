"""TPP executor on CPU (gloo): same latents and frames as the single-process engine in
timestep-forcing mode, several sessions in flight, per-session state dropped, no bubbles."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from models.errors import ConfigError, SessionError
from pipelines.executors.local import model_info
from pipelines.executors.tpp import TPPExecutor, split_steps
from pipelines.generator import StreamingGenerator
from pipelines.messages import SessionSpec
from pipelines.reference import default_reference
from tests.multidevice_helpers import (
    audio_blocks,
    reference_blocks,
    request,
    results,
    save_test_model,
    submit_all,
)

BLOCKS = 8


def test_split_steps_is_contiguous_and_balanced():
    assert split_steps(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert split_steps(4, 2) == [range(0, 2), range(2, 4)]
    assert split_steps(5, 2) == [range(0, 2), range(2, 5)]  # the later rank takes the extra
    assert split_steps(2, 3) == [range(0, 0), range(0, 1), range(1, 2)]
    for steps in range(1, 9):
        for ranks in range(1, 6):
            parts = split_steps(steps, ranks)
            assert [s for r in parts for s in r] == list(range(steps))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert len(parts[-1]) >= 1  # the last rank always owns the last step
    with pytest.raises(ConfigError):
        split_steps(0, 2)


def test_launch_rejects_bad_options_before_starting_processes():
    with pytest.raises(ConfigError, match="timestep_forcing"):
        TPPExecutor.launch(model="tiny", devices="cpu:3", cache_mode="reencode")
    with pytest.raises(ConfigError, match="at least 2 devices"):
        TPPExecutor.launch(model="tiny", devices="cpu:1")
    with pytest.raises(ConfigError, match="unknown executor option"):
        TPPExecutor.launch(model="tiny", devices="cpu:3", bogus=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("tiny-audio"))


@pytest.fixture(scope="module")
def reference_gen(model_dir):
    from models.registry import load_model

    return StreamingGenerator.from_bundle(load_model(model_dir), cache_mode="timestep_forcing")


def test_audio_reaches_the_latents_of_the_test_model(reference_gen):
    """Otherwise the equivalence below would pass even if a rank lost the audio tokens."""
    info = model_info(reference_gen, "tiny")
    ref = default_reference(info.height, info.width)
    audio = audio_blocks(info, 2, seed=0)
    base = reference_blocks(reference_gen, ref, audio, seed=1)
    other = reference_blocks(reference_gen, ref, [audio[0], -3 * audio[1]], seed=1)
    assert torch.equal(base[0][0], other[0][0])
    assert not torch.allclose(base[1][0], other[1][0], atol=1e-3)


@pytest.fixture(scope="module", params=[2, 4], ids=["2-step-ranks", "4-step-ranks"])
def tpp(request, model_dir):
    ex = TPPExecutor.launch(
        model=model_dir,
        devices=f"cpu:{request.param + 1}",
        threads=1,
        timeout_s=30,
        keep_latents=64,
        verbose=False,
    )
    yield ex
    ex.close()


def _check_equal(result, expected_latent, expected_frames, latents, key):
    assert result.ok, result.error
    np.testing.assert_allclose(latents[key], expected_latent.numpy(), rtol=1e-5, atol=1e-5)
    diff = np.abs(result.frames.astype(np.int16) - expected_frames.astype(np.int16))
    assert diff.max() <= 1


@pytest.mark.distributed
def test_tpp_matches_single_process_two_sessions_interleaved(tpp, reference_gen):
    """>= 8 blocks of two sessions submitted interleaved (a0 b0 a1 b1 ...): both sessions'
    latents equal the single-process engine's; one session refreshes its sink after block 0."""
    info = tpp.info
    ref = default_reference(info.height, info.width)
    sessions = {
        "a": dict(seed=11, sink_refresh=False),
        "b": dict(seed=12, sink_refresh=True),
    }
    audio = {sid: audio_blocks(info, BLOCKS, seed=i) for i, sid in enumerate(sessions)}
    for sid, opts in sessions.items():
        tpp.open_session(SessionSpec(sid, ref, **opts))
    futs = submit_all(
        tpp, [request(sid, i, audio[sid][i]) for i in range(BLOCKS) for sid in sessions]
    )
    got = results(futs, timeout=120)
    for sid, opts in sessions.items():
        expected = reference_blocks(reference_gen, ref, audio[sid], **opts)
        for i, (latent, frames) in enumerate(expected):
            _check_equal(got[sid, i], latent, frames, tpp.latents, (sid, i))
    # The comparison can fail: the two sessions really differ, and blocks differ from each other.
    assert not np.allclose(tpp.latents["a", 3], tpp.latents["b", 3])
    assert not np.allclose(tpp.latents["a", 3], tpp.latents["a", 4])
    for sid in sessions:
        tpp.close_session(sid)


@pytest.mark.distributed
def test_tpp_rank_holds_only_its_steps_and_drops_closed_sessions(tpp, reference_gen):
    info = tpp.info
    ref = default_reference(info.height, info.width)
    tpp.open_session(SessionSpec("mem", ref, seed=3))
    full = reference_gen.new_session(ref, seed=3)  # all S step caches on one device
    ring = full.caches[0].keys.numel() * full.caches[0].keys.element_size() * 2
    sink = full.cache_bytes() - ring * len(full.caches)
    stats = tpp.worker_stats()
    ranks = len(stats) - 1
    for r, own in enumerate(split_steps(info.steps, ranks)):
        assert stats[r]["sessions"] == 1
        assert stats[r]["cache_bytes"] == sink + ring * len(own)
    assert stats[-1]["sessions"] == 1  # the decode rank's VAE state
    tpp.close_session("mem")
    stats = tpp.worker_stats()
    assert [s["sessions"] for s in stats] == [0] * len(stats)


@pytest.mark.distributed
def test_tpp_user_errors_end_only_that_session(tpp):
    info = tpp.info
    ref = default_reference(info.height, info.width)
    tpp.open_session(SessionSpec("bad", ref, seed=0))
    tpp.open_session(SessionSpec("good", ref, seed=0))
    short = np.zeros(10, np.float32)
    with pytest.raises(SessionError, match="audio samples"):
        tpp.submit(request("bad", 0, short)).result(timeout=60)
    # The session was dropped everywhere: later blocks are refused, not generated.
    late = tpp.submit(request("bad", 1, audio_blocks(info, 2, 0)[1])).result(timeout=60)
    assert not late.ok and "not open" in late.error
    skipped = tpp.submit(request("good", 1, audio_blocks(info, 2, 0)[1])).result(timeout=60)
    assert not skipped.ok and "out of order" in skipped.error
    ok = tpp.submit(request("good", 0, audio_blocks(info, 1, 0)[0])).result(timeout=60)
    assert ok.ok and ok.frames.shape == (info.first_block_frames, info.height, info.width, 3)
    tpp.close_session("good")
    assert tpp.healthy()


@pytest.mark.distributed
def test_tpp_pipeline_has_no_bubbles_once_full(tpp):
    """From the ranks' own timestamps: in steady state no rank waits longer than one stage time
    between two blocks, and the slowest stage is kept busy (blocks overlap across ranks)."""
    info = tpp.info
    ref = default_reference(info.height, info.width)
    n = 10
    for sid in ("o1", "o2"):
        tpp.open_session(SessionSpec(sid, ref, seed=5))
    t0 = time.perf_counter()
    futs = submit_all(
        tpp,
        [request(sid, i, audio_blocks(info, n, 1)[i]) for i in range(n) for sid in ("o1", "o2")],
    )
    results(futs, timeout=120)
    stats = tpp.worker_stats()
    for sid in ("o1", "o2"):
        tpp.close_session(sid)
    ranks = len(stats)
    events = [
        sorted((e for e in s["events"] if e["start"] >= t0), key=lambda e: e["start"])
        for s in stats
    ]
    assert all(len(ev) == 2 * n for ev in events)
    busy = [statistics.median(e["end"] - e["start"] for e in ev) for ev in events]
    stage = max(busy)
    slowest = busy.index(stage)
    fill = ranks  # blocks before the pipeline is full, and as many at the end while it drains
    for r, ev in enumerate(events):
        steady = ev[fill : len(ev) - fill]
        gaps = [b["start"] - a["end"] for a, b in zip(steady, steady[1:], strict=False)]
        assert statistics.median(gaps) <= stage, (r, gaps, busy)
    # A pipeline keeps its slowest rank busy; run one block at a time and it would wait for
    # all other stages (sum of the others' busy time) between every two blocks.
    steady = events[slowest][fill : 2 * n - fill]
    gaps = [b["start"] - a["end"] for a, b in zip(steady, steady[1:], strict=False)]
    others = sum(busy) - stage
    assert statistics.median(gaps) < 0.5 * others, (gaps, busy)
    # Throughput: blocks leave about one per stage time, not one per sum of stages.
    ends = [e["end"] for e in events[-1][fill : 2 * n - fill]]
    period = statistics.median(np.diff(ends))
    assert period < stage + 0.5 * others, (period, busy)


@pytest.mark.distributed
def test_tpp_unexpected_error_ends_only_that_session(tpp):
    """An input no check anticipated (a reference of the wrong size) fails inside a worker: that
    open fails, the workers keep running, other sessions stream on."""
    info = tpp.info
    tpp.open_session(SessionSpec("fine", default_reference(info.height, info.width), seed=1))
    with pytest.raises(Exception, match="rank 0"):
        tpp.open_session(SessionSpec("odd", default_reference(2 * info.height, 2 * info.width)))
    assert tpp.healthy()
    r = tpp.submit(request("fine", 0, audio_blocks(info, 1, 0)[0])).result(timeout=60)
    assert r.ok, r.error
    assert [s["sessions"] for s in tpp.worker_stats()] == [1] * (len(tpp.pids()))
    tpp.close_session("fine")
