"""Peak RSS per rank of the real CLI, for 2 and 8 clients, and RSS over a long run (no growth).

    python bench/memory.py                        # ~5 min; writes bench/results/memory.{json,md}
    python bench/memory.py --long-steps 20 --wide-steps 3    # smoke test
    python bench/memory.py --long-steps 20000 --control-steps 5000 --name memory-long   # ~40 min

Each configuration is the real command line, run through this file's wrapper mode:
    mpirun -n N [--oversubscribe] python bench/memory.py --wrap OUT.json -- --cut 0.4 --steps S -o F ...
The wrapper calls `collafuse_mpi.run.cli` in the rank (standalone_mode=False), samples this
process's VmRSS from /proc/self/status every 0.2 s on a thread, and at the end gathers
ru_maxrss (resource.getrusage, KiB on Linux), VmHWM and the samples of every rank to rank 0.
Runs:
  long  -n 3 (2 clients), default config, --steps 1000: peak RSS per rank, and RSS against the
        training step (the results file's step_start times, same monotonic clock) to show that
        memory does not grow with steps: slope over the second half of training.
  wide  -n 9 --oversubscribe (8 clients), default config, fewer steps: peak RSS per rank.
  control  no MPI, this process: a client's per-step work (real Learner and PhaseTimer, fresh
        batch, message packing) for as many steps, RSS every 10 steps: a flat control next to a
        drifting MPI run puts the drift in the MPI/transport path.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import common


def _status(field: str) -> int:
    """A `VmXXX:  123 kB` line of /proc/self/status, in KiB (0 if absent)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    def __init__(self, period: float = 0.2):
        super().__init__(name="rss-sampler", daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()

    def run(self):
        while True:
            self.samples.append((time.perf_counter(), _status("VmRSS")))
            if self.stop.wait(self.period):
                break


def wrap(out_path: str, cli_args: list[str]):
    """Rank body: run the CLI, then gather memory figures to rank 0 and write them. mpi4py.MPI is
    imported after the CLI ran: importing it starts MPI, before the variables the run sets."""
    sampler = Sampler()
    sampler.start()
    from collafuse_mpi.run import cli
    try:
        cli.main(args=cli_args, prog_name="python -m collafuse_mpi.run")  # its main() is never standalone
    finally:
        sampler.stop.set()
        sampler.join()
    from mpi4py import MPI
    mine = {"rank": MPI.COMM_WORLD.Get_rank(), "pid": os.getpid(),
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "vmhwm_kib": _status("VmHWM"), "vmrss_end_kib": _status("VmRSS"),
            "samples": sampler.samples}
    everyone = MPI.COMM_WORLD.gather(mine, root=0)
    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(everyone, fh)


def run_wrapped(n: int, cli_args: list, js: str, tag: str) -> tuple[str, float, list]:
    """The CLI on n ranks under this file's wrapper: (the command as shown, wall seconds, the
    per-rank memory rows the wrapper wrote to `js`). Exits with the run's output if it fails."""
    cmd = common.mpirun(n) + [sys.executable, os.path.join(common.BENCH, "memory.py"), "--wrap", js, "--"] + cli_args
    shown = " ".join(common.mpirun(n)) + f" python bench/memory.py --wrap {tag}.json -- " + " ".join(cli_args)
    print(f"running {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.REPO, env=common.mpi_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{shown} failed with exit code {proc.returncode}")
    with open(js) as fh:
        return shown, wall, json.load(fh)


def launch(n: int, steps: int, tmp: str, tag: str) -> dict:
    h5, js = os.path.join(tmp, f"{tag}.h5"), os.path.join(tmp, f"{tag}.json")
    cli_args = ["--cut", "0.4", "--steps", str(steps), "-o", h5, "--overwrite", "-q"]
    shown, wall, ranks = run_wrapped(n, cli_args, js, tag)
    from collafuse_mpi import results
    run = next(iter(results.read(h5)["runs"].values()))
    for r in ranks:
        rk = run["ranks"][r["rank"]]
        r["role"] = rk["role"]
        r["step_start"] = np.asarray(rk["step_start"]).tolist()
        r["train_window"] = [rk["windows"]["train"]["start"], rk["windows"]["train"]["end"]]
    return {"command": shown, "n_ranks": n, "steps": steps, "wall_s": wall, "ranks": ranks}


def growth(rank: dict) -> dict:
    """RSS at each training step (last sample before the step started) and its trend."""
    t = np.array([s[0] for s in rank["samples"]])
    rss = np.array([s[1] for s in rank["samples"]], dtype=np.float64)
    starts = np.asarray(rank["step_start"])
    idx = np.searchsorted(t, starts, side="right") - 1
    ok = idx >= 0
    steps, at = np.nonzero(ok)[0], rss[idx[ok]]
    half = steps >= steps.max() / 2 if steps.size else steps.astype(bool)
    slope = float(np.polyfit(steps[half], at[half], 1)[0]) if half.sum() >= 3 else float("nan")
    first = at[steps >= max(1, steps.max() // 10)][0] if steps.size else float("nan")
    return {"rss_kib_at_step": {int(s): float(v) for s, v in zip(steps[::10], at[::10])},
            "rss_kib_10pct": float(first), "rss_kib_last_step": float(at[-1]) if at.size else float("nan"),
            "change_10pct_to_end_kib": float(at[-1] - first) if at.size else float("nan"),
            "slope_kib_per_100_steps_second_half": slope * 100}


def control(steps: int, batch: int = 32) -> dict:
    """The same per-step work without MPI, in this process: a client's UNet trained with the real
    Learner and PhaseTimer on fresh batches; RSS read every 10 steps. If this stays flat while
    the MPI run drifts, the drift is in the MPI/transport path, not in torch's training step."""
    import torch

    from collafuse_mpi import schedule
    from collafuse_mpi.config import Config
    from collafuse_mpi.harness import PhaseTimer
    from collafuse_mpi.model import UNet
    from collafuse_mpi.training import Learner, pack_train
    torch.set_num_threads(1)
    cfg = Config()
    torch.manual_seed(0)
    learner = Learner(UNet(cfg.data.channels, cfg.model.preset, False, 0.0), cfg.train.lr,
                      cfg.train.ema_decay, cfg.train.grad_clip)
    sched = schedule.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    k, s = cfg.cut_steps(1)[0], cfg.data.image_size
    gen = torch.Generator().manual_seed(0)
    timer = PhaseTimer("attribution", None, None, 0.0)
    at = {}
    for step in range(steps):
        timer.start_step(step, step < 3)
        x0 = torch.rand((batch, cfg.data.channels, s, s), generator=gen) * 2 - 1
        x_t, t, eps = schedule.client_target(sched, x0, k, gen)
        loss = learner.step(timer, eps, x_t, t)
        x_s, t_s, eps_s = schedule.server_message(sched, x0, k, gen)
        pack_train(x_s, eps_s, t_s)
        timer.end_step(float(loss), batch)
        if step % 10 == 0:
            at[step] = _status("VmRSS")
    steps_ = np.array(sorted(at))
    rss = np.array([at[k] for k in steps_], dtype=np.float64)
    half = steps_ >= steps_.max() / 2
    first = rss[steps_ >= steps // 10][0]
    return {"steps": steps, "batch": batch, "rss_kib_at_step": {int(k): float(v) for k, v in zip(steps_, rss)},
            "rss_kib_10pct": float(first), "rss_kib_last_step": float(rss[-1]),
            "change_10pct_to_end_kib": float(rss[-1] - first),
            "slope_kib_per_100_steps_second_half": float(np.polyfit(steps_[half], rss[half], 1)[0]) * 100}


def verdict(long: dict, ctl: dict | None) -> str:
    """What the long run says about growth with steps, in words, from the numbers."""
    by = {rk["role"]: [] for rk in long["ranks"]}
    for rk in long["ranks"]:
        by[rk["role"]].append(rk["growth"]["slope_kib_per_100_steps_second_half"] / 1024)
    text = (f"Growth with steps: over the second half of the {long['steps']}-step run the server's RSS "
            f"slope is {max(by.get('server', [0])):+.2f} MiB per 100 steps and the clients' "
            f"{min(by.get('client', [0])):+.2f} to {max(by.get('client', [0])):+.2f}. ")
    if ctl:
        c = ctl["slope_kib_per_100_steps_second_half"] / 1024
        worst = max(by.get("client", [0]))
        where = ("comparable to the clients': most of the drift is in the training step itself (torch "
                 "and the glibc heap) rather than in the transport, the harness's records or MPI" if c >= 0.5 * worst else
                 "less than the clients: part of their drift comes from the MPI/transport path")
        text += f"The no-MPI control drifts {c:+.2f} MiB per 100 steps, {where}. "
    if long["steps"] < 10000:
        text += ("Per-step samples scatter by a few MiB (allocator behaviour), so a slope of about 1 MiB "
                 "per 100 steps is at the edge of what this run length resolves; it does not show whether "
                 "the drift levels off. Run `python bench/memory.py --long-steps 20000 --control-steps 5000 "
                 "--name memory-long` (about 40 min) to settle it before trusting 100k-step runs.")
    return text


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--wrap"]:
        sep = argv.index("--")
        return wrap(argv[1], argv[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long-steps", type=int, default=1000)
    ap.add_argument("--wide-steps", type=int, default=20)
    ap.add_argument("--wide-ranks", type=int, default=9)
    ap.add_argument("--control-steps", type=int, default=1000, help="no-MPI control loop (0 = skip)")
    ap.add_argument("--name", default="memory", help="results file name in bench/results (default memory)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="cf-memory-")
    try:
        long = launch(3, args.long_steps, tmp, "long")
        wide = launch(args.wide_ranks, args.wide_steps, tmp, "wide")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.control_steps:
        print(f"running the no-MPI control loop, {args.control_steps} steps ...", flush=True)
    ctl = control(args.control_steps) if args.control_steps else None
    rows = []
    for name, r in (("long", long), ("wide", wide)):
        for rk in r["ranks"]:
            rk["growth"] = growth(rk)
            g = rk["growth"]
            rows.append([f"{r['n_ranks'] - 1} clients ({r['steps']} steps)", rk["rank"], rk["role"],
                         mib(rk["ru_maxrss_kib"]), mib(rk["vmhwm_kib"]), mib(rk["vmrss_end_kib"]),
                         mib(g["rss_kib_10pct"]), mib(g["rss_kib_last_step"]),
                         f"{g['change_10pct_to_end_kib'] / 1024:+.1f}",
                         f"{g['slope_kib_per_100_steps_second_half'] / 1024:+.2f}" if r["steps"] >= 100
                         else "n/a (< 100 steps)"])
    for r in (long, wide):
        for rk in r["ranks"]:  # keep the record small: samples every ~1 s
            rk["samples"] = rk["samples"][::5]
    by_role = {}
    names = {id(r): f"{r['n_ranks'] - 1}_clients" for r in (long, wide)}
    for r in (long, wide):
        name = names[id(r)]
        for role in ("server", "client"):
            v = [rk["ru_maxrss_kib"] for rk in r["ranks"] if rk["role"] == role]
            by_role[f"{name}_{role}_peak_mib_max"] = max(v) / 1024
    long_slopes = [rk["growth"]["slope_kib_per_100_steps_second_half"] for rk in long["ranks"]]
    record = {"benchmark": "memory", "command": common.command(), "machine": common.machine(),
              "runs": {"long": long, "wide": wide}, "control_no_mpi": ctl, "headline": by_role,
              "long_run_max_slope_kib_per_100_steps": max(long_slopes)}
    md = ["# memory: peak RSS per rank, and RSS over a long run\n",
          f"Command: `{record['command']}`\n", common.machine_md(record["machine"]), "",
          "Runs (default config: tiny UNet, 16x16 digits, batch 32, cut 0.4):\n",
          "\n".join(f"- `{r['command']}` ({r['wall_s']:.0f} s)" for r in (long, wide)), "",
          common.table(["run", "rank", "role", "ru_maxrss MiB", "VmHWM MiB", "RSS at exit MiB",
                        "RSS at 10% of steps MiB", "RSS at last step MiB", "change MiB",
                        "slope 2nd half MiB/100 steps"], rows), "",
          *[f"- peak RSS, {r['n_ranks'] - 1} clients: server {by_role[names[id(r)] + '_server_peak_mib_max']:.0f} MiB, "
            f"client {by_role[names[id(r)] + '_client_peak_mib_max']:.0f} MiB (max over clients)" for r in (long, wide)],
          f"- long run ({long['steps']} steps): largest RSS slope over the second half of training "
          f"{max(long_slopes) / 1024:+.2f} MiB per 100 steps ({max(long_slopes) / 100:.1f} KiB per step)",
          *([f"- control, no MPI (one process: client UNet, real Learner + PhaseTimer, fresh batch of "
             f"{ctl['batch']} and message packing each step, {ctl['steps']} steps): RSS "
             f"{mib(ctl['rss_kib_10pct'])} -> {mib(ctl['rss_kib_last_step'])} MiB, slope over the second half "
             f"{ctl['slope_kib_per_100_steps_second_half'] / 1024:+.2f} MiB per 100 steps"] if ctl else []),
          "", verdict(long, ctl), "",
          "ru_maxrss and VmHWM are the whole process's peak (imports, data, training, sampling, "
          "metrics); most of it is the Python + torch + MPI runtime, shared libraries counted in full "
          "in every rank. The per-step RSS is the last 0.2 s sample before that step started."]
    common.publish(args.name, record, md)


if __name__ == "__main__":
    main()
