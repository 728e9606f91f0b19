"""`diffstream eval`: lip sync, identity drift (rolling sink on/off, refresh on/off) and speed.

Lip sync is the correlation between the mouth opening measured in the generated frames and the
audio's loudness envelope; drift is each frame's appearance distance from the reference outside
the mouth. Both come from pixels only, so any model is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audio", required=True, help="driving speech (any format FFmpeg reads)")
    p.add_argument("--image", required=True, help="reference image")
    p.add_argument("--model", default="default", help="model name or folder")
    p.add_argument("--frames", type=int, default=250, help="frames for lip sync and speed")
    p.add_argument(
        "--drift-frames", type=int, default=None, help="frames per drift run (default: --frames)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from models.audio import load_audio
    from models.errors import InvalidAudioError
    from models.registry import load_model
    from pipelines.reference import load_reference_image
    from pipelines.training.evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.frames < 3:
        raise InvalidAudioError("--frames must be at least 3 (one block)")
    bundle = load_model(args.model)
    if bundle.notice:
        print(f"note: {bundle.notice}", file=sys.stderr)
    d = bundle.defaults
    reference = load_reference_image(args.image, d.height, d.width)
    audio = load_audio(args.audio, d.audio_sample_rate)
    if audio.size == 0:
        raise InvalidAudioError(f"{args.audio}: no audio samples")
    report, _ = evaluate(bundle, reference, audio, args.frames, args.drift_frames, args.seed)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print(f"lip sync (mouth opening vs loudness, Pearson): {report.lip_sync:.3f}")
    s = report.lip_sync_silence_vs_speech
    print(f"mouth openness: loud {s['openness_loud']:.3f}, quiet {s['openness_quiet']:.3f}")
    print(f"speed: {report.fps:.1f} fps, {report.ms_per_block:.1f} ms per block")
    print("stage share: " + ", ".join(f"{k} {v:.0%}" for k, v in report.stage_share.items()))
    print("identity drift (start / middle / end / mean):")
    for label, row in report.drift.items():
        print(
            f"  {label:22s} {row['start']:.4f} / {row['middle']:.4f} / {row['end']:.4f} / "
            f"{row['mean']:.4f}"
        )
    return 0
