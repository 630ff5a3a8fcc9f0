"""Entry point: `mpirun -n N python -m collafuse_mpi.run --cut 0.4` (rank 0 server, 1..N-1 clients).

`execute()` runs one rank's role on any transport and `run_loopback()` runs every role as a
thread of one process (same numbers, no MPI); the command line (`cli`, `main`) is in cli.py.
"""
from __future__ import annotations

import os
import socket
import sys
import threading


from . import config as cfgmod
from .config import ConfigError

CLIENT_WAIT_FACTOR = 2.0  # clients' deadline on rank 0, in units of run.recv_timeout


class Abort(SystemExit):
    """Every rank leaves with this code; the message was printed once, on rank 0."""


def _log(rank: int, msg: str, file=sys.stderr):
    print(f"[{rank}@{socket.gethostname()}] {msg}", file=file, flush=True)


def verify(cfg, world_size: int | None) -> None:
    """Config, data size and checkpoint folder; raises ConfigError. No MPI, no model, changes
    nothing (the submit-time check runs it too). Without `world_size` per-client checks are skipped."""
    cfgmod.validate(cfg, world_size)
    from .data import private_count
    n = private_count(cfg)  # what is left for the clients after the public carve
    if world_size is not None and n < 2 * cfg.n_clients(world_size):
        raise ConfigError(f"{n} images cannot be split over {cfg.n_clients(world_size)} clients "
                          "(each needs at least one training and one held-out image)")
    from . import checkpoint
    bad = checkpoint.problem(cfg, world_size, cfg.run.resume, overwrite=cfg.run.if_exists == "overwrite")
    if bad:
        raise ConfigError(bad)


def check(cfg, tp) -> None:
    """Validate on rank 0 (config, data size, memory, whose checkpoints), then every rank learns
    the verdict and the identity its checkpoints carry."""
    from . import checkpoint
    problem = ident = None
    if tp.rank == 0:
        try:
            if tp.size == 1:
                world_problem(tp.size)
            verify(cfg, tp.size)
            from .data import private_count
            from .preflight import memory_problem
            too_big = memory_problem(cfg, tp.size, getattr(tp, "local_size", tp.size), private_count(cfg))
            if too_big:
                raise ConfigError(too_big)
            if cfg.run.resume:
                checkpoint.verify(cfg, tp.size)
            else:
                checkpoint.claim(cfg, tp.size, overwrite=cfg.run.if_exists == "overwrite")
            ident = checkpoint.bound(cfg)
        except (ConfigError, ValueError) as exc:
            problem = str(exc)
    problem, ident = tp.bcast_obj((problem, ident), what="waiting for rank 0's check of the config and data")
    if problem:
        if tp.rank == 0 and _launcher_rank() in (None, 0):  # size-1 worlds: every task is a rank 0
            print(f"collafuse_mpi: error: {problem}", file=sys.stderr, flush=True)
        raise Abort(2)
    if ident is not None:
        checkpoint.bind(cfg, ident)


LAUNCHER_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
LAUNCHER_RANK = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def _launcher_rank() -> int | None:
    """This task's number as the launcher set it in the environment (before or without MPI)."""
    for var in LAUNCHER_RANK:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def world_problem(size: int) -> None:
    """A world of 1 where the launcher started several tasks: the ranks could not join (srun
    without a matching PMI), which "need at least 2 ranks" would misstate."""
    for var in LAUNCHER_SIZE:
        n = os.environ.get(var, "")
        if n.isdigit() and int(n) > size:
            raise ConfigError(
                f"the {n} tasks of this launch could not form one MPI world: this process sees a world of "
                f"{size} ({var}={n}). Under srun the PMI type must match the MPI library: "
                "srun --mpi=pmix (Open MPI >= 5), --mpi=pmi2 for some MPICH builds (see srun --mpi=list), "
                "or launch with mpirun inside the allocation")


def execute(cfg, tp, progress: bool = False) -> dict:
    """Run this rank's role. Returns what this rank measured (rank 0 also writes the file)."""
    import torch

    from . import energy, machine, stopping
    from .harness import PhaseTimer
    from .training import pick_device, sync_fn

    timeout = cfg.run.recv_timeout
    if type(timeout) in (int, float) and timeout > 0:  # else check() refuses it
        # every wait on a peer, from the first one on. A client only ever waits on rank 0, and
        # rank 0 may itself be waiting on a silent client: clients wait twice as long, so that
        # rank 0's deadline fires first and the message names the rank that went silent
        tp.timeout = timeout if tp.rank == 0 else CLIENT_WAIT_FACTOR * timeout
    check(cfg, tp)
    placement = tp.gather_obj(machine.rank_info(tp.local_rank), what="in the gather of where each rank runs")
    resume_step = find_resume_step(cfg, tp) if cfg.run.resume else 0
    torch.set_num_threads(cfg.run.torch_threads)
    ks = cfg.cut_steps(cfg.n_clients(tp.size))
    device = pick_device(cfg.run.device, tp.local_rank)
    gpu = energy.gpu_of(device.index, _torch_uuid(device)) if device.type == "cuda" else None
    meter = energy.open_meter(gpu)
    offset = tp.clock_offset()
    timer = PhaseTimer(cfg.run.timing, sync_fn(device), meter, offset)
    writer, run_name = None, None
    if tp.rank == 0:
        from .report import begin
        writer, run_name = begin(cfg, tp, ks, resume_step, placement)
    run_name = tp.bcast_obj(run_name, what="waiting for rank 0 to open the results file")  # models go under it
    try:
        return _train_and_finish(cfg, tp, ks, device, gpu, meter, timer, writer, run_name, resume_step, progress)
    except stopping.Stopped:
        raise  # stopped on request at a shared step edge: the run group says so already
    except BaseException as exc:
        if writer is not None:  # the run group says how it ended, and which rank ended it
            from .report import record_failure
            record_failure(writer, run_name, exc)
        raise


def _train_and_finish(cfg, tp, ks, device, gpu, meter, timer, writer, run_name, resume_step, progress) -> dict:
    from . import energy, stopping
    mine = {"rank": tp.rank, "host": socket.gethostname(), "device": str(device),
            "energy_source": meter.source, "energy_device": meter.device_key, "energy_reason": meter.reason,
            "path": tp.path(device), "metrics": {}, "samples": {},
            "role": "server" if tp.rank == 0 else "client",
            "k": ks[(tp.rank - 1) * cfg.run.clients_per_rank] if tp.rank else -1}
    if meter.reason and tp.rank == 0:
        _log(tp.rank, f"energy: {meter.source} ({meter.reason})")
    if device.type == "cuda":
        mine["device_info"] = energy.device_info(gpu)
    # Flushes are collective; they are safe only when the server trains in step with the clients.
    flush_every = cfg.run.flush_every if any(k < cfg.diffusion.timesteps for k in ks) else 0
    flush = Flusher(tp, timer, mine, writer, run_name, flush_every)
    stop = stopping.StopVote(tp, cfg.run.stop_check_every, cfg.train.steps)
    try:
        if tp.rank == 0:
            mine["privacy_cost"] = _server_role(cfg, tp, ks, device, timer, progress, flush, resume_step, stop)
        else:
            _client_role(cfg, tp, ks, device, timer, mine, flush, resume_step, stop)
    except stopping.Stopped as exc:  # every rank is here, at the same step edge, its state saved
        meter.close()
        mine.update(arrays=timer.arrays(), windows=timer.windows, comm=tp.stats.rows(),
                    stop_signals=list(stopping.received))
        everyone = tp.gather_obj(mine, what=f"in the gather of every rank's results at the stop "
                                            f"after step {exc.steps_done}")
        if tp.rank == 0:
            from .report import stopped
            signals = [s for r in everyone for s in r.get("stop_signals", [])]
            stopped(writer, run_name, everyone, cfg, exc.steps_done, signals)
        raise
    meter.close()
    from . import netpath
    mine.update(arrays=timer.arrays(), windows=timer.windows, comm=tp.stats.rows(),
                same_node=list(getattr(tp, "same_node", [])), net=netpath.snapshot())
    # over loopback these are the other roles' own dicts: read only
    everyone = tp.gather_obj(mine, what="in the final gather of every rank's results")
    if tp.rank == 0:
        from .evaluate import pooled_kid
        from .report import finish
        with timer.window("metrics"):
            pooled = pooled_kid([c["features"] for r in everyone for _, c in sorted(r.get("clients", {}).items())
                                 if "features" in c], cfg.run.seed)
        everyone[0]["windows"] = timer.windows
        finish(writer, run_name, everyone, cfg, pooled)
        from .checkpoint import mark_complete
        mark_complete(cfg)
    return mine


def _torch_uuid(device) -> str:
    """The CUDA device's UUID as torch reports it ('' where this torch cannot tell)."""
    import torch
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 -- older torch, or no driver: map through CUDA_VISIBLE_DEVICES
        return ""


class Flusher:
    """Every `every` steps, rank 0 gathers and writes each rank's completed steps, so a crash
    later in the run still leaves them in the file."""

    def __init__(self, tp, timer, mine, writer, run_name, every: int):
        self.tp, self.timer, self.mine, self.writer, self.run_name, self.every = tp, timer, mine, writer, run_name, every

    def __call__(self, step: int, loss: float):
        if not self.every or (step + 1) % self.every:
            return
        with self.timer.phase("io"):
            part = dict(self.mine, arrays=self.timer.arrays(), comm=self.tp.stats.rows(), windows={})
            everyone = self.tp.gather_obj(part, what=f"in the results flush after step {step + 1}")
            if self.tp.rank == 0:
                from .report import write_ranks
                with self.writer.batch():
                    write_ranks(self.writer, self.run_name, everyone)
                    self.writer.update_run(self.run_name, steps_written=step + 1)


def _save(cfg, tp, name: str, obj, timer, run_name: str):
    """Final models and samples go to <run.save_dir>/<run name>/ (default save_dir: next to the
    results file), so runs appended to one file keep their own."""
    import io

    import torch

    from .checkpoint import write_atomic
    if not cfg.run.save_models:
        return
    root = cfg.run.save_dir or os.path.splitext(os.path.abspath(cfg.run.output))[0] + "-models"
    with timer.phase("checkpoint"):
        folder = os.path.join(root, run_name)
        os.makedirs(folder, exist_ok=True)
        buf = io.BytesIO()
        torch.save(obj, buf)
        write_atomic(os.path.join(folder, f"rank{tp.rank}-{name}.pt"), buf.getbuffer())


def find_resume_step(cfg, tp) -> int:
    """Rank 0 picks the newest checkpoint every rank completed; all ranks learn it."""
    from . import checkpoint
    ks = cfg.cut_steps(cfg.n_clients(tp.size))
    server_trains = any(k < cfg.diffusion.timesteps for k in ks)  # else rank 0 has nothing to save
    ranks = [r for r in range(tp.size) if r > 0 or server_trains]
    step = checkpoint.latest_complete(cfg, ranks) if tp.rank == 0 else None
    step = tp.bcast_obj(step, what="waiting for rank 0 to pick the checkpoint to resume")
    if not step:
        if tp.rank == 0:
            print(f"collafuse_mpi: error: --resume: no checkpoint completed by all {len(ranks)} training ranks "
                  f"in {checkpoint.folder(cfg)}", file=sys.stderr, flush=True)
        raise Abort(2)
    return step


def _restore(cfg, tp, role, step: int):
    if step and role.learner is not None:
        from . import checkpoint
        role.load_state_dict(checkpoint.load(cfg, tp.rank, step), step)


def _server_role(cfg, tp, ks, device, timer, progress, flush, resume_step, stop):
    from .progress import Progress
    from .server import Server
    server = Server(cfg, tp, ks, device, timer)
    server.stop = stop
    _restore(cfg, tp, server, resume_step)
    per_step = cfg.train.clients_per_step
    bar = Progress(cfg.train.steps, progress and bool(server.senders),
                   cfg.train.batch_size * (min(per_step, len(server.senders)) if per_step else len(server.senders)),
                   cfg.run.progress_every)

    def on_step(step, loss):
        bar.update(step, loss)
        flush(step, loss)

    try:
        with timer.window("train"):
            server.train(on_step=on_step)
    finally:
        bar.close()
    with timer.window("sample"):
        server.serve_samples()
    from .privacy import phase
    names, cost = phase.active(cfg, ks), None
    if names:
        with timer.window("privacy"):
            cost = phase.server_side(cfg, tp, server, names)
    if server.learner is not None:
        _save(cfg, tp, "server", {"ema": server.learner.ema.model.state_dict(), "ks": ks}, timer, flush.run_name)
    return cost


def _client_role(cfg, tp, ks, device, timer, mine, flush, resume_step, stop):
    from .clients import client_role
    sampled, clients = client_role(cfg, tp, ks, device, timer, mine, flush, resume_step, stop)
    for c in clients:
        final = sampled[c.index][0]
        state = {"samples": final.cpu(), "k": c.k}
        if c.learner is not None:
            state["ema"] = c.learner.ema.model.state_dict()
        _save(cfg, tp, f"client{c.index}", state, timer, flush.run_name)


def run_loopback(cfg, n_clients: int) -> list[dict]:
    """All roles as threads of this process over LoopbackTransport; returns each rank's dict."""
    from .loopback import LoopbackTransport
    tps = LoopbackTransport.group(n_clients + 1)
    out, errors = [None] * len(tps), []

    def work(tp):
        try:
            out[tp.rank] = execute(cfg, tp)
        except BaseException as exc:  # noqa: BLE001 -- reported to the caller below
            errors.append((tp.rank, exc))
            tp._barrier.abort()

    threads = [threading.Thread(target=work, args=(tp,)) for tp in tps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, exc = sorted(errors, key=lambda e: isinstance(e[1], threading.BrokenBarrierError))[0]
        raise RuntimeError(f"rank {rank} failed: {exc!r}") from exc
    return out


def __getattr__(name):  # the command line lives in cli.py, which imports this module
    if name in ("cli", "main"):
        from . import cli as _cli
        return getattr(_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from .cli import main
    main()
