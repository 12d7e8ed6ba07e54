#!/bin/bash
# Take turns on a shared machine, so that published figures are measured alone.
#
#   bench/quiet.sh test  COMMAND...   # tests, mypy, anything CPU-heavy: shares the machine with
#                                     # other tests, but never runs during a benchmark
#   bench/quiet.sh bench COMMAND...   # a benchmark whose figures you publish: closes the
#                                     # turnstile to new tests, waits for running ones to end,
#                                     # runs alone, and prints the load average before and after
#
# "quiet lock held" next to a figure in bench/RESULTS.md means it ran as `bench`. Everyone on the
# machine must wrap their commands for it to mean anything. The locks live in
# $GPUFAAS_QUIET_DIR (default /tmp/gpufaas-quiet). A writer-preferring lock: the turnstile keeps
# new tests out while a benchmark waits, so tests that keep coming cannot starve it.
set -euo pipefail
dir="${GPUFAAS_QUIET_DIR:-/tmp/gpufaas-quiet}"
mkdir -p "$dir"
mode="${1:-}"
shift || true
case "$mode" in
  test)
    flock "$dir/turnstile.lock" true
    exec flock -s "$dir/quiet.lock" "$@"
    ;;
  bench)
    exec flock "$dir/turnstile.lock" flock -x "$dir/quiet.lock" bash -c '
      echo "[quiet] start $(date -u +%H:%M:%S) load: $(cut -d" " -f1-3 /proc/loadavg)" >&2
      "$@"; rc=$?
      echo "[quiet] end $(date -u +%H:%M:%S) load: $(cut -d" " -f1-3 /proc/loadavg)" >&2
      exit $rc' quiet "$@"
    ;;
  *)
    echo "usage: bench/quiet.sh test|bench COMMAND..." >&2
    exit 2
    ;;
esac
