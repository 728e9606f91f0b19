"""`diffstream distill`: a few-step causal student from a teacher, by self-forcing with DMD.

    diffstream distill --teacher artifacts/teacher --student default --steps 2 -o artifacts/s2

The student (a causal bundle; its transformer is the starting point) generates each training
clip block by block with its own cache and sink, as it will when streaming, and learns from the
difference between the teacher's guided score and a fake score trained online on its samples.
Progress bars show the losses; a checkpoint is written every --checkpoint-every iterations and
`--resume` continues from it. Under torchrun (`torchrun --nproc-per-node N -m stream.cli distill
...`) the student and the fake score are sharded with FSDP and the batch is split over processes.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder (diffstream train --teacher)")
    p.add_argument("--student", default="default", help="causal bundle the student starts from")
    p.add_argument("--steps", type=int, default=2, help="the student's denoising steps")
    p.add_argument("--shift", type=float, default=None, help="the student's schedule shift")
    p.add_argument(
        "--cache-mode", choices=("reencode", "timestep_forcing"), default="timestep_forcing"
    )
    p.add_argument("-o", "--output", required=True, help="student bundle folder to write")
    p.add_argument("--iterations", type=int, default=None, help="student updates (upper bound)")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget for the updates")
    p.add_argument("--batch", type=int, default=None, help="global batch")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--fake-lr", type=float, default=None)
    p.add_argument(
        "--critic-steps", type=int, default=None, help="fake-score updates per student update"
    )
    p.add_argument(
        "--ode-iterations", type=int, default=0, help="ODE-regression warm-start updates (0: none)"
    )
    p.add_argument(
        "--regression",
        type=float,
        default=0.0,
        help="weight of a ground-truth term: the rollout against the renderer's latents (0: none)",
    )
    p.add_argument(
        "--colour",
        type=float,
        default=0.0,
        help="weight of a colour term: mean colours of 16-pixel squares of the decoded rollout "
        "against the true frames, in 8-bit levels squared (0: none)",
    )
    p.add_argument(
        "--dmd-levels",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="range of the DMD noise level draw, in [0, 1] before the teacher's shift "
        "(default 0.02 0.98; low levels act on fine detail, high ones on colour and layout)",
    )
    p.add_argument(
        "--clips",
        type=int,
        default=None,
        help="training clips to render, each a fresh identity and speaker (default 160)",
    )
    p.add_argument(
        "--clip-frames", type=int, default=None, help="video frames per training clip (default 100)"
    )
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="the teacher's audio guidance scale (default: the one it chose by lip sync)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps (smoke test)")
    p.add_argument("--data-cache", default=None, help="folder that keeps the encoded clips")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.errors import ConfigError
    from pipelines.training.distill import DistillConfig, distill

    cfg = DistillConfig.quick() if args.quick else DistillConfig()
    cfg = replace(
        cfg,
        teacher=args.teacher,
        student=args.student,
        steps=args.steps,
        cache_mode=args.cache_mode,
        seed=args.seed,
        threads=args.threads,
        ode_iterations=args.ode_iterations,
        regression=args.regression,
        colour=args.colour,
        device=args.device,
    )
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    if args.dmd_levels is not None:
        lo, hi = args.dmd_levels
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"--dmd-levels must satisfy 0 <= LO < HI <= 1, got {lo} {hi}")
        cfg = replace(cfg, dmd_levels=(lo, hi))
    if args.regression < 0:
        raise ConfigError(f"--regression must not be negative, got {args.regression}")
    if args.colour < 0:
        raise ConfigError(f"--colour must not be negative, got {args.colour}")
    if args.ode_iterations < 0:
        raise ConfigError("--ode-iterations must not be negative")
    for name in (
        "shift",
        "iterations",
        "minutes",
        "batch",
        "lr",
        "fake_lr",
        "critic_steps",
        "checkpoint_every",
        "clips",
        "clip_frames",
    ):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
            cfg = replace(cfg, **{name: value})
    try:
        result = distill(
            cfg,
            args.output,
            progress=not args.quiet,
            resume=args.resume,
            cache_dir=args.data_cache,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    if result.bundle is not None:
        print(json.dumps({"iterations": result.iterations, "seconds": round(result.seconds, 1)}))
    return 0
