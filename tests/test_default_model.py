"""The shipped default model: it loads, looks like its reference, and talks with the audio."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from models.registry import DEFAULT_DIR, load_model
from pipelines.reference import load_reference_image
from pipelines.training.evaluate import loudness_openness_gap, run_stream
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
