"""Live Avatar's parts for the planner, sized without loading a weight.

    liveavatar-14b    the release's architecture: S2VConfig's defaults (Wan2.2-S2V-14B with its
                      audio encoder, 12 audio injectors and motion frame packer), wav2vec2
                      large-xlsr-53, umT5-XXL's encoder, the Wan 2.1 VAE
    liveavatar:DIR    a released folder: config.json (read_config), wav2vec2's config.json, and
                      the shapes stored in the umT5 and VAE .pth files (memory-mapped)

Where each part lives (pipelines/memory.py turns places into devices): the transformer on every
denoise rank (whole, or its layers); wav2vec2 on the first rank, which encodes every block's
audio and passes the features on; umT5 on the first rank's device unless it is kept on the CPU
(text_encoder cpu/free); the VAE on the decode rank only, which also encodes the reference.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.errors import ConfigError
from pipelines.model_shape import FIRST, Component, ModelShape

NAME = "liveavatar-14b"
PREFIX = "liveavatar:"

# The release's audio and text encoders (Wan2.2-S2V-14B's wav2vec2-large-xlsr-53-english/ and
# umT5-XXL encoder), for `liveavatar-14b` and for folders that lack those files.
RELEASE_WAV2VEC2 = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    conv_bias=True,
)
RELEASE_UMT5 = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    num_heads=64,
    d_ff=10240,
    num_layers=24,
    relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu",
)


def is_liveavatar(model: str) -> bool:
    if model == NAME or model.startswith(PREFIX):
        return True
    try:
        data = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "s2v"


def liveavatar_defaults(height: int = 384, width: int = 704) -> Any:
    """The StreamDefaults load_liveavatar gives its bundle."""
    from models.liveavatar import stream_defaults

    return stream_defaults(height, width)


@dataclass
class LiveAvatarParts:
    name: str
    config: Any  # S2VConfig
    defaults: Any  # StreamDefaults
    vae: Any  # WanStreamingVAE on the meta device (decode tracing)
    vae_params: int
    components: tuple[Component, ...]
    notes: tuple[str, ...]


def liveavatar_parts(model: str, *, text_encoder: str = "keep") -> LiveAvatarParts:
    from models.liveavatar import TEXT_ENCODER_MODES, VAE_FILE, WAV2VEC_DIR, read_config
    from models.s2v import S2VConfig
    from models.text_encoder import T5_CHECKPOINT
    from pipelines.model_shape import _wan_vae_meta

    if text_encoder not in TEXT_ENCODER_MODES:
        raise ConfigError(
            f"text_encoder must be one of {', '.join(TEXT_ENCODER_MODES)}, got {text_encoder!r}"
        )
    notes: list[str] = []
    folder: Path | None = None
    if model == NAME:
        cfg = S2VConfig().validate()
        name = NAME
    else:
        folder = Path(model[len(PREFIX) :] if model.startswith(PREFIX) else model).expanduser()
        cfg = read_config(folder)  # ModelNotFoundError / ConfigError in one line
        name = f"{PREFIX}{folder}"

    wav_params, wav_src, wav_cfg = _wav2vec2(folder / WAV2VEC_DIR if folder else None, notes)
    t5_params, t5_src = _umt5_params(folder / T5_CHECKPOINT if folder else None, notes)
    vae_file = folder / VAE_FILE if folder else None
    if vae_file is not None and not vae_file.is_file():
        notes.append(f"{vae_file} not found: the release's Wan 2.1 VAE is assumed")
        vae_file = None
    vae = _wan_vae_meta(vae_file)
    t5_places = (FIRST,) if text_encoder in ("keep", "offload") else ()
    if text_encoder == "offload":
        notes.append("umT5 is on the CPU between prompts and on the first rank while encoding one")
    components = (
        Component("wav2vec2", wav_params, (FIRST,), wav_src, wav_cfg),
        Component("umT5", t5_params, t5_places, t5_src),
    )
    return LiveAvatarParts(
        name=name,
        config=cfg,
        defaults=liveavatar_defaults(),
        vae=vae,
        vae_params=sum(p.numel() for p in vae.vae.parameters()),
        components=components,
        notes=tuple(notes),
    )


def _wav2vec2(folder: Path | None, notes: list[str]) -> tuple[int, str, dict[str, Any]]:
    """wav2vec2's parameters (without the CTC head the features never use, built on meta),
    where its config came from, and the config."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config, source = RELEASE_WAV2VEC2, "release architecture"
    if folder is not None:
        path = folder / "config.json"
        if path.is_file():
            try:
                config, source = json.loads(path.read_text()), str(path)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: not readable JSON ({exc})") from None
        else:
            notes.append(f"{path} not found: the release's wav2vec2 is assumed")
    try:
        with torch.device("meta"):
            model = Wav2Vec2Model(Wav2Vec2Config(**config))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: not a wav2vec2 config ({exc})") from None
    return sum(p.numel() for p in model.parameters()), source, dict(config)


def _umt5_params(pth: Path | None, notes: list[str]) -> tuple[int, str]:
    """umT5 encoder parameters: the tensors of Wan's .pth (memory-mapped: only its index is
    read), or the release's architecture on meta."""
    if pth is not None and pth.is_file():
        try:
            state = torch.load(pth, map_location="cpu", weights_only=True, mmap=True)
            return sum(t.numel() for t in state.values()), str(pth)
        except Exception as exc:  # a truncated or foreign file: one line naming it
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(f"{pth}: not a readable umT5 checkpoint ({reason})") from None
    if pth is not None:
        notes.append(f"{pth} not found: the release's umT5-XXL encoder is assumed")
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**RELEASE_UMT5))
    return sum(p.numel() for p in model.parameters()), "release architecture"


def check_size(shape: ModelShape) -> None:
    """ConfigError for a resolution the transformer cannot run (LiveAvatarTransformer.grid's
    rule), or one the VAE would crop."""
    from pipelines.probe import build_on_meta

    unit = shape.spatial_factor
    if shape.height % unit or shape.width % unit:
        raise ConfigError(
            f"{shape.width}x{shape.height}: width and height must be multiples of {unit} "
            "pixels (the VAE's downsampling)"
        )
    small = dataclasses.replace(shape.config, num_layers=1, audio_inject_layers=(0,))
    build_on_meta(shape, small).grid(*shape.latent_hw)
