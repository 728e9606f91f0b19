"""`diffstream train`: train the embedded default model from scratch on generated data.

Renders talking-avatar clips with synthetic speech, trains the autoencoder, then the causal
transformer (teacher forcing, then on its own rolled-out history), and writes a bundle that
`--model PATH` (or, copied to models/default/, the default) loads. CPU: about 50 minutes on 2 cores (`--minutes` caps the transformer phase).

`--teacher` instead trains the bidirectional, guided teacher that `diffstream distill` distils
few-step students from: the `--base` bundle's transformer fine-tuned on whole clips with full
attention inside them, flow matching over all noise levels, the audio and the reference dropped
for classifier-free guidance, and the audio guidance scale chosen by measured lip sync.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        default="models/default",
        help="bundle folder to write (with --teacher: artifacts/teacher)",
    )
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=None, help="number of generated clips")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="transformer steps (upper bound)")
    p.add_argument("--minutes", type=float, default=None, help="transformer wall-time budget")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    t = p.add_argument_group("teacher (--teacher)")
    t.add_argument("--teacher", action="store_true", help="train a bidirectional teacher")
    t.add_argument("--base", default="default", help="bundle the teacher starts from")
    t.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    t.add_argument("--clip-blocks", type=int, default=None, help="blocks per teacher clip")
    t.add_argument("--batch", type=int, default=None)
    t.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=None,
        metavar="G",
        help="audio guidance scales to choose from by lip sync",
    )
    t.add_argument(
        "--data-cache", default=None, help="folder that keeps the encoded clips between runs"
    )


def run_teacher(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.errors import ConfigError
    from pipelines.training.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig.quick() if args.quick else TeacherConfig()
    cfg = replace(cfg, base=args.base, seed=args.seed, threads=args.threads, device=args.device)
    for name, value in (
        ("clips", args.clips),
        ("steps", args.steps),
        ("minutes", args.minutes),
        ("clip_blocks", args.clip_blocks),
        ("batch", args.batch),
    ):
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
            cfg = replace(cfg, **{name: value})
    if args.guidance:
        cfg = replace(cfg, guidance_candidates=tuple(args.guidance))
    out = Path(args.output)
    result = train_teacher(cfg, out, progress=not args.quiet, cache_dir=args.data_cache)
    print(
        json.dumps(
            {
                "seconds": round(result.seconds, 1),
                "steps": len(result.losses),
                "guidance": result.teacher.guidance.audio,
                "lip_sync_by_guidance": result.lip_sync,
            }
        )
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from pipelines.training.train import TrainConfig, train

    if args.teacher:
        if args.output == "models/default":
            args.output = "artifacts/teacher"
        return run_teacher(args)

    cfg = TrainConfig.quick() if args.quick else TrainConfig()
    cfg.seed, cfg.threads = args.seed, args.threads
    if args.clips is not None:
        cfg.clips = args.clips
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.steps is not None:
        cfg.dit_steps = args.steps
    if args.minutes is not None:
        cfg.dit_minutes = args.minutes
    out = Path(args.output)
    result = train(cfg, out, progress=not args.quiet)
    summary = {
        "seconds": round(result.seconds, 1),
        "vae_loss_first_last": [result.vae_losses[0], result.vae_losses[-1]],
        "dit_loss_first50_last50": [
            sum(result.dit_losses[:50]) / len(result.dit_losses[:50]),
            sum(result.dit_losses[-50:]) / len(result.dit_losses[-50:]),
        ],
        "dit_steps": len(result.dit_losses),
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0
