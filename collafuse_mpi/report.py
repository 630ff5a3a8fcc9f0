"""Rank 0's bookkeeping: what goes into the results file at the start and at the end of a run."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np

from . import machine
from .checkpoint import ORIGIN  # in the checkpoint folder: the results file and run group its steps came from
from .harness import PHASES
from .results import ResultsError, ResultsWriter


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def versions(tp) -> dict:
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "mpi_library": tp.library(), "cuda": torch.version.cuda or "", "platform": platform.platform()}
    out["mpi4py"] = getattr(tp, "mpi4py_version", "")
    out["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "")  # huge pages for torch host memory
    return out


def begin(cfg, tp, ks, resume_step: int = 0, placement=()):
    writer = ResultsWriter(cfg.run.output, cfg.run.if_exists)
    n_clients = cfg.n_clients(tp.size)
    name = cfg.run.run_name or f"cut{cfg.diffusion.cut:g}-n{n_clients}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    placement = list(placement)
    meta = {"start_time": _now(), "versions": versions(tp), "git_commit": _git_commit(),
            "world_size": tp.size, "n_clients": n_clients, "client_ranks": tp.size - 1,
            "clients_per_rank": cfg.run.clients_per_rank, "cut_k": list(ks),
            "timesteps": cfg.diffusion.timesteps, "cut": cfg.diffusion.cut,
            "cuda_aware": bool(tp.cuda_aware), "cuda_aware_detected": bool(tp.cuda_aware_detected),
            "timing_mode": cfg.run.timing, "resumed_from_step": resume_step, "phases": list(PHASES),
            "command": " ".join(sys.argv), "transport_settings": transport_settings(),
            "slurm": machine.slurm_info(), "cpu": machine.cpu_info(), "placement": placement,
            "oversubscribed": machine.oversubscribed(placement) if placement else False}
    name = writer.begin_run(name, cfg.to_dict(), meta)
    if resume_step:
        _link_resumed(cfg, writer, name)
    if resume_step or cfg.run.checkpoint_every:
        write_origin(cfg, name)
    return writer, name


def _origin_path(cfg) -> str:
    from .checkpoint import folder
    return os.path.join(folder(cfg), ORIGIN)


def write_origin(cfg, name: str) -> None:
    """Note in the checkpoint folder which run group its newest steps belong to."""
    from .checkpoint import write_atomic
    path = _origin_path(cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps({"output": os.path.abspath(cfg.run.output), "run": name}).encode())


def _link_resumed(cfg, writer, name: str) -> None:
    """Mark the run group the checkpoint came from: `running` (it died without stopping
    cleanly) becomes `interrupted`; both it and this run name each other."""
    try:
        with open(_origin_path(cfg)) as fh:
            origin = json.load(fh)
        old_path, old_name = origin["output"], origin["run"]
    except (OSError, ValueError, KeyError):
        return  # checkpoints from before origins were kept: nothing to link
    here = f"{os.path.abspath(cfg.run.output)}::{name}"
    writer.update_run(name, resumed_from=f"{old_path}::{old_name}")
    try:
        old = writer if os.path.abspath(old_path) == os.path.abspath(cfg.run.output) else ResultsWriter(old_path, "append")
        attrs = {"continued_in": here}
        if old.run_status(old_name) == "running":
            attrs["status"] = "interrupted"
        old.update_run(old_name, **attrs)
    except (OSError, KeyError, ResultsError) as exc:
        print(f"collafuse_mpi: warning: cannot mark the interrupted run {old_name} in {old_path}: {exc}",
              file=sys.stderr, flush=True)


def _comm_table(rows) -> dict:
    d, k, p, b, c = zip(*rows) if rows else ((), (), (), (), ())
    return {"direction": np.array(d, dtype=str), "kind": np.array(k, dtype=str), "peer": np.array(p, dtype=np.int64),
            "bytes": np.array(b, dtype=np.int64), "messages": np.array(c, dtype=np.int64)}


def _peer_table(rows) -> dict:
    cols = list(zip(*rows)) if rows else [()] * 6
    return {"peer": np.array(cols[0], dtype=np.int64), "host": np.array(cols[1], dtype=str),
            "locality": np.array(cols[2], dtype=str), "transport": np.array(cols[3], dtype=str),
            "local_address": np.array(cols[4], dtype=str), "remote_address": np.array(cols[5], dtype=str)}


def transport_settings() -> dict:
    """The launch environment's choices of MPI transport (Open MPI MCA, UCX, libfabric, MPICH)."""
    keys = ("OMPI_MCA_pml", "OMPI_MCA_btl", "OMPI_MCA_mtl", "OMPI_MCA_osc", "OMPI_MCA_btl_tcp_if_include",
            "OMPI_MCA_btl_tcp_if_exclude", "OMPI_MCA_btl_tcp_eager_limit", "PRTE_MCA_oob_tcp_if_include",
            "UCX_TLS", "UCX_NET_DEVICES", "FI_PROVIDER", "MPIR_CVAR_CH4_NETMOD",
            "MPIR_CVAR_CH4_OFI_ENABLE_SHARED_CONTEXTS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def write_ranks(writer, name, everyone):
    from .energy import owners
    from .netpath import peer_paths
    own = owners([r["energy_device"] for r in everyone])
    paths = peer_paths(everyone) if all("net" in r for r in everyone) else {}  # at the end of the run
    for r, o in zip(everyone, own):
        attrs = {"role": r["role"], "host": r["host"], "device": r["device"], "k": r["k"],
                 "energy_source": r["energy_source"], "energy_device": r["energy_device"],
                 "energy_reason": r.get("energy_reason", ""),
                 "energy_owner": bool(o), "transport_path": r["path"],
                 "device_info": r.get("device_info", {}), "n_train": r.get("n_train", 0),
                 "n_heldout": r.get("n_heldout", 0), "clients": sorted(r.get("clients", {}))}
        arrays = dict(r["arrays"])
        arrays["windows"] = r["windows"]
        arrays["comm"] = _comm_table(r["comm"])
        if r["rank"] in paths:
            arrays["peers"] = _peer_table(paths[r["rank"]])
        writer.write_rank(name, r["rank"], arrays, attrs)


def finish(writer, name, everyone, cfg, pooled: dict):
    from .privacy import pool, summary_line
    clients = sorted((i, c) for r in everyone for i, c in r.get("clients", {}).items())
    metrics = {f"client_{i}": dict(c["metrics"], bytes=c.get("bytes", {}), k=c["k"], n_train=c["n_train"],
                                   n_heldout=c["n_heldout"]) for i, c in clients}
    if pooled:
        metrics["pooled"] = {"kid": pooled}
    attacked = {i: m["privacy"] for i, m in metrics.items() if "privacy" in m}
    headline = {}
    if attacked:
        privacy = pool(attacked)
        if everyone[0].get("privacy_cost"):
            privacy["cost"] = everyone[0]["privacy_cost"]
        metrics.setdefault("pooled", {})["privacy"] = privacy
        headline = {f"disclosure_{k}": v for k, v in privacy.get("headline", {}).items()}
    with writer.batch():  # a run is "complete" with all of its data, or not at all
        write_ranks(writer, name, everyone)
        writer.write_group(name, "metrics", metrics)
        writer.write_group(name, "samples", {f"client_{i}": c["samples"] for i, c in clients})
        writer.update_run(name, status="complete", end_time=_now(), **headline,
                          hosts=[r["host"] for r in everyone],
                          rank_device_map=[r["device"] for r in everyone])
    # printed even with --quiet: a job's log must say where its results went
    if attacked:
        print(f"collafuse_mpi: {summary_line(metrics['pooled']['privacy'])}", flush=True)
    print(f"collafuse_mpi: results in {os.path.abspath(cfg.run.output)} (run {name})\n"
          f"  plot them with: collafuse-plot {cfg.run.output}", flush=True)


def failure_text(exc: BaseException) -> str:
    """One line: the exception's type and message (an empty MemoryError named as such)."""
    if isinstance(exc, MemoryError) and not str(exc):
        return "MemoryError: out of memory (lower --image-size or --batch-size, or use fewer ranks per node)"
    return f"{type(exc).__name__}: {exc}"


def record_failure(writer, name, exc: BaseException) -> None:
    """Mark the run group failed, with the rank that failed and why; a preempted run is left to
    its resume (a stop at a shared step edge records itself: stopped()). Best effort: the file
    may be what failed (a full disk)."""
    from .comm import PeerFailed
    from .stopping import Stopped
    if isinstance(exc, (Stopped, KeyboardInterrupt)):
        return
    rank, text = (exc.rank, exc.text) if isinstance(exc, PeerFailed) else (0, failure_text(exc))
    try:
        writer.update_run(name, status="failed", failed_rank=rank, error=text[:4000], end_time=_now())
    except Exception:  # noqa: BLE001 -- the original failure is what the job must report
        pass


def stopped(writer, name, everyone, cfg, steps_done: int, signals: list):
    """Every rank stopped at the same step edge and saved its state: record what ran."""
    write_ranks(writer, name, everyone)
    writer.update_run(name, status="stopped", stopped_at_step=steps_done, end_time=_now(),
                      stop_signals=sorted(set(signals)), hosts=[r["host"] for r in everyone],
                      rank_device_map=[r["device"] for r in everyone])
    write_origin(cfg, name)
    from .checkpoint import folder
    print(f"collafuse_mpi: stopped at step {steps_done} of {cfg.train.steps} on request "
          f"({', '.join(sorted(set(signals))) or 'a signal'} on some rank); every rank saved its state in "
          f"{folder(cfg)}\n  results so far in {os.path.abspath(cfg.run.output)} (run {name}, status stopped)\n"
          "  continue with --resume (and --append to the same results file)", flush=True)
