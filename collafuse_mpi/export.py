"""`collafuse-export`: results files as tidy CSV or JSON tables (pandas reads them directly).

    collafuse-export results.h5 [more.h5 ...] -o tables/ [--format csv|json] [--tables phases,metrics]

Writes <table>.csv (header + one row per observation; missing values empty) or <table>.json
(a list of records, pd.read_json(path) or json.load). Tables and columns: collafuse_mpi/tables.py
and docs/results-schema.md. Runs of several files are concatenated; a `file` column names the
source. No torch, no pandas: runs on a login node.
"""
from __future__ import annotations

import csv
import json
import os
import sys

import click

from . import tables
from .results import ResultsError, read


def rows_of(paths: list[str], name: str) -> list[dict]:
    out = []
    for path in paths:
        for row in tables.build(read(path), name):
            out.append({"file": os.path.basename(path), **row})
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))  # first-seen order, all keys
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, restval="")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def write_json(path: str, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump(rows, fh, separators=(",", ":"))
        fh.write("\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("files", nargs=-1, required=True, metavar="RESULTS.h5...")
@click.option("-o", "--output-dir", default="tables", show_default=True, metavar="DIR",
              help="Folder for the tables (created if needed).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--tables", "names", default=",".join(tables.TABLES), show_default=True, metavar="LIST",
              help="Comma-separated tables to write.")
def cli(files, output_dir, fmt, names):
    """Export CollaFuse results files as tidy tables: one row per run, rank, step, phase.

    Tables: runs, steps, phases, windows, metrics, comm. Paths written go to stdout."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in wanted if n not in tables.TABLES]
    if bad or not wanted:
        raise click.BadParameter(f"{', '.join(bad) or 'nothing given'}: choose from {', '.join(tables.TABLES)}",
                                 param_hint="--tables")
    try:
        for path in files:
            read(path)  # every input checked before anything is written
    except ResultsError as exc:
        click.echo(f"collafuse-export: error: {exc}", err=True)
        sys.exit(2)
    os.makedirs(output_dir, exist_ok=True)
    for name in wanted:
        path = os.path.join(output_dir, f"{name}.{fmt}")
        (write_csv if fmt == "csv" else write_json)(path, rows_of(list(files), name))
        click.echo(path)


def main(argv=None):
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")  # never block a run that is writing
    cli.main(args=argv, prog_name="collafuse-export")


if __name__ == "__main__":
    main()
