"""Training data and eval metrics: synthetic speech, the procedural avatar, clips, and the metrics.

The metric tests are the point: lip sync must be high on a clip that really follows its audio
and low on one that does not, and identity drift must be small for the true identity and grow
when colours or the identity change.
"""

from __future__ import annotations

import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch

from pipelines.training import avatar, dataset, metrics, speech

SR, FPS, SIZE = 16000, 25, 128


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def talking() -> tuple[avatar.Identity, np.ndarray, np.ndarray]:
    """One identity saying 20 s of synthetic speech."""
    rng = _rng(7)
    identity = avatar.sample_identity(rng)
    audio = speech.synth_speech(20.0, SR, rng)
    frames = avatar.render_clip(identity, audio, SR, FPS, SIZE, rng)
    return identity, audio, frames


# ---------------------------------------------------------------------------------- speech


def test_synth_speech_is_deterministic_float32_at_fixed_peak() -> None:
    a = speech.synth_speech(3.0, SR, _rng(1))
    b = speech.synth_speech(3.0, SR, _rng(1))
    c = speech.synth_speech(3.0, SR, _rng(2))
    assert a.dtype == np.float32 and a.shape == (48000,)
    assert np.isfinite(a).all()
    assert abs(float(np.abs(a).max()) - 0.7) < 1e-3
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_synth_speech_has_pauses_syllables_and_formant_band() -> None:
    x = speech.synth_speech(12.0, SR, _rng(3))
    env = speech.loudness_envelope(x, SR, FPS)
    assert 0.03 < np.mean(env < 0.1) < 0.5  # pauses, but mostly talking
    assert np.mean(env > 0.6) > 0.3
    # Syllable rhythm: the envelope crosses its median upwards a few times per second.
    above = env > np.median(env)
    rises = np.count_nonzero(above[1:] & ~above[:-1]) / 12.0
    assert 1.0 < rises < 8.0
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1.0 / SR)
    share = lambda lo, hi: power[(freqs >= lo) & (freqs < hi)].sum() / power.sum()  # noqa: E731
    assert share(0, 4000) > 0.95  # speech band
    assert share(1000, 4000) > 0.05  # second and third formants, not just a hum


def _median_f0(x: np.ndarray) -> float:
    """Median pitch over loud 40 ms frames, from the autocorrelation peak (60-400 Hz)."""
    frames = x[: x.size // 640 * 640].reshape(-1, 640)
    loud = frames[np.sqrt((frames**2).mean(1)) > 0.3 * np.sqrt((frames**2).mean(1)).max()]
    lags = []
    for f in loud:
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[f.size - 1 :]
        lo, hi = SR // 400, SR // 60
        lags.append(lo + int(np.argmax(ac[lo:hi])))
    return SR / float(np.median(lags))


def test_speaker_pitch_controls_the_voice() -> None:
    base = speech.sample_speaker(_rng(0))
    low = speech.Speaker(100.0, 0.95, base.syllable_rate, 0.05, 0.6, 1.0)
    high = speech.Speaker(230.0, 1.15, base.syllable_rate, 0.05, 0.6, 1.0)
    f_low = _median_f0(speech.synth_speech(4.0, SR, _rng(5), low))
    f_high = _median_f0(speech.synth_speech(4.0, SR, _rng(5), high))
    assert 70 < f_low < 140
    assert 170 < f_high < 320


def test_augment_audio_keeps_the_speech_but_changes_the_signal() -> None:
    x = speech.synth_speech(6.0, SR, _rng(11))
    env_x = speech.loudness_envelope(x, SR, FPS)
    changed = 0
    for seed in range(8):
        y = speech.augment_audio(x, _rng(seed), SR, speed=False)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert np.isfinite(y).all() and np.abs(y).max() <= 1.0
        changed += not np.allclose(y / np.abs(y).max(), x / np.abs(x).max(), atol=1e-3)
        env_y = speech.loudness_envelope(y, SR, FPS)
        assert np.corrcoef(env_x, env_y)[0, 1] > 0.5
    assert changed >= 6  # beyond gain: reverb, microphone EQ or noise on most draws
    lengths = {speech.augment_audio(x, _rng(s), SR).size for s in range(12)}
    assert len(lengths) > 1  # some draws change speed
    assert all(abs(n / x.size - 1.0) < 0.07 for n in lengths)


def test_loudness_envelope_levels_alignment_and_gain_invariance() -> None:
    fps = 30  # 533.33 samples per frame: boundaries must round, not drift
    bounds = speech.frame_bounds(30, SR, fps)
    t = np.arange(bounds[-1]) / SR
    tone = np.sin(2 * np.pi * 220 * t).astype(np.float32)
    gain = np.zeros_like(tone)
    gain[bounds[10] : bounds[20]] = 1.0
    gain[bounds[20] :] = 0.1  # 20 dB down
    x = tone * gain
    assert speech.num_video_frames(x.size, SR, fps) == 30
    env = speech.loudness_envelope(x, SR, fps)
    assert env.shape == (30,)
    np.testing.assert_allclose(env[:10], 0.0)
    np.testing.assert_allclose(env[10:20], 1.0, atol=0.01)
    np.testing.assert_allclose(env[20:], 0.5, atol=0.02)  # 20 dB below in a 40 dB range
    np.testing.assert_allclose(speech.loudness_envelope(x * 0.05, SR, fps), env, atol=1e-4)
    assert not speech.loudness_envelope(np.zeros(SR, np.float32), SR, FPS).any()


# ---------------------------------------------------------------------------------- avatar


def test_identities_span_a_large_space() -> None:
    ids = [avatar.sample_identity(_rng(s)) for s in range(60)]
    assert len(set(ids)) == 60
    assert len({i.hair_style for i in ids}) >= 5
    assert len({i.background_style for i in ids}) == len(avatar.BACKGROUND_STYLES)
    skin_luma = [0.299 * i.skin[0] + 0.587 * i.skin[1] + 0.114 * i.skin[2] for i in ids]
    assert max(skin_luma) - min(skin_luma) > 90
    refs = np.stack([avatar.reference_image(i, 64) for i in ids[:8]]).astype(np.float32)
    assert refs.std(axis=0).mean() > 20  # they look different, not just carry different fields


def test_reference_is_a_centred_face_on_a_background() -> None:
    for seed in range(4):
        identity = avatar.sample_identity(_rng(seed))
        ref = avatar.reference_image(identity, SIZE)
        assert ref.dtype == np.uint8 and ref.shape == (SIZE, SIZE, 3)
        lay = avatar.face_layout(identity, SIZE)
        cheek = ref[int(lay.eye_y + 0.3 * lay.b), int(lay.cx - 0.4 * lay.a)].astype(int)
        assert np.abs(cheek - np.array(identity.skin)).max() < 45
        # Corners show the background, not the head.
        background = avatar.avatar_rig(identity, SIZE).background * 255.0
        assert np.abs(ref[2, 2] - background[2, 2]).max() < 2
        assert np.abs(ref[2, -3] - background[2, -3]).max() < 2
        np.testing.assert_array_equal(
            ref, avatar.render_frame(identity, 0.0, avatar.NEUTRAL_ROUND, 0, 0, 0)
        )


def test_mouth_opening_is_dark_grows_and_stays_in_its_box() -> None:
    for seed in range(5):
        identity = avatar.sample_identity(_rng(seed))
        box = avatar.mouth_box(identity, SIZE)
        closed = avatar.render_frame(identity, 0.0, 0.3, 0.0, 0.0, 0.0).astype(int)
        levels = [
            metrics.mouth_openness(avatar.render_frame(identity, o, 0.3, 0, 0, 0), box)[0]
            for o in np.linspace(0, 1, 5)
        ]
        assert all(b > a for a, b in zip(levels, levels[1:], strict=False)), levels
        assert levels[-1] - levels[0] > 0.07
        for dx, dy in ((-1, -1), (1, 1), (-1, 1), (1, -1)):
            shift = avatar.MAX_HEAD_SHIFT
            closed = avatar.render_frame(identity, 0.0, 0.0, 0.0, dx * shift, dy * shift).astype(
                int
            )
            opened = avatar.render_frame(identity, 1.0, 0.0, 0.0, dx * shift, dy * shift).astype(
                int
            )
            changed = np.abs(opened - closed).max(axis=2) > 2
            x0, y0, x1, y1 = box
            changed[y0:y1, x0:x1] = False
            assert not changed.any(), "mouth drawn outside mouth_box"
        dx0, dy0, dx1, dy1 = avatar.default_mouth_box(SIZE)
        assert dx0 <= box[0] and dy0 <= box[1] and dx1 >= box[2] and dy1 >= box[3]


def test_roundness_narrows_the_mouth() -> None:
    identity = avatar.sample_identity(_rng(2))
    box = avatar.mouth_box(identity, SIZE)

    def width(round_: float) -> int:
        f = avatar.render_frame(identity, 0.8, round_, 0, 0, 0)
        dark = (f[box[1] : box[3], box[0] : box[2]].astype(int).sum(axis=2) < 150).any(axis=0)
        return int(dark.sum())

    assert width(1.0) < width(0.0) - 2


def test_blink_closes_the_eyes_and_nothing_else() -> None:
    identity = avatar.sample_identity(_rng(4))
    open_eyes = avatar.render_frame(identity, 0.0, 0.3, 0.0, 0, 0).astype(int)
    shut = avatar.render_frame(identity, 0.0, 0.3, 1.0, 0, 0).astype(int)
    changed = np.abs(open_eyes - shut).max(axis=2) > 10
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 20
    eye_y = avatar.face_layout(identity, SIZE).eye_y
    assert np.all(np.abs(ys - eye_y) < 0.12 * SIZE)
    assert xs.min() < SIZE / 2 < xs.max()  # both eyes


def test_head_motion_moves_the_whole_head() -> None:
    identity = avatar.sample_identity(_rng(6))
    ref = avatar.reference_image(identity, SIZE).astype(float)
    moved = avatar.render_frame(identity, 0.0, 0.3, 0.0, 0.02, -0.02, SIZE).astype(float)
    inner = slice(10, SIZE - 10)
    errors = {}
    for sx in range(-4, 5):
        for sy in range(-4, 5):
            shifted = np.roll(ref, (sy, sx), axis=(0, 1))
            errors[(sx, sy)] = np.abs(shifted[inner, inner] - moved[inner, inner]).mean()
    best = min(errors, key=errors.get)
    assert abs(best[0] - 0.02 * SIZE) <= 1 and abs(best[1] + 0.02 * SIZE) <= 1


def test_drive_from_audio_follows_loudness_and_adds_blinks_and_motion() -> None:
    x = speech.synth_speech(30.0, SR, _rng(8))
    track = avatar.drive_from_audio(x, SR, FPS, _rng(9))
    n = speech.num_video_frames(x.size, SR, FPS)
    assert all(c.shape == (n,) and c.dtype == np.float32 for c in track)
    env = speech.loudness_envelope(x, SR, FPS)
    assert track.mouth_open[env > 0.8].mean() > 0.6
    assert track.mouth_open[env < 0.05].mean() < 0.1
    assert np.corrcoef(track.mouth_open, env)[0, 1] > 0.9
    starts = np.count_nonzero((track.blink[1:] > 0.5) & (track.blink[:-1] <= 0.5))
    assert 5 <= starts <= 12  # every 3-5 s over 30 s
    assert 0.005 < np.abs(track.head_dx).max() <= avatar.MAX_HEAD_SHIFT
    assert np.abs(track.head_dy).max() <= avatar.MAX_HEAD_SHIFT
    assert np.abs(np.diff(track.head_dx)).max() < 0.002  # slow drift, not jitter


def test_roundness_follows_spectral_shape() -> None:
    # Alternate "oo"-like (energy below 1 kHz) and "ee"-like (energy at 2-3 kHz) half seconds.
    t = np.arange(4 * SR) / SR
    low = sum(np.sin(2 * np.pi * f * t) for f in (300, 600, 850))
    high = sum(np.sin(2 * np.pi * f * t) for f in (300, 2200, 2900))
    first_half = (t % 1.0) < 0.5
    x = np.where(first_half, low, high).astype(np.float32) * 0.2
    track = avatar.drive_from_audio(x, SR, FPS, _rng(0))
    is_low = ((np.arange(track.mouth_round.size) / FPS) % 1.0) < 0.5
    core = np.abs(((np.arange(track.mouth_round.size) / FPS) % 0.5) - 0.25) < 0.15
    assert track.mouth_round[is_low & core].mean() > track.mouth_round[~is_low & core].mean() + 0.5


# ---------------------------------------------------------------------------------- metrics


def test_lip_sync_is_high_for_the_driving_audio(talking) -> None:
    identity, audio, frames = talking
    assert (
        metrics.lip_sync_correlation(frames, audio, SR, FPS, avatar.mouth_box(identity, SIZE)) > 0.8
    )
    assert (
        metrics.lip_sync_correlation(frames, audio, SR, FPS, avatar.default_mouth_box(SIZE)) > 0.8
    )


def test_lip_sync_is_low_for_unrelated_audio(talking) -> None:
    identity, audio, frames = talking
    box = avatar.mouth_box(identity, SIZE)
    for seed in (21, 22, 23):
        other = speech.synth_speech(20.0, SR, _rng(seed))
        assert metrics.lip_sync_correlation(frames, other, SR, FPS, box) < 0.3
    shuffled = frames[_rng(1).permutation(len(frames))]
    assert metrics.lip_sync_correlation(shuffled, audio, SR, FPS, box) < 0.3
    still = np.repeat(avatar.reference_image(identity, SIZE)[None], len(frames), axis=0)
    assert metrics.lip_sync_correlation(still, audio, SR, FPS, box) == 0.0


def test_lagged_correlation_finds_a_late_mouth() -> None:
    env = _rng(0).random(200)
    late = np.roll(env, 2)  # the mouth follows the audio by two frames
    lags = metrics.lagged_correlations(late, env, 2)
    assert max(lags, key=lags.get) == 2 and lags[2] > 0.99


def test_mouth_openness_ignores_head_motion_and_skin_tone() -> None:
    for seed in range(4):
        identity = avatar.sample_identity(_rng(seed))
        box = avatar.mouth_box(identity, SIZE)
        still = metrics.mouth_openness(avatar.render_frame(identity, 0.6, 0.4, 0, 0, 0), box)[0]
        s = avatar.MAX_HEAD_SHIFT
        moved = metrics.mouth_openness(avatar.render_frame(identity, 0.6, 0.4, 0, s, -s), box)[0]
        assert abs(still - moved) < 0.01
        assert 0.05 < still < 0.5


def test_identity_drift_small_for_the_true_identity_and_grows_with_change(talking) -> None:
    identity, _, frames = talking
    ref = avatar.reference_image(identity, SIZE)
    drift = metrics.identity_drift(frames, ref)
    assert drift.shape == (len(frames),)
    assert drift.max() < 0.06
    tinted = np.clip(frames[:50].astype(int) + np.array([14, -10, 8]), 0, 255).astype(np.uint8)
    assert metrics.identity_drift(tinted, ref).mean() > 3 * drift.mean() + 0.05
    other = avatar.reference_image(avatar.sample_identity(_rng(99)), SIZE)
    steps = [
        metrics.identity_drift((ref * (1 - w) + other * w).astype(np.uint8), ref)[0]
        for w in (0.0, 0.25, 0.5, 1.0)
    ]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False)), steps
    assert steps[-1] > 0.2


# ---------------------------------------------------------------------------------- dataset


def test_clip_sampler_aligns_audio_and_frames() -> None:
    sampler = dataset.ClipSampler(size=64, fps=FPS, sample_rate=SR, clip_frames=60, seed=3)
    clip = sampler.sample()
    assert clip.reference.shape == (64, 64, 3) and clip.reference.dtype == np.uint8
    assert clip.frames.shape == (60, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == clip.clean_audio.shape == (60 * SR // FPS,)
    assert clip.audio.dtype == np.float32 and np.isfinite(clip.audio).all()
    # The frames follow the clean speech they were driven by, frame for frame.
    assert (
        metrics.lip_sync_correlation(clip.frames, clip.clean_audio, SR, FPS, clip.mouth_box, 0)
        > 0.8
    )
    again = dataset.ClipSampler(size=64, clip_frames=60).clip(clip.identity_seed, clip.speech_seed)
    np.testing.assert_array_equal(again.frames, clip.frames)
    np.testing.assert_array_equal(again.audio, clip.audio)


def test_clip_sampler_non_integer_samples_per_frame() -> None:
    sampler = dataset.ClipSampler(
        size=48, fps=30, sample_rate=SR, clip_frames=9, seed=0, augment=False
    )
    clip = sampler.sample()
    assert clip.audio.size == speech.frame_bounds(9, SR, 30)[-1] == 4800
    np.testing.assert_array_equal(clip.audio, clip.clean_audio)


def test_held_out_split_is_disjoint() -> None:
    train = dataset.ClipSampler(seed=0)
    held = dataset.ClipSampler(seed=0, split="eval")
    train_seeds = [dataset._draw_seed(train._rng, "train") for _ in range(2000)]
    eval_seeds = [dataset._draw_seed(held._rng, "eval") for _ in range(200)]
    assert not any(dataset.is_held_out(s) for s in train_seeds)
    assert all(dataset.is_held_out(s) for s in eval_seeds)
    assert all(dataset.is_held_out(s) for s in dataset.eval_identity_seeds(10))
    assert (
        dataset.identity_from_seed(5)
        == dataset.identity_from_seed(5)
        != dataset.identity_from_seed(6)
    )


def test_clip_dataset_batches_through_a_dataloader() -> None:
    loader = torch.utils.data.DataLoader(
        dataset.ClipDataset(seed=1, size=32, clip_frames=4), batch_size=2
    )
    batch = next(iter(loader))
    assert batch["reference"].shape == (2, 32, 32, 3) and batch["reference"].dtype == torch.uint8
    assert batch["frames"].shape == (2, 4, 32, 32, 3)
    assert batch["audio"].shape == (2, 4 * SR // FPS) and batch["audio"].dtype == torch.float32
    assert batch["identity_seed"][0] != batch["identity_seed"][1]


# ---------------------------------------------------------------------------------- real speech


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_lip_sync_on_real_speech_from_espeak(tmp_path) -> None:
    path = tmp_path / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog. Would you like some tea before we go?"
    subprocess.run(
        ["espeak-ng", "-w", str(path), text], check=True, capture_output=True, timeout=60
    )
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        assert w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        audio = (pcm.reshape(-1, w.getnchannels()).mean(axis=1) / 32768.0).astype(np.float32)
    identity = avatar.sample_identity(_rng(12))
    frames = avatar.render_clip(identity, audio, rate, FPS, SIZE, _rng(13))
    assert len(frames) == speech.num_video_frames(audio.size, rate, FPS) > 50
    box = avatar.default_mouth_box(SIZE)
    assert metrics.lip_sync_correlation(frames, audio, rate, FPS, box) > 0.6
    other = speech.synth_speech(audio.size / rate, rate, _rng(14))
    assert metrics.lip_sync_correlation(frames, other, rate, FPS, box) < 0.3
