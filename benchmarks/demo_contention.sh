#!/usr/bin/env bash
# The demo's search twice, alone and then beside a CPU hog (one busy loop per core), each into its
# own folder and MLflow store; prints both tables (the goal: the alone run's speed-ups must be > 1,
# the contended run must agree within its spread or mark its rows unreliable).
#   bash benchmarks/demo_contention.sh [OUT]        # OUT defaults to /tmp/prunepipe-contention
# Makes the digits first if missing. Run it with nothing else on the machine.
set -uo pipefail
out=${1:-/tmp/prunepipe-contention}
py=${PYTHON:-.venv/bin/python}
export TQDM_DISABLE=1
# Ray runs its workers at nice 15 so that they yield to other processes: beside nice-0 busy loops a
# trial then gets a few % of a core (the l1 trial made no epoch in 10 minutes). At 0 the hogs and
# the trials share the cores equally, which is the contention this benchmark is about.
export RAY_worker_niceness=${RAY_worker_niceness:-0}

search() {  # NAME: one demo search; prints its table and exit status
  local t0=$SECONDS
  "$py" -m launch.cli search configs/demo.yaml output_dir="$out/$1" \
    registry.tracking_uri="sqlite:///$out/$1/mlflow.db" >"$out/$1.log" 2>&1
  local rc=$?
  sed -n '/^trial /,$p' "$out/$1.log"
  grep '^prunepipe: ' "$out/$1.log" || true
  echo "($1: exit status $rc, $((SECONDS - t0)) s)"
}

rm -rf "$out" && mkdir -p "$out"
[ -f data/digits/dataset.json ] || "$py" -m launch.cli data digits --out data/digits >/dev/null
echo "## alone"
search alone
hogs=()
for _ in $(seq "$(nproc)"); do "$py" -c 'while True: pass' & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
echo "## beside $(nproc) busy loops (the whole search, the final re-measurement included)"
search contended
