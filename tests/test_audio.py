"""Audio front end: decoding, streaming resampling, block windows and log-mel tokens."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from models.audio import (
    AUDIO_ENCODERS,
    AudioEncoder,
    LogMelFeatures,
    StreamingResampler,
    block_windows,
    build_audio_encoder,
    frame_to_sample,
    latent_frame_spans,
    load_audio,
    mel_filterbank,
)
from models.errors import ConfigError, InvalidAudioError


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """samples: [n] mono or [n, channels] float in [-1, 1], written as s16."""
    data = samples if samples.ndim == 2 else samples[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((data * 32767).astype("<i2").tobytes())
    return path


def _encode(path: Path, codec: str, rate: int, mono: np.ndarray, src_rate: int) -> Path:
    """Encode a stereo copy of `mono` with PyAV, so decoding also exercises the downmix."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([mono, mono]), format="fltp", layout="stereo")
        frame.sample_rate = src_rate
        ctx = stream.codec_context
        fit = av.AudioResampler(
            format=ctx.format.name, layout="stereo", rate=rate, frame_size=ctx.frame_size or None
        )
        for f in fit.resample(frame) + fit.resample(None):
            container.mux(stream.encode(f))
        container.mux(stream.encode(None))
    return path


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(spectrum.argmax() * rate / len(x))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# ----------------------------------------------------------------------------------- load_audio


def test_load_wav_stereo_resamples_and_averages_channels(tmp_path: Path) -> None:
    left = _sine(440, 44_100, 0.5)
    path = _write_wav(tmp_path / "s.wav", np.stack([left, np.zeros_like(left)], 1), 44_100)
    audio = load_audio(path, 16_000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 8000) <= 2
    assert _peak_hz(audio, 16_000) == pytest.approx(440, abs=3)
    # Mean of a sine and silence: half the amplitude (FFmpeg's own downmix would give 0.707).
    assert _rms(audio[200:-200]) == pytest.approx(0.25 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize(
    ("name", "codec", "rate"),
    [
        ("a.mp3", "libmp3lame", 44_100),
        ("a.ogg", "libopus", 48_000),
        ("a.flac", "flac", 44_100),
        ("a.m4a", "aac", 44_100),
    ],
)
def test_load_compressed_formats(tmp_path: Path, name: str, codec: str, rate: int) -> None:
    path = _encode(tmp_path / name, codec, rate, _sine(440, 44_100, 0.5), 44_100)
    audio = load_audio(path, 16_000)
    assert 0.45 * 16_000 < len(audio) < 0.6 * 16_000  # encoder padding varies by codec
    assert _peak_hz(audio, 16_000) == pytest.approx(440, abs=5)
    assert _rms(audio) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)
    assert np.abs(audio).max() <= 1.0


def test_load_from_bytes_matches_file(tmp_path: Path) -> None:
    path = _write_wav(tmp_path / "m.wav", _sine(300, 22_050, 0.2), 22_050)
    np.testing.assert_array_equal(load_audio(path.read_bytes(), 16_000), load_audio(path, 16_000))


def test_load_real_speech(tmp_path: Path) -> None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng not installed")
    path = tmp_path / "speech.wav"
    subprocess.run([espeak, "-w", str(path), "hello world"], check=True, timeout=30)
    audio = load_audio(path, 16_000)
    assert 0.5 * 16_000 < len(audio) < 3 * 16_000
    assert _rms(audio) > 0.01


def test_load_text_file_is_invalid_audio(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(InvalidAudioError, match="cannot decode .*notes.txt"):
        load_audio(path, 16_000)


def test_load_garbage_bytes_and_empty_bytes() -> None:
    with pytest.raises(InvalidAudioError, match="cannot decode"):
        load_audio(b"\x00\x01garbage" * 50, 16_000)
    with pytest.raises(InvalidAudioError, match="empty"):
        load_audio(b"", 16_000)


def test_load_empty_wav_is_invalid_audio(tmp_path: Path) -> None:
    path = _write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16_000)
    with pytest.raises(InvalidAudioError, match="no audio samples"):
        load_audio(path, 16_000)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidAudioError, match="not found.*missing.wav"):
        load_audio(tmp_path / "missing.wav", 16_000)


def test_load_too_long_is_refused(tmp_path: Path) -> None:
    path = _write_wav(tmp_path / "long.wav", _sine(200, 8000, 2.0), 8000)
    with pytest.raises(InvalidAudioError, match="longer than the limit of 1 s"):
        load_audio(path, 16_000, max_seconds=1.0)


def test_load_file_without_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(2):
            img = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            container.mux(stream.encode(img))
        container.mux(stream.encode(None))
    with pytest.raises(InvalidAudioError, match="no audio stream"):
        load_audio(path, 16_000)


# ------------------------------------------------------------------------ StreamingResampler


def _pcm(samples: np.ndarray, fmt: str) -> bytes:
    if fmt == "s16le":
        return (samples * 32767).astype("<i2").tobytes()
    return samples.astype("<f4").tobytes()


@pytest.mark.parametrize(("fmt", "channels"), [("s16le", 2), ("f32le", 1), ("f32le", 2)])
def test_streaming_resampler_odd_chunks_equal_one_push(fmt: str, channels: int) -> None:
    mono = _sine(440, 48_000, 0.5)
    pcm = _pcm(np.repeat(mono[:, None], channels, axis=1), fmt)
    rng = np.random.default_rng(0)

    chunked = StreamingResampler(48_000, channels, fmt, 16_000)
    outs, i = [], 0
    while i < len(pcm):
        n = int(rng.integers(1, 1500))  # splits samples and frames anywhere
        outs.append(chunked.push(pcm[i : i + n]))
        i += n
    outs.append(chunked.flush())
    got = np.concatenate(outs)

    whole = StreamingResampler(48_000, channels, fmt, 16_000)
    ref = np.concatenate([whole.push(pcm), whole.flush()])
    assert len(got) == len(ref) == 8000
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert _peak_hz(got, 16_000) == pytest.approx(440, abs=3)
    assert _rms(got[100:-100]) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_streaming_resampler_20ms_chunks_and_same_rate() -> None:
    mono = _sine(1000, 16_000, 0.2)
    same = StreamingResampler(16_000, 1, "f32le", 16_000)
    out = np.concatenate([same.push(_pcm(c, "f32le")) for c in np.split(mono, 10)] + [same.flush()])
    np.testing.assert_array_equal(out, mono)

    up = StreamingResampler(16_000, 1, "s16le", 48_000)
    pieces = [up.push(_pcm(c, "s16le")) for c in np.split(mono, 10)]  # 20 ms each
    assert sum(len(p) for p in pieces) > 0.9 * 9600  # most output arrives without a flush
    total = sum(len(p) for p in pieces) + len(up.flush())
    assert total == 9600


def test_streaming_resampler_holds_partial_frame() -> None:
    r = StreamingResampler(16_000, 2, "s16le", 16_000)
    assert r.push(b"\x00\x10\x00").shape == (0,)  # 3 bytes: not one stereo frame yet
    out = r.push(b"\x10")  # completes L=0x1000, R=0x1000
    np.testing.assert_allclose(out, [0x1000 / 32768])


def test_streaming_resampler_sanitises_float_input() -> None:
    r = StreamingResampler(16_000, 1, "f32le", 16_000)
    out = r.push(np.array([np.nan, 5.0, -np.inf, 0.25], "<f4").tobytes())
    np.testing.assert_array_equal(out, np.array([0.0, 1.0, -1.0, 0.25], np.float32))


@pytest.mark.parametrize("rate", [0, 10_000_000, -16_000])
def test_streaming_resampler_rejects_impossible_rate(rate: int) -> None:
    with pytest.raises(InvalidAudioError, match=f"input sample rate {rate} Hz is out of range"):
        StreamingResampler(rate, 1, "s16le", 16_000)


def test_streaming_resampler_rejects_unknown_format_and_channels() -> None:
    with pytest.raises(InvalidAudioError, match="unknown PCM format 'mp3'.*f32le, s16le"):
        StreamingResampler(16_000, 1, "mp3", 16_000)
    with pytest.raises(InvalidAudioError, match="channels must be 1 .* or 2"):
        StreamingResampler(16_000, 6, "s16le", 16_000)
    with pytest.raises(InvalidAudioError, match="integer"):
        StreamingResampler(16_000.5, 1, "s16le", 16_000)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- block windows


def test_frame_to_sample_has_no_drift() -> None:
    # 29.97 fps at 16 kHz: 533.8666... samples per frame; after an hour still exact.
    frames = 107_892  # one hour
    assert frame_to_sample(frames, 16_000, 30_000 / 1001) == round(frames * 16_000 * 1001 / 30_000)
    assert frame_to_sample(3, 16_000, 30) == 1600
    assert frame_to_sample(1, 16_000, 30) == 533
    assert frame_to_sample(2, 16_000, 30) == 1067


def test_block_windows_exact_lengths_and_content() -> None:
    rate, fps = 16_000, 30
    audio = np.arange(20_000, dtype=np.float32) / 20_000
    windows = block_windows(audio, rate, fps, first_block_frames=9, frames_per_block=12)
    bounds = [0] + [9 + 12 * k for k in range(len(windows))]
    expected = [round(b * rate / fps) for b in bounds]
    assert [len(w) for w in windows] == list(np.diff(expected))
    np.testing.assert_array_equal(np.concatenate(windows)[:20_000], audio)
    assert expected[-2] < 20_000 <= expected[-1]  # just enough blocks
    tail = np.concatenate(windows)[20_000:]
    assert tail.size > 0 and not tail.any()  # padded with silence


def test_block_windows_edge_cases() -> None:
    assert block_windows(np.zeros(0, np.float32), 16_000, 25, 9, 12) == []
    one = block_windows(np.ones(10, np.float32), 16_000, 25, 9, 12)
    assert len(one) == 1 and len(one[0]) == 5760 and one[0][:10].all() and not one[0][10:].any()
    with pytest.raises(InvalidAudioError, match="mono"):
        block_windows(np.zeros((2, 100), np.float32), 16_000, 25, 9, 12)
    with pytest.raises(ConfigError, match="at least one frame"):
        block_windows(np.zeros(100, np.float32), 16_000, 25, 0, 12)
    with pytest.raises(ConfigError, match="fps"):
        block_windows(np.zeros(100, np.float32), 16_000, 0, 9, 12)


def test_latent_frame_spans() -> None:
    assert latent_frame_spans(9, 3, first=True) == [(0, 1), (1, 5), (5, 9)]
    assert latent_frame_spans(12, 3, first=False) == [(0, 4), (4, 8), (8, 12)]
    assert latent_frame_spans(3, 3, first=True) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ConfigError, match="do not split evenly"):
        latent_frame_spans(10, 3, first=False)


# ---------------------------------------------------------------------------- log-mel tokens


def test_mel_filterbank_shape_and_coverage() -> None:
    bank = mel_filterbank(16_000, 400, 40, 0.0, 8000.0)
    assert bank.shape == (40, 201)
    np.testing.assert_allclose(bank.sum(axis=1), 1.0, rtol=1e-5)
    centres = bank.argmax(axis=1)
    assert np.all(np.diff(centres) >= 0) and centres[-1] > centres[0]


def test_logmel_sine_lands_in_matching_band() -> None:
    enc = LogMelFeatures()
    rate = enc.sample_rate
    bank = mel_filterbank(rate, enc.win_length, enc.n_mels, 0.0, rate / 2)
    for freq in (300.0, 2000.0):
        tokens = enc.for_block(_sine(freq, rate, 0.36), 9, 3)
        band = int(tokens[1:, :, : enc.n_mels].mean(dim=(0, 1)).argmax())
        bin_ = int(round(freq * enc.win_length / rate))
        assert bank[band, bin_] > 0, (freq, band)


def test_logmel_shape_and_energy_follows_loudness() -> None:
    enc = LogMelFeatures(tokens_per_latent_frame=2)
    rate = enc.sample_rate
    # First block of a Wan stream: 9 video frames at 25 fps, latent frames cover 1, 4, 4 of them.
    window = np.zeros(9 * 640, np.float32)
    window[640 : 5 * 640] = _sine(500, rate, 4 * 640 / rate, amp=0.8)  # = latent frame 1
    tokens = enc.for_block(window, 9, 3)
    assert tokens.shape == (3, 2, enc.n_mels + 1) and tokens.dtype == torch.float32
    energy = tokens[:, :, -1]
    assert energy[0].max() < energy[1].min() - 10  # log-energy reads loudness directly
    # Latent frame 2's first STFT frames still reach back into the tone; its last token does not.
    assert energy[2, 1] < energy[1].min() - 10
    torch.testing.assert_close(tokens, enc.for_block(window, 9, 3), rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 4, 7, 20])
def test_logmel_streaming_equals_whole_clip(tokens: int) -> None:
    """Blocks one at a time with carried state give the tokens of the whole clip at once
    (7 and 20 tokens make parts shorter than a hop, which hold the previous frame)."""
    enc = LogMelFeatures(tokens_per_latent_frame=tokens)
    rng = np.random.default_rng(1)
    rate, fps = enc.sample_rate, 25
    audio = rng.standard_normal(int(rate * 1.5)) * np.linspace(0.01, 0.5, int(rate * 1.5))
    windows = block_windows(audio.astype(np.float32), rate, fps, 9, 12)  # Wan layout: 9, then 12
    state = enc.new_state()
    streamed = [enc.encode(w, 9 if i == 0 else 12, 3, state) for i, w in enumerate(windows)]
    whole = enc.for_block(np.concatenate(windows), 9 + 12 * (len(windows) - 1), 3 * len(windows))
    torch.testing.assert_close(torch.cat(streamed), whole, rtol=0, atol=1e-5)

    # The carried context matters: blocks encoded without it differ at their start.
    no_context = enc.new_state()
    no_context.blocks_seen = 1  # a later block, but with silence as its left context
    fresh = enc.encode(windows[1], 12, 3, no_context)
    assert not torch.allclose(fresh[0, 0], streamed[1][0, 0], atol=1e-3)


def test_logmel_state_is_small_and_constant() -> None:
    enc = LogMelFeatures()
    state = enc.new_state()
    enc.encode(np.ones(5760, np.float32) * 0.1, 9, 3, state)
    for _ in range(20):
        enc.encode(np.ones(7680, np.float32) * 0.1, 12, 3, state)
        assert len(state.context) < enc.win_length


def test_logmel_bad_inputs() -> None:
    enc = LogMelFeatures()
    with pytest.raises(InvalidAudioError, match="non-empty mono"):
        enc.for_block(np.zeros(0, np.float32), 9, 3)
    with pytest.raises(ConfigError, match="do not split evenly"):
        enc.for_block(np.zeros(7680, np.float32), 12, 3)  # a stream's first block is 1 + 4k
    with pytest.raises(ConfigError, match="hop_length"):
        LogMelFeatures(hop_length=500, win_length=400)


def test_encoder_registry() -> None:
    enc = build_audio_encoder("logmel", n_mels=20)
    assert isinstance(enc, AudioEncoder) and isinstance(enc, LogMelFeatures)
    assert enc.feature_dim == 21 and set(AUDIO_ENCODERS) == {"logmel"}
    with pytest.raises(ConfigError, match="unknown audio encoder 'wav2vec9'.*logmel"):
        build_audio_encoder("wav2vec9")
    with pytest.raises(ConfigError, match="bad options for audio encoder 'logmel'"):
        build_audio_encoder("logmel", n_bands=3)
