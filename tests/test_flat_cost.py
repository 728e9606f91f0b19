"""Constant cost per block: memory and time must not grow with the length of the stream."""

import os
import time

import numpy as np
import pytest

from pipelines.generator import StreamingGenerator
from pipelines.reference import default_reference

BLOCKS = 2000


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reencode", "timestep_forcing"])
def test_memory_and_time_flat_over_2000_blocks(tiny_bundle, mode):
    gen = StreamingGenerator.from_bundle(tiny_bundle, cache_mode=mode)
    state = gen.new_session(default_reference(gen.height, gen.width), seed=0)
    rng = np.random.default_rng(0)
    audio = [(0.2 * rng.standard_normal(gen.block_samples(b))).astype(np.float32) for b in (0, 1)]
    times = np.empty(BLOCKS)
    cache_bytes = state.cache_bytes()
    rss_50 = 0
    for b in range(BLOCKS):
        t0 = time.perf_counter()
        frames, _ = gen.generate_block(state, audio[min(b, 1)])
        times[b] = time.perf_counter() - t0
        if b == 50:
            rss_50 = rss_bytes()
    rss_end = rss_bytes()
    assert frames.shape[0] == gen.block_video_frames(1)
    assert state.cache_bytes() == cache_bytes  # caches are preallocated, never resized
    assert state.next_frame == BLOCKS * gen.config.frames_per_block
    growth = (rss_end - rss_50) / rss_50
    assert growth < 0.05, f"RSS grew {growth:.1%} between block 50 and block {BLOCKS}"
    # No upward trend: the median of the last quarter is close to that of the early blocks,
    # and a robust line fit over blocks 50.. has a small total rise (medians absorb noise
    # from other processes on a shared machine).
    early = np.median(times[50:550])
    late = np.median(times[-500:])
    assert late < 1.3 * early, (
        f"median block time rose from {early * 1e3:.2f} to {late * 1e3:.2f} ms"
    )
    x = np.arange(50, BLOCKS)
    chunks = np.array_split(np.arange(len(x)), 15)
    mids = np.array([np.median(x[c]) for c in chunks])
    meds = np.array([np.median(times[50:][c]) for c in chunks])
    slope = np.polyfit(mids, meds, 1)[0]
    assert slope * BLOCKS < 0.3 * early, f"block time trend {slope * 1e6:.3f} µs per block"
