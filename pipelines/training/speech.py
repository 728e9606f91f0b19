"""Speech-like audio made in numpy, its microphone/room augmentation, and the loudness envelope.

The default model must learn to move a mouth with a voice without any downloaded corpus, so the
training audio is synthesised: a source-filter model (a glottal pulse train with pitch contours
through four formant resonators, plus fricative and plosive noise), organised into syllables,
words and phrases with pauses and loudness changes, from randomly drawn speakers. Augmentation
(gain, room reverb, microphone band-limiting, noise, speed) keeps a model trained on it from
depending on the synthesiser's clean signal, so it also follows real voices and microphones.

Audio and video are aligned the same way everywhere in this package: video frame i covers the
samples [frame_bounds[i], frame_bounds[i + 1]) with frame_bounds[i] = round(i * sample_rate / fps),
rounded half up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.errors import InvalidAudioError

# Average (F1, F2, F3) of adult-male vowels in Hz (textbook values); a speaker scales them by the
# length of their vocal tract. Rounded vowels (o, u, ʊ) have a low F2, which is what the avatar's
# mouth roundness follows.
VOWEL_FORMANTS: dict[str, tuple[float, float, float]] = {
    "i": (270.0, 2290.0, 3010.0),
    "ɪ": (390.0, 1990.0, 2550.0),
    "e": (530.0, 1840.0, 2480.0),
    "æ": (660.0, 1720.0, 2410.0),
    "a": (730.0, 1090.0, 2440.0),
    "ʌ": (640.0, 1190.0, 2390.0),
    "o": (570.0, 840.0, 2410.0),
    "ʊ": (440.0, 1020.0, 2240.0),
    "u": (300.0, 870.0, 2240.0),
    "ɝ": (490.0, 1350.0, 1690.0),
}
_VOWELS = tuple(VOWEL_FORMANTS)
_F4 = 3400.0
_VOWEL_BANDWIDTHS = (70.0, 100.0, 160.0, 250.0)
# Nasals and approximants as formant targets (F1, F2, F3) of the voiced path.
_NASAL = (260.0, 1150.0, 2300.0)
_APPROXIMANTS = ((300.0, 700.0, 2200.0), (280.0, 2200.0, 2900.0), (360.0, 1300.0, 2600.0))
# Fricative noise bands (low, high) in Hz: s, sh, f/th.
_FRICATIVE_BANDS = ((3800.0, 7600.0), (1800.0, 5000.0), (1000.0, 7600.0))


@dataclass(frozen=True)
class Speaker:
    """The voice of one synthetic talker, kept for a whole utterance so a clip has one voice."""

    f0: float  # mean pitch, Hz
    formant_scale: float  # vocal-tract length factor; 1 is the adult-male average
    syllable_rate: float  # syllables per second while talking
    breathiness: float  # aspiration noise mixed into voiced sounds
    pitch_range: float  # scale of accents and phrase declination
    pause_scale: float  # scale of pauses between words and phrases


def sample_speaker(rng: np.random.Generator) -> Speaker:
    """Draw a voice: low, mid or child-like pitch with a matching vocal-tract length."""
    kind = rng.choice(3, p=[0.45, 0.45, 0.10])
    if kind == 0:
        f0, scale = rng.uniform(85.0, 155.0), rng.uniform(0.90, 1.02)
    elif kind == 1:
        f0, scale = rng.uniform(160.0, 255.0), rng.uniform(1.08, 1.20)
    else:
        f0, scale = rng.uniform(240.0, 330.0), rng.uniform(1.20, 1.32)
    return Speaker(
        f0=float(f0),
        formant_scale=float(scale),
        syllable_rate=float(rng.uniform(3.0, 6.5)),
        breathiness=float(rng.uniform(0.02, 0.25)),
        pitch_range=float(rng.uniform(0.5, 1.5)),
        pause_scale=float(rng.uniform(0.6, 1.6)),
    )


# --------------------------------------------------------------------------------------------
# audio/video alignment


def frame_bounds(num_frames: int, sample_rate: int, fps: float) -> np.ndarray:
    """Sample index where each video frame starts, plus the end of the last one (int64 [T+1])."""
    return np.floor(np.arange(num_frames + 1) * (sample_rate / fps) + 0.5).astype(np.int64)


def num_video_frames(num_samples: int, sample_rate: int, fps: float) -> int:
    """How many video frames start inside `num_samples` of audio (the last may be partial)."""
    if num_samples <= 0:
        return 0
    count = math.ceil(num_samples * fps / sample_rate) + 1
    bounds = frame_bounds(count, sample_rate, fps)
    return int(np.count_nonzero(bounds < num_samples))


def num_audio_samples(num_frames: int, sample_rate: int, fps: float) -> int:
    """Audio samples that exactly cover `num_frames` video frames."""
    return int(frame_bounds(num_frames, sample_rate, fps)[-1])


def frame_rms_db(
    audio: np.ndarray, sample_rate: int, fps: float, num_frames: int | None = None
) -> np.ndarray:
    """RMS level of each video frame's audio in dBFS (float32 [T]); missing audio reads as silence."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if num_frames is None:
        num_frames = num_video_frames(x.size, sample_rate, fps)
    if num_frames == 0:
        return np.zeros(0, dtype=np.float32)
    bounds = frame_bounds(num_frames, sample_rate, fps)
    x = np.pad(x, (0, max(0, int(bounds[-1]) - x.size)))
    energy = np.add.reduceat(x * x, bounds[:-1])
    mean_square = energy / np.maximum(np.diff(bounds), 1)
    return (10.0 * np.log10(mean_square + 1e-10)).astype(np.float32)


def loudness_envelope(
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    *,
    range_db: float = 40.0,
    num_frames: int | None = None,
) -> np.ndarray:
    """Per-video-frame loudness in [0, 1], the signal lip sync is measured against.

    Each frame's RMS level in dB, relative to the clip's loud speech (its 95th-percentile frame),
    mapped linearly so that level maps to 1 and `range_db` below it (or quieter) maps to 0. Being
    relative, it ignores the recording gain; being in dB, it follows how loud speech sounds rather
    than being dominated by a few peaks. All-silent audio (below -80 dBFS) gives zeros.
    """
    db = frame_rms_db(audio, sample_rate, fps, num_frames)
    if db.size == 0:
        return db
    top = float(np.percentile(db, 95.0))
    if top < -80.0:
        return np.zeros_like(db)
    return np.clip((db - (top - range_db)) / range_db, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# synthesis


@dataclass
class _Segment:
    duration: float  # seconds
    voiced: float = 0.0  # glottal source amplitude
    aspiration: float = 0.0  # noise through the formants (h, breathy onsets)
    frication: float = 0.0  # band-limited noise bypassing the formants (s, sh, f, bursts)
    formants: tuple[float, float, float] | None = None  # None keeps the previous target
    band: tuple[float, float] = (1000.0, 7000.0)
    pitch: float = 1.0  # relative to the speaker's f0


def _stft_sizes(sample_rate: int) -> tuple[int, int]:
    n_fft = 1 << max(6, math.ceil(math.log2(0.032 * sample_rate)))
    return n_fft, n_fft // 4


def _syllable(
    rng: np.random.Generator, speaker: Speaker, stress: float, gain: float, pitch: float
) -> list[_Segment]:
    """One consonant-vowel(-consonant) syllable as a list of segments."""
    scale = speaker.formant_scale
    vowel = VOWEL_FORMANTS[_VOWELS[rng.integers(len(_VOWELS))]]
    formants = tuple(f * scale * rng.uniform(0.95, 1.05) for f in vowel)
    amp = gain * (0.45 + 0.55 * stress)
    segs: list[_Segment] = []
    onset = rng.choice(6, p=[0.18, 0.25, 0.25, 0.12, 0.12, 0.08])
    if onset == 1:  # voiceless fricative
        lo, hi = _FRICATIVE_BANDS[rng.integers(len(_FRICATIVE_BANDS))]
        segs.append(
            _Segment(rng.uniform(0.06, 0.13), frication=amp * rng.uniform(0.12, 0.4), band=(lo, hi))
        )
    elif onset == 2:  # plosive: closure, burst, aspiration
        segs.append(_Segment(rng.uniform(0.03, 0.06)))
        segs.append(
            _Segment(
                rng.uniform(0.01, 0.025),
                frication=amp * rng.uniform(0.3, 0.6),
                band=(500.0, 7000.0),
            )
        )
        segs.append(_Segment(rng.uniform(0.01, 0.04), aspiration=amp * 0.25, formants=formants))
    elif onset == 3:  # nasal
        nasal = tuple(f * scale for f in _NASAL)
        segs.append(
            _Segment(rng.uniform(0.04, 0.08), voiced=amp * 0.3, formants=nasal, pitch=pitch)
        )
    elif onset == 4:  # approximant gliding into the vowel
        approx = _APPROXIMANTS[rng.integers(len(_APPROXIMANTS))]
        approx = tuple(f * scale for f in approx)
        segs.append(
            _Segment(rng.uniform(0.04, 0.07), voiced=amp * 0.5, formants=approx, pitch=pitch)
        )
    elif onset == 5:  # voiced fricative
        lo, hi = _FRICATIVE_BANDS[rng.integers(len(_FRICATIVE_BANDS))]
        segs.append(
            _Segment(
                rng.uniform(0.05, 0.1),
                voiced=amp * 0.2,
                frication=amp * 0.15,
                band=(lo, hi),
                formants=tuple(f * scale for f in _NASAL),
                pitch=pitch,
            )
        )
    length = (1.0 / speaker.syllable_rate) * rng.uniform(0.7, 1.2) * (0.8 + 0.5 * stress)
    used = sum(s.duration for s in segs)
    vowel_len = max(0.06, length - used)
    vowel_pitch = pitch * (1.0 + 0.1 * stress)
    for share, level in ((0.25, 0.55), (0.45, 1.0), (0.3, 0.6)):  # rise and fall within the vowel
        segs.append(
            _Segment(vowel_len * share, voiced=amp * level, formants=formants, pitch=vowel_pitch)
        )
    if rng.random() < 0.3:  # coda
        if rng.random() < 0.5:
            lo, hi = _FRICATIVE_BANDS[rng.integers(len(_FRICATIVE_BANDS))]
            segs.append(_Segment(rng.uniform(0.05, 0.1), frication=amp * 0.2, band=(lo, hi)))
        else:
            nasal = tuple(f * scale for f in _NASAL)
            segs.append(
                _Segment(rng.uniform(0.04, 0.07), voiced=amp * 0.3, formants=nasal, pitch=pitch)
            )
    return segs


def _utterance(rng: np.random.Generator, speaker: Speaker, seconds: float) -> list[_Segment]:
    """Phrases of words of syllables with pauses, until `seconds` are filled."""
    ps = speaker.pause_scale
    segs = [_Segment(rng.uniform(0.0, 0.3))]
    total = segs[0].duration
    while total < seconds:
        gain = rng.uniform(0.5, 1.0) if rng.random() > 0.15 else rng.uniform(0.2, 0.4)
        syllables = int(rng.integers(3, 13))
        rise = rng.random() < 0.2  # question-like final rise
        for k in range(syllables):
            pos = k / max(1, syllables - 1)
            pitch = 1.0 + speaker.pitch_range * 0.12 * (1.0 - 2.0 * pos)
            stress = float(rng.random() < 0.35) * rng.uniform(0.5, 1.0) + rng.uniform(0.0, 0.3)
            pitch *= 1.0 + speaker.pitch_range * 0.15 * stress * rng.uniform(0.3, 1.0)
            if rise and k == syllables - 1:
                pitch *= 1.0 + 0.25 * speaker.pitch_range
            segs.extend(_syllable(rng, speaker, min(stress, 1.0), gain, pitch))
            if k < syllables - 1:
                if rng.random() < 0.3:  # word boundary
                    segs.append(_Segment(rng.uniform(0.05, 0.15) * ps))
                else:  # syllable boundary: a short dip
                    segs.append(_Segment(rng.uniform(0.03, 0.07), voiced=gain * 0.05))
        segs.append(_Segment(rng.uniform(0.15, 0.7) * ps))
        total = sum(s.duration for s in segs)
    return segs


def _smooth(track: np.ndarray, width: int) -> np.ndarray:
    """Zero-phase Hann smoothing along the first axis (edges padded with their values)."""
    if width < 2:
        return track
    kernel = np.hanning(width + 2)[1:-1]
    kernel /= kernel.sum()
    pad = width // 2
    padded = np.pad(track, [(pad, width - 1 - pad)] + [(0, 0)] * (track.ndim - 1), mode="edge")
    if track.ndim == 1:
        return np.convolve(padded, kernel, mode="valid")
    return np.stack(
        [np.convolve(padded[:, j], kernel, mode="valid") for j in range(track.shape[1])], 1
    )


def _stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    padded = np.pad(x, (n_fft // 2, n_fft // 2 + hop))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1], axis=1)


def _istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    """Weighted overlap-add inverse of `_stft` (hop must be n_fft / 4)."""
    window = np.hanning(n_fft + 1)[:-1]
    frames = np.fft.irfft(spec, n_fft, axis=1) * window
    m = frames.shape[0]
    parts = n_fft // hop
    out = np.zeros((m + parts - 1, hop))
    norm = np.zeros((m + parts - 1, hop))
    for j in range(parts):
        out[j : j + m] += frames[:, j * hop : (j + 1) * hop]
        norm[j : j + m] += (window[j * hop : (j + 1) * hop] ** 2)[None, :]
    flat = out.reshape(-1) / np.maximum(norm.reshape(-1), 1e-8)
    return flat[n_fft // 2 : n_fft // 2 + length]


def _formant_response(
    formants: np.ndarray, bandwidths: np.ndarray, freqs: np.ndarray, sample_rate: int
) -> np.ndarray:
    """|H| of a cascade of two-pole resonators (unity gain at DC), per frame: [M, K]."""
    z1 = np.exp(-2j * np.pi * freqs / sample_rate)[None, :]
    z2 = z1 * z1
    mag = np.ones((formants.shape[0], freqs.size))
    for i in range(formants.shape[1]):
        f = np.minimum(formants[:, i], 0.47 * sample_rate)[:, None]
        bw = bandwidths[i]
        c = -np.exp(-2.0 * np.pi * bw / sample_rate)
        b = 2.0 * np.exp(-np.pi * bw / sample_rate) * np.cos(2.0 * np.pi * f / sample_rate)
        a = 1.0 - b - c
        mag *= np.abs(a) / np.abs(1.0 - b * z1 - c * z2)
    return mag


def _band_response(lo: np.ndarray, hi: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Smooth band-pass magnitude per frame (log-frequency sigmoid edges): [M, K]."""
    logf = np.log(np.maximum(freqs, 20.0))[None, :]
    edge = 0.15
    rise = 1.0 / (1.0 + np.exp(-(logf - np.log(lo)[:, None]) / edge))
    fall = 1.0 / (1.0 + np.exp(-(np.log(hi)[:, None] - logf) / edge))
    return rise * fall


def synth_speech(
    seconds: float,
    sample_rate: int = 16000,
    rng: np.random.Generator | None = None,
    speaker: Speaker | None = None,
) -> np.ndarray:
    """Synthesise `seconds` of speech-like audio (float32 mono, peak 0.7).

    Syllables are voiced glottal pulses through four formant resonators whose targets move from
    vowel to vowel, with fricative and plosive noise, pitch contours (declination, accents,
    occasional rises), pauses between words and phrases, and phrase-level loudness changes. A
    random speaker is drawn unless one is given.
    """
    if seconds <= 0 or sample_rate < 8000:
        raise ValueError("synth_speech needs seconds > 0 and sample_rate >= 8000")
    rng = rng if rng is not None else np.random.default_rng()
    speaker = speaker if speaker is not None else sample_speaker(rng)
    n = max(1, int(round(seconds * sample_rate)))
    n_fft, hop = _stft_sizes(sample_rate)
    segs = _utterance(rng, speaker, seconds + 0.1)

    # Piecewise-constant control tracks at one value per STFT hop, then smoothed into glides.
    m = 1 + (n + hop) // hop
    ends = np.cumsum([s.duration for s in segs]) * sample_rate / hop
    counts = np.diff(np.concatenate([[0], np.round(ends).astype(np.int64)]))
    counts = np.maximum(counts, 0)
    voiced = np.repeat([s.voiced for s in segs], counts)
    aspir = np.repeat([s.aspiration for s in segs], counts)
    fric = np.repeat([s.frication for s in segs], counts)
    pitch = np.repeat([s.pitch if s.voiced > 0 else np.nan for s in segs], counts)
    lo = np.repeat([s.band[0] for s in segs], counts)
    hi = np.repeat([s.band[1] for s in segs], counts)
    targets, last = [], tuple(f * speaker.formant_scale for f in VOWEL_FORMANTS["ʌ"])
    for s in segs:
        last = s.formants if s.formants is not None else last
        targets.append((*last, _F4 * speaker.formant_scale))
    formants = np.repeat(np.asarray(targets), counts, axis=0)

    def fit(track: np.ndarray) -> np.ndarray:
        if track.shape[0] >= m:
            return track[:m]
        return np.concatenate([track, np.repeat(track[-1:], m - track.shape[0], axis=0)])

    voiced, aspir, fric, lo, hi, formants = map(fit, (voiced, aspir, fric, lo, hi, formants))
    pitch = fit(pitch)
    idx = np.arange(m)
    known = ~np.isnan(pitch)
    pitch = np.interp(idx, idx[known], pitch[known]) if known.any() else np.ones(m)
    ms = sample_rate / hop / 1000.0  # control frames per millisecond
    voiced = _smooth(voiced, max(2, int(25 * ms)))
    aspir = _smooth(aspir, max(2, int(15 * ms)))
    fric = _smooth(fric, max(2, int(10 * ms)))
    formants = _smooth(formants, max(2, int(45 * ms)))
    pitch = _smooth(pitch, max(2, int(60 * ms)))

    # Sources at the audio rate.
    t_ctrl = idx * hop
    t = np.arange(n)
    f0 = speaker.f0 * np.interp(t, t_ctrl, pitch)
    wobble = _smooth(rng.standard_normal(m), max(2, int(40 * ms)))
    f0 *= 1.0 + 0.015 * np.interp(t, t_ctrl, wobble / (np.std(wobble) + 1e-9))
    phase = np.cumsum(f0 / sample_rate) + rng.random()
    frac = phase % 1.0
    t_open, t_close = 0.4, 0.16  # Rosenberg glottal pulse: opening and closing shares of a period
    flow = np.where(
        frac < t_open,
        0.5 * (1.0 - np.cos(np.pi * frac / t_open)),
        np.where(frac < t_open + t_close, np.cos(np.pi * (frac - t_open) / (2 * t_close)), 0.0),
    )
    glottal = np.diff(flow, prepend=0.0) * (sample_rate / f0) * 0.1
    amp_v = np.interp(t, t_ctrl, voiced)
    amp_a = np.interp(t, t_ctrl, aspir) + speaker.breathiness * amp_v
    source_v = glottal * amp_v + 0.3 * rng.standard_normal(n) * amp_a
    source_n = rng.standard_normal(n) * np.interp(t, t_ctrl, fric)

    # Time-varying filters applied frame by frame in the STFT domain.
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    spec_v = _stft(source_v, n_fft, hop)
    spec_n = _stft(source_n, n_fft, hop)
    mm = min(spec_v.shape[0], m)
    # Lip radiation: about +6 dB/octave above a few hundred Hz, as in real speech.
    tilt = np.sqrt(1.0 + (freqs / 400.0) ** 2) / 2.0
    spec_v = (
        spec_v[:mm]
        * tilt
        * _formant_response(formants[:mm], np.array(_VOWEL_BANDWIDTHS), freqs, sample_rate)
    )
    spec_n = spec_n[:mm] * _band_response(lo[:mm], hi[:mm], freqs)
    y = _istft(spec_v + spec_n, n_fft, hop, n)
    y = np.pad(y, (0, n - y.size))
    peak = float(np.max(np.abs(y)))
    if peak > 0:
        y *= 0.7 / peak
    return y.astype(np.float32)


# --------------------------------------------------------------------------------------------
# augmentation


def change_speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Play `x` `factor` times faster (pitch moves with it, like a tape); length becomes len/factor."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    out_len = max(1, int(round(x.size / factor)))
    positions = np.arange(out_len) * factor
    return np.interp(positions, np.arange(x.size), x).astype(np.float32)


def _noise(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """White, pink, brown noise or mains hum, unit RMS."""
    kind = rng.integers(4)
    if kind == 3:
        t = np.arange(n) / sample_rate
        base = 50.0 if rng.random() < 0.5 else 60.0
        hum = sum(
            np.sin(2 * np.pi * base * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3, 5)
        )
        noise = hum + 0.2 * rng.standard_normal(n)
    else:
        white = rng.standard_normal(n)
        if kind == 0:
            noise = white
        else:
            spec = np.fft.rfft(white)
            f = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), 20.0)
            spec /= f ** (0.5 if kind == 1 else 1.0)
            noise = np.fft.irfft(spec, n)
    return noise / (np.std(noise) + 1e-12)


def augment_audio(
    x: np.ndarray,
    rng: np.random.Generator,
    sample_rate: int = 16000,
    *,
    speed: bool = True,
) -> np.ndarray:
    """Make clean audio sound like a real microphone in a real room (float32 mono).

    Each step is applied at random: a small speed change (0.94-1.06; this changes the length, so
    pass speed=False for audio already aligned with video, and change the clean audio with
    `change_speed` before driving the avatar instead), room reverb (a decaying-noise impulse
    response), microphone band-limiting and EQ, additive noise at 5-40 dB SNR, and a gain over a
    wide range with occasional clipping.
    """
    y = np.asarray(x, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise InvalidAudioError("cannot augment empty audio")
    if speed and rng.random() < 0.5:
        y = change_speed(y, float(rng.uniform(0.94, 1.06))).astype(np.float64)
    n = y.size
    ref_rms = _active_rms(y)

    if rng.random() < 0.5:  # room reverb
        rt60 = rng.uniform(0.08, 0.5)
        length = int(min(rt60, 0.4) * sample_rate)
        t = np.arange(length) / sample_rate
        tail = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)
        predelay = int(rng.uniform(0.002, 0.02) * sample_rate)
        tail[:predelay] = 0.0
        tail *= 10 ** (-rng.uniform(0.0, 12.0) / 20) / (np.sqrt(np.sum(tail**2)) + 1e-12)
        ir = tail
        ir[0] = 1.0
        size = 1 << math.ceil(math.log2(n + length))
        y = np.fft.irfft(np.fft.rfft(y, size) * np.fft.rfft(ir, size), size)[:n]

    if rng.random() < 0.7:  # microphone band-limiting and EQ (zero phase)
        spec = np.fft.rfft(y)
        f = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), 1.0)
        f_lo = rng.uniform(60.0, 350.0)
        f_hi = rng.uniform(2800.0, min(7500.0, 0.45 * sample_rate))
        order = rng.integers(2, 5)
        gain = 1.0 / np.sqrt(1.0 + (f_lo / f) ** 4) / np.sqrt(1.0 + (f / f_hi) ** (2 * order))
        peak_f, peak_db = rng.uniform(1500.0, 5000.0), rng.uniform(-6.0, 6.0)
        gain *= 10 ** (peak_db / 20 * np.exp(-0.5 * (np.log(f / peak_f) / 0.4) ** 2))
        y = np.fft.irfft(spec * gain, n)

    if rng.random() < 0.7:  # additive noise
        snr_db = rng.uniform(5.0, 40.0)
        y = y + _noise(rng, n, sample_rate) * ref_rms * 10 ** (-snr_db / 20)

    peak = float(np.max(np.abs(y))) + 1e-12
    y *= 10 ** (rng.uniform(-26.0, -1.0) / 20) / peak
    if rng.random() < 0.1:  # overdriven microphone
        y = np.clip(y * 10 ** (rng.uniform(3.0, 8.0) / 20), -1.0, 1.0)
    return y.astype(np.float32)


def _active_rms(x: np.ndarray) -> float:
    """RMS over the louder half of 20 ms chunks, so pauses do not lower the SNR reference."""
    chunk = 320
    usable = (x.size // chunk) * chunk
    if usable == 0:
        return float(np.sqrt(np.mean(x**2)) + 1e-12)
    energy = np.mean(x[:usable].reshape(-1, chunk) ** 2, axis=1)
    loud = energy[energy >= np.median(energy)]
    return float(np.sqrt(np.mean(loud)) + 1e-12)
