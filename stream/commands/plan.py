"""`diffstream plan`: predict fps, time to first frame and memory per device of each strategy.

    diffstream plan --model wan-14b --devices 5 --link-gbps 400
    diffstream plan --model wan-14b --devices 5 --bench-json bench.json --device-memory-gb 80
    diffstream plan --model tiny --devices cpu:3 --cores 2        # CPU workers sharing 2 cores
    diffstream plan --model liveavatar-14b --devices 5            # Live Avatar, 704x384
    diffstream plan --model liveavatar:/ckpt/Wan2.2-S2V-14B --devices 5 --width 832 --height 480

Costs come from `diffstream bench --json` output when given, otherwise from a short profile of
single layers of the model's real sizes on --profile-device (see pipelines/planner.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model name or folder (its config only)")
    p.add_argument(
        "--devices",
        default="2",
        help="number of devices (N), or a device list as for serve: cuda:0,cuda:1 / cpu:N",
    )
    p.add_argument("--link-gbps", type=float, default=100.0, help="link bandwidth, Gb/s")
    p.add_argument(
        "--link-latency-us", type=float, default=10.0, help="per-message link latency, µs"
    )
    p.add_argument("--bench-json", default=None, help="costs from `diffstream bench --json`")
    p.add_argument(
        "--profile-device",
        default=None,
        help="device to profile on (default: cuda if present, else cpu)",
    )
    p.add_argument(
        "--profile-frames",
        type=int,
        default=None,
        help="profile fewer latent frames per block and scale by FLOPs (big models on CPU)",
    )
    p.add_argument(
        "--profile-downscale",
        type=int,
        default=1,
        help="profile at height/width divided by this and scale by FLOPs",
    )
    p.add_argument("--profile-repeats", type=int, default=5)
    p.add_argument("--no-decode-profile", action="store_true", help="skip timing the VAE decode")
    p.add_argument(
        "--decode-ms", type=float, default=None, help="decode time of one block, ms (overrides)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument(
        "--cache-mode",
        choices=("reencode", "timestep_forcing"),
        default=None,
        help="the local executor's cache mode (default: the bench file's, else the model's own: "
        "timestep forcing for Live Avatar, reencode otherwise; tpp always uses timestep forcing)",
    )
    p.add_argument("--sessions", type=int, default=1, help="concurrent sessions (memory)")
    p.add_argument(
        "--text-encoder",
        choices=("keep", "offload", "cpu", "free"),
        default="keep",
        help="Live Avatar's umT5: on the first rank's device (keep, offload) or on none (cpu, free)",
    )
    p.add_argument("--cores", type=int, default=None, help="CPU cores the devices share (cpu:N)")
    p.add_argument("--target-fps", type=float, default=None, help="default: the model's fps")
    p.add_argument("--max-latency-s", type=float, default=None, help="time-to-first-frame budget")
    p.add_argument("--device-memory-gb", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for profiling")
    p.add_argument("--json", action="store_true", help="print JSON only")


def _device_count(devices: str) -> tuple[int, bool]:
    """(N, are they CPU processes)."""
    from models.errors import ConfigError

    text = devices.strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ConfigError("--devices must be at least 1")
        return n, False
    if text.startswith("cpu:"):
        from pipelines.executors import parse_devices

        return len(parse_devices(text)), True
    parts = [d for d in text.split(",") if d.strip()]
    if not parts:
        raise ConfigError(f"--devices {devices!r}: give a number or a device list")
    return len(parts), all(d.strip().startswith("cpu") for d in parts)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipelines import planner

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.errors import ConfigError

    n, cpu = _device_count(args.devices)
    cores = args.cores or ((os.cpu_count() or 1) if cpu else None)
    if args.sessions < 1:
        raise ConfigError("--sessions must be at least 1")
    if args.bench_json:
        with open(args.bench_json) as f:
            bench = json.load(f)
        dtype = args.dtype or bench.get("dtype", "bfloat16")
        shape = planner.model_shape(
            args.model,
            height=args.height or (bench.get("resolution") or [None, None])[1],
            width=args.width or (bench.get("resolution") or [None, None])[0],
            steps=args.steps or bench.get("steps"),
            dtype=dtype,
            cache_mode=args.cache_mode or bench.get("cache_mode"),
            text_encoder=args.text_encoder,
        )
        costs = planner.costs_from_bench(bench, shape)
    else:
        device = args.profile_device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        shape = planner.model_shape(
            args.model,
            height=args.height,
            width=args.width,
            steps=args.steps,
            dtype=dtype,
            cache_mode=args.cache_mode,
            text_encoder=args.text_encoder,
        )
        costs = planner.profile_costs(
            shape,
            device=device,
            dtype=getattr(torch, dtype),
            frames=args.profile_frames,
            downscale=args.profile_downscale,
            repeats=args.profile_repeats,
            decode=not args.no_decode_profile,
        )
    if args.decode_ms is not None:
        costs.decode_s = args.decode_ms / 1000
        costs.source += "; decode given"
    link = planner.LinkModel(gbps=args.link_gbps, latency_s=args.link_latency_us * 1e-6)
    # Memory of the devices planned for: CPU processes, or accelerators (no score matrix).
    preds = planner.predict_all(
        shape,
        costs,
        n,
        link,
        cores=cores,
        sessions=args.sessions,
        memory_device="cpu" if cpu else "cuda",
    )
    target = args.target_fps or shape.fps
    rec = planner.recommend(
        preds,
        target_fps=target,
        max_latency_s=args.max_latency_s,
        device_memory_gb=args.device_memory_gb,
    )
    return {
        "model": {
            "name": shape.name,
            "layers": shape.config.num_layers,
            "dim": shape.config.inner_dim,
            "params_m": shape.dit_params / 1e6,
            "resolution": [shape.width, shape.height],
            "tokens_per_frame": shape.tokens_per_frame,
            "sink_tokens": shape.sink_tokens,
            "tokens_per_block": shape.tokens_per_block,
            "steps": shape.steps,
            "fps": shape.fps,
            "video_frames_per_block": shape.video_frames,
            "dtype": shape.dtype,
            "cache_mode": shape.cache_mode,
            "components": {c.name: c.params / 1e6 for c in shape.components},
            "vae_params_m": shape.vae_params / 1e6,
            "notes": list(shape.notes),
        },
        "sessions": args.sessions,
        "costs": costs.to_dict(),
        "link": {"gbps": link.gbps, "latency_s": link.latency_s},
        "devices": n,
        "cores": cores,
        "target_fps": target,
        "predictions": [p.to_dict() for p in preds],
        "recommendation": {
            "strategy": rec.choice.strategy if rec.choice else None,
            "reason": rec.reason,
        },
    }


def run(args: argparse.Namespace) -> int:
    out = plan(args)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    m, c = out["model"], out["costs"]
    ms = 1000
    print(
        f"model {m['name']}: {m['params_m']:.0f}M params, {m['layers']} layers, dim {m['dim']}, "
        f"{m['resolution'][0]}x{m['resolution'][1]}, {m['tokens_per_block']} tokens/block "
        f"(sink {m['sink_tokens']}), {m['steps']} steps, {m['video_frames_per_block']} "
        f"frames/block at {m['fps']:g} fps, {m['dtype']}, {m['cache_mode']}"
    )
    if m["components"]:
        parts = ", ".join(f"{k} {v:.0f}M" for k, v in m["components"].items())
        print(f"beside it: VAE {m['vae_params_m']:.0f}M, {parts}")
    for note in m["notes"]:
        print(f"note: {note}")
    print(
        f"costs ({c['source']}): step {c['step_s'] * ms:.2f} ms (layer {c['layer_plain_s'] * ms:.3f}"
        f"/{c['layer_audio_s'] * ms:.3f} ms without/with audio, overhead {c['overhead_s'] * ms:.2f} ms), "
        f"decode {c['decode_s'] * ms:.2f} ms, features {c['features_s'] * ms:.2f} ms; per session: "
        f"sink pass {c['sink_s'] * ms:.2f} ms, reference encode {c['reference_s'] * ms:.2f} ms"
    )
    link = out["link"]
    shared = f", {out['cores']} shared cores" if out["cores"] else ""
    print(
        f"link {link['gbps']:g} Gb/s, {link['latency_s'] * 1e6:g} µs per message{shared}; "
        f"memory for {out['sessions']} session(s)\n"
    )
    print(
        f"{'strategy':<11} {'devices':>7}  {'layout':<32} {'fps':>7} {'latency':>9} {'TTFF':>8}  memory/device (GiB)"
    )
    for p in out["predictions"]:
        mem = ", ".join(f"{g:.3g}" for g in p["memory_gb"])
        print(
            f"{p['strategy']:<11} {p['devices']:>7}  {p['layout']:<32} {p['fps']:>7.3g} "
            f"{p['block_latency_s']:>8.3f}s {p['time_to_first_frame_s']:>7.3f}s  {mem}"
        )
        if p["notes"]:
            print(f"{'':<21}note: {p['notes']}")
    rec = out["recommendation"]
    print(f"\ntarget {out['target_fps']:g} fps -> {rec['strategy'] or 'none'}: {rec['reason']}")
    chosen = next((p for p in out["predictions"] if p["strategy"] == rec["strategy"]), None)
    if chosen is not None:
        print(f"\n{chosen['strategy']} memory per device (GiB):")
        for i, parts in enumerate(chosen["memory_parts"]):
            items = ", ".join(f"{k} {v:.3g}" for k, v in parts.items() if v > 0)
            print(f"  {i}: {items}")
    return 0
