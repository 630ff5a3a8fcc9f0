"""What every benchmark in bench/ records beside its numbers: machine, versions, command, date.

Not a benchmark itself. Each script keeps every raw sample and derives percentiles afterwards
(pytest-benchmark style); `write()` puts `<name>.json` (everything) and `<name>.md` (the table a
person reads) into bench/results/.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
# where records go: bench/results, or COLLAFUSE_BENCH_RESULTS (bench/gpu.sh collects its own there)
RESULTS = os.environ.get("COLLAFUSE_BENCH_RESULTS") or os.path.join(BENCH, "results")
if REPO not in sys.path:  # `python bench/x.py` puts bench/ first on sys.path, not the repo
    sys.path.insert(0, REPO)

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _git_dirs() -> tuple:
    """(the git dir holding HEAD, the common dir holding refs): .git itself, or for a worktree
    the folder its .git file names and that folder's commondir."""
    git = os.path.join(REPO, ".git")
    if os.path.isfile(git):
        with open(git) as fh:
            line = fh.read().strip()
        if line.startswith("gitdir: "):
            git = os.path.normpath(os.path.join(REPO, line[8:]))
    common = git
    try:
        with open(os.path.join(git, "commondir")) as fh:
            common = os.path.normpath(os.path.join(git, fh.read().strip()))
    except OSError:
        pass
    return git, common


def _git_commit() -> str:
    """HEAD's commit, read from .git without running git (the working tree may differ from it)."""
    try:
        git, common = _git_dirs()
        with open(os.path.join(git, "HEAD")) as fh:
            head = fh.read().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        for root in dict.fromkeys((git, common)):
            path = os.path.join(root, ref)
            if os.path.exists(path):
                with open(path) as fh:
                    return fh.read().strip()
        with open(os.path.join(common, "packed-refs")) as fh:
            for line in fh:
                if line.rstrip().endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return ""


def machine(comm=None) -> dict:
    """uname, cores, versions and date; `comm` adds the MPI library and world size."""
    import torch
    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        uname = " ".join(platform.uname())
    out = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "uname": uname,
        "nproc": os.cpu_count(),  # the machine's; mpirun may bind a rank to fewer (affinity_cpus)
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "numpy": np.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "git_commit_head": _git_commit(),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],  # other jobs share this machine
    }
    try:
        import h5py
        out["h5py"] = h5py.__version__
    except ImportError:
        pass
    try:
        import mpi4py
        from mpi4py import MPI
        out["mpi4py"] = mpi4py.__version__
        out["mpi_library"] = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
        if comm is not None:
            out["world_size"] = comm.Get_size()
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def command(n_ranks: int | None = None, launcher: str = "mpirun") -> str:
    """The command line that ran this script, as it would be typed from the repository root."""
    argv = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    prefix = f"{launcher} -n {n_ranks} " + ("--oversubscribe " if n_ranks and n_ranks > 2 else "")
    return (prefix if n_ranks else "") + "python " + argv


def pct(samples, qs=(50, 90, 99)) -> dict:
    """Percentiles plus n, mean, min and max of a list of samples (seconds or any unit)."""
    a = np.asarray(samples, dtype=np.float64)
    out = {f"p{q}": float(np.percentile(a, q)) for q in qs}
    out.update(n=int(a.size), mean=float(a.mean()), min=float(a.min()), max=float(a.max()))
    return out


def write(name: str, record: dict, markdown: str) -> tuple[str, str]:
    """bench/results/<name>.json (one line) and .md; returns both paths."""
    os.makedirs(RESULTS, exist_ok=True)
    jpath, mpath = os.path.join(RESULTS, name + ".json"), os.path.join(RESULTS, name + ".md")
    with open(jpath, "w") as fh:  # compact: the raw samples dominate; the .md is the readable view
        json.dump(record, fh, separators=(",", ":"), default=_json_default)
        fh.write("\n")
    with open(mpath, "w") as fh:
        fh.write(markdown.rstrip() + "\n")
    return jpath, mpath


def publish(name: str, record: dict, md: list) -> None:
    """write(), then print the tables and explanation (md past its header block) and the paths."""
    paths = write(name, record, "\n".join(md))
    print("\n".join(md[4:]))
    print("wrote", *paths)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def machine_md(m: dict) -> str:
    keys = ("date_utc", "uname", "nproc", "affinity_cpus", "cpu_model", "python", "torch", "numpy", "mpi4py",
            "mpi_library", "h5py", "cuda_available", "gpu", "git_commit_head", "loadavg_1_5_15")
    return "\n".join(f"- {k}: `{m[k]}`" for k in keys if k in m)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def run_or_abort(main, *args):
    """Call main(*args); an exception on any rank prints its traceback and aborts every rank
    (what `python -m mpi4py` does), instead of leaving the other ranks waiting forever."""
    import traceback
    try:
        return main(*args)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(1)


def mpirun(n: int) -> list[str]:
    """The launcher prefix used by the scripts that start the real CLI (oversubscribed past 2)."""
    return ["mpirun", "-n", str(n)] + (["--oversubscribe"] if n > 2 else [])


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(MPI_ENV)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
