"""Communication and scaling figures: bytes per step, bandwidth, throughput against client count."""
from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from .runs import Ctx, Missing, Run, config_label, n_steps, steady
from .style import _jitter, footnote, new_figure


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
