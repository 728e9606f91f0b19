"""Live Avatar as released: the Wan2.2-S2V-14B folder and the Live Avatar LoRA, as a ModelBundle.

    <base>/                                   (Wan-AI/Wan2.2-S2V-14B)
      config.json                             WanModel_S2V hyperparameters
      diffusion_pytorch_model-0000N-of-0000M.safetensors + ...safetensors.index.json
      Wan2.1_VAE.pth                          the Wan 2.1 VAE, original key layout
      models_t5_umt5-xxl-enc-bf16.pth         umT5-XXL encoder, Wan's key layout
      google/umt5-xxl/                        its tokenizer
      wav2vec2-large-xlsr-53-english/         the audio encoder
    <lora>/liveavatar.safetensors             (Quark-Vision/Live-Avatar) PEFT LoRA, rank 128

Nothing is converted on disk: each part is read where it lies, lazily (the transformer shard by
shard straight into its dtype and device, the LoRA merged as the shards stream in). A pipeline
rank loads only its parts (`parts`, `layers`).

The pipeline settings are upstream's streaming ones (causal_s2v_pipeline_tpp_blockwise.py):
blocks of 3 latent frames, 4 Euler steps on diffusers' schedule with shift 3, one KV cache per
step (timestep forcing), a ring of one 48-frame clip (4 blocks), noise drawn per clip, the sink
rolled to a random distance of 4-30 frames ahead but never before frame 30, and the sink's
reference replaced by block 0's first frame from the first block of the second clip on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import ConfigError, ModelNotFoundError
from models.s2v import LiveAvatarTransformer, S2VConfig, S2VReference
from models.vae import StreamingVAE

log = logging.getLogger(__name__)

CONFIG = "config.json"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
DEFAULT_PROMPT = (
    "A person talking to the camera with natural facial expressions and lip movements, "
    "steady framing, soft even lighting."
)
MOTION_FRAMES = 73  # video frames of motion context (upstream's config: motion_frames)
REFERENCE_REPEAT = 5  # the reference image is encoded as 5 identical frames; latent 1 is kept
DECODE_PRIME_LATENTS = 7  # upstream primes its streaming decoder with 7 motion latents
DROP_FIRST_FRAMES = 3  # ... and drops the first 3 frames of the first block
PARTS = ("transformer", "vae", "audio", "text")


def pipeline_settings() -> dict[str, Any]:
    """Live Avatar's streaming pipeline, in PipelineConfig's names."""
    return {
        "cache_mode": "timestep_forcing",
        "schedule_spacing": "diffusers",
        "noise_clip_blocks": 4,
        "sink_distance_max": 30,
        "sink_min_position": LiveAvatarTransformer.REFERENCE_POSITION,
        "sink_refresh": True,
        "sink_refresh_block": 4,
    }


def frames_for(temporal_factor: int, latent_frames: int, first: bool) -> int:
    """Video frames a block shows: 4 per latent frame, block 0 less the 3 upstream drops."""
    if latent_frames < 1:
        raise ConfigError(f"a block needs at least one latent frame, got {latent_frames}")
    n = temporal_factor * latent_frames
    return n - DROP_FIRST_FRAMES if first else n


class VAEGeometry:
    """What a pipeline rank without the VAE needs to know of it: sizes and frame counts. The
    reference is encoded (and frames decoded) on the rank that holds the VAE."""

    needs_reference = True

    def __init__(self, latent_channels: int = 16, spatial: int = 8, temporal: int = 4) -> None:
        self.latent_channels = latent_channels
        self.spatial_factor = spatial
        self.temporal_factor = temporal

    def to(self, *args: Any, **kwargs: Any) -> VAEGeometry:
        return self

    def frames_for(self, latent_frames: int, first: bool) -> int:
        return frames_for(self.temporal_factor, latent_frames, first)


def stream_defaults(height: int = 384, width: int = 704) -> Any:
    """Live Avatar's stream: 25 fps, 16 kHz audio, blocks of 3 latent frames (12 video frames),
    4 steps with shift 3, a history of the 3 blocks before (one 48-frame clip with the block),
    the sink 4-30 frames ahead (pipeline_settings)."""
    from models.registry import StreamDefaults

    return StreamDefaults(
        fps=25.0,
        height=height,
        width=width,
        audio_sample_rate=16000,
        frames_per_block=3,
        steps=4,
        shift=3.0,
        window_frames=9,
        sink_distance=4,
        context_timestep=0.0,
        pipeline=pipeline_settings(),
    )


@dataclass
class LiveAvatarDecodeState:
    inner: Any
    drop: int


class LiveAvatarVAE(StreamingVAE):
    """Wan 2.1 VAE as Live Avatar streams it: a session's reference becomes a reference latent
    and motion latents (the image repeated as a still video), the decoder is primed with the
    first motion latents, and block 0's first frames are dropped.

    Encoding the motion latents runs the encoder over 5 x 73 frames of the still image, as
    upstream does; results are kept for the last few distinct images (a service usually streams
    a handful of avatars), so only a new reference pays for it.
    """

    needs_reference = True  # the decode rank of a multi-device executor encodes it too

    def __init__(self, inner: Any, cache_size: int = 4) -> None:
        self.inner = inner
        self.cache_size = cache_size
        self._cache: OrderedDict[str, S2VReference] = OrderedDict()

    def to(self, *args: Any, **kwargs: Any) -> LiveAvatarVAE:
        self.inner.to(*args, **kwargs)
        self._cache.clear()
        return self

    @property
    def latent_channels(self) -> int:
        return self.inner.latent_channels

    @property
    def spatial_factor(self) -> int:
        return self.inner.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.inner.temporal_factor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.vae.state_dict()

    def frames_for(self, latent_frames: int, first: bool) -> int:
        return frames_for(self.temporal_factor, latent_frames, first)

    def encode_reference(self, image: torch.Tensor) -> S2VReference:
        """Reference image [1, 3, H, W] in [-1, 1] -> the sink's reference and motion latents."""
        self._check_image(image)
        key = hashlib.sha1(image.detach().float().cpu().numpy().tobytes()).hexdigest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        still = image[:, :, None]
        five = still.repeat(1, 1, REFERENCE_REPEAT, 1, 1)
        reference = self.inner.encode_video(five)[:, :, 1:]
        motion = self.inner.encode_video(five.repeat(1, 1, MOTION_FRAMES, 1, 1))
        out = S2VReference(reference=reference, motion=motion)
        self._cache[key] = out
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode_reference(image).reference

    def new_state(self, reference: S2VReference | None = None) -> LiveAvatarDecodeState:
        """A decode cache primed with the reference's first motion latents (output discarded);
        without a reference, an unprimed cache whose first block decodes to the same frame
        count (its first latent frame is a single frame)."""
        inner = self.inner.new_state()
        if reference is None:
            return LiveAvatarDecodeState(inner, drop=0)
        self.inner.decode_block(reference.motion[:, :, :DECODE_PRIME_LATENTS], inner)
        return LiveAvatarDecodeState(inner, drop=DROP_FIRST_FRAMES)

    def decode_block(self, latents: torch.Tensor, state: LiveAvatarDecodeState) -> torch.Tensor:
        video = self.inner.decode_block(latents, state.inner)
        if state.drop:
            video, state.drop = video[:, :, state.drop :], 0
        return video


# ---- loading --------------------------------------------------------------------------------------
def read_config(folder: Path) -> S2VConfig:
    """config.json of the release, with the sizes diffusers leaves out of it (text_dim,
    patch_size) read from the weights' shapes."""
    path = folder / CONFIG
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} has no {CONFIG}: not a Wan2.2-S2V-14B folder")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("model_type") != "s2v":
        kind = data.get("_class_name") or data.get("model_type") if isinstance(data, dict) else None
        raise ConfigError(
            f"{path} describes {kind or 'another model'}, not Wan2.2-S2V (model_type 's2v'); "
            "point --model liveavatar: at the Wan2.2-S2V-14B folder"
        )
    from models.checkpoints import checkpoint_keys, open_safetensors

    keys = checkpoint_keys(folder)
    for key, field_name, axis in (
        ("text_embedding.0.weight", "text_dim", 1),
        ("patch_embedding.weight", "patch_size", None),
    ):
        if field_name in data or key not in keys:
            continue
        with open_safetensors(keys[key]) as f:
            shape = f.get_slice(key).get_shape()
        data[field_name] = shape[axis] if axis is not None else list(shape[2:])
    return S2VConfig.from_dict(data)


def own_injectors(cfg: S2VConfig, layers: range) -> set[int]:
    """The audio injectors (by index) that run after one of `layers`."""
    from models.s2v import injector_slots

    return {slot for layer, slot in injector_slots(cfg.audio_inject_layers, cfg.num_layers).items()
            if layer in layers}  # fmt: skip


def layer_filter(layers: range | None, cfg: S2VConfig):
    """Checkpoint keys a rank running `layers` needs: its blocks, the audio injectors after
    them (~200 MB each in bf16 at 14B), and the small shared parts (embeddings, head, the audio
    encoder, the frame packer)."""
    if layers is None:
        return None
    keep = {str(i) for i in layers}
    slots = {str(j) for j in own_injectors(cfg, layers)}

    def accept(key: str) -> bool:
        if key.startswith("blocks."):
            return key.split(".", 2)[1] in keep
        if key.startswith(("audio_injector.injector.", "audio_injector.injector_adain_layers.")):
            return key.split(".", 3)[2] in slots
        return True

    return accept


def drop_other_layers(model: LiveAvatarTransformer, layers: range) -> None:
    """Replace the blocks and injectors a rank does not run by empty modules (before anything
    is allocated), so it holds only its share."""
    from torch import nn

    cfg = model.config
    mine = own_injectors(cfg, layers)
    for i in range(cfg.num_layers):
        if i not in layers:
            model.blocks[i] = nn.Identity()
    inj = model.audio_injector
    for j in range(len(inj.injector)):
        if j not in mine:
            inj.injector[j] = nn.Identity()
            if inj.injector_adain_layers is not None:
                inj.injector_adain_layers[j] = nn.Identity()


def load_liveavatar(
    folder: str | Path,
    *,
    lora: str | Path | None = None,
    lora_mode: str = "merged",
    lora_alpha: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    parts: tuple[str, ...] = PARTS,
    layers: range | None = None,
    text_encoder: str = "keep",
    audio_context_frames: int = 0,
    height: int = 384,
    width: int = 704,
) -> Any:
    """The released folders as a ModelBundle; see the module docstring for the layout."""
    from models.registry import ModelBundle

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(f"Live Avatar base folder not found: {folder}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"unknown model parts {sorted(unknown)}; parts are {', '.join(PARTS)}")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = read_config(folder)
    dit = None
    if "transformer" in parts:
        dit = _load_transformer(folder, cfg, lora, lora_mode, lora_alpha, device, dtype, layers)
    vae: Any = VAEGeometry()
    if "vae" in parts:
        from models.wan_vae_checkpoint import load_wan21_vae

        vae = LiveAvatarVAE(load_wan21_vae(folder / VAE_FILE, device=device, dtype=dtype))
    audio = None
    if "audio" in parts:
        from models.wav2vec import Wav2VecFeatures

        audio = Wav2VecFeatures(
            folder / WAV2VEC_DIR, context_frames=audio_context_frames, device=device, dtype=dtype
        )
    prompts = None
    context = torch.zeros(1, 1, cfg.text_dim, dtype=dtype)
    if "text" in parts:
        prompts = _prompt_encoder(folder, text_encoder, device, dtype)
        context = prompts.encode(DEFAULT_PROMPT)
    bundle = ModelBundle(
        name=f"liveavatar:{folder}",
        dit=dit,
        vae=vae,
        audio_encoder=audio,
        context=context,
        defaults=stream_defaults(height, width),
        vae_config={"kind": "wan2.1-pth"},
        trained=True,
    )
    bundle.text_encoder = prompts
    return bundle


TEXT_ENCODER_MODES = ("keep", "cpu", "offload", "free")


def _prompt_encoder(folder: Path, mode: str, device: torch.device, dtype: torch.dtype) -> Any:
    """umT5 for per-session prompts. keep: on the model's device; cpu: on the CPU (slow for a
    new prompt, no device memory); offload: on the CPU, moved to the device for each new prompt;
    free: the weights are dropped after the default prompt (then only that prompt works)."""
    from models.text_encoder import PromptEncoder

    if mode not in TEXT_ENCODER_MODES:
        raise ConfigError(
            f"text_encoder must be one of {', '.join(TEXT_ENCODER_MODES)}, got {mode!r}"
        )
    where = torch.device("cpu") if mode == "cpu" else device
    after = {"keep": "keep", "cpu": "keep", "offload": "offload", "free": "free"}[mode]
    return PromptEncoder.from_checkpoint(
        folder, device=where, dtype=dtype, after_encode=after, output_device=device
    )


def _load_transformer(
    folder: Path,
    cfg: S2VConfig,
    lora: str | Path | None,
    lora_mode: str,
    lora_alpha: float | None,
    device: torch.device,
    dtype: torch.dtype,
    layers: range | None,
) -> LiveAvatarTransformer:
    from models.checkpoints import load_sharded_safetensors

    with torch.device("meta"):
        model = LiveAvatarTransformer(cfg)
    accept = layer_filter(layers, cfg)
    if layers is not None:  # the other ranks' blocks and injectors are never materialised
        drop_other_layers(model, layers)
    if lora is not None:
        from models.lora import load_with_lora

        load_with_lora(
            model,
            folder,
            Path(lora).expanduser(),
            dtype=dtype,
            device=device,
            mode=lora_mode,
            key_filter=accept,
            alpha=lora_alpha,
        )
    else:
        load_sharded_safetensors(model, folder, dtype=dtype, device=device, key_filter=accept)
    return model.eval().requires_grad_(False)


# ---- random weights at the released sizes (speed and memory measurements) ----------------------
def build_liveavatar_random(
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    config: dict[str, Any] | None = None,
    height: int = 384,
    width: int = 704,
    name: str = "liveavatar-14b",
    parts: tuple[str, ...] = PARTS,
    layers: range | None = None,
) -> Any:
    """Live Avatar's architecture with random weights, built straight on `device`: the 14B
    transformer, Wan 2.1's VAE and wav2vec2-large at their released sizes (no prompt encoder:
    a random prompt embedding). For measuring speed and memory where the weights cannot be
    downloaded; its video is noise. `config` overrides S2VConfig fields (tests use a tiny one)."""
    from diffusers import AutoencoderKLWan
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from models.registry import ModelBundle
    from models.vae import WanStreamingVAE
    from models.wav2vec import Wav2VecFeatures

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = S2VConfig(**(config or {})).validate()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        dit = LiveAvatarTransformer(cfg)
    if layers is not None:  # a DualParal rank: the other ranks' layers are never allocated
        drop_other_layers(dit, layers)
    dit = dit.to(dtype=dtype).to_empty(device=device)  # never a float32 copy of 16B params
    with torch.no_grad():  # scale matters for the timing, values do not
        for p in dit.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / p[0].numel() ** 0.5)
            else:
                p.fill_(1.0 if p.ndim == 1 and p.shape[0] == cfg.dim else 0.0)
    small = cfg.dim < 1024
    wav_cfg = Wav2Vec2Config(
        hidden_size=cfg.audio_dim,
        num_hidden_layers=cfg.audio_feature_layers - 1,
        num_attention_heads=2 if small else 16,
        intermediate_size=2 * cfg.audio_dim if small else 4096,
        conv_dim=(8,) * 7 if small else (512,) * 7,
        num_conv_pos_embeddings=16 if small else 128,
        num_conv_pos_embedding_groups=2 if small else 16,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True
    )
    audio = None
    if "audio" in parts:
        with torch.random.fork_rng(devices=[]):  # the same weights in every process, every run
            torch.manual_seed(1)
            net = Wav2Vec2Model(wav_cfg).eval().requires_grad_(False)
        audio = Wav2VecFeatures(
            Path("<random>"), loaded=(extractor, net, wav_cfg), device=device, dtype=dtype
        )
    vae: Any = VAEGeometry()
    if "vae" in parts:
        vae_kwargs = {"base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1} if small else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            wan = AutoencoderKLWan(**vae_kwargs).eval()
        vae = LiveAvatarVAE(WanStreamingVAE(wan))
        vae.to(device=device, dtype=dtype)
    bundle = ModelBundle(
        name=name,
        dit=dit.eval().requires_grad_(False),
        vae=vae,
        audio_encoder=audio,
        context=torch.randn(1, 64, cfg.text_dim, generator=gen, device=device).to(dtype) * 0.1,
        defaults=stream_defaults(height, width),
        vae_config={"kind": "wan"},
        notice=f"{name}: Live Avatar's architecture with random weights (speed measurements only)",
    )
    return bundle


# ---- a tiny folder in the released layout (tests, smoke runs) -------------------------------------
TINY_CONFIG = dict(
    model_type="s2v",
    text_len=512,
    in_dim=16,
    dim=24,
    ffn_dim=32,
    freq_dim=16,
    out_dim=16,
    num_heads=2,
    num_layers=3,
    eps=1e-6,
    cond_dim=16,
    audio_dim=16,
    num_audio_token=4,
    enable_adain=True,
    adain_mode="attn_norm",
    audio_inject_layers=[0, 2],
    zero_init=True,
    zero_timestep=True,
    enable_motioner=False,
    add_last_motion=True,
    enable_tsm=False,
    trainable_token_pos_emb=False,
    motion_token_num=1024,
    enable_framepack=True,
    framepack_drop_mode="padd",
)


def write_tiny_liveavatar(base: str | Path, lora: str | Path | None = None, seed: int = 0) -> Path:
    """Write a tiny random Live Avatar in the exact released layout: config.json, two
    transformer shards with their index, Wan2.1_VAE.pth, the umT5 .pth and its tokenizer
    folder, the wav2vec2 folder, and (with `lora`) a LoRA folder holding liveavatar.safetensors.
    Loading it must report zero missing and zero unexpected keys."""
    from models.checkpoints import write_sharded_safetensors
    from models.lora import write_tiny_lora
    from models.text_encoder import write_tiny_umt5
    from models.wan_vae_checkpoint import write_tiny_wan21_vae
    from models.wav2vec import write_tiny_wav2vec

    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel_S2V", "_diffusers_version": "0.35.0", **TINY_CONFIG}
    (base / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    cfg = S2VConfig.from_dict({**TINY_CONFIG, "text_dim": 16})
    gen = torch.Generator().manual_seed(seed)
    model = LiveAvatarTransformer(cfg)
    state = {}
    for name, p in model.state_dict().items():
        scale = 1.0 / max(1, p[0].numel()) ** 0.5 if p.ndim >= 2 else 0.1
        value = torch.randn(p.shape, generator=gen) * scale
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            value = value + 1.0
        state[name] = value.contiguous()
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_sharded_safetensors(state, base, max_shard_bytes=total // 2 + 1)
    write_tiny_wan21_vae(base / VAE_FILE, seed=seed)
    write_tiny_umt5(base, seed=seed)
    write_tiny_wav2vec(base / WAV2VEC_DIR, seed=seed)
    if lora is not None:
        write_tiny_lora(Path(lora), state, rank=4, alpha=2.0, seed=seed)
    return base


def reference_hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
