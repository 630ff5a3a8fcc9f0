"""The command line: option parsing, drawing every figure, saving the files."""
from __future__ import annotations

import os
import re
import sys

import click

from .privacy import fig_disclosure
from .quality import fig_kid, fig_samples
from .runs import DPI, FIGURES, FORMATS, PROG, Ctx, Missing, config_differences, load
from .timing import fig_energy, fig_phases, fig_timeline
from .traffic import fig_bytes, fig_scaling
from .trends import fig_trends

DRAW = {"phases": fig_phases, "timeline": fig_timeline, "energy": fig_energy, "kid": fig_kid,
        "disclosure": fig_disclosure, "bytes": fig_bytes, "samples": fig_samples, "scaling": fig_scaling,
        "trends": fig_trends}


# ----------------------------------------------------------------------------- command line

def _split(value: str, allowed, what: str) -> list:
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f"{', '.join(bad) or 'nothing given'}: choose from {', '.join(allowed)}",
                                 param_hint=what)
    return list(dict.fromkeys(items))


def _steps(value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[:-]\s*(\d+)\s*", value)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise click.BadParameter("expected FIRST:LAST, e.g. 3:5 (inclusive, FIRST <= LAST)",
                                 param_hint="--timeline-steps")
    return int(m.group(1)), int(m.group(2))


def save(fig, out_dir: str, stem: str, formats) -> list:
    paths = []
    for fmt in formats:
        path = os.path.join(out_dir, f"{stem}.{fmt}")
        fig.root.savefig(path, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
        paths.append(path)
    return paths


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("files", nargs=-1, required=True, metavar="RESULTS.h5...")
@click.option("-o", "--output-dir", default="figures", show_default=True, metavar="DIR",
              help="Folder for the figures (created if needed).")
@click.option("--format", "formats", default="png,pdf", show_default=True, metavar="LIST",
              help=f"Comma-separated file formats: {', '.join(FORMATS)}.")
@click.option("--only", default=None, metavar="LIST",
              help="Comma-separated figures to draw (names above)  [default: all].")
@click.option("--timeline-steps", default=None, metavar="FIRST:LAST",
              help="Steps shown in the timeline (inclusive) [default: the first 3 after warm-up].")
def cli(files, output_dir, formats, only, timeline_steps):
    """Draw figures from CollaFuse results files (runs from all files are merged).

    \b
    Figures (FIG.png / FIG.pdf under DIR):
      disclosure  what the attacks recover against cut, with the analytic bounds
      phases      median seconds per step per phase, per rank
      timeline    phases across ranks for a few steps
      energy      energy per rank and per image against cut
      kid         KID against cut: per client, their mean, pooled (kid-<feature set>; one file per set)
      bytes       bytes per step and achieved bandwidth per message kind
      samples     image grids per client: real (if stored), generated, server view (samples-cut<c>-n<N>)
      scaling     throughput and server wait fraction against number of clients
      trends      KID, disclosure, step time and the clients' share of FLOPs, CPU and energy
                  against cut: mean and 95% CI over runs that differ only in seed

    \b
    Exit status: 0 at least one figure written; 1 no figure could be drawn;
    2 usage error or an input missing / unreadable / not a results file.
    """
    fmts = _split(formats, FORMATS, "--format")
    figures = list(FIGURES) if only is None else _split(only, FIGURES, "--only")
    window = _steps(timeline_steps)
    runs, problems = load(files)
    if problems:
        for p in problems:
            click.echo(f"{PROG}: error: {p}", err=True)
        click.echo(f"{PROG}: nothing drawn ({len(problems)} unreadable input{'s' if len(problems) > 1 else ''})",
                   err=True)
        sys.exit(2)
    usable = []
    for r in runs:
        if not r.ranks:
            click.echo(f"{PROG}: {r.path}: run {r.name} has no rank data (status {r.d.get('status', '?')!r}: "
                       "crashed or still running); skipped", err=True)
            continue
        if r.d.get("status") != "complete":
            click.echo(f"{PROG}: {r.path}: run {r.name} has status {r.d.get('status', '?')!r}; used as it is",
                       err=True)
        usable.append(r)
    if not usable:
        click.echo(f"{PROG}: no runs with data in {', '.join(files)}; nothing drawn", err=True)
        sys.exit(1)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        click.echo(f"{PROG}: error: cannot create output folder {output_dir}: {exc.strerror}", err=True)
        sys.exit(2)
    diff = config_differences(usable)
    if diff:
        shown = "; ".join(f"{k} = {' / '.join(v)}" for k, v in list(diff.items())[:6])
        click.echo(f"{PROG}: note: the runs differ in settings other than cut and client count, and are merged "
                   f"by (cut, clients) regardless: {shown}" + (" ..." if len(diff) > 6 else ""), err=True)
    ctx = Ctx(usable, window)
    written, skipped = [], []
    for name in figures:
        try:
            figs = DRAW[name](ctx)
        except Missing as exc:
            click.echo(f"{PROG}: {name}: not drawn: {exc}", err=True)
            skipped.append(name)
            continue
        except Exception as exc:  # a bug in one figure must not cost the others
            click.echo(f"{PROG}: {name}: not drawn: internal error {type(exc).__name__}: {exc}", err=True)
            skipped.append(name)
            continue
        for stem, fig in figs:
            try:
                written += save(fig, output_dir, stem, fmts)
            except OSError as exc:
                click.echo(f"{PROG}: {name}: cannot write {stem}: {exc}", err=True)
                skipped.append(name)
    for p in written:
        click.echo(p)
    n_runs = len(usable)
    click.echo(f"{PROG}: {len(written)} file{'s' if len(written) != 1 else ''} written from {n_runs} "
               f"run{'s' if n_runs != 1 else ''} in {len(ctx.groups)} configuration"
               f"{'s' if len(ctx.groups) != 1 else ''}"
               + (f"; not drawn: {', '.join(dict.fromkeys(skipped))}" if skipped else ""), err=True)
    sys.exit(0 if written else 1)


def main():
    # Read without taking HDF5's file lock: a run still writing the file reopens it at every flush
    # and must never fail because someone is plotting it. Only effective before h5py is imported;
    # export HDF5_USE_FILE_LOCKING=TRUE to keep locking.
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    cli(prog_name=PROG)
