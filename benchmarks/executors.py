"""The CPU executors against one device, and the planner's prediction for each, from one run.

    python benchmarks/executors.py [--devices cpu:3] [--blocks 12] [--json]

Runs the procedure of tests/test_planner.py's prediction check and prints its figures: the
model is the tiny config with audio cross-attention (2 layers, timestep-forcing mode); costs are
profiled here; the local period is the mean of a one-process run before and after; TPP and
DualParal run on N gloo worker processes (threads=1 each) with two sessions interleaved, and the
period is the steady-state time between completed blocks. The link model is the gloo hop as the
workers measured it. All processes share this machine's cores, so `cores` (measured with a
busy-loop probe, not nproc) bounds what N processes can give.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu:3")
    p.add_argument("--blocks", type=int, default=12, help="blocks per session")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from models.registry import load_model
    from pipelines import planner
    from pipelines.executors import build_executor, parse_devices
    from pipelines.generator import StreamingGenerator
    from tests.multidevice_helpers import (
        available_cores,
        measure_local,
        measured_link,
        pipeline_throughput,
        save_test_model,
    )

    torch.set_num_threads(1)
    n = len(parse_devices(args.devices))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = save_test_model(tmp)
        gen = StreamingGenerator.from_bundle(load_model(model), cache_mode="timestep_forcing")
        shape = planner.model_shape(model, dtype="float32", cache_mode="timestep_forcing")
        costs = planner.profile_costs(shape, device="cpu", dtype=torch.float32, repeats=5)
        for strategy in ("tpp", "dualparal"):
            cores_before = available_cores()
            before = measure_local(gen, 6)
            ex = build_executor(
                strategy, model=model, devices=args.devices, threads=1, timeout_s=60, verbose=False
            )
            try:
                steady = range(shape.steps, args.blocks - shape.steps + 1)
                period, stats = pipeline_throughput(ex, args.blocks, steady)
            finally:
                ex.close()
            after = measure_local(gen, 6)
            cores = min(float(n), (cores_before + available_cores()) / 2)
            local = (before["period"] + after["period"]) / 2
            link = measured_link(stats)
            predict = planner.predict_tpp if strategy == "tpp" else planner.predict_dualparal
            pred = predict(shape, costs, n, link, cores=cores)
            local_pred = planner.predict_local(shape, costs)
            rows.append(
                {
                    "strategy": strategy,
                    "devices": args.devices,
                    "cores": round(cores, 2),
                    "local_block_ms": 1e3 * local,
                    "block_ms": 1e3 * period,
                    "measured_speedup": local / period,
                    "predicted_local_block_ms": 1e3 * local_pred.period_s,
                    "predicted_block_ms": 1e3 * pred.period_s,
                    "predicted_speedup": local_pred.period_s / pred.period_s,
                    "link_latency_ms": 1e3 * link.latency_s,
                    "link_cpu_ms": 1e3 * link.cpu_s,
                }
            )
    if args.json:
        print(json.dumps({"machine": platform.machine(), "rows": rows}))
        return 0
    print(f"{platform.machine()}, model: tiny + audio (2 layers), timestep forcing")
    print(
        "strategy   devices  cores  local ms  block ms  speed-up  | predicted: local  block  speed-up"
    )
    for r in rows:
        print(
            f"{r['strategy']:<10} {r['devices']:<8} {r['cores']:>5.2f} {r['local_block_ms']:>9.1f}"
            f" {r['block_ms']:>9.1f} {r['measured_speedup']:>8.2f}x |"
            f" {r['predicted_local_block_ms']:>15.1f} {r['predicted_block_ms']:>6.1f}"
            f" {r['predicted_speedup']:>8.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
