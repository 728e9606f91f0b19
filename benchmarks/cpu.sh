#!/usr/bin/env bash
# Every CPU figure in BENCHMARKS.md, one command each; JSON lands in benchmarks/results/.
#   bash benchmarks/cpu.sh            (about 25 minutes on 2 cores, then the hour-long soak;
#                                      run it on an idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=benchmarks/results
mkdir -p "$OUT"
uname -m > "$OUT/machine.txt"; nproc >> "$OUT/machine.txt"; $BIN/python -c "import torch; print(torch.__version__)" >> "$OUT/machine.txt"

# Engine, the shipped default model at its size and larger, 2 threads (real time needs >= 25 fps)
$BIN/diffstream bench --model default --threads 2 --blocks 40 --json > "$OUT/bench-default.json"
$BIN/diffstream bench --model default --threads 2 --blocks 40 --cache-mode timestep_forcing --json > "$OUT/bench-default-tf.json"
for s in 192 256; do
  $BIN/diffstream bench --model default --threads 2 --blocks 20 --height $s --width $s --json > "$OUT/bench-default-$s.json"
done
$BIN/diffstream bench --model tiny --threads 2 --blocks 40 --json > "$OUT/bench-tiny.json"
$BIN/diffstream bench --model tiny --threads 1 --blocks 40 --cache-mode timestep_forcing --json > "$OUT/bench-tiny-tf-1thread.json"

# Eager vs compiled block step (the serve/render/bench default), alternating rounds
$BIN/python benchmarks/compile_cpu.py --model default --rounds 5 --json > "$OUT/compile-cpu-default.json"

# Lip sync, drift and speed of the default model on speech it never heard (espeak-ng)
espeak-ng -w /tmp/diffstream-espeak.wav "Good morning. I am a talking avatar generated block by block, in real time, from the sound of your voice. Ask me anything you like, and I will answer for as long as you want."
$BIN/diffstream eval --audio /tmp/diffstream-espeak.wav --image models/default/refs/ref0.png --frames 300 --threads 2 --json > "$OUT/eval-default.json"

# The service: K concurrent sessions of the default model, aiortc clients on the same machine
$BIN/python benchmarks/sessions.py --sessions 1 2 --seconds 15 --model default --json > "$OUT/sessions-default.json"

# Multi-process executors on the CPU vs one process, with the planner's predictions
$BIN/python benchmarks/executors.py --devices cpu:3 --json > "$OUT/executors-cpu3.json"

# Planner: 5 devices for the Wan 1.3B and 14B architectures, costs profiled on this CPU
# (1 latent frame at an eighth of the size per side, scaled by FLOPs), 400 Gb/s links
for m in wan-1.3b wan-14b; do
  for hw in "480 832" "400 720"; do
    set -- $hw
    $BIN/diffstream plan --model $m --devices 5 --link-gbps 400 --height $1 --width $2 \
      --profile-device cpu --profile-frames 1 --profile-downscale 8 --dtype float32 --threads 2 \
      --cache-mode timestep_forcing --json > "$OUT/plan-$m-$1x$2.json"
  done
done

# Soak: one av-probe session streams for an hour; RSS, fds, threads, tasks, block latency, fps
# and the A/V offset at the receiver every minute, with their slopes per hour (last: 60 minutes)
$BIN/python benchmarks/soak.py --minutes 60 --sessions 1 --model av-probe --json > "$OUT/soak-60min.json"
