#!/bin/bash
# predict, fifteenth session, plan C (bench/RESULTS.md, #13, "predict, fifteenth session"): the
# fresh-seed confirmation of ours with lru_veto (label family ours-p{}-l1), seeds 110-129, in two
# chains of chunks of <= 3 seeds (one simulator process each), every chunk its own
# `bench/quiet.sh test` turn with --resume on its chain's file, and the clock stop at STOP (UTC,
# default 08:15): no chunk starts after it and a running one is stopped at it (every finished
# run is already in the file). Score: bench/predict-confirm.py A B --family ours-l1.
set -u
cd "$(dirname "$0")/.."
stop=$(date -u -d "${STOP:-08:15}" +%s)
chain() {
  local file=$1
  shift
  [ -f "$file" ] || echo '{"runs": []}' >"$file"
  for chunk in "$@"; do
    local left=$((stop - $(date -u +%s)))
    if [ "$left" -le 0 ]; then
      echo "[chain $file] clock stop: $chunk not started" >&2
      return
    fi
    echo "[chain $file] $chunk queued $(date -u +%H:%M:%S)" >&2
    # the clock stop counts the wait for the lock too; a chunk runs at most 600 s
    PYTHONHASHSEED=0 timeout "$left" bench/quiet.sh test timeout 600 \
      .venv/bin/python bench/predict-bracket.py \
      --seeds "$chunk" --families 'ours-p{}-l1' --workers 1 --resume "$file" --json "$file"
    echo "[chain $file] $chunk rc $? $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  done
}
chain bench/predict-confirm-s15a.json 110,111,112 113,114,115 116,117,118 119 &
chain bench/predict-confirm-s15b.json 120,121,122 123,124,125 126,127,128 129 &
wait
