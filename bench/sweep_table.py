"""The table of a recorded cut sweep: per cut-noise mode and cut, the mean and 95% interval over
seeds of what the attacks recover, the analytic anchors, re-identification, membership, sampling
disclosure and pooled KID (plots/README.md quotes it).

    python bench/sweep_table.py plots/cut_sweep.h5            # markdown on stdout
    python bench/sweep_table.py plots/cut_sweep.h5 --json t.json

Runs that differ only in run.seed are repeats; each cell is mean +- half-width of the 95% Student-t
interval of the mean (no interval for one run). PSNR in dB over [-1, 1] images; c = 0 sends x0
itself, so its attack PSNRs are capped at 80 (as in the figures).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from collafuse_mpi.plot.privacy import privacy_of  # noqa: E402
from collafuse_mpi.plot.runs import load  # noqa: E402
from collafuse_mpi.plot.trends import mean_ci  # noqa: E402

CAP = 80.0


def _get(d, path):
    for key in path.split("/"):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    try:
        return float(d)
    except (TypeError, ValueError):
        return None


def _psnr(mse):
    return None if mse is None else (10 * math.log10(4.0 / mse) if mse > 0 else math.inf)


def _client_mean(run, path, transform=None):
    vals = [_get(run.metrics(i), path) for i in range(run.n_clients)]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return transform(m) if transform else m


def _pooled(path):
    def value(run):
        v = _get(privacy_of(run) or {}, path)
        return None if v is None else min(v, CAP)
    return value


# (column, value of one run, format)
COLUMNS = [
    ("scalar", _pooled("reconstruction/scalar/psnr"), "{:.1f}"),
    ("linear", _pooled("reconstruction/linear/psnr"), "{:.1f}"),
    ("public linear", _pooled("reconstruction/public_linear/psnr"), "{:.1f}"),
    ("learned", _pooled("reconstruction/learned/psnr"), "{:.1f}"),
    ("linked linear", _pooled("linked/linear/psnr"), "{:.1f}"),
    ("linked learned", _pooled("linked/learned/psnr"), "{:.1f}"),
    ("linear floor, one view", lambda r: _client_mean(r, "privacy/analytic/linear_mse", _psnr), "{:.1f}"),
    ("linear floor, run", lambda r: _client_mean(r, "privacy/analytic/linear_mse_run", _psnr), "{:.1f}"),
    ("MI bound one view / run (bits)", None, None),  # two values, filled below
    ("views per image", lambda r: _client_mean(r, "privacy/analytic/views_per_image"), "{:.1f}"),
    ("link precision", lambda r: _client_mean(r, "privacy/linking/precision"), "{:.2f}"),
    ("link recall", lambda r: _client_mean(r, "privacy/linking/recall"), "{:.2f}"),
    ("re-id top-1 of 100", _pooled("reid/m100/top1"), "{:.2f}"),
    ("re-id top-1 of 100, linked", _pooled("reid/m100/top1_linked"), "{:.2f}"),
    ("MIA AUC server", _pooled("membership/server/auc"), "{:.2f}"),
    ("MIA AUC client", _pooled("membership/client/auc"), "{:.2f}"),
    ("sampling rescale (dB)", lambda r: _client_mean(r, "sampling_disclosure/mse", _psnr), "{:.1f}"),
    ("paper SSIM x_k vs final", lambda r: _client_mean(r, "sampling_disclosure/ssim"), "{:.2f}"),
    ("pooled KID", lambda r: (r.pooled_kid or {}).get("mean"), "{:.4f}"),
    ("headline", lambda r: min(float(r.d["disclosure_psnr"]), CAP) if r.d.get("disclosure_psnr") is not None else None,
     "{:.1f}"),
]
MI = (lambda r: _client_mean(r, "privacy/analytic/mi_bits"), lambda r: _client_mean(r, "privacy/analytic/mi_bits_run"))


def _mode(run):
    return str(run.config.get("privacy", {}).get("cut_noise", "fresh"))


def _cell(values, fmt):
    m, ci, n = mean_ci([v for v in values if v is not None])
    if n == 0:
        return "-", None
    text = fmt.format(m) if math.isfinite(m) else "-"
    if n > 1 and math.isfinite(ci):
        text += " ± " + fmt.format(ci)
    return text, {"mean": m, "ci95": ci, "n": n}


def table(runs) -> tuple[str, list]:
    groups = collections.defaultdict(list)
    for run in runs:
        groups[(_mode(run), round(run.cut, 6))].append(run)
    order = sorted(groups, key=lambda k: (k[0] != "fresh", k[0], k[1]))
    head = ["cut noise", "c", "seeds"] + [c[0] for c in COLUMNS] + ["strongest attack (runs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for mode, cut in order:
        sel = groups[(mode, cut)]
        cells, row = [mode, f"{cut:g}", str(len(sel))], {"cut_noise": mode, "cut": cut, "runs": [r.name for r in sel]}
        for name, value, fmt in COLUMNS:
            if value is None:  # the two MI bounds in one cell
                a, ja = _cell([MI[0](r) for r in sel], "{:.1f}")
                b, jb = _cell([MI[1](r) for r in sel], "{:.1f}")
                cells.append(f"{a} / {b}")
                row["mi_bits"], row["mi_bits_run"] = ja, jb
                continue
            text, stats = _cell([value(r) for r in sel], fmt)
            cells.append(text)
            row[name] = stats
        heads = collections.Counter(str(r.d.get("disclosure_attack", "-")) for r in sel)
        cells.append(", ".join(f"{k} ({v})" for k, v in heads.most_common()))
        row["headline_attacks"] = dict(heads)
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    return "\n".join(lines), rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--json", default="", help="also write the numbers (mean, ci95, n per cell) here")
    args = ap.parse_args(argv)
    runs, problems = load(args.files)
    if problems:
        raise SystemExit("; ".join(problems))
    md, rows = table(runs)
    print(md)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
