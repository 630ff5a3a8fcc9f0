"""Which energy meters this task can read, and why not: `python -m collafuse_mpi.meters`.

Run it the way a job runs its ranks (`mpirun -n 4 python -m collafuse_mpi.meters`, `srun ...`)
to see, per task, the device it would use, how that device was matched to NVML and what each
meter says. No MPI: the task's numbers come from the launcher's environment variables.
"""
from __future__ import annotations

import os
import socket

from . import energy

LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
RANK = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def _env_int(names, env) -> int | None:
    for n in names:
        if env.get(n, "").isdigit():
            return int(env[n])
    return None


def cuda_devices() -> list[tuple[int, str]]:
    """(index, UUID) of every CUDA device torch sees; [] without torch or CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            try:
                out.append((i, str(torch.cuda.get_device_properties(i).uuid)))
            except Exception:  # noqa: BLE001 -- torch without the uuid property
                out.append((i, ""))
        return out
    except ImportError:
        return []


def _describe(meter) -> str:
    text = f"{meter.source}"
    if meter.device_key:
        text += f" {meter.device_key}"
    if meter.reason:
        text += f" ({meter.reason})"
    meter.close()
    return text


def report(env=None, devices=None) -> list[str]:
    """One line per meter this task could open: its CUDA device(s) and the CPU package."""
    env = os.environ if env is None else env
    devices = cuda_devices() if devices is None else devices
    rank, local = _env_int(RANK, env), _env_int(LOCAL_RANK, env)
    who = f"[task {rank if rank is not None else '-'}@{socket.gethostname()}]"
    lines = [f"{who} CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(unset)')}, "
             f"{len(devices)} CUDA device(s) visible"]
    if devices and local is not None:  # the run's rule: local rank -> device, round robin
        devices = [devices[local % len(devices)]]
    for index, uuid in devices:
        gpu = energy.Gpu(index, uuid, env.get("CUDA_VISIBLE_DEVICES"))
        info = energy.device_info(gpu)
        match = f"{info.get('name', '?')} {info.get('uuid', '?')}, matched by {info['nvml_match']}" if info else "no NVML device"
        lines.append(f"{who} cuda:{index} -> {match}: {_describe(energy.open_meter(gpu))}")
    lines.append(f"{who} cpu -> {_describe(energy.open_meter(None))}")
    return lines


def main():
    print("\n".join(report()), flush=True)


if __name__ == "__main__":
    main()
