"""Entry point: `mpirun -n N python -m collafuse_mpi.run --cut 0.4` (rank 0 server, 1..N-1 clients).

`execute()` runs one rank's role on any transport; `main()` is the MPI command line and
`run_loopback()` runs every role as a thread of one process (same numbers, no MPI).
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
import traceback

import click

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


OPTIONS = [  # (flag, config key, help)
    ("--cut", "diffusion.cut", "Client's share of the chain c in [0,1]: k = round(c*T); 1 = purely local, 0 = purely central."),
    ("--client-cuts", "diffusion.client_cuts", "Per-client cuts, comma-separated, one per client (heterogeneous cuts)."),
    ("--timesteps", "diffusion.timesteps", "Chain length T."),
    ("--schedule", "diffusion.schedule", "Noise schedule: linear or cosine."),
    ("--sampler", "diffusion.sampler", "ddpm or ddim."),
    ("--sample-steps", "diffusion.sample_steps", "DDIM steps over the whole chain."),
    ("--steps", "train.steps", "Training steps per client."),
    ("--batch-size", "train.batch_size", "Images per client per step."),
    ("--lr", "train.lr", "Learning rate."),
    ("--samples-per-client", "sample.samples_per_client", "Images each client generates after training."),
    ("--dataset", "data.dataset", "digits, shapes, npz or folder."),
    ("--data-path", "data.path", "Data file (npz) or folder (folder)."),
    ("--image-size", "data.image_size", "Image side in pixels."),
    ("--channels", "data.channels", "1 or 3."),
    ("--partition", "data.partition", "iid or dirichlet."),
    ("--alpha", "data.alpha", "Dirichlet alpha for the non-IID partition."),
    ("--preset", "model.preset", "UNet size: tiny, small or base."),
    ("--clients-per-rank", "run.clients_per_rank", "Logical clients M per client rank: a world of R ranks runs (R-1)*M clients."),
    ("--clients-per-step", "train.clients_per_step", "Cohort: logical clients drawn (seeded) to train each step; 0 = all."),
    ("--seed", "run.seed", "Run seed (the server and each logical client derive their own)."),
    ("--device", "run.device", "auto, cpu or cuda."),
    ("--output", "run.output", "HDF5 results file."),
    ("--run-name", "run.run_name", "Name of the run group in the results file."),
    ("--checkpoint-every", "run.checkpoint_every", "Save every rank's full training state every this many steps (0 = never)."),
    ("--timing", "run.timing", "attribution or throughput."),
    ("--cuda-aware", "run.cuda_aware", "Pass CUDA tensors to MPI directly: auto, yes or no."),
]


def _options(fn):
    for flag, key, text in reversed(OPTIONS):
        names = [flag, "-o"] if flag == "--output" else [flag]
        fn = click.option(*names, key.replace(".", "__"), default=None, metavar="VALUE",
                          help=f"{text} [config {key}]")(fn)
    return fn


def _build_config(config_path, if_exists, overrides, quiet, resume, values):
    """The config from the file, the options and --set; every option that cannot be applied is
    reported together, in one ConfigError."""
    cfg = cfgmod.load(config_path)
    bad = []
    settings = [(key.replace("__", "."), raw) for key, raw in values.items() if raw is not None]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep:
            settings.append((key.strip(), raw.strip()))
        else:
            bad.append(f"--set {item!r} must look like section.key=value")
    for key, raw in settings:
        try:
            cfgmod.set_value(cfg, key, raw)
        except ConfigError as exc:
            bad.extend(exc.problems)
    if bad:
        raise ConfigError(bad)
    if if_exists:
        cfg.run.if_exists = if_exists
    if quiet:
        cfg.run.quiet = True
    if resume:
        cfg.run.resume = True
    return cfg


def submit_check(cfg, ranks: int | None) -> None:
    """--check: what a job would find wrong at its start, found before it waits in the queue."""
    from . import checkpoint
    if ranks is None and os.environ.get("SLURM_NTASKS", "").isdigit():
        ranks = int(os.environ["SLURM_NTASKS"])
    try:
        verify(cfg, ranks)
    except (ConfigError, ValueError) as exc:
        print(f"collafuse_mpi: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    where = "no rank count given (--ranks): per-client checks skipped" if ranks is None else \
        f"{ranks} ranks: 1 server + {cfg.n_clients(ranks)} clients" + \
        (f" ({cfg.run.clients_per_rank} on each of {ranks - 1} ranks)" if cfg.run.clients_per_rank > 1 else "") + \
        f", k = {cfg.cut_steps(cfg.n_clients(ranks))} of T = {cfg.diffusion.timesteps}"
    print(f"check: OK ({where})")
    mode = "new file" if not os.path.exists(cfg.run.output) else f"exists, run.if_exists = {cfg.run.if_exists}"
    print(f"results: {os.path.abspath(cfg.run.output)} ({mode})")
    print(f"checkpoints: {checkpoint.folder(cfg)}"
          + (f" (resume from step {checkpoint.latest_any(cfg)})" if cfg.run.resume else ""), flush=True)


USAGE_GRACE_S = 5.0  # how long the other tasks wait before failing on a usage error


class _Command(click.Command):
    """Usage errors (a bad option) are printed by the first task only: every rank of a launch
    parses the same command line, and N copies of one message hide the rest of the log."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            raise SystemExit(exc.exit_code) from None
        except click.ClickException as exc:
            if _launcher_rank() in (None, 0):
                exc.show()
                sys.stderr.flush()
            else:  # the launcher ends the job at the first failed task: let the first task speak
                time.sleep(USAGE_GRACE_S)
            raise SystemExit(exc.exit_code) from None
        except click.Abort:
            raise SystemExit(1) from None


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", default=None, metavar="FILE", help="TOML config file (sections as in --help-config).")
@_options
@click.option("--append", "if_exists", flag_value="append", help="Add a run group to an existing results file.")
@click.option("--overwrite", "if_exists", flag_value="overwrite", help="Replace an existing results file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override any config field.")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress output (bar on a terminal, lines in a log).")
@click.option("--resume", is_flag=True, default=None, help="Continue from the newest checkpoint that every rank completed.")
@click.option("--check", "check_only", is_flag=True,
              help="Only validate the config, data, results file and checkpoint folder, without MPI; exit 0 when "
                   "a run would start (for submit time: the job scripts run it).")
@click.option("--ranks", type=int, default=None, metavar="N",
              help="With --check: the world size to check for (default $SLURM_NTASKS).")
@click.option("--help-config", is_flag=True, help="List every config field with its default and meaning.")
def cli(config_path, if_exists, overrides, quiet, resume, check_only, ranks, help_config, **values):
    """Train and sample a CollaFuse split diffusion model over MPI.

    Rank 0 is the server (t = k+1..T), ranks 1..N host the clients (t = 1..k), M each
    (--clients-per-rank), with k = round(cut * T). Launch with, for example:

        mpirun -n 3 python -m collafuse_mpi.run --cut 0.4

    SIGUSR1 or SIGTERM makes every rank save its state at the next step edge they share
    (run.stop_check_every) and exit with code 75; --resume continues from there.
    """
    if help_config:
        click.echo(cfgmod.describe())
        return
    if check_only:
        try:
            cfg = _build_config(config_path, if_exists, overrides, quiet, resume, values)
        except ConfigError as exc:
            print(f"collafuse_mpi: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        submit_check(cfg, ranks)
        return
    from . import mpi_params, stopping
    from .comm import MPITransport, PeerFailed
    from .report import failure_text
    stopping.install()  # SLURM's warning signal or SIGTERM: all ranks save at one step edge, then stop
    tp = None
    try:
        try:
            cfg, problem = _build_config(config_path, if_exists, overrides, quiet, resume, values), None
        except ConfigError as exc:
            cfg, problem = cfgmod.Config(), str(exc)
        os.environ.update(mpi_params.environment(cfg, os.environ))  # read by MPI_Init, in MPITransport
        tp = MPITransport(cuda_aware=cfg.run.cuda_aware if cfg.run.cuda_aware in cfgmod.TRISTATE else "auto")
        if problem:  # the same on every rank: report once
            if tp.rank == 0 and _launcher_rank() in (None, 0):
                print(f"collafuse_mpi: error: {problem}", file=sys.stderr, flush=True)
            raise Abort(2)
        execute(cfg, tp, progress=not cfg.run.quiet)
    except (Abort, stopping.Stopped):
        raise  # every rank leaves together: the exit code says why (2: bad input, 75: stopped, saved)
    except BaseException as exc:  # any failure on any rank ends the whole job, now
        rank = tp.rank if tp else _launcher_rank()
        # a peer's failure was printed by that peer: said once
        _log(-1 if rank is None else rank,
             f"ending the job: rank {exc.rank} failed" if isinstance(exc, PeerFailed) else f"FAILED: {failure_text(exc)}")
        if not (isinstance(exc, (TimeoutError, PeerFailed)) or getattr(exc, "errno", None) == errno.ENOSPC):
            traceback.print_exc()  # a deadline, a peer's report or a full disk says it all in one line
        sys.stderr.flush()
        if tp is not None and tp.size > 1:
            if not isinstance(exc, PeerFailed):
                tp.report_failure(failure_text(exc))  # rank 0 records it in the run group, then ends the job
            tp.abort(1)
        raise SystemExit(1)


def main():
    cli.main(prog_name="python -m collafuse_mpi.run")


if __name__ == "__main__":
    main()
