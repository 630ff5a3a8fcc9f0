"""How much of a step clients (and the server) spend waiting, from the real CLI's results file.

    python bench/overlap.py                      # ~4 min quiet, more under load; writes bench/results/overlap.{json,md}
    python bench/overlap.py --steps 12,8         # smoke test
    python bench/overlap.py --from a.h5 b.h5     # analyse existing results files, run nothing
                                                 # (writes bench/results/overlap-from.*)

Runs, one after the other, the real command line
    mpirun -n 3 --oversubscribe python -m collafuse_mpi.run --cut 0.4 --steps S -o F --overwrite -q
and the same with -n 5 (4 clients), each under two placements:
    shared   every rank takes what the OS scheduler gives it (equal shares of the cores);
    pinned   through bench/pin.sh: the server alone on core 0, the clients sharing the others,
             so the server's share of the machine grows with the number of clients, as a
             shared GPU server's would.
Each file is read with `collafuse_mpi.results.read`. Per rank, over the steps not flagged warm-up:
    wait fraction = sum of the "wait" phase / sum of (step_end - step_start).
A client's "wait" is the time blocked on its bounded in-flight window (train.max_in_flight
unacknowledged sends); the server's is the time in probe for the next client batch.
Target: client wait fraction <= 10% at c = 0.4 with 2 clients on CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import common

from collafuse_mpi import results  # noqa: E402
from collafuse_mpi.harness import PHASES  # noqa: E402

COMPUTE = ("data", "noise", "forward", "backward", "optimizer")


PIN = os.path.join(common.BENCH, "pin.sh")


def run_cli(n_ranks: int, steps: int, cut: float, output: str, pinned: bool) -> tuple[str, float]:
    prefix = common.mpirun(n_ranks) + (["bash", PIN] if pinned else [])
    cmd = prefix + [sys.executable, "-m", "collafuse_mpi.run", "--cut", str(cut),
                    "--steps", str(steps), "-o", output, "--overwrite", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.REPO, env=common.mpi_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    shown = (" ".join(common.mpirun(n_ranks)) + (" bash bench/pin.sh" if pinned else "")
             + " python -m collafuse_mpi.run " + " ".join(cmd[len(prefix) + 3:]))
    return shown, wall


def analyse(path: str, placement: str = "") -> dict:
    """Per run in the file: per-rank wait fractions and mean phase seconds per step."""
    out = {}
    for name, run in results.read(path)["runs"].items():
        ranks = {}
        for r, rk in sorted(run["ranks"].items()):
            keep = ~np.asarray(rk["warmup"], dtype=bool)
            ps = np.asarray(rk["phase_seconds"])[keep]
            step = (np.asarray(rk["step_end"]) - np.asarray(rk["step_start"]))[keep]
            if step.size == 0:
                continue
            col = {p: ps[:, i] for i, p in enumerate(PHASES)}
            ranks[r] = {
                "role": rk["role"], "k": int(rk["k"]), "steps_used": int(step.size),
                "warmup_steps_excluded": int((~keep).sum()),
                "wait_fraction": float(col["wait"].sum() / step.sum()),
                "wait_fraction_per_step_p50": float(np.median(col["wait"] / step)),
                "step_s": common.pct(step),
                "mean_phase_s": {p: float(v.mean()) for p, v in col.items() if v.any()},
                "compute_s_per_step": float(sum(col[p] for p in COMPUTE).mean()),
            }
        clients = [v for v in ranks.values() if v["role"] == "client"]
        out[name] = {"n_clients": int(run["n_clients"]), "cut": float(run["cut"]), "placement": placement,
                     "command": run.get("command", ""), "ranks": ranks,
                     "client_wait_fraction_mean": float(np.mean([c["wait_fraction"] for c in clients])),
                     "client_wait_fraction_max": float(np.max([c["wait_fraction"] for c in clients])),
                     "server_wait_fraction": float(ranks[0]["wait_fraction"]) if 0 in ranks else float("nan")}
    return out


def explain(runs: list[dict]) -> str:
    lines = []
    for r in runs:
        server = r["ranks"][0]
        clients = [v for v in r["ranks"].values() if v["role"] == "client"]
        c_busy = float(np.mean([c["compute_s_per_step"] for c in clients]))
        lines.append(
            f"- {r['n_clients']} clients, {r['placement'] or 'as given'}: a client computes {c_busy * 1e3:.0f} ms "
            f"per step, the server {server['compute_s_per_step'] * 1e3:.0f} ms on the fused batch of "
            f"{r['n_clients']} x 32 images (median server step {server['step_s']['p50'] * 1e3:.0f} ms); "
            f"client wait {r['client_wait_fraction_mean'] * 100:.1f}%, server wait "
            f"{r['server_wait_fraction'] * 100:.1f}%.")
    lines.append(
        "\nWhy: per step the server trains its UNet on the fused batch of N x 32 images, a client its "
        "own UNet on 32, whatever the cut (c only moves which timesteps each side owns, not how many "
        "images each side pushes through a network per step). The client never waits for a reply in "
        "training; it waits only when train.max_in_flight of its batches are still unreceived, i.e. "
        "when the server is slower than the client. With equal shares of the CPU (shared) the "
        "server's step is about N times a client's, so every client runs at the server's pace and "
        "waits about 1 - 1/N of its step, more with more clients: the bounded window hides "
        "communication, not an imbalance of work. Pinned, the server has a core to itself and the N "
        "clients share the other, so the server has about N times a client's compute, as a shared "
        "GPU server serving N clients would need; the client wait then falls to a few percent and the "
        "waiting moves to the server, which now idles between fused batches. The wait target is a "
        "statement about that balance, not about the transport: the send and receive phases are "
        "below a millisecond per step in every run.\n\n"
        "A transport finding from this benchmark: when a large payload left as one message gathered "
        "by an MPI derived datatype (header and payload without a copy), the server's receive phase "
        "took tens of milliseconds per step. MPI cannot move a non-contiguous message by single copy, "
        "so it advanced only when the sending client called into MPI again, which a computing client "
        "does once per step. The transport therefore sends the payload as its own contiguous message, "
        "which the receiver copies out of the sender's memory without the sender's help.")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="3,5", help="world sizes to run (1 server + N-1 clients)")
    ap.add_argument("--steps", default="200,120", help="training steps per world size")
    ap.add_argument("--placements", default="shared,pinned", help="shared, pinned (bench/pin.sh) or both")
    ap.add_argument("--cut", type=float, default=0.4)
    ap.add_argument("--keep", default="", help="folder to keep the results files in (default: deleted)")
    ap.add_argument("--from", dest="files", nargs="+", default=None, help="analyse these results files only")
    ap.add_argument("--name", default=None,
                    help="results file name in bench/results (default overlap; overlap-from with --from, "
                         "so that analysing other files never overwrites the record)")
    args = ap.parse_args(argv)
    commands, walls, files = [], [], []
    tmp = None
    if args.files:
        files = [("", f) for f in args.files]
    else:
        tmp = args.keep or tempfile.mkdtemp(prefix="cf-overlap-")
        os.makedirs(tmp, exist_ok=True)
        for n, steps in zip([int(v) for v in args.ranks.split(",")], [int(v) for v in args.steps.split(",")]):
            for placement in args.placements.split(","):
                path = os.path.join(tmp, f"overlap-n{n}-{placement}.h5")
                print(f"running {n} ranks, {steps} steps, {placement} ...", flush=True)
                cmd, wall = run_cli(n, steps, args.cut, path, placement == "pinned")
                commands.append(cmd)
                walls.append(wall)
                files.append((placement, path))
    try:
        runs = [r for placement, f in files for r in analyse(f, placement).values()]
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    two = [r for r in runs if r["n_clients"] == 2 and abs(r["cut"] - 0.4) < 1e-9]
    target = {f"client_wait_le_10pct_at_c0.4_2_clients_{r['placement'] or 'as given'}": r["client_wait_fraction_max"] <= 0.10
              for r in two}
    rows = []
    for r in runs:
        for rank, v in r["ranks"].items():
            mp = v["mean_phase_s"]
            rows.append([r["n_clients"], r["placement"], rank, v["role"], v["k"], v["steps_used"],
                         f"{v['step_s']['p50'] * 1e3:.0f}", f"{v['compute_s_per_step'] * 1e3:.0f}",
                         f"{mp.get('wait', 0) * 1e3:.0f}",
                         f"{(mp.get('send', 0) + mp.get('recv', 0)) * 1e3:.1f}", f"**{v['wait_fraction'] * 100:.1f}%**"])
    record = {"benchmark": "overlap", "command": common.command(), "machine": common.machine(),
              "cli_commands": commands, "cli_wall_s": walls, "runs": runs, "targets": target,
              "explanation": explain(runs)}
    md = ["# overlap: wait fraction of a step, from the real CLI's results file\n",
          f"Command: `{record['command']}`\n", common.machine_md(record["machine"]), "",
          "CLI runs:\n" + "\n".join(f"- `{c}` ({w:.0f} s)" for c, w in zip(commands, walls)), "",
          common.table(["clients", "placement", "rank", "role", "k", "steps", "step P50 (ms)", "compute/step (ms)",
                        "wait/step (ms)", "send+recv/step (ms)", "wait fraction"], rows), "",
          "compute = data + noise + forward + backward + optimizer phases; warm-up steps excluded.\n",
          "## summary\n"]
    for r in runs:
        md.append(f"- {r['n_clients']} clients, {r['placement'] or 'as given'}, c={r['cut']:g}: client wait fraction mean "
                  f"{r['client_wait_fraction_mean'] * 100:.1f}% (max {r['client_wait_fraction_max'] * 100:.1f}%), "
                  f"server wait fraction {r['server_wait_fraction'] * 100:.1f}%")
    for k, ok in target.items():
        md.append(f"- target {k}: **{'PASS' if ok else 'FAIL'}**")
    md += ["", "## explanation\n", record["explanation"]]
    common.publish(args.name or ("overlap-from" if args.files else "overlap"), record, md)


if __name__ == "__main__":
    main()
