"""How far clients run ahead of the server over TCP, and what rank 0 holds for them.

    flock /tmp/cpu.lock python bench/run_ahead.py     # root; ~15 min on 2 cores;
                                                      # writes bench/results/run-ahead.{json,md}

One server and N clients (default 4), each rank on its own emulated host (scripts/netns-cluster.sh),
unshaped links: the server trains on N batches per step, each client on one, so the server is
the bottleneck and a client could run ahead of it. Batches of 32 (the default: 65,760-byte
messages) and 128 (262,272 bytes), both sent eagerly under run.tcp_eager. Runs per batch size,
one after another under the same conditions:

  sync        the package's default: training batches by MPI_Issend (train.sync_sends)
  plain       train.sync_sends=false: plain MPI_Isend, complete once buffered when eager
  rendezvous  run.tcp_eager=false: Open MPI's 64 KiB limit, a handshake per batch

each with run.stop_check_every = 25 and run.flush_every = 0, so that nothing but the stop vote
(read one interval after it starts) could hold back a plain sender; `plain-defaults` with the
package's 5 and 25; and `sync-bigbuf`, `plain-bigbuf` with 8 MiB initial TCP buffers on every host
(net.ipv4.tcp_rmem/tcp_wmem in each namespace, as tuned cluster nodes often have). With this
kernel's defaults (128 KiB receive, 16 KiB send) a connection holds about two unread batches, so
a plain eager send stops completing there; larger buffers let it run on.

Per run:
- steps ahead: at each client step end, the steps that client has completed less those the server
  has completed by then (every rank's timer is offset to rank 0's clock), maximum over the run;
  the bound the package promises is max_in_flight + 1 (sync, rendezvous), 2 * stop_check_every +
  1 (plain);
- rank 0's memory, through bench/memory.py's wrapper: peak RSS (ru_maxrss) and its RSS at the
  training steps (sampled every 0.2 s);
- the server's step cadence (median interval between step starts after warm-up), its compute
  per step and CPU share while computing, its receive time per client message, and the time of
  the whole training (first step start on any rank to the server's last step end).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import common
import memory

from collafuse_mpi import mpi_params, results  # noqa: E402
from collafuse_mpi.config import Config  # noqa: E402
from collafuse_mpi.harness import PHASES  # noqa: E402

SCRIPT = os.path.join(common.REPO, "scripts", "netns-cluster.sh")
ENV = dict(os.environ, CF_NETNS_PREFIX="cfahead")
P = {p: i for i, p in enumerate(PHASES)}
SOCKET_BUFFERS = 8 << 20  # initial TCP buffers of the `large buffers` runs, as tuned HPC nodes set them
VOTE_ONLY = ["run.stop_check_every=25", "run.flush_every=0"]
# name, --set overrides, initial TCP socket buffer bytes on every host (None: the kernel's)
RUNS = [("sync", VOTE_ONLY, None),
        ("plain", ["train.sync_sends=false", *VOTE_ONLY], None),
        ("rendezvous", ["run.tcp_eager=false", *VOTE_ONLY], None),
        ("plain-defaults", ["train.sync_sends=false"], None),
        ("sync-bigbuf", VOTE_ONLY, SOCKET_BUFFERS),
        ("plain-bigbuf", ["train.sync_sends=false", *VOTE_ONLY], SOCKET_BUFFERS)]
TCP_BUFFERS = ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem")


def cluster(*args, check=True):
    import subprocess
    p = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=300)
    if check and p.returncode != 0:
        raise SystemExit(f"netns-cluster.sh {' '.join(args)}: {p.stderr.strip()}")
    return p


def socket_buffers(hosts: int, size: int | None, saved: dict | None = None) -> dict:
    """Set every host's initial TCP buffers to `size` (None: put back `saved`); returns what was set before."""
    before = {}
    for i in range(1, hosts + 1):
        for key in TCP_BUFFERS:
            before[(i, key)] = cluster("exec", str(i), "sysctl", "-n", key).stdout.split()
            value = saved[(i, key)] if size is None else [before[(i, key)][0], str(size), str(max(size, 33554432))]
            cluster("exec", str(i), "sysctl", "-q", "-w", f"{key}={' '.join(value)}")
    return before


def steps_ahead(run: dict) -> dict:
    """Per client rank: the most steps it had completed beyond the server's, at its step ends."""
    ranks = run["ranks"]
    server_end = np.sort(np.asarray(ranks[0]["step_end"], dtype=np.float64))
    out = {}
    for r, rk in sorted(ranks.items()):
        if rk.get("role") != "client":
            continue
        ends = np.asarray(rk["step_end"], dtype=np.float64)
        server_done = np.searchsorted(server_end, ends, side="right")
        out[int(r)] = int(np.max(np.arange(1, ends.size + 1) - server_done))
    return out


def server_timing(run: dict) -> dict:
    rk = run["ranks"][0]
    first = min(float(np.asarray(r["step_start"])[0]) for r in run["ranks"].values() if len(r["step_start"]))
    keep = ~np.asarray(rk["warmup"], dtype=bool)
    starts = np.asarray(rk["step_start"], dtype=np.float64)
    ps = np.asarray(rk["phase_seconds"]).reshape(-1, len(PHASES))[keep]
    senders = max(1, int(np.median(np.asarray(rk["images"])[keep])) // int(run["config"]["train"]["batch_size"]))
    compute = ps[:, P["forward"]] + ps[:, P["backward"]] + ps[:, P["optimizer"]]
    cpu = np.asarray(rk["phase_cpu_seconds"]).reshape(-1, len(PHASES))[keep]
    cpu_compute = cpu[:, P["forward"]] + cpu[:, P["backward"]] + cpu[:, P["optimizer"]]
    return {"cadence_s": float(np.median(np.diff(starts[keep]))), "recv_per_client_s":
            float(np.median(ps[:, P["recv"]])) / senders, "wait_s": float(np.median(ps[:, P["wait"]])),
            "compute_s": float(np.median(compute)),
            # the server's CPU time over wall time while it computes: below 1 when clients compute beside it
            "compute_cpu_share": float(cpu_compute.sum() / compute.sum()),
            # all the training: the first step start on any rank to the server's last step end
            "train_window_s": float(np.asarray(rk["step_end"])[-1] - first)}


def one_run(name: str, sets: list, n: int, steps: int, batch: int, tmp: str, buffers: int | None = None) -> dict:
    import subprocess
    tag = f"b{batch}-{name}"
    h5, js = os.path.join(tmp, f"{tag}.h5"), os.path.join(tmp, f"{tag}.json")
    cli = ["--steps", str(steps), "--batch-size", str(batch), "--samples-per-client", "4", "--quiet",
           "--set", "run.pooled_kid=false", "--set", "privacy.attacks=none", "--set", "run.save_models=false"]
    for s in sets:
        cli += ["--set", s]
    args = ["run", "-n", str(n + 1), "--map-by", "node", sys.executable, os.path.join(common.BENCH, "memory.py"),
            "--wrap", js, "--", *cli, "-o", h5]
    shown = ("scripts/netns-cluster.sh " + " ".join(args[:-1] + ["OUT.h5"])).replace(sys.executable, "python")
    shown = shown.replace(js, "OUT.json").replace(common.BENCH + "/", "bench/")
    print(f"{name}: {shown}", flush=True)
    saved = socket_buffers(n + 1, buffers) if buffers else None
    try:
        t0 = time.perf_counter()
        p = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                           env=dict(ENV, PYTHONPATH=common.REPO), timeout=1800)
        wall = time.perf_counter() - t0
    finally:
        if saved:
            socket_buffers(n + 1, None, saved)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
    with open(js) as fh:
        mem = {r["rank"]: r for r in json.load(fh)}
    run = next(iter(results.read(h5)["runs"].values()))
    mem[0]["step_start"] = np.asarray(run["ranks"][0]["step_start"]).tolist()
    rss0 = memory.growth(mem[0])
    ahead = steps_ahead(run)
    cfg = run["config"]
    c = Config()
    c.train.batch_size = batch
    return {"name": name, "set": sets, "command": shown, "wall_s": wall, "steps": steps, "batch_size": batch,
            "tcp_initial_buffer_bytes": buffers,
            "message_bytes": mpi_params.message_bytes(c),
            "stop_check_every": int(cfg["run"]["stop_check_every"]), "max_in_flight": int(cfg["train"]["max_in_flight"]),
            "sync_sends": bool(cfg["train"].get("sync_sends", True)),
            "eager_limit": run.get("transport_settings", {}).get(mpi_params.EAGER_VAR, "65536 (Open MPI's)"),
            "steps_ahead": ahead, "steps_ahead_max": max(ahead.values()),
            "server": server_timing(run),
            "rank0_peak_rss_mib": mem[0]["ru_maxrss_kib"] / 1024,
            "client_peak_rss_mib": max(m["ru_maxrss_kib"] for r, m in mem.items() if r) / 1024,
            "rank0_rss_mib_10pct": rss0["rss_kib_10pct"] / 1024,
            "rank0_rss_mib_last_step": rss0["rss_kib_last_step"] / 1024,
            "rank0_rss_at_step_kib": rss0["rss_kib_at_step"]}


def bound(r: dict) -> int:
    return (2 * r["stop_check_every"] if not r["sync_sends"] and r["eager_limit"] != "65536 (Open MPI's)"
            else r["max_in_flight"]) + 1


def markdown(rec: dict) -> str:
    md = ["# run-ahead: how far clients get ahead of the server over TCP, and rank 0's memory", "",
          f"Command: `{rec['command']}`  ", f"Elapsed: {rec['elapsed_s']:.0f} s", "", "## Machine", "",
          common.machine_md(rec["machine"]), "",
          f"## {rec['clients']} clients on their own emulated hosts, unshaped links, {rec['steps']} steps", ""]
    rows = []
    for r in rec["runs"]:
        held = rec["clients"] * r["steps_ahead_max"] * r["message_bytes"] / 2 ** 20
        rows.append([r["batch_size"], f"{r['message_bytes']:,}", r["name"], r["eager_limit"], r["sync_sends"], r["stop_check_every"],
                     r["steps_ahead_max"], bound(r), f"{held:.1f}",
                     f"{r['rank0_peak_rss_mib']:.0f}", f"{r['rank0_rss_mib_last_step'] - r['rank0_rss_mib_10pct']:+.1f}",
                     f"{r['client_peak_rss_mib']:.0f}", f"{r['server']['cadence_s'] * 1e3:.0f}",
                     f"{r['server']['compute_s'] * 1e3:.0f}" if "compute_s" in r["server"] else "",
                     f"{r['server']['compute_cpu_share']:.2f}" if "compute_cpu_share" in r["server"] else "",
                     f"{r['server']['recv_per_client_s'] * 1e3:.2f}",
                     f"{r['server']['train_window_s']:.1f}" if "train_window_s" in r["server"] else "",
                     f"{r['wall_s']:.0f}"])
    md.append(common.table(["batch", "message bytes", "run", "TCP eager limit", "sync sends", "stop_check_every", "steps ahead (max)",
                            "promised bound", "batches it implies on rank 0, MiB", "rank 0 peak RSS MiB",
                            "rank 0 RSS, 10% of steps -> last step, MiB", "client peak RSS MiB",
                            "server step cadence ms", "server compute ms", "server CPU share while computing",
                            "server recv per client ms", "training s", "wall s"], rows))
    md += ["", "Steps ahead: at each client step end, that client's completed steps less the server's at "
           "that moment (rank 0's clock), the maximum over clients and steps. Promised bound: "
           "max_in_flight + 1 when a batch counts as in flight until the server takes it (sync sends, or "
           "any rendezvous); 2 * stop_check_every + 1 for plain eager sends, which only the stop vote "
           "holds back. Batches it implies: clients x steps ahead x message, what Open MPI holds on rank 0 "
           "for messages that arrived before their receive. RSS: bench/memory.py's wrapper (ru_maxrss, "
           "and VmRSS every 0.2 s read at the training steps). Server compute: its forward, backward and "
           "optimizer phases per step (median); CPU share: their CPU time over their wall time. Training: "
           "the first step start on any rank to the server's last step end. The hosts share 2 cores: "
           "where the clients' own training lands in time (beside the server's steps when they are held "
           "to it, early when they run ahead) moves the server's compute and cadence; the training time "
           "is the end-to-end comparison."]
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--out", default="run-ahead")
    ap.add_argument("--render", default="", metavar="JSON", help="only rewrite the .md of this record")
    ap.add_argument("--results-dir", default="", metavar="DIR",
                    help="with --render: re-derive steps ahead and server timing from the runs' results "
                         "files kept in DIR (b<batch>-<name>.h5)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            rec = json.load(fh)
        for r in rec["runs"] if args.results_dir else []:
            run = next(iter(results.read(os.path.join(args.results_dir, f"b{r['batch_size']}-{r['name']}.h5"))["runs"].values()))
            r["steps_ahead"] = steps_ahead(run)
            r["steps_ahead_max"] = max(r["steps_ahead"].values())
            r["server"] = server_timing(run)
        print("wrote", *common.write(args.out, rec, markdown(rec)))
        return
    if os.geteuid() != 0:
        raise SystemExit("run_ahead: needs root (network namespaces)")
    batches = [int(v) for v in args.batch_sizes.split(",")]
    runs = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    t0, machine, tmp, done = time.perf_counter(), common.machine(), tempfile.mkdtemp(prefix="cf-ahead-"), []

    def save():
        rec = {"benchmark": "run-ahead", "command": common.command(), "machine": machine, "clients": args.clients,
               "steps": args.steps, "batch_sizes": batches, "runs": done, "elapsed_s": time.perf_counter() - t0}
        return common.write(args.out, rec, markdown(rec))

    cluster("down", check=False)
    cluster("up", str(args.clients + 1))
    try:
        for batch, (name, sets, buffers) in ((b, r) for b in batches for r in runs):
            r = one_run(name, sets, args.clients, args.steps, batch, tmp, buffers)
            print(f"  ahead {r['steps_ahead_max']} (bound {bound(r)}), rank 0 peak RSS {r['rank0_peak_rss_mib']:.0f} MiB, "
                  f"cadence {r['server']['cadence_s'] * 1e3:.0f} ms, recv/client "
                  f"{r['server']['recv_per_client_s'] * 1e3:.2f} ms, {r['wall_s']:.0f} s", flush=True)
            done.append(r)
            save()
    finally:
        cluster("down", check=False)
    print("wrote", *save())


if __name__ == "__main__":
    main()
