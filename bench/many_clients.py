"""Many logical clients on few ranks: 1 server + 2 client ranks hosting N = 2..256 clients.

    python bench/many_clients.py                         # writes bench/results/many_clients.{json,md}
    python bench/many_clients.py --sizes 2,16 --steps 3 --sample-sizes 2,8 --name smoke-many_clients

Part 1, the real CLI under `mpirun -n 3 --oversubscribe`, through bench/memory.py's wrapper (peak
RSS of each rank): tiny preset, 16x16 digits, batch 4 per client, T = 100, cut 0.4, DDIM 20
steps, 4 samples per client, privacy.attacks = none, pooled KID on, `--clients-per-rank N/2`;
each N once with the sequential loop (train.batched_clients = false) and once batched. From the
results file: client images/s (images of both client ranks over their summed step time, steps
after the first `--warmup`), median step time per phase of client rank 1 and of the server, the
server's sample window (fused sampling, the default) and the run's wall time. The batched/loop
speedup is the ratio of the client ranks' median step times, loop over batched.

Part 2, in process (no MPI): the server's sampling chains for N clients at cut 0.4 (every client's
chain is 12 DDIM steps of the 20), 4 images each, fused (one batched chain) vs serial (one client
after another), alternating, `--repeats` times each, untrained tiny server model, 1 torch thread.

Records: bench/results/<name>.{json,md}. On this 2-core VM the three ranks share two cores with
whatever else runs (the load average is recorded).
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
import memory

from collafuse_mpi.harness import PHASES  # noqa: E402

CLIENT_PHASES = ("data", "noise", "forward", "backward", "optimizer", "send", "wait")
SERVER_PHASES = ("recv", "wait", "forward", "backward", "optimizer")


def launch(n_clients: int, batched: bool, args, tmp: str) -> dict:
    tag = f"n{n_clients}-{'batched' if batched else 'loop'}"
    h5, js = os.path.join(tmp, f"{tag}.h5"), os.path.join(tmp, f"{tag}.json")
    cli = ["--cut", "0.4", "--steps", str(args.steps), "--batch-size", "4", "--samples-per-client", "4",
           "--clients-per-rank", str(n_clients // 2), "-o", h5, "--overwrite", "-q",
           "--set", "privacy.attacks=none", "--set", "run.save_models=false",
           "--set", f"train.warmup_steps={args.warmup}", "--set", f"train.batched_clients={str(batched).lower()}",
           "--set", "run.recv_timeout=3000"]
    shown, wall, rows = memory.run_wrapped(3, cli, js, tag)
    mem = {r["rank"]: r for r in rows}
    from collafuse_mpi import results
    run = next(iter(results.read(h5)["runs"].values()))
    return summarize(run, mem, n_clients, batched, shown, wall, args.warmup)


def summarize(run, mem, n_clients, batched, shown, wall, warmup) -> dict:
    out = {"n_clients": n_clients, "batched": batched, "command": shown, "wall_s": wall, "ranks": {}}
    images = seconds = 0.0
    for rank in (0, 1, 2):
        d = run["ranks"][rank]
        keep = np.asarray(d["step"]) >= warmup
        step_s = (np.asarray(d["step_end"]) - np.asarray(d["step_start"]))[keep]
        ps = np.asarray(d["phase_seconds"])[keep]
        w = d["windows"]
        row = {"role": d["role"], "step_s": common.pct(step_s) if step_s.size else {},
               "phase_median_s": {p: float(np.median(ps[:, PHASES.index(p)])) for p in PHASES} if step_s.size else {},
               "windows_s": {k: float(v["end"] - v["start"]) for k, v in w.items()},
               "peak_rss_mib": mem[rank]["ru_maxrss_kib"] / 1024.0,
               "images": int(np.asarray(d["images"])[keep].sum())}
        if rank > 0:
            images += row["images"]
            seconds += float(step_s.sum())
        out["ranks"][rank] = row
    # the two client ranks run side by side: images over the mean of their summed step times
    out["client_images_per_s"] = images / (seconds / 2) if seconds else float("nan")
    out["server_sample_window_s"] = out["ranks"][0]["windows_s"].get("sample", float("nan"))
    return out


def sampling(sizes, repeats: int) -> list[dict]:
    """The server's chains for N clients, fused vs serial, in process, alternating."""
    import torch

    from collafuse_mpi import schedule
    from collafuse_mpi.config import Config
    from collafuse_mpi.fused_sampling import Request, run_fused, run_serial
    from collafuse_mpi.harness import PhaseTimer
    from collafuse_mpi.loopback import LoopbackTransport
    from collafuse_mpi.server import Server
    from collafuse_mpi.training import derive_seed, generator
    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        cfg = Config()
        cfg.run.clients_per_rank = n
        ks = cfg.cut_steps(n)
        server = Server(cfg, LoopbackTransport.group(2)[0], ks, torch.device("cpu"), PhaseTimer())
        server.answer = lambda req, x, handles: None  # timing the chains, not the sends
        model = server.learner.ema.model
        d = cfg.diffusion

        def requests():
            return [Request(i, k, 4, generator(derive_seed(0, 0, "sample", i)),
                            schedule.side_steps(server.T, k, d.sampler, d.sample_steps, "server"))
                    for i, k in enumerate(ks)]
        times = {"fused": [], "serial": []}
        for r in range(repeats + 1):  # the first pair warms up and is discarded
            order = (("fused", run_fused), ("serial", run_serial)) if r % 2 == 0 else \
                (("serial", run_serial), ("fused", run_fused))
            for name, fn in order:
                t0 = time.perf_counter()
                fn(server, model, requests(), [])
                if r:
                    times[name].append(time.perf_counter() - t0)
        fused, serial = float(np.median(times["fused"])), float(np.median(times["serial"]))
        rows.append({"n_clients": n, "server_steps": len(requests()[0].pairs), "fused_s": times["fused"],
                     "serial_s": times["serial"], "fused_median_s": fused, "serial_median_s": serial,
                     "speedup": serial / fused})
        print(f"sampling N={n}: fused {fused:.3f} s, serial {serial:.3f} s, x{serial / fused:.2f}", flush=True)
    return rows


def markdown(rec: dict) -> list[str]:
    md = ["# many_clients: 1 server + 2 client ranks, 2..256 logical clients", "",
          f"Command: `{rec['command']}`", "", "## Machine", "", common.machine_md(rec["machine"]), "",
          "## Training runs (the CLI, mpirun -n 3)", ""]
    rows = []
    runs = {(r["n_clients"], r["batched"]): r for r in rec["runs"]}
    for (n, batched), r in sorted(runs.items()):
        c1, s = r["ranks"][1], r["ranks"][0]
        loop = runs.get((n, False))
        speed = (loop["ranks"][1]["step_s"]["p50"] / c1["step_s"]["p50"]) if batched and loop else ""
        compute = lambda run: sum(run["ranks"][1]["phase_median_s"][p] for p in ("forward", "backward", "optimizer"))  # noqa: E731
        speed_c = compute(loop) / compute(r) if batched and loop else ""
        rows.append([n, "batched" if batched else "loop", f"{r['client_images_per_s']:.0f}",
                     f"{c1['step_s']['p50'] * 1e3:.0f}", f"{s['step_s']['p50'] * 1e3:.0f}",
                     f"{speed:.2f}" if speed != "" else "", f"{speed_c:.2f}" if speed_c != "" else "",
                     " / ".join(f"{r['ranks'][k]['peak_rss_mib']:.0f}" for k in (0, 1, 2)),
                     f"{r['server_sample_window_s']:.2f}", f"{r['wall_s']:.0f}"])
    md += [common.table(["clients N", "client models", "client images/s", "client step P50 ms",
                         "server step P50 ms", "batched speedup: client step", "batched speedup: client compute",
                         "peak RSS MiB (server / client 1 / client 2)", "server sample window s", "wall s"], rows), ""]
    md += ["Client images/s: the images of both client ranks over their mean summed step time (steps "
           "after the warm-up). Batched speedup: loop over batched, of client rank 1's median step time, and "
           "of its compute alone (median forward + backward + optimizer per step); the step also holds the "
           "wait for the server's receive (train.max_in_flight).", "",
           "Median milliseconds per step in each phase (steps after the warm-up):", ""]
    prow = []
    for (n, batched), r in sorted(runs.items()):
        c1, s = r["ranks"][1]["phase_median_s"], r["ranks"][0]["phase_median_s"]
        prow.append([n, "batched" if batched else "loop"] + [f"{c1[p] * 1e3:.1f}" for p in CLIENT_PHASES]
                    + [f"{s[p] * 1e3:.1f}" for p in SERVER_PHASES])
    md += [common.table(["N", "client models"] + [f"client {p} ms" for p in CLIENT_PHASES]
                        + [f"server {p} ms" for p in SERVER_PHASES], prow), ""]
    md += ["## Server sampling chains, fused vs serial (in process)", ""]
    md += [common.table(["clients N", "server DDIM steps each", "serial s (median)", "fused s (median)", "speedup"],
                        [[r["n_clients"], r["server_steps"], f"{r['serial_median_s']:.3f}",
                          f"{r['fused_median_s']:.3f}", f"{r['speedup']:.2f}"] for r in rec["sampling"]]), ""]
    return md


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--render"]:  # the .md again from a recorded .json
        import json
        with open(os.path.join(common.RESULTS, argv[1] + ".json")) as fh:
            rec = json.load(fh)
        for r in rec["runs"]:
            r["ranks"] = {int(k): v for k, v in r["ranks"].items()}
        common.write(argv[1], rec, "\n".join(markdown(rec)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2,16,64,256", help="logical clients N (even: N/2 per client rank)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sample-sizes", default="2,16,64,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="many_clients")
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",") if v]
    rec = {"command": common.command(), "machine": common.machine(), "args": vars(args), "runs": []}
    head = subprocess.run(["git", "-C", common.REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    rec["machine"]["git_commit_head"] = head.stdout.strip()  # also in a git worktree (.git is a file there)
    tmp = tempfile.mkdtemp(prefix="cf-many-")
    try:
        for n in sizes:
            for batched in (False, True) if n // 2 > 1 else (False,):  # one client per rank: nothing to batch
                rec["runs"].append(launch(n, batched, args, tmp))
                r = rec["runs"][-1]
                print(f"  N={n} {'batched' if batched else 'loop'}: {r['client_images_per_s']:.0f} images/s, "
                      f"client step P50 {r['ranks'][1]['step_s']['p50'] * 1e3:.0f} ms, wall {r['wall_s']:.0f} s",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec["sampling"] = sampling([int(v) for v in args.sample_sizes.split(",") if v], args.repeats)
    common.publish(args.name, rec, markdown(rec))


if __name__ == "__main__":
    main()
