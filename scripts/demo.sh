#!/usr/bin/env bash
# The main job on the embedded default: 1 server + 2 clients on CPU, digits data,
# results in results.h5 and figures in figures/. Extra arguments go to the run.
# 800 steps (about 4 minutes for the run on 2 cores) is what it takes for the samples to look
# like digits; 64 samples per client keep the KID from being noise (bench/results/demo.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
. scripts/mpi-env.sh
start=$(date +%s)
# shellcheck disable=SC2086
mpirun -n 3 $CF_MPIRUN_FLAGS python -m collafuse_mpi.run --device cpu --output results.h5 --overwrite \
    --steps 800 --samples-per-client 64 --set privacy.attacks=quick "$@"
echo "demo: run took $(( $(date +%s) - start )) s"
collafuse-plot results.h5 -o figures
