"""Time and energy figures: phases per step, timeline across ranks, energy against cut."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .runs import MAX_PANELS, Ctx, Missing, Run, _finite, _num, _summarize, n_steps, steady
from .style import OTHER_COLOR, cut_axis, footnote, new_figure, phase_colors, time_unit


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
    sources, reasons = set(), set()
    for run in ctx.runs:
        for rank in sorted(run.ranks):
            g = run.ranks[rank]
            src = str(g.get("energy_source", "unavailable"))
            w = g.get("windows", {}).get("train", {})
            e = _num(w.get("energy_j"))
            role = run.role(rank)
            if src == "unavailable" or not math.isfinite(e):
                unavailable.append((run, rank, role))
                if g.get("energy_reason"):
                    reasons.add(str(g["energy_reason"]))
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
                      f"NaN or absent (incomplete run), on {what} (ranks/<r>/windows/train@energy_j)"
                      + (f"; why: {'; '.join(sorted(reasons))}" if reasons else ""))
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
        why = f" (why: {'; '.join(sorted(reasons))})" if reasons else ""
        ctx.note("energy", "no energy reading for " + _summarize(unavailable, ctx) + why)
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
