"""The disclosure figure: what the strongest attacks recover against the cut, per cut-noise mode,
with the analytic anchors, single view against the whole run, and re-identification and
membership beside them. Reads metrics/pooled/privacy and metrics/client_<i>/privacy."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.lines import Line2D

from .runs import Ctx, Missing, _finite
from .style import cut_axis, empty_message, footnote, new_figure
from .trends import mean_ci

# (group in the results, name, label, colour, line style)
RECON = (("reconstruction", "scalar", "scalar Wiener (one view)", "0.55", ":"),
         ("reconstruction", "linear", "linear MMSE, covariance from the views (one view)", "tab:blue", "-"),
         ("reconstruction", "public_linear", "linear MMSE, public prior (one view)", "tab:cyan", "-"),
         ("reconstruction", "learned", "learned denoiser on public data (one view)", "tab:green", "-"),
         ("linked", "linear", "linked views of the run, linear", "tab:blue", "--"),
         ("linked", "learned", "linked views of the run, learned", "tab:green", "--"))
ANCHORS = (("linear_mse", "analytic: linear MMSE floor, one view", "tab:red", ":"),
           ("linear_mse_run", "analytic: linear MMSE floor, all views of the run", "tab:red", "-."))


def _psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


def privacy_of(run) -> dict | None:
    p = (run.d.get("metrics", {}).get("pooled", {}) or {}).get("privacy")
    return p if isinstance(p, dict) else None


def _mode(run) -> str:
    return str(run.config.get("privacy", {}).get("cut_noise", "fresh"))


def _series(runs, value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut, mean and the 95% t-interval half-width of the mean over repeated runs (e.g. seeds;
    nan for a single run) of value(run), sorted by cut."""
    by = {}
    for run in runs:
        v = value(run)
        if v is not None and _finite(v):
            by.setdefault(round(run.x_cut, 6), []).append(float(min(v, 80.0)))  # c = 0: exact copy
    xs = np.array(sorted(by))
    stats = [mean_ci(by[x]) for x in xs]
    return xs, np.array([m for m, _, _ in stats]), np.array([ci for _, ci, _ in stats])


def _anchor(run, key):
    rows = [run.metrics(i).get("privacy", {}).get("analytic", {}).get(key) for i in range(run.n_clients)]
    rows = [float(r) for r in rows if r is not None and _finite(r)]
    return _psnr(float(np.mean(rows))) if rows else None


def _plot(ax, runs, value, color, ls, label):
    xs, ys, sd = _series(runs, value)
    if not len(xs):
        return False
    ax.plot(xs, ys, ls, color=color, marker="o", ms=3.5, lw=1.4, label=label)
    if np.any(np.isfinite(sd)):
        sd = np.nan_to_num(sd)
        ax.fill_between(xs, ys - sd, ys + sd, color=color, alpha=0.15, lw=0)
    return True


def _sampling_psnr(run, name):
    """PSNR of a sampling attack; the rescale x_k / sqrt(abar_k) of files that predate it in the
    attack suite is the same estimate that sampling_disclosure@mse scores."""
    v = privacy_of(run).get("sampling", {}).get(name, {}).get("psnr")
    if v is None and name == "rescale":
        rows = [run.metrics(i).get("sampling_disclosure", {}).get("mse") for i in range(run.n_clients)]
        rows = [float(r) for r in rows if r is not None and _finite(r)]
        v = _psnr(float(np.mean(rows))) if rows else None
    return v


def _paper_measure(run):
    rows = [run.metrics(i).get("sampling_disclosure", {}).get("ssim") for i in range(run.n_clients)]
    rows = [float(r) for r in rows if r is not None and _finite(r)]
    return float(np.mean(rows)) if rows else None


def fig_disclosure(ctx: Ctx):
    runs = [r for r in ctx.runs if privacy_of(r)]
    if not runs:
        raise Missing("no attack results (metrics/pooled/privacy) in any run: runs with privacy.attacks = none, "
                      "or where no client sends anything to the server (cut 1), have none")
    modes = sorted({_mode(r) for r in runs}, key=lambda m: (m != "fresh", m))
    fig = new_figure(6.2 * len(modes) + 0.5, 12.5)
    axes = np.atleast_2d(fig.subplots(3, len(modes), squeeze=False))
    for j, mode in enumerate(modes):
        sel = [r for r in runs if _mode(r) == mode]
        ax = axes[0, j]
        for group, name, label, color, ls in RECON:
            _plot(ax, sel, lambda r, g=group, n=name: privacy_of(r).get(g, {}).get(n, {}).get("psnr"), color, ls, label)
        for key, label, color, ls in ANCHORS:
            xs, ys, _ = _series(sel, lambda r, k=key: _anchor(r, k))
            if len(xs):
                ax.plot(xs, ys, ls, color=color, lw=1.2, label=label)
        ax.set_ylabel("PSNR of the reconstruction of x0, dB (higher = more disclosed)")
        ax.set_title(f"Reconstruction of the training images, cut noise: {mode}", fontsize=9.5)
        ax = axes[1, j]
        drew = False
        for key, color in (("m10", "tab:purple"), ("m100", "tab:orange")):
            drew |= _plot(ax, sel, lambda r, k=key: privacy_of(r).get("reid", {}).get(k, {}).get("top1"),
                          color, "-", f"re-identification top-1 among {key[1:]}, one view")
            drew |= _plot(ax, sel, lambda r, k=key: privacy_of(r).get("reid", {}).get(k, {}).get("top1_linked"),
                          color, "--", f"re-identification top-1 among {key[1:]}, linked views")
            ax.axhline(1 / int(key[1:]), color=color, lw=0.8, ls=":")
        for side, color in (("server", "k"), ("client", "tab:brown")):
            drew |= _plot(ax, sel, lambda r, s=side: privacy_of(r).get("membership", {}).get(s, {}).get("auc"),
                          color, "-.", f"membership ROC AUC, released {side} model")
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
        if not drew:
            empty_message(ax, "no re-identification or membership results")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy / AUC (dotted: chance)")
        ax.set_title(f"Re-identification and membership, cut noise: {mode}", fontsize=9.5)
        ax = axes[2, j]
        drew = False
        for name, color in (("rescale", "tab:red"), ("scalar", "0.55"), ("linear", "tab:blue"), ("learned", "tab:green")):
            drew |= _plot(ax, sel, lambda r, n=name: _sampling_psnr(r, n),
                          color, "-", f"sampling: {name} reconstruction of the final sample from x_k")
        if not drew:
            empty_message(ax, "no sampling attack results")
        ax.set_ylabel("PSNR against the client's final sample, dB")
        twin = ax.twinx()
        _plot(twin, sel, lambda r: _paper_measure(r), "tab:olive", ":", "paper's measure: SSIM of x_k vs final sample")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("SSIM")
        ax.set_title(f"At sampling: what the x_k the server sent gives away, cut noise: {mode}", fontsize=9.5)
    for ax in axes.ravel():
        if ax.has_data():
            cut_axis(ax)
    handles, labels = [], []
    for ax in list(axes.ravel()) + [a for a in fig.axes if a not in axes.ravel()]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles.append(Line2D([], [], color="0.3", lw=6, alpha=0.2, label="band: 95% confidence interval of the mean over repeated runs (seeds)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=7.5)
    fig.suptitle("What the server learns about the clients' images, against the cut", fontsize=11)
    footnote(fig, ["Every curve is an attack run by rank 0 on the messages it received, scored on each client's rank "
                   "against its true images, pooled over clients. PSNR over [-1, 1] images; c = 0 is capped at 80 dB "
                   "(the server receives x0). The linear floors are the expected error of the linear attack under "
                   "the covariance estimated from the views: a non-linear attack can beat them."])
    return [("disclosure", fig)]
