"""Fidelity against ground truth: PSNR/SSIM in `metrics`, `evaluate.ground_truth_scores` on
held-out rendered clips, and `diffstream eval --ground-truth`.

Each test's docstring names the deliberate break of the code it was seen to catch.
"""

import json
import wave

import numpy as np
import pytest
from PIL import Image

from models.errors import InvalidImageError
from models.registry import DEFAULT_DIR, load_model
from pipelines.training.dataset import ClipSampler, is_held_out
from pipelines.training.evaluate import ground_truth_scores, run_stream, stream_generate
from pipelines.training.metrics import PSNR_CAP_DB, psnr, ssim
from stream.cli import main

has_default = pytest.mark.skipif(
    not (DEFAULT_DIR / "model.json").is_file(), reason="no shipped default weights"
)


@pytest.fixture(scope="module")
def clip():
    return ClipSampler(split="eval", clip_frames=4, size=64, seed=5).sample()


def box_blur(frames: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 square, edges replicated; uint8 in, uint8 out."""
    if radius == 0:
        return frames.copy()
    f = np.pad(frames.astype(np.float64), ((0, 0), (radius,) * 2, (radius,) * 2, (0, 0)), "edge")
    h, w = frames.shape[1:3]
    k = 2 * radius + 1
    acc = sum(f[:, dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k))
    return np.round(acc / (k * k)).astype(np.uint8)


# ---- metrics ---------------------------------------------------------------------------------


def test_ssim_matches_scikit_image(clip):
    """Per-channel Gaussian SSIM equals scikit-image's (Wang et al. settings) to 1e-9, whole frame
    and boxed. Breaks caught: sigma 1.4; sample (N-1) covariance; padding the window instead of
    keeping only full windows; luma instead of per-channel."""
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    truth = clip.frames
    noisy = np.clip(truth + rng.normal(0, 12, truth.shape), 0, 255).astype(np.uint8)
    blurred = box_blur(truth, 1)
    for other in (noisy, blurred, rng.integers(0, 256, truth.shape, dtype=np.uint8)):
        for box in (None, clip.mouth_box, (3, 10, 40, 25)):
            x0, y0, x1, y1 = box or (0, 0, truth.shape[2], truth.shape[1])
            want = np.mean(
                [
                    skm.structural_similarity(
                        other[i, y0:y1, x0:x1],
                        truth[i, y0:y1, x0:x1],
                        gaussian_weights=True,
                        sigma=1.5,
                        use_sample_covariance=False,
                        data_range=255,
                        channel_axis=-1,
                    )
                    for i in range(truth.shape[0])
                ]
            )
            assert ssim(other, truth, box) == pytest.approx(want, abs=1e-9)


def test_psnr_of_known_noise_is_exact():
    """+-d on every value gives MSE d^2, so PSNR is 10 log10(255^2 / d^2) exactly; the result is
    the mean of per-frame PSNRs. Break caught: PSNR of the clip-wide MSE instead of the mean over
    frames."""
    rng = np.random.default_rng(1)
    a = rng.integers(20, 236, (2, 32, 40, 3), dtype=np.uint8)
    sign = rng.choice(np.array([-1, 1]), a.shape)
    b = (a.astype(int) + sign * np.array([10, 5])[:, None, None, None]).astype(np.uint8)
    frame_db = 10 * np.log10(255.0**2 / np.array([100.0, 25.0]))
    assert psnr(a[:1], b[:1]) == pytest.approx(frame_db[0], abs=1e-12)
    assert psnr(a, b) == pytest.approx(frame_db.mean(), abs=1e-12)
    assert psnr(a[0], b[0]) == pytest.approx(frame_db[0], abs=1e-12)  # one [H, W, 3] frame


def test_identical_frames_and_symmetry(clip):
    """Identical frames: PSNR at the documented 100 dB cap, SSIM 1; both symmetric. Break caught:
    dropping the cap (PSNR inf)."""
    f = clip.frames
    assert psnr(f, f) == PSNR_CAP_DB == 100.0
    assert ssim(f, f) == pytest.approx(1.0, abs=1e-12)
    other = box_blur(f, 1)
    assert psnr(f, other) == psnr(other, f)
    assert ssim(f, other) == pytest.approx(ssim(other, f), abs=1e-12)
    # One identical frame among noisy ones: the cap keeps the mean finite.
    mixed = other.copy()
    mixed[0] = f[0]
    assert np.isfinite(psnr(f, mixed)) and psnr(f, mixed) > psnr(f, other)


def test_scores_fall_as_blur_grows(clip):
    """More blur, lower PSNR and SSIM, whole frame and mouth."""
    f = clip.frames
    for box in (None, clip.mouth_box):
        p = [psnr(box_blur(f, r), f, box) for r in range(4)]
        s = [ssim(box_blur(f, r), f, box) for r in range(4)]
        assert p[0] == PSNR_CAP_DB and all(x > y for x, y in zip(p, p[1:], strict=False)), p
        assert s[0] == pytest.approx(1.0) and all(x > y for x, y in zip(s, s[1:], strict=False))


def test_box_limits_the_comparison():
    """Changes outside the box do not count; (x0, y0, x1, y1) is x first. Break caught: cropping
    with the box's x and y swapped."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    b = a.copy()
    box = (30, 4, 60, 20)  # wide and short, so a swapped box would cover other pixels
    b[:, 24:] = 255 - b[:, 24:]  # only rows below the box change
    assert psnr(a, b, box) == PSNR_CAP_DB
    assert ssim(a, b, box) == pytest.approx(1.0)
    assert psnr(a, b) < 20 and ssim(a, b) < 0.8
    with pytest.raises(InvalidImageError, match="11x11 pixels, got 10x40"):
        ssim(a, b, (0, 0, 10, 40))
    with pytest.raises(InvalidImageError, match="differ in shape"):
        psnr(a, b[:1])


# ---- ground_truth_scores ---------------------------------------------------------------------


def oracle(frames: int, size: int, seed: int, spoil=lambda f: f):
    """A generator that knows the answer: it replays the same held-out clip stream and returns
    the true frames (after `spoil`), checking it was given that clip's reference and heard audio."""
    sampler = ClipSampler(split="eval", clip_frames=frames, size=size, seed=seed)
    calls = []

    def generate(reference, audio, n):
        c = sampler.sample()
        assert n == frames and is_held_out(c.identity_seed) and is_held_out(c.speech_seed)
        assert np.array_equal(reference, c.reference)
        assert audio.dtype == np.float32 and np.array_equal(audio, c.audio)  # heard, not clean
        calls.append(c)
        return spoil(c.frames)

    generate.calls = calls
    return generate


def test_perfect_generator_scores_the_cap():
    """The true frames score 100 dB and SSIM 1 in the frame and the mouth. Breaks caught: scoring
    against the reference instead of the clip's frames; passing the clean audio (the oracle's
    audio check); drawing clips from the training split (the oracle's clip no longer matches)."""
    gen = oracle(6, 64, seed=3)
    r = ground_truth_scores(gen, count=2, frames=6, size=64, seed=3)
    assert len(gen.calls) == 2 and r["clips"] == 2 and r["frames"] == 6 and r["size"] == 64
    for key in ("psnr_frame", "psnr_mouth"):
        assert r[key] == PSNR_CAP_DB
    for key in ("ssim_frame", "ssim_mouth"):
        assert r[key] == pytest.approx(1.0)
    # The still reference is a real baseline: worse than the truth, but not absurd.
    assert 15 < r["reference"]["psnr_frame"] < PSNR_CAP_DB
    assert [c["identity_seed"] for c in r["per_clip"]] == [c.identity_seed for c in gen.calls]
    assert [tuple(c["mouth_box"]) for c in r["per_clip"]] == [c.mouth_box for c in gen.calls]


def test_spoiled_frames_score_lower_and_means_are_over_clips():
    """Blurred frames score below the truth and a 2-pixel shift lower still; each clip's scores
    are recomputed here from its frames and its own mouth box, and the means are over clips.
    Break caught: scoring every clip with `default_mouth_box` instead of its own."""
    blur = oracle(6, 64, seed=4, spoil=lambda f: box_blur(f, 1))
    r_blur = ground_truth_scores(blur, count=2, frames=6, size=64, seed=4)
    shift = oracle(6, 64, seed=4, spoil=lambda f: np.roll(f, 2, axis=2))
    r_shift = ground_truth_scores(shift, count=2, frames=6, size=64, seed=4)
    for key in ("psnr_frame", "psnr_mouth", "ssim_frame", "ssim_mouth"):
        cap = PSNR_CAP_DB if key.startswith("psnr") else 1.0
        assert r_shift[key] < r_blur[key] < cap, key
        assert r_blur[key] == pytest.approx(np.mean([c[key] for c in r_blur["per_clip"]]))
    for row, c in zip(r_blur["per_clip"], blur.calls, strict=True):
        spoiled = box_blur(c.frames, 1)
        assert row["psnr_mouth"] == psnr(spoiled, c.frames, c.mouth_box)
        assert row["ssim_mouth"] == ssim(spoiled, c.frames, c.mouth_box)
        assert row["ssim_frame"] == ssim(spoiled, c.frames)


def test_mouth_scores_use_the_mouth_box():
    """Frames wrong everywhere except the clip's mouth box: the mouth scores the cap, the frame
    does not. Break caught: passing the box to psnr/ssim with x and y swapped."""

    def outside_mouth_wrong(c):
        def spoil(f):
            out = 255 - f
            x0, y0, x1, y1 = c.mouth_box
            out[:, y0:y1, x0:x1] = f[:, y0:y1, x0:x1]
            return out

        return spoil

    sampler = ClipSampler(split="eval", clip_frames=4, size=64, seed=6)

    def generate(reference, audio, n):
        c = sampler.sample()
        return outside_mouth_wrong(c)(c.frames)

    r = ground_truth_scores(generate, count=2, frames=4, size=64, seed=6)
    assert r["psnr_mouth"] == PSNR_CAP_DB and r["ssim_mouth"] == pytest.approx(1.0)
    assert r["psnr_frame"] < 15 and r["ssim_frame"] < 0.5


def test_generator_output_is_checked():
    with pytest.raises(ValueError, match="expected uint8"):
        ground_truth_scores(lambda ref, audio, n: np.zeros((n, 64, 64, 3)), 1, 4, 64)
    with pytest.raises(ValueError, match="expected uint8"):
        ground_truth_scores(lambda ref, audio, n: np.zeros((n - 1, 64, 64, 3), np.uint8), 1, 4, 64)


@pytest.fixture(scope="module")
def bundle():
    return load_model("default")


@has_default
def test_stream_generate_pads_the_last_block_with_silence(bundle):
    """23 frames = 7 blocks of 3 and 2 frames of an 8th block, whose audio runs past the clip:
    it is silence, not the clip's start looped (run_stream's default). Break caught: passing the
    audio to run_stream unpadded."""
    c = ClipSampler(split="eval", clip_frames=23, size=128, seed=0).sample()
    got = stream_generate(bundle)(c.reference, c.audio, 23)
    padded = np.concatenate([c.audio, np.zeros(16000, np.float32)])
    assert got.shape == (23, 128, 128, 3)
    assert np.array_equal(got, run_stream(bundle, c.reference, padded, 23).frames)


@has_default
def test_default_model_against_ground_truth(bundle):
    """The shipped model on one held-out clip of 24 frames: sane PSNR/SSIM, and its mouth is
    closer to the truth (SSIM) than a still reference image's."""
    r = ground_truth_scores(stream_generate(bundle), count=1, frames=24, size=128, seed=0)
    assert 18 < r["psnr_frame"] < 45 and 15 < r["psnr_mouth"] < 45, r
    assert 0.7 < r["ssim_frame"] < 1 and 0.5 < r["ssim_mouth"] < 1, r
    assert r["ssim_mouth"] > r["reference"]["ssim_mouth"] + 0.05, r


# ---- diffstream eval -------------------------------------------------------------------------


def test_eval_ground_truth_only(capsys):
    """No --audio/--image: only the ground-truth part runs, as JSON and as text."""
    if not (DEFAULT_DIR / "model.json").is_file():
        pytest.skip("no shipped default weights")
    args = ["eval", "--ground-truth", "1", "--ground-truth-frames", "6", "--threads", "1"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ground_truth"}
    gt = out["ground_truth"]
    assert gt["clips"] == 1 and gt["frames"] == 6 and len(gt["per_clip"]) == 1
    assert 10 < gt["psnr_frame"] < PSNR_CAP_DB and 0 < gt["ssim_mouth"] < 1
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ground truth (1 held-out clip x 6 frames" in text and "still reference" in text
    assert "lip sync" not in text


def test_eval_with_audio_adds_ground_truth_to_the_report(tmp_path, capsys):
    """--audio and --image: the usual report, with the ground-truth dict in it; --ground-truth 0
    leaves it empty. Break caught: not storing the scores in the report."""
    if not (DEFAULT_DIR / "model.json").is_file():
        pytest.skip("no shipped default weights")
    image = tmp_path / "ref.png"
    Image.new("RGB", (200, 160), (180, 120, 90)).save(image)
    wav = tmp_path / "speech.wav"
    t = np.arange(8000) / 16000
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((0.4 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    base = ["eval", "--audio", str(wav), "--image", str(image), "--frames", "6", "--json"]
    base += ["--threads", "1", "--ground-truth-frames", "6"]
    assert main([*base, "--ground-truth", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "lip_sync" in out and len(out["drift"]) == 3
    assert out["ground_truth"]["clips"] == 1 and "ssim_frame" in out["ground_truth"]
    assert main([*base, "--ground-truth", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["ground_truth"] == {}


def test_eval_argument_errors(capsys, tmp_path):
    """--audio without --image, or nothing to do: one clear line, exit 2."""
    assert main(["eval", "--audio", str(tmp_path / "a.wav")]) == 2
    assert "--audio and --image go together" in capsys.readouterr().err
    assert main(["eval", "--ground-truth", "0"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
