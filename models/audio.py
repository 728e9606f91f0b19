"""The audio front end: decode and resample audio, cut it into per-block windows, and turn a window
into per-latent-frame feature tokens that the DiT attends to.

Everything here is deterministic and CPU-cheap; the model side only ever sees `AudioEncoder.encode`,
so a learned encoder (wav2vec2 and friends) can replace the log-mel features without touching the
pipeline.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import av
import numpy as np
import torch

from models.errors import ConfigError, InvalidAudioError

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}


def _check_rate(rate: int, what: str) -> None:
    if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool):
        raise InvalidAudioError(f"{what} must be an integer number of Hz, got {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidAudioError(
            f"{what} {rate} Hz is out of range: use a rate between {MIN_SAMPLE_RATE} and "
            f"{MAX_SAMPLE_RATE} Hz (16000, 24000, 44100 and 48000 are typical)"
        )


# --------------------------------------------------------------------------------------------
# Decoding whole files
# --------------------------------------------------------------------------------------------


def load_audio(
    source: str | Path | bytes, sample_rate: int, max_seconds: float = 2 * 60 * 60
) -> np.ndarray:
    """Decode any file FFmpeg reads (wav, mp3, ogg/opus, flac, m4a...) to mono float32 in [-1, 1].

    Channels are averaged (not summed as FFmpeg's default downmix does) so a centred stereo voice
    keeps its level. Decoding stops as soon as the audio exceeds `max_seconds`, so a huge upload
    costs no more than the limit.
    """
    _check_rate(sample_rate, "target sample rate")
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise InvalidAudioError("audio data is empty (0 bytes): send a complete audio file")
        handle: Any = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidAudioError(f"audio file not found: {path} (check the path)")
        handle = str(path)

    max_samples = int(max_seconds * sample_rate)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(handle, mode="r") as container:
            if not container.streams.audio:
                raise InvalidAudioError(
                    f"{name} has no audio stream: give a file that contains sound"
                )
            stream = container.streams.audio[0]
            # Keep the source layout so we can average channels ourselves.
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
            for frame in _decode_then_flush(container, stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().mean(axis=0, dtype=np.float32)
                    chunks.append(chunk)
                    total += chunk.shape[0]
                if total > max_samples:
                    raise InvalidAudioError(
                        f"{name} is longer than the limit of {max_seconds:.0f} s: cut it into "
                        "shorter pieces or raise max_seconds"
                    )
    except InvalidAudioError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise InvalidAudioError(
            f"cannot decode {name} as audio ({exc}): give a wav, mp3, ogg, opus, flac or m4a file"
        ) from exc

    if total == 0:
        raise InvalidAudioError(f"{name} contains no audio samples (zero length)")
    audio = np.concatenate(chunks)
    np.nan_to_num(audio, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(audio, -1.0, 1.0, out=audio)


def _decode_then_flush(container: Any, stream: Any) -> Any:
    """Decoded frames followed by None, the resampler's flush marker."""
    yield from container.decode(stream)
    yield None


# --------------------------------------------------------------------------------------------
# Streaming ingest
# --------------------------------------------------------------------------------------------


class StreamingResampler:
    """PCM chunks from a websocket in, mono float32 at the model's rate out.

    Chunks may split a sample or a frame anywhere; the partial frame waits for the next push.
    Per 20 ms chunk this costs one numpy view and one PyAV resample call (tens of microseconds).
    """

    def __init__(self, in_rate: int, channels: int, fmt: str, out_rate: int) -> None:
        _check_rate(in_rate, "input sample rate")
        _check_rate(out_rate, "output sample rate")
        if channels not in (1, 2):
            raise InvalidAudioError(f"channels must be 1 (mono) or 2 (stereo), got {channels!r}")
        if fmt not in PCM_FORMATS:
            raise InvalidAudioError(
                f"unknown PCM format {fmt!r}: use one of {', '.join(sorted(PCM_FORMATS))}"
            )
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.channels = channels
        self.fmt = fmt
        self._dtype = PCM_FORMATS[fmt]
        self._frame_bytes = self._dtype.itemsize * channels
        self._pending = b""
        self._resampler = self._new_resampler()

    def _new_resampler(self) -> av.AudioResampler | None:
        if self.in_rate == self.out_rate:
            return None
        return av.AudioResampler(format="flt", layout="mono", rate=self.out_rate)

    def push(self, data: bytes) -> np.ndarray:
        """Resample what `data` (plus any held-back partial frame) completes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidAudioError(f"audio chunks must be bytes, got {type(data).__name__}")
        buf = self._pending + bytes(data)
        usable = len(buf) - len(buf) % self._frame_bytes
        self._pending = buf[usable:]
        if usable == 0:
            return np.zeros(0, dtype=np.float32)
        samples = np.frombuffer(buf[:usable], dtype=self._dtype).reshape(-1, self.channels)
        if self._dtype.kind == "i":
            mono = samples.mean(axis=1, dtype=np.float32) * np.float32(1 / 32768)
        else:
            mono = samples.mean(axis=1, dtype=np.float32)
            np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
            np.clip(mono, -1.0, 1.0, out=mono)
        if self._resampler is None:
            return mono
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
        frame.sample_rate = self.in_rate
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """Emit the resampler's tail at the end of a stream; the next push starts a fresh stream.

        A trailing partial frame (fewer bytes than one sample of every channel) is dropped.
        """
        self._pending = b""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        out = self._collect(self._resampler.resample(None))
        self._resampler = self._new_resampler()
        return out

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype=np.float32)
        if len(frames) == 1:
            return frames[0].to_ndarray()[0].astype(np.float32, copy=False)
        return np.concatenate([f.to_ndarray()[0] for f in frames]).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Cutting audio into blocks
# --------------------------------------------------------------------------------------------


def _fps_fraction(fps: float) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
        raise ConfigError(f"fps must be a positive number, got {fps!r}")
    return Fraction(fps).limit_denominator(1_000_000)


def frame_to_sample(frame: int, sample_rate: int, fps: float) -> int:
    """First audio sample of video frame `frame`: round(frame * sample_rate / fps), exactly.

    Every boundary is computed from the stream start, so rounding never accumulates however
    long the stream runs (29.97 fps included).
    """
    exact = frame * sample_rate / _fps_fraction(fps)
    return math.floor(exact + Fraction(1, 2))


def block_frame_range(
    index: int, first_block_frames: int, frames_per_block: int
) -> tuple[int, int]:
    """Video frames [start, end) of block `index`: block 0 is first_block_frames long, the rest
    frames_per_block (a causal video VAE decodes its first latent frame to a single frame)."""
    if index == 0:
        return 0, first_block_frames
    start = first_block_frames + (index - 1) * frames_per_block
    return start, start + frames_per_block


def block_windows(
    audio: np.ndarray, sample_rate: int, fps: float, first_block_frames: int, frames_per_block: int
) -> list[np.ndarray]:
    """Cut audio into one window per generated block, aligned to the block's video frames.

    Enough blocks are made to cover all of the audio; the last window is padded with silence.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise InvalidAudioError(f"audio must be mono (1-D), got shape {tuple(audio.shape)}")
    if first_block_frames < 1 or frames_per_block < 1:
        raise ConfigError(
            f"block sizes must be at least one frame, got first_block_frames={first_block_frames}, "
            f"frames_per_block={frames_per_block}"
        )
    windows: list[np.ndarray] = []
    index = 0
    while True:
        f0, f1 = block_frame_range(index, first_block_frames, frames_per_block)
        s0, s1 = frame_to_sample(f0, sample_rate, fps), frame_to_sample(f1, sample_rate, fps)
        if s0 >= audio.shape[0]:
            break
        window = audio[s0:s1]
        if window.shape[0] < s1 - s0:
            window = np.concatenate([window, np.zeros(s1 - s0 - window.shape[0], np.float32)])
        windows.append(window.copy())
        index += 1
    return windows


def latent_frame_spans(video_frames: int, latent_frames: int, first: bool) -> list[tuple[int, int]]:
    """Which video frames [start, end) of a block each latent frame decodes to.

    Matches the causal video VAEs here: in the first block of a stream latent frame 0 is a single
    video frame and the others share the rest evenly; in later blocks all share evenly.
    """
    if latent_frames < 1 or video_frames < latent_frames:
        raise ConfigError(
            f"a block of {latent_frames} latent frames cannot cover {video_frames} video frames"
        )
    if first:
        head, rest_video, rest_latent = 1, video_frames - 1, latent_frames - 1
    else:
        head, rest_video, rest_latent = 0, video_frames, latent_frames
    if rest_latent == 0:
        if rest_video != 0:
            raise ConfigError(f"the first latent frame covers one video frame, not {video_frames}")
        return [(0, 1)]
    if rest_video % rest_latent:
        raise ConfigError(
            f"{video_frames} video frames do not split evenly over {latent_frames} latent frames"
            + (" (the first latent frame of a stream covers one video frame)" if first else "")
        )
    per = rest_video // rest_latent
    spans = [(0, 1)] if head else []
    spans += [(head + i * per, head + (i + 1) * per) for i in range(rest_latent)]
    return spans


# --------------------------------------------------------------------------------------------
# Audio encoders
# --------------------------------------------------------------------------------------------


@runtime_checkable
class AudioEncoder(Protocol):
    """What the pipeline needs from an audio encoder: per-latent-frame tokens, one block at a time.

    `encode` sees only the current block's window plus whatever left context the encoder keeps in
    its own state object, so the features of block b never depend on audio that arrives later.

    How a wav2vec2-style encoder plugs in: its state keeps the last second or two of audio; encode
    runs the network on context + window, keeps the hidden states that fall inside the window,
    interpolates them to the block's video frames, groups them by `latent_frame_spans` and
    resamples each group to `tokens_per_latent_frame` tokens of `feature_dim`. Register the class
    in AUDIO_ENCODERS and the model config picks it by name.
    """

    sample_rate: int
    feature_dim: int
    tokens_per_latent_frame: int

    def new_state(self) -> Any:
        """Left context for one session's stream, empty at the stream start."""
        ...

    def encode(
        self, window: np.ndarray, video_frames: int, latent_frames: int, state: Any
    ) -> torch.Tensor:
        """Tokens [latent_frames, tokens_per_latent_frame, feature_dim]; updates `state`."""
        ...


@dataclass
class LogMelState:
    """Left context of one stream for LogMelFeatures: a few hundred samples and one mel frame."""

    context: np.ndarray  # samples not yet consumed by a complete STFT frame
    last_frame: torch.Tensor  # features of the newest complete frame, held into empty tokens
    samples_seen: int = 0
    blocks_seen: int = 0


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    """Triangular filters on the HTK mel scale, [n_mels, n_fft // 2 + 1], each with unit area in
    mel so bands of different widths read on the same scale."""

    def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bins_hz[None, :]) / (upper - centre)
    bank = np.clip(np.minimum(rising, falling), 0.0, None)
    bank /= np.maximum(bank.sum(axis=1, keepdims=True), 1e-12)
    return bank.astype(np.float32)


class LogMelFeatures:
    """Log-mel + log-energy tokens: the learning-free audio encoder of the embedded default model.

    STFT frames lie on one grid from the stream start: frame m covers samples
    [(m+1)*hop - win, (m+1)*hop), so a frame is complete once its last sample has arrived. Each
    latent frame's sample span is split into `tokens_per_latent_frame` equal parts; a token is the
    mean of the frames that end inside its part, or (if a part is shorter than a hop and none does)
    the newest earlier frame. Sample boundaries inside a block are relative to the window, so
    block-by-block features equal whole-stream features exactly when sample_rate / fps is whole.
    """

    def __init__(
        self,
        sample_rate: int = 16_000,
        n_mels: int = 40,
        hop_length: int = 160,
        win_length: int = 400,
        tokens_per_latent_frame: int = 4,
        fmin: float = 0.0,
        fmax: float | None = None,
    ) -> None:
        _check_rate(sample_rate, "feature sample rate")
        fmax = sample_rate / 2 if fmax is None else fmax
        if not (n_mels >= 1 and tokens_per_latent_frame >= 1):
            raise ConfigError("n_mels and tokens_per_latent_frame must be at least 1")
        if not 1 <= hop_length <= win_length:
            raise ConfigError(f"need 1 <= hop_length <= win_length, got {hop_length}, {win_length}")
        if not 0 <= fmin < fmax <= sample_rate / 2:
            raise ConfigError(f"need 0 <= fmin < fmax <= {sample_rate / 2}, got {fmin}, {fmax}")
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.hop_length = hop_length
        self.win_length = win_length
        self.tokens_per_latent_frame = tokens_per_latent_frame
        self.feature_dim = n_mels + 1
        self._window = torch.hann_window(win_length, periodic=True, dtype=torch.float64)
        self._filters = torch.from_numpy(
            mel_filterbank(sample_rate, win_length, n_mels, fmin, fmax)
        ).double()
        self._eps = 1e-10
        self._silence = self._features(np.zeros(win_length, dtype=np.float32))[0]

    def new_state(self) -> LogMelState:
        """Stream start: the samples before time 0 are silence."""
        return LogMelState(
            context=np.zeros(self.win_length - self.hop_length, dtype=np.float32),
            last_frame=self._silence.clone(),
        )

    def _features(self, samples: np.ndarray) -> torch.Tensor:
        """[frames, n_mels + 1] log-mel and log mean-square energy of every complete frame of
        `samples`, which starts on a frame start."""
        if samples.shape[0] < self.win_length:
            return torch.zeros(0, self.feature_dim, dtype=torch.float64)
        x = torch.from_numpy(samples).double()
        spec = torch.stft(
            x,
            n_fft=self.win_length,
            hop_length=self.hop_length,
            window=self._window,
            center=False,
            return_complex=True,
        ).T  # [frames, bins]
        power = spec.real.square() + spec.imag.square()
        mel = torch.log(power @ self._filters.T + self._eps)
        frames = x.unfold(0, self.win_length, self.hop_length)
        energy = torch.log(frames.square().mean(dim=-1, keepdim=True) + self._eps)
        return torch.cat([mel, energy], dim=-1)

    def encode(
        self, window: np.ndarray, video_frames: int, latent_frames: int, state: LogMelState
    ) -> torch.Tensor:
        """Tokens for the next block of a stream; uses only `window` and the state's context."""
        window = np.asarray(window, dtype=np.float32)
        if window.ndim != 1 or window.shape[0] == 0:
            raise InvalidAudioError(
                f"an audio window must be non-empty mono samples, got shape {tuple(window.shape)}"
            )
        spans = latent_frame_spans(video_frames, latent_frames, first=state.blocks_seen == 0)
        hop = self.hop_length
        n = window.shape[0]

        buf = np.concatenate([state.context, window])
        feats = self._features(buf)
        consumed = feats.shape[0] * hop
        # End of each new frame, relative to the window start (the context reaches back to the
        # start of the first frame this window completes).
        offset = state.samples_seen % hop
        ends = np.arange(1, feats.shape[0] + 1) * hop - offset

        tokens = torch.empty(latent_frames, self.tokens_per_latent_frame, self.feature_dim)
        per = self.tokens_per_latent_frame
        for j, (v0, v1) in enumerate(spans):
            a, b = round(v0 * n / video_frames), round(v1 * n / video_frames)
            for k in range(per):
                p, q = a + round(k * (b - a) / per), a + round((k + 1) * (b - a) / per)
                lo, hi = np.searchsorted(ends, p, side="right"), np.searchsorted(ends, q, "right")
                if hi > lo:
                    token = feats[lo:hi].mean(dim=0)
                else:  # part shorter than a hop: hold the newest complete frame
                    token = feats[lo - 1] if lo > 0 else state.last_frame
                tokens[j, k] = token.float()

        if feats.shape[0]:
            state.last_frame = feats[-1]
        state.context = buf[consumed:].copy()
        state.samples_seen += n
        state.blocks_seen += 1
        return tokens

    def for_block(self, window: np.ndarray, video_frames: int, latent_frames: int) -> torch.Tensor:
        """Tokens for a window that starts a stream (silence before it). Feeding a whole clip
        here gives the same tokens as encoding its blocks one by one with `encode`."""
        return self.encode(window, video_frames, latent_frames, self.new_state())


AUDIO_ENCODERS: dict[str, type] = {"logmel": LogMelFeatures}


def build_audio_encoder(name: str, **kwargs: Any) -> AudioEncoder:
    """Audio encoder by its config name; unknown names fail with the list of known ones."""
    try:
        cls = AUDIO_ENCODERS[name]
    except KeyError:
        known = ", ".join(sorted(AUDIO_ENCODERS))
        raise ConfigError(f"unknown audio encoder {name!r}: known encoders are {known}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for audio encoder {name!r}: {exc}") from exc
