"""The measurement behind tests/test_planner.py::test_predictions_agree_with_the_cpu_executors,
in a process of its own:

    python -m tests.planner_agreement MODEL_DIR tpp|dualparal [ROUNDS]   -> JSON list of rounds

The pipeline's driver runs in the measuring process (it feeds stage 0 and takes the last
stage's blocks), so that process is one of the pipeline's stages. Inside a long pytest run the
driver shares its interpreter with whatever earlier tests left behind (threads, event loops,
a large heap), and in two full-suite runs the measured speed-up came out 25 % under the same
test run on its own (0.70-0.77 against 0.97); a fresh interpreter measures the executors, not
the test session's history.
"""

from __future__ import annotations

import json
import sys

import torch

from pipelines import planner
from pipelines.generator import StreamingGenerator
from tests.multidevice_helpers import engine_cpu, pipeline_run


def agreement_round(executor, strategy: str, shape, gen) -> dict[str, float]:
    """One round: profile, one device, the pipeline's steady state, one device again."""
    costs = planner.profile_costs(shape, device="cpu", dtype=torch.float32, repeats=5)
    before = engine_cpu(gen, 4)
    steps, blocks = shape.steps, 16
    run = pipeline_run(executor, blocks, range(steps, blocks - steps + 1))
    after = engine_cpu(gen, 4)
    one_device = (before["block_cpu"] + after["block_cpu"]) / 2  # one device at full speed
    predict = planner.predict_tpp if strategy == "tpp" else planner.predict_dualparal
    pred = predict(shape, costs, 3, run.link, cores=run.cores)
    predicted = planner.predict_local(shape, costs).period_s / pred.period_s
    measured = one_device / run.period_s
    return dict(
        ratio=measured / predicted,
        predicted=predicted,
        measured=measured,
        cores=run.cores,
        period_ms=1e3 * run.period_s,
        predicted_period_ms=1e3 * pred.period_s,
        one_device_ms=1e3 * one_device,
        link_cpu_ms=1e3 * run.link.cpu_s,
    )


def measure(model_dir: str, strategy: str, rounds: int = 7) -> list[dict[str, float]]:
    """`rounds` agreement rounds of `strategy` on 3 CPU worker processes (threads=1)."""
    from models.registry import load_model
    from pipelines.executors import build_executor

    torch.set_num_threads(1)
    gen = StreamingGenerator.from_bundle(load_model(model_dir), cache_mode="timestep_forcing")
    shape = planner.model_shape(model_dir, dtype="float32", cache_mode="timestep_forcing")
    ex = build_executor(
        strategy, model=model_dir, devices="cpu:3", threads=1, timeout_s=60, verbose=False
    )
    try:
        pipeline_run(ex, 6, range(2, 4))  # warm-up: first blocks, allocator, page-ins
        return [agreement_round(ex, strategy, shape, gen) for _ in range(rounds)]
    finally:
        ex.close()


if __name__ == "__main__":
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    print(json.dumps(measure(sys.argv[1], sys.argv[2], n)))
