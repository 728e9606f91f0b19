"""K concurrent sessions against the real service on localhost: fps, block latency, end to end.

    python benchmarks/sessions.py --sessions 1 2 4 --seconds 15 [--model tiny] [--json]

For each K, one `diffstream serve` child process serves K aiortc clients at once (this process).
Each client streams audio in real time: silence with a 120 ms tone burst every 1.5 s. Reported
per session:

- fps: video frames received per second over the steady part of the run, and the share of them
  the engine generated (the rest repeated the last frame because a block was late);
- block latency p50/p95: submit to result inside the service (GET /v1/sessions/{id});
- end to end: a burst's first chunk sent on the websocket → the burst heard on the received
  audio track. The audio track carries exactly the audio that drove the frames on screen at
  that moment, so this is audio in → the frame it drove out, as the viewer sees it (client
  decode included). The service's own figure (websocket receipt → frame sent) is shown too.

The clients run in this process and share the machine with the service: on a small machine
their decoding competes with generation, as a viewer's would not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream.client import AvatarClient, http  # noqa: E402
from stream.harness import ServiceProcess  # noqa: E402

SR = 16000
BURST_EVERY_S = 1.5
BURST_S = 0.12
WARMUP_S = 3.0


def burst_track(seconds: float) -> tuple[np.ndarray, list[float]]:
    """Silence with a 1 kHz burst every BURST_EVERY_S; returns audio and burst start offsets."""
    audio = np.zeros(int(seconds * SR), np.float32)
    starts = []
    t = np.arange(int(BURST_S * SR)) / SR
    burst = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    at = 1.0
    while at + BURST_S < seconds - 1.0:
        i = int(at * SR)
        audio[i : i + len(burst)] = burst
        starts.append(at)
        at += BURST_EVERY_S
    return audio, starts


def detect_onsets(audio: list[tuple[float, int, float]], threshold: float = 0.1) -> list[float]:
    """Arrival times of received audio frames where a burst starts after quiet."""
    onsets, quiet = [], 0
    for arrival, _, rms in audio:
        if rms > threshold and quiet >= 10:
            onsets.append(arrival)
        quiet = 0 if rms > threshold else quiet + 1
    return onsets


async def one_session(base: str, seconds: float, audio: np.ndarray, starts: list[float]) -> dict:
    client = AvatarClient(base)
    await client.create()
    await client.watch()
    await asyncio.wait_for(client.first_video.wait(), 60)
    await client.open_audio(SR)
    sent_at: dict[int, float] = {}
    burst_samples = {int(s * SR) for s in starts}

    def on_chunk(offset: int, when: float) -> None:
        for b in burst_samples:
            if offset <= b < offset + SR // 50:
                sent_at[b] = when

    t0 = time.monotonic()
    await client.send_pcm(audio, SR, chunk_ms=20, on_chunk=on_chunk)
    t1 = time.monotonic()
    await asyncio.sleep(1.0)
    _, detail = await asyncio.to_thread(http, "GET", f"{base}/v1/sessions/{client.session_id}")
    await client.close()

    steady = (t0 + WARMUP_S, t1)
    video = [t for t, _ in client.received.video if steady[0] <= t < steady[1]]
    fps = len(video) / max(1e-9, steady[1] - steady[0])
    stats = [s for s in client.received.stats if s.get("generated_fps") is not None]
    steady_stats = stats[int(WARMUP_S) : -1] or stats
    generated = float(np.mean([s["generated_fps"] for s in steady_stats])) if stats else 0.0
    sends = [sent_at[b] for b in sorted(sent_at)]
    onsets = detect_onsets(client.received.audio)
    e2e = []
    for s in sends:  # the first onset heard after each burst was sent
        later = [o for o in onsets if o > s]
        if later and later[0] - s < BURST_EVERY_S:
            e2e.append(later[0] - s)
    server = detail["stats"]
    return {
        "session_id": client.session_id,
        "fps": round(fps, 2),
        "generated_fps": round(generated, 2),
        "block_ms_p50": server["block_ms"],
        "block_ms_p95": server["block_ms_p95"],
        "e2e_ms_p50": round(float(np.median(e2e)) * 1000, 1) if e2e else None,
        "e2e_ms_p95": round(float(np.percentile(e2e, 95)) * 1000, 1) if e2e else None,
        "bursts_heard": f"{len(e2e)}/{len(sends)}",
        "server_e2e_ms": server["latency_ms"],
        "dropped_blocks": server["dropped_blocks"],
        "repeated_frames": server["frames_repeated"],
    }


async def round_of(base: str, k: int, seconds: float) -> list[dict]:
    audio, starts = burst_track(seconds)
    return list(
        await asyncio.gather(*(one_session(base, seconds, audio, starts) for _ in range(k)))
    )


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m_at_start": round(load[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(results: dict[int, list[dict]], info: dict[str, Any]) -> None:
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, load {info['load_avg_1m_at_start']}")
    print(f"model {info['model']}, {info['seconds']} s per run, first {WARMUP_S:.0f} s excluded\n")
    cols = [
        ("K", 3),
        ("sess", 5),
        ("fps", 6),
        ("gen fps", 8),
        ("block p50", 10),
        ("block p95", 10),
        ("e2e p50", 8),
        ("e2e p95", 8),
        ("srv e2e", 8),
        ("bursts", 7),
        ("dropped", 8),
    ]
    print(" ".join(name.rjust(width) for name, width in cols))
    for k, sessions in results.items():
        for i, s in enumerate(sessions):
            row = [
                k,
                i + 1,
                s["fps"],
                s["generated_fps"],
                s["block_ms_p50"],
                s["block_ms_p95"],
                s["e2e_ms_p50"],
                s["e2e_ms_p95"],
                s["server_e2e_ms"],
                s["bursts_heard"],
                s["dropped_blocks"],
            ]
            print(" ".join(str(v).rjust(w) for v, (_, w) in zip(row, cols, strict=True)))
    print("\nfps: received; gen fps: generated by the engine; block: submit→result in the service;")
    print("e2e: burst sent on the websocket → heard on the received track (ms); srv e2e: server's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra serve flag, e.g. --serve-arg=--steps=2",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    info = {**machine(), "model": args.model, "seconds": args.seconds}
    results: dict[int, list[dict]] = {}
    most = str(max(args.sessions))  # all sessions come from this one client
    flags = ["--max-sessions", most, "--max-sessions-per-client", most, *args.serve_arg]
    with ServiceProcess(*flags, model=args.model) as svc:
        for k in args.sessions:
            results[k] = asyncio.run(round_of(svc.base, k, args.seconds))
            deadline = time.monotonic() + 15
            while svc.health()["sessions"] and time.monotonic() < deadline:
                time.sleep(0.2)
    if args.json:
        print(json.dumps({"machine": info, "results": results}, indent=2))
    else:
        print_table(results, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
