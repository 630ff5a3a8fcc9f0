"""The command line: `python -m collafuse_mpi.run` (and `collafuse-run`): options, --set, --check,
and the MPI launch of one rank, whose failure ends the whole job at once."""
from __future__ import annotations

import errno
import os
import sys
import time
import traceback

import click

from . import config as cfgmod
from .config import ConfigError
from .run import Abort, _launcher_rank, _log, execute, verify

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
        want, late = mpi_params.environment(cfg, os.environ), mpi_params.mpi_started()
        if not late:
            os.environ.update(want)  # read by MPI_Init, in MPITransport
        tp = MPITransport(cuda_aware=cfg.run.cuda_aware if cfg.run.cuda_aware in cfgmod.TRISTATE else "auto")
        if want and late and tp.rank == 0:
            _log(0, "note: MPI started before the run could set "
                    + ", ".join(f"{k}={v}" for k, v in want.items()) + "; it is not in effect (export it "
                    "to the ranks, e.g. mpirun -x, to use it)")
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
