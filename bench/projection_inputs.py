"""The projection's inputs: per-phase times from results files, and the server's and a client's
training step timed directly in this process (bench/projection.py says what is derived)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import numpy as np

import common
from link_model import HEADER_BYTES

from collafuse_mpi import results  # noqa: E402
from collafuse_mpi.harness import PHASES  # noqa: E402

P = {p: i for i, p in enumerate(PHASES)}


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
