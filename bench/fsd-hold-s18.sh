#!/bin/bash
# fsd eighteenth session: one hold, as planned in bench/RESULTS.md #15 "(fsd, eighteenth
# session)" (b). A fresh calibration in 3 interleaved rounds, then 4,096 x 24 seed 28 x3 (the
# primary), then 1,024 x 120 seed 29 x3 only if it can start by 16:35:30 UTC. Everything runs
# under `timeout` to a deadline: 16:44:30 UTC, or 24 min 30 s after the hold starts if that is
# sooner (the bench-lock budget is 25 min, ending by 16:45). A grid cut by the deadline is not
# scored.
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-/tmp/fsd18/hold}
mkdir -p "$OUT"
START=$(date +%s)
END=$(date -u -d "16:44:30" +%s)
[ $((START + 1470)) -lt "$END" ] && END=$((START + 1470))
left() { echo $((END - $(date +%s))); }
echo "[hold] commit $(git rev-parse --short HEAD) $(git status --porcelain | wc -l) changed files; $(date -u +%H:%M:%S); deadline $(date -u -d @"$END" +%H:%M:%S)"
timeout "$(left)" $PY bench/fsd.py --calibrate-only --skip-partition --skip-local --skip-mlp \
  --quick --nodes 8 --calibration-rounds 3 --out "$OUT/cal" > "$OUT/cal.log" 2>&1 \
  || { echo "[hold] calibration failed or cut $(date -u +%H:%M:%S)"; exit 1; }
echo "[hold] calibration done $(date -u +%H:%M:%S); free disk $(df -h /tmp | tail -1 | awk '{print $4}')"
GRID="--skip-partition --skip-local --skip-mlp --nodes 8 --every-method --budget-s 6 \
  --latency-requests 7 --throughput-requests 16 --shared-passes --repeats 3 \
  --constants $OUT/cal/fsd.json"
# shellcheck disable=SC2086
timeout "$(left)" $PY bench/fsd.py $GRID --quick --seed 28 --out "$OUT/g28" > "$OUT/g28.log" 2>&1 \
  || echo "[hold] grid 4096x24 seed 28 failed or cut"
echo "[hold] grid 4096x24 seed 28 done $(date -u +%H:%M:%S); $(left) s left"
if [ "$(date -u +%H%M%S)" -le 163530 ]; then
  # shellcheck disable=SC2086
  timeout "$(left)" $PY bench/fsd.py $GRID --neurons 1024 --layers 120 --seed 29 --out "$OUT/g29" \
    > "$OUT/g29.log" 2>&1 || echo "[hold] grid 1024x120 seed 29 failed or cut"
  echo "[hold] grid 1024x120 seed 29 done $(date -u +%H:%M:%S)"
else
  echo "[hold] 1024x120 seed 29 skipped by the plan's rule (past 16:35:30 UTC)"
fi
