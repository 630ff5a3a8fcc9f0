"""Where a run ran: the SLURM job, the CPUs, each rank's placement. No torch and no MPI here.

Every rank reports `rank_info()`; rank 0 writes them with `slurm_info()`, `cpu_info()` and
`oversubscribed()` into the results file, so a number can be traced to the job and the cores
that produced it.
"""
from __future__ import annotations

import os
import platform
import socket

SLURM_VARS = {  # results key -> environment variable
    "job_id": "SLURM_JOB_ID", "job_name": "SLURM_JOB_NAME", "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID", "nodelist": "SLURM_JOB_NODELIST",
    "ntasks": "SLURM_NTASKS", "cpus_per_task": "SLURM_CPUS_PER_TASK", "partition": "SLURM_JOB_PARTITION",
    "restart_count": "SLURM_RESTART_COUNT", "cluster": "SLURM_CLUSTER_NAME",
}


def slurm_info(env=None) -> dict:
    """The job's SLURM variables that are set ({} outside SLURM)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return {}
    return {key: env[var] for key, var in SLURM_VARS.items() if var in env}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.split(":")[0].strip() in ("model name", "Model", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    """CPU model and logical core count of this host."""
    return {"model": cpu_model(), "logical_cores": os.cpu_count() or 0}


def usable_cpus() -> list[int]:
    """The cores this process may run on (its affinity mask: what SLURM or mpirun bound it to)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def rank_info(local_rank: int, env=None) -> dict:
    """This rank's host, usable cores and GPU binding (CUDA_VISIBLE_DEVICES as the rank saw it,
    None when unset: every GPU visible)."""
    env = os.environ if env is None else env
    return {"host": socket.gethostname(), "local_rank": local_rank, "cpus": usable_cpus(),
            "host_cores": os.cpu_count() or 0, "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")}


def oversubscribed(ranks: list[dict]) -> bool:
    """True when, on some host, the ranks outnumber the cores they may run on together."""
    by_host = {}
    for r in ranks:
        cpus, n = by_host.get(r["host"], (set(), 0))
        by_host[r["host"]] = (cpus | set(r["cpus"]), n + 1)
    return any(n > len(cpus) for cpus, n in by_host.values())
