"""Live Avatar's audio features: every hidden state of wav2vec2 (xlsr-53 English), one block at a
time, equal to what the upstream Wan2.2-S2V audio encoder computes for the same audio window.

Per block the encoder sees the block's new samples; the features always cover the
4 * latent_frames video frames that END where the block's audio ends (block 0 shows 9 frames, so
its first 3 feature frames come from the silence before the stream), optionally after
`context_frames` more frames of left context taken from the session's state:

```
 stream:   ... | context_frames (state) | 4*latent_frames video frames ending at the block's end |
 window:                                            [ this block's new samples ]
 wav2vec:       <-------------------- one buffer, normalised as a whole ------------------------>
 kept:                                  <--- [4*latent_frames, layers, dim] returned --->
```

The buffer goes through the same steps as upstream's per-chunk encode: the feature extractor's
zero-mean/unit-variance normalisation over the whole buffer, wav2vec2 with all hidden states
(embeddings + one per transformer layer; the last one after the encoder's final LayerNorm, as
transformers <= 4.51 returns it), linear interpolation from 50 Hz to 30 Hz with
align_corners=True over the whole buffer, then video frame j of the buffer takes 30 Hz frame
round(j * 30 / fps), or zeros when that index is past the interpolated length. At 25 fps this
zeroes the buffer's last frame whenever (6 * frames) % 5 != 3 (12 and 37 frames included): upstream
does the same and we keep it, because the model was trained on it.

Nothing is recomputed from the stream start: the state keeps at most the
context_frames + 4 * latent_frames - 1 frames of audio the next block needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import ConfigError, InvalidAudioError, ModelNotFoundError
from models.transfer import to_device

FOLDER_NAME = "wav2vec2-large-xlsr-53-english"  # inside the Wan2.2-S2V-14B checkpoint
WAV2VEC_RATE = 50  # hidden-state frames per second: 16 kHz over a total conv stride of 320
INTERPOLATED_RATE = 30  # upstream resamples the hidden states to this rate before bucketing
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Wav2VecState:
    """Left context of one stream: the newest samples (silence before the stream start)."""

    history: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    samples_seen: int = 0
    blocks_seen: int = 0


class Wav2VecFeatures:
    """Stacked wav2vec2 hidden states per video frame, the audio input of Live Avatar's DiT.

    `encode` returns [4 * latent_frames, layers, feature_dim] (frame-major; the transformer's
    prepare_audio permutes it to upstream's [1, layers, dim, frames]). This is not the
    [latent_frames, tokens, dim] token layout of LogMelFeatures: `tokens_per_latent_frame` is the
    4 video frames per latent frame, and each carries `layers` stacked hidden states.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        fps: float = 25,
        context_frames: int = 0,
        frames_per_latent: int = 4,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        loaded: tuple[Any, Any, Any] | None = None,
    ) -> None:
        if isinstance(context_frames, bool) or not isinstance(context_frames, int):
            raise ConfigError(f"context_frames must be an integer, got {context_frames!r}")
        if context_frames < 0:
            raise ConfigError(f"context_frames must be >= 0, got {context_frames}")
        if isinstance(frames_per_latent, bool) or not isinstance(frames_per_latent, int):
            raise ConfigError(f"frames_per_latent must be an integer, got {frames_per_latent!r}")
        if frames_per_latent < 1:
            raise ConfigError(f"frames_per_latent must be >= 1, got {frames_per_latent}")
        if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
            raise ConfigError(f"fps must be a positive number, got {fps!r}")
        self.folder = Path(folder).expanduser()
        # `loaded`: (extractor, network, config) built in memory (random-weight benchmarks).
        self._extractor, self._model, config = loaded or _load(self.folder)
        self.sample_rate = int(self._extractor.sampling_rate)
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        per_frame = self.sample_rate / self.fps
        if per_frame.denominator != 1:
            raise ConfigError(
                f"{self.sample_rate} Hz / {fps} fps is not a whole number of samples per video "
                "frame: use a frame rate that divides the sample rate (25 fps at 16 kHz)"
            )
        self.samples_per_frame = int(per_frame)
        self.context_frames = context_frames
        self.tokens_per_latent_frame = frames_per_latent
        self.feature_dim = int(config.hidden_size)
        self.layers = int(config.num_hidden_layers) + 1
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.to(device, dtype)

    # ---- placement -----------------------------------------------------------------------
    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Wav2VecFeatures:
        """Move the network; features come back on this device in this dtype."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        self._model.to(device=self.device, dtype=self.dtype)
        return self

    # ---- streaming -----------------------------------------------------------------------
    def new_state(self) -> Wav2VecState:
        """Stream start: everything before time 0 is silence."""
        return Wav2VecState()

    def encode(
        self, window: np.ndarray, video_frames: int, latent_frames: int, state: Wav2VecState
    ) -> torch.Tensor:
        """Features [4 * latent_frames, layers, feature_dim] of the frames ending with `window`.

        `window` holds the block's new samples: video_frames frames at `sample_rate`. The state
        supplies the left context (zeros before the stream start) and keeps what the next block
        needs.
        """
        if isinstance(latent_frames, bool) or not isinstance(latent_frames, int):
            raise ConfigError(f"latent_frames must be an integer, got {latent_frames!r}")
        frames = self.tokens_per_latent_frame * latent_frames
        if not 1 <= video_frames <= frames:
            raise ConfigError(
                f"a block of {latent_frames} latent frames covers 1..{frames} video frames, "
                f"got video_frames={video_frames}"
            )
        window = np.asarray(window)
        expected = video_frames * self.samples_per_frame
        if window.ndim != 1 or window.shape[0] != expected:
            got = window.shape[0] if window.ndim == 1 else f"shape {tuple(window.shape)}"
            raise InvalidAudioError(
                f"block {state.blocks_seen} needs {expected} mono samples ({video_frames} frames "
                f"at {self.sample_rate} Hz, {float(self.fps):g} fps), got {got}: "
                f"resample the audio to {self.sample_rate} Hz and cut it at frame boundaries"
            )
        window = window.astype(np.float32, copy=False)
        total = (self.context_frames + frames) * self.samples_per_frame
        need = total - expected  # samples of history this buffer reaches back
        history = state.history
        if history.shape[0] < need:
            if history.shape[0] < state.samples_seen:  # dropped real audio, not pre-stream silence
                raise ConfigError(
                    f"block {state.blocks_seen} reaches back {need} samples but the state kept "
                    f"{history.shape[0]}: latent_frames must not grow within a stream"
                )
            history = np.concatenate([np.zeros(need - history.shape[0], np.float32), history])
        buffer = np.concatenate([history[history.shape[0] - need :], window])
        feats = self.features(buffer)[-frames:]

        keep = min(total - self.samples_per_frame, state.samples_seen + expected)
        state.history = buffer[buffer.shape[0] - keep :].copy()
        state.samples_seen += expected
        state.blocks_seen += 1
        return feats

    # ---- one buffer ----------------------------------------------------------------------
    def features(self, samples: np.ndarray) -> torch.Tensor:
        """[frames, layers, feature_dim] for every video frame of `samples` (a whole number of
        frames), computed from this buffer alone: upstream's encode of one audio chunk."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1 or samples.shape[0] == 0 or samples.shape[0] % self.samples_per_frame:
            raise InvalidAudioError(
                f"need mono audio of whole video frames ({self.samples_per_frame} samples each), "
                f"got shape {tuple(samples.shape)}"
            )
        frames = samples.shape[0] // self.samples_per_frame
        with torch.inference_mode():
            values = self._extractor(
                samples, sampling_rate=self.sample_rate, return_tensors="pt"
            ).input_values
            out = self._model(to_device(values, self.device, self.dtype), output_hidden_states=True)
            # transformers <= 4.51 (upstream's pin) ends hidden_states with the encoder output
            # after its final LayerNorm; 5.x ends it with the last layer's raw output instead.
            # Both return the normed one as last_hidden_state.
            states = (*out.hidden_states[:-1], out.last_hidden_state)
            if len(states) != self.layers:
                raise ConfigError(
                    f"{self.folder}: the network returned {len(states)} hidden states, "
                    f"config.json promises {self.layers}"
                )
            hidden = torch.cat(states)  # [layers, T, dim]
            length = int(hidden.shape[1] / float(WAV2VEC_RATE) * INTERPOLATED_RATE)
            if length < 2:
                raise InvalidAudioError(
                    f"{samples.shape[0]} samples are too short for wav2vec2 features: use at "
                    "least 0.1 s of audio per encode"
                )
            hidden = F.interpolate(
                hidden.transpose(1, 2), size=length, mode="linear", align_corners=True
            ).transpose(1, 2)  # [layers, length, dim]
            index = [round(Fraction(j * INTERPOLATED_RATE) / self.fps) for j in range(frames)]
            inside = [i for i in index if i < length]
            picked = hidden[:, inside].transpose(0, 1)  # [inside frames, layers, dim]
            result = torch.zeros(
                frames, self.layers, self.feature_dim, dtype=self.dtype, device=self.device
            )
            result[: len(inside)] = picked  # indices grow with j, so the zeros are a tail
        return result


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load(folder: Path) -> tuple[Any, Any, Any]:
    """Feature extractor, wav2vec2 network (CTC head dropped) and config of a released folder."""
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"wav2vec2 folder not found: {folder} (the {FOLDER_NAME}/ folder of the checkpoint)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{config_path} is missing: {folder} is not a wav2vec2 folder")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path} is not readable JSON ({exc})") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "wav2vec2":
        raise ConfigError(
            f"{config_path} describes a {model_type!r} model, not wav2vec2: point at the "
            f"{FOLDER_NAME}/ folder"
        )
    if not (folder / "preprocessor_config.json").is_file():
        raise ModelNotFoundError(f"{folder / 'preprocessor_config.json'} is missing")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelNotFoundError(f"{folder} holds no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ConfigError(
            f"wav2vec2 features need transformers: pip install transformers ({exc})"
        ) from exc

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # missing/unexpected keys are checked below, in one line
    hf_logging.disable_progress_bar()
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        model, info = Wav2Vec2ForCTC.from_pretrained(
            folder, local_files_only=True, output_loading_info=True
        )
    except Exception as exc:  # transformers/safetensors raise many types for a broken folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load wav2vec2 from {folder}: {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        detail = "; ".join(f"{k}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
                           for k, v in bad.items())  # fmt: skip
        raise ConfigError(f"{folder}: weights do not match config.json ({detail})")
    config = model.config
    stride = math.prod(config.conv_stride)
    if extractor.feature_size != 1 or extractor.sampling_rate != WAV2VEC_RATE * stride:
        raise ConfigError(
            f"{folder}: {extractor.sampling_rate} Hz input over a conv stride of {stride} is not "
            f"the {WAV2VEC_RATE} Hz frame rate upstream's interpolation assumes"
        )
    network = model.wav2vec2.eval().requires_grad_(False)
    return extractor, network, config


# --------------------------------------------------------------------------------------------
# A tiny random folder in the released layout (tests and golden fixtures)
# --------------------------------------------------------------------------------------------

_TINY_CONFIG: dict[str, Any] = {
    # The released xlsr-53 English config with the sizes shrunk: 24 transformer layers (so 25
    # hidden states) and the real conv kernels/strides (so the 50 Hz frame rate is real).
    "activation_dropout": 0.05,
    "apply_spec_augment": True,
    "architectures": ["Wav2Vec2ForCTC"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "conv_bias": True,
    "conv_dim": [8, 8, 8, 8, 8, 8, 8],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": True,
    "do_stable_layer_norm": True,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
    "feat_extract_dropout": 0.0,
    "feat_extract_norm": "layer",
    "feat_proj_dropout": 0.05,
    "final_dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout": 0.05,
    "hidden_size": 16,
    "initializer_range": 0.02,
    "intermediate_size": 16,
    "layer_norm_eps": 1e-05,
    "layerdrop": 0.05,
    "mask_feature_length": 10,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_prob": 0.05,
    "model_type": "wav2vec2",
    "num_attention_heads": 2,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 24,
    "pad_token_id": 0,
    "vocab_size": 33,
}
_PREPROCESSOR = {
    "do_normalize": True,
    "feature_extractor_type": "Wav2Vec2FeatureExtractor",
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 16000,
}
_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", "-"] + [chr(c) for c in range(65, 91)]


def write_tiny_wav2vec(folder: str | Path, seed: int = 0) -> Path:
    """Write a random wav2vec2 CTC folder (hidden 16, 24 layers) in the released file layout.

    Weights come from numpy's seeded generator in sorted key order, so the same seed gives the
    same bytes with any torch version. The weight-normed positional conv is stored as weight_g /
    weight_v like the released checkpoint; the tokenizer files are the ones
    Wav2Vec2Processor.from_pretrained (upstream's loader) needs.
    """
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  Wav2Vec2ForCTC(Wav2Vec2Config(**_TINY_CONFIG)).state_dict().items()}  # fmt: skip
    released = {
        k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        ): s
        for k, s in shapes.items()
    }
    rng = np.random.default_rng(seed)
    tensors = {}
    for key in sorted(released):
        shape = released[key]
        if key.endswith("weight_g"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:  # Kaiming-like, so activations keep their scale through 24 layers
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        elif "layer_norm.weight" in key:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # biases and the (unused at inference) masked_spec_embed
            value = 0.1 * rng.standard_normal(shape)
        tensors[key] = torch.from_numpy(value.astype(np.float32))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    def dump(name: str, obj: Any) -> None:
        (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    dump("config.json", _TINY_CONFIG)
    dump("preprocessor_config.json", _PREPROCESSOR)
    dump("vocab.json", {token: i for i, token in enumerate(_VOCAB)})
    dump("special_tokens_map.json", _SPECIAL)
    dump(
        "tokenizer_config.json",
        {
            **_SPECIAL,
            "do_lower_case": False,
            "word_delimiter_token": "|",
            "tokenizer_class": "Wav2Vec2CTCTokenizer",
        },
    )
    return folder
