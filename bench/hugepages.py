"""Training step time with and without huge-page-advised torch host memory (THP_MEM_ALLOC_ENABLE).

    python bench/hugepages.py                 # ~3 min; writes bench/results/hugepages.{json,md}
    python bench/hugepages.py --pairs 1 --steps 20    # smoke test

Runs the real CLI (`mpirun -n 3 --oversubscribe python -m collafuse_mpi.run --cut 0.4`) with
THP_MEM_ALLOC_ENABLE=0 and =1 alternately, in pairs (order flipped every pair), and compares
the median step time per rank over the steps not flagged warm-up. collafuse_mpi.run sets 1
unless the variable is already set.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

import common

from collafuse_mpi import results  # noqa: E402


def one(value: str, steps: int, path: str) -> dict:
    env = common.mpi_env()
    env["THP_MEM_ALLOC_ENABLE"] = value
    cmd = common.mpirun(3) + [sys.executable, "-m", "collafuse_mpi.run",
                              "--cut", "0.4", "--steps", str(steps), "-o", path, "--overwrite", "-q"]
    p = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stdout[-2000:] + p.stderr[-2000:])
    run = next(iter(results.read(path)["runs"].values()))
    assert run["versions"]["THP_MEM_ALLOC_ENABLE"] == value, run["versions"]
    out = {}
    for r, rk in run["ranks"].items():
        keep = ~np.asarray(rk["warmup"], dtype=bool)
        out[r] = float(np.median((np.asarray(rk["step_end"]) - np.asarray(rk["step_start"]))[keep]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    args = ap.parse_args(argv)
    got = {"0": [], "1": []}
    with tempfile.TemporaryDirectory(prefix="cf-thp-") as tmp:
        for i in range(args.pairs):
            for value in (("0", "1") if i % 2 == 0 else ("1", "0")):
                print(f"pair {i + 1}: THP_MEM_ALLOC_ENABLE={value} ...", flush=True)
                got[value].append(one(value, args.steps, os.path.join(tmp, f"thp{value}-{i}.h5")))
    ranks = sorted(got["0"][0])
    rows, ratios = [], {}
    for r in ranks:
        off = [g[r] for g in got["0"]]
        on = [g[r] for g in got["1"]]
        ratios[r] = [b / a for a, b in zip(off, on)]
        rows.append([r, "server" if r == 0 else "client", " ".join(f"{v * 1e3:.0f}" for v in off),
                     " ".join(f"{v * 1e3:.0f}" for v in on), " ".join(f"{v:.3f}" for v in ratios[r]),
                     f"**{np.median(ratios[r]):.3f}**"])
    record = {"benchmark": "hugepages", "command": common.command(), "machine": common.machine(),
              "steps": args.steps, "median_step_s": got, "ratio_on_over_off": ratios}
    md = ["# hugepages: median step time, THP_MEM_ALLOC_ENABLE=1 over =0\n",
          f"Command: `{record['command']}`\n", common.machine_md(record["machine"]), "",
          f"Each run: `{' '.join(common.mpirun(3))} python -m collafuse_mpi.run --cut 0.4 --steps {args.steps}`"
          " with the variable set; pairs alternate which setting runs first.\n",
          common.table(["rank", "role", "median step off (ms), per pair", "median step on (ms), per pair",
                        "on/off per pair", "on/off median"], rows), "",
          "Below 1 means huge-page-advised host memory made steps faster."]
    common.publish("hugepages", record, md)


if __name__ == "__main__":
    main()
