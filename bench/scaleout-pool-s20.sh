#!/bin/bash
# The twentieth session's pre-registered pool (bench/RESULTS.md #16, "A fourth pool of request
# forwarding at 4 replicas, sized to decide (integrator, twentieth session)"). Run from a clone
# of the plan's commit with its own .venv, under one `bench/quiet.sh bench` hold:
#   bench/quiet.sh bench bash bench/scaleout-pool-s20.sh OUTDIR
# Fresh seeds 98, 99, ... in order; one gateway and 4 replicas per round on one trace, order
# 1,4 for an even seed and 4,1 for an odd one. A round starts only if fewer than 48 rounds have
# completed and it can end by 22:55:00 UTC at the longest round seen so far (170 s before any,
# and never less than 170 s).
set -uo pipefail
out="$1"
mkdir -p "$out"
end=$(date -u -d "22:55:00" +%s)
longest=170
done_rounds=0
seed=98
while [ "$done_rounds" -lt 48 ]; do
  now=$(date -u +%s)
  if [ $((now + longest)) -gt "$end" ]; then
    echo "[pool] stop: seed $seed cannot end by 22:55 at $longest s a round" >&2
    break
  fi
  if [ $((seed % 2)) -eq 0 ]; then order="1,4"; else order="4,1"; fi
  started=$(date -u +%s)
  echo "[pool] seed $seed order $order start $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" >&2
  if .venv/bin/python bench/lalb.py --mode live --gateways "$order" --wss 16 --zipf 1.1 \
      --live-requests 1500 --live-seconds 120 --live-device-memory 20Ki \
      --saturation-seconds 3 --json --seed "$seed" > "$out/scaleout-round-s20-s$seed.json" \
      2> "$out/round-s$seed.log"; then
    done_rounds=$((done_rounds + 1))
  else
    echo "[pool] seed $seed FAILED (reported, left out, not replaced)" >&2
  fi
  took=$(( $(date -u +%s) - started ))
  [ "$took" -gt "$longest" ] && longest=$took
  echo "[pool] seed $seed end $(date -u +%H:%M:%S) took ${took}s" >&2
  seed=$((seed + 1))
done
echo "[pool] rounds completed: $done_rounds" >&2
