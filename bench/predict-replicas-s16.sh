#!/bin/bash
# #13 behind gateway replicas, live (bench/RESULTS.md #13, "predict, sixteenth session" 0):
# the same orcbench trace through 1 gateway and 2 gateway replicas of this tree, and 2 replicas
# of main 89a453d (each replica planning alone on its own ingress) with only this session's
# `gpufaas up` fix (it passes --prefetch to its replicas) applied, unpacked at /tmp/predict_base.
# Run inside one quiet-lock hold:
#   bench/quiet.sh bench timeout 470 bench/predict-replicas-s16.sh
# Traces and sizes are made before the hold (/tmp/predict16/traces, under the test lock).
set -u
cd "$(dirname "$0")/.."
traces=/tmp/predict16/traces
run() {  # seed arm
  local seed=$1 arm=$2 gateways=2 env=()
  [ "$arm" = 1 ] && gateways=1
  [ "$arm" = base2 ] && env=(PYTHONPATH=/tmp/predict_base)
  echo "[arm] seed $seed $arm start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  env "${env[@]}" timeout 150 .venv/bin/python bench/predict_live.py --seed "$seed" \
    --minutes 30 --policies ours-f0 --gateways "$gateways" --trace-dir "$traces" \
    --raw "bench/predict-live-raw-s16-$arm.jsonl" --json "bench/predict-live-s16-$arm.json"
  echo "[arm] seed $seed $arm end $(date -u +%T) rc $?" >&2
}
for arm in 1 2 base2; do run 144 $arm; done
for arm in base2 2 1; do run 145 $arm; done
