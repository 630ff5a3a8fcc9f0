"""`collafuse-compare A.h5 B.h5`: B against A, per rank, phase and metric, with a CI and a test.

    collafuse-compare A.h5 B.h5 [--fail-on step,kid] [--threshold 0.05] [--alpha 0.05] [--json out.json]
                      [--run-a NAMES] [--run-b NAMES]

Runs are grouped by configuration (everything but the run's seed, name and output paths); the
groups of A and B are paired by configuration, or, when each file holds one group, with each
other. Per rank and metric:

  with one run per side   samples are the steps after warm-up (per-step wall seconds of a
                          phase, its CPU-seconds, the whole step, energy per step): ratio of
                          medians B/A, a 95% bootstrap CI of that ratio (steps resampled,
                          2000 draws, fixed seed), and the Mann-Whitney U test's two-sided p;
  with >= 2 runs per side samples are the runs (seeds): each run's median, ratio of means, a
                          bootstrap CI over runs, Welch's t-test.
  KID (pooled)            one number per run: over seeds as above; with one run per side only
                          the ratio (no CI, no test: say so rather than invent one).
  FLOPs per step          counted, not sampled: the ratio alone.

Steps of one run are not independent (a shared machine's load drifts), so their p-values
overstate the evidence; runs over seeds are the sound unit when a difference is small.

Every metric here is "lower is better". `--fail-on` names metrics (step, kid, cpu:forward,
phase:recv, ...; `all` = every one) that must not regress: the exit status is 1 when one of them
has ratio > 1 + threshold, its CI lies above 1, and p < alpha (where a test exists). 0 otherwise;
2 for a usage error or an unreadable file. No torch: runs on a login node.
"""
from __future__ import annotations

import json
import os
import sys

import click
import numpy as np

from .results import ResultsError, read

IGNORED = {"run": ("seed", "output", "run_name", "if_exists", "quiet", "save_dir", "checkpoint_dir", "resume")}
BOOT, CI, BOOT_SEED = 2000, 0.95, 0


def config_key(run: dict) -> str:
    cfg = json.loads(json.dumps(run.get("config", {})))
    for section, keys in IGNORED.items():
        for k in keys:
            cfg.get(section, {}).pop(k, None)
    return json.dumps(cfg, sort_keys=True)


def groups(res: dict) -> dict:
    out = {}
    for name, run in res["runs"].items():
        if run.get("status") == "complete":
            out.setdefault(config_key(run), []).append((name, run))
    return out


def rank_samples(rank: dict, phases: list) -> dict:
    """metric -> per-step samples (warm-up excluded) for one rank; flops -> per-step count."""
    keep = ~np.asarray(rank.get("warmup", []), dtype=bool)
    if not keep.any():  # a rank that trained nothing (the server at c = 1) has no step samples
        return {}
    out = {"step": (np.asarray(rank["step_end"]) - np.asarray(rank["step_start"]))[keep]}
    secs = np.asarray(rank["phase_seconds"])[keep]
    cpu = np.asarray(rank["phase_cpu_seconds"])[keep] if "phase_cpu_seconds" in rank else None
    for j, ph in enumerate(phases):
        if secs.size and np.any(secs[:, j] > 0):
            out[f"phase:{ph}"] = secs[:, j]
            if cpu is not None:
                out[f"cpu:{ph}"] = cpu[:, j]
    if cpu is not None and cpu.size:
        out["cpu:step"] = cpu.sum(1)
    energy = np.asarray(rank.get("energy_j", []), dtype=float)[keep] if "energy_j" in rank else np.array([])
    if energy.size and np.all(np.isfinite(energy)):
        out["energy"] = energy
    return out


def rank_flops(rank: dict) -> float | None:
    if "phase_flops" not in rank:
        return None
    f = np.asarray(rank["phase_flops"])[~np.asarray(rank["warmup"], dtype=bool)]
    return float(np.median(f.sum(1))) if f.size else None


def _boot_ratio(a: np.ndarray, b: np.ndarray, stat) -> tuple[float, float]:
    rng = np.random.default_rng(BOOT_SEED)
    ia = rng.integers(0, len(a), (BOOT, len(a)))
    ib = rng.integers(0, len(b), (BOOT, len(b)))
    sa, sb = stat(a[ia], axis=1), stat(b[ib], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = sb / sa
    lo, hi = np.nanpercentile(r, [50 * (1 - CI), 100 - 50 * (1 - CI)])
    return float(lo), float(hi)


def compare_samples(a, b, over: str) -> dict:
    """over='steps': medians, Mann-Whitney U; over='seeds': means, Welch's t."""
    from scipy import stats
    a, b = np.asarray(a, float), np.asarray(b, float)
    stat = np.median if over == "steps" else np.mean
    va, vb = float(stat(a)), float(stat(b))
    row = {"a": va, "b": vb, "ratio": vb / va if va else float("nan"), "n_a": len(a), "n_b": len(b), "over": over,
           "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan")}
    if len(a) >= 2 and len(b) >= 2 and va:
        row["ci_low"], row["ci_high"] = _boot_ratio(a, b, stat)
        if over == "steps":
            row["p"] = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        elif np.std(a) + np.std(b) > 0:
            row["p"] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return row


def _pooled_kid(run):
    kid = run.get("metrics", {}).get("pooled", {}).get("kid", {})
    return kid.get("mean"), kid.get("features")


def compare_groups(ga: list, gb: list) -> list[dict]:
    rows = []
    over = "seeds" if len(ga) >= 2 and len(gb) >= 2 else "steps"
    ranks = sorted(set(ga[0][1]["ranks"]) & set(gb[0][1]["ranks"]))
    for r in ranks:
        role = ga[0][1]["ranks"][r].get("role", "")
        per = {}
        for side, g in (("a", ga), ("b", gb)):
            for _, run in g:
                if r not in run["ranks"] or "phase_seconds" not in run["ranks"][r]:
                    continue
                for metric, s in rank_samples(run["ranks"][r], list(run.get("phases", []))).items():
                    per.setdefault(metric, {"a": [], "b": []})[side].append(s)
        for metric, sides in per.items():
            if not sides["a"] or not sides["b"]:
                continue
            if over == "steps":
                a, b = sides["a"][0], sides["b"][0]
            else:
                a, b = [np.median(s) for s in sides["a"]], [np.median(s) for s in sides["b"]]
            if len(a) and len(b):
                rows.append({"rank": r, "role": role, "metric": metric, **compare_samples(a, b, over)})
        fa = [rank_flops(run["ranks"][r]) for _, run in ga]
        fb = [rank_flops(run["ranks"][r]) for _, run in gb]
        if fa[0] and fb[0]:
            rows.append({"rank": r, "role": role, "metric": "flops", "a": fa[0], "b": fb[0], "ratio": fb[0] / fa[0],
                         "n_a": 1, "n_b": 1, "over": "counted", "ci_low": float("nan"),
                         "ci_high": float("nan"), "p": float("nan")})
    ka = [_pooled_kid(run) for _, run in ga]
    kb = [_pooled_kid(run) for _, run in gb]
    if all(v is not None for v, _ in ka + kb) and ka and kb:
        fsets = {f for _, f in ka + kb}
        if len(fsets) == 1:  # KIDs of different feature sets are never compared
            if over == "seeds":
                row = compare_samples([v for v, _ in ka], [v for v, _ in kb], "seeds")
            else:
                row = {"a": ka[0][0], "b": kb[0][0], "ratio": kb[0][0] / ka[0][0] if ka[0][0] else float("nan"),
                       "n_a": 1, "n_b": 1, "over": "one run", "ci_low": float("nan"),
                       "ci_high": float("nan"), "p": float("nan")}
            rows.append({"rank": "pooled", "role": fsets.pop(), "metric": "kid", **row})
    return rows


def regressed(row: dict, threshold: float, alpha: float) -> bool:
    if not row["ratio"] > 1 + threshold:
        return False
    if np.isfinite(row["ci_low"]) and not row["ci_low"] > 1:
        return False
    return not (np.isfinite(row["p"]) and row["p"] >= alpha)


def _fmt(v, digits=4):
    if isinstance(v, float):
        return "-" if not np.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def render(rows: list[dict], flagged: set) -> str:
    head = ["rank", "role", "metric", "A", "B", "B/A", "95% CI", "p", "n", "over", ""]
    lines = [head]
    for i, r in enumerate(rows):
        ci = "-" if not np.isfinite(r["ci_low"]) else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append([str(r["rank"]), r["role"], r["metric"], _fmt(r["a"]), _fmt(r["b"]), f"{r['ratio']:.3f}",
                      ci, _fmt(r["p"], 2), f"{r['n_a']}/{r['n_b']}", r["over"], "REGRESSED" if i in flagged else ""])
    widths = [max(len(line[j]) for line in lines) for j in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("a", metavar="A.h5")
@click.argument("b", metavar="B.h5")
@click.option("--fail-on", default="", metavar="LIST",
              help="Metrics that must not regress (step, kid, flops, phase:NAME, cpu:NAME, energy; all).")
@click.option("--threshold", default=0.05, show_default=True, type=float,
              help="Allowed slow-down: a ratio B/A above 1 + threshold can fail.")
@click.option("--alpha", default=0.05, show_default=True, type=float, help="Significance level of the test.")
@click.option("--run-a", default="", metavar="NAMES", help="Only these runs of A (comma-separated names).")
@click.option("--run-b", default="", metavar="NAMES", help="Only these runs of B (comma-separated names).")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Also write the rows as JSON.")
def cli(a, b, fail_on, threshold, alpha, run_a, run_b, json_out):
    """Compare results file B against A: B/A per rank, phase and metric, CI and p-value.

    Runs are paired by configuration (seed and output paths aside). One run per side: the
    samples are the steps after warm-up (ratio of medians, 95% bootstrap CI, Mann-Whitney U).
    Several runs (seeds) per side: each run's median is one sample (ratio of means, bootstrap
    CI, Welch's t-test). Metrics: step (whole step), phase:NAME and cpu:NAME (wall and CPU
    seconds per step), cpu:step, flops (counted), energy (where measured), kid (pooled; one
    feature set only). All are lower-is-better.

    
    Exit status: 0 no --fail-on metric regressed; 1 one did (ratio above 1 + threshold, CI
    above 1, p below alpha); 2 usage or file error."""
    try:
        ra, rb = read(a), read(b)
    except ResultsError as exc:
        click.echo(f"collafuse-compare: error: {exc}", err=True)
        sys.exit(2)
    for res, names, path in ((ra, run_a, a), (rb, run_b, b)):
        keep = [n.strip() for n in names.split(",") if n.strip()]
        missing = [n for n in keep if n not in res["runs"]]
        if missing:
            click.echo(f"collafuse-compare: error: {path} has no run {', '.join(missing)} "
                       f"(runs: {', '.join(res['runs'])})", err=True)
            sys.exit(2)
        if keep:
            res["runs"] = {n: res["runs"][n] for n in keep}
    ga, gb = groups(ra), groups(rb)
    if not ga or not gb:
        click.echo("collafuse-compare: error: no complete run in " + (a if not ga else b), err=True)
        sys.exit(2)
    pairs = [(k, ga[k], gb[k]) for k in ga if k in gb]
    if not pairs and len(ga) == 1 and len(gb) == 1:
        pairs = [("", next(iter(ga.values())), next(iter(gb.values())))]
        click.echo("note: the two files' configurations differ; comparing their only groups", err=True)
    if not pairs:
        click.echo("collafuse-compare: error: no configuration appears in both files", err=True)
        sys.exit(2)
    wanted = {m.strip() for m in fail_on.split(",") if m.strip()}
    everything, failed = [], []
    for _, runs_a, runs_b in pairs:
        rows = compare_groups(runs_a, runs_b)
        flagged = {i for i, r in enumerate(rows)
                   if ("all" in wanted or r["metric"] in wanted) and regressed(r, threshold, alpha)}
        click.echo(f"A: {', '.join(n for n, _ in runs_a)}  B: {', '.join(n for n, _ in runs_b)}")
        click.echo(render(rows, flagged) + "\n")
        everything += [dict(r, runs_a=[n for n, _ in runs_a], runs_b=[n for n, _ in runs_b]) for r in rows]
        failed += [rows[i] for i in sorted(flagged)]
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(everything, fh, indent=1, default=float)
    for r in failed:
        click.echo(f"regression: rank {r['rank']} {r['metric']}: B/A = {r['ratio']:.3f} "
                   f"> 1 + {threshold:g}", err=True)
    sys.exit(1 if failed else 0)


def main(argv=None):
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    cli.main(args=argv, prog_name="collafuse-compare")


if __name__ == "__main__":
    main()
