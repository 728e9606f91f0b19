"""`diffstream bench`: per-stage time, fps, time to first frame and peak memory of the engine.

Runs the same StreamingGenerator as the service on one device with stage timing enabled (device
synchronised at stage boundaries). Medians over the measured blocks, after warm-up blocks (which
also compile the block step, unless --no-compile: `compile_s`). `--json` prints one object for
machines (the planner reads it). Model FLOP utilisation (`mfu`) is the denoise steps' FLOPs,
counted from the model's shapes, per second of a step, over the device's peak dense bf16 rate
(a table of GPUs, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="model name or folder (default: tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cache-mode", choices=("reencode", "timestep_forcing"), default=None)
    p.add_argument("--blocks", type=int, default=20, help="measured blocks")
    p.add_argument("--warmup", type=int, default=3, help="blocks run before measuring")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_speed_arguments(p, quant_default="none")
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode (default: reduce-overhead on CUDA, default on the CPU)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak dense TFLOP/s for the MFU"
    )
    p.add_argument("--json", action="store_true", help="print JSON only")


def add_speed_arguments(p: argparse.ArgumentParser, quant_default: str | None = None) -> None:
    """--compile/--no-compile and --quant, as bench and render take them."""
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the block step (default on; DIFFSTREAM_COMPILE=0 turns it off)",
    )
    p.add_argument(
        "--quant",
        default=quant_default,
        help="fp8 or fp8-weight: the transformer's block linears in FP8 (Ada/Hopper GPUs)",
    )


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() != "Darwin" else kb / 2**20


# Peak dense bf16 tensor-core TFLOP/s by device name (vendor data sheets; SXM parts where a
# name covers several). The first match wins, so the longer names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def step_flops(model_name: str, gen: Any) -> float | None:
    """FLOPs of one denoise step of one block (every layer's matmuls and attention, as the
    planner counts them), from the model's shapes; None for a model the planner cannot shape."""
    try:
        from pipelines import planner
        from pipelines.profiler import layer_flops

        shape = planner.model_shape(
            model_name,
            height=gen.height,
            width=gen.width,
            steps=gen.config.steps,
            dtype=str(gen.dtype).replace("torch.", ""),
            cache_mode=gen.config.cache_mode,
        )
    except Exception:  # a model outside the planner's registry: no MFU, the rest stands
        return None
    audio = set(shape.config.audio_layers)
    return sum(sum(layer_flops(shape, audio=i in audio)) for i in range(shape.config.num_layers))


def compile_default() -> bool:
    """On unless DIFFSTREAM_COMPILE says 0/false/no/off (the test suite sets it off)."""
    import os

    value = os.environ.get("DIFFSTREAM_COMPILE", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from models.registry import build_wan_random, load_model
    from pipelines.executors import parse_devices
    from pipelines.generator import StreamingGenerator
    from pipelines.reference import default_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_devices(args.device)[0]
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t_load = time.perf_counter()
    if args.model in ("wan-1.3b", "wan-14b"):
        bundle = build_wan_random(args.model.split("-")[1])
    else:  # Live Avatar loads (or builds) straight on the device, in its dtype
        bundle = load_model(args.model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t_load
    use_compile = compile_default() if args.compile is None else args.compile
    gen = StreamingGenerator.from_bundle(
        bundle,
        device=device,
        dtype=dtype,
        profile=True,
        steps=args.steps,
        cache_mode=args.cache_mode,
        height=args.height,
        width=args.width,
        compile=(args.compile_mode or True) if use_compile else False,
        quant=args.quant,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ref = default_reference(gen.height, gen.width)
    rng = np.random.default_rng(0)

    def audio(i: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(gen.block_samples(i))).astype(np.float32)

    # Warm-up session (first calls allocate, pick kernels, compile). A compiled step needs
    # the ring to fill before its last graph is built: at least that many blocks.
    warmup = args.warmup
    if gen.compile_mode is not None:
        warmup = max(warmup, gen.config.window_frames // gen.config.frames_per_block + 2)
    t_compile = time.perf_counter()
    state = gen.new_session(ref, seed=0)
    for i in range(warmup):
        gen.generate_block(state, audio(i))
    warmup_s = time.perf_counter() - t_compile

    # Time to first frame: a fresh session, from its opening to the first block's frames.
    t0 = time.perf_counter()
    state = gen.new_session(ref, seed=1)
    first_frames, _ = gen.generate_block(state, audio(0))
    ttff = time.perf_counter() - t0

    # A reference never seen before: Live Avatar's VAE encodes it as a still clip (then caches
    # it), which a session with a new image pays for before its first frame.
    reference_s = 0.0
    if hasattr(gen.vae, "encode_reference"):
        other = np.ascontiguousarray(255 - ref)
        t_ref = time.perf_counter()
        gen.encode_reference(other)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reference_s = time.perf_counter() - t_ref

    timings = []
    frames = 0
    for _ in range(args.blocks):
        f, t = gen.generate_block(state, audio(state.block_index))
        frames += f.shape[0]
        timings.append(t)
    med = statistics.median
    total = med(t.total for t in timings)
    steps = len(timings[0].denoise_steps)
    per_step = [med(t.denoise_steps[s] for t in timings) for s in range(steps)]
    cfg = gen.model.config
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        device_name = torch.cuda.get_device_name(device)
    else:
        peak_mb = _peak_rss_mb()
        device_name = platform.processor() or platform.machine()
    flops = step_flops(args.model, gen)
    peak = args.peak_tflops or (peak_tflops(device_name) if device.type == "cuda" else None)
    step_s = med(per_step)
    mfu = flops / step_s / (peak * 1e12) if flops and peak else None
    return {
        "model": bundle.name,
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "dtype": str(gen.dtype).replace("torch.", ""),
        "compile": gen.compile_mode,
        "quant": gen.quant,
        "fp8_layers": len(gen.fp8_layers),
        "resolution": [gen.width, gen.height],
        "latent": [gen.config.frames_per_block, gen.latent_h, gen.latent_w],
        "tokens_per_block": gen.tokens_per_frame * gen.config.frames_per_block,
        "window_frames": gen.config.window_frames,
        "dim": cfg.inner_dim,
        "layers": cfg.num_layers,
        "heads": cfg.num_attention_heads,
        "steps": steps,
        "cache_mode": gen.config.cache_mode,
        "frames_per_block": timings and gen.block_video_frames(1),
        "blocks": len(timings),
        "load_s": load_s,
        "features_s": med(t.features for t in timings),
        "denoise_s": med(t.denoise for t in timings),
        "denoise_step_s": per_step,
        "cache_update_s": med(t.cache_update for t in timings),
        "decode_s": med(t.decode for t in timings),
        "block_s": total,
        "fps": gen.block_video_frames(1) / total,
        "time_to_first_frame_s": ttff,
        "new_reference_s": reference_s,
        "peak_memory_mb": peak_mb,
        "cache_mb": state.cache_bytes() / 2**20,
        "params_m": sum(p.numel() for p in gen.model.parameters()) / 1e6,
        "warmup_blocks": warmup,
        "warmup_s": warmup_s,
        "step_tflop": flops / 1e12 if flops else None,
        "achieved_tflops": flops / step_s / 1e12 if flops else None,
        "peak_tflops": peak,
        "mfu": mfu,
    }


def run(args: argparse.Namespace) -> int:
    r = measure(args)
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
        return 0
    ms = 1000
    share = {
        k: r[k] / r["block_s"] for k in ("features_s", "denoise_s", "cache_update_s", "decode_s")
    }
    print(
        f"model {r['model']} on {r['device']} ({r['device_name']}, {r['threads']} threads, "
        f"{r['dtype']}, compile {r['compile'] or 'off'}, quant {r['quant']})"
    )
    print(
        f"  {r['resolution'][0]}x{r['resolution'][1]}, {r['params_m']:.1f}M params, {r['layers']} layers, dim {r['dim']}, {r['tokens_per_block']} tokens/block, {r['steps']} steps, {r['cache_mode']}"
    )
    print(f"  audio features  {r['features_s'] * ms:8.2f} ms  ({share['features_s']:.0%})")
    print(
        f"  denoise         {r['denoise_s'] * ms:8.2f} ms  ({share['denoise_s']:.0%}); per step "
        + ", ".join(f"{s * ms:.2f}" for s in r["denoise_step_s"])
    )
    print(f"  cache update    {r['cache_update_s'] * ms:8.2f} ms  ({share['cache_update_s']:.0%})")
    print(f"  decode          {r['decode_s'] * ms:8.2f} ms  ({share['decode_s']:.0%})")
    print(
        f"  block           {r['block_s'] * ms:8.2f} ms for {r['frames_per_block']} frames -> {r['fps']:.1f} fps"
    )
    print(
        f"  time to first frame {r['time_to_first_frame_s'] * ms:.0f} ms; peak memory {r['peak_memory_mb']:.0f} MiB; KV cache {r['cache_mb']:.2f} MiB"
        + (
            f"\n  a new reference image {r['new_reference_s'] * ms:.0f} ms (then cached)"
            if r.get("new_reference_s")
            else ""
        )
    )
    if r["achieved_tflops"] is not None:
        mfu = f", MFU {r['mfu']:.1%} of {r['peak_tflops']:g}" if r["mfu"] is not None else ""
        print(
            f"  denoise step {r['step_tflop']:.3g} TFLOP: {r['achieved_tflops']:.3g} TFLOP/s{mfu}"
        )
    print(f"  warm-up {r['warmup_blocks']} blocks in {r['warmup_s']:.1f} s")
    return 0
