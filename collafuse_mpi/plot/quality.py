"""Figures of what the clients produce: KID and sample grids."""
from __future__ import annotations

import math
import re

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .runs import Ctx, Missing, Run, _count, _finite, _num, _summarize
from .style import _jitter, cut_axis, empty_message, footnote, new_figure
from .trends import mean_ci

MANY = 8  # above this many clients in a run, figures show distributions, not each client


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
      "pooled_mean" {n clients: [(cut, mean, ci, count)]}: pooled KID of each homogeneous
                    configuration, mean and 95% t-interval half-width over its repeated runs
                    (nan for a single run), sorted by cut
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
            # clients: spread over clients (std); pooled: repeats of a configuration, 95% interval of their mean
            stat = (lambda v: (float(np.mean(v)), float(np.std(v)) if len(v) > 1 else 0.0, len(v))) \
                if field_ == "mean" else mean_ci
            d[field_] = {n: [(c, *stat(v)) for c, v in sorted(cs.items())] for n, cs in sorted(by.items())}
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
            if sel and n > MANY:  # one bar per cut: median and 10-90 % of the clients, not n points
                by_x = {}
                for it in sel:
                    by_x.setdefault(round(it["x"], 6), []).append(it["mean"])
                xs = np.array(sorted(by_x)) + off
                q = np.array([np.quantile(by_x[x], [0.1, 0.5, 0.9]) for x in sorted(by_x)])
                ax.errorbar(xs, q[:, 1], yerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], fmt="s", ms=5,
                            color=colors[n], alpha=0.6, capsize=4, lw=2.2)
            elif sel:
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
                cx, cm, ci, _ = (np.array(v, dtype=float) for v in zip(*d["pooled_mean"][n]))
                ax.plot(cx + off + 0.01, cm, linestyle="--", color=colors[n], lw=1.4, zorder=3.5)
                if np.any(np.isfinite(ci)):
                    ax.fill_between(cx + off + 0.01, cm - np.nan_to_num(ci), cm + np.nan_to_num(ci),
                                    color=colors[n], alpha=0.15, lw=0)
        styles = []
        if any(it["n"] <= MANY for it in items):
            styles.append(Line2D([], [], color="0.3", marker="o", ms=4, alpha=0.6, linestyle="none",
                                 label="each client (\u00b1 KID std over subsets)"))
        if any(it["n"] > MANY for it in items):
            styles.append(Line2D([], [], color="0.3", marker="s", ms=5, alpha=0.6, lw=2.2,
                                 label=f"runs of > {MANY} clients: median client,\nbar 10-90 % of clients"))
        if items:
            styles += [
                       Line2D([], [], color="0.3", marker="D", ms=6, linestyle="-",
                              label="mean over clients (\u00b1 std over clients)")]
        if pooled:
            styles.append(Line2D([], [], color="0.3", linestyle="--", lw=1.4, **POOLED_STYLE,
                                 label="pooled: all clients' samples vs all\n"
                                       "held-out images (\u00b1 std over subsets)"))
            if any(k > 1 for v in d["pooled_mean"].values() for *_, k in v):
                styles.append(Line2D([], [], color="0.3", lw=6, alpha=0.2,
                                     label="band: 95% CI of the pooled mean over repeated runs (seeds)"))
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
    if len(clients) > MANY:  # a row per client does not fit: MANY clients spread over the ids
        clients = [clients[j] for j in sorted({round(v) for v in np.linspace(0, len(clients) - 1, MANY)})]
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
            row[0].set_ylabel(f"client {i} (rank {run.rank_of(i)})\nk = {k_i}", fontsize=9)
        sub = run.name + (f", latest of {count} runs" if count > 1 else "")
        fig.suptitle(f"Samples \u2014 {run.label}\n({sub})", fontsize=10)
        fn = []
        stored = sum(1 for i in range(run.n_clients) if run.samples(i))
        if stored > len(clients):
            fn.append(f"Rows: {len(clients)} of the run's {stored} clients with samples, spread evenly over "
                      "the client ids (every client's samples are in the results file).")
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
