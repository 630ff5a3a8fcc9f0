"""Scaling projection, on paper: step time and server load at 64..1024 clients and 10..400 Gbit/s.

    python bench/projection.py                          # ~3 min on 2 cores; writes bench/results/projection.{json,md}
    python bench/projection.py --quick                  # smoke test (~1 min; writes the same files)
    python bench/projection.py --results a.h5 b.h5 --out projection-mycluster
                                                        # project from results files made on your cluster, run nothing
    python bench/projection.py --results a.h5 --server-speedup 20 --client-speedup 1 --out projection-gpu20

Inputs. By default it runs the real command line, one after the other,
    mpirun -n 3 --oversubscribe python -m collafuse_mpi.run --steps 40 --batch-size 32 --quiet -o <tmp>/n3.h5
and the same with -n 5 (2 and 4 clients), reads both files with `collafuse_mpi.results.read`, and
times the server's and a client's training step directly in this one process (`--direct`): the
package's own `UNet(channels, preset, cut_conditioned=True)` and `training.Learner` on fused
batches of 1, 2, 4, 8, 16 client batches, unpack + concatenation of the client messages included,
and a client's `UNet(..., cut_conditioned=False)` step with its noise draws and message packing.
The direct timings are the default source ("auto"): in the MPI runs 3 or 5 ranks share 2 cores, so
their per-phase times carry that contention. With --results FILE.h5 ... nothing is run and, unless
--direct is given, the files' own per-phase times are the source: that is how a cluster's numbers
are projected (the model, sizes and batch are taken from the files' config).

What is derived, per results run (warm-up steps excluded, medians over steps):
    server compute/step = step - wait - recv - io   (unpack, concat, forward, backward, optimizer)
    server recv/client  = recv phase / clients      (host cost of taking one message off MPI)
    client own step     = step - wait - io          (what a client needs when it never waits;
                          over M for a rank hosting M logical clients, run.clients_per_rank, loop runs only)
    message bytes       = train_batch bytes sent / messages, from a client's comm table
                          (= B*(2*C*H*W+1)*4 payload + 96 header bytes, sent as 2 MPI messages)
and the server compute is fitted as a + b * n_images (least squares over the runs' medians, or
over the direct timings); with one fused size only, a = 0 and b = time / images.

The model, for N clients, a link of bandwidth BW and one-way latency L per MPI message:
    compute(N) = (a + b * N * B) / server_speedup
    wire(N)    = N * bytes/BW                        one server NIC, messages serialised on it
    eager      the payload fits the eager limit (--eager-limit; the package raises Open MPI's TCP
               limit to hold one message up to 4 MiB, run.tcp_eager): a message lands while the
               server computes, so the server's receive costs it only the host cost, and the
               latency is hidden: recv(N) = N * host, and the NIC runs beside the compute
    rendezvous the payload is above it: the data moves only once the server, done computing, has
               answered, client after client: recv(N) = N * (bytes/BW + 2 L + handshake + host)
               (2 L: the answer and the data; handshake: what a link costs beyond that, measured
               by bench/link_probe.py, --handshake-us; 0 by default)
    host       = server recv/client measured above (0 with --host-overhead-us 0)
    client     = client own step / client_speedup        (clients run in parallel, one device each)
    serial     step = client + wire + N * latencies + N * host + compute    no overlap at all
    pipelined  step = max(client, recv + compute, wire)  the package: clients keep max_in_flight
                                                          batches ahead; the server receives, then computes
    overlapped step = max(client, recv, compute, wire)   the server also took in step s+1's messages
                                                          while computing step s
    server utilisation = compute / step; NIC utilisation = wire / step;
    saturation: the largest N with recv + compute <= client and wire <= client (pipelined), i.e.
    the server is not the bottleneck; beyond it every added client lengthens every step.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import common

from collafuse_mpi import mpi_params, results  # noqa: E402
from collafuse_mpi.harness import PHASES  # noqa: E402

CLIENTS = (64, 128, 256, 512, 1024)
BANDWIDTHS_GBIT = (10, 25, 100, 200, 400)
# One-way MPI small-message latency assumed per link (microseconds): TCP over 10/25 GbE,
# RDMA (InfiniBand EDR/HDR/NDR or RoCE) at 100/200/400 Gbit/s. Override with --latency-us.
LATENCY_US = {10: 25.0, 25: 15.0, 100: 2.0, 200: 1.5, 400: 1.5}
HEADER_BYTES = 96  # comm.HEADER_LEN int64s, sent as its own message
SPEEDUPS = (1, 10, 100, 1000)
P = {p: i for i, p in enumerate(PHASES)}


# ----------------------------------------------------------------------------- measurements

def run_cli(n_ranks: int, steps: int, batch: int, output: str) -> tuple[str, float]:
    cmd = common.mpirun(n_ranks) + [sys.executable, "-m", "collafuse_mpi.run", "--steps", str(steps),
                                    "--batch-size", str(batch), "--quiet", "-o", output]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.REPO, env=common.mpi_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    shown = " ".join(common.mpirun(n_ranks) + ["python"] + cmd[len(common.mpirun(n_ranks)) + 1:])
    return shown, wall


def analyse_run(name: str, run: dict, path: str) -> dict:
    """One run group of a results file: what the model needs, medians over non-warm-up steps."""
    cfg = run["config"]
    ranks = run["ranks"]
    if 0 not in ranks or not any(r.get("role") == "client" for r in ranks.values()):
        raise SystemExit(f"{path}:{name}: needs the server (rank 0) and at least one client's rank data")
    batch = int(cfg["train"]["batch_size"])

    def rows(rk):
        keep = ~np.asarray(rk["warmup"], dtype=bool)
        ps = np.asarray(rk["phase_seconds"]).reshape(-1, len(PHASES))[keep]
        step = (np.asarray(rk["step_end"]) - np.asarray(rk["step_start"]))[keep]
        return ps, step, np.asarray(rk["images"])[keep]

    ps, step, images = rows(ranks[0])
    if step.size == 0 or not np.median(images):
        print(f"projection: skipping {path}:{name}: the server has no non-warm-up training steps", file=sys.stderr)
        return None
    senders = int(np.median(images)) // batch
    compute = np.clip(step - ps[:, P["wait"]] - ps[:, P["recv"]] - ps[:, P["io"]], 0, None)
    fbo = ps[:, P["forward"]] + ps[:, P["backward"]] + ps[:, P["optimizer"]]
    starts = np.asarray(ranks[0]["step_start"])[~np.asarray(ranks[0]["warmup"], dtype=bool)]
    server = {"images_per_step": int(np.median(images)), "senders": senders, "steps_used": int(step.size),
              "step_s": float(np.median(step)), "compute_s": float(np.median(compute)),
              # between step starts: the step plus what lies between steps (stop vote, flush)
              "cadence_s": float(np.median(np.diff(starts))) if starts.size > 1 else float("nan"),
              "forward_backward_optimizer_s": float(np.median(fbo)),
              "recv_s": float(np.median(ps[:, P["recv"]])), "wait_s": float(np.median(ps[:, P["wait"]])),
              "recv_per_client_s": float(np.median(ps[:, P["recv"]])) / max(senders, 1),
              "device": str(ranks[0].get("device", ""))}
    clients, msg = [], []
    # a rank hosting M logical clients steps them one after another (train.batched_clients off):
    # one client's own step is the rank's over M, the step the model gives each client its own device
    per_rank = int(run.get("clients_per_rank", cfg["run"].get("clients_per_rank", 1)) or 1)
    if cfg["train"].get("batched_clients") and per_rank > 1:
        raise SystemExit(f"{path}:{name}: batched logical clients share one step; project from loop runs")
    for r, rk in sorted(ranks.items()):
        if rk.get("role") != "client":
            continue
        ps, step, _ = rows(rk)
        if step.size == 0:
            continue
        own = (step - ps[:, P["wait"]] - ps[:, P["io"]]) / per_rank
        comp = sum(ps[:, P[p]] for p in ("data", "noise", "forward", "backward", "optimizer")) / per_rank
        clients.append({"rank": r, "step_s": float(np.median(step)), "own_step_s": float(np.median(own)),
                        "compute_s": float(np.median(comp)), "wait_s": float(np.median(ps[:, P["wait"]])),
                        "send_s": float(np.median(ps[:, P["send"]])), "device": str(rk.get("device", ""))})
        c = rk.get("comm", {})
        if len(c.get("bytes", [])):
            sel = (np.asarray(c["direction"]) == "sent") & (np.asarray(c["kind"]) == "train_batch")
            if sel.any() and np.asarray(c["messages"])[sel].sum() > 0:
                msg.append(float(np.asarray(c["bytes"])[sel].sum() / np.asarray(c["messages"])[sel].sum()))
    d = cfg["data"]
    formula = batch * (2 * d["channels"] * d["image_size"] ** 2 + 1) * 4 + HEADER_BYTES
    hosts = list(run.get("hosts", []) or [])
    return {
        "file": os.path.abspath(path), "run": name, "n_clients": int(run.get("n_clients", len(ranks) - 1)),
        "clients_per_rank": per_rank,
        "world_size": int(run.get("world_size", len(ranks))), "hosts": sorted(set(hosts)),
        "ranks_per_host_max": max((hosts.count(h) for h in set(hosts)), default=0),
        "command": run.get("command", ""), "timing_mode": run.get("timing_mode", ""),
        "config": {"preset": cfg["model"]["preset"], "channels": d["channels"], "image_size": d["image_size"],
                   "batch_size": batch, "timesteps": cfg["diffusion"]["timesteps"],
                   "schedule": cfg["diffusion"]["schedule"], "cut": cfg["diffusion"]["cut"],
                   "client_cuts": cfg["diffusion"].get("client_cuts", []),
                   "max_in_flight": cfg["train"]["max_in_flight"], "lr": cfg["train"]["lr"],
                   "ema_decay": cfg["train"]["ema_decay"], "grad_clip": cfg["train"]["grad_clip"],
                   "dropout": cfg["model"].get("dropout", 0.0),
                   "torch_threads": cfg["run"].get("torch_threads", 1)},
        "server": server, "clients": clients,
        "client_own_step_s": float(np.mean([c["own_step_s"] for c in clients])),
        "client_compute_s": float(np.mean([c["compute_s"] for c in clients])),
        "message_bytes_measured": float(np.mean(msg)) if msg else None,
        "message_bytes_formula": int(formula),
    }


def load_runs(files: list[str]) -> list[dict]:
    runs = []
    for f in files:
        try:
            data = results.read(f)
        except results.ResultsError as exc:
            raise SystemExit(f"projection: {exc}") from None
        for name, run in data["runs"].items():
            if run.get("ranks"):
                r = analyse_run(name, run, f)
                if r is not None:
                    runs.append(r)
    if not runs:
        raise SystemExit("projection: no run with rank data in " + ", ".join(files))
    shapes = {(r["config"]["preset"], r["config"]["channels"], r["config"]["image_size"], r["config"]["batch_size"])
              for r in runs}
    if len(shapes) > 1:
        raise SystemExit(f"projection: the runs differ in (preset, channels, image size, batch): {sorted(shapes)}; "
                         "project one model at a time")
    return runs


def fit_linear(x, y) -> dict:
    """y = a + b*x by least squares; with one distinct x, a = 0 and b = mean(y/x) (say so)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(x.tolist())) >= 2:
        b, a = np.polyfit(x, y, 1)
        if b > 0:
            pred = a + b * x
            ss = float(((y - y.mean()) ** 2).sum())
            r2 = 1 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
            return {"a_s": float(a), "b_s_per_image": float(b), "kind": "least squares", "r2": r2,
                    "points": [[float(u), float(v)] for u, v in zip(x, y)]}
    b = float(np.mean(y / x))
    return {"a_s": 0.0, "b_s_per_image": b, "kind": "proportional (one fused size, or a non-positive slope): a = 0",
            "r2": None, "points": [[float(u), float(v)] for u, v in zip(x, y)]}


class NullTimer:
    @staticmethod
    def phase(name):
        return contextlib.nullcontext()

    @staticmethod
    def add_flops(name, flops):
        pass


def direct_timing(c: dict, client_counts: list[int], iters: int, warmup: int, threads: int, device: str) -> dict:
    """Server step on fused batches of n client messages, and one client step, timed in this process."""
    import torch

    from collafuse_mpi import schedule
    from collafuse_mpi.config import cut_to_k
    from collafuse_mpi.model import UNet, n_params
    from collafuse_mpi.training import Learner, pack_train, unpack_train

    torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    T, B, C, S = c["timesteps"], c["batch_size"], c["channels"], c["image_size"]
    k = cut_to_k(c["cut"], T)
    k = min(max(k, 1), T - 1)  # both sides need a part to be timed
    sched = schedule.Schedule(T, c["schedule"])
    g = torch.Generator().manual_seed(0)
    shape = (C, S, S)

    def learner(cut_conditioned):
        torch.manual_seed(0)
        m = UNet(C, c["preset"], cut_conditioned, c.get("dropout", 0.0)).to(dev)
        return Learner(m, c["lr"], c["ema_decay"], c["grad_clip"])

    def message():
        x0 = torch.rand((B, *shape), generator=g) * 2 - 1
        x_t, t, eps = schedule.server_message(sched, x0, k, g)
        return pack_train(x_t, eps, t)

    server, out = learner(True), {"device": str(dev), "threads": threads, "k": k, "server": {}}
    out["server_params"], pool = n_params(server.model), [message() for _ in range(max(client_counts))]
    for n in client_counts:
        msgs = pool[:n]

        def server_step():
            xs, ts, es = [], [], []
            for p in msgs:
                x_t, eps_s, t = unpack_train(p.to(dev), shape)
                xs.append(x_t)
                ts.append(t)
                es.append(eps_s)
            x_t, t, eps_s = torch.cat(xs), torch.cat(ts), torch.cat(es)
            server.step(NullTimer, eps_s, x_t, t, torch.full_like(t, k))
            sync()

        samples = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            server_step()
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        out["server"][n] = {"images": n * B, **common.pct(samples), "samples_s": samples}
        print(f"  direct: server step, {n} client batches ({n * B} images): "
              f"{np.median(samples) * 1e3:.1f} ms", flush=True)
    client = learner(False)
    out["client_params"] = n_params(client.model)

    def client_step():
        x0 = (torch.rand((B, *shape), generator=g) * 2 - 1).to(dev)
        x_t, t, eps = schedule.client_target(sched, x0, k, g)
        loss = client.step(NullTimer, eps, x_t, t.to(dev))
        x_s, t_s, eps_s = schedule.server_message(sched, x0, k, g)
        pack_train(x_s, eps_s, t_s.to(dev))
        float(loss)
        sync()

    samples = []
    for i in range(warmup + max(10, 2 * iters)):
        t0 = time.perf_counter()
        client_step()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    out["client"] = {"images": B, **common.pct(samples), "samples_s": samples}
    print(f"  direct: client step ({B} images): {np.median(samples) * 1e3:.1f} ms", flush=True)
    out["fit"] = fit_linear([v["images"] for v in out["server"].values()],
                            [v["p50"] for v in out["server"].values()])
    return out


# ----------------------------------------------------------------------------- the model

def latency_msgs(payload_bytes: float, eager_limit: int) -> int:
    """One-way latencies per client message on the server's path: none when the payload goes
    eagerly (it lands while the server computes), 2 for a rendezvous (the server's answer, then
    the data), which starts only when the server reaches its receive."""
    return 0 if payload_bytes <= eager_limit else 2


def _per_message(p: dict, bw_gbit: float, lat_us: float) -> tuple[float, float, bool]:
    """(wire seconds, latency seconds incl. a measured handshake, eager) per client message."""
    wire = p["message_bytes"] / (bw_gbit * 1e9 / 8)
    eager = p["latency_msgs"] == 0
    lat = 0.0 if eager else p["latency_msgs"] * lat_us * 1e-6 + p.get("handshake_s", 0.0)
    return wire, lat, eager


def project(p: dict, n: int, bw_gbit: float, lat_us: float) -> dict:
    """All model quantities for n clients on one link; p holds the derived parameters (seconds, bytes)."""
    wire_each, lat_each, eager = _per_message(p, bw_gbit, lat_us)
    wire = n * wire_each
    recv = n * p["host_s"] + (0.0 if eager else wire + n * lat_each)  # on the server's path
    compute = (p["a_s"] + p["b_s"] * n * p["batch"]) / p["server_speedup"]
    client = p["client_s"] / p["client_speedup"]
    server = recv + compute
    steps = {"serial": client + wire + n * (lat_each + p["host_s"]) + compute,
             "pipelined": max(client, server, wire), "overlapped": max(client, recv, compute, wire)}
    out = {"clients": n, "bandwidth_gbit": bw_gbit, "latency_us": lat_us, "fused_images": n * p["batch"],
           "bytes_in_per_step": n * p["message_bytes"], "eager": eager, "wire_s": wire,
           "latency_s": n * lat_each, "host_s": n * p["host_s"], "recv_s": recv, "compute_s": compute,
           "server_s": server, "client_s": client, "step_s": steps}
    out["server_utilisation"] = {k: compute / v for k, v in steps.items()}
    out["server_busy"] = {k: min(1.0, (server if k != "overlapped" else max(recv, compute)) / v)
                          for k, v in steps.items()}
    out["nic_utilisation"] = {k: wire / v for k, v in steps.items()}
    out["ingress_gbit_s"] = {k: n * p["message_bytes"] * 8 / v / 1e9 for k, v in steps.items()}
    if max(server, wire) <= client:
        out["bottleneck"] = "clients"
    elif wire > server:
        out["bottleneck"] = "server NIC"
    else:
        out["bottleneck"] = "server compute" if compute >= recv else "server receive"
    # server compute speed-up over the measured one for the pipelined step to equal the client step
    spare = client - recv
    out["server_speedup_needed"] = (compute * p["server_speedup"] / spare) if spare > 0 and wire <= client \
        else math.inf
    return out


def saturation(p: dict, bw_gbit: float, lat_us: float, server_speedup: float | None = None) -> dict:
    """Largest N for which the server keeps up with the clients (closed form, linear model)."""
    s = p["server_speedup"] if server_speedup is None else server_speedup
    client = p["client_s"] / p["client_speedup"]
    a, b = p["a_s"] / s, p["b_s"] * p["batch"] / s  # compute = a + b*N
    wire_each, lat_each, eager = _per_message(p, bw_gbit, lat_us)
    r = p["host_s"] + (0.0 if eager else wire_each + lat_each)  # recv = r*N
    wire_only = wire_each + lat_each

    def floor_n(x):
        return max(0, int(math.floor(x + 1e-9))) if math.isfinite(x) else None

    nic = floor_n(client / wire_each)  # the NIC carries N messages per client step
    pipelined = min(floor_n((client - a) / (b + r)), nic)
    compute_only = floor_n((client - a) / b)
    receive_only = floor_n(client / r) if r > 0 else None
    overlapped = min(v for v in (compute_only, receive_only, nic) if v is not None)
    return {"bandwidth_gbit": bw_gbit, "latency_us": lat_us, "server_speedup": s,
            "n_max_pipelined": pipelined, "n_max_overlapped": overlapped,
            "n_max_compute_only": compute_only, "n_max_receive_only": receive_only,
            "n_max_nic_only": floor_n(client / wire_only)}


# ----------------------------------------------------------------------------- output

def t_str(s: float) -> str:
    if not math.isfinite(s):
        return "inf"
    if s < 0:
        return "-" + t_str(-s)
    if s >= 10:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def n_str(v) -> str:
    return "none" if v is None else ("0 (< 1)" if v == 0 else f"{v:,}")


def x_str(v: float) -> str:
    return "∞ (recv > client step)" if not math.isfinite(v) else (f"{v:.2g}x" if v < 10 else f"{v:,.0f}x")


def assumptions(p: dict, source: str) -> list[str]:
    return [
        f"Compute times come from `{source}` measurements on the machine in the header "
        f"({p['compute_device']}). **CPU-measured compute is not GPU compute**: a GPU runs this UNet "
        "one to three orders of magnitude faster and is far from linear in batch size at small batches. "
        "Use `--server-speedup S` (and `--client-speedup`) for hardware you did not measure, or better, "
        "measure it: run the CLI on your cluster and pass `--results FILE.h5 ...`; every number here "
        "scales with what is measured.",
        f"Server compute is linear in the fused batch: a + b*n_images with a = {t_str(p['a_s'])}, "
        f"b = {t_str(p['b_s'])}/image (fit: {p['fit_kind']}" + (
            f"; its intercept {t_str(p['a_fit_s'])} is clamped to 0, the per-image cost grew with the batch"
            if p["a_fit_s"] < 0 else "") + f"), extrapolated from at most "
        f"{p['max_measured_images']} images to {max(p['clients']) * p['batch']:,}. Memory is not modelled: "
        "a fused batch that does not fit would have to be split (more steps, not fewer seconds).",
        f"Client step = {t_str(p['client_s'])} (its own step with no waiting), the same for every client, "
        "each client on its own hardware, so clients run fully in parallel and do not slow as N grows.",
        f"One server NIC receives every message, one after the other (incast, no switch limits beyond "
        f"that): per client and step {p['message_bytes']:,.0f} bytes (a {HEADER_BYTES}-byte header and the "
        f"payload, 2 MPI messages) and a host cost of {t_str(p['host_s'])} per message ({p['host_source']}). "
        "Bandwidth is the nominal link rate; MPI usually reaches 85-95% of it.",
        (f"The payload fits the {p['eager_limit']:,}-byte eager limit ({p['eager_source']}): it lands while "
         "the server computes, so latency is hidden and the NIC's wire time runs beside the compute; only "
         "the host cost is on the server's path." if p["latency_msgs"] == 0 else
         f"The payload exceeds the {p['eager_limit']:,}-byte eager limit ({p['eager_source']}): each message "
         "waits for the server's answer once the server reaches its receive, so every client costs the "
         f"server 2 latencies, its wire time and a handshake of {t_str(p['handshake_s'])} "
         "(--handshake-us; bench/link_probe.py measures it), one client after another."),
        "Latencies per link are typical one-way MPI latencies (" +
        ", ".join(f"{b:g} Gbit/s: {l:g} µs" for b, l in p["latency_table"].items()) +
        "); `--latency-us` overrides them.",
        "Pipelined (what the package does: clients keep up to train.max_in_flight batches in flight, the "
        "server receives all N then computes) is the headline. Overlapped assumes the server also takes "
        "in step s+1's messages while computing step s; for eager payloads the two differ only by the host "
        "cost. Serial is the no-overlap upper bound.",
        "Nothing else is modelled: no sampling, metrics or checkpoint phases, no stragglers or jitter, "
        "no contention between clients on shared switches, no GPU-direct or compression.",
    ]


def markdown(rec: dict) -> str:
    p, sat, proj = rec["parameters"], rec["saturation"], rec["projection"]
    clamped = f" (fit gave {t_str(p['a_fit_s'])}: clamped)" if p["a_fit_s"] < 0 else ""
    L = [f"# projection: step time and server load at {min(p['clients'])}-{max(p['clients'])} clients, on paper\n",
         f"Command: `{rec['command']}`\n", common.machine_md(rec["machine"]), ""]
    if rec["cli_commands"]:
        L += ["CLI runs (inputs):\n" + "\n".join(f"- `{c}` ({w:.0f} s)" for c, w in
                                                 zip(rec["cli_commands"], rec["cli_wall_s"])), ""]
    L += ["## Headline\n", *rec["headline"], ""]
    L += ["## Saturation point per bandwidth\n",
          f"Largest number of clients the server keeps up with (server receive + compute <= client step), "
          f"server speed-up {p['server_speedup']:g}x, client speed-up {p['client_speedup']:g}x:\n",
          common.table(["link", "latency", "N max, pipelined", "N max, overlapped", "compute alone",
                        "receive alone (incl. host cost)", "NIC alone (wire + latency)"],
                       [[f"{s['bandwidth_gbit']:g} Gbit/s", f"{s['latency_us']:g} µs", n_str(s["n_max_pipelined"]),
                         n_str(s["n_max_overlapped"]), n_str(s["n_max_compute_only"]),
                         n_str(s["n_max_receive_only"]), n_str(s["n_max_nic_only"])] for s in sat["main"]]), "",
          "The same (pipelined) for a server 1x, 10x, 100x, 1000x faster than measured "
          "(a GPU server against CPU-speed clients is in the 10-1000x range):\n",
          common.table(["link"] + [f"server {s:g}x" for s in SPEEDUPS],
                       [[f"{bw:g} Gbit/s"] + [n_str(row[str(s)]["n_max_pipelined"]) for s in SPEEDUPS]
                        for bw, row in sat["by_speedup"].items()]), ""]
    L += ["## Per client count and bandwidth\n",
          f"Server speed-up {p['server_speedup']:g}x, client speed-up {p['client_speedup']:g}x. "
          "recv = what the server's path pays for all N messages (host cost; with a rendezvous also wire "
          "and latency); server = recv + compute; "
          "util = server compute / step; NIC = wire time / step; 'needed' = how many times faster than measured "
          "the server's compute must be for the pipelined step to come down to the client step (∞: receiving "
          "alone already takes longer than a client step).\n",
          common.table(["clients", "link", "fused images", "MB in/step", "recv", "compute", "client",
                        "step pipelined", "step overlapped", "step serial", "server util (pipelined)",
                        "NIC util (pipelined)", "bottleneck", "needed"],
                       [[r["clients"], f"{r['bandwidth_gbit']:g} Gbit/s", f"{r['fused_images']:,}",
                         f"{r['bytes_in_per_step'] / 1e6:.1f}", t_str(r["recv_s"]), t_str(r["compute_s"]),
                         t_str(r["client_s"]), t_str(r["step_s"]["pipelined"]), t_str(r["step_s"]["overlapped"]),
                         t_str(r["step_s"]["serial"]), f"{r['server_utilisation']['pipelined'] * 100:.0f}%",
                         f"{r['nic_utilisation']['pipelined'] * 100:.2g}%", r["bottleneck"],
                         x_str(r["server_speedup_needed"])] for r in proj]), "",
          "Pipelined step time · server compute utilisation for other server speed-ups (client speed-up "
          f"{p['client_speedup']:g}x; * = the server is the bottleneck):\n"]
    for sp, rows in rec["projection_by_speedup"].items():
        L += [f"Server {float(sp):g}x faster than measured:\n", matrix(rows, p["bandwidths_gbit"]), ""]
    L += ["## Parameters derived from the measurements\n",
          common.table(["parameter", "value", "from"],
                       [["images per client batch B", p["batch"], "results config"],
                        ["model", f"{p['preset']} UNet, {p['channels']}x{p['image_size']}x{p['image_size']}",
                         "results config"],
                        ["server compute a (fixed per step)", t_str(p["a_s"]) + clamped, p["compute_source"]],
                        ["server compute b (per image)", t_str(p["b_s"]), p["compute_source"]],
                        ["client step", t_str(p["client_s"]), p["compute_source"]],
                        ["message per client per step", f"{p['message_bytes']:,.0f} bytes", p["message_source"]],
                        ["latencies per client per step", p["latency_msgs"],
                         f"eager limit {p['eager_limit']:,} B ({p['eager_source']})"],
                        ["rendezvous handshake beyond 2 latencies", t_str(p["handshake_s"]),
                         "--handshake-us" if p["handshake_s"] else "not measured (0)"],
                        ["host receive cost per message", t_str(p["host_s"]), p["host_source"]],
                        ["server / client speed-up applied",
                         f"{p['server_speedup']:g}x / {p['client_speedup']:g}x", "command line"]]),
          ""]
    if rec["runs"]:
        L += ["Per results run (medians over non-warm-up steps; server compute = step - wait - recv - io; "
              "client own step = step - wait - io):\n",
              common.table(["file:run", "clients", "ranks/host", "fused images", "server step", "server compute",
                            "fwd+bwd+opt", "server recv/client", "server wait", "client step", "client own step",
                            "client wait", "message bytes (measured / formula)"],
                           [[f"{os.path.basename(r['file'])}:{r['run']}", r["n_clients"], r["ranks_per_host_max"],
                             r["server"]["images_per_step"], t_str(r["server"]["step_s"]),
                             t_str(r["server"]["compute_s"]), t_str(r["server"]["forward_backward_optimizer_s"]),
                             t_str(r["server"]["recv_per_client_s"]), t_str(r["server"]["wait_s"]),
                             t_str(float(np.mean([c["step_s"] for c in r["clients"]]))),
                             t_str(r["client_own_step_s"]),
                             t_str(float(np.mean([c["wait_s"] for c in r["clients"]]))),
                             f"{r['message_bytes_measured'] or float('nan'):,.0f} / {r['message_bytes_formula']:,}"]
                            for r in rec["runs"]]), "",
              f"Fit over the runs: a = {t_str(rec['fit_runs']['a_s'])}, b = {t_str(rec['fit_runs']['b_s_per_image'])}"
              f"/image ({rec['fit_runs']['kind']}).", ""]
    if rec["direct"]:
        d = rec["direct"]
        L += [f"Direct single-process timing ({d['device']}, {d['threads']} torch thread(s), k = {d['k']}; "
              f"server model {d['server_params']:,} parameters, client {d['client_params']:,}):\n",
              common.table(["client batches", "fused images", "server step P50", "P90", "samples"],
                           [[n, v["images"], t_str(v["p50"]), t_str(v["p90"]), v["n"]]
                            for n, v in d["server"].items()]
                           + [["client step", d["client"]["images"], t_str(d["client"]["p50"]),
                               t_str(d["client"]["p90"]), d["client"]["n"]]]), "",
              f"Fit: a = {t_str(d['fit']['a_s'])}, b = {t_str(d['fit']['b_s_per_image'])}/image "
              f"({d['fit']['kind']}" + (f", R² = {d['fit']['r2']:.4f}" if d["fit"]["r2"] is not None else "")
              + ").", ""]
    if rec.get("contention_note"):
        L += [rec["contention_note"], ""]
    L += ["## Assumptions\n", *[f"- {a}" for a in rec["assumptions"]], ""]
    return "\n".join(L)


def headline(p, sat, proj, bws) -> list[str]:
    by = {(r["clients"], r["bandwidth_gbit"]): r for r in proj}
    lo, hi = min(bws), max(bws)
    s_lo = next(s for s in sat["main"] if s["bandwidth_gbit"] == lo)
    s_hi = next(s for s in sat["main"] if s["bandwidth_gbit"] == hi)
    few, many = min(p["clients"]), max(p["clients"])
    r_few, r_many, r_many_lo = by[(few, hi)], by[(many, hi)], by[(many, lo)]

    def binds(s):
        c, r = s["n_max_compute_only"], s["n_max_receive_only"]
        return "compute" if r is None or (c is not None and c <= r) else "receiving"

    def needed(r):
        if math.isfinite(r["server_speedup_needed"]):
            return f"the server's compute must be {x_str(r['server_speedup_needed'])} faster than measured"
        return (f"no server speed-up suffices (receiving alone, {t_str(r['recv_s'])}, exceeds the "
                f"{t_str(r['client_s'])} client step)")

    out = [
        f"- Measured ({p['compute_source']}): server compute {t_str(p['a_s'])} + {t_str(p['b_s'])} per image, "
        f"client step {t_str(p['client_s'])}, {p['message_bytes']:,.0f} bytes per client message per step, "
        f"host receive cost {t_str(p['host_s'])} per message.",
        f"- Server speed-up {p['server_speedup']:g}x, client speed-up {p['client_speedup']:g}x: the server keeps "
        f"up with at most {n_str(s_lo['n_max_pipelined'])} clients at {lo:g} Gbit/s ({binds(s_lo)} binds first) "
        f"and {n_str(s_hi['n_max_pipelined'])} at {hi:g} Gbit/s ({binds(s_hi)} binds first).",
        f"- Pipelined step at {hi:g} Gbit/s: {t_str(r_few['step_s']['pipelined'])} with {few} clients, "
        f"{t_str(r_many['step_s']['pipelined'])} with {many} (client step {t_str(r_many['client_s'])}); server "
        f"compute is {r_many['server_utilisation']['pipelined'] * 100:.0f}% of that step, receiving "
        f"{t_str(r_many['recv_s'])} ({t_str(r_many_lo['recv_s'])} at {lo:g} Gbit/s). For {many} clients not to "
        f"wait: at {hi:g} Gbit/s {needed(r_many)}; at {lo:g} Gbit/s {needed(r_many_lo)}.",
    ]
    nic = [(s["bandwidth_gbit"], s["n_max_receive_only"], s["n_max_nic_only"]) for s in sat["main"]]
    out.append("- Even an infinitely fast server stops keeping up once receiving alone exceeds a client step: at "
               + ", ".join(f"{n_str(r)} clients at {b:g} Gbit/s" for b, r, _ in nic)
               + f" (with the {t_str(p['host_s'])}/message host cost; wire + latency alone: "
               + ", ".join(f"{n_str(w)}" for _, _, w in nic) + ").")
    by_s = sat["by_speedup"]
    out.append("- Pipelined saturation point for a server 10x / 100x / 1000x faster than measured: "
               + "; ".join(f"{b:g} Gbit/s: "
                           + " / ".join(n_str(by_s[b][str(s)]["n_max_pipelined"]) for s in SPEEDUPS[1:])
                           for b in bws) + " clients.")
    return out


def matrix(rows: list[dict], bws) -> str:
    by = {(r["clients"], r["bandwidth_gbit"]): r for r in rows}
    ns = sorted({r["clients"] for r in rows})
    def cell(r):
        mark = "" if r["bottleneck"] == "clients" else " *"
        return f"{t_str(r['step_s']['pipelined'])} · {r['server_utilisation']['pipelined'] * 100:.0f}%{mark}"

    return common.table(["clients"] + [f"{b:g} Gbit/s" for b in bws],
                        [[n] + [cell(by[(n, b)]) for b in bws] for n in ns])


# ----------------------------------------------------------------------------- main

def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", default=None, metavar="FILE.h5",
                    help="results files to project from (run nothing); default: run the CLI with --ranks")
    ap.add_argument("--ranks", default="3,5", help="world sizes to run when no --results (1 server + clients)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--keep", default="", help="folder to keep the CLI's results files in (default: deleted)")
    ap.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                    help="time the server/client steps in this process (default: on without --results, off with)")
    ap.add_argument("--direct-clients", default="1,2,4,8,16,32", help="fused sizes timed directly, in client batches")
    ap.add_argument("--direct-iters", type=int, default=3)
    ap.add_argument("--direct-device", default="cpu", help="cpu, cuda or auto for the direct timing")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the direct timing (0 = the runs' run.torch_threads)")
    ap.add_argument("--compute-source", choices=("auto", "direct", "runs"), default="auto",
                    help="where server compute and client step come from (auto: direct when timed, else runs)")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    ap.add_argument("--bandwidths", default=",".join(map(str, BANDWIDTHS_GBIT)), help="Gbit/s, comma-separated")
    ap.add_argument("--latency-us", default="", help="one value for every link, or one per bandwidth "
                    "(default: 25, 15, 2, 1.5, 1.5 µs for 10, 25, 100, 200, 400 Gbit/s; 2 µs otherwise)")
    ap.add_argument("--eager-limit", type=int, default=0,
                    help="bytes; payloads above it wait for a rendezvous (default: the package's own, which "
                    "raises Open MPI's TCP limit to hold one message up to 4 MiB; 65536 = Open MPI's default)")
    ap.add_argument("--handshake-us", type=float, default=0.0,
                    help="what a rendezvous costs beyond 2 latencies (bench/link_probe.py measures a link's)")
    ap.add_argument("--host-overhead-us", type=float, default=None,
                    help="server host cost per client message (default: measured recv per client, "
                    "least contended run)")
    ap.add_argument("--server-speedup", type=float, default=1.0,
                    help="server compute this many times faster than measured")
    ap.add_argument("--client-speedup", type=float, default=1.0,
                    help="client step this many times faster than measured")
    ap.add_argument("--quick", action="store_true", help="smoke test: 12 steps, direct sizes 1,2,4 client batches")
    ap.add_argument("--out", default="projection", help="name of the bench/results/<name>.{json,md} pair")
    args = ap.parse_args(argv)
    clients = tuple(int(v) for v in args.clients.split(","))
    if args.quick:
        args.steps, args.direct_clients, args.direct_iters = 12, "1,2,4", 2
    bws = floats(args.bandwidths)
    lat = floats(args.latency_us)
    if len(lat) not in (0, 1, len(bws)):
        raise SystemExit("--latency-us takes one value or one per bandwidth")
    lats = {b: (lat[0] if len(lat) == 1 else lat[i] if lat else LATENCY_US.get(b, 2.0)) for i, b in enumerate(bws)}
    do_direct = args.direct if args.direct is not None else not args.results

    commands, walls, tmp = [], [], None
    t_start = time.perf_counter()
    if args.results:
        files = args.results
    else:
        tmp = args.keep or tempfile.mkdtemp(prefix="cf-projection-")
        os.makedirs(tmp, exist_ok=True)
        files = []
        for n in (int(v) for v in args.ranks.split(",")):
            path = os.path.join(tmp, f"projection-n{n}.h5")
            if os.path.exists(path):
                os.remove(path)
            print(f"running {n} ranks, {args.steps} steps ...", flush=True)
            cmd, wall = run_cli(n, args.steps, args.batch_size, path)
            commands.append(cmd)
            walls.append(wall)
            files.append(path)
    try:
        runs = load_runs(files)
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    cfg = runs[0]["config"]
    fit_runs = fit_linear([r["server"]["images_per_step"] for r in runs], [r["server"]["compute_s"] for r in runs])

    direct = None
    if do_direct:
        print("direct timing ...", flush=True)
        direct = direct_timing(cfg, [int(v) for v in args.direct_clients.split(",")], args.direct_iters, 1,
                               args.threads or int(cfg["torch_threads"]), args.direct_device)
    source = args.compute_source
    if source == "auto":
        source = "direct" if direct else "runs"
    if source == "direct" and not direct:
        raise SystemExit("--compute-source direct needs --direct")
    least = min(runs, key=lambda r: (r["ranks_per_host_max"], r["n_clients"]))
    if source == "direct":
        fit, client_s = direct["fit"], direct["client"]["p50"]
        compute_source = f"direct timing, {direct['device']}"
        max_images = max(v["images"] for v in direct["server"].values())
        compute_device = f"direct: {direct['device']}, {direct['threads']} thread(s)"
    else:
        fit, client_s = fit_runs, least["client_own_step_s"]
        compute_source = "results runs (client step from the least contended run)"
        max_images = max(r["server"]["images_per_step"] for r in runs)
        compute_device = "runs: server " + ", ".join(sorted({r["server"]["device"] for r in runs}))
    msgs = [r["message_bytes_measured"] for r in runs if r["message_bytes_measured"]]
    message_bytes = float(np.mean(msgs)) if msgs else float(runs[0]["message_bytes_formula"])
    if args.eager_limit:
        eager_limit, eager_source = args.eager_limit, "--eager-limit"
    else:
        eager_limit = max(65536, mpi_params.limit_for(message_bytes))
        eager_source = "the package's run.tcp_eager" if eager_limit > 65536 else "Open MPI's TCP default"
    if args.host_overhead_us is not None:
        host_s, host_source = args.host_overhead_us * 1e-6, "--host-overhead-us"
    else:
        host_s = least["server"]["recv_per_client_s"]
        host_source = (f"server recv phase per client message in the least contended run "
                       f"({least['n_clients']} clients; over "
                       f"{'shared memory' if len(least['hosts']) == 1 else 'the runs network'}, "
                       "so it includes an intra-node copy: an upper bound of the software cost)")
    p = {"batch": int(cfg["batch_size"]), "preset": cfg["preset"], "channels": cfg["channels"],
         "image_size": cfg["image_size"], "a_s": max(fit["a_s"], 0.0), "a_fit_s": fit["a_s"],
         "b_s": fit["b_s_per_image"],
         "fit_kind": fit["kind"], "client_s": client_s, "message_bytes": message_bytes,
         "message_source": ("client comm table (train_batch bytes / messages)" if msgs
                            else "formula B*(2*C*H*W+1)*4 + 96"),
         "eager_limit": eager_limit, "eager_source": eager_source, "handshake_s": args.handshake_us * 1e-6,
         "latency_msgs": latency_msgs(message_bytes - HEADER_BYTES, eager_limit),
         "host_s": host_s, "host_source": host_source, "server_speedup": args.server_speedup,
         "client_speedup": args.client_speedup, "compute_source": compute_source,
         "compute_device": compute_device, "max_measured_images": int(max_images),
         "latency_table": {b: lats[b] for b in bws}, "max_in_flight": cfg["max_in_flight"],
         "clients": list(clients), "bandwidths_gbit": bws}
    proj = [project(p, n, b, lats[b]) for n in clients for b in bws]
    by_speedup = {str(sp): [project(dict(p, server_speedup=float(sp)), n, b, lats[b]) for n in clients for b in bws]
                  for sp in SPEEDUPS if float(sp) != p["server_speedup"]}
    sat = {"main": [saturation(p, b, lats[b]) for b in bws],
           "by_speedup": {b: {str(s): saturation(p, b, lats[b], s) for s in SPEEDUPS} for b in bws}}
    note = None
    if any(r["ranks_per_host_max"] > (os.cpu_count() or 1) for r in runs) and not args.results:
        note = (f"Contention: the MPI runs put {', '.join(str(r['world_size']) for r in runs)} ranks on "
                f"{os.cpu_count()} cores, so their phase times include time-sharing; the direct timings run one "
                "process alone (other jobs on the machine aside: see loadavg) and are the source unless "
                "--compute-source runs.")
    rec = {"benchmark": "projection", "command": common.command(), "machine": common.machine(),
           "cli_commands": commands, "cli_wall_s": walls,
           "inputs": [os.path.abspath(f) for f in files] if args.results else [],
           "runs": runs, "fit_runs": fit_runs, "direct": direct, "parameters": p, "saturation": sat,
           "projection": proj, "projection_by_speedup": by_speedup, "contention_note": note,
           "assumptions": assumptions(p, source),
           "elapsed_s": time.perf_counter() - t_start}
    rec["headline"] = headline(p, sat, proj, bws)
    md = markdown(rec)
    paths = common.write(args.out, rec, md)
    print("\n".join(rec["headline"]))
    print(f"({rec['elapsed_s']:.0f} s) wrote", *paths)


if __name__ == "__main__":
    main()
