"""The quality/speed table of issue 10: teacher, current model and distilled students.

    .venv/bin/python benchmarks/distill_table.py \
        --model "current 4-step=default" --model "student 2-step=artifacts/s2" \
        --teacher "teacher=artifacts/teacher" --out benchmarks/results/distill_table.json

For each model: PSNR and SSIM against the procedural renderer's true frames on held-out faces and
speech (`ground_truth_scores`, whole frame and mouth), lip sync on espeak-ng speech the models never
heard (two sentences × two held-out faces, best lag within ±2 frames, mean), identity drift over
`--drift-frames` frames with the rolling sink (end window and mean), and single-session offline
fps on this machine. A teacher is measured through its clip-by-clip sampler, the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.audio import load_audio  # noqa: E402
from models.registry import load_model  # noqa: E402
from pipelines.training.avatar import default_mouth_box  # noqa: E402
from pipelines.training.evaluate import (  # noqa: E402
    drift_summary,
    ground_truth_scores,
    run_stream,
    stream_generate,
)
from pipelines.training.metrics import lagged_correlations, mouth_openness  # noqa: E402
from pipelines.training.report import sample_references  # noqa: E402
from pipelines.training.speech import loudness_envelope  # noqa: E402
from pipelines.training.teacher import load_teacher  # noqa: E402

SENTENCES = (
    "The quick brown fox jumps over the lazy dog, and then it runs away.",
    "Streaming video has to start at once and never stall, even after an hour.",
)


def espeak_audio(sr: int) -> list[np.ndarray]:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SystemExit("espeak-ng is needed (scripts/install-browser.sh installs it)")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            path = Path(tmp) / f"s{i}.wav"
            subprocess.run([binary, "-s", "150", "-w", str(path), text], check=True, timeout=60)
            out.append(load_audio(path, sr))
    return out


def measure(
    label: str,
    generate: Any,
    bundle: Any,
    drift_run: Any,
    speech: list[np.ndarray],
    refs: list[np.ndarray],
    frames: int,
) -> dict[str, Any]:
    d = bundle.defaults
    sr, fps = d.audio_sample_rate, d.fps
    t0 = time.perf_counter()
    gt = ground_truth_scores(generate, count=3, frames=100, size=d.height)
    syncs = []
    box = default_mouth_box(d.height)
    for audio in speech:
        n = min(frames, int(audio.size / sr * fps))
        for ref in refs:
            video = generate(ref, audio, n)
            env = loudness_envelope(audio[: round(n * sr / fps)], sr, fps, num_frames=n)
            syncs.append(max(lagged_correlations(mouth_openness(video, box), env, 2).values()))
    drift, speed = drift_run(refs[0], speech[0])
    row = {
        "model": label,
        "psnr_frame": gt["psnr_frame"],
        "psnr_mouth": gt["psnr_mouth"],
        "ssim_frame": gt["ssim_frame"],
        "ssim_mouth": gt["ssim_mouth"],
        "lip_sync": float(np.mean(syncs)),
        "lip_sync_runs": [float(s) for s in syncs],
        "drift": drift,
        "fps": speed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="LABEL=PATH (a causal bundle)")
    p.add_argument("--teacher", action="append", default=[], help="LABEL=PATH (a teacher)")
    p.add_argument("--drift-frames", type=int, default=3000)
    p.add_argument("--teacher-drift-frames", type=int, default=300)
    p.add_argument("--frames", type=int, default=250, help="frames per lip-sync run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/distill_table.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    refs = sample_references(2)
    speech = espeak_audio(16000)
    for spec in args.teacher:
        label, path = spec.split("=", 1)
        teacher, bundle = load_teacher(path)

        def generate(ref, audio, n, teacher=teacher, bundle=bundle):
            return teacher.generate(bundle, ref, audio, n)

        def drift_run(ref, audio, generate=generate, n=args.teacher_drift_frames):
            t = time.perf_counter()
            video = generate(ref, audio, n)
            return {**drift_summary(video, ref), "frames": n}, n / (time.perf_counter() - t)

        rows.append(measure(label, generate, bundle, drift_run, speech, refs, args.frames))
    for spec in args.model:
        label, path = spec.split("=", 1)
        bundle = load_model(path)
        generate = stream_generate(bundle)

        def drift_run(ref, audio, bundle=bundle, n=args.drift_frames):
            with torch.inference_mode():
                run = run_stream(bundle, ref, audio, n)
            return {**drift_summary(run.frames, ref), "frames": n}, run.fps

        rows.append(measure(label, generate, bundle, drift_run, speech, refs, args.frames))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{torch.get_num_threads()} torch threads", "rows": rows}
    out.write_text(json.dumps(meta, indent=2))
    print(
        "| model | PSNR frame | PSNR mouth | SSIM frame | SSIM mouth | lip sync | drift end "
        "(frames) | fps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['psnr_frame']:.2f} | {r['psnr_mouth']:.2f} | "
            f"{r['ssim_frame']:.3f} | {r['ssim_mouth']:.3f} | {r['lip_sync']:.3f} | "
            f"{r['drift']['end']:.3f} ({r['drift']['frames']}) | {r['fps']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
