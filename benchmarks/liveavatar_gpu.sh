#!/usr/bin/env bash
# Live Avatar's 14B on one GPU at random weights (no download): per-step cost, time to first
# frame, a new reference's encoding time and peak memory, in bf16, at Live Avatar's streaming
# size (704x384) and at 832x480. Writes JSON next to the printout.
#   bash benchmarks/liveavatar_gpu.sh [out_dir]      (needs a CUDA GPU with ~40 GB free)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT"
BIN="${BIN:-.venv/bin}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/liveavatar-gpu.txt"
for size in "384 704" "480 832"; do
  set -- $size
  "$BIN/diffstream" bench --model liveavatar-14b --device cuda --dtype bfloat16 \
    --height "$1" --width "$2" --blocks 12 --warmup 3 --json > "$OUT/liveavatar-14b-$2x$1.json"
  "$BIN/python" - "$OUT/liveavatar-14b-$2x$1.json" <<'PY' | tee -a "$OUT/liveavatar-gpu.txt"
import json, sys
r = json.load(open(sys.argv[1]))
ms = 1000
print(f"{r['model']} {r['resolution'][0]}x{r['resolution'][1]} {r['dtype']} on {r['device_name']}: "
      f"step {', '.join(f'{s * ms:.0f}' for s in r['denoise_step_s'])} ms, block {r['block_s'] * ms:.0f} ms "
      f"({r['fps']:.1f} fps on one GPU), first frame {r['time_to_first_frame_s'] * ms:.0f} ms, "
      f"new reference {r['new_reference_s'] * ms:.0f} ms, peak {r['peak_memory_mb'] / 1024:.1f} GiB")
PY
done
