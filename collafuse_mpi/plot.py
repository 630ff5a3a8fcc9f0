"""`collafuse-plot`: figures from one or more CollaFuse results files.

    collafuse-plot results.h5 [more.h5 ...] [-o figures/] [--format png,pdf]
                   [--only phases,timeline,energy,kid,disclosure,bytes,samples,scaling]
                   [--timeline-steps FIRST:LAST]

Files are read with `collafuse_mpi.results.read` (h5py + numpy; layout in
docs/results-schema.md). Runs from every file are merged and grouped by configuration
(cut, number of clients); figures that show one run per configuration use the latest complete
run of each group. This module never imports torch or mpi4py: it runs on a login node.

Exit status:
  0  at least one figure was written (figures whose data were missing are named on stderr)
  1  every input was read, but no figure could be drawn from them
  2  usage error, or an input file is missing, unreadable or not a results file
     (checked before anything is drawn: nothing is written then)
The paths written are printed on stdout, one per line; messages go to stderr.

`main()` reads with HDF5 file locking off (HDF5_USE_FILE_LOCKING=FALSE unless already set), so
plotting a file that a running job is still flushing to can never make that job's next write fail.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field

import click
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# h5py (through .results) is imported lazily, so that main() can first switch off HDF5 file locking.

PROG = "collafuse-plot"
FIGURES = ("phases", "timeline", "energy", "kid", "disclosure", "bytes", "samples", "scaling")
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
    from . import results
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
            msg = str(exc)
            if msg.endswith("is not an HDF5 file") and _is_hdf5(p):
                msg = (f"{p} is an HDF5 file but cannot be opened (a running job may hold it open for writing; "
                       "retry when it ends, or set HDF5_USE_FILE_LOCKING=FALSE)")
            problems.append(msg)
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


def _is_hdf5(path: str) -> bool:
    import h5py
    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


# ----------------------------------------------------------------------------- figure helpers

def new_figure(width: float, height: float):
    """A constrained-layout figure; returns the SubFigure to draw in (notes go in a strip below it)."""
    root = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    body, foot = root.subfigures(2, 1, height_ratios=[height, 1e-3])
    body.root, body.foot, body.height = root, foot, height
    return body


def footnote(fig, lines: list):
    """Notes in a strip under the figure, sized to fit them."""
    if not lines:
        return
    root = fig.root
    width_chars = max(int(root.get_figwidth() * 15), 40)
    text = "\n".join(textwrap.fill(f"\u2022 {ln}", width_chars, subsequent_indent="  ") for ln in lines)
    h = 0.13 * (text.count("\n") + 1) + 0.12
    root.set_size_inches(root.get_figwidth(), fig.height + h)
    fig._subplotspec.get_gridspec().set_height_ratios([fig.height, h])
    fig.foot.text(0.01, 1.0, text, ha="left", va="top", fontsize=7.5, color="0.25")


def empty_message(ax, msg: str):
    ax.text(0.5, 0.5, textwrap.fill(msg, 40), ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


PHASE_COLORS = {"data": "#8c564b", "noise": "#e377c2", "forward": "#2ca02c", "backward": "#d62728",
                "optimizer": "#9467bd", "send": "#1f77b4", "recv": "#17becf", "wait": "#ff7f0e",
                "sample": "#bcbd22", "metrics": "#7f7f7f", "checkpoint": "#393b79", "io": "#e7ba52"}
OTHER_COLOR = "#d9d9d9"


def phase_colors(phases) -> dict:
    extra = ["#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
    return {p: PHASE_COLORS.get(p, extra[i % len(extra)]) for i, p in enumerate(phases)}


def time_unit(seconds_max: float) -> tuple[str, float]:
    return ("ms", 1e3) if seconds_max < 1.0 else ("s", 1.0)


def cut_axis(ax):
    ax.set_xlabel("cut ratio c = k/T (client's share of the chain)")
    ax.set_xlim(-0.06, 1.06)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(True, alpha=0.3)


def _jitter(i: int, n: int, width: float = 0.012) -> float:
    return 0.0 if n <= 1 else (i - (n - 1) / 2) * width


# ----------------------------------------------------------------------------- phases

def fig_phases(ctx: Ctx):
    reps = [(r, n) for r, n in ctx.representatives() if any(n_steps(g) for g in r.ranks.values())]
    if not reps:
        raise Missing("no run has per-step phase times (ranks/<r>/phase_seconds is empty on every rank)")
    if len(reps) > MAX_PANELS:
        ctx.note("phases", f"{len(reps)} configurations; showing the first {MAX_PANELS}")
        reps = reps[:MAX_PANELS]
    panels, notes = [], []
    for run, count in reps:
        phases = run.phases
        rows = []
        for rank in sorted(run.ranks):
            g = run.ranks[rank]
            ps = np.asarray(g.get("phase_seconds", np.zeros((0, len(phases)))), dtype=float)
            if ps.size == 0:
                rows.append((rank, None, float("nan")))
                continue
            m = steady(g)
            if not m.any():
                m = np.ones(len(ps), bool)
                notes.append(f"{run.label}, rank {rank}: every step is a warm-up step; all are used")
            wall = np.asarray(g["step_end"]) - np.asarray(g["step_start"])
            rows.append((rank, np.median(ps[m], axis=0), float(np.median(wall[m]))))
        panels.append((run, count, phases, rows))
        if run.d.get("timing_mode") == "throughput":
            notes.append(f"{run.label}: timing mode 'throughput' (no syncs at phase edges): only whole-step "
                         "times are meaningful, phase shares may be misattributed")
    phases = panels[0][2]
    biggest = max((np.nansum(v) for _, _, _, rows in panels for _, v, _ in rows if v is not None), default=0)
    biggest = max(biggest, max((w for _, _, _, rows in panels for _, _, w in rows if _finite(w)), default=0))
    unit, scale = time_unit(biggest)
    # phases under 1 % of the largest step everywhere are lumped into "other"
    shown = [i for i, p in enumerate(phases)
             if any(v is not None and v[i] >= 0.01 * biggest for _, _, _, rows in panels for _, v, _ in rows)]
    colors = phase_colors(phases)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    max_ranks = max(len(rows) for _, _, _, rows in panels)
    fig = new_figure(max(4.0, 0.45 * max_ranks + 1.8) * ncols + 1.6, 3.4 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    other_used = False
    for ax, (run, count, ph, rows) in zip(axes, panels):
        x = np.arange(len(rows))
        bottom = np.zeros(len(rows))
        for i in shown:
            vals = np.array([v[i] if v is not None else 0.0 for _, v, _ in rows]) * scale
            ax.bar(x, vals, 0.7, bottom=bottom, color=colors[ph[i]], edgecolor="white", linewidth=0.3)
            bottom += vals
        rest = np.array([(np.sum(v) - np.sum(v[shown])) if v is not None else 0.0 for _, v, _ in rows]) * scale
        if np.any(rest > 0):
            other_used = True
            ax.bar(x, rest, 0.7, bottom=bottom, color=OTHER_COLOR, edgecolor="white", linewidth=0.3)
        walls = np.array([w for _, _, w in rows]) * scale
        ax.scatter(x, walls, marker="_", s=500, linewidths=2, color="black", zorder=3)
        for xi, (rank, v, _) in zip(x, rows):
            if v is None:
                ax.text(xi, 0, "no\ntraining\nsteps", ha="center", va="bottom", fontsize=7, color="0.35")
        labels = []
        for rank, _, _ in rows:
            role = run.role(rank)
            k = run.ranks[rank].get("k", -1)
            labels.append(f"{rank}\n{role}" + (f"\nk={k}" if role == "client" and len(rows) <= 8 else ""))
        ax.set_xticks(x, labels if len(rows) <= 8 else [str(r) for r, _, _ in rows], fontsize=8)
        ax.set_xlabel("rank (0 = server)")
        ax.set_xlim(-0.6, max(len(rows), 2) - 0.4)
        sub = run.name + (f" (latest of {count} runs)" if count > 1 else "")
        ax.set_title(f"{run.label}\n{sub}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"median time per step ({unit})")
    handles = [Patch(color=colors[phases[i]], label=phases[i]) for i in reversed(shown)]
    if other_used:
        handles.append(Patch(color=OTHER_COLOR, label="other (< 1% each)"))
    handles.append(Line2D([], [], color="black", marker="_", markersize=14, linestyle="none", mew=2,
                          label="median step\n(wall clock)"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title="phase", title_fontsize=8)
    fig.suptitle("Time per step by phase\n(median per rank, warm-up excluded)", fontsize=11)
    notes.append("Each phase's median is taken separately, so the stack need not equal the median step time; "
                 "time inside a step that no phase covers is the gap up to the black mark.")
    footnote(fig, notes)
    return [("phases", fig)]


# ----------------------------------------------------------------------------- timeline

def fig_timeline(ctx: Ctx):
    reps = [(r, n) for r, n in ctx.representatives()
            if any(np.asarray(g.get("events", [])).size for g in r.ranks.values())]
    if not reps:
        raise Missing("no run has timeline events (ranks/<r>/events is empty on every rank)")
    if len(reps) > MAX_PANELS:
        ctx.note("timeline", f"{len(reps)} configurations; showing the first {MAX_PANELS}")
        reps = reps[:MAX_PANELS]
    panels, notes = [], []
    for run, count in reps:
        first, last = _window(run, ctx.timeline_steps)
        ev_by_rank, steps_by_rank = {}, {}
        for rank in sorted(run.ranks):
            g = run.ranks[rank]
            ev = np.asarray(g.get("events", np.zeros((0, 4))), dtype=float).reshape(-1, 4)
            ev = ev[(ev[:, 0] >= first) & (ev[:, 0] <= last)]
            st = np.asarray(g.get("step", []))
            sel = (st >= first) & (st <= last)
            steps_by_rank[rank] = (st[sel], np.asarray(g.get("step_start", []))[sel],
                                   np.asarray(g.get("step_end", []))[sel])
            ev_by_rank[rank] = ev
        if not any(len(e) for e in ev_by_rank.values()):
            kept = max((int(np.asarray(g.get("events")).reshape(-1, 4)[:, 0].max())
                        for g in run.ranks.values() if np.asarray(g.get("events", [])).size), default=-1)
            notes.append(f"{run.label}: no events for steps {first}-{last} (events are kept for steps 0-{kept})")
            continue
        panels.append((run, count, first, last, ev_by_rank, steps_by_rank))
    if not panels:
        raise Missing("no events in the requested step window: " + "; ".join(notes))
    phases = panels[0][0].phases
    colors = phase_colors(phases)
    used = set()
    heights = [0.42 * len(p[4]) + 1.0 for p in panels]
    fig = new_figure(11.0, sum(heights) + 0.8)
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)).ravel()
    for ax, (run, count, first, last, evs, steps) in zip(axes, panels):
        starts = [e[:, 2].min() for e in evs.values() if len(e)] + [s.min() for _, s, _ in steps.values() if len(s)]
        ends = [e[:, 3].max() for e in evs.values() if len(e)] + [e.max() for _, _, e in steps.values() if len(e)]
        t0, span = min(starts), max(ends) - min(starts)
        unit, scale = time_unit(span)
        ranks = sorted(evs)
        for y, rank in enumerate(ranks):
            st, s0, s1 = steps[rank]
            for s, a, b in zip(st, s0, s1):
                ax.broken_barh([((a - t0) * scale, (b - a) * scale)], (y - 0.42, 0.84), facecolor="0.93",
                               edgecolor="0.55", linewidth=0.6)
                if (b - a) > 0.05 * span:
                    ax.text((a - t0) * scale, y - 0.40, f" step {int(s)}", fontsize=6, va="top", ha="left",
                            color="0.3", clip_on=True)
            e = evs[rank]
            if not len(e) and not len(st):
                none = "no training steps" if not n_steps(run.ranks[rank]) else "no events in these steps"
                ax.text(0.005, y, none, transform=ax.get_yaxis_transform(), va="center", ha="left",
                        fontsize=8, color="0.4")
            for pi in np.unique(e[:, 1]).astype(int):
                sel = e[e[:, 1] == pi]
                name = phases[pi] if pi < len(phases) else f"phase {pi}"
                used.add(name)
                ax.broken_barh([((a - t0) * scale, (b - a) * scale) for a, b in sel[:, 2:4]], (y - 0.28, 0.56),
                               facecolor=colors.get(name, "0.5"), linewidth=0)
        ax.set_yticks(range(len(ranks)), [f"rank {r}\n{run.role(r)}" for r in ranks], fontsize=8)
        ax.set_ylim(len(ranks) - 0.5, -0.5)
        ax.set_xlim(0, span * scale * 1.01)
        ax.set_xlabel(f"time since the window's first event ({unit}; every rank on rank 0's clock)")
        sub = run.name + (f", latest of {count} runs" if count > 1 else "")
        shown = np.concatenate([e[:, 0] for e in evs.values()] + [st for st, _, _ in steps.values()])
        lo, hi = int(shown.min()), int(shown.max())
        ax.set_title(f"{run.label}: step{'s' if hi > lo else ''} {lo}{f'-{hi}' if hi > lo else ''}  ({sub})",
                     fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(color=colors[p], label=p) for p in phases if p in used]
    handles.append(Patch(facecolor="0.93", edgecolor="0.55", label="step (start to end;\nuncovered = untimed)"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title="phase", title_fontsize=8)
    fig.suptitle("Phase timeline across ranks", fontsize=11)
    footnote(fig, notes)
    return [("timeline", fig)]


def _window(run: Run, requested) -> tuple[int, int]:
    if requested is not None:
        return requested
    firsts = []
    for g in run.ranks.values():
        st = np.asarray(g.get("step", []))
        m = steady(g)
        if st.size and m.any():
            firsts.append(int(st[m].min()))
        elif st.size:
            firsts.append(int(st.min()))
    first = min(firsts) if firsts else 0
    return first, first + 2


# ----------------------------------------------------------------------------- energy

def fig_energy(ctx: Ctx):
    rows, unavailable, shared = [], [], []
    sources = set()
    for run in ctx.runs:
        for rank in sorted(run.ranks):
            g = run.ranks[rank]
            src = str(g.get("energy_source", "unavailable"))
            w = g.get("windows", {}).get("train", {})
            e = _num(w.get("energy_j"))
            role = run.role(rank)
            if src == "unavailable" or not math.isfinite(e):
                unavailable.append((run, rank, role))
                continue
            if not bool(g.get("energy_owner", True)):
                shared.append((run, rank, role))
                continue
            sources.add(src)
            images = int(np.sum(g.get("images", [])))
            rows.append({"run": run, "rank": rank, "role": role, "e": e, "images": images,
                         "short": bool(w.get("energy_short_window", False))})
    if not rows:
        what = "every rank of every run" if not shared else "every rank that owns its device counter"
        raise Missing(f"no energy readings: energy_source is 'unavailable', or the train window's energy_j is "
                      f"NaN or absent (incomplete run), on {what} (ranks/<r>/windows/train@energy_j)")
    colors = ctx.n_colors()
    fig = new_figure(11.5, 4.3)
    ax_e, ax_i = fig.subplots(1, 2)
    handles = {}
    for role, marker in (("server", "s"), ("client", "o")):
        for n in sorted({r["run"].n_clients for r in rows}):
            sel = [r for r in rows if r["role"] == role and r["run"].n_clients == n]
            if not sel:
                continue
            by_key = {}
            for r in sel:
                by_key.setdefault(r["run"].key, []).append(r)
            xs, e_m, e_s, i_m, i_s, short = [], [], [], [], [], []
            for key, rs in by_key.items():
                xs.append(rs[0]["run"].x_cut)
                es = np.array([r["e"] for r in rs])
                per = np.array([r["e"] / r["images"] * 1e3 if r["images"] else np.nan for r in rs])
                e_m.append(es.mean())
                e_s.append(es.std() if len(es) > 1 else 0.0)
                i_m.append(np.nanmean(per) if np.isfinite(per).any() else np.nan)
                i_s.append(np.nanstd(per) if np.isfinite(per).sum() > 1 else 0.0)
                short.append(any(r["short"] for r in rs))
            order = np.argsort(xs)
            xs, e_m, e_s, i_m, i_s, short = (np.asarray(v)[order] for v in (xs, e_m, e_s, i_m, i_s, short))
            off = 0.008 if role == "client" else -0.008
            ls = "-" if role == "client" else "--"
            for ax, m, s in ((ax_e, e_m, e_s), (ax_i, i_m, i_s)):
                ax.errorbar(xs + off, m, yerr=s, color=colors[n], linestyle=ls, marker="none", capsize=3, lw=1.2)
                ax.scatter((xs + off)[~short], m[~short], marker=marker, color=colors[n], zorder=3, s=36)
                ax.scatter((xs + off)[short], m[short], marker=marker, facecolor="white", edgecolor=colors[n],
                           zorder=3, s=36)
            what = "server (rank 0)" if role == "server" else "clients (mean \u00b1 std over clients)"
            handles[(role, n)] = Line2D([], [], color=colors[n], marker=marker, linestyle=ls,
                                        label=f"{n} client{'s' if n != 1 else ''}: {what}")
    ax_e.set_ylabel("energy per rank in the training window (J)")
    ax_e.set_title("Training energy per rank", fontsize=10)
    ax_i.set_ylabel("energy per training image processed (mJ/image)")
    ax_i.set_title("Training energy per image (rank's energy / images it processed)", fontsize=10)
    for ax in (ax_e, ax_i):
        cut_axis(ax)
        ax.set_ylim(bottom=0)
    fig.legend(handles=list(handles.values()), loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"Energy against cut ratio (meters: {', '.join(sorted(sources))})", fontsize=11)
    notes = []
    if unavailable:
        notes.append("No energy reading (energy_source 'unavailable' or NaN), not plotted: "
                     + _summarize(unavailable, ctx) + ".")
        ctx.note("energy", "no energy reading for " + _summarize(unavailable, ctx))
    if shared:
        notes.append("Not plotted because they share a device (and its energy counter) with another rank, whose "
                     "value then covers both: " + _summarize(shared, ctx) + ".")
    if any(r["short"] for r in rows):
        notes.append("Hollow markers: training window shorter than two meter updates "
                     "(energy_short_window), the value is not trustworthy.")
    if any(r["run"].heterogeneous for r in rows):
        notes.append("Runs with per-client cuts are placed at their mean client cut.")
    notes.append("Energy is the whole device's (GPU via NVML, CPU package via RAPL) between the start and end "
                 "of training, warm-up included; per image divides by the images the rank processed "
                 "(the server's fused batches, each client's own batches).")
    footnote(fig, notes)
    return [("energy", fig)]


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


# ----------------------------------------------------------------------------- KID

def _kid_key(run: Run, k: dict) -> tuple:
    """The comparability key of one KID value: feature set and the images it was computed on."""
    dc = run.config.get("data", {})
    return (str(k.get("features", "unknown")), dc.get("dataset", "?"), dc.get("image_size", "?"),
            dc.get("channels", "?"))


def kid_data(ctx: Ctx) -> tuple[dict, list]:
    """What the KID figures show, one entry per feature set (KIDs of different sets are never mixed).

    Returns ({(features, dataset, image size, channels): set}, [(run, rank, "client") without a KID]),
    sets in first-seen order. Each set is a dict with
      "stem"        file name of its figure (kid-<features>[-<dataset>-<size>px-<channels>ch])
      "clients"     [{"run", "client", "n", "x", "mean", "std", "n_real", "n_fake"}]: one per client
                    KID (metrics/client_<i>/kid), x = the client's cut k_i / T
      "mean"        {n clients: [(cut, mean, std, count)]}: mean and std over the clients (and repeated
                    runs) of each homogeneous configuration, sorted by cut
      "pooled"      [{"run", "n", "x", "mean", "std", "n_real", "n_fake", "heterogeneous"}]: one per
                    run with metrics/pooled/kid, x = the run's cut (mean client cut if heterogeneous)
      "pooled_mean" {n clients: [(cut, mean, std, count)]}: pooled KID of each homogeneous
                    configuration, mean and std over its repeated runs, sorted by cut
      "no_pooled"   [run]: runs with client KIDs in this set but no pooled KID
    """
    sets, no_kid = {}, []

    def entry(key):
        return sets.setdefault(key, {"clients": [], "pooled": [], "mean": {}, "pooled_mean": {}, "no_pooled": []})

    for run in ctx.runs:
        for i in range(run.n_clients):
            k = run.metrics(i).get("kid")
            if not isinstance(k, dict) or not _finite(k.get("mean")):
                no_kid.append((run, i + 1, "client"))
                continue
            entry(_kid_key(run, k))["clients"].append(
                {"run": run, "client": i, "n": run.n_clients, "x": run.client_cut(i), "mean": float(k["mean"]),
                 "std": _num(k.get("std")), "n_real": _count(k.get("n_real")),
                 "n_fake": _count(k.get("n_fake"))})
        p = run.pooled_kid
        if p is not None:
            entry(_kid_key(run, p))["pooled"].append(
                {"run": run, "n": run.n_clients, "x": run.x_cut, "mean": float(p["mean"]), "std": _num(p.get("std")),
                 "n_real": _count(p.get("n_real")), "n_fake": _count(p.get("n_fake")),
                 "heterogeneous": run.heterogeneous})
    feats = [key[0] for key in sets]
    for key, d in sets.items():
        features, dataset, size, channels = key
        d["stem"] = f"kid-{_safe(features)}"
        if feats.count(features) > 1:
            d["stem"] += f"-{_safe(str(dataset))}-{size}px-{channels}ch"
        for field_, items in (("mean", d["clients"]), ("pooled_mean", d["pooled"])):
            by = {}
            for it in items:
                if not it["run"].heterogeneous:
                    by.setdefault(it["n"], {}).setdefault(it["run"].cut, []).append(it["mean"])
            d[field_] = {n: [(c, float(np.mean(v)), float(np.std(v)) if len(v) > 1 else 0.0, len(v))
                             for c, v in sorted(cs.items())] for n, cs in sorted(by.items())}
        pooled_runs = {id(it["run"]) for it in d["pooled"]}
        d["no_pooled"] = list({id(it["run"]): it["run"] for it in d["clients"]
                               if id(it["run"]) not in pooled_runs}.values())
    return sets, no_kid


POOLED_STYLE = {"marker": "*", "ms": 13, "mec": "black", "mew": 0.7}


def fig_kid(ctx: Ctx):
    sets, no_kid = kid_data(ctx)
    if not sets:
        raise Missing("no KID values (metrics/client_<i>/kid@mean or metrics/pooled/kid@mean) in any run")
    if no_kid:
        ctx.note("kid", "no per-client KID for " + _summarize(no_kid, ctx))
    out = []
    colors = ctx.n_colors()
    for (features, dataset, size, channels), d in sets.items():
        fig = new_figure(8.5, 5.0)
        ax = fig.subplots()
        items, pooled = d["clients"], d["pooled"]
        ns = sorted({it["n"] for it in items + pooled})
        for j, n in enumerate(ns):
            off = _jitter(j, len(ns), 0.03)  # each client count a little apart on the cut axis
            sel = [it for it in items if it["n"] == n]
            if sel:
                xs = np.array([it["x"] + off + _jitter(it["client"], n, 0.006) for it in sel])
                ys = np.array([it["mean"] for it in sel])
                es = np.array([it["std"] for it in sel])
                ax.errorbar(xs, ys, yerr=np.nan_to_num(es), fmt="o", ms=4, color=colors[n], alpha=0.45,
                            capsize=2, lw=0.8)
            if d["mean"].get(n):
                cx, cm, cs, _ = (np.array(v) for v in zip(*d["mean"][n]))
                ax.errorbar(cx + off, cm, yerr=cs, fmt="-D", ms=7, color=colors[n], capsize=4, lw=1.8, zorder=3)
            # pooled: one star per run (± subset std), dashed through each configuration's mean over runs;
            # a little right of the mean diamond so neither hides the other
            psel = [it for it in pooled if it["n"] == n]
            if psel:
                px = np.array([it["x"] + off + 0.01 for it in psel])
                ax.errorbar(px, [it["mean"] for it in psel], yerr=np.nan_to_num([it["std"] for it in psel]),
                            linestyle="none", color=colors[n], capsize=3, lw=1.0, zorder=4, **POOLED_STYLE)
            if d["pooled_mean"].get(n):
                cx, cm, _, _ = (np.array(v) for v in zip(*d["pooled_mean"][n]))
                ax.plot(cx + off + 0.01, cm, linestyle="--", color=colors[n], lw=1.4, zorder=3.5)
        styles = []
        if items:
            styles += [Line2D([], [], color="0.3", marker="o", ms=4, alpha=0.6, linestyle="none",
                              label="each client (\u00b1 KID std over subsets)"),
                       Line2D([], [], color="0.3", marker="D", ms=6, linestyle="-",
                              label="mean over clients (\u00b1 std over clients)")]
        if pooled:
            styles.append(Line2D([], [], color="0.3", linestyle="--", lw=1.4, **POOLED_STYLE,
                                 label="pooled: all clients' samples vs all\n"
                                       "held-out images (\u00b1 std over subsets)"))
        handles = _series_legend(ns, colors, styles)
        cut_axis(ax)
        ax.set_ylabel(f"KID, {features} features (unbiased MMD\u00b2, dimensionless)")
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_title(f"KID against cut ratio \u2014 {features} features\n"
                     f"{dataset}, {size}x{size} px, {channels} channel(s); lower is better", fontsize=10)
        ax.legend(handles=handles, fontsize=8, loc="best")
        notes = ["Per client: KID of the client's samples against its own held-out images. Pooled: KID of all "
                 "clients' samples together against all clients' held-out images together, computed on rank 0 "
                 "from feature vectors the clients sent (run.pooled_kid). Values from other feature sets are in "
                 "other files and are not comparable with these."]
        if items:
            nf = sorted({it["n_fake"] for it in items})
            nr = sorted({it["n_real"] for it in items})
            notes.append(f"Generated images per client: {', '.join(map(str, nf))}; held-out (real) images: "
                         f"{', '.join(map(str, nr))}. When the subset size equals the image count the subset std "
                         "is ~0.")
        if pooled:
            nf = sorted({it["n_fake"] for it in pooled})
            nr = sorted({it["n_real"] for it in pooled})
            notes.append(f"Pooled: {', '.join(map(str, nf))} generated and {', '.join(map(str, nr))} held-out "
                         "images; the stars sit a little right of their cut.")
        if d["no_pooled"]:
            notes.append("No pooled KID (run.pooled_kid off, or a file from before it existed) for: "
                         + "; ".join(sorted({r.label for r in d["no_pooled"]})) + ".")
        if any(it["run"].heterogeneous for it in items + pooled):
            notes.append("Runs with per-client cuts: each client at its own cut, the pooled value at the mean "
                         "client cut; no lines through them.")
        footnote(fig, notes)
        out.append((d["stem"], fig))
    return out


def _series_legend(ns, colors, styles) -> list:
    """Colour = number of clients, then the marker/line styles in grey."""
    out = [Patch(color=colors[n], label=f"{n} client{'s' if n != 1 else ''}") for n in ns]
    return out + styles


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


# ----------------------------------------------------------------------------- disclosure

def fig_disclosure(ctx: Ctx):
    td, sd, none = [], [], []
    for run in ctx.runs:
        for i in range(run.n_clients):
            m = run.metrics(i)
            t, s = m.get("training_disclosure"), m.get("sampling_disclosure")
            if isinstance(t, dict) and _finite(t.get("mse")):
                floor = t.get("floor_mse", {})
                est = t.get("estimator", "")
                td.append((run, i, float(t["mse"]), _num(floor.get(est)) if isinstance(floor, dict) else np.nan, est))
            if isinstance(s, dict) and _finite(s.get("mse")):
                sd.append((run, i, float(s["mse"]), _num(s.get("ssim"))))
            if not isinstance(t, dict) and not isinstance(s, dict):
                none.append((run, i + 1, "client"))
    if not td and not sd:
        raise Missing("no disclosure metrics (metrics/client_<i>/training_disclosure or sampling_disclosure) in "
                      "any run; clients with cut 1 send nothing to the server and have none")
    colors = ctx.n_colors()
    ns = sorted({it[0].n_clients for it in td + sd})
    fig = new_figure(14.0, 4.6)
    axes = fig.subplots(1, 3)

    def draw(ax, items, col, ls="-", clients=True):
        for j, n in enumerate(ns):
            off = _jitter(j, len(ns), 0.02)
            sel = [it for it in items if it[0].n_clients == n]
            if not sel:
                continue
            if clients:
                xs = np.array([it[0].client_cut(it[1]) + off + _jitter(it[1], n, 0.006) for it in sel])
                ax.scatter(xs, [it[col] for it in sel], s=14, color=colors[n], alpha=0.45)
            by = {}
            for it in sel:
                by.setdefault(round(it[0].client_cut(it[1]), 6), []).append(it[col])
            cx = np.array(sorted(by))
            ax.plot(cx + off, [np.nanmean(by[c]) for c in cx], ls, marker="D" if clients else None,
                    color=colors[n], lw=1.5, ms=5)

    if td:
        draw(axes[0], td, 2)
        draw(axes[0], td, 3, ls="--", clients=False)
        axes[0].set_ylim(bottom=0)
    else:
        empty_message(axes[0], "no training disclosure in any run")
    axes[0].set_ylabel("MSE per pixel (images in [-1, 1])")
    axes[0].set_title("Training: server's best linear reconstruction\nof x0 from x_k (lower = more disclosed)",
                      fontsize=9.5)
    for ax, col, ylabel, title in ((axes[1], 2, "MSE per pixel (images in [-1, 1])",
                                    "Sampling: server view vs final sample,\nMSE (lower = more disclosed)"),
                                   (axes[2], 3, "SSIM (dimensionless, 1 = identical)",
                                    "Sampling: server view vs final sample,\nSSIM (higher = more disclosed)")):
        if sd:
            draw(ax, sd, col)
        else:
            empty_message(ax, "no sampling disclosure in any run")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9.5)
    for ax in axes:
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.has_data():
            cut_axis(ax)
    styles = [Line2D([], [], color="0.3", marker="o", ms=4, alpha=0.6, linestyle="none", label="each client"),
              Line2D([], [], color="0.3", marker="D", ms=5, linestyle="-", label="mean over clients")]
    if td:
        styles.append(Line2D([], [], color="0.3", linestyle="--",
                             label="training: analytic MSE of that estimator (floor_mse), mean"))
    fig.legend(handles=_series_legend(ns, colors, styles), loc="outside lower center", ncols=3 + len(ns),
               fontsize=8)
    fig.suptitle("Disclosure against cut ratio", fontsize=11)
    notes = []
    if none:
        notes.append("No disclosure metrics (nothing sent to the server, cut 1) for " + _summarize(none, ctx) + ".")
    ests = sorted({it[4] for it in td})
    if ests:
        notes.append(f"Training: MSE of the better of the rescale and Wiener estimates (chosen here: "
                     f"{', '.join(ests)}), on the client's last training batch; dashed: that estimator's analytic "
                     "MSE. Both are linear per-pixel attacks: what the server can learn at least, not at most.")
    footnote(fig, notes)
    return [("disclosure", fig)]


# ----------------------------------------------------------------------------- bytes

def _comm_rows(g: dict):
    c = g.get("comm") or {}
    if not isinstance(c, dict) or "bytes" not in c:
        return []
    return list(zip(np.atleast_1d(c["direction"]), np.atleast_1d(c["kind"]), np.atleast_1d(c["peer"]),
                    np.atleast_1d(c["bytes"]), np.atleast_1d(c["messages"])))


def fig_bytes(ctx: Ctx):
    reps = [r for r, _ in ctx.representatives()]
    have = [r for r in reps if any(_comm_rows(g) for g in r.ranks.values())]
    if not have:
        raise Missing("no run has message counts (ranks/<r>/comm is empty on every rank; with cut 1 nothing is sent)")
    kinds = sorted({str(k) for r in have for g in r.ranks.values() for _, k, _, _, _ in _comm_rows(g)},
                   key=lambda k: (k != "train_batch", k))
    labels = [r.label.replace(", ", "\n") for r in reps]
    x = np.arange(len(reps))
    fig = new_figure(max(10.0, 1.2 * len(reps) * 2 + 2), 5.0)
    sub_b, sub_w = fig.subfigures(1, 2)  # each panel with its own legend underneath
    ax_b, ax_w = sub_b.subplots(), sub_w.subplots()
    # (a) bytes per training step through the server, per kind (amortised over the run's steps)
    width = 0.8 / max(len(kinds), 1)
    kind_colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    notes = []
    for j, kind in enumerate(kinds):
        vals = []
        for r in reps:
            steps = int(r.config.get("train", {}).get("steps", 0)) or max(
                (n_steps(g) for g in r.ranks.values()), default=0)
            tot = sum(int(b) for g in [r.ranks.get(0, {})] for d, k, _, b, _ in _comm_rows(g) if str(k) == kind)
            vals.append(tot / steps if steps else np.nan)
        vals = np.array(vals, dtype=float)
        ax_b.bar(x + (j - (len(kinds) - 1) / 2) * width, np.where(vals > 0, vals, np.nan), width,
                 color=kind_colors[kind], label=kind)
    ax_b.set_yscale("log")
    ax_b.set_ylabel("bytes per training step at the server (B, log scale)")
    ax_b.set_title("Traffic per training step, by message kind\n(server's sent + received, headers included)",
                   fontsize=9.5)
    sub_b.legend(*ax_b.get_legend_handles_labels(), loc="outside lower center", ncols=len(kinds), fontsize=8,
                 title="message kind", title_fontsize=8)
    # (b) achieved bandwidth of train_batch: bytes / time in the recv (server) and send (client) phases
    bw_server, bw_client, bw_client_s = [], [], []
    for r in reps:
        bw_server.append(_bandwidth(r, 0, "recv", "recv"))
        cl = [_bandwidth(r, rank, "sent", "send") for rank in r.ranks if rank > 0]
        cl = np.array([c for c in cl if np.isfinite(c)])
        bw_client.append(cl.mean() if cl.size else np.nan)
        bw_client_s.append(cl.std() if cl.size > 1 else 0.0)
    ax_w.bar(x - 0.2, np.array(bw_server) / 1e6, 0.4, color="C0", label="server: recv (after probe)")
    ax_w.bar(x + 0.2, np.array(bw_client) / 1e6, 0.4, yerr=np.array(bw_client_s) / 1e6, capsize=3, color="C1",
             label="clients: send phase (Isend posting), mean \u00b1 std")
    ax_w.set_yscale("log")
    ax_w.set_ylabel("achieved bandwidth, train_batch (MB/s, log scale)")
    ax_w.set_title("Achieved bandwidth of train_batch messages\n(bytes / seconds in the phase, warm-up excluded)",
                   fontsize=9.5)
    sub_w.legend(*ax_w.get_legend_handles_labels(), loc="outside lower center", ncols=1, fontsize=8)
    for ax in (ax_b, ax_w):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlim(-0.6, len(reps) - 0.4)
        ax.grid(True, axis="y", which="both", alpha=0.25)
        for xi, r in zip(x, reps):
            if r not in have:
                ax.text(xi, 0.5, "no messages", transform=ax.get_xaxis_transform(), ha="center", va="center",
                        rotation=90, fontsize=8, color="0.4")
    fig.suptitle("Communication (one run per configuration)", fontsize=11)
    notes.append("Per-step bytes divide each kind's run total by the run's training steps; sample_request and "
                 "cut_tensor are sent once per client after training, so theirs is an amortised share.")
    notes.append("Only train_batch has a transfer time: sample_request / cut_tensor are exchanged outside "
                 "training steps, whose phases are not recorded. The client's send phase only posts a "
                 "non-blocking Isend (its completion is in 'wait'), so its rate is an upper bound.")
    footnote(fig, notes)
    return [("bytes", fig)]


def _bandwidth(run: Run, rank: int, direction: str, phase: str) -> float:
    g = run.ranks.get(rank)
    if not g or not n_steps(g):
        return float("nan")
    rows = [(int(b), int(m)) for d, k, _, b, m in _comm_rows(g) if str(d) == direction and str(k) == "train_batch"]
    if not rows:
        return float("nan")
    total_b, total_m = sum(b for b, _ in rows), sum(m for _, m in rows)
    ps = np.asarray(g["phase_seconds"], dtype=float)
    phases = run.phases
    if phase not in phases:
        return float("nan")
    m = steady(g)
    m = m if m.any() else np.ones(len(ps), bool)
    secs = ps[m, phases.index(phase)].sum()
    # train_batch messages are equal-sized: the bytes of the non-warm-up steps
    peers = len({p for d, k, p, _, _ in _comm_rows(g) if str(d) == direction and str(k) == "train_batch"})
    msgs = int(m.sum()) * peers
    b = total_b / total_m * min(msgs, total_m) if total_m else 0
    return b / secs if secs > 0 else float("nan")


# ----------------------------------------------------------------------------- samples

SAMPLE_KINDS = (("real", "real (held-out; run.store_real)"),
                ("generated", "generated (final samples)"),
                ("server_view", "server view x_k / \u221a\u0101_k"))


def tile(arr: np.ndarray) -> np.ndarray:
    """[N, C, H, W] uint8 -> one grid image (H', W') or (H', W', 3), 1 px grey gaps."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[:, None]
    n, c, h, w = a.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = a[i]
    return out[0] if c == 1 else out[:3].transpose(1, 2, 0)


def sample_panels(run: Run) -> tuple[list, list, dict]:
    """What one samples figure shows: (client indices with samples, [(kind, column title)], cells), where
    cells[(client, kind)] is a uint8 [S, C, H, W] array or the text shown in an empty cell. Kinds are the
    columns of SAMPLE_KINDS that any client stores: `real` only when the run stored it (run.store_real)."""
    clients = [i for i in range(run.n_clients) if run.samples(i)]
    kinds = [(k, t) for k, t in SAMPLE_KINDS if any(k in run.samples(i) for i in clients)]
    cells = {}
    for i in clients:
        s = run.samples(i)
        for k, _ in kinds:
            a = np.asarray(s[k]) if k in s else np.zeros(0, np.uint8)
            if a.size:
                cells[(i, k)] = a
            elif k == "server_view":
                cells[(i, k)] = "none: sampled locally (k = T)"
            else:
                cells[(i, k)] = "not stored"
    return clients, kinds, cells


def fig_samples(ctx: Ctx):
    out, notes = [], []
    for run, count in ctx.representatives():
        clients, kinds, cells = sample_panels(run)
        if not clients:
            notes.append(f"{run.label} ({run.name}): no samples stored")
            continue
        fig = new_figure(2.3 * len(kinds) + 1.0, 2.3 * len(clients) + 0.9)
        axes = fig.subplots(len(clients), len(kinds), squeeze=False)
        for row, i in zip(axes, clients):
            for ax, (k, title) in zip(row, kinds):
                ax.set_xticks([])
                ax.set_yticks([])
                a = cells[(i, k)]
                if isinstance(a, np.ndarray):
                    img = tile(a)
                    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255,
                              interpolation="nearest")
                    ax.set_xlabel(f"{a.shape[0]} images, {a.shape[-1]}x{a.shape[-2]} px", fontsize=7)
                else:
                    empty_message(ax, a)
                if i == clients[0]:
                    ax.set_title(title, fontsize=9)
            k_i = run.ks[i] if i < len(run.ks) else "?"
            row[0].set_ylabel(f"client {i} (rank {i + 1})\nk = {k_i}", fontsize=9)
        sub = run.name + (f", latest of {count} runs" if count > 1 else "")
        fig.suptitle(f"Samples \u2014 {run.label}\n({sub})", fontsize=10)
        fn = []
        if any(k == "real" for k, _ in kinds):
            fn.append("Real: the first images of each client's own held-out set, in the results file only because "
                      "the run was started with run.store_real=true. They are client data: share this figure "
                      "and the file accordingly.")
        else:
            fn.append("Real images: not stored in the results file (no samples/client_<i>/real; "
                      "only written with run.store_real=true).")
        if not any("server_view" in run.samples(i) for i in clients):
            fn.append("Server view: none, every client samples its whole chain itself (k = T).")
        footnote(fig, fn)
        out.append((f"samples-{run.slug}", fig))
    for n in notes:
        ctx.note("samples", n)
    if not out:
        raise Missing("no run stores samples (samples/client_<i>/generated)")
    return out


# ----------------------------------------------------------------------------- scaling

def throughput(run: Run) -> float:
    """Images/s of all clients together over their non-warm-up steps (rank 0's clock)."""
    images, t0, t1 = 0, [], []
    for rank, g in run.ranks.items():
        if rank == 0 or not n_steps(g):
            continue
        m = steady(g)
        if not m.any():
            continue
        images += int(np.asarray(g["images"])[m].sum())
        t0.append(float(np.asarray(g["step_start"])[m].min()))
        t1.append(float(np.asarray(g["step_end"])[m].max()))
    if not t0 or max(t1) <= min(t0):
        return float("nan")
    return images / (max(t1) - min(t0))


def wait_fraction(run: Run) -> float:
    g = run.ranks.get(0)
    if not g or not n_steps(g) or "wait" not in run.phases:
        return float("nan")
    m = steady(g)
    if not m.any():
        return float("nan")
    ps = np.asarray(g["phase_seconds"], dtype=float)[m]
    wall = (np.asarray(g["step_end"]) - np.asarray(g["step_start"]))[m].sum()
    return float(ps[:, run.phases.index("wait")].sum() / wall) if wall > 0 else float("nan")


def fig_scaling(ctx: Ctx):
    pts = []
    for run in ctx.runs:
        pts.append((run, throughput(run), wait_fraction(run)))
    if not any(np.isfinite(t) for _, t, _ in pts):
        raise Missing("no run has client steps after warm-up (ranks/<r>/step, warmup, step_start, step_end, images)")
    cuts = sorted({r.key[0] for r, _, _ in pts}, key=lambda c: (isinstance(c, tuple), np.mean(c)))
    import matplotlib as mpl
    cmap = mpl.colormaps["viridis"]
    fig = new_figure(11.5, 4.4)
    ax_t, ax_w = fig.subplots(1, 2)
    handles, wmax = [], 0.0
    for j, cut in enumerate(cuts):
        color = cmap(0.05 + 0.85 * j / max(len(cuts) - 1, 1))
        sel = [p for p in pts if p[0].key[0] == cut]
        ns = sorted({r.n_clients for r, _, _ in sel})
        for ax, col in ((ax_t, 1), (ax_w, 2)):
            m, s = [], []
            for n in ns:
                v = np.array([p[col] for p in sel if p[0].n_clients == n], dtype=float)
                v = v[np.isfinite(v)]
                m.append(v.mean() if v.size else np.nan)
                s.append(v.std() if v.size > 1 else 0.0)
            m, s = np.array(m), np.array(s)
            if col == 2:
                m, s = m * 100, s * 100
            if np.isfinite(m).any():
                ax.errorbar(np.array(ns) + _jitter(j, len(cuts), 0.04), m, yerr=s, marker="o", color=color,
                            capsize=3, lw=1.5)
                if col == 2:
                    wmax = max(wmax, float(np.nanmax(m + s)))
        label = config_label((cut, 0)).rsplit(",", 1)[0]
        handles.append(Line2D([], [], color=color, marker="o", label=label))
    ns_all = sorted({r.n_clients for r, _, _ in pts})
    for ax in (ax_t, ax_w):
        ax.set_xlabel("number of clients")
        ax.set_xticks(ns_all)
        ax.set_xlim(min(ns_all) - 0.6, max(ns_all) + 0.6)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_t.set_ylabel("throughput, all clients (images/s)")
    ax_t.set_title("Training throughput (non-warm-up steps)", fontsize=10)
    ax_w.set_ylabel("server time waiting for clients (% of step time)")
    ax_w.set_title("Server wait fraction (non-warm-up steps)", fontsize=10)
    top = min(100.0, max(5.0, 1.2 * wmax))
    ax_w.set_ylim(-0.03 * top, top)
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="cut ratio", title_fontsize=8)
    fig.suptitle("Scaling with the number of clients (mean \u00b1 std over repeated runs)", fontsize=11)
    notes = ["Throughput: images in the clients' non-warm-up steps / time from the first such step's start to "
             "the last one's end (all ranks on rank 0's clock). Wait: the server's 'wait' phase (probing for "
             "the next client batch) / its step time."]
    if len(ns_all) == 1:
        notes.append(f"Only one client count ({ns_all[0]}) in the inputs: no trend to show.")
    idle = sorted({r.label for r, _, w in pts if not np.isfinite(w)})
    if idle:
        notes.append("No server wait fraction (server ran no training steps, e.g. cut 1) for: " + "; ".join(idle) + ".")
    footnote(fig, notes)
    return [("scaling", fig)]


DRAW = {"phases": fig_phases, "timeline": fig_timeline, "energy": fig_energy, "kid": fig_kid,
        "disclosure": fig_disclosure, "bytes": fig_bytes, "samples": fig_samples, "scaling": fig_scaling}


# ----------------------------------------------------------------------------- command line

def _split(value: str, allowed, what: str) -> list:
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f"{', '.join(bad) or 'nothing given'}: choose from {', '.join(allowed)}",
                                 param_hint=what)
    return list(dict.fromkeys(items))


def _steps(value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[:-]\s*(\d+)\s*", value)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise click.BadParameter("expected FIRST:LAST, e.g. 3:5 (inclusive, FIRST <= LAST)",
                                 param_hint="--timeline-steps")
    return int(m.group(1)), int(m.group(2))


def save(fig, out_dir: str, stem: str, formats) -> list:
    paths = []
    for fmt in formats:
        path = os.path.join(out_dir, f"{stem}.{fmt}")
        fig.root.savefig(path, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
        paths.append(path)
    return paths


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("files", nargs=-1, required=True, metavar="RESULTS.h5...")
@click.option("-o", "--output-dir", default="figures", show_default=True, metavar="DIR",
              help="Folder for the figures (created if needed).")
@click.option("--format", "formats", default="png,pdf", show_default=True, metavar="LIST",
              help=f"Comma-separated file formats: {', '.join(FORMATS)}.")
@click.option("--only", default=None, metavar="LIST",
              help="Comma-separated figures to draw (names above)  [default: all].")
@click.option("--timeline-steps", default=None, metavar="FIRST:LAST",
              help="Steps shown in the timeline (inclusive) [default: the first 3 after warm-up].")
def cli(files, output_dir, formats, only, timeline_steps):
    """Draw figures from CollaFuse results files (runs from all files are merged).

    \b
    Figures (FIG.png / FIG.pdf under DIR):
      phases      median seconds per step per phase, per rank
      timeline    phases across ranks for a few steps
      energy      energy per rank and per image against cut
      kid         KID against cut: per client, their mean, pooled (kid-<feature set>; one file per set)
      disclosure  training and sampling disclosure against cut
      bytes       bytes per step and achieved bandwidth per message kind
      samples     image grids per client: real (if stored), generated, server view (samples-cut<c>-n<N>)
      scaling     throughput and server wait fraction against number of clients

    \b
    Exit status: 0 at least one figure written; 1 no figure could be drawn;
    2 usage error or an input missing / unreadable / not a results file.
    """
    fmts = _split(formats, FORMATS, "--format")
    figures = list(FIGURES) if only is None else _split(only, FIGURES, "--only")
    window = _steps(timeline_steps)
    runs, problems = load(files)
    if problems:
        for p in problems:
            click.echo(f"{PROG}: error: {p}", err=True)
        click.echo(f"{PROG}: nothing drawn ({len(problems)} unreadable input{'s' if len(problems) > 1 else ''})",
                   err=True)
        sys.exit(2)
    usable = []
    for r in runs:
        if not r.ranks:
            click.echo(f"{PROG}: {r.path}: run {r.name} has no rank data (status {r.d.get('status', '?')!r}: "
                       "crashed or still running); skipped", err=True)
            continue
        if r.d.get("status") != "complete":
            click.echo(f"{PROG}: {r.path}: run {r.name} has status {r.d.get('status', '?')!r}; used as it is",
                       err=True)
        usable.append(r)
    if not usable:
        click.echo(f"{PROG}: no runs with data in {', '.join(files)}; nothing drawn", err=True)
        sys.exit(1)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        click.echo(f"{PROG}: error: cannot create output folder {output_dir}: {exc.strerror}", err=True)
        sys.exit(2)
    diff = config_differences(usable)
    if diff:
        shown = "; ".join(f"{k} = {' / '.join(v)}" for k, v in list(diff.items())[:6])
        click.echo(f"{PROG}: note: the runs differ in settings other than cut and client count, and are merged "
                   f"by (cut, clients) regardless: {shown}" + (" ..." if len(diff) > 6 else ""), err=True)
    ctx = Ctx(usable, window)
    written, skipped = [], []
    for name in figures:
        try:
            figs = DRAW[name](ctx)
        except Missing as exc:
            click.echo(f"{PROG}: {name}: not drawn: {exc}", err=True)
            skipped.append(name)
            continue
        except Exception as exc:  # a bug in one figure must not cost the others
            click.echo(f"{PROG}: {name}: not drawn: internal error {type(exc).__name__}: {exc}", err=True)
            skipped.append(name)
            continue
        for stem, fig in figs:
            try:
                written += save(fig, output_dir, stem, fmts)
            except OSError as exc:
                click.echo(f"{PROG}: {name}: cannot write {stem}: {exc}", err=True)
                skipped.append(name)
    for p in written:
        click.echo(p)
    n_runs = len(usable)
    click.echo(f"{PROG}: {len(written)} file{'s' if len(written) != 1 else ''} written from {n_runs} "
               f"run{'s' if n_runs != 1 else ''} in {len(ctx.groups)} configuration"
               f"{'s' if len(ctx.groups) != 1 else ''}"
               + (f"; not drawn: {', '.join(dict.fromkeys(skipped))}" if skipped else ""), err=True)
    sys.exit(0 if written else 1)


def main():
    # Read without taking HDF5's file lock: a run still writing the file reopens it at every flush
    # and must never fail because someone is plotting it. Only effective before h5py is imported;
    # export HDF5_USE_FILE_LOCKING=TRUE to keep locking.
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    cli(prog_name=PROG)


if __name__ == "__main__":
    main()
