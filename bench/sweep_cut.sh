#!/usr/bin/env bash
# Cut sweep: one run group per cut ratio in one results file, launched through mpirun.
#   bash bench/sweep_cut.sh [OUT.h5] [extra run options...]
#   CF_CUTS="0 0.2 0.4 0.6 0.8 1.0" (default) CF_NPROC=3 (1 server + 2 clients)
# Both baselines are in every sweep: c = 0 (purely central) and c = 1 (purely local).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/cut_sweep.h5}
shift || true
. .venv/bin/activate
. scripts/mpi-env.sh
mode=--overwrite
for c in ${CF_CUTS:-0 0.2 0.4 0.6 0.8 1.0}; do
    echo "sweep: cut $c" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086
    mpirun -n "${CF_NPROC:-3}" $CF_MPIRUN_FLAGS python -m collafuse_mpi.run --cut "$c" --run-name "cut$c" \
        --output "$out" $mode --quiet "$@"
    echo "sweep: cut $c took $(( $(date +%s) - start )) s" >&2
    mode=--append
done
