"""Eager vs compiled block step on this machine: `diffstream bench`, alternating rounds.

    .venv/bin/python benchmarks/compile_cpu.py [--model default] [--rounds 5] [--json]

Each round runs `diffstream bench` once eager (--no-compile) and once compiled (--compile), in
that order, as fresh processes (so each compiled run pays its own compile in the warm-up). A
burst of load from other work on a shared machine hits both modes of a round alike; the medians
over the rounds of each mode's median block time, and the median of the per-round ratios, are
what this reports.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def bench(model: str, compiled: bool, threads: int, blocks: int, warmup: int) -> dict:
    cmd = [
        str(BIN / "diffstream"),
        "bench",
        "--model",
        model,
        "--threads",
        str(threads),
        "--blocks",
        str(blocks),
        "--warmup",
        str(warmup),
        "--compile" if compiled else "--no-compile",
        "--json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rounds = []
    for _ in range(args.rounds):
        eager = bench(args.model, False, args.threads, args.blocks, args.warmup)
        comp = bench(args.model, True, args.threads, args.blocks, args.warmup)
        rounds.append(
            dict(
                eager_block_ms=1e3 * eager["block_s"],
                compiled_block_ms=1e3 * comp["block_s"],
                eager_denoise_ms=1e3 * eager["denoise_s"],
                compiled_denoise_ms=1e3 * comp["denoise_s"],
                compiled_warmup_s=comp["warmup_s"],
                eager_warmup_s=eager["warmup_s"],
                speedup=eager["block_s"] / comp["block_s"],
            )
        )
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result = dict(
        model=args.model,
        machine=f"{platform.machine()}, {__import__('os').cpu_count()} cores (shared)",
        threads=args.threads,
        blocks=args.blocks,
        rounds=rounds,
        median=med,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{args.model}, {args.threads} thread(s), {args.rounds} rounds of {args.blocks} blocks"
        )
        print(
            f"  block ms   eager {med['eager_block_ms']:.1f}  compiled {med['compiled_block_ms']:.1f}"
        )
        print(
            f"  denoise ms eager {med['eager_denoise_ms']:.1f}  compiled {med['compiled_denoise_ms']:.1f}"
        )
        print(f"  speed-up (median of rounds) {med['speedup']:.2f}x")
        print(
            f"  warm-up s  eager {med['eager_warmup_s']:.1f}  compiled {med['compiled_warmup_s']:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
