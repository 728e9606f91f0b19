"""Live Avatar's wav2vec2 audio features (models/wav2vec.py) against upstream's computation.

Fixtures: tests/fixtures/liveavatar/wav2vec/, written by scripts/golden/wav2vec.py running
upstream's AudioEncoder (transformers 4.51.3, upstream's pin) on the tiny random folder there.
Block b's window is its new samples (9 video frames for block 0, then 12, 640 samples a frame);
the features cover the 12 frames ending at the block's end, after `context` frames of left context.

Tolerances: float32 max |ours - upstream| <= 1e-5 * max |upstream| (bit-exact on the CPU that
wrote the fixtures); bfloat16 rms <= 2% and max <= 5% of upstream's (bf16 against float32 upstream
is 1.2% rms, 2.8% max, so this admits another kernel's roundings and nothing structural).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.errors import ConfigError, InvalidAudioError, ModelNotFoundError
from models.wav2vec import FOLDER_NAME, Wav2VecFeatures, write_tiny_wav2vec

HERE = Path(__file__).parent / "fixtures" / "liveavatar" / "wav2vec"
FOLDER = HERE / FOLDER_NAME
PER_FRAME = 640
BLOCK_FRAMES = [(0, 9), (9, 21), (21, 33)]  # video frames [start, end) of blocks 0, 1, 2
LATENT = 3  # latent frames per block -> 12 feature frames


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(HERE / "golden.safetensors")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((HERE / "meta.json").read_text())


@pytest.fixture(scope="module")
def audio(golden) -> np.ndarray:
    return golden["audio"].numpy()


@pytest.fixture(scope="module")
def encoders() -> dict[int, Wav2VecFeatures]:
    return {c: Wav2VecFeatures(FOLDER, context_frames=c) for c in (0, 25)}


def windows(audio: np.ndarray) -> list[tuple[np.ndarray, int]]:
    return [(audio[a * PER_FRAME : b * PER_FRAME], b - a) for a, b in BLOCK_FRAMES]


def stream(enc: Wav2VecFeatures, audio: np.ndarray) -> list[torch.Tensor]:
    state = enc.new_state()
    return [enc.encode(w, n, LATENT, state) for w, n in windows(audio)]


def upstream_layout(feats: torch.Tensor) -> torch.Tensor:
    """[frames, layers, dim] -> upstream's per-block [1, layers, dim, frames]."""
    return feats.permute(1, 2, 0)[None]


@pytest.mark.parametrize("context", [0, 25])
def test_blocks_equal_upstream_float32(encoders, golden, audio, context):
    """Blocks 0-2 streamed through our encoder equal upstream's per-chunk features on the same
    buffers. Fails if the feature extractor's normalisation is skipped, if the last hidden state
    is taken without the final LayerNorm (transformers 5's hidden_states[-1]), if the 30 Hz
    length is rounded instead of truncated, if the zeroed last frame is clamped to the previous
    one, or if the state drops one sample of context."""
    enc = encoders[context]
    for b, feats in enumerate(stream(enc, audio)):
        assert feats.shape == (12, enc.layers, enc.feature_dim) == (12, 25, 16)
        assert feats.dtype == torch.float32
        ref = golden[f"block_f32_c{context}_b{b}"]
        diff = (upstream_layout(feats) - ref).abs().max()
        assert diff <= 1e-5 * ref.abs().max(), f"block {b}: max diff {diff}"


@pytest.mark.parametrize("context", [0, 25])
def test_blocks_equal_upstream_bfloat16(golden, audio, context):
    """The same in bfloat16 (upstream's dtype in the pipeline), to the bf16 tolerance above.
    Fails if the network runs in float32 and only the result is cast (1.2% rms off), or if the
    final LayerNorm is skipped."""
    enc = Wav2VecFeatures(FOLDER, context_frames=context, dtype=torch.bfloat16)
    for b, feats in enumerate(stream(enc, audio)):
        assert feats.dtype == torch.bfloat16
        ref = golden[f"block_bf16_c{context}_b{b}"].float()
        diff = upstream_layout(feats).float() - ref
        rms = diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
        assert rms <= 0.02 and diff.abs().max() <= 0.05 * ref.abs().max(), f"block {b}: {rms}"


def test_last_frame_of_a_buffer_is_zero_like_upstream(encoders, meta):
    """Upstream's bucketing zeroes video frame j when round(1.2 j) reaches the interpolated length
    int((2F - 1) * 0.6) of an F-frame buffer: the last frame for F = 12 and 37 (every block here),
    never for F = 13 or 8 (F % 5 == 3). Fails if the zero tail is replaced by the nearest frame."""
    assert all(z == [11] for z in meta["zero_frames"].values())
    enc = encoders[0]
    rng = np.random.default_rng(5)
    for frames, zero_tail in ((12, True), (37, True), (13, False), (8, False)):
        feats = enc.features(0.1 * rng.standard_normal(frames * PER_FRAME).astype(np.float32))
        assert feats.shape[0] == frames
        assert bool((feats[-1] == 0).all()) is zero_tail, frames
        assert bool(feats[:-1].abs().sum(dim=(1, 2)).gt(0).all())


@pytest.mark.parametrize("context", [0, 25])
def test_block0_starts_with_silence(encoders, audio, context):
    """Block 0 shows 9 frames, so its first 3 feature frames (plus the context) come from silence
    before the stream start. Fails if the pre-roll is anything but zeros (checked against noise),
    or if block 0's window is placed at the start of the buffer instead of its end."""
    enc = encoders[context]
    window = audio[: 9 * PER_FRAME]
    got = enc.encode(window, 9, LATENT, enc.new_state())
    preroll = (context + 3) * PER_FRAME
    silent = enc.features(np.concatenate([np.zeros(preroll, np.float32), window]))[-12:]
    assert torch.equal(got, silent)
    noisy = np.random.default_rng(1).standard_normal(preroll).astype(np.float32) * 0.05
    other = enc.features(np.concatenate([noisy, window]))[-12:]
    assert (got - other).abs().max() > 1e-2  # the pre-roll matters: the check can fail


@pytest.mark.parametrize("context", [0, 25])
def test_streaming_equals_each_buffer_in_one_go(encoders, audio, context):
    """Each streamed block equals the features of its whole buffer (context + 12 frames ending at
    the block's end, silence before the stream) computed in one call, bit for bit, and the state
    holds only the audio the next block reaches back to: at most context + 11 frames, never the
    stream so far. Two interleaved streams do not mix. Fails if the state keeps one sample too
    few (block 1 reads zeros) or if two sessions share history."""
    enc = encoders[context]
    need = (context + 12) * PER_FRAME
    padded = np.concatenate([np.zeros(need, np.float32), audio])
    state, other = enc.new_state(), enc.new_state()
    noise = np.random.default_rng(2).standard_normal(audio.shape[0]).astype(np.float32) * 0.1
    for (window, n), (_, end) in zip(windows(audio), BLOCK_FRAMES, strict=True):
        enc.encode(noise[: n * PER_FRAME], n, LATENT, other)  # another session, interleaved
        got = enc.encode(window, n, LATENT, state)
        stop = need + end * PER_FRAME
        assert torch.equal(got, enc.features(padded[stop - need : stop])[-12:])
        assert state.history.shape[0] <= (context + 11) * PER_FRAME
        assert state.history.shape[0] == min((context + 11) * PER_FRAME, end * PER_FRAME)


def test_whole_clip_equals_upstream_file_mode(encoders, golden, audio):
    """One buffer holding the whole 2 s clip equals the pipeline's file-mode encode_audio (frames
    0-49; frame 49 is zero there too). How far windowed blocks are from these file-mode features
    is measured by the golden script (meta.json "windowed_vs_file"), not asserted. Fails if the
    bucket index truncates j * 30 / 25 instead of rounding it."""
    ref = golden["file_f32"]
    feats = encoders[0].features(audio)
    assert feats.shape == (50, 25, 16) and ref.shape == (1, 25, 16, 50)
    assert (upstream_layout(feats) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert bool((feats[49] == 0).all())


def test_dtype_device_and_inference_mode(audio):
    """to(device, dtype) moves the network; features come back in that dtype as inference
    tensors (no autograd graph kept per block). Fails if to() forgets the dtype."""
    enc = Wav2VecFeatures(FOLDER).to("cpu", torch.bfloat16)
    feats = enc.encode(audio[: 9 * PER_FRAME], 9, LATENT, enc.new_state())
    assert feats.dtype == torch.bfloat16 and feats.device.type == "cpu"
    assert feats.is_inference()
    assert next(enc._model.parameters()).dtype == torch.bfloat16
    assert (enc.sample_rate, enc.feature_dim, enc.layers, enc.tokens_per_latent_frame) == (
        16000, 16, 25, 4)  # fmt: skip


def test_tiny_folder_is_reproducible_and_loads_cleanly(tmp_path):
    """write_tiny_wav2vec rewrites the committed fixture folder byte for byte, and transformers
    loads it as Wav2Vec2ForCTC with zero missing or unexpected keys (the golden script loads the
    same folder in upstream's AudioEncoder, Wav2Vec2Processor included). Fails if a key is
    dropped or renamed (weight_g -> parametrizations) or the seed is ignored."""
    from transformers import Wav2Vec2ForCTC

    out = write_tiny_wav2vec(tmp_path / FOLDER_NAME, seed=0)
    names = sorted(p.name for p in FOLDER.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (FOLDER / name).read_bytes(), name
    keys = load_file(FOLDER / "model.safetensors")
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in keys  # the released layout
    _, info = Wav2Vec2ForCTC.from_pretrained(
        FOLDER, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    other = write_tiny_wav2vec(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()


def test_wrong_audio_gives_clear_errors(encoders, audio):
    """A window of the wrong length (a 12-frame window for block 0, audio left at 48 kHz),
    stereo audio, or a block longer than its latent frames raise the project's errors, saying
    what was expected. Fails if the length check is dropped (wav2vec would happily run)."""
    enc = encoders[0]
    with pytest.raises(InvalidAudioError, match=r"block 0 needs 5760 mono samples"):
        enc.encode(audio[: 12 * PER_FRAME], 9, LATENT, enc.new_state())
    with pytest.raises(InvalidAudioError, match=r"resample the audio to 16000 Hz"):
        enc.encode(np.zeros(9 * 1920, np.float32), 9, LATENT, enc.new_state())
    with pytest.raises(InvalidAudioError, match=r"shape \(2, 5760\)"):
        enc.encode(np.zeros((2, 9 * PER_FRAME), np.float32), 9, LATENT, enc.new_state())
    with pytest.raises(ConfigError, match="covers 1..12 video frames"):
        enc.encode(np.zeros(13 * PER_FRAME, np.float32), 13, LATENT, enc.new_state())
    with pytest.raises(ConfigError, match="context_frames"):
        Wav2VecFeatures(FOLDER, context_frames=-1)
    with pytest.raises(ConfigError, match="whole number of samples"):
        Wav2VecFeatures(FOLDER, fps=30.5)


def test_bad_folders_give_clear_errors(tmp_path):
    """Missing folder, missing config, a config of another model, missing weights, truncated
    weights and a checkpoint lacking a key each raise one line naming the file, never a
    transformers traceback. Fails if the missing-key check is dropped (transformers only warns
    and leaves the weight random)."""
    from safetensors.torch import save_file

    with pytest.raises(ModelNotFoundError, match="wav2vec2 folder not found"):
        Wav2VecFeatures(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(FOLDER, bad)
    (bad / "config.json").rename(bad / "config.json.bak")
    with pytest.raises(ModelNotFoundError, match="config.json is missing"):
        Wav2VecFeatures(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 16}))
    with pytest.raises(ConfigError, match="describes a 't5' model, not wav2vec2"):
        Wav2VecFeatures(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        Wav2VecFeatures(bad)
    (bad / "config.json.bak").rename(bad / "config.json")

    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot load wav2vec2 from") as err:
        Wav2VecFeatures(bad)
    assert "\n" not in str(err.value)
    tensors = load_file(FOLDER / "model.safetensors")
    del tensors["wav2vec2.encoder.layers.3.attention.k_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing_keys: .*layers\.3\.attention\.k_proj"):
        Wav2VecFeatures(bad)
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match="holds no weights"):
        Wav2VecFeatures(bad)
