"""Which multi-device strategy fits which hardware: predicted fps, latency and memory per device.

Inputs are measured, not assumed: per-step, per-layer, decode and audio-feature seconds of one
block on one device (from `diffstream bench --json`, or from the small profiler here, which times
single layers of the model's real sizes on the current device), plus a link model:

    seconds per message = latency + bytes * 8 / (Gb/s * 1e9)

From them, for N devices (each strategy's layout is the executors' own):

* local      one device runs features, S steps (+ the re-encode pass in reencode mode), decode.
* tpp        N-1 step ranks (contiguous step ranges) + 1 decode rank; the slowest stage, hop
             included, sets the period; latency is the sum of the stages.
* dualparal  N-1 layer ranks + 1 decode rank; an iteration sends the queue's S blocks through the
             ring of layer ranks: period max(S * slowest stage, one block's trip around the ring);
             a block stays S iterations, and live audio arrives one block per block duration, so
             the first frame waits S-1 extra blocks of audio.
* tpp+layers (prediction only, not implemented) every TPP step stage split by layers too.

Time to first frame = the first block's audio (it must be heard before it is generated) + the
first block's compute latency (+ the extra audio DualParal's queue needs). `cores` models CPU
"devices" sharing fewer cores (the CPU tests): all busy time divided by the cores bounds the
period from below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.config import WanConfig, wan_1_3b_config, wan_14b_config
from models.errors import ConfigError, ModelNotFoundError

STRATEGIES = ("local", "tpp", "dualparal", "tpp+layers")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# ---------------------------------------------------------------------------------------------
# What the model looks like (from its config only: nothing big is loaded)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    config: WanConfig
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
    audio_tokens: int  # audio tokens per latent frame
    vae_params: int
    dtype: str = "bfloat16"
    cache_mode: str = "reencode"
    vae_kind: str = "tiny"  # "tiny" or "wan"
    layer_params: tuple[int, ...] = ()
    shared_params: int = 0  # embedding, head, condition embedders

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.spatial_factor, self.width // self.spatial_factor

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.config.patch_size
        h, w = self.latent_hw
        return (h // ph) * (w // pw)

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
        if not self.config.audio_layers:
            return 0
        return self.frames_per_block * self.audio_tokens * self.config.audio_dim * self.bytes

    def kv_bytes(self, frames: int, layers: int) -> int:
        """Keys + values of `frames` latent frames for `layers` layers."""
        return 2 * frames * self.tokens_per_frame * self.config.inner_dim * self.bytes * layers

    def activation_bytes(self, device: str = "cuda") -> int:
        """Working set of one layer's forward of one block (FFN and attention inputs); on CPU the
        SDPA math path also materialises the attention scores."""
        n, d = self.tokens_per_block, self.config.inner_dim
        kv = (1 + self.window_frames + self.frames_per_block) * self.tokens_per_frame
        act = n * (self.config.ffn_dim + 8 * d) * self.bytes
        if device == "cpu":
            act += n * kv * self.config.num_attention_heads * 4
        return act


def _meta_params(cfg: WanConfig) -> tuple[tuple[int, ...], int]:
    from models.dit import CausalWanTransformer

    with torch.device("meta"):
        model = CausalWanTransformer(cfg)
    layers = tuple(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    total = sum(p.numel() for p in model.parameters())
    return layers, total - sum(layers)


def _wan_vae_params() -> int:
    try:
        from diffusers import AutoencoderKLWan

        with torch.device("meta"):
            return sum(p.numel() for p in AutoencoderKLWan().parameters())
    except Exception:  # diffusers missing: Wan 2.1's VAE has about 127M parameters
        return 127_000_000


def model_shape(
    model: str,
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    dtype: str = "bfloat16",
    cache_mode: str = "reencode",
) -> ModelShape:
    """Sizes of a model by registry name or folder, without loading its weights."""
    from models.audio import build_audio_encoder
    from models.registry import StreamDefaults

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
            f"model {model!r} is neither tiny, default, wan-1.3b, wan-14b nor a model folder"
        )
    layer_params, shared = _meta_params(cfg)
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
        layer_params=layer_params,
        shared_params=shared,
    )


# ---------------------------------------------------------------------------------------------
# What one block costs on one device
# ---------------------------------------------------------------------------------------------


@dataclass
class Costs:
    """Seconds per block on one device (medians)."""

    step_s: float  # one denoising step: embedding + all layers + head + Euler
    layer_plain_s: float  # one layer without audio cross-attention
    layer_audio_s: float  # one layer with it
    overhead_s: float  # per forward: fixed part + embedding + head
    decode_s: float
    features_s: float
    reencode_s: float = 0.0  # the clean re-encode pass (reencode mode only)
    forward_fixed_s: float = 0.0  # the part of overhead_s every rank pays per forward call
    device: str = "cpu"
    dtype: str = "float32"
    source: str = ""
    peak_memory_bytes: float | None = None

    def layers_s(self, shape: ModelShape, layers: range) -> float:
        audio = set(shape.config.audio_layers)
        return sum(self.layer_audio_s if i in audio else self.layer_plain_s for i in layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def costs_from_bench(data: dict[str, Any], shape: ModelShape) -> Costs:
    """Costs from `diffstream bench --json`. Bench times whole steps; without a per-layer split
    each layer is charged step/L (what matters for DualParal's balance is the ratio)."""
    steps = data.get("denoise_step_s") or [data["denoise_s"] / max(1, data.get("steps", 1))]
    step = statistics.median(steps)
    layer = step / shape.config.num_layers
    peak = data.get("peak_memory_mb")
    return Costs(
        step_s=step,
        layer_plain_s=layer,
        layer_audio_s=layer,
        overhead_s=0.0,
        decode_s=float(data.get("decode_s", 0.0)),
        features_s=float(data.get("features_s", 0.0)),
        reencode_s=float(data.get("cache_update_s", 0.0)),
        device=str(data.get("device", "?")),
        dtype=str(data.get("dtype", "?")),
        source="diffstream bench --json",
        peak_memory_bytes=peak * 2**20 if peak is not None else None,
    )


def _median_time(fn: Any, repeats: int, sync: Any) -> float:
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def probe_shape(shape: ModelShape, frames: int | None = None, downscale: int = 1) -> ModelShape:
    """A smaller block to time on a slow device: fewer latent frames, a coarser token grid
    (height and width / downscale, kept divisible by the autoencoder and the patch)."""
    unit = shape.spatial_factor * max(shape.config.patch_size[1:])
    h = max(unit, (shape.height // max(1, downscale)) // unit * unit)
    w = max(unit, (shape.width // max(1, downscale)) // unit * unit)
    f = min(frames or shape.frames_per_block, shape.frames_per_block)
    window = shape.window_frames // shape.frames_per_block * f
    return dataclasses.replace(shape, height=h, width=w, frames_per_block=f, window_frames=window)


def _time_ranges(
    shape: ModelShape, probe: ModelShape, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[tuple[int, int], float]:
    """Median seconds of layer ranges of a 4-layer model [plain, audio, plain, plain] with the
    real widths, on a block of `probe`'s size, with a full history and sink."""
    from models.dit import AttentionPlan, CausalWanTransformer
    from models.kv_cache import KVCache

    cfg = shape.config
    small = dataclasses.replace(cfg, num_layers=4, audio_layers=(1,) if cfg.audio_layers else ())
    torch.manual_seed(0)
    model = CausalWanTransformer(small).to(device=device, dtype=dtype).eval()
    f, window = probe.frames_per_block, probe.window_frames
    h, w = probe.latent_hw
    latent = torch.randn(1, cfg.in_channels, f, h, w, device=device, dtype=dtype)
    context = model.prepare_context(torch.randn(1, shape.text_tokens, cfg.text_dim, device=device))
    audio = None
    if cfg.audio_layers:
        feats = torch.randn(1, f, shape.audio_tokens, cfg.audio_dim, device=device, dtype=dtype)
        audio = model.prepare_audio(feats)
    cache = KVCache.allocate(
        layers=4,
        batch=1,
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        tokens_per_frame=probe.tokens_per_frame,
        window_frames=window,
        sink_frames=1,
        frames_per_block=f,
        device=device,
        dtype=dtype,
    )
    for t in cache.tensors():
        t.normal_()
    cache.filled_frames, cache.has_sink = window, True
    positions = torch.arange(window, window + f, device=device)
    rope = model.rotary(positions, h, w)
    plan = AttentionPlan(cache=cache, read_history=True, sink_position=window + 3)
    timestep = torch.full((1,), 500.0, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        # Any hidden state of the right shape will do as the input of a later layer range.
        hidden = model(
            latent, timestep, context, audio=audio, plan=plan, rope=rope, layers=range(1)
        )
        for a, b in ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4)):
            out[a, b] = _median_time(
                lambda a=a, b=b: model(
                    latent,
                    timestep,
                    context,
                    audio=audio,
                    plan=plan,
                    rope=rope,
                    layers=range(a, b),
                    hidden=hidden if a > 0 else None,
                ),
                repeats,
                sync,
            )
    return out


def _solve(t: dict[tuple[int, int], float]) -> tuple[float, float, float, float, float]:
    """T(a,b) = c + its layers + embedding (a = 0) + head (b = 4) → (c, audio, plain, e, h)."""
    c = max(0.0, (t[1, 2] + t[2, 3] - (t[0, 4] - t[0, 1] - t[3, 4])) / 3)
    plain = max(0.0, t[2, 3] - c)
    return (
        c,
        max(0.0, t[1, 2] - c),
        plain,
        max(0.0, t[0, 1] - c - plain),
        max(0.0, t[3, 4] - c - plain),
    )


def profile_costs(
    shape: ModelShape,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    frames: int | None = None,
    downscale: int = 1,
    repeats: int = 5,
    decode: bool = True,
) -> Costs:
    """Time single layers of the model's real sizes on `device` (random weights: speed does not
    depend on values); timing layer ranges of a 4-layer model separates one plain layer, one
    audio layer, the embedding, the head and the fixed per-forward overhead.

    With `frames` < F or `downscale` > 1 a smaller block is timed (a big model on a slow device):
    two probe sizes fit time = fixed + per-FLOP cost per layer, extrapolated to the real block.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = shape.config
    has_audio = bool(cfg.audio_layers)
    probe = probe_shape(shape, frames, downscale)
    c, audio_layer, plain, embed, head = _solve(_time_ranges(shape, probe, device, dtype, repeats))
    if probe != shape:
        small = probe_shape(shape, 1, 2 * max(1, downscale))
        c2, audio2, plain2, _, _ = _solve(_time_ranges(shape, small, device, dtype, repeats))

        def extrapolate(t_big: float, t_small: float, audio: bool) -> float:
            f_big, f_small = (
                sum(layer_flops(probe, audio=audio)),
                sum(layer_flops(small, audio=audio)),
            )
            f_real = sum(layer_flops(shape, audio=audio))
            per_flop = max(0.0, (t_big - t_small) / max(1.0, f_big - f_small))
            fixed = max(0.0, t_big - per_flop * f_big)
            return fixed + per_flop * f_real

        plain = extrapolate(plain, plain2, False)
        audio_layer = extrapolate(audio_layer, audio2, True)
        tokens = shape.tokens_per_block / probe.tokens_per_block
        embed, head = embed * tokens, head * tokens
    if not has_audio:
        audio_layer = plain
    overhead = c + embed + head
    n_audio = len(cfg.audio_layers)
    step = overhead + n_audio * audio_layer + (cfg.num_layers - n_audio) * plain
    decode_s, features_s = (0.0, 0.0)
    if decode:
        decode_s, features_s = _profile_vae_and_audio(shape, device, dtype, repeats)
    what = (
        "the real block"
        if probe == shape
        else f"{probe.frames_per_block} latent frames at {probe.width}x{probe.height}, "
        "extrapolated by FLOPs"
    )
    return Costs(
        step_s=step,
        layer_plain_s=plain,
        layer_audio_s=audio_layer,
        overhead_s=overhead,
        forward_fixed_s=c,
        decode_s=decode_s,
        features_s=features_s,
        reencode_s=step,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        source=f"profiled on {device}, {what}, {torch.get_num_threads()} threads",
    )


def layer_flops(shape: ModelShape, *, audio: bool) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one layer's forward of one block of `shape`."""
    cfg = shape.config
    d, tpf = cfg.inner_dim, shape.tokens_per_frame
    n = shape.frames_per_block * tpf
    kv = (1 + shape.window_frames + shape.frames_per_block) * tpf
    lin = 2 * n * d * d * 4 + 2 * n * d * d * 2 + 2 * 2 * n * d * cfg.ffn_dim
    attn = 4 * n * kv * d + 4 * n * shape.text_tokens * d
    if audio:
        lin += 2 * n * d * d * 2
        attn += 4 * n * shape.audio_tokens * d
    return float(lin), float(attn)


def _flop_ratio(shape: ModelShape, probe: ModelShape, *, audio: bool) -> float:
    return sum(layer_flops(shape, audio=audio)) / sum(layer_flops(probe, audio=audio))


def _profile_vae_and_audio(
    shape: ModelShape, device: torch.device, dtype: torch.dtype, repeats: int
) -> tuple[float, float]:
    """Decode of one block with the model's autoencoder and audio features of one block."""
    import numpy as np

    from models.audio import build_audio_encoder

    h, w = shape.latent_hw
    if shape.vae_kind == "wan":
        from diffusers import AutoencoderKLWan

        from models.vae import WanStreamingVAE

        vae = WanStreamingVAE(AutoencoderKLWan().eval())
    else:
        from models.vae import TinyAutoencoder

        vae = TinyAutoencoder(latent_channels=shape.latent_channels)
    vae.to(device=device, dtype=dtype)
    state = vae.new_state()
    z = torch.randn(
        1, shape.latent_channels, shape.frames_per_block, h, w, device=device, dtype=dtype
    )
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        decode = _median_time(lambda: vae.decode_block(z, state), max(1, repeats // 2), sync)
    enc = build_audio_encoder("logmel", n_mels=40, tokens_per_latent_frame=shape.audio_tokens or 4)
    samples = round(shape.video_frames / shape.fps * enc.sample_rate)
    a_state = enc.new_state()
    audio = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1
    features = _median_time(
        lambda: enc.encode(audio, shape.video_frames, shape.frames_per_block, a_state),
        repeats,
        lambda: None,
    )
    return decode, features


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkModel:
    """Time on the wire per message (latency + bytes / bandwidth), and the CPU a message costs
    its two ends (pickling, copies; ~0 for NCCL, measurable for gloo on CPU)."""

    gbps: float = 100.0
    latency_s: float = 10e-6
    cpu_s: float = 0.0

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency_s + nbytes * 8 / (self.gbps * 1e9)


@dataclass
class Prediction:
    strategy: str
    devices: int
    layout: str
    fps: float
    period_s: float  # steady state: one block leaves every period
    block_latency_s: float  # compute latency of one block, start to frames
    time_to_first_frame_s: float  # live streaming: first block's audio + extra audio + compute
    memory_gb: list[float]  # per device
    comm_bytes_per_block: float
    stages_s: list[float] = field(default_factory=list)  # busy time per device per block
    runnable: bool = True
    notes: str = ""

    def realtime(self, fps: float) -> bool:
        return self.fps >= fps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gb(nbytes: float) -> float:
    return nbytes / 2**30


def _bound(compute_s: float, devices: int, period: float, cores: int | None) -> float:
    """Devices that share `cores` CPU cores cannot do more than `cores` seconds of compute per
    second: the period is at least a block's compute over the cores. Link time is not compute
    (a send waits for the peer, another process runs meanwhile), so it is not counted here."""
    if cores:
        period = max(period, compute_s / max(1, min(cores, devices)))
    return period


def _compute_s(
    shape: ModelShape, costs: Costs, link: LinkModel, messages: int, forward_calls: int = 1
) -> float:
    """Compute of one block summed over all devices: the same model work for every strategy,
    plus the fixed cost of each extra per-rank forward call and the CPU of each message."""
    extra_calls = shape.steps * (forward_calls - 1) * costs.forward_fixed_s
    return (
        costs.features_s
        + shape.steps * costs.step_s
        + costs.decode_s
        + extra_calls
        + messages * link.cpu_s
    )


def predict_local(shape: ModelShape, costs: Costs, *, cores: int | None = None) -> Prediction:
    s = shape.steps
    reencode = costs.reencode_s if shape.cache_mode == "reencode" else 0.0
    busy = costs.features_s + s * costs.step_s + reencode + costs.decode_s
    caches = 1 if shape.cache_mode == "reencode" else s
    mem = (
        (shape.dit_params + shape.vae_params) * shape.bytes
        + caches * shape.kv_bytes(shape.window_frames, shape.config.num_layers)
        + shape.kv_bytes(1, shape.config.num_layers)
        + shape.activation_bytes(costs.device)
    )
    return Prediction(
        strategy="local",
        devices=1,
        layout=f"1 device, {shape.cache_mode}",
        fps=shape.video_frames / busy,
        period_s=busy,
        block_latency_s=busy,
        time_to_first_frame_s=shape.first_block_seconds + busy,
        memory_gb=[_gb(mem)],
        comm_bytes_per_block=0.0,
        stages_s=[busy],
    )


def predict_tpp(
    shape: ModelShape, costs: Costs, devices: int, link: LinkModel, *, cores: int | None = None
) -> Prediction:
    from pipelines.executors.tpp import split_steps

    if devices < 2:
        raise ConfigError("tpp needs at least 2 devices")
    ranks = min(devices - 1, shape.steps)
    parts = split_steps(shape.steps, ranks)
    hop_bytes = shape.latent_bytes + shape.audio_bytes
    hop = link.seconds(hop_bytes, messages=2)  # control frame + tensors
    stages = [
        len(r) * costs.step_s + (costs.features_s if i == 0 else 0.0) + hop
        for i, r in enumerate(parts)
    ]
    stages.append(costs.decode_s + link.seconds(shape.latent_bytes, messages=2))
    compute = _compute_s(shape, costs, link, messages=ranks + 1)
    period = _bound(compute, len(stages), max(stages), cores)
    latency = sum(stages)
    L = shape.config.num_layers
    mems = [
        _gb(
            (shape.dit_params + shape.vae_params) * shape.bytes
            + len(r) * shape.kv_bytes(shape.window_frames, L)
            + shape.kv_bytes(1, L)
            + shape.activation_bytes(costs.device)
        )
        for r in parts
    ]
    mems.append(_gb(shape.vae_params * shape.bytes + shape.activation_bytes(costs.device)))
    idle = devices - 1 - ranks
    return Prediction(
        strategy="tpp",
        devices=ranks + 1,
        layout=f"{ranks} step rank{'s' if ranks > 1 else ''} + 1 decode",
        fps=shape.video_frames / period,
        period_s=period,
        block_latency_s=latency,
        time_to_first_frame_s=shape.first_block_seconds + latency,
        memory_gb=mems,
        comm_bytes_per_block=hop_bytes * ranks,
        stages_s=stages,
        notes=f"{idle} device(s) left idle: at most one rank per step" if idle > 0 else "",
    )


def _dualparal_stages(
    shape: ModelShape, costs: Costs, ranks: int, link: LinkModel
) -> tuple[list[float], list[range], float]:
    """Busy seconds per layer rank for one forward of one block, its ranges, and the ring hop."""
    from pipelines.executors.staggered import split_layers

    parts = split_layers(shape.config.num_layers, ranks)
    fwd_hop = link.seconds(shape.hidden_bytes + shape.latent_bytes, messages=2)
    ring_hop = link.seconds(shape.latent_bytes, messages=2) if ranks > 1 else 0.0
    embed_head = costs.overhead_s - costs.forward_fixed_s
    stages = []
    for i, r in enumerate(parts):
        # every rank pays the fixed part of a forward call; embedding on the first, head last
        t = costs.layers_s(shape, r) + costs.forward_fixed_s
        t += embed_head * ((i == 0) + (i == ranks - 1)) / 2
        t += fwd_hop if i < ranks - 1 else ring_hop
        stages.append(t)
    return stages, parts, ring_hop


def predict_dualparal(
    shape: ModelShape, costs: Costs, devices: int, link: LinkModel, *, cores: int | None = None
) -> Prediction:
    if devices < 2:
        raise ConfigError("dualparal needs at least 2 devices")
    ranks = min(devices - 1, shape.config.num_layers)
    s = shape.steps
    stages, parts, _ = _dualparal_stages(shape, costs, ranks, link)
    around = sum(stages)  # one block's trip through every layer rank and back
    per_block = [s * t for t in stages]
    per_block[0] += costs.features_s
    decode = costs.decode_s + link.seconds(shape.latent_bytes, messages=2)
    busy = [*per_block, decode]
    iteration = max(max(per_block), around, decode)
    messages = s * (ranks if ranks > 1 else 0) + 2  # forwards + ring returns, to decode, out
    compute = _compute_s(shape, costs, link, messages, forward_calls=ranks)
    period = _bound(compute, len(busy), iteration, cores)
    latency = s * iteration + decode
    h_blocks = shape.window_frames // shape.frames_per_block
    stored = (h_blocks + s) * shape.frames_per_block  # frames of keys/values kept per rank
    mems = []
    for i, r in enumerate(parts):
        params = shape.shared_params + sum(shape.layer_params[j] for j in r)
        vae = shape.vae_params if i == 0 else 0  # rank 0 encodes the reference
        mems.append(
            _gb(
                (params + vae) * shape.bytes
                + shape.kv_bytes(stored + 1, len(r))
                + shape.activation_bytes(costs.device)
            )
        )
    mems.append(_gb(shape.vae_params * shape.bytes + shape.activation_bytes(costs.device)))
    extra_audio = (s - 1) * shape.block_seconds
    notes = "a block leaves after S iterations: live audio adds (S-1) block durations of latency"
    if around > s * max(stages):
        notes += "; the ring is not full with one session (S < ranks): more sessions fill it"
    return Prediction(
        strategy="dualparal",
        devices=ranks + 1,
        layout=f"{ranks} layer rank{'s' if ranks > 1 else ''} + 1 decode",
        fps=shape.video_frames / period,
        period_s=period,
        block_latency_s=latency,
        time_to_first_frame_s=shape.first_block_seconds + extra_audio + latency,
        memory_gb=mems,
        comm_bytes_per_block=s
        * ((ranks - 1) * (shape.hidden_bytes + shape.latent_bytes) + shape.latent_bytes),
        stages_s=busy,
        notes=notes,
    )


def predict_tpp_layers(
    shape: ModelShape, costs: Costs, devices: int, link: LinkModel, *, cores: int | None = None
) -> Prediction | None:
    """TPP whose step stages are each split over several layer ranks (prediction only): with
    timestep forcing every (step, layer range) pair is an independent pipeline stage."""
    from pipelines.executors.tpp import split_steps

    best: Prediction | None = None
    for step_ranks in range(1, min(shape.steps, devices - 1) + 1):
        layer_ranks = (devices - 1) // step_ranks
        if layer_ranks < 2 or layer_ranks > shape.config.num_layers:
            continue
        lstages, lparts, _ = _dualparal_stages(shape, costs, layer_ranks, link)
        stages, mems = [], []
        for i, r in enumerate(split_steps(shape.steps, step_ranks)):
            for j, lr in enumerate(lparts):
                t = len(r) * lstages[j] + (costs.features_s if i == j == 0 else 0.0)
                stages.append(t)
                params = shape.shared_params + sum(shape.layer_params[k] for k in lr)
                mems.append(
                    _gb(
                        params * shape.bytes
                        + len(r) * shape.kv_bytes(shape.window_frames, len(lr))
                        + shape.activation_bytes(costs.device)
                    )
                )
        stages.append(costs.decode_s)
        mems.append(_gb(shape.vae_params * shape.bytes))
        messages = shape.steps * layer_ranks + 1
        compute = _compute_s(shape, costs, link, messages, forward_calls=layer_ranks)
        period = _bound(compute, len(stages), max(stages), cores)
        p = Prediction(
            strategy="tpp+layers",
            devices=step_ranks * layer_ranks + 1,
            layout=f"{step_ranks} step x {layer_ranks} layer ranks + 1 decode",
            fps=shape.video_frames / period,
            period_s=period,
            block_latency_s=sum(stages),
            time_to_first_frame_s=shape.first_block_seconds + sum(stages),
            memory_gb=mems,
            comm_bytes_per_block=shape.steps * (layer_ranks - 1) * shape.hidden_bytes
            + step_ranks * shape.latent_bytes,
            stages_s=stages,
            runnable=False,
            notes="prediction only: not implemented yet",
        )
        if best is None or p.fps > best.fps:
            best = p
    return best


def predict_all(
    shape: ModelShape,
    costs: Costs,
    devices: int,
    link: LinkModel,
    *,
    cores: int | None = None,
) -> list[Prediction]:
    """Every strategy that can use `devices` devices (local always, as the baseline)."""
    out = [predict_local(shape, costs, cores=cores)]
    if devices >= 2:
        out.append(predict_tpp(shape, costs, devices, link, cores=cores))
        out.append(predict_dualparal(shape, costs, devices, link, cores=cores))
        mix = predict_tpp_layers(shape, costs, devices, link, cores=cores)
        if mix is not None:
            out.append(mix)
    return out


@dataclass
class Recommendation:
    choice: Prediction | None
    reason: str


def recommend(
    predictions: list[Prediction],
    *,
    target_fps: float,
    max_latency_s: float | None = None,
    device_memory_gb: float | None = None,
) -> Recommendation:
    """The runnable strategy that fits memory, keeps up with `target_fps` and has the lowest
    time to first frame; if none keeps up, the fastest that fits, said plainly."""

    def fits(p: Prediction) -> bool:
        return device_memory_gb is None or max(p.memory_gb) <= device_memory_gb

    runnable = [p for p in predictions if p.runnable and fits(p)]
    if not runnable:
        return Recommendation(None, "no runnable strategy fits the device memory; add devices")
    ok = [p for p in runnable if p.realtime(target_fps)]
    if max_latency_s is not None:
        ok = [p for p in ok if p.time_to_first_frame_s <= max_latency_s]
    if ok:
        best = min(ok, key=lambda p: (p.time_to_first_frame_s, p.devices))
        return Recommendation(
            best,
            f"{best.strategy} keeps up with {target_fps:g} fps ({best.fps:.1f} fps) with the "
            f"lowest time to first frame ({best.time_to_first_frame_s:.2f} s)",
        )
    best = max(runnable, key=lambda p: p.fps)
    why = f"nothing reaches {target_fps:g} fps"
    if max_latency_s is not None:
        why += f" within {max_latency_s:g} s to first frame"
    return Recommendation(best, f"{why}; the fastest is {best.strategy} at {best.fps:.1f} fps")


def round_sig(x: float, digits: int = 3) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))
