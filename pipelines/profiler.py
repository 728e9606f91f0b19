"""What one block costs on one device: from `diffstream bench --json`, or from a short profile
of single layers of the model's real sizes (random weights; speed does not depend on values)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.model_shape import ModelShape


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
        decode_s, features_s = _profile_vae_and_audio(shape, device, dtype, repeats, downscale)
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
    shape: ModelShape,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    downscale: int = 1,
) -> tuple[float, float]:
    """Decode of one steady-state block with the model's autoencoder, and the audio features of
    one steady-state block. With `downscale` the decode runs on a latent that much smaller per
    side and is scaled by the pixel count (a convolutional decoder's cost is proportional)."""
    import numpy as np

    from models.audio import build_audio_encoder

    full_h, full_w = shape.latent_hw
    k = max(1, int(downscale))
    h, w = max(2, full_h // k), max(2, full_w // k)
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
        vae.decode_block(z, state)  # the stream's first block is shorter: time the later ones
        decode = _median_time(lambda: vae.decode_block(z, state), max(1, repeats // 2), sync)
    decode *= (full_h * full_w) / (h * w)
    enc = build_audio_encoder("logmel", n_mels=40, tokens_per_latent_frame=shape.audio_tokens or 4)
    sr, a_state = enc.sample_rate, enc.new_state()
    rng = np.random.default_rng(0)

    def window(frames: int) -> np.ndarray:
        return rng.standard_normal(round(frames / shape.fps * sr)).astype(np.float32) * 0.1

    enc.encode(
        window(shape.first_video_frames), shape.first_video_frames, shape.frames_per_block, a_state
    )
    audio = window(shape.video_frames)
    features = _median_time(
        lambda: enc.encode(audio, shape.video_frames, shape.frames_per_block, a_state),
        repeats,
        lambda: None,
    )
    return decode, features
