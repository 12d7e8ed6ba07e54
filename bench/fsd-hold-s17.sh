#!/bin/bash
# fsd seventeenth session, hold A: one fresh calibration, then both grids, in one bench hold
set -u
cd /work/wt/fsd
PY=.venv/bin/python
OUT=/tmp/fsd17/hold
echo "[a.sh] commit $(git rev-parse --short HEAD) $(git status --porcelain | wc -l) changed files; $(date -u +%H:%M:%S)"
$PY bench/fsd.py --calibrate-only --skip-partition --skip-local --skip-mlp --quick --nodes 8 \
  --out $OUT/cal > $OUT/cal.log 2>&1 || { echo "calibration failed"; exit 1; }
echo "[a.sh] calibration done $(date -u +%H:%M:%S); free disk $(df -h /tmp | tail -1 | awk '{print $4}')"
$PY bench/fsd.py --skip-partition --skip-local --skip-mlp --quick --nodes 8 --every-method \
  --budget-s 6 --latency-requests 7 --throughput-requests 16 --shared-passes --seed 24 --repeats 3 \
  --constants $OUT/cal/fsd.json --out $OUT/g24 > $OUT/g24.log 2>&1 || echo "grid 24 failed"
echo "[a.sh] grid 4096x24 seed 24 done $(date -u +%H:%M:%S)"
$PY bench/fsd.py --skip-partition --skip-local --skip-mlp --neurons 1024 --layers 120 --nodes 8 \
  --every-method --budget-s 6 --latency-requests 7 --throughput-requests 16 --shared-passes \
  --seed 25 --repeats 3 --constants $OUT/cal/fsd.json --out $OUT/g25 > $OUT/g25.log 2>&1 || echo "grid 25 failed"
echo "[a.sh] grid 1024x120 seed 25 done $(date -u +%H:%M:%S)"
