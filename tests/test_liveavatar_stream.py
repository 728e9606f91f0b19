"""Live Avatar's streaming pipeline against upstream's (golden fixture written by
scripts/golden/stream.py: three blocks through causal_s2v_pipeline_tpp_blockwise.py run as
upstream runs it, 4 step ranks with their own caches + 1 VAE rank).

What the fixture pins: the reference and motion latents from the image, the per-clip noise,
diffusers' 4-step schedule with shift 3, one cache per step (timestep forcing) with a ring of one
clip, the sink rolled ahead with its floor at frame 30, the sink's reference replaced by block
0's first clean frame from the next clip on (block 2 here), the ring wrapping at block 2, and
the streaming decode primed with 7 motion latents with block 0's first 3 frames dropped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.liveavatar import LiveAvatarVAE, pipeline_settings
from models.s2v import LiveAvatarTransformer, S2VConfig
from models.wan_vae_checkpoint import load_wan21_vae
from models.wav2vec import Wav2VecFeatures
from pipelines.executors.stages import block_inputs
from pipelines.generator import PipelineConfig, StreamingGenerator

FIX = Path(__file__).parent / "fixtures" / "liveavatar"


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((FIX / "stream" / "meta.json").read_text())
    return meta, load_file(FIX / "stream" / "stream.safetensors")


def make_generator(meta, data, dtype=torch.float32, **overrides) -> StreamingGenerator:
    cfg = json.loads((FIX / "transformer" / "config.json").read_text())
    model = LiveAvatarTransformer(S2VConfig.from_dict({**cfg, "text_dim": 16})).eval()
    model.load_state_dict(load_file(FIX / "transformer" / "weights.safetensors"))
    vae = LiveAvatarVAE(load_wan21_vae(FIX / "stream" / "Wan2.1_VAE.pth"))
    blocks_per_clip = meta["infer_frames"] // 12
    settings = pipeline_settings()
    settings.update(
        noise_clip_blocks=blocks_per_clip,
        sink_refresh_block=blocks_per_clip,
        sink_distance=meta["sink_distance"],
        sink_distance_max=None,  # upstream draws it at random; the fixture fixed it
    )
    settings.update(window_frames=3 * blocks_per_clip - 3)  # upstream's ring holds one clip
    settings.update(overrides)
    config = PipelineConfig(frames_per_block=3, steps=4, shift=3.0, **settings)
    model.to(dtype)
    vae.to(dtype=dtype)
    h, w = meta["size_hw"]
    audio = Wav2VecFeatures(FIX / "wav2vec" / "wav2vec2-large-xlsr-53-english", dtype=dtype)
    return StreamingGenerator(
        model,
        vae,
        config=config,
        context=data["context"][None],
        audio_encoder=audio,
        fps=25.0,
        height=h,
        width=w,
        device="cpu",
        dtype=dtype,
    )


def reference_image(data) -> np.ndarray:
    return data["image"].numpy()


def as_uint8(video: torch.Tensor) -> torch.Tensor:
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def run_stream(gen, data, blocks=3, record=None):
    state = gen.new_session(reference_image(data), seed=420)
    out = []
    for b in range(blocks):
        noise = state.noise.next()
        feats = data[f"audio.{b}"].permute(0, 3, 1, 2)  # upstream [1, layers, dim, T] -> ours
        inputs = block_inputs(gen, b, state.next_frame, feats.to(gen.dtype), noise)
        x = noise
        for step in range(4):
            x = gen.denoise_step(state, inputs, step, x)
            if record is not None:
                record[(b, step)] = x
        gen.finish_block(state, inputs, x)
        with torch.no_grad():
            video = gen.vae.decode_block(x, state.vae_state)
        out.append((noise, x, video))
    return state, out


def test_reference_and_motion_latents_equal_upstream(golden):
    """The reference (5 still frames, second latent) and the motion latents (5 x 73 still
    frames, 92 latents). Fails if the reference is encoded as one frame or the motion clip is
    73 frames long."""
    meta, data = golden
    gen = make_generator(meta, data)
    src = gen.encode_reference(reference_image(data))
    torch.testing.assert_close(src.reference, data["ref_latents"], atol=1e-4, rtol=1e-4)
    assert src.motion.shape[2] == int(data["motion_frames_total"]) == 92
    first7, last19 = data["motion_latents_first7"], data["motion_latents_last19"]
    torch.testing.assert_close(src.motion[:, :, :7], first7, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(src.motion[:, :, -19:], last19, atol=1e-4, rtol=1e-4)


def test_clip_noise_equals_upstream(golden):
    """Per-clip noise from seed + clip index. Fails if blocks draw independent noise."""
    meta, data = golden
    gen = make_generator(meta, data)
    state = gen.new_session(reference_image(data), seed=meta["seed"])
    for b in range(3):
        torch.testing.assert_close(state.noise.next(), data[f"noise.{b}"][None], atol=0, rtol=0)


def test_every_step_and_every_frame_equals_upstream(golden):
    """Each step's latent and each block's decoded frames. Fails if a step reads another
    step's cache, the sink is refreshed at the wrong block (or not at all), the schedule is not
    diffusers', or the decode is not primed / does not drop block 0's first frames."""
    meta, data = golden
    gen = make_generator(meta, data)
    record: dict = {}
    _, out = run_stream(gen, data, record=record)
    for b in range(3):
        for step in range(1, 4):
            torch.testing.assert_close(
                record[(b, step - 1)][0], data[f"latent.{b}.{step}"], atol=2e-5, rtol=1e-4
            )
        torch.testing.assert_close(out[b][1][0], data[f"clean.{b}"], atol=2e-5, rtol=1e-4)
        if f"frames.{b}" in data:
            ours, theirs = as_uint8(out[b][2]), data[f"frames.{b}"]
            assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
            diff = (ours.int() - theirs.int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999
    assert out[0][2].shape[2] == 9 and out[1][2].shape[2] == 12


def test_the_sink_refresh_is_what_makes_block_two_match(golden):
    """Negative control: without the refresh, blocks 0-1 still match and block 2 does not."""
    meta, data = golden
    gen = make_generator(meta, data, sink_refresh=False)
    _, out = run_stream(gen, data)
    torch.testing.assert_close(out[1][1][0], data["clean.1"], atol=2e-5, rtol=1e-4)
    assert (out[2][1][0] - data["clean.2"]).abs().max() > 1e-3


def test_bfloat16_stream_stays_close(golden):
    """The same stream in bfloat16: finite, and decoded frames within 6 grey levels of
    upstream's float32 frames on average (bfloat16 keeps 8 bits of mantissa)."""
    meta, data = golden
    gen = make_generator(meta, data, dtype=torch.bfloat16)
    _, out = run_stream(gen, data)
    for b in (0, 2):
        video = out[b][2].float()
        assert torch.isfinite(video).all()
        diff = (as_uint8(video).float() - data[f"frames.{b}"].float()).abs().mean()
        assert diff < 6.0, diff
