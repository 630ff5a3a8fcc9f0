#!/usr/bin/env bash
# Cut sweep: one run group per cut ratio and seed in one results file, launched through mpirun.
#   bash bench/sweep_cut.sh [OUT.h5] [extra run options...]
#   CF_CUTS="0 0.2 0.4 0.6 0.8 1.0" (default) CF_NPROC=3 (1 server + 2 clients)
#   CF_SEEDS=3 (default): seeds 0..CF_SEEDS-1 per cut, runs named cut<c>-s<seed>; collafuse-plot
#   draws the mean and a 95% CI over them (figure trends)
# Both baselines are in every sweep: c = 0 (purely central) and c = 1 (purely local).
# CF_SAMPLES=256 (default): images generated per client, enough for KID to be stable
#   (bench/results/kid_convergence.md: the spread over draws is ~10% of a trained model's KID at 256,
#   ~70% at 16); options after OUT.h5 override it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/cut_sweep.h5}
shift || true
. .venv/bin/activate
. scripts/mpi-env.sh
mode=--overwrite
for seed in $(seq 0 $(( ${CF_SEEDS:-3} - 1 ))); do
    for c in ${CF_CUTS:-0 0.2 0.4 0.6 0.8 1.0}; do
        echo "sweep: cut $c seed $seed" >&2
        start=$(date +%s)
        # shellcheck disable=SC2086
        mpirun -n "${CF_NPROC:-3}" $CF_MPIRUN_FLAGS python -m collafuse_mpi.run --cut "$c" --seed "$seed" \
            --run-name "cut$c-s$seed" --output "$out" $mode --quiet \
            --samples-per-client "${CF_SAMPLES:-256}" "$@"
        echo "sweep: cut $c seed $seed took $(( $(date +%s) - start )) s" >&2
        mode=--append
    done
done
