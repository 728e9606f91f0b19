#!/usr/bin/env bash
# Every GPU figure in one run on one GPU, in at most 8 minutes (BUDGET_S, default 480):
#   make install && bash benchmarks/gpu.sh [out_dir]        (default benchmarks/results/gpu)
#
#  1. Wan 1.3B layout, 832x480, 4 steps, 3-latent-frame blocks, random weights, bf16:
#     eager / compiled (CUDA graphs) / compiled + FP8: fps, first frame, per-step and decode
#     ms, peak memory, MFU of the denoise step (FLOPs from the model's shapes / device peak).
#  2. FP8's drift from bf16: PSNR of the frames over a 100-block stream at the same seed.
#  3. Live Avatar's 14B layout at 704x384 (the measurement of benchmarks/liveavatar_gpu.sh, at
#     one size and fewer blocks): per step, first frame, memory; then `diffstream plan
#     --devices 5` fed with those measured costs.
#  4. pytest -m gpu: bf16 on the device, CUDA-graph replay = eager, no host sync in a block.
#
# Each stage runs under `timeout` with what is left of the budget and records its status, so
# one slow or failing stage (a compile that takes too long) leaves the others' figures. Writes
# $OUT/*.json, $OUT/gpu.json (everything) and $OUT/gpu.md (the table for BENCHMARKS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
BIN="${BIN:-.venv/bin}"
BUDGET_S="${BUDGET_S:-480}"
BLOCKS="${BLOCKS:-20}"
DRIFT_BLOCKS="${DRIFT_BLOCKS:-100}"
DEVICE="${DEVICE:-cuda}"
# A dry run of the pieces on the CPU: DEVICE=cpu WAN_MODEL=tiny WAN_SIZE=128x128 LA_MODEL=
# liveavatar-tiny LA_SIZE=64x64 BLOCKS=2 DRIFT_BLOCKS=3 bash benchmarks/gpu.sh /tmp/gpu-dry
WAN_MODEL="${WAN_MODEL:-wan-1.3b}"
WAN_SIZE="${WAN_SIZE:-480x832}"
LA_MODEL="${LA_MODEL:-liveavatar-14b}"
LA_SIZE="${LA_SIZE:-384x704}"
mkdir -p "$OUT"
DEADLINE=$((SECONDS + BUDGET_S))
: > "$OUT/stages.tsv"

# stage NAME LIMIT_S CMD...: stdout to $OUT/NAME.out, stderr to $OUT/NAME.err, status recorded.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    printf '%s\tskipped (out of time)\t0\n' "$name" >> "$OUT/stages.tsv"
    echo "== $name: skipped, out of time" >&2
    return 0
  fi
  echo "== $name (at most ${limit}s)" >&2
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="timed out after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed (exit $rc): $(tail -n 1 "$OUT/$name.err")"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$OUT/stages.tsv"
  echo "   $status in $((SECONDS - t0))s" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
"$BIN/python" -c "import torch, platform; print(torch.__version__, torch.version.cuda, platform.python_version())" >> "$OUT/gpu.txt" 2>&1

BENCH=("$BIN/diffstream" bench --model "$WAN_MODEL" --device "$DEVICE" --dtype bfloat16
  --height "${WAN_SIZE%x*}" --width "${WAN_SIZE#*x}" --steps 4 --blocks "$BLOCKS" --warmup 2 --json)
stage wan13b-eager 90 "${BENCH[@]}" --no-compile
stage wan13b-compiled 150 "${BENCH[@]}" --compile
stage wan13b-compiled-fp8 150 "${BENCH[@]}" --compile --quant fp8
stage fp8-drift 70 "$BIN/python" benchmarks/drift.py --model "$WAN_MODEL" --device "$DEVICE" \
  --quant fp8 --blocks "$DRIFT_BLOCKS" --height "${WAN_SIZE%x*}" --width "${WAN_SIZE#*x}" \
  --json "$OUT/fp8-drift.json"
LA_H="${LA_SIZE%x*}" LA_W="${LA_SIZE#*x}"
LA_JSON="$OUT/liveavatar-14b-${LA_W}x${LA_H}.json"
stage liveavatar-14b 90 env MODEL="$LA_MODEL" DEVICE="$DEVICE" SIZES="$LA_SIZE" BLOCKS=6 \
  WARMUP=2 BENCH_FLAGS=--no-compile BIN="$BIN" bash benchmarks/liveavatar_gpu.sh "$OUT"
if [[ -s "$LA_JSON" ]]; then
  stage plan-14b-5gpu 40 "$BIN/diffstream" plan --model liveavatar-14b --devices 5 \
    --height "$LA_H" --width "$LA_W" --link-gbps 400 --bench-json "$LA_JSON" --json
fi
# pytest comes with `make install-dev`; on a bare `make install` bring it in for this stage.
"$BIN/python" -c "import pytest, pytest_timeout" 2> /dev/null \
  || "$BIN/pip" install -q pytest pytest-timeout > "$OUT/pip.log" 2>&1 || true
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
stage pytest-gpu 90 "$BIN/python" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"

"$BIN/python" - "$OUT" <<'PY'
"""Collect the stages' JSON into gpu.json and the Markdown table gpu.md."""
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])


def load(name):
    for path in (out / f"{name}.json", out / f"{name}.out"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


stages = {}
for line in (out / "stages.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    stages[name] = {"status": status, "seconds": int(seconds)}
runs = {n: load(n) for n in ("wan13b-eager", "wan13b-compiled", "wan13b-compiled-fp8")}
runs["liveavatar-14b"] = next(
    (json.loads(p.read_text()) for p in sorted(out.glob("liveavatar-14b-*x*.json"))), None
)
drift, plan = load("fp8-drift"), load("plan-14b-5gpu")
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
(out / "gpu.json").write_text(
    json.dumps({"gpu": gpu, "stages": stages, "runs": runs, "fp8_drift": drift, "plan": plan},
               indent=2) + "\n"
)
ms = 1000
rows = [
    "| model, size | mode | fps | first frame ms | step ms | decode ms | peak GiB | MFU |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
]
labels = {
    "wan13b-eager": ("Wan 1.3B layout, 832x480", "eager bf16"),
    "wan13b-compiled": ("Wan 1.3B layout, 832x480", "compiled bf16"),
    "wan13b-compiled-fp8": ("Wan 1.3B layout, 832x480", "compiled + FP8"),
    "liveavatar-14b": ("Live Avatar 14B layout, 704x384", "eager bf16"),
}
for key, (model, mode) in labels.items():
    r = runs.get(key)
    stage = stages.get(key, {})
    if not r:
        rows.append(f"| {model} | {mode} | {stage.get('status', 'not run')} | | | | | |")
        continue
    step = sorted(r["denoise_step_s"])[len(r["denoise_step_s"]) // 2]
    mfu = f"{r['mfu']:.0%}" if r.get("mfu") is not None else "n/a"
    rows.append(
        f"| {model} | {mode} | {r['fps']:.1f} | {r['time_to_first_frame_s'] * ms:.0f} | "
        f"{step * ms:.1f} | {r['decode_s'] * ms:.1f} | {r['peak_memory_mb'] / 1024:.1f} | {mfu} |"
    )
lines = [f"GPU: {gpu.splitlines()[-2] if len(gpu.splitlines()) > 1 else gpu}", "", *rows, ""]
if drift:
    lines.append(
        f"FP8 drift from bf16 (Wan 1.3B layout, {drift['blocks']} blocks, same seed): PSNR first "
        f"{drift['psnr_first_db']:.1f} dB, median {drift['psnr_median_db']:.1f} dB, worst "
        f"{drift['psnr_min_db']:.1f} dB, last 10 blocks {drift['psnr_last10_db']:.1f} dB."
    )
if plan:
    for p in plan["predictions"]:
        lines.append(
            f"Planned {p['strategy']} on 5 GPUs ({p['layout']}) from the measured 14B costs: "
            f"{p['fps']:.1f} fps, first frame {p['time_to_first_frame_s'] * ms:.0f} ms."
        )
lines.append("")
lines += [f"- {name}: {s['status']} ({s['seconds']} s)" for name, s in stages.items()]
(out / "gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
