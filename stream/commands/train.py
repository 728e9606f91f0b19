"""`diffstream train`: train the embedded default model from scratch on generated data.

Renders talking-avatar clips with synthetic speech, trains the autoencoder, then the causal
transformer (teacher forcing, then on its own rolled-out history), and writes a bundle that
`--model PATH` (or, copied to models/default/, the default) loads. CPU: about 50 minutes on 2 cores (`--minutes` caps the transformer phase).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="models/default", help="bundle folder to write")
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=None, help="number of generated clips")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="transformer steps (upper bound)")
    p.add_argument("--minutes", type=float, default=None, help="transformer wall-time budget")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pipelines.training.train import TrainConfig, train

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
