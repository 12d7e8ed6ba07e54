#!/bin/bash
# fsd nineteenth session: one hold, as planned in bench/RESULTS.md #15 "(fsd, nineteenth
# session)" (b). A fresh calibration in 3 interleaved rounds (with the ping-pong runs), then
# 4,096 x 24 seed 30 x3, then 1,024 x 120 seed 31 x3 only if at least 510 s are left when
# the first grid ends. Everything runs under `timeout` to one deadline: 19:39:30 UTC, or 24 min
# 30 s after the hold starts if that is sooner (bench-lock budget 25 min, ending by 19:40). A
# grid cut by the deadline is not scored. The hold never starts before 19:05:00 UTC.
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-/tmp/fsd19/hold}
mkdir -p "$OUT"
START=$(date +%s)
if [ "$START" -lt "$(date -u -d "19:05:00" +%s)" ]; then
  echo "[hold] refused: $(date -u +%H:%M:%S) is before 19:05:00 UTC"; exit 2
fi
END=$(date -u -d "19:39:30" +%s)
[ $((START + 1470)) -lt "$END" ] && END=$((START + 1470))
left() { echo $((END - $(date +%s))); }
echo "[hold] commit $(git rev-parse --short HEAD) $(git status --porcelain | wc -l) changed files; $(date -u +%H:%M:%S); deadline $(date -u -d @"$END" +%H:%M:%S)"
timeout "$(left)" $PY bench/fsd.py --calibrate-only --skip-partition --skip-local --skip-mlp \
  --quick --nodes 8 --calibration-rounds 3 --out "$OUT/cal" > "$OUT/cal.log" 2>&1 \
  || { echo "[hold] calibration failed or cut $(date -u +%H:%M:%S)"; exit 1; }
echo "[hold] calibration done $(date -u +%H:%M:%S); free disk $(df -h /tmp | tail -1 | awk '{print $4}')"
$PY -c "import json,sys; c=json.load(open(sys.argv[1]))['calibration']; print('[hold] primary by the rule:', c['primary_rule']['primary'], c['primary_rule'].get('checks'), 'per_relay_sync_s', c['primary_rule'].get('per_relay_sync_s')); print('[hold] calibration runs off shared memory:', c['links_off_shared_memory'])" "$OUT/cal/fsd.json"
GRID="--skip-partition --skip-local --skip-mlp --nodes 8 --every-method --budget-s 6 \
  --latency-requests 7 --throughput-requests 16 --shared-passes --repeats 3 \
  --constants $OUT/cal/fsd.json"
# shellcheck disable=SC2086
timeout "$(left)" $PY bench/fsd.py $GRID --quick --seed 30 --out "$OUT/g30" > "$OUT/g30.log" 2>&1 \
  || echo "[hold] grid 4096x24 seed 30 failed or cut"
echo "[hold] grid 4096x24 seed 30 done $(date -u +%H:%M:%S); $(left) s left"
if [ "$(left)" -ge 510 ]; then
  # shellcheck disable=SC2086
  timeout "$(left)" $PY bench/fsd.py $GRID --neurons 1024 --layers 120 --seed 31 --out "$OUT/g31" \
    > "$OUT/g31.log" 2>&1 || echo "[hold] grid 1024x120 seed 31 failed or cut"
  echo "[hold] grid 1024x120 seed 31 done $(date -u +%H:%M:%S)"
else
  echo "[hold] 1024x120 seed 31 skipped by the plan's rule (under 510 s left)"
fi
