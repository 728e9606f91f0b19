"""Load a model by name or path into a `ModelBundle` (transformer + autoencoder + audio front end).

Names:
  default        the embedded default model shipped in models/default/ (falls back to `tiny`,
                 with a notice, while no trained weights are shipped)
  tiny           a small randomly initialised config (seeded, so the same on every machine)
  wan-1.3b       Wan 2.1 1.3B architecture with random weights and Wan's VAE (benchmarks)
  wan-14b        Wan 14B (dim 5120, 40 layers) architecture with random weights (benchmarks)
  av-probe       a test instrument: each frame's brightness is the loudness of the audio that
                 drove it (models/av_probe.py), for checking A/V pairing end to end
  liveavatar:DIR Live Avatar: the Wan2.2-S2V-14B folder as released (models/liveavatar.py),
                 with its LoRA folder given as the `lora` load option (--lora)
Paths:
  a folder with model.json                this project's format (see ModelBundle.save)
  a folder with transformer/config.json   diffusers' Wan layout (transformer/, vae/), weights
                                          loaded with the identity key map; optional
                                          context.safetensors holds precomputed prompt tokens
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.config import WanConfig, tiny_config, wan_1_3b_config, wan_14b_config
from models.dit import CausalWanTransformer
from models.errors import ConfigError, ModelNotFoundError

DEFAULT_DIR = Path(__file__).resolve().parent / "default"


@dataclass
class StreamDefaults:
    """Pipeline settings that belong to a model (it was trained for them)."""

    fps: float = 25.0
    height: int = 128
    width: int = 128
    audio_sample_rate: int = 16000
    frames_per_block: int = 3
    steps: int = 4
    shift: float = 5.0
    window_frames: int = 6
    sink_distance: int = 3
    context_timestep: float = 0.0
    pipeline: dict[str, Any] = field(default_factory=dict)  # other PipelineConfig fields


@dataclass
class ModelBundle:
    name: str
    dit: CausalWanTransformer
    vae: Any  # models.vae.StreamingVAE
    audio_encoder: Any | None  # models.audio.AudioEncoder
    context: torch.Tensor  # [1, L, text_dim] condition tokens
    defaults: StreamDefaults
    audio_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] = field(default_factory=dict)
    trained: bool = False
    notice: str = ""
    text_encoder: Any | None = None  # models.text_encoder.PromptEncoder: per-session prompts

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelBundle:
        if self.dit is not None:
            self.dit.to(device=device, dtype=dtype)
        if isinstance(self.vae, torch.nn.Module) or hasattr(self.vae, "to"):
            self.vae.to(device=device, dtype=dtype)
        if self.audio_encoder is not None and hasattr(self.audio_encoder, "to"):
            self.audio_encoder.to(device=device, dtype=dtype)
        return self

    def save(self, path: str | Path) -> None:
        """Write this project's format: model.json + dit/vae/context safetensors."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "diffstream/1",
            "name": self.name,
            "trained": self.trained,
            "dit": self.dit.config.to_dict(),
            "vae": self.vae_config,
            "audio": self.audio_config,
            "defaults": asdict(self.defaults),
        }
        (path / "model.json").write_text(json.dumps(meta, indent=2))
        save_file(
            {k: v.contiguous() for k, v in self.dit.state_dict().items()}, path / "dit.safetensors"
        )
        save_file(
            {k: v.contiguous() for k, v in self.vae.state_dict().items()}, path / "vae.safetensors"
        )
        save_file({"context": self.context.contiguous()}, path / "context.safetensors")


def _tiny_vae(**kw: Any):
    from models.vae import TinyAutoencoder

    return TinyAutoencoder(**kw)


def _he_init(module: torch.nn.Module, seed: int) -> None:
    """He-normal convolutions: with PyTorch's default init a random decoder shrinks its signal
    layer by layer to a flat grey frame; this keeps random output contrasted (noise-like), so
    tests that tell frames apart see real differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.ConvTranspose2d):  # weight [in, out, k, k]
                fan_in = m.in_channels * (m.kernel_size[0] // m.stride[0]) ** 2
            elif isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
            else:
                continue
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def _logmel(**kw: Any):
    from models.audio import build_audio_encoder

    return build_audio_encoder("logmel", **kw)


def build_tiny(seed: int = 0, **overrides: Any) -> ModelBundle:
    """The tiny random config: 2 layers, 128x128, audio at every layer; same weights everywhere.
    `overrides` replace tiny_config fields (num_layers, audio_layers, ...)."""
    torch.manual_seed(seed)
    overrides.setdefault("audio_layers", tuple(range(overrides.get("num_layers", 2))))
    audio_cfg = {"name": "logmel", "n_mels": 40, "tokens_per_latent_frame": 4}
    audio = _logmel(**{k: v for k, v in audio_cfg.items() if k != "name"})
    vae_cfg: dict[str, Any] = {"latent_channels": 8}
    vae = _tiny_vae(**vae_cfg)
    _he_init(vae, seed)
    cfg = tiny_config(
        in_channels=8,
        out_channels=8,
        audio_dim=audio.feature_dim,
        **overrides,
    )
    dit = CausalWanTransformer(cfg).eval()
    context = torch.randn(1, 4, cfg.text_dim)
    return ModelBundle(
        name="tiny",
        dit=dit,
        vae=vae.eval(),
        audio_encoder=audio,
        context=context,
        defaults=StreamDefaults(),
        audio_config=audio_cfg,
        vae_config=vae_cfg,
        notice=model_notice("tiny"),
    )


def _wan_vae_random():
    from diffusers import AutoencoderKLWan

    from models.vae import WanStreamingVAE

    return WanStreamingVAE(AutoencoderKLWan().eval())


def build_wan_random(size: str = "1.3b", height: int = 480, width: int = 832) -> ModelBundle:
    """Wan architecture with random weights, for benchmarks (no download possible or needed)."""
    torch.manual_seed(0)
    audio_cfg = {"name": "logmel", "n_mels": 40, "tokens_per_latent_frame": 4}
    audio = _logmel(n_mels=40, tokens_per_latent_frame=4)
    make = wan_1_3b_config if size == "1.3b" else wan_14b_config
    layers = 30 if size == "1.3b" else 40
    cfg = make(audio_dim=audio.feature_dim, audio_layers=tuple(range(0, layers, 3)))
    with torch.device("meta"):
        dit = CausalWanTransformer(cfg)
    dit = dit.to_empty(device="cpu")
    _init_random(dit)
    return ModelBundle(
        name=f"wan-{size}",
        dit=dit.eval(),
        vae=_wan_vae_random(),
        audio_encoder=audio,
        context=torch.randn(1, 512, cfg.text_dim) * 0.1,
        defaults=StreamDefaults(fps=16.0, height=height, width=width, window_frames=6),
        audio_config=audio_cfg,
        vae_config={"kind": "wan"},
        notice=model_notice(f"wan-{size}"),
    )


def _init_random(module: torch.nn.Module) -> None:
    """Cheap deterministic init for benchmark-only models (values do not matter, scale does)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif "norm" in name or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def load_diffusers_transformer(folder: str | Path, **audio: Any) -> CausalWanTransformer:
    """Load diffusers' WanTransformer3DModel weights (config.json + safetensors shards)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json (expected a diffusers transformer folder)"
        )
    data = json.loads(cfg_path.read_text())
    data.update(audio)
    cfg = WanConfig.from_dict(data)
    with torch.device("meta"):
        model = CausalWanTransformer(cfg)
    state: dict[str, torch.Tensor] = {}
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelNotFoundError(f"{folder} has no .safetensors weights")
    for shard in shards:
        state.update(load_file(shard))
    missing, unexpected = _load_state(model, state)
    bad_missing = [k for k in missing if "audio_" not in k]  # audio modules are our addition
    if unexpected or bad_missing:
        raise ConfigError(
            f"weights in {folder} do not match the config: missing {bad_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()


def _load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """Load with assign=True (works from meta tensors); new audio modules keep a fresh init."""
    result = model.load_state_dict(state, strict=False, assign=True)
    # Parameters not in the file are still on the meta device: give them real, initialised storage.
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            leaf = name.rsplit(".", 1)[-1]
            fresh = torch.empty(p.shape, dtype=torch.float32)
            if leaf == "weight" and p.ndim >= 2:
                torch.nn.init.xavier_uniform_(fresh)
            elif leaf == "weight":
                fresh.fill_(1.0)
            else:
                fresh.zero_()
            if ".audio_attn.to_out.0." in name:
                fresh.zero_()  # audio starts as a no-op on a pretrained video model
            setattr(owner, leaf, torch.nn.Parameter(fresh))
    return list(result.missing_keys), list(result.unexpected_keys)


def load_bundle_dir(path: Path) -> ModelBundle:
    """This project's own format (written by ModelBundle.save)."""
    try:
        meta = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read {path / 'model.json'}: {exc}") from None
    cfg = WanConfig.from_dict(meta["dit"])
    dit = CausalWanTransformer(cfg)
    _strict_load(dit, path / "dit.safetensors")
    vae_cfg = dict(meta.get("vae", {}))
    vae = _tiny_vae(**vae_cfg)
    _strict_load(vae, path / "vae.safetensors")
    audio_cfg = dict(meta.get("audio", {}))
    audio = _logmel(**{k: v for k, v in audio_cfg.items() if k != "name"}) if audio_cfg else None
    context = load_file(path / "context.safetensors")["context"]
    return ModelBundle(
        name=str(meta.get("name", path.name)),
        dit=dit.eval(),
        vae=vae.eval(),
        audio_encoder=audio,
        context=context,
        defaults=StreamDefaults(**meta.get("defaults", {})),
        audio_config=audio_cfg,
        vae_config=vae_cfg,
        trained=bool(meta.get("trained", False)),
    )


def _strict_load(module: torch.nn.Module, file: Path) -> None:
    if not file.is_file():
        raise ModelNotFoundError(f"weights file {file} is missing")
    state = load_file(file)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{file} does not match its model.json: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def load_diffusers_wan(path: Path) -> ModelBundle:
    """diffusers' Wan pipeline folder: transformer/ (+ vae/, optional context.safetensors)."""
    from models.vae import load_wan_vae

    audio = _logmel(n_mels=40, tokens_per_latent_frame=4)
    dit = load_diffusers_transformer(path / "transformer")
    vae = load_wan_vae(path / "vae")
    ctx_file = path / "context.safetensors"
    if ctx_file.is_file():
        context = load_file(ctx_file)["context"]
    else:
        context = torch.zeros(1, 1, dit.config.text_dim)
    return ModelBundle(
        name=path.name,
        dit=dit,
        vae=vae,
        audio_encoder=audio if dit.config.audio_layers else None,
        context=context,
        defaults=StreamDefaults(fps=16.0, height=480, width=832),
        vae_config={"kind": "wan"},
        trained=True,
    )


NAMES = ("default", "tiny", "wan-1.3b", "wan-14b", "liveavatar-14b", "liveavatar-tiny", "av-probe")
LIVEAVATAR_PREFIX = "liveavatar:"
# Options of load_model (and of --model on the command line) beyond the model's name.
LOAD_OPTIONS = ("lora", "lora_mode", "lora_alpha", "text_encoder", "audio_context_frames")


def model_exists(name_or_path: str) -> bool:
    """Without loading anything: is this a known name or an existing folder?"""
    if name_or_path in NAMES:
        return True
    if name_or_path.startswith(LIVEAVATAR_PREFIX):
        name_or_path = name_or_path[len(LIVEAVATAR_PREFIX) :]
    return Path(name_or_path).expanduser().exists()


def model_notice(name_or_path: str) -> str:
    """The notice `load_model` would attach (random weights), without loading anything."""
    if name_or_path == "default" and not (DEFAULT_DIR / "model.json").is_file():
        return (
            "default: no trained weights are shipped yet, so the default is the tiny randomly "
            "initialised config (its output is noise-like, not a face)"
        )
    if name_or_path == "tiny":
        return "tiny: randomly initialised weights (the output is noise-like, not a face)"
    if name_or_path in ("wan-1.3b", "wan-14b"):
        return f"{name_or_path}: Wan architecture with random weights (for speed measurements only)"
    if name_or_path in ("liveavatar-14b", "liveavatar-tiny"):
        return f"{name_or_path}: Live Avatar's architecture with random weights (speed only)"
    return ""


def _s2v_fields() -> set[str]:
    import dataclasses

    from models.s2v import S2VConfig

    return {f.name for f in dataclasses.fields(S2VConfig)}


S2V_FIELDS = _s2v_fields()


def model_num_layers(name_or_path: str) -> int:
    """Transformer layers of a model, without loading a big one (DualParal splits by it)."""
    if name_or_path in ("liveavatar-14b", "liveavatar-tiny"):
        from models.liveavatar import TINY_CONFIG
        from models.s2v import S2VConfig

        return S2VConfig().num_layers if name_or_path.endswith("14b") else TINY_CONFIG["num_layers"]
    path = (
        name_or_path[len(LIVEAVATAR_PREFIX) :]
        if name_or_path.startswith(LIVEAVATAR_PREFIX)
        else name_or_path
    )
    if name_or_path.startswith(LIVEAVATAR_PREFIX) or _is_s2v_folder(Path(path).expanduser()):
        from models.liveavatar import read_config

        return read_config(Path(path).expanduser()).num_layers
    return load_model(name_or_path).dit.config.num_layers


def _is_s2v_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "s2v"
    except (OSError, ValueError, AttributeError):
        return False


def load_model(
    name_or_path: str = "default",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    parts: tuple[str, ...] | None = None,
    layers: range | None = None,
    **options: Any,
) -> ModelBundle:
    """Resolve a model name or a folder to a ModelBundle. Small models load on the CPU (move
    them with `.to`); Live Avatar loads straight onto `device` in `dtype`, only the `parts` a
    pipeline rank needs (transformer, vae, audio, text) and, with `layers`, only those blocks."""
    unknown = set(options) - set(LOAD_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    if name_or_path.startswith(LIVEAVATAR_PREFIX):
        from models.liveavatar import PARTS, load_liveavatar

        return load_liveavatar(
            name_or_path[len(LIVEAVATAR_PREFIX) :],
            device=device,
            dtype=dtype,
            parts=parts or PARTS,
            layers=layers,
            **{k: v for k, v in options.items() if v is not None},
        )
    if name_or_path in ("liveavatar-14b", "liveavatar-tiny"):
        from models.liveavatar import TINY_CONFIG, build_liveavatar_random

        share = {"parts": parts or ("transformer", "vae", "audio", "text"), "layers": layers}
        if name_or_path == "liveavatar-14b":
            return build_liveavatar_random(device, dtype, **share)
        tiny = {k: v for k, v in TINY_CONFIG.items() if k in S2V_FIELDS}
        return build_liveavatar_random(
            device,
            dtype,
            config={**tiny, "text_dim": 16},
            height=64,
            width=64,
            name=name_or_path,
            **share,
        )
    if options.get("lora") is not None:
        raise ConfigError(
            f"--lora applies to Live Avatar (--model liveavatar:DIR), not to {name_or_path!r}"
        )
    if name_or_path == "default":
        if (DEFAULT_DIR / "model.json").is_file():
            bundle = load_bundle_dir(DEFAULT_DIR)
            bundle.name = "default"
            return bundle
        bundle = build_tiny()
        bundle.name = "default"
        bundle.notice = model_notice("default")
        return bundle
    if name_or_path == "tiny":
        return build_tiny()
    if name_or_path == "av-probe":  # a test instrument (models/av_probe.py)
        from models.av_probe import build_av_probe

        return build_av_probe()
    if name_or_path in ("wan-1.3b", "wan-14b"):
        return build_wan_random(name_or_path.split("-")[1])
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither a known name ({', '.join(NAMES)}) nor an "
            "existing folder"
        )
    if (path / "model.json").is_file():
        return load_bundle_dir(path)
    if (path / "transformer" / "config.json").is_file():
        return load_diffusers_wan(path)
    if _is_s2v_folder(path):
        return load_model(
            LIVEAVATAR_PREFIX + str(path),
            device=device,
            dtype=dtype,
            parts=parts,
            layers=layers,
            **options,
        )
    raise ModelNotFoundError(
        f"{path} holds neither model.json (diffstream format) nor transformer/config.json "
        "(diffusers Wan layout)"
    )
