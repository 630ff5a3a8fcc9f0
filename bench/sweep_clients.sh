#!/usr/bin/env bash
# Client-count sweep at one cut: one run group per number of clients and seed in one results file.
#   bash bench/sweep_clients.sh [OUT.h5] [extra run options...]
#   CF_CLIENTS="1 2 4 8" (default) CF_CUT=0.4 CF_SEEDS=1 (seeds 0..CF_SEEDS-1, runs clients<n>-s<seed>)
# More ranks than cores share them (--oversubscribe): on a small machine this measures
# contention as much as scaling; the server's wait fraction says which.
# CF_SAMPLES=256 (default): images generated per client, enough for KID to be stable
#   (bench/results/kid_convergence.md: the spread over draws is ~10% of a trained model's KID at 256,
#   ~70% at 16); options after OUT.h5 override it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/client_sweep.h5}
shift || true
. .venv/bin/activate
. scripts/mpi-env.sh
mode=--overwrite
for seed in $(seq 0 $(( ${CF_SEEDS:-1} - 1 ))); do
    for n in ${CF_CLIENTS:-1 2 4 8}; do
        echo "sweep: $n clients seed $seed" >&2
        start=$(date +%s)
        # shellcheck disable=SC2086
        mpirun -n "$((n + 1))" $CF_MPIRUN_FLAGS python -m collafuse_mpi.run --cut "${CF_CUT:-0.4}" --seed "$seed" \
            --run-name "clients$n-s$seed" --output "$out" $mode --quiet \
            --samples-per-client "${CF_SAMPLES:-256}" "$@"
        echo "sweep: $n clients seed $seed took $(( $(date +%s) - start )) s" >&2
        mode=--append
    done
done
