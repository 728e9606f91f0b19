"""Identity drift over every held-out face × sentence pair, not one: the table's drift column
(`distill_table.py`) streams one face and one sentence, and two models can tie there and differ
on another face.

    .venv/bin/python benchmarks/drift_faces.py "current=DIR_A" "student=DIR_B" [--frames 3000]

For each model: the two held-out reference faces of `sample_references(2)` × the two espeak-ng
sentences of `distill_table.py`, each streamed for `--frames` frames with the rolling sink
(`run_stream`, the audio looped), drift summarised as in the table (start / middle / end windows,
mean); then the mean over the four runs of the end window and of the whole-run mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from distill_table import espeak_audio  # noqa: E402

from models.registry import load_model  # noqa: E402
from pipelines.training.evaluate import drift_summary, run_stream  # noqa: E402
from pipelines.training.report import sample_references  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=PATH (a causal bundle)")
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    refs, speech = sample_references(2), espeak_audio(16000)
    out = {}
    for spec in args.models:
        label, path = spec.split("=", 1)
        bundle, runs = load_model(path), []
        for i, ref in enumerate(refs):
            for j, audio in enumerate(speech):
                with torch.inference_mode():
                    run = run_stream(bundle, ref, audio, args.frames)
                d = drift_summary(run.frames, ref)
                runs.append({"face": i, "sentence": j, **d})
                print(label, json.dumps({k: round(v, 4) for k, v in runs[-1].items()}), flush=True)
        out[label] = {
            "runs": runs,
            "end_mean": float(np.mean([r["end"] for r in runs])),
            "mean_mean": float(np.mean([r["mean"] for r in runs])),
        }
        print(f"{label}: end {out[label]['end_mean']:.4f}, mean {out[label]['mean_mean']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
