#!/usr/bin/env bash
# Client-count sweep at one cut: one run group per number of clients in one results file.
#   bash bench/sweep_clients.sh [OUT.h5] [extra run options...]
#   CF_CLIENTS="1 2 4 8" (default) CF_CUT=0.4
# More ranks than cores share them (--oversubscribe): on a small machine this measures
# contention as much as scaling; the server's wait fraction says which.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/client_sweep.h5}
shift || true
. .venv/bin/activate
. scripts/mpi-env.sh
mode=--overwrite
for n in ${CF_CLIENTS:-1 2 4 8}; do
    echo "sweep: $n clients" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086
    mpirun -n "$((n + 1))" $CF_MPIRUN_FLAGS python -m collafuse_mpi.run --cut "${CF_CUT:-0.4}" \
        --run-name "clients$n" --output "$out" $mode --quiet "$@"
    echo "sweep: $n clients took $(( $(date +%s) - start )) s" >&2
    mode=--append
done
