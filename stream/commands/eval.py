"""`diffstream eval`: lip sync, identity drift (rolling sink on/off, refresh on/off), speed, and
PSNR/SSIM against ground truth.

Lip sync is the correlation between the mouth opening measured in the generated frames and the
audio's loudness envelope; drift is each frame's appearance distance from the reference outside
the mouth. Both come from pixels only, so any model is measured the same way; they need --audio
and --image. Ground truth needs neither: the procedural renderer draws held-out identities
saying held-out speech, the model generates from each clip's reference and audio, and its
frames are compared with the rendered ones (PSNR and SSIM, whole frame and mouth box), next to
the same scores for a still reference image. Without --audio and --image only that part runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--audio", default=None, help="driving speech (any format FFmpeg reads); with --image"
    )
    p.add_argument("--image", default=None, help="reference image; with --audio")
    p.add_argument("--model", default="default", help="model name or folder")
    p.add_argument("--frames", type=int, default=250, help="frames for lip sync and speed")
    p.add_argument(
        "--drift-frames", type=int, default=None, help="frames per drift run (default: --frames)"
    )
    p.add_argument(
        "--ground-truth",
        type=int,
        default=3,
        metavar="N",
        help="held-out rendered clips to score PSNR/SSIM against (default 3; 0: skip)",
    )
    p.add_argument(
        "--ground-truth-frames", type=int, default=100, help="frames per ground-truth clip (100)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _print_ground_truth(gt: dict) -> None:
    clips = f"{gt['clips']} held-out clip" + "s" * (gt["clips"] != 1)
    print(f"ground truth ({clips} x {gt['frames']} frames; whole frame / mouth):")
    for label, row in (("generated", gt), ("still reference", gt["reference"])):
        print(
            f"  {label:16s} PSNR {row['psnr_frame']:.2f} / {row['psnr_mouth']:.2f} dB, "
            f"SSIM {row['ssim_frame']:.3f} / {row['ssim_mouth']:.3f}"
        )


def run(args: argparse.Namespace) -> int:
    import torch

    from models.audio import load_audio
    from models.errors import ConfigError, InvalidAudioError
    from models.registry import load_model
    from pipelines.reference import load_reference_image
    from pipelines.training.evaluate import evaluate, ground_truth_scores, stream_generate

    if (args.audio is None) != (args.image is None):
        raise ConfigError("--audio and --image go together (or leave both out for ground truth)")
    streamed = args.audio is not None
    if not streamed and args.ground_truth <= 0:
        raise ConfigError("nothing to evaluate: give --audio and --image, or --ground-truth N > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if streamed and args.frames < 3:
        raise InvalidAudioError("--frames must be at least 3 (one block)")
    if args.ground_truth > 0 and args.ground_truth_frames < 3:
        raise ConfigError("--ground-truth-frames must be at least 3 (one block)")
    bundle = load_model(args.model)
    if bundle.notice:
        print(f"note: {bundle.notice}", file=sys.stderr)
    d = bundle.defaults
    if args.ground_truth > 0 and d.height != d.width:
        raise ConfigError(f"ground truth renders square clips; the model is {d.width}x{d.height}")
    report = None
    if streamed:
        reference = load_reference_image(args.image, d.height, d.width)
        audio = load_audio(args.audio, d.audio_sample_rate)
        if audio.size == 0:
            raise InvalidAudioError(f"{args.audio}: no audio samples")
        report, _ = evaluate(bundle, reference, audio, args.frames, args.drift_frames, args.seed)
    ground_truth = {}
    if args.ground_truth > 0:
        ground_truth = ground_truth_scores(
            stream_generate(bundle, seed=args.seed),
            count=args.ground_truth,
            frames=args.ground_truth_frames,
            size=d.height,
            seed=args.seed,
            fps=d.fps,
            sample_rate=d.audio_sample_rate,
        )
    if report is not None:
        report.ground_truth = ground_truth
    if args.json:
        out = report.to_dict() if report is not None else {"ground_truth": ground_truth}
        print(json.dumps(out))
        return 0
    if report is not None:
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
    if ground_truth:
        _print_ground_truth(ground_truth)
    return 0
