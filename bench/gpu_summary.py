"""Per run of a results file: training images/s, energy per image, where the step time goes.

    python bench/gpu_summary.py results.h5 [-o summary.md]     # bench/gpu.sh runs it on its runs

No torch, no MPI: reads the file with collafuse_mpi.results. Per run it reports
  images/s      the clients' training images (every client's batch, every step after warm-up)
                over the training window (first client step start to last rank's step end);
  J/image       the training window's energy (windows/train) summed over the ranks that own a
                meter (a GPU shared by ranks counts once), over the same images; "n/a" where no
                rank had a meter, never 0;
  phases        per role, the median seconds per step of each phase (warm-up left out) and its
                share of the median step.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import common  # noqa: F401  (puts the repository on sys.path)

from collafuse_mpi import results  # noqa: E402

SHOWN = ("data", "noise", "forward", "backward", "optimizer", "send", "recv", "wait", "sample")


def _steps(rank: dict) -> np.ndarray:
    return ~np.asarray(rank.get("warmup", []), dtype=bool)


def summarise_run(run: dict) -> dict:
    ranks = run["ranks"]
    images, starts, ends = 0, [], []
    for r, rank in ranks.items():
        keep = _steps(rank)
        if not keep.any():
            continue
        if rank.get("role") == "client":
            images += int(np.asarray(rank["images"])[keep].sum())
            starts.append(float(np.asarray(rank["step_start"])[keep].min()))
        ends.append(float(np.asarray(rank["step_end"])[keep].max()))
    span = max(ends) - min(starts) if starts and ends else float("nan")
    energy, metered = 0.0, 0
    for rank in ranks.values():
        window = rank.get("windows", {}).get("train", {})
        e = window.get("energy_j", float("nan"))
        if rank.get("energy_owner") and np.isfinite(e):
            energy += e
            metered += 1
    phases = {}
    names = list(run["phases"])
    for role in ("server", "client"):
        rows = [rk for rk in ranks.values() if rk.get("role") == role and _steps(rk).any()]
        if not rows:
            continue
        secs = np.concatenate([np.asarray(rk["phase_seconds"])[_steps(rk)] for rk in rows])
        step = np.concatenate([(np.asarray(rk["step_end"]) - np.asarray(rk["step_start"]))[_steps(rk)]
                               for rk in rows])
        phases[role] = {"step_median_s": float(np.median(step)),
                        **{n: float(np.median(secs[:, names.index(n)])) for n in SHOWN if n in names}}
    first = next(iter(ranks.values()))
    return {"n_clients": int(run["n_clients"]), "timing_mode": run.get("timing_mode", ""),
            "transport_path": sorted({rk.get("transport_path", "") for rk in ranks.values()}),
            "devices": sorted({str(rk.get("device", "")) for rk in ranks.values()}),
            "energy_source": sorted({rk.get("energy_source", "") for rk in ranks.values()}),
            "images": images, "train_window_s": span, "images_per_s": images / span if span > 0 else float("nan"),
            "energy_j": energy if metered else float("nan"), "metered_ranks": metered,
            "j_per_image": energy / images if metered and images else float("nan"),
            "phases": phases, "device_info": first.get("device_info", {})}


def markdown(path: str, summary: dict) -> str:
    md = [f"# {path}: throughput, energy, phases per run\n",
          common.table(["run", "clients", "timing", "transport", "devices", "energy source", "images",
                        "window (s)", "images/s", "J/image"],
                       [[name, s["n_clients"], s["timing_mode"], ", ".join(s["transport_path"]),
                         ", ".join(s["devices"]), ", ".join(s["energy_source"]), s["images"],
                         f"{s['train_window_s']:.1f}", f"{s['images_per_s']:.0f}",
                         "n/a" if not np.isfinite(s["j_per_image"]) else f"{s['j_per_image']:.4f}"]
                        for name, s in summary.items()]), ""]
    for name, s in summary.items():
        rows = []
        for role, p in s["phases"].items():
            step = p["step_median_s"]
            rows.append([role, f"{step * 1e3:.2f}"] + [f"{p[n] * 1e3:.2f} ({p[n] / step:.0%})" if step > 0 else "-"
                                                      for n in SHOWN if n in p])
        md += [f"## {name}: median ms per step (share of the median step)\n",
               common.table(["role", "step"] + [n for n in SHOWN], rows), ""]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("-o", "--output", help="write the markdown here as well as to stdout")
    args = ap.parse_args(argv)
    data = results.read(args.path)
    summary = {name: summarise_run(run) for name, run in data["runs"].items()}
    text = markdown(args.path, summary)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
