"""The scaling projection checked across emulated hosts: the CLI over real TCP links, beside its prediction.

    flock /tmp/cpu.lock python bench/multihost.py          # root; ~30 min on 2 cores; writes
                                                           # bench/results/multihost.{json,md}
    flock /tmp/cpu.lock python bench/multihost.py --quick  # 2 and 4 clients, 2 link settings

One server and N clients, each rank on its own emulated host (scripts/netns-cluster.sh: network
namespaces, a veth each to a switch, tbf rate and NFQUEUE delay per link), for N = 2, 4, 8 and link
settings unshaped, 10 Gbit/s + 50 us, 1 Gbit/s + 200 us, 10 Mbit/s and 2 Mbit/s (the wire dominates).
Per setting the link itself is probed first: UDP round trip, one TCP stream into the server's host,
and bench/link_probe.py's per-message cost (one waiting training payload's receive, with the eager
limit the runs set and with Open MPI's 64 KiB default).

The check, per (setting, N): bench/projection.py's model `project()` with the link's nominal rate
and one-way delay as its bandwidth and latency, the eager limit the run used (run.tcp_eager), and
everything else taken from the unshaped run at the same N (server compute per image, client own
step, server host cost per message, message size): the hosts share 2 cores, so compute depends on
N and only the link is allowed to differ. The ratio predicted/measured is reported for the
server's step and for its communication phases (recv + wait). The unshaped row is the
calibration (its link terms only: veth rate and latency measured by the probe). Each N also runs
with run.tcp_eager=false (a rendezvous per batch), modelled from the unshaped rendezvous run.
Settings at 10 Mbit/s and below run --steps-wire steps (the wire dominates there, and a short
run's medians come from steps whose batches crossed during earlier ones).
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
import link_model
import run_ahead
from projection_inputs import analyse_run

from collafuse_mpi import comm, mpi_params, results  # noqa: E402
from collafuse_mpi.config import Config  # noqa: E402

SCRIPT = os.path.join(common.REPO, "scripts", "netns-cluster.sh")
PROBE = os.path.join(common.REPO, "scripts", "netns_probe.py")
MSG_PROBE = os.path.join(common.REPO, "bench", "link_probe.py")
OMPI_EAGER = 65536  # Open MPI's own btl_tcp_eager_limit
PREFIX = "cfbench"
# name, tc rate, one-way delay (us), nominal bandwidth (Gbit/s) and latency (us) given to the model
SETTINGS = [("unshaped", "none", 0, None, None), ("10gbit+50us", "10gbit", 50, 10.0, 50.0),
            ("1gbit+200us", "1gbit", 200, 1.0, 200.0), ("10mbit", "10mbit", 0, 0.01, 0.0),
            ("2mbit", "2mbit", 0, 0.002, 0.0)]
# tbf queues at 2-10 Mbit/s can hold a segment longer than the script's ~6 s of retransmits
ENV = dict(os.environ, CF_NETNS_PREFIX=PREFIX, CF_NETNS_TCP_RETRIES="8")


class RunFailed(RuntimeError):
    pass


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


def probe_messages(payload: int, limits: dict, gap: float = 0.3) -> dict:
    """bench/link_probe.py between hosts 1 and 2: one waiting message's receive after `gap`, per
    eager limit (name -> bytes); p50 and min in seconds."""
    out = {}
    for name, limit in limits.items():
        env = dict(ENV, PYTHONPATH=common.REPO, OMPI_MCA_btl_tcp_eager_limit=str(limit))
        p = subprocess.run(["bash", SCRIPT, "run", "-n", "2", "--map-by", "node", "-x", "OMPI_MCA_btl_tcp_eager_limit",
                            sys.executable, MSG_PROBE, "--bytes", str(payload), "--gaps", str(gap), "--reps", "10"],
                           capture_output=True, text=True, env=env, timeout=300)
        if p.returncode != 0:
            raise SystemExit(f"link_probe failed: {p.stdout[-1000:]}{p.stderr[-1000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])["rows"][0]
        out[name] = {"eager_limit": limit, "payload_bytes": payload, "gap_s": gap, "p50_s": row["p50_s"],
                     "min_s": row["min_s"]}
    return out


def run_cli(n_clients: int, steps: int, batch: int, out: str, extra=()) -> dict:
    args = ["run", "-n", str(n_clients + 1), "--map-by", "node", sys.executable, "-m", "collafuse_mpi.run",
            "--steps", str(steps), "--batch-size", str(batch), "--samples-per-client", "4", "--quiet",
            "--set", "run.pooled_kid=false", *extra, "-o", out]
    env = dict(ENV, PYTHONPATH=common.REPO)
    t0 = time.perf_counter()
    p = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RunFailed(f"run failed ({p.returncode}): {p.stdout[-1500:]}{p.stderr[-1500:]}")
    name, run = next(iter(results.read(out)["runs"].items()))
    a = analyse_run(name, run, out)
    a["wall_s"] = wall
    a["command"] = "scripts/netns-cluster.sh " + " ".join(args[:-1] + ["OUT.h5"]).replace(sys.executable, "python")
    a["peers_rank0"] = {k: np.asarray(v).tolist() for k, v in run["ranks"][0].get("peers", {}).items()}
    a["eager_limit"] = int(run.get("transport_settings", {}).get("OMPI_MCA_btl_tcp_eager_limit", OMPI_EAGER))
    a["steps_ahead"] = run_ahead.steps_ahead(run)
    a["steps"] = steps
    return a


def model_params(cal: dict, n: int, batch: int, eager_limit: int) -> dict:
    """link_model.project()'s parameters from the unshaped run at the same N; eager_limit: the
    one the measured run used."""
    s = cal["server"]
    msg = cal["message_bytes_measured"] or cal["message_bytes_formula"]
    return {"a_s": 0.0, "b_s": s["compute_s"] / max(s["images_per_step"], 1), "batch": batch,
            "client_s": cal["client_own_step_s"], "host_s": s["recv_per_client_s"], "message_bytes": msg,
            "latency_msgs": link_model.latency_msgs(msg - link_model.HEADER_BYTES, eager_limit),
            "server_speedup": 1.0, "client_speedup": 1.0}


def handshake(link: dict, p: dict, bw_gbit: float, lat_us: float) -> float:
    """What a rendezvous costs beyond the model's 2 latencies and wire time, from the per-message
    probe: a rendezvous message's receive less an eager one's on the same link (that one had landed)."""
    m = link["messages"]
    extra = m["Open MPI default"]["p50_s"] - m["run"]["p50_s"]
    return max(0.0, extra - 2 * lat_us * 1e-6 - p["message_bytes"] / (bw_gbit * 1e9 / 8))


def compare(run: dict, p: dict, n: int, bw_gbit: float, lat_us: float) -> dict:
    pred = link_model.project(p, n, bw_gbit, lat_us)
    s = run["server"]
    comm = s["recv_s"] + s["wait_s"]  # the server's step less its compute and io: what the link and clients cost
    pred_comm = pred["step_s"]["pipelined"] - pred["compute_s"]
    return {"bandwidth_gbit": bw_gbit, "latency_us": lat_us, "pred_step_s": pred["step_s"]["pipelined"],
            "pred_recv_s": pred["recv_s"], "pred_comm_s": pred_comm, "pred_compute_s": pred["compute_s"],
            "pred_client_s": pred["client_s"],
            "pred_wire_s": pred["wire_s"], "pred_latency_s": pred["latency_s"], "pred_host_s": pred["host_s"],
            "meas_step_s": s["step_s"], "meas_comm_s": comm, "meas_recv_s": s["recv_s"], "meas_wait_s": s["wait_s"],
            "meas_compute_s": s["compute_s"], "meas_cadence_s": s.get("cadence_s", float("nan")),
            "bottleneck": pred["bottleneck"],
            "ratio_step": pred["step_s"]["pipelined"] / s["step_s"],
            "ratio_comm": pred_comm / comm if comm > 0 else float("nan")}


def previous_comm(c: dict, n: int) -> float:
    """The communication the model predicted before it told eager from rendezvous payloads: every
    message on the server's path with its wire time and 2 latencies (header, payload)."""
    recv = c["pred_wire_s"] + n * 2 * c["latency_us"] * 1e-6 + c["pred_host_s"]
    return max(c["pred_client_s"] - c["pred_compute_s"], recv)


def own_compute_ratio(c: dict) -> float:
    """The model's pipelined step with the run's own measured compute in place of the calibration's,
    over the measured step: the link model alone, without what the shared cores did to compute."""
    return max(c["pred_client_s"], c["pred_recv_s"] + c["meas_compute_s"], c["pred_wire_s"]) / c["meas_step_s"]


def row(setting, n, protocol, label, c):
    err = abs(c["pred_comm_s"] - c["meas_comm_s"]) / c["meas_step_s"]
    prev = (f"{previous_comm(c, n) * 1e3:.1f}" if protocol == "eager" else
            f"{c['probe_model_comm_s'] * 1e3:.1f}" if "probe_model_comm_s" in c else "")
    return [setting, n, protocol, label, f"{c['bandwidth_gbit']:g}", f"{c['latency_us']:.0f}",
            f"{c['meas_step_s'] * 1e3:.1f}", f"{c['meas_cadence_s'] * 1e3:.1f}" if "meas_cadence_s" in c else "",
            f"{c['pred_step_s'] * 1e3:.1f}", f"{c['ratio_step']:.2f}", f"{own_compute_ratio(c):.2f}",
            f"{c['meas_comm_s'] * 1e3:.1f}", f"{c['pred_comm_s'] * 1e3:.1f}", f"{c['ratio_comm']:.2f}",
            f"{err * 100:.1f}%", prev, c["bottleneck"]]


def markdown(rec: dict) -> str:
    ms = lambda v: f"{v * 1e3:.1f}"  # noqa: E731
    rows, links, recv = [], [], []
    for st in rec["settings"]:
        lk = st["link"]
        msgs = lk.get("messages", {})
        links.append([st["name"], f"{lk['rtt_min_us']:.0f}", f"{lk['rtt_p50_us']:.0f}", f"{lk['tcp_mbit_s']:.0f}"]
                     + [f"{msgs[k]['p50_s'] * 1e3:.2f}" if k in msgs else "" for k in ("run", "Open MPI default")])
        for r in st["runs"]:
            for label in ("nominal", "probed"):
                c = r.get(label)
                if c is None:
                    continue
                rows.append(row(st["name"], r["n_clients"], "eager", label, c))
            if r.get("rendezvous_failed"):
                rows.append([st["name"], r["n_clients"], "rendezvous", "(run failed: see the .json)"] + [""] * 12)
            rr = r.get("rendezvous")
            if rr:
                label = ("nominal" if st["rate"] != "none" else "probed") + (
                    ", rendezvous-calibrated" if rr["model"].get("calibration") == "rendezvous" else " + probe")
                rows.append(row(st["name"], r["n_clients"], "rendezvous", label, rr["model"]))
                n = r["n_clients"]
                ahead = [max(x["steps_ahead"].values()) if x.get("steps_ahead") else "" for x in (r, rr)]
                recv.append([st["name"], n, r.get("steps", rec["steps"]), f"{r['server']['recv_per_client_s'] * 1e3:.2f}",
                             f"{rr['server']['recv_per_client_s'] * 1e3:.2f}",
                             f"{rr['server']['recv_per_client_s'] / r['server']['recv_per_client_s']:.0f}",
                             ms(r["server"]["step_s"]), ms(rr["server"]["step_s"]), *ahead])
    md = ["# multihost: the projection checked over emulated hosts", "",
          f"Command: `{rec['command']}`  ", f"Elapsed: {rec['elapsed_s']:.0f} s", "",
          "## Machine", "", common.machine_md(rec["machine"]), "",
          "## Links as probed (host 2 -> host 1)", "",
          common.table(["setting", "RTT min us", "RTT p50 us", "TCP stream Mbit/s", "one message, run's eager "
                        "limit, ms", "one message, Open MPI's 64 KiB limit, ms"], links), "",
          "One message: bench/link_probe.py, the receive (p50 of 10) of one training payload "
          f"({rec.get('payload_bytes', 0):,} bytes + header) that waited while the receiver stayed out of MPI "
          "for 0.3 s, with the eager limit the runs set (run.tcp_eager) and with Open MPI's default "
          "(a rendezvous).", "",
          "## Server step and communication, measured and predicted", "",
          "`eager`: the run as it starts by default (run.tcp_eager: one batch fits the eager limit); "
          "`rendezvous`: the same run right after with run.tcp_eager=false (Open MPI's 64 KiB limit). "
          "`nominal`: the model given the setting's rate and delay; `probed`: the probed TCP rate and half "
          "the probed round trip. Eager rows take compute and host cost per message from the unshaped eager "
          "run at the same N; `rendezvous-calibrated` rows from the unshaped rendezvous run at the same N "
          "(its compute, slowed by clients polling with a send in flight on the shared cores, and its "
          "receive per client, which holds the handshake over a veth), the link adding the wire and 2 "
          "latencies per message; `+ probe`: eager calibration plus the rendezvous handshake from the "
          "per-message probe (a rendezvous message's receive less an eager one's, less 2 latencies and wire). "
          "step = the server's step, median over steps after warm-up; cadence = the median interval between "
          "its step starts (the step plus the stop vote and flushes between steps). "
          "`pred/meas, run's compute`: the same prediction with the run's own measured compute in place "
          "of the unshaped run's (the hosts share 2 cores, and what else runs on them, delay helpers "
          "and clients training beside the server, moves the server's compute; no link does that). "
          "comm = the server's recv + wait phases (medians over steps after warm-up); the prediction's comm "
          "is its pipelined step less its compute; `comm error` is |predicted - measured comm| as a share of "
          "the measured step (a ratio of two tenths of a millisecond says little); `previous model`: what "
          "the model predicted before it told eager payloads (latency hidden, wire beside the compute) "
          "from rendezvous ones (every message's wire and 2 latencies on the server's path); for "
          "rendezvous rows, the `+ probe` model's comm.", "",
          common.table(["setting", "N", "protocol", "model link", "Gbit/s", "lat us", "step ms", "cadence ms", "pred ms",
                        "pred/meas", "pred/meas, run's compute", "comm ms", "pred comm ms", "pred/meas", "comm error / step",
                        "previous model comm ms", "bottleneck (pred)"], rows), "",
          "## The server's receive per client, eager against rendezvous (side by side)", "",
          common.table(["setting", "N", "steps", "eager recv/client ms", "rendezvous recv/client ms", "ratio",
                        "eager step ms", "rendezvous step ms", "eager: steps ahead (max)",
                        "rendezvous: steps ahead (max)"], recv) if recv else "(rendezvous runs off)", "",
          "Steps ahead: the most training steps a client had completed beyond the server's, at its step "
          "ends (bench/run_ahead.py's measure). Training batches go by synchronous send "
          "(train.sync_sends), so it is at most train.max_in_flight + 1 = 3 with either protocol.", "",
          "Runs: " + "; ".join(f"`{r['command']}`" for st in rec["settings"][:1] for r in st["runs"][:1]) +
          " (and the same with other -n and link settings).", ""]
    md += rec.get("notes", [])
    return "\n".join(md)


def report(n: int, label: str, c: dict, wall: float) -> None:
    print(f"  N={n} {label}: step {c['meas_step_s'] * 1e3:.1f} ms, predicted {c['pred_step_s'] * 1e3:.1f} ms "
          f"(x{c['ratio_step']:.2f}); comm {c['meas_comm_s'] * 1e3:.1f} ms, predicted "
          f"{c['pred_comm_s'] * 1e3:.1f} ms; recv/client {c['meas_recv_s'] / n * 1e3:.2f} ms ({wall:.0f} s)",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="2,4,8")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--steps-wire", type=int, default=30,
                    help="steps at 10 Mbit/s and below, where the wire dominates: a short run's medians come "
                         "from its last steps, whose batches crossed during earlier ones")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="2 and 4 clients, unshaped and 10mbit, 8 steps each")
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    ap.add_argument("--calibration", default="", metavar="JSON",
                    help="take the unshaped runs from this earlier record instead of running them")
    ap.add_argument("--rendezvous", action=argparse.BooleanOptionalAction, default=True,
                    help="also run each N with run.tcp_eager=false (Open MPI's 64 KiB limit: a rendezvous per batch)")
    ap.add_argument("--out", default="multihost")
    ap.add_argument("--render", default="", metavar="JSON", help="only rewrite the .md of this record")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            rec = json.load(fh)
        print("wrote", *common.write(args.out, rec, markdown(rec)))
        return
    if os.geteuid() != 0:
        raise SystemExit("multihost: needs root (network namespaces)")
    clients = [int(v) for v in args.clients.split(",")]
    settings = SETTINGS
    if args.quick:
        clients, settings, args.steps, args.steps_wire = [2, 4], [SETTINGS[0], SETTINGS[3]], 8, 8
    if args.only:
        settings = [s for s in SETTINGS if s[0] in args.only.split(",")]
    cal, cal_rndv = {}, {}
    if args.calibration:
        with open(args.calibration) as fh:
            earlier = json.load(fh)
        cal = {r["n_clients"]: r for st in earlier["settings"] if st["rate"] == "none" for r in st["runs"]}
        cal_rndv = {n: r["rendezvous"] for n, r in cal.items() if r.get("rendezvous")}
        if args.batch_size != earlier["batch_size"] or args.steps != earlier["steps"]:
            raise SystemExit("--calibration: the earlier record used other --batch-size/--steps")
    missing = [n for n in clients if n not in cal and not any(s[1] == "none" for s in settings)]
    if missing:
        raise SystemExit(f"no unshaped run for N = {missing}: include the unshaped setting or --calibration")
    cfg = Config()
    cfg.train.batch_size = args.batch_size
    payload = mpi_params.message_bytes(cfg) - comm.HEADER_BYTES  # the runs' training payload
    eager_run = max(OMPI_EAGER, mpi_params.eager_limit(cfg))
    t0 = time.perf_counter()
    machine = common.machine()

    def save(settings_done):
        rec = {"benchmark": "multihost", "command": common.command(), "machine": machine,
               "settings": settings_done, "clients": clients, "payload_bytes": payload,
               "eager_limit_run": eager_run, "calibration": args.calibration, "steps": args.steps,
               "steps_wire": args.steps_wire,
               "batch_size": args.batch_size, "elapsed_s": time.perf_counter() - t0}
        return common.write(args.out, rec, markdown(rec))

    cluster("down", check=False)
    cluster("up", str(max(clients) + 1))
    tmp = tempfile.mkdtemp(prefix="cf-multihost-")
    out = []
    try:
        for name, rate, delay, bw, lat in settings:
            cluster("shape", rate, f"{delay}us")
            link = probe_link()
            link["messages"] = probe_messages(payload, {"run": eager_run, "Open MPI default": OMPI_EAGER})
            print(f"{name}: rtt min {link['rtt_min_us']:.0f} us, tcp {link['tcp_mbit_s']:.0f} Mbit/s, one message "
                  + ", ".join(f"{k} {v['p50_s'] * 1e3:.2f} ms" for k, v in link["messages"].items()), flush=True)
            runs = []
            steps = args.steps_wire if bw is not None and bw <= 0.01 else args.steps
            for n in clients:
                r = run_cli(n, steps, args.batch_size, os.path.join(tmp, f"{name}-n{n}.h5"))
                if rate == "none":
                    cal[n] = r
                p = model_params(cal[n], n, args.batch_size, r["eager_limit"])
                probed_bw, probed_lat = link["tcp_mbit_s"] / 1e3, link["rtt_p50_us"] / 2
                if bw is not None:
                    r["nominal"] = compare(r, p, n, bw, lat)
                r["probed"] = compare(r, p, n, probed_bw, probed_lat)
                report(n, "eager", r.get("nominal") or r["probed"], r["wall_s"])
                if args.rendezvous:  # the same run with Open MPI's own limit, right after: side by side
                    try:
                        rr = run_cli(n, steps, args.batch_size, os.path.join(tmp, f"{name}-n{n}-rndv.h5"),
                                     ["--set", "run.tcp_eager=false"])
                    except RunFailed as exc:  # kept in the record, and the bench goes on
                        r["rendezvous_failed"] = str(exc)[-3000:]
                        print(f"  N={n} rendezvous: FAILED, recorded", flush=True)
                        runs.append(r)
                        continue
                    if rate == "none":
                        cal_rndv[n] = rr
                    m_bw, m_lat = (bw, lat) if bw is not None else (probed_bw, probed_lat)
                    pr = dict(p, latency_msgs=link_model.latency_msgs(payload, rr["eager_limit"]),
                              handshake_s=handshake(link, p, m_bw, m_lat))
                    probe_model = compare(rr, pr, n, m_bw, m_lat)
                    if n in cal_rndv:
                        # calibrated on the unshaped rendezvous run at the same N: its compute (slowed by
                        # clients polling on the shared cores) and its receive per client (the handshake
                        # over a veth); the link adds the wire and 2 latencies per message
                        rr["model"] = compare(rr, model_params(cal_rndv[n], n, args.batch_size, rr["eager_limit"]),
                                              n, m_bw, m_lat)
                        rr["model"]["calibration"] = "rendezvous"
                    else:
                        rr["model"] = dict(probe_model, calibration="eager + probe")
                    rr["model"]["probe_model_comm_s"] = probe_model["pred_comm_s"]
                    rr["model"]["probe_model_step_s"] = probe_model["pred_step_s"]
                    rr["model"]["handshake_s"] = pr["handshake_s"]
                    r["rendezvous"] = rr
                    report(n, "rendezvous", rr["model"], rr["wall_s"])
                runs.append(r)
            out.append({"name": name, "rate": rate, "delay_us": delay, "link": link, "runs": runs})
            save(out)  # after each setting: a later failure keeps what was measured
    finally:
        cluster("down", check=False)
    print("wrote", *save(out))


if __name__ == "__main__":
    main()
