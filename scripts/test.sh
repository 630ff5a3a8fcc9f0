#!/usr/bin/env bash
# The whole test suite: unit tests, tests that launch mpirun, and the SLURM tests when a
# cluster is running (they skip with a reason otherwise). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
. scripts/mpi-env.sh
# every test's ranks share this one machine: Open MPI's libfabric BTL, never used here, spends
# about 1 s probing for fabrics at each MPI start (a 3-rank start: 1.3 s -> 0.3 s without it)
if mpirun --version 2>&1 | grep -q "Open MPI"; then
    export OMPI_MCA_btl=${OMPI_MCA_btl:-^ofi}
fi
python -m pytest "$@"
