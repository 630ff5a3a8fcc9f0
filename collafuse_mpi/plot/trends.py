"""Trends against the cut with error bars over seeds, and the clients' share of the compute.

Runs of one configuration (cut, number of clients) that differ only in run.seed are repeats:
each panel shows, per configuration, the mean over its runs and a 95% Student-t confidence
interval of that mean (none with a single run; the number of runs is in the legend).
"""
from __future__ import annotations

import numpy as np

from .runs import Ctx, Missing, Run, _finite, steady
from .style import cut_axis, footnote, new_figure

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (no scipy needed here)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t interval, n) of the finite values; half-width nan for n < 2."""
    v = np.asarray([x for x in values if _finite(x)], dtype=float)
    if not v.size:
        return float("nan"), float("nan"), 0
    if v.size < 2:
        return float(v[0]), float("nan"), 1
    t = _T95[v.size - 2] if v.size - 1 <= len(_T95) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / np.sqrt(v.size)), int(v.size)


def _client_mean(run: Run, key: str, field: str = "mse") -> float:
    vals = [run.metrics(i).get(key, {}).get(field) for i in range(run.n_clients)]
    vals = [float(v) for v in vals if _finite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _median_step(run: Run, role: str) -> float:
    vals = []
    for r, g in run.ranks.items():
        if run.role(r) == role and "step_start" in g and np.asarray(g["step_start"]).size:
            wall = (np.asarray(g["step_end"]) - np.asarray(g["step_start"]))[steady(g)]
            if wall.size:
                vals.append(float(np.median(wall)))
    return float(np.mean(vals)) if vals else float("nan")


def _window_total(run: Run, rank: int, field: str) -> float:
    w = run.ranks.get(rank, {}).get("windows", {})
    vals = [w.get(n, {}).get(field) for n in ("train", "sample")]
    vals = [float(v) for v in vals if _finite(v)]
    return float(sum(vals)) if len(vals) == 2 or (vals and "sample" not in w) else float("nan")


def client_share(run: Run, field: str) -> float:
    """Clients' part of the run's total (train + sample windows): sum over clients / all ranks."""
    per = {r: _window_total(run, r, field) for r in run.ranks}
    if not per or not all(_finite(v) for v in per.values()):
        return float("nan")
    total = sum(per.values())
    return sum(v for r, v in per.items() if run.role(r) == "client") / total if total > 0 else float("nan")


def _pooled_kid(run: Run, features: str) -> float:
    p = run.pooled_kid
    return float(p["mean"]) if p is not None and p.get("features") == features else float("nan")


def _headline_psnr(run: Run) -> float:
    """The run's headline: the strongest attack's PSNR (capped at 80 dB: c = 0 sends x0 itself)."""
    v = run.d.get("disclosure_psnr")
    return min(float(v), 80.0) if _finite(v) else float("nan")


def trend_values(run: Run, features: str) -> dict:
    return {"kid": _pooled_kid(run, features),
            "disclosure": _headline_psnr(run),
            "sampling disclosure": _client_mean(run, "sampling_disclosure"),
            "client step": _median_step(run, "client"), "server step": _median_step(run, "server"),
            "flops share": client_share(run, "flops"), "cpu share": client_share(run, "cpu_seconds"),
            "energy share": client_share(run, "energy_j")}


def _cut_noise(run: Run) -> str:
    return str(run.config.get("privacy", {}).get("cut_noise", "fresh"))


def trend_data(ctx: Ctx) -> tuple[dict, str]:
    """{series: {metric: [(cut, mean, ci, n runs)]}} over homogeneous configurations, and the KID
    feature set shown (the most common pooled one: KIDs of different sets are never averaged).
    A series is the number of clients n, or (n, cut noise) for runs with privacy.cut_noise other
    than fresh: the two modes disclose differently and are never averaged together."""
    feats = [r.pooled_kid.get("features") for r in ctx.runs if r.pooled_kid is not None]
    features = max(set(feats), key=feats.count) if feats else ""
    out = {}
    for (cut, n), group in ctx.groups.items():
        if isinstance(cut, tuple):
            continue
        by_mode = {}
        for r in group:
            by_mode.setdefault(_cut_noise(r), []).append(r)
        for mode, runs in by_mode.items():
            series = n if mode == "fresh" else (n, mode)
            vals = [trend_values(r, features) for r in runs if r.d.get("status") == "complete" or len(runs) == 1]
            for metric in (vals[0] if vals else {}):
                m, ci, k = mean_ci([v[metric] for v in vals])
                if k:
                    out.setdefault(series, {}).setdefault(metric, []).append((cut, m, ci, k))
    return out, features


def _series_key(item):
    series = item[0]
    return (series, "") if isinstance(series, int) else series


PANELS = (("kid", "pooled KID ({features})"), ("disclosure", "disclosure: PSNR of the strongest attack, dB"),
          ("sampling disclosure", "sampling view vs final sample: MSE"),
          ("client step", "client: median seconds per step"), ("server step", "server: median seconds per step"),
          ("flops share", "clients' share of FLOPs"), ("cpu share", "clients' share of CPU-seconds"),
          ("energy share", "clients' share of energy"))


def fig_trends(ctx: Ctx):
    data, features = trend_data(ctx)
    if not data:
        raise Missing("no run with a single cut for all clients")
    fig = new_figure(16.0, 7.5)
    axes = fig.subplots(2, 4).ravel()
    colors = ctx.n_colors()
    seeds = sorted({k for d in data.values() for series in d.values() for *_, k in series})
    for ax, (metric, title) in zip(axes, PANELS):
        drawn = False
        for key, d in sorted(data.items(), key=_series_key):
            n, mode = (key, "") if isinstance(key, int) else key
            series = d.get(metric, [])
            if not series:
                continue
            c, m, ci, k = (np.array(v, dtype=float) for v in zip(*series))
            runs = f"{int(k.min())}-{int(k.max())} runs" if k.min() != k.max() else f"{int(k.min())} run(s)"
            ax.errorbar(c, m, yerr=np.nan_to_num(ci), fmt="--s" if mode else "-o", ms=5, capsize=4,
                        color=colors.get(n, "C0"), mfc="white" if mode else None,
                        label=f"{n} client{'s' if n != 1 else ''}{', cut noise ' + mode if mode else ''}, {runs}")
            drawn = True
        cut_axis(ax)
        ax.set_title(title.format(features=features or "none"), fontsize=9)
        if metric.endswith("share"):
            ax.set_ylim(-0.03, 1.03)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured in these runs" if metric != "energy share"
                    else "no energy counter (NVML / RAPL)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="0.4")
    footnote(fig, [
        "Points: mean over the runs of a configuration (repeats differing only in run.seed); bars: 95% Student-t "
        f"confidence interval of the mean (none for a single run). Runs per configuration: {', '.join(map(str, seeds))}.",
        "Shares: the clients' total over the train and sample windows divided by all ranks' total. FLOPs are exact "
        "counts of conv and linear layers (flops.py); CPU-seconds are process CPU time (time.process_time).",
        "KID: pooled (all clients' samples vs all held-out images), one feature set only."])
    return [("trends", fig)]
