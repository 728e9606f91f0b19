"""The shipped default model: it loads, looks like its reference, and talks with the audio."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from models.registry import DEFAULT_DIR, load_model
from pipelines.reference import load_reference_image
from pipelines.training.evaluate import (
    DRIFT_SETTINGS,
    drift_summary,
    loudness_openness_gap,
    run_stream,
)
from pipelines.training.metrics import identity_drift

pytestmark = pytest.mark.skipif(
    not (DEFAULT_DIR / "model.json").is_file(), reason="no shipped default weights"
)


@pytest.fixture(scope="module")
def bundle():
    return load_model("default")


@pytest.fixture(scope="module")
def reference(bundle):
    refs = sorted(Path(DEFAULT_DIR, "refs").glob("*.png"))
    assert refs, "the default model ships sample reference images"
    return load_reference_image(refs[0], bundle.defaults.height, bundle.defaults.width)


def test_default_is_the_trained_bundle(bundle):
    assert bundle.trained and bundle.notice == ""
    size = sum(f.stat().st_size for f in DEFAULT_DIR.glob("*.safetensors"))
    assert size < 8 * 2**20  # committed to git: a few MB


def test_mouth_opens_more_on_speech_than_on_silence(bundle, reference):
    gap = loudness_openness_gap(bundle, reference, seconds=1.2)
    assert gap > 0.02, gap


def test_frames_stay_close_to_the_reference(bundle, reference):
    frames = run_stream(bundle, reference, np.zeros(16000, np.float32), 24).frames
    drift = identity_drift(frames, reference)
    # A different identity scores several times more (see metrics.identity_drift).
    assert float(drift.mean()) < 0.12, drift


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_lip_sync_on_real_speech_it_never_heard(bundle, reference, tmp_path):
    """Speech from espeak-ng (a real synthesiser, not the training data's): the measured mouth
    opening of the generated frames follows its loudness; unrelated speech does not match."""
    from models.audio import load_audio
    from pipelines.training.avatar import default_mouth_box
    from pipelines.training.metrics import lip_sync_correlation
    from pipelines.training.speech import synth_speech

    path = tmp_path / "speech.wav"
    text = "Hello there. I can talk for as long as you like, and my lips follow every word."
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    sr, fps = bundle.defaults.audio_sample_rate, bundle.defaults.fps
    audio = load_audio(path, sr)
    n = int(audio.size / sr * fps) // 3 * 3
    frames = run_stream(bundle, reference, audio, n).frames
    used = audio[: round(n * sr / fps)]
    box = default_mouth_box(frames.shape[1])
    assert lip_sync_correlation(frames, used, sr, fps, box) > 0.6
    other = synth_speech(used.size / sr, sr, np.random.default_rng(7))
    assert lip_sync_correlation(frames, other, sr, fps, box) < 0.3


# ---- drift over a long stream: the README's table ("The embedded default model") ------------
# Over 3,000 frames the README states mean drift 0.048 with the rolling sink on, 0.077 with sink
# refresh on and 0.499 with the sink off (a faithful frame scores 0.01-0.05, another person
# 0.4-0.6), for the distilled 2-step default. Bounds: the README's figures with 40 % margin on
# the good rows (0.048 -> 0.067, 0.077 -> 0.108) and on the bad one (0.499 -> 0.3), and the
# off/on gap at half the README's 10x. That leaves room for other speech (the README used an
# espeak-ng utterance, these tests the shipped sample) and other platforms' rounding, and is
# still narrow enough to catch a sink at a fixed position 0 instead of rolling. Identity and
# seed are the README's (report.py).
SINK_ON, SINK_REFRESH, SINK_OFF = (dict(overrides) for _, overrides in DRIFT_SETTINGS)
ON_BOUND, REFRESH_BOUND, OFF_BOUND, GAP = 0.067, 0.108, 0.3, 5.0
PARTS = ("start", "middle", "end", "mean")


@pytest.fixture(scope="module")
def held_out_reference(bundle):
    """refs[0] of pipelines/training/report.py, the identity of the README's drift table."""
    from pipelines.training.report import sample_references

    return sample_references(1, bundle.defaults.height)[0]


@pytest.fixture(scope="module")
def speech(bundle):
    """The shipped sample speech (web/sample.ogg, what /v1/sample-audio serves), looped."""
    from models.audio import load_audio

    path = Path(__file__).resolve().parent.parent / "web" / "sample.ogg"
    return load_audio(path, bundle.defaults.audio_sample_rate)


def _drift(bundle, reference, audio, frames: int, overrides: dict) -> dict[str, float]:
    """`diffstream eval`'s drift row (start/middle/end/mean) of one stream."""
    import torch

    with torch.inference_mode():
        run = run_stream(bundle, reference, audio, frames, seed=0, **overrides)
    assert run.frames.shape[0] == frames
    return drift_summary(run.frames, reference)


def test_the_sink_holds_the_identity_over_240_frames(bundle, held_out_reference, speech):
    """The short version of the 3,000-frame test below (20 blocks, ~10 s a stream on one
    core): with the sink on the drift stays within the README's bound, with it off it is far
    away from the first frames on. Fails if the sink is left out of attention inside the
    generator (sink_position returning None: on = off = 0.47), or is placed at a fixed
    position 0 instead of rolling ahead of the block (0.115 at the start with the distilled
    default; 0.10 with the 4-step base)."""
    on = _drift(bundle, held_out_reference, speech, 240, SINK_ON)
    assert max(on[k] for k in PARTS) < ON_BOUND, on
    off = _drift(bundle, held_out_reference, speech, 240, SINK_OFF)
    assert off["mean"] > OFF_BOUND and off["mean"] > GAP * on["mean"], (on, off)


@pytest.mark.slow
def test_drift_table_over_3000_frames(bundle, held_out_reference, speech):
    """The README's drift table, re-measured: 3,000 frames (two minutes at 25 fps, 250 blocks;
    ~2.5 min a row on one core) with the sink on, with sink refresh, and with it off. With the
    sink the face at frame 2,999 is the face at frame 0 (start, middle, end all under the
    bound, the end within 0.02 of the start); without it the identity is lost. Fails if the
    sink sits at a fixed position 0 instead of rolling ahead of the block (the 4-step base:
    0.105 at the start, 0.113 in the middle), or the sink is turned off inside the generator
    (on = off)."""
    on = _drift(bundle, held_out_reference, speech, 3000, SINK_ON)
    assert max(on[k] for k in PARTS) < ON_BOUND, on
    assert abs(on["end"] - on["start"]) < 0.02, on  # no drift with stream length
    refresh = _drift(bundle, held_out_reference, speech, 3000, SINK_REFRESH)
    assert max(refresh[k] for k in PARTS) < REFRESH_BOUND, refresh
    off = _drift(bundle, held_out_reference, speech, 3000, SINK_OFF)
    assert min(off[k] for k in PARTS) > OFF_BOUND, (on, off)
    assert off["mean"] > GAP * on["mean"], (on, off)
