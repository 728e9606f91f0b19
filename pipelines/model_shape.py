"""A model's sizes, read from its config alone (nothing big is loaded): what the planner
multiplies costs with (tokens, bytes of latents, hidden states and caches, parameters), and
what each part of the model needs where (pipelines/memory.py places them on devices).

Parameter counts come from the model built on the meta device; working memory (one forward
of a block, one block's decode) from running them on the meta device (pipelines/meta_memory.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.config import WanConfig, wan_1_3b_config, wan_14b_config
from models.errors import ModelNotFoundError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Where a part of the model lives (pipelines/memory.py says which devices have which places).
FIRST = "first"  # encodes audio (and prompts): the local device, a pipeline's first rank
SINK = "sink"  # builds a session's sink from the reference image itself
DECODE = "decode"  # decodes latents to frames: the local device, a pipeline's last rank


@dataclass(frozen=True)
class Component:
    """A network beside the transformer (audio or text encoder) and where it is held."""

    name: str
    params: int
    places: tuple[str, ...]
    source: str = ""  # where its size was read from
    config: Any = None  # its architecture's config (the profiler times it), when known


@dataclass(frozen=True)
class ModelShape:
    name: str
    config: Any  # WanConfig, or S2VConfig (family "s2v"): both name their sizes alike
    fps: float
    height: int
    width: int
    frames_per_block: int  # latent frames F
    steps: int
    window_frames: int
    video_frames: int  # video frames of a steady-state block
    first_video_frames: int
    latent_channels: int
    spatial_factor: int
    text_tokens: int
    audio_tokens: int  # audio tokens attended per latent frame
    vae_params: int
    dtype: str = "bfloat16"
    cache_mode: str = "reencode"
    vae_kind: str = "tiny"  # "tiny" or "wan"
    layer_params: tuple[int, ...] = ()  # per layer, with the audio modules that layer runs
    shared_params: int = 0  # embeddings, head, condition encoders
    family: str = "wan"  # "wan" (models/dit.py) or "s2v" (Live Avatar, models/s2v.py)
    audio_feature_shape: tuple[int, ...] = ()  # one block's audio features as sent to a rank
    vae_places: tuple[str, ...] = (SINK, DECODE)
    vae_config: Any = None  # AutoencoderKLWan's config when not the release's (vae_kind wan)
    temporal_factor: int = 4  # video frames per latent frame (after the first)
    components: tuple[Component, ...] = ()
    forward_working_bytes: int | None = None  # traced: one forward of one block, all layers
    decode_cache_bytes: int = 0  # traced: a session's decode cache (causal VAE)
    decode_working_bytes: int = 0  # traced: decoding one block, beyond that cache
    notes: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.spatial_factor, self.width // self.spatial_factor

    @property
    def grid(self) -> tuple[int, int]:
        _, ph, pw = self.config.patch_size
        h, w = self.latent_hw
        return h // ph, w // pw

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def sink_tokens(self) -> int:
        """Tokens of the sink: one latent frame (Wan), or Live Avatar's reference frame plus
        its packed motion tokens (LiveAvatarTransformer.sink_tokens)."""
        if self.family != "s2v":
            return self.tokens_per_frame
        from models.s2v import motion_positions

        gh, gw = self.grid
        motion = sum(len(f) * len(r) * len(c) for f, r, c in motion_positions(gh, gw))
        return gh * gw + motion

    @property
    def tokens_per_block(self) -> int:
        return self.tokens_per_frame * self.frames_per_block

    @property
    def dit_params(self) -> int:
        return self.shared_params + sum(self.layer_params)

    @property
    def block_seconds(self) -> float:
        return self.video_frames / self.fps

    @property
    def first_block_seconds(self) -> float:
        return self.first_video_frames / self.fps

    @property
    def latent_bytes(self) -> int:
        h, w = self.latent_hw
        return self.latent_channels * self.frames_per_block * h * w * self.bytes

    @property
    def hidden_bytes(self) -> int:
        return self.tokens_per_block * self.config.inner_dim * self.bytes

    @property
    def audio_bytes(self) -> int:
        """One block's audio features, as the first rank sends them to the others."""
        if not self.config.audio_layers:
            return 0
        if self.audio_feature_shape:
            return math.prod(self.audio_feature_shape) * self.bytes
        return self.frames_per_block * self.audio_tokens * self.config.audio_dim * self.bytes

    def kv_bytes(self, frames: int, layers: int) -> int:
        """Keys + values of `frames` latent frames for `layers` layers."""
        return 2 * frames * self.tokens_per_frame * self.config.inner_dim * self.bytes * layers

    def sink_kv_bytes(self, layers: int) -> int:
        """Keys + values of the sink for `layers` layers."""
        return 2 * self.sink_tokens * self.config.inner_dim * self.bytes * layers

    def prompt_kv_bytes(self, layers: int) -> int:
        """The prompt's cross-attention keys + values for `layers` layers (per session)."""
        return 2 * self.text_tokens * self.config.inner_dim * self.bytes * layers

    def activation_bytes(self, device: str = "cuda") -> int:
        """Working set of one forward of one block: traced on the meta device when known, else
        one layer's FFN and attention inputs; on CPU the SDPA math path also materialises the
        attention scores."""
        n, d = self.tokens_per_block, self.config.inner_dim
        kv = self.sink_tokens + (self.window_frames + self.frames_per_block) * self.tokens_per_frame
        if self.forward_working_bytes is not None:
            act = self.forward_working_bytes
        else:
            act = n * (self.config.ffn_dim + 8 * d) * self.bytes
        if device == "cpu":
            act += n * kv * self.config.num_attention_heads * 4
        return act


def meta_params(shape: ModelShape) -> tuple[tuple[int, ...], int]:
    """(parameters per layer, the rest) of the whole model, built on the meta device. A layer's
    count includes the audio modules applied after it (Live Avatar's injectors), since whoever
    runs the layer holds them."""
    from pipelines.probe import build_on_meta

    model = build_on_meta(shape)
    layers = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    injector = getattr(model, "audio_injector", None)
    for layer, slot in getattr(model, "slots", {}).items():
        parts = [injector.injector[slot]]
        if injector.injector_adain_layers is not None:
            parts.append(injector.injector_adain_layers[slot])
        layers[layer] += sum(p.numel() for m in parts for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return tuple(layers), total - sum(layers)


def _wan_vae_meta(folder_file: Path | None = None) -> Any:
    """The Wan 2.1 VAE as a streaming decoder on the meta device: diffusers' default config
    (the release), or the one a Wan2.1_VAE.pth's shapes give (memory-mapped, nothing read)."""
    if folder_file is not None:
        from models.wan_vae_checkpoint import load_wan21_vae

        return load_wan21_vae(folder_file, device="meta")
    from diffusers import AutoencoderKLWan

    from models.vae import WanStreamingVAE

    with torch.device("meta"):
        return WanStreamingVAE(AutoencoderKLWan().eval())


def _wan_vae_params() -> int:
    try:
        return sum(p.numel() for p in _wan_vae_meta().vae.parameters())
    except Exception:  # diffusers missing: Wan 2.1's VAE has about 127M parameters
        return 127_000_000


def trace_decode(vae: Any, shape: ModelShape) -> tuple[int, int]:
    """(a session's decode cache, the working set of decoding one steady block beyond it), by
    decoding two blocks of the real size on the meta device."""
    from pipelines.meta_memory import traced_bytes

    dtype = getattr(torch, shape.dtype)
    vae.to(dtype=dtype)
    h, w = shape.latent_hw
    z = torch.zeros(1, shape.latent_channels, shape.frames_per_block, h, w, device="meta")
    state = vae.new_state()
    with torch.inference_mode():
        vae.decode_block(z, state)  # the first block: the cache fills
    peak, _ = traced_bytes(lambda: vae.decode_block(z, state))
    cache = sum(
        t.numel() * t.element_size() for t in state.feat_cache if isinstance(t, torch.Tensor)
    )
    return cache, max(0, peak - cache)


def trace_forward(shape: ModelShape) -> int:
    """Peak bytes made by one forward of one block at the real size (4 layers of the real
    widths suffice: layers run one after another, so the peak is one layer's plus what the
    forward keeps across layers)."""
    from pipelines.meta_memory import traced_bytes
    from pipelines.probe import PROBE_LAYERS, build_on_meta, probe_block, probe_config

    dtype = getattr(torch, shape.dtype)
    model = build_on_meta(shape, probe_config(shape)).to(dtype)
    block = probe_block(model, shape, "meta", dtype, PROBE_LAYERS)
    peak, _ = traced_bytes(lambda: block.forward(model, range(PROBE_LAYERS)))
    return peak


def model_shape(
    model: str,
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    dtype: str = "bfloat16",
    cache_mode: str | None = None,
    text_encoder: str = "keep",
) -> ModelShape:
    """Sizes of a model by registry name or folder, without loading its weights.

    cache_mode None: the model's own (Live Avatar: timestep forcing; others: reencode).
    text_encoder: where Live Avatar's umT5 lives (models/liveavatar.py's modes: keep/offload
    on the first rank's device, cpu/free on no device)."""
    import dataclasses

    from models.audio import build_audio_encoder
    from models.registry import StreamDefaults
    from pipelines import liveavatar_shape

    if liveavatar_shape.is_liveavatar(model):
        parts = liveavatar_shape.liveavatar_parts(model, text_encoder=text_encoder)
        shape = _assemble(
            name=parts.name,
            cfg=parts.config,
            defaults=parts.defaults,
            vae=dict(
                channels=parts.vae.latent_channels,
                spatial=parts.vae.spatial_factor,
                temporal=parts.vae.temporal_factor,
                params=parts.vae_params,
                kind="wan",
            ),
            text_tokens=parts.config.text_len,
            audio_tokens=parts.config.num_audio_token + 1,  # + the learned padding token
            height=height,
            width=width,
            steps=steps,
            dtype=dtype,
            cache_mode=cache_mode or parts.defaults.pipeline.get("cache_mode", "reencode"),
        )
        shape = dataclasses.replace(
            shape,
            family="s2v",
            vae_config=dict(parts.vae.vae.config),
            audio_feature_shape=(
                shape.video_frames,
                parts.config.audio_feature_layers,
                parts.config.audio_dim,
            ),
            vae_places=(DECODE,),
            components=parts.components,
            notes=parts.notes,
        )
        liveavatar_shape.check_size(shape)
        return _traced(dataclasses.replace(shape, **_params(shape)), parts.vae)

    audio = build_audio_encoder("logmel", n_mels=40, tokens_per_latent_frame=4)
    name = model
    if model in ("wan-1.3b", "wan-14b"):
        make = wan_1_3b_config if model == "wan-1.3b" else wan_14b_config
        n = 30 if model == "wan-1.3b" else 40
        cfg = make(audio_dim=audio.feature_dim, audio_layers=tuple(range(0, n, 3)))
        defaults = StreamDefaults(fps=16.0, height=480, width=832, window_frames=6)
        vae = dict(channels=16, spatial=8, temporal=4, params=_wan_vae_params(), kind="wan")
        text_tokens, audio_tokens = 512, audio.tokens_per_latent_frame
    elif model in ("tiny", "default") or (Path(model) / "model.json").is_file():
        if model in ("tiny", "default") and not (Path(model) / "model.json").is_file():
            from models.registry import load_model

            bundle = load_model(model)
            cfg, defaults = bundle.dit.config, bundle.defaults
            name = bundle.name
            vae = dict(
                channels=bundle.vae.latent_channels,
                spatial=bundle.vae.spatial_factor,
                temporal=bundle.vae.temporal_factor,
                params=sum(p.numel() for p in bundle.vae.parameters()),
            )
            text_tokens = bundle.context.shape[1]
            audio_tokens = getattr(bundle.audio_encoder, "tokens_per_latent_frame", 0)
        else:
            meta = json.loads((Path(model) / "model.json").read_text())
            cfg = WanConfig.from_dict(meta["dit"])
            defaults = StreamDefaults(**meta.get("defaults", {}))
            from models.vae import TinyAutoencoder

            tiny_vae = TinyAutoencoder(**meta.get("vae", {}))
            vae = dict(
                channels=tiny_vae.latent_channels,
                spatial=tiny_vae.spatial_factor,
                temporal=tiny_vae.temporal_factor,
                params=sum(p.numel() for p in tiny_vae.parameters()),
            )
            text_tokens = 4
            audio_tokens = int(meta.get("audio", {}).get("tokens_per_latent_frame", 4))
    elif (Path(model) / "transformer" / "config.json").is_file():
        data = json.loads((Path(model) / "transformer" / "config.json").read_text())
        cfg = WanConfig.from_dict(data)
        defaults = StreamDefaults(fps=16.0, height=480, width=832)
        vae = dict(channels=16, spatial=8, temporal=4, params=_wan_vae_params(), kind="wan")
        text_tokens, audio_tokens = 512, audio.tokens_per_latent_frame
        name = Path(model).name
    else:
        raise ModelNotFoundError(
            f"model {model!r} is neither tiny, default, wan-1.3b, wan-14b, "
            f"{liveavatar_shape.NAME}, liveavatar:DIR nor a model folder"
        )
    shape = _assemble(
        name=name,
        cfg=cfg,
        defaults=defaults,
        vae=vae,
        text_tokens=text_tokens,
        audio_tokens=audio_tokens,
        height=height,
        width=width,
        steps=steps,
        dtype=dtype,
        cache_mode=cache_mode or "reencode",
    )
    shape = dataclasses.replace(shape, **_params(shape))
    vae_meta = None
    if shape.vae_kind == "wan":
        try:
            vae_meta = _wan_vae_meta()
        except ImportError:  # diffusers missing: the decode cache is left out
            vae_meta = None
    return _traced(shape, vae_meta)


def _assemble(
    *,
    name: str,
    cfg: Any,
    defaults: Any,
    vae: dict[str, Any],
    text_tokens: int,
    audio_tokens: int,
    height: int | None,
    width: int | None,
    steps: int | None,
    dtype: str,
    cache_mode: str,
) -> ModelShape:
    f = defaults.frames_per_block
    t = vae["temporal"]
    return ModelShape(
        name=name,
        config=cfg,
        fps=defaults.fps,
        height=height or defaults.height,
        width=width or defaults.width,
        frames_per_block=f,
        steps=steps or defaults.steps,
        window_frames=defaults.window_frames,
        video_frames=t * f,
        first_video_frames=1 + t * (f - 1),
        latent_channels=vae["channels"],
        spatial_factor=vae["spatial"],
        text_tokens=text_tokens,
        audio_tokens=audio_tokens,
        vae_params=vae["params"],
        dtype=dtype,
        cache_mode=cache_mode,
        vae_kind=str(vae.get("kind", "tiny")),
        temporal_factor=t,
    )


def _params(shape: ModelShape) -> dict[str, Any]:
    layer_params, shared = meta_params(shape)
    return dict(layer_params=layer_params, shared_params=shared)


def _traced(shape: ModelShape, vae: Any | None) -> ModelShape:
    """The shape with its working sets traced on the meta device."""
    import dataclasses

    cache = work = 0
    if vae is not None:
        cache, work = trace_decode(vae, shape)
    return dataclasses.replace(
        shape,
        forward_working_bytes=trace_forward(shape),
        decode_cache_bytes=cache,
        decode_working_bytes=work,
    )
