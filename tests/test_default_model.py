"""The shipped default model: it loads, looks like its reference, and talks with the audio."""

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
