"""No host sync inside a block, except where its frames leave for the video encoder.

A call that makes the host wait for the device (`.item()`, `.cpu()`, `.tolist()`, `.numpy()`,
`bool(t)`, `int(t)`, `float(t)`, a synchronize) in the middle of a block drains the GPU's queue:
the host stops issuing kernels until the device catches up, and the device then idles while the
host issues the next ones. On the CPU the calls are counted by patching them (they are what
would sync on a GPU); with a GPU, torch.cuda.set_sync_debug_mode catches every sync, the
hidden ones (a pageable host-to-device copy) included.

Allowed: `decode`'s one copy of the frames to the host per block. Host-side by design, so not
counted: the log-mel audio front end (models/audio.py), which runs on the CPU before its tokens
are copied to the device.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from models.registry import load_model
from pipelines.generator import StreamingGenerator
from pipelines.reference import default_reference

ROOT = Path(__file__).resolve().parent.parent
TENSOR_SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
BLOCKS = 6  # past the ring filling up (2 blocks), the sink refresh and Live Avatar's clip start


@contextmanager
def count_syncs() -> Iterator[list[tuple[str, list[str]]]]:
    """Every sync-making call while inside: (name, the project frames of its stack)."""
    calls: list[tuple[str, list[str]]] = []

    def record(name: str) -> None:
        frames = [
            f"{Path(f.filename).relative_to(ROOT)}:{f.name}"
            for f in traceback.extract_stack()[:-2]
            if f.filename.startswith(str(ROOT))
            and "/tests/" not in f.filename
            and "/.venv/" not in f.filename
        ]
        calls.append((name, frames))

    def wrap(owner: object, name: str) -> tuple[object, str, object]:
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            record(f"{getattr(owner, '__name__', owner)}.{name}")
            return original(*args, **kwargs)

        setattr(owner, name, patched)
        return owner, name, original

    cuda = [torch.cuda, torch.cuda.Stream, torch.cuda.Event]
    undo = [wrap(torch.Tensor, n) for n in TENSOR_SYNCS]
    undo += [wrap(owner, "synchronize") for owner in cuda]
    try:
        yield calls
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def _violations(calls: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    allowed = ("pipelines/generator.py:decode", "models/audio.py:")
    return [(n, fr) for n, fr in calls if not any(a in f for f in fr for a in allowed)]


@pytest.mark.parametrize(
    ("name", "mode"),
    [("default", "reencode"), ("default", "timestep_forcing"), ("liveavatar-tiny", None)],
)
def test_blocks_make_no_host_sync_but_the_frames(name, mode):
    """Over 6 blocks (ring full, sink refresh, Live Avatar's wav2vec2 front end and sink
    refresh at block 4) the only sync-making calls are decode's, one copy of the frames per
    block. Fails if a block reads a number off a tensor (tried: `float(t)` of the timestep in
    block_forward; tried: the sink position as `.item()` of a tensor: both fail every case)."""
    gen = StreamingGenerator.from_bundle(
        load_model(name), dtype=torch.bfloat16, **({"cache_mode": mode} if mode else {})
    )
    state = gen.new_session(default_reference(gen.height, gen.width), seed=0)
    rng = np.random.default_rng(0)
    audio = [
        (0.1 * rng.standard_normal(gen.block_samples(i))).astype(np.float32) for i in range(BLOCKS)
    ]
    with count_syncs() as calls:
        for a in audio:
            gen.generate_block(state, a)
    assert _violations(calls) == []
    in_decode = [n for n, fr in calls if any("generator.py:decode" in f for f in fr)]
    assert in_decode.count("Tensor.cpu") == BLOCKS


def test_the_counter_sees_a_sync():
    """Negative control: the patch catches `.item()` and `bool(t)` made by project code."""
    from models.kv_cache import KVCache

    cache = KVCache.allocate(
        layers=1, batch=1, heads=1, head_dim=6, tokens_per_frame=2, window_frames=2
    )
    with count_syncs() as calls:
        cache.keys.sum().item()  # from the test: not counted (tests/ is not project code)
        KVCache.nbytes.fget(cache)  # no sync
        bool(torch.ones(1).bool().any())
    assert [n for n, _ in calls] == ["Tensor.item", "Tensor.__bool__"]
    assert _violations([("Tensor.item", ["models/dit.py:forward"])]) != []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_make_no_host_sync_on_the_gpu():
    """With a GPU: torch.cuda.set_sync_debug_mode("error") around everything of a block but
    its decode (audio features, noise upload, every step, the cache update) raises on any
    sync, a pageable upload included."""
    for name in ("default", "liveavatar-tiny"):
        gen = StreamingGenerator.from_bundle(
            load_model(name, device="cuda", dtype=torch.bfloat16),
            device="cuda",
            dtype=torch.bfloat16,
        )
        state = gen.new_session(default_reference(gen.height, gen.width), seed=0)
        for i in range(BLOCKS):
            audio = np.zeros(gen.block_samples(i), dtype=np.float32)
            torch.cuda.set_sync_debug_mode("error")
            try:
                inputs = gen.prepare_block(state, audio)
                x = inputs.noise
                for step in range(state.steps):
                    x = gen.denoise_step(state, inputs, step, x)
                gen.finish_block(state, inputs, x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            frames = gen.decode(state, x)
            assert frames.shape[0] == gen.block_video_frames(i)
