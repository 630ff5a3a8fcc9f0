#!/usr/bin/env bash
# The whole test suite: unit tests, tests that launch mpirun, and the SLURM tests when a
# cluster is running (they skip with a reason otherwise). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
. scripts/mpi-env.sh
python -m pytest "$@"
