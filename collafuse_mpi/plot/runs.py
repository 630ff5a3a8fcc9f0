"""The runs read from results files: constants, Run, Ctx, load and small value helpers."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import click
import numpy as np

# h5py (through ..results) is imported lazily, so that main() can first switch off HDF5 file locking.

PROG = "collafuse-plot"
FIGURES = ("disclosure", "phases", "timeline", "energy", "kid", "bytes", "samples", "scaling", "trends")
FORMATS = ("png", "pdf", "svg")
DEFAULT_PHASES = ("data", "noise", "forward", "backward", "optimizer", "send", "recv", "wait",
                  "sample", "metrics", "checkpoint", "io")
DPI = 150
MAX_PANELS = 12  # phases / timeline: at most this many configurations in one figure


class Missing(Exception):
    """A figure cannot be drawn: the message names what the inputs lack."""


# ----------------------------------------------------------------------------- the runs

@dataclass
class Run:
    path: str
    name: str
    d: dict  # one entry of results.read(path)["runs"]

    @property
    def ranks(self) -> dict:
        return self.d.get("ranks", {})

    @property
    def config(self) -> dict:
        c = _json(self.d.get("config"), {})
        return c if isinstance(c, dict) else {}

    @property
    def n_clients(self) -> int:
        n = self.d.get("n_clients")
        return int(n) if _finite(n) else max(len(self.ranks) - 1, 0)

    @property
    def clients_per_rank(self) -> int:
        """Logical clients per client rank (1 in files from before logical clients)."""
        m = self.d.get("clients_per_rank")
        return int(m) if _finite(m) and m >= 1 else 1

    def rank_of(self, client: int) -> int:
        return client // self.clients_per_rank + 1

    @property
    def timesteps(self) -> int:
        return int(self.d.get("timesteps") or self.config.get("diffusion", {}).get("timesteps", 0))

    @property
    def cut(self) -> float:
        return float(self.d.get("cut", self.config.get("diffusion", {}).get("cut", float("nan"))))

    @property
    def ks(self) -> list:
        ks = _json(self.d.get("cut_k"), None)
        if isinstance(ks, np.ndarray):
            ks = ks.tolist()
        if not isinstance(ks, list):
            ks = [int(self.ranks[r].get("k", -1)) for r in sorted(self.ranks) if r > 0]
        return [int(k) for k in ks]

    def client_cut(self, index: int) -> float:
        """Effective cut of client `index` (rank index+1): k/T."""
        ks, T = self.ks, self.timesteps
        return ks[index] / T if index < len(ks) and T else self.cut

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.ks)) > 1

    @property
    def x_cut(self) -> float:
        """The run's position on a cut axis: its cut, or the mean client cut if heterogeneous."""
        if self.heterogeneous:
            return float(np.mean([self.client_cut(i) for i in range(len(self.ks))]))
        return self.cut

    @property
    def key(self) -> tuple:
        if self.heterogeneous:
            return (tuple(round(self.client_cut(i), 6) for i in range(len(self.ks))), self.n_clients)
        return (round(self.cut, 6), self.n_clients)

    @property
    def label(self) -> str:
        return config_label(self.key)

    @property
    def slug(self) -> str:
        cut, n = self.key
        c = "_".join(f"{v:g}" for v in cut) if isinstance(cut, tuple) else f"{cut:g}"
        return f"cut{c}-n{n}"

    @property
    def phases(self) -> list:
        p = _json(self.d.get("phases"), None)
        return list(p) if isinstance(p, list) and p else list(DEFAULT_PHASES)

    @property
    def start_time(self) -> str:
        return str(self.d.get("start_time", ""))

    def metrics(self, index: int) -> dict:
        return self.d.get("metrics", {}).get(f"client_{index}", {}) or {}

    @property
    def pooled_kid(self) -> dict | None:
        """metrics/pooled/kid (all clients' samples against all held-out images), or None."""
        k = (self.d.get("metrics", {}).get("pooled", {}) or {}).get("kid")
        return k if isinstance(k, dict) and _finite(k.get("mean")) else None

    def samples(self, index: int) -> dict:
        return self.d.get("samples", {}).get(f"client_{index}", {}) or {}

    def role(self, rank: int) -> str:
        return str(self.ranks.get(rank, {}).get("role", "server" if rank == 0 else "client"))


def config_label(key: tuple) -> str:
    cut, n = key
    clients = f"{n} client" + ("s" if n != 1 else "")
    if isinstance(cut, tuple):
        return f"cuts {'/'.join(f'{v:g}' for v in cut)}, {clients}"
    return f"cut {cut:g}, {clients}"


def _json(v, default):
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return default
    return v if v is not None else default


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _num(v) -> float:
    return float(v) if _finite(v) else float("nan")


def _count(v) -> int:
    return int(v) if _finite(v) else 0


def steady(g: dict) -> np.ndarray:
    """Mask of non-warm-up steps of one rank."""
    w = np.asarray(g.get("warmup", np.zeros(0, bool)), dtype=bool)
    return ~w


def n_steps(g: dict) -> int:
    return int(np.asarray(g.get("step", [])).size)


# ----------------------------------------------------------------------------- context

@dataclass
class Ctx:
    runs: list
    timeline_steps: tuple | None = None
    notes: list = field(default_factory=list)  # (figure, message) printed to stderr

    def __post_init__(self):
        groups = {}
        for r in self.runs:
            groups.setdefault(r.key, []).append(r)
        order = sorted(groups, key=lambda k: (k[1], np.mean(k[0]) if isinstance(k[0], tuple) else k[0],
                                              isinstance(k[0], tuple)))
        self.groups = {k: groups[k] for k in order}

    def note(self, figure: str, msg: str):
        self.notes.append((figure, msg))
        click.echo(f"{PROG}: {figure}: {msg}", err=True)

    def representatives(self) -> list:
        """(run, number of runs in its group): the latest complete run of each configuration."""
        out = []
        for runs in self.groups.values():
            done = [r for r in runs if r.d.get("status") == "complete"] or runs
            out.append((max(done, key=lambda r: (r.start_time, r.name)), len(runs)))
        return out

    def n_colors(self) -> dict:
        ns = sorted({r.n_clients for r in self.runs})
        return {n: f"C{i % 10}" for i, n in enumerate(ns)}


def load(paths) -> tuple[list, list]:
    """(runs, problems). A problem is a file that is missing or not a results file."""
    from .. import results
    runs, problems, seen = [], [], set()
    for p in paths:
        if not os.path.exists(p):
            problems.append(f"{p}: no such file")
            continue
        if os.path.isdir(p):
            problems.append(f"{p}: is a folder, not a results file")
            continue
        if not os.access(p, os.R_OK):
            problems.append(f"{p}: permission denied")
            continue
        try:
            data = results.read(p)
        except results.ResultsError as exc:
            problems.append(str(exc))
            continue
        except (OSError, KeyError, ValueError, TypeError) as exc:
            problems.append(f"{p}: cannot be read as a results file ({type(exc).__name__}: {exc})")
            continue
        real = os.path.realpath(p)
        for name, d in data["runs"].items():
            if (real, name) in seen:
                continue
            seen.add((real, name))
            runs.append(Run(p, name, d))
    return runs, problems


# Settings that change neither the numbers plotted nor their timing (run.pooled_kid only decides whether
# the pooled KID exists; the KID figure names runs without it). checkpoint_every, flush_every and resume
# are left in: they add checkpoint / io time to steps, or shorten the recorded run.
IGNORED_CONFIG = {"diffusion.cut", "diffusion.client_cuts", "run.output", "run.run_name", "run.if_exists",
                  "run.seed", "run.quiet", "run.save_dir", "run.save_models", "run.checkpoint_dir",
                  "run.store_real", "run.recv_timeout", "run.pooled_kid"}


def config_differences(runs) -> dict:
    """{dotted config key: sorted distinct values} for settings (other than the cut, the output and
    the seed) that differ between the runs being merged."""
    flat = []
    for r in runs:
        f = {}
        for sec, vals in r.config.items():
            for k, v in (vals.items() if isinstance(vals, dict) else []):
                f[f"{sec}.{k}"] = json.dumps(v, sort_keys=True)
        flat.append(f)
    keys = sorted(set().union(*flat)) if flat else []
    return {k: sorted({f.get(k, "missing") for f in flat}) for k in keys
            if k not in IGNORED_CONFIG and len({f.get(k, "missing") for f in flat}) > 1}


def _summarize(items, ctx: "Ctx | None" = None) -> str:
    """'server and clients of cut 0.4, 2 clients (1 of 3 runs); ...' from (run, rank, role) items."""
    by, runs = {}, {}
    for run, rank, role in items:
        by.setdefault(run.key, set()).add("server" if role == "server" else "clients")
        runs.setdefault(run.key, set()).add(id(run))
    parts = []
    for key, roles in by.items():
        total = len(ctx.groups.get(key, [])) if ctx is not None else 0
        some = f" ({len(runs[key])} of {total} runs)" if total > len(runs[key]) else ""
        parts.append(f"{' and '.join(sorted(roles, reverse=True))} of {config_label(key)}{some}")
    return "; ".join(parts)
