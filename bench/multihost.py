"""The scaling projection checked across emulated hosts: the CLI over real TCP links, beside its prediction.

    flock /tmp/cpu.lock python bench/multihost.py          # root; ~15 min on 2 cores; writes
                                                           # bench/results/multihost.{json,md}
    flock /tmp/cpu.lock python bench/multihost.py --quick  # 2 and 4 clients, 2 link settings
    python bench/multihost.py --only 2mbit --calibration bench/results/multihost.json --out multihost-2mbit
                                                           # one more setting, same unshaped runs

One server and N clients, each rank on its own emulated host (scripts/netns-cluster.sh: network
namespaces, a veth each to a switch, tbf rate and NFQUEUE delay per link), for N = 2, 4, 8 and link
settings unshaped, 10 Gbit/s + 50 us, 1 Gbit/s + 200 us, 10 Mbit/s and 2 Mbit/s (the wire dominates).
Per setting the link itself is probed first (UDP round trip, one TCP stream into the server's host).

The check, per (setting, N): bench/projection.py's model `project()` with the link's nominal rate
and one-way delay as its bandwidth and latency, and everything else taken from the unshaped run at
the same N (server compute per image, client own step, server host cost per message, message size):
the hosts share 2 cores, so compute depends on N and only the link is allowed to differ. The ratio
predicted/measured is reported for the server's step and for its communication phases (recv + wait).
The unshaped row is the calibration (its link terms only: veth rate and latency measured by the probe).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import common
import projection

from collafuse_mpi import results  # noqa: E402

SCRIPT = os.path.join(common.REPO, "scripts", "netns-cluster.sh")
PROBE = os.path.join(common.REPO, "scripts", "netns_probe.py")
PREFIX = "cfbench"
# name, tc rate, one-way delay (us), nominal bandwidth (Gbit/s) and latency (us) given to the model
SETTINGS = [("unshaped", "none", 0, None, None), ("10gbit+50us", "10gbit", 50, 10.0, 50.0),
            ("1gbit+200us", "1gbit", 200, 1.0, 200.0), ("10mbit", "10mbit", 0, 0.01, 0.0),
            ("2mbit", "2mbit", 0, 0.002, 0.0)]
ENV = dict(os.environ, CF_NETNS_PREFIX=PREFIX)


def cluster(*args, check=True, timeout=300):
    p = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and p.returncode != 0:
        raise SystemExit(f"netns-cluster.sh {' '.join(args)}: {p.stderr.strip()}")
    return p


def probe_link() -> dict:
    """Round trip host 2 <-> host 1 and one TCP stream host 2 -> host 1 (into the server's host)."""
    py = [sys.executable, PROBE]
    server = subprocess.Popen(["bash", SCRIPT, "exec", "1", *py, "serve", "--seconds", "60"], env=ENV)
    try:
        time.sleep(1.0)
        ping = json.loads(cluster("exec", "2", *py, "ping", f"{PREFIX}node1", "--count", "200").stdout)
        push = json.loads(cluster("exec", "2", *py, "push", f"{PREFIX}node1", "--mbytes", "4").stdout)
    finally:
        server.kill()
        server.wait()
    return {**ping, "tcp_mbit_s": push["mbit_s"]}


def run_cli(n_clients: int, steps: int, batch: int, out: str) -> dict:
    args = ["run", "-n", str(n_clients + 1), "--map-by", "node", sys.executable, "-m", "collafuse_mpi.run",
            "--steps", str(steps), "--batch-size", str(batch), "--samples-per-client", "4", "--quiet",
            "--set", "run.pooled_kid=false", "-o", out]
    env = dict(ENV, PYTHONPATH=common.REPO)
    t0 = time.perf_counter()
    p = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
    name, run = next(iter(results.read(out)["runs"].items()))
    a = projection.analyse_run(name, run, out)
    a["wall_s"] = wall
    a["command"] = "scripts/netns-cluster.sh " + " ".join(args[:-1] + ["OUT.h5"]).replace(sys.executable, "python")
    a["peers_rank0"] = {k: np.asarray(v).tolist() for k, v in run["ranks"][0].get("peers", {}).items()}
    return a


def model_params(cal: dict, n: int, batch: int, eager_limit: int) -> dict:
    """projection.project()'s parameters from the unshaped run at the same N."""
    s = cal["server"]
    msg = cal["message_bytes_measured"] or cal["message_bytes_formula"]
    return {"a_s": 0.0, "b_s": s["compute_s"] / max(s["images_per_step"], 1), "batch": batch,
            "client_s": cal["client_own_step_s"], "host_s": s["recv_per_client_s"], "message_bytes": msg,
            "latency_msgs": projection.latency_msgs(msg - projection.HEADER_BYTES, eager_limit),
            "server_speedup": 1.0, "client_speedup": 1.0}


def compare(run: dict, p: dict, n: int, bw_gbit: float, lat_us: float) -> dict:
    pred = projection.project(p, n, bw_gbit, lat_us)
    s = run["server"]
    comm = s["recv_s"] + s["wait_s"]  # the server's step less its compute and io: what the link and clients cost
    pred_comm = pred["step_s"]["pipelined"] - pred["compute_s"]
    return {"bandwidth_gbit": bw_gbit, "latency_us": lat_us, "pred_step_s": pred["step_s"]["pipelined"],
            "pred_recv_s": pred["recv_s"], "pred_comm_s": pred_comm, "pred_compute_s": pred["compute_s"],
            "pred_client_s": pred["client_s"],
            "pred_wire_s": pred["wire_s"], "pred_latency_s": pred["latency_s"], "pred_host_s": pred["host_s"],
            "meas_step_s": s["step_s"], "meas_comm_s": comm, "meas_recv_s": s["recv_s"], "meas_wait_s": s["wait_s"],
            "meas_compute_s": s["compute_s"], "bottleneck": pred["bottleneck"],
            "ratio_step": pred["step_s"]["pipelined"] / s["step_s"],
            "ratio_comm": pred_comm / comm if comm > 0 else float("nan")}


def markdown(rec: dict) -> str:
    ms = lambda v: f"{v * 1e3:.1f}"  # noqa: E731
    rows, links = [], []
    for st in rec["settings"]:
        lk = st["link"]
        links.append([st["name"], f"{lk['rtt_min_us']:.0f}", f"{lk['rtt_p50_us']:.0f}", f"{lk['tcp_mbit_s']:.0f}"])
        for r in st["runs"]:
            for label in ("nominal", "probed"):
                c = r.get(label)
                if c is None:
                    continue
                rows.append([st["name"], r["n_clients"], label, f"{c['bandwidth_gbit']:g}", f"{c['latency_us']:.0f}",
                             ms(c["meas_step_s"]), ms(c["pred_step_s"]), f"{c['ratio_step']:.2f}",
                             ms(c["meas_comm_s"]), ms(c["pred_comm_s"]), f"{c['ratio_comm']:.2f}", c["bottleneck"]])
    md = [f"# multihost: the projection checked over emulated hosts", "",
          f"Command: `{rec['command']}`  ", f"Elapsed: {rec['elapsed_s']:.0f} s", "",
          "## Machine", "", common.machine_md(rec["machine"]), "",
          "## Links as probed (host 2 -> host 1)", "",
          common.table(["setting", "RTT min us", "RTT p50 us", "TCP stream Mbit/s"], links), "",
          "## Server step and communication, measured and predicted", "",
          "`nominal`: the model given the setting's rate and delay; `probed`: the probed TCP rate and half "
          "the probed round trip. comm = the server's recv + wait phases (medians over steps after warm-up); "
          "the prediction's comm is its pipelined step less its compute (recv(N), plus idle time when the "
          "clients are slower).", "",
          common.table(["setting", "N", "model link", "Gbit/s", "lat us", "step ms", "pred ms", "pred/meas",
                        "comm ms", "pred comm ms", "pred/meas", "bottleneck (pred)"], rows), "",
          "Runs: " + "; ".join(f"`{r['command']}`" for st in rec["settings"][:1] for r in st["runs"][:1]) +
          " (and the same with other -n and link settings).", ""]
    md += rec.get("notes", [])
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="2,4,8")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eager-limit", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="2 and 4 clients, unshaped and 10mbit, 8 steps")
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    ap.add_argument("--calibration", default="", metavar="JSON",
                    help="take the unshaped runs from this earlier record instead of running them")
    ap.add_argument("--out", default="multihost")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("multihost: needs root (network namespaces)")
    clients = [int(v) for v in args.clients.split(",")]
    settings = SETTINGS
    if args.quick:
        clients, settings, args.steps = [2, 4], [SETTINGS[0], SETTINGS[3]], 8
    if args.only:
        settings = [s for s in SETTINGS if s[0] in args.only.split(",")]
    cal = {}
    if args.calibration:
        with open(args.calibration) as fh:
            earlier = json.load(fh)
        cal = {r["n_clients"]: r for st in earlier["settings"] if st["rate"] == "none" for r in st["runs"]}
        if args.batch_size != earlier["batch_size"] or args.steps != earlier["steps"]:
            raise SystemExit("--calibration: the earlier record used other --batch-size/--steps")
    missing = [n for n in clients if n not in cal and not any(s[1] == "none" for s in settings)]
    if missing:
        raise SystemExit(f"no unshaped run for N = {missing}: include the unshaped setting or --calibration")
    t0 = time.perf_counter()
    cluster("down", check=False)
    cluster("up", str(max(clients) + 1))
    tmp = tempfile.mkdtemp(prefix="cf-multihost-")
    out = []
    try:
        for name, rate, delay, bw, lat in settings:
            cluster("shape", rate, f"{delay}us")
            link = probe_link()
            print(f"{name}: rtt min {link['rtt_min_us']:.0f} us, tcp {link['tcp_mbit_s']:.0f} Mbit/s", flush=True)
            runs = []
            for n in clients:
                r = run_cli(n, args.steps, args.batch_size, os.path.join(tmp, f"{name}-n{n}.h5"))
                if rate == "none":
                    cal[n] = r
                p = model_params(cal[n], n, args.batch_size, args.eager_limit)
                probed_bw, probed_lat = link["tcp_mbit_s"] / 1e3, link["rtt_p50_us"] / 2
                if bw is not None:
                    r["nominal"] = compare(r, p, n, bw, lat)
                r["probed"] = compare(r, p, n, probed_bw, probed_lat)
                c = r.get("nominal") or r["probed"]
                print(f"  N={n}: step {c['meas_step_s'] * 1e3:.1f} ms, predicted {c['pred_step_s'] * 1e3:.1f} ms "
                      f"(x{c['ratio_step']:.2f}); comm {c['meas_comm_s'] * 1e3:.1f} ms, predicted "
                      f"{c['pred_comm_s'] * 1e3:.1f} ms ({r['wall_s']:.0f} s)", flush=True)
                runs.append(r)
            out.append({"name": name, "rate": rate, "delay_us": delay, "link": link, "runs": runs})
    finally:
        cluster("down", check=False)
    rec = {"benchmark": "multihost", "command": common.command(), "machine": common.machine(),
           "settings": out, "clients": clients, "calibration": args.calibration, "steps": args.steps,
           "batch_size": args.batch_size,
           "elapsed_s": time.perf_counter() - t0}
    paths = common.write(args.out, rec, markdown(rec))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
