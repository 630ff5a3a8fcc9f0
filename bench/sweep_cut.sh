#!/usr/bin/env bash
# Cut sweep: one run group per cut ratio and seed in one results file, launched through mpirun.
#   bash bench/sweep_cut.sh [OUT.h5] [extra run options...]
#   CF_CUTS="0 0.2 0.4 0.6 0.8 1.0" (default) CF_NPROC=3 (1 server + 2 clients)
#   CF_SEEDS=3 (default): seeds 0..CF_SEEDS-1 per cut, runs named cut<c>-s<seed>; collafuse-plot
#   draws the mean and a 95% CI over them (figure trends)
# Both baselines are in every sweep: c = 0 (purely central) and c = 1 (purely local).
# CF_CUT_NOISE="fresh" (default; e.g. "fresh per_image" for both): privacy.cut_noise of each run,
#   runs named cut<c>-<mode>-s<seed> for modes other than fresh. At c = 0 and c = 1 the modes are
#   the same run (the server receives x0, or nothing), so only fresh runs there.
# CF_IF_EXISTS=overwrite (default) or append: what the first run does to an existing OUT.h5.
# CF_SAMPLES=256 (default): images generated per client, enough for KID to be stable
#   (bench/results/kid_convergence.md: the spread over draws is ~10% of a trained model's KID at 256,
#   ~70% at 16); options after OUT.h5 override it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/cut_sweep.h5}
shift || true
. .venv/bin/activate
. scripts/mpi-env.sh
mode=--${CF_IF_EXISTS:-overwrite}
modes=${CF_CUT_NOISE:-fresh}
for seed in $(seq 0 $(( ${CF_SEEDS:-3} - 1 ))); do
  for noise in $modes; do
    tag=""
    [ "$noise" = fresh ] || tag="-$noise"
    for c in ${CF_CUTS:-0 0.2 0.4 0.6 0.8 1.0}; do
        if [ "$noise" != fresh ] && { [ "$(printf '%g' "$c")" = 0 ] || [ "$(printf '%g' "$c")" = 1 ]; }; then
            continue
        fi
        echo "sweep: cut $c seed $seed cut noise $noise" >&2
        start=$(date +%s)
        # shellcheck disable=SC2086
        mpirun -n "${CF_NPROC:-3}" $CF_MPIRUN_FLAGS python -m collafuse_mpi.run --cut "$c" --seed "$seed" \
            --run-name "cut$c$tag-s$seed" --output "$out" $mode --quiet \
            --samples-per-client "${CF_SAMPLES:-256}" --set "privacy.cut_noise=$noise" "$@"
        echo "sweep: cut $c seed $seed took $(( $(date +%s) - start )) s" >&2
        mode=--append
    done
  done
done
