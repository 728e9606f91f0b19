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
    sink_s: float = 0.0  # the sink pass over every layer: once per session (and sink refresh)
    reference_s: float = 0.0  # encoding a new reference image for the sink (and the decoder)
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


def _sync(device: torch.device) -> Any:
    """What makes a timing wait for the device: CUDA's synchronize; None on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None if device.type == "cpu" else (lambda: None)


def _median_time(fn: Any, repeats: int, sync: Any) -> float:
    """Median seconds of `fn` after one warm-up call. On the CPU (`sync` None) with one torch
    thread the clock is this thread's CPU time: what a block costs a device, which another
    process's load does not stretch (time spent descheduled is not compute; on a shared
    machine wall-clock medians came out up to 2x apart from one profile to the next). With
    several torch threads, or on a GPU, the work is not this thread's alone: wall time."""
    wait = sync or (lambda: None)
    clock = time.thread_time if sync is None and torch.get_num_threads() == 1 else time.perf_counter
    fn()
    wait()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        wait()
        out.append(clock() - t0)
    return statistics.median(out)


def probe_shape(shape: ModelShape, frames: int | None = None, downscale: int = 1) -> ModelShape:
    """A smaller block to time on a slow device: fewer latent frames, a coarser token grid
    (height and width / downscale, kept divisible by the autoencoder and the patch, and no
    smaller than the model's coarsest grid: Live Avatar packs motion tokens at 4x)."""
    unit = shape.spatial_factor * max(shape.config.patch_size[1:])
    least = unit * (4 if shape.family == "s2v" else 1)
    h = max(least, (shape.height // max(1, downscale)) // unit * unit)
    w = max(least, (shape.width // max(1, downscale)) // unit * unit)
    f = min(frames or shape.frames_per_block, shape.frames_per_block)
    window = shape.window_frames // shape.frames_per_block * f
    t = shape.temporal_factor
    return dataclasses.replace(
        shape,
        height=h,
        width=w,
        frames_per_block=f,
        window_frames=window,
        video_frames=t * f,
        first_video_frames=1 + t * (f - 1),
    )


def _time_ranges(
    shape: ModelShape, probe: ModelShape, device: torch.device, dtype: torch.dtype, repeats: int
) -> tuple[dict[tuple[int, int], float], float, float]:
    """Median seconds of layer ranges of a 4-layer model [plain, audio, plain, plain] with the
    real widths, on a block of `probe`'s size with a full history and sink; the sink pass over
    those 4 layers; and preparing one block's audio (encoder + injector keys/values).

    The model is built on the meta device and materialised on `device` (pipelines/probe.py),
    the same model and block the shape's memory trace runs on meta."""
    from pipelines.probe import PROBE_LAYERS, build_on_meta, materialize, probe_block, probe_config

    torch.manual_seed(0)
    model = materialize(build_on_meta(shape, probe_config(shape)), device, dtype)
    block = probe_block(model, probe, device, dtype, PROBE_LAYERS)
    sync = _sync(device)
    out: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        # Any hidden state of the right shape will do as the input of a later layer range.
        hidden = block.forward(model, range(1))
        for a, b in ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4)):
            out[a, b] = _median_time(
                lambda a=a, b=b: block.forward(model, range(a, b), hidden), repeats, sync
            )
        sink = _median_time(lambda: block.sink_pass(model), repeats, sync)
        audio = 0.0
        if shape.config.audio_layers:
            from pipelines.probe import audio_features

            feats = audio_features(probe, probe.frames_per_block, device, dtype)
            audio = _median_time(lambda: model.prepare_audio(feats), repeats, sync)
    return out, sink, audio


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


def _second_probe(shape: ModelShape, probe: ModelShape, downscale: int) -> ModelShape | None:
    """A second block size whose FLOPs differ enough from `probe`'s to fit time against
    FLOPs (smaller first; a model's minimum grid can make the smaller one the same)."""
    base = sum(layer_flops(probe, audio=False))
    f = probe.frames_per_block
    for cand in (
        probe_shape(shape, 1, 2 * max(1, downscale)),
        probe_shape(shape, 1, downscale) if f > 1 else None,
        probe_shape(shape, f + 1, downscale) if f < shape.frames_per_block else None,
    ):
        if cand is not None and abs(sum(layer_flops(cand, audio=False)) / base - 1) > 0.25:
            return cand
    return None


def _rate(points: list[tuple[float, float]]) -> float | None:
    """Seconds per FLOP of the line through two (FLOPs, seconds) probes, if they differ."""
    if len(points) < 2 or points[0][0] == points[1][0]:
        return None
    (f1, t1), (f2, t2) = points
    return max(0.0, (t2 - t1) / (f2 - f1))


def _fit(points: list[tuple[float, float]], target: float, rate: float | None = None) -> float:
    """Time at `target` FLOPs on the line time = fixed + rate * FLOPs through two probes; with
    probes of equal FLOPs, on the line of slope `rate` through the first (another layer kind's
    rate); with neither, proportional."""
    rate = _rate(points) if _rate(points) is not None else rate
    f1, t1 = points[0]
    if rate is None:
        return t1 * target / f1
    return max(0.0, t1 - rate * f1) + rate * target


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
    audio layer, the embedding, the head and the fixed per-forward overhead. The sink pass
    (once per session) is timed on the same 4 layers and scaled to all of them.

    With `frames` < F or `downscale` > 1 a smaller block is timed (a big model on a slow device):
    two probe sizes fit time = fixed + per-FLOP cost per layer, extrapolated to the real block.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = shape.config
    has_audio = bool(cfg.audio_layers)
    L = cfg.num_layers
    probe = probe_shape(shape, frames, downscale)
    ranges, sink4, audio_prep = _time_ranges(shape, probe, device, dtype, repeats)
    c, audio_layer, plain, embed, head = _solve(ranges)
    per_layer_sink = sink4 / 4
    what = "the real block"
    if probe != shape:
        second = _second_probe(shape, probe, downscale)
        plain_pts = [(sum(layer_flops(probe, audio=False)), plain)]
        audio_pts = [(sum(layer_flops(probe, audio=True)), audio_layer)]
        sink_pts = [(sum(sink_flops(probe)), per_layer_sink)]
        if second is not None:
            ranges2, sink2, _ = _time_ranges(shape, second, device, dtype, repeats)
            _, audio2, plain2, _, _ = _solve(ranges2)
            plain_pts.append((sum(layer_flops(second, audio=False)), plain2))
            audio_pts.append((sum(layer_flops(second, audio=True)), audio2))
            sink_pts.append((sum(sink_flops(second)), sink2 / 4))
        plain = _fit(plain_pts, sum(layer_flops(shape, audio=False)))
        audio_layer = _fit(audio_pts, sum(layer_flops(shape, audio=True)))
        # the sink's tokens run plain layers: without a second sink size, the plain layers' rate
        per_layer_sink = _fit(sink_pts, sum(sink_flops(shape)), _rate(plain_pts))
        tokens = shape.tokens_per_block / probe.tokens_per_block
        embed, head = embed * tokens, head * tokens
        what = (
            f"{probe.frames_per_block} latent frames at {probe.width}x{probe.height}, "
            "extrapolated by FLOPs"
        )
    if not has_audio:
        audio_layer = plain
    overhead = c + embed + head
    n_audio = len(cfg.audio_layers)
    step = overhead + n_audio * audio_layer + (L - n_audio) * plain
    decode_s = features_s = reference_s = 0.0
    if decode:
        decode_s, features_s, reference_s = _profile_vae_and_audio(
            shape, device, dtype, repeats, downscale
        )
    return Costs(
        step_s=step,
        layer_plain_s=plain,
        layer_audio_s=audio_layer,
        overhead_s=overhead,
        forward_fixed_s=c,
        decode_s=decode_s,
        features_s=features_s + audio_prep,
        reencode_s=step,
        sink_s=c + L * per_layer_sink,
        reference_s=reference_s,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        source=f"profiled on {device}, {what}, {torch.get_num_threads()} threads",
    )


def layer_flops(shape: ModelShape, *, audio: bool) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one layer's forward of one block of `shape`: its
    tokens attend to the sink, the history window and themselves."""
    n = shape.frames_per_block * shape.tokens_per_frame
    kv = shape.sink_tokens + (shape.window_frames + shape.frames_per_block) * shape.tokens_per_frame
    return _layer_flops(shape, n, kv, audio)


def sink_flops(shape: ModelShape) -> tuple[float, float]:
    """FLOPs of one layer of the sink pass: the sink's tokens attend only to each other."""
    return _layer_flops(shape, shape.sink_tokens, shape.sink_tokens, False)


def _layer_flops(shape: ModelShape, n: int, kv: int, audio: bool) -> tuple[float, float]:
    cfg = shape.config
    d = cfg.inner_dim
    lin = 2 * n * d * d * 4 + 2 * n * d * d * 2 + 2 * 2 * n * d * cfg.ffn_dim
    attn = 4 * n * kv * d + 4 * n * shape.text_tokens * d
    if audio:
        lin += 2 * n * d * d * 2
        attn += 4 * n * shape.audio_tokens * d
    return float(lin), float(attn)


def _profile_vae_and_audio(
    shape: ModelShape,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    downscale: int = 1,
) -> tuple[float, float, float]:
    """(decode of one steady-state block, audio features of one steady-state block, encoding
    a new reference image). With `downscale` the VAE runs on a latent that much smaller per
    side and is scaled by the pixel count (a convolutional network's cost is proportional).

    Live Avatar's reference is the image repeated 5 times and 5 x 73 times, encoded 1 + 4
    frames at a time, and primes the decoder with 7 motion latents (LiveAvatarVAE keeps the
    last few images' latents, so a returning avatar skips this); its audio features are
    wav2vec2's hidden states of the block's audio."""
    full_h, full_w = shape.latent_hw
    k = max(1, int(downscale))
    h, w = max(2, full_h // k), max(2, full_w // k)
    if shape.vae_kind == "wan":
        from diffusers import AutoencoderKLWan

        from models.vae import WanStreamingVAE
        from pipelines.probe import materialize

        with torch.device("meta"):
            net = AutoencoderKLWan.from_config(shape.vae_config or {}).eval()
        vae = WanStreamingVAE(materialize(net, device, dtype))
    else:
        from models.vae import TinyAutoencoder

        vae = TinyAutoencoder(latent_channels=shape.latent_channels)
    vae.to(device=device, dtype=dtype)
    state = vae.new_state()
    z = torch.randn(
        1, shape.latent_channels, shape.frames_per_block, h, w, device=device, dtype=dtype
    )
    sync = _sync(device)
    few = max(1, repeats // 2)
    pixels = (full_h * full_w) / (h * w)
    s, t = shape.spatial_factor, shape.temporal_factor
    image = torch.rand(1, 3, h * s, w * s, device=device, dtype=dtype) * 2 - 1
    with torch.inference_mode():
        vae.decode_block(z, state)  # the stream's first block is shorter: time the later ones
        decode = _median_time(lambda: vae.decode_block(z, state), few, sync) * pixels
        one = _median_time(lambda: vae.encode_image(image), few, sync)
        if shape.family == "s2v":
            from models.liveavatar import DECODE_PRIME_LATENTS, MOTION_FRAMES, REFERENCE_REPEAT

            clip = image[:, :, None].repeat(1, 1, 1 + t, 1, 1)
            chunk = max(0.0, _median_time(lambda: vae.encode_video(clip), few, sync) - one)
            videos = (REFERENCE_REPEAT, REFERENCE_REPEAT * MOTION_FRAMES)
            reference = sum(one + (n - 1) // t * chunk for n in videos) * pixels
            # the decoder's cache is primed with the first motion latents
            reference += decode * DECODE_PRIME_LATENTS / shape.frames_per_block
        else:
            reference = one * pixels
    features = _profile_features(shape, device, dtype, repeats)
    return decode, features, reference


def _profile_features(
    shape: ModelShape, device: torch.device, dtype: torch.dtype, repeats: int
) -> float:
    """Audio features of one steady-state block: wav2vec2 with every hidden state for Live
    Avatar (random weights, its real size), the log-mel front end otherwise."""
    import numpy as np

    from models.audio import build_audio_encoder

    rng = np.random.default_rng(0)
    wav2vec = next((c for c in shape.components if c.name == "wav2vec2"), None)
    if wav2vec is not None and wav2vec.config is not None:
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        from pipelines.probe import materialize

        with torch.device("meta"):
            model = Wav2Vec2Model(Wav2Vec2Config(**wav2vec.config)).eval()
        model = materialize(model, device, dtype)
        samples = round(shape.video_frames / shape.fps * 16000)
        x = torch.from_numpy(rng.standard_normal((1, samples)).astype(np.float32))
        x = x.to(device=device, dtype=dtype)
        sync = _sync(device)
        with torch.inference_mode():
            return _median_time(lambda: model(x, output_hidden_states=True), repeats, sync)
    enc = build_audio_encoder("logmel", n_mels=40, tokens_per_latent_frame=shape.audio_tokens or 4)
    sr, a_state = enc.sample_rate, enc.new_state()

    def window(frames: int) -> np.ndarray:
        return rng.standard_normal(round(frames / shape.fps * sr)).astype(np.float32) * 0.1

    enc.encode(
        window(shape.first_video_frames), shape.first_video_frames, shape.frames_per_block, a_state
    )
    audio = window(shape.video_frames)
    return _median_time(
        lambda: enc.encode(audio, shape.video_frames, shape.frames_per_block, a_state),
        repeats,
        None,
    )
