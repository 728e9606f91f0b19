"""`diffstream bench`: per-stage time, fps, time to first frame and peak memory of the engine.

Runs the same StreamingGenerator as the service on one device with stage timing enabled (device
synchronised at stage boundaries). Medians over the measured blocks, after warm-up blocks.
`--json` prints one object for machines (the planner reads it).
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
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--json", action="store_true", help="print JSON only")


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() != "Darwin" else kb / 2**20


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
    gen = StreamingGenerator.from_bundle(
        bundle,
        device=device,
        dtype=dtype,
        profile=True,
        steps=args.steps,
        cache_mode=args.cache_mode,
        height=args.height,
        width=args.width,
    )
    if args.compile:
        gen.model = torch.compile(gen.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ref = default_reference(gen.height, gen.width)
    rng = np.random.default_rng(0)

    def audio(i: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(gen.block_samples(i))).astype(np.float32)

    # Warm-up session (first calls allocate, pick kernels, compile).
    state = gen.new_session(ref, seed=0)
    for i in range(args.warmup):
        gen.generate_block(state, audio(i))

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
    else:
        peak_mb = _peak_rss_mb()
    return {
        "model": bundle.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(gen.dtype).replace("torch.", ""),
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
        f"model {r['model']} on {r['device']} ({r['device_name']}, {r['threads']} threads, {r['dtype']})"
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
    return 0
