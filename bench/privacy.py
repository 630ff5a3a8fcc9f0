"""What the attack suite costs: its window beside training, and each attack's seconds on rank 0.

    python bench/privacy.py                  # default run (150 steps, 2 clients, c = 0.4), all attacks
    python bench/privacy.py --steps 20       # smoke test
    python bench/privacy.py --from plots/cut_sweep.h5 --run cut0.4-fresh-s0   # a recorded run

Runs the real CLI (`mpirun -n 3 --oversubscribe python -m collafuse_mpi.run --cut 0.4
--set privacy.attacks=all`) and reads from its results file the privacy window of every rank,
the train window, and rank 0's cost table (wall and CPU seconds per attack, the learned
attacker's training). The ratio privacy / train is what the suite adds to a run of this size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import common

from collafuse_mpi import results  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--cut", type=float, default=0.4)
    ap.add_argument("--attacks", default="all")
    ap.add_argument("--from", dest="source", help="read this results file instead of running")
    ap.add_argument("--run", help="with --from: the run group (default: the first)")
    args = ap.parse_args()
    summary = []
    if args.source:
        runs = results.read(args.source)["runs"]
        run = runs[args.run] if args.run else next(iter(runs.values()))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r.h5")
            cmd = common.mpirun(3) + [sys.executable, "-m", "collafuse_mpi.run", "--cut", str(args.cut),
                                      "--steps", str(args.steps), "-o", path, "-q",
                                      "--set", f"privacy.attacks={args.attacks}"]
            p = subprocess.run(cmd, env=common.mpi_env(), capture_output=True, text=True, cwd=common.REPO)
            if p.returncode:
                sys.exit(f"run failed:\n{p.stderr[-3000:]}")
            summary = [ln for ln in p.stdout.splitlines() if "disclosure" in ln]
            run = next(iter(results.read(path)["runs"].values()))
    windows = {r: g["windows"] for r, g in run["ranks"].items()}
    span = {r: {w: v["end"] - v["start"] for w, v in ws.items() if isinstance(v, dict)} for r, ws in windows.items()}
    cost = run["metrics"]["pooled"]["privacy"]["cost"]
    record = {"machine": common.machine(), "command": common.command(), "args": vars(args),
              "windows_s": span, "cost": cost, "headline": run["metrics"]["pooled"]["privacy"].get("headline"),
              "summary": summary, "run_command": run.get("command", "")}
    rows = [[r, f"{s.get('train', float('nan')):.1f}", f"{s.get('privacy', float('nan')):.1f}",
             f"{s.get('privacy', 0) / s['train']:.2f}" if s.get("train") else "-"] for r, s in sorted(span.items())]
    attacks = [[n, f"{c['seconds']:.2f}", f"{c['cpu_seconds']:.2f}",
                ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                          if k not in ("seconds", "cpu_seconds"))] for n, c in cost.items() if isinstance(c, dict)]
    md = ["# privacy: what the attack suite costs", "", f"Command: `{record['command']}`", "",
          "Windows per rank (s): the attack suite runs after sampling, never inside training.", "",
          common.table(["rank", "train", "privacy", "privacy / train"], rows), "",
          f"Rank 0's attacks ({cost.get('n_aux', 0)} public images):", "",
          common.table(["attack", "wall s", "CPU s", "more"], attacks), "",
          f"Run: `{record['run_command']}`", "", "Headline: " + str(record["headline"]), "",
          "Machine:", "", common.machine_md(record["machine"])]
    common.publish("privacy", record, md)


if __name__ == "__main__":
    main()
