#!/bin/bash
# Check a run before it waits in the queue, then submit it.
#
#   jobs/submit.sh [sbatch options] jobs/collafuse.sbatch [run options]
#   CF_ARGS="--steps 300" jobs/submit.sh --ntasks=5 jobs/cut_sweep.sbatch
#
# Runs `python -m collafuse_mpi.run --check` (config, data, checkpoint folder; no MPI, no GPU)
# with the rank count the job will have (--ntasks/-n given here, else the script's #SBATCH
# line) and the same CF_CONFIG / CF_ARGS / run options, once per cut for the cut sweep and for
# the largest client count of the scaling sweep; submits with sbatch only when every check
# passes. The jobs check again when they start. Same environment as the jobs (CF_ENV,
# jobs/env.sh or the repository's .venv).
set -euo pipefail

sbatch_args=()
while [ $# -gt 0 ] && [[ "$1" != *.sbatch ]]; do sbatch_args+=("$1"); shift; done
[ $# -gt 0 ] || { echo "submit.sh: usage: jobs/submit.sh [sbatch options] SCRIPT.sbatch [run options]" >&2; exit 2; }
script=$1; shift
[ -r "$script" ] || { echo "submit.sh: cannot read $script" >&2; exit 2; }

# The rank count and job name the job will have: sbatch options first, then the script's defaults.
sb_opt() { # sb_opt LONG SHORT: the value of --LONG=V, --LONG V or -SHORT V among sbatch_args, else the #SBATCH line
    local i a next=""
    for ((i = 0; i < ${#sbatch_args[@]}; i++)); do
        a=${sbatch_args[$i]}
        if [ -n "$next" ]; then echo "$a"; return; fi
        case "$a" in --$1=*) echo "${a#*=}"; return ;; --$1|-$2) next=1 ;; -$2?*) echo "${a#-$2}"; return ;; esac
    done
    grep -oP "^#SBATCH\s+--$1=\K\S+" "$script" | head -1
}
ntasks=$(sb_opt ntasks n)
name=$(sb_opt job-name J)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CF_REPO=${CF_REPO:-$(cd "$here/.." && pwd)}
CF_ENV_ONLY=1 source "$CF_REPO/jobs/collafuse.sbatch" # the jobs' environment (CF_ENV, env.sh, .venv)
PYTHON=${CF_PYTHON:-python}
outdir=${CF_OUTDIR:-$PWD}
for a in "${sbatch_args[@]}"; do case "$a" in --chdir=*|-D?*) outdir=${CF_OUTDIR:-${a#--chdir=}} ;; esac; done
experiment=${CF_EXPERIMENT:-$name}

base=()
[ -n "${CF_CONFIG:-}" ] && base+=(--config "$CF_CONFIG")
eval "extra=(${CF_ARGS:-})"
base+=("${extra[@]}" "$@" --output "$outdir/results-SUBMITTED.h5")

check() { # check RANKS CHECKPOINT_DIR [more run options]
    local n=$1 ckpt=$2; shift 2
    "$PYTHON" -m collafuse_mpi.run --check --ranks "$n" "${base[@]}" --set "run.checkpoint_dir=$ckpt" "$@"
}
case "$(basename "$script")" in
    cut_sweep.sbatch)
        IFS=, read -ra cuts <<<"${CF_CUTS:-0,0.2,0.4,0.6,0.8,1.0}"
        for c in "${cuts[@]}"; do
            check "$ntasks" "${CF_CHECKPOINT_DIR:-$outdir/checkpoints/$experiment}-cut${c// /}" --cut "$c"
        done ;;
    scaling.sbatch)
        IFS=, read -ra clients <<<"${CF_CLIENTS:-1,2,4,8}"
        max=0; for c in "${clients[@]}"; do [ "$c" -gt "$max" ] && max=$c; done
        check $((max + 1)) "${CF_CHECKPOINT_DIR:-$outdir/checkpoints/$experiment}-clients$max" ;;
    *)
        check "${CF_NRANKS:-$ntasks}" "${CF_CHECKPOINT_DIR:-$outdir/checkpoints/$experiment}" ;;
esac
echo "submit.sh: checks passed; the results file is named by the job id (results-<jobid>...h5)"
exec sbatch "${sbatch_args[@]}" "$script" "$@"
