#!/usr/bin/env bash
# Pin a rank to CPU cores, then run the rest of the command line:
#     mpirun -n 3 bash bench/pin.sh python -m collafuse_mpi.run ...
# Rank 0 (the server) gets the cores in CF_SERVER_CORES (default 0), every other rank shares
# CF_CLIENT_CORES (default: all the others). This gives the server a share of the machine that
# grows with the number of clients, as a shared GPU server would have.
set -euo pipefail
rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-${SLURM_PROCID:-}}}}
if [[ -z "$rank" ]]; then
    echo "pin.sh: no rank in the environment (run it under mpirun or srun)" >&2
    exit 2
fi
last=$(( $(nproc --all) - 1 ))
server=${CF_SERVER_CORES:-0}
clients=${CF_CLIENT_CORES:-$(( last > 0 ? 1 : 0 ))-$last}
if [[ "$rank" == 0 ]]; then cores=$server; else cores=$clients; fi
exec taskset -c "$cores" "$@"
