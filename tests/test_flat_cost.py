"""Constant cost per block: memory and time must not grow with the length of the stream."""

import os
import time

import numpy as np
import pytest

from pipelines.generator import StreamingGenerator
from pipelines.reference import default_reference

BLOCKS = 2000
PAIRS = 200


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reencode", "timestep_forcing"])
def test_memory_and_time_flat_over_2000_blocks(tiny_bundle, mode):
    gen = StreamingGenerator.from_bundle(tiny_bundle, cache_mode=mode)
    ref = default_reference(gen.height, gen.width)
    state = gen.new_session(ref, seed=0)
    rng = np.random.default_rng(0)
    audio = [(0.2 * rng.standard_normal(gen.block_samples(b))).astype(np.float32) for b in (0, 1)]
    cache_bytes = state.cache_bytes()
    rss_50 = 0
    for b in range(BLOCKS):
        frames, _ = gen.generate_block(state, audio[min(b, 1)])
        if b == 50:
            rss_50 = rss_bytes()
    rss_end = rss_bytes()
    assert frames.shape[0] == gen.block_video_frames(1)
    assert state.cache_bytes() == cache_bytes  # caches are preallocated, never resized
    assert state.next_frame == BLOCKS * gen.config.frames_per_block
    growth = (rss_end - rss_50) / rss_50
    assert growth < 0.05, f"RSS grew {growth:.1%} between block 50 and block {BLOCKS}"

    # Time: a block of the 2,000-block-old stream against a block of a young stream whose
    # history window is already full, measured alternately, so that whatever else the shared
    # machine does at that moment costs both the same. A cost that grows with stream length
    # shows as a ratio above 1; load from other processes cancels out of the per-pair ratios.
    young = gen.new_session(ref, seed=1)
    warm_blocks = gen.config.window_frames // gen.config.frames_per_block + 4
    for _ in range(warm_blocks):
        gen.generate_block(young, audio[1])
    ratios = np.empty(PAIRS)
    for i in range(PAIRS):
        sessions = (state, young) if i % 2 == 0 else (young, state)
        took = {}
        for s in sessions:
            t0 = time.perf_counter()
            gen.generate_block(s, audio[1])
            took[id(s)] = time.perf_counter() - t0
        ratios[i] = took[id(state)] / took[id(young)]
    ratio = float(np.median(ratios))
    assert ratio < 1.15, f"a block at {BLOCKS} blocks costs {ratio:.2f}x one of a young stream"
