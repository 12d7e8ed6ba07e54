#!/bin/bash
# fsd seventeenth session's follow-up: one hold. A fresh calibration in 3 interleaved rounds,
# then 4,096 x 24 seed 26 x3 (the primary), then 1,024 x 120 seed 27 x3 only if it can start
# by 13:51:30 UTC and after at most 13 min 30 s of the hold (the s17 hold's 1,024 x 120 took
# 8 min 05 s: finish by 14:00 and inside the 22-minute bench budget), as planned in
# bench/RESULTS.md #15 (fsd, seventeenth session) follow-up (g).
set -u
cd /work/wt/fsd
PY=.venv/bin/python
OUT=/tmp/fsd17b/hold
mkdir -p $OUT
START=$(date +%s)
echo "[hold] commit $(git rev-parse --short HEAD) $(git status --porcelain | wc -l) changed files; $(date -u +%H:%M:%S)"
$PY bench/fsd.py --calibrate-only --skip-partition --skip-local --skip-mlp --quick --nodes 8 \
  --calibration-rounds 3 --out $OUT/cal > $OUT/cal.log 2>&1 || { echo "calibration failed"; exit 1; }
echo "[hold] calibration done $(date -u +%H:%M:%S); free disk $(df -h /tmp | tail -1 | awk '{print $4}')"
$PY bench/fsd.py --skip-partition --skip-local --skip-mlp --quick --nodes 8 --every-method \
  --budget-s 6 --latency-requests 7 --throughput-requests 16 --shared-passes --seed 26 --repeats 3 \
  --constants $OUT/cal/fsd.json --out $OUT/g26 > $OUT/g26.log 2>&1 || echo "grid 26 failed"
echo "[hold] grid 4096x24 seed 26 done $(date -u +%H:%M:%S)"
ELAPSED=$(( $(date +%s) - START ))
echo "[hold] elapsed ${ELAPSED} s"
if [ "$(date -u +%H%M%S)" -le 135130 ] && [ "$ELAPSED" -le 810 ]; then
  $PY bench/fsd.py --skip-partition --skip-local --skip-mlp --neurons 1024 --layers 120 --nodes 8 \
    --every-method --budget-s 6 --latency-requests 7 --throughput-requests 16 --shared-passes \
    --seed 27 --repeats 3 --constants $OUT/cal/fsd.json --out $OUT/g27 > $OUT/g27.log 2>&1 || echo "grid 27 failed"
  echo "[hold] grid 1024x120 seed 27 done $(date -u +%H:%M:%S)"
else
  echo "[hold] 1024x120 seed 27 skipped by the plan's rule (past 13:51:30 UTC or 810 s held)"
fi
