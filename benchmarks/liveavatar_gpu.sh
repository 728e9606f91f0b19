#!/usr/bin/env bash
# Live Avatar's 14B on one GPU at random weights (no download): per-step cost, time to first
# frame, a new reference's encoding time and peak memory, in bf16, at Live Avatar's streaming
# size (704x384) and at 832x480. Writes JSON next to the printout.
#   bash benchmarks/liveavatar_gpu.sh [out_dir]      (needs a CUDA GPU with ~40 GB free)
# SIZES ("HxW ...", default "384x704 480x832"), BLOCKS (12), WARMUP (3) and BENCH_FLAGS (extra
# `diffstream bench` flags; default --no-compile: compiling the 14B takes minutes) adjust it;
# benchmarks/gpu.sh runs it at 704x384 only. MODEL and DEVICE (a dry run on the CPU:
# MODEL=liveavatar-tiny DEVICE=cpu SIZES=64x64) too.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT"
BIN="${BIN:-.venv/bin}"
SIZES="${SIZES:-384x704 480x832}"
BLOCKS="${BLOCKS:-12}"
WARMUP="${WARMUP:-3}"
BENCH_FLAGS="${BENCH_FLAGS:---no-compile}"
MODEL="${MODEL:-liveavatar-14b}"
DEVICE="${DEVICE:-cuda}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } \
  | tee "$OUT/liveavatar-gpu.txt"
for size in $SIZES; do
  h="${size%x*}"; w="${size#*x}"
  # shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
  "$BIN/diffstream" bench --model "$MODEL" --device "$DEVICE" --dtype bfloat16 \
    --height "$h" --width "$w" --blocks "$BLOCKS" --warmup "$WARMUP" $BENCH_FLAGS --json \
    > "$OUT/liveavatar-14b-${w}x${h}.json"
  "$BIN/python" - "$OUT/liveavatar-14b-${w}x${h}.json" <<'PY' | tee -a "$OUT/liveavatar-gpu.txt"
import json, sys
r = json.load(open(sys.argv[1]))
ms = 1000
print(f"{r['model']} {r['resolution'][0]}x{r['resolution'][1]} {r['dtype']} on {r['device_name']}: "
      f"step {', '.join(f'{s * ms:.0f}' for s in r['denoise_step_s'])} ms, block {r['block_s'] * ms:.0f} ms "
      f"({r['fps']:.1f} fps on one GPU), first frame {r['time_to_first_frame_s'] * ms:.0f} ms, "
      f"new reference {r['new_reference_s'] * ms:.0f} ms, peak {r['peak_memory_mb'] / 1024:.1f} GiB")
PY
done
