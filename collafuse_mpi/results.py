"""HDF5 results: writer (rank 0 only) and reader. No torch: the plot command runs without it.

The file is opened, written and closed for each update, so a crash between updates leaves a
complete, readable file. Layout: docs/results-schema.md.
"""
from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np

FORMAT = "collafuse_mpi-results"
SCHEMA_VERSION = 1


class ResultsError(ValueError):
    pass


def _check_format(f: h5py.File, path: str):
    if f.attrs.get("format") != FORMAT:
        raise ResultsError(f"{path} is not a collafuse_mpi results file (no format={FORMAT!r} attribute)")


def _attr(v):
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return np.asarray(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)  # structured attributes are JSON text; read() decodes them
    return "" if v is None else v


class ResultsWriter:
    def __init__(self, path: str, if_exists: str = "fail"):
        self.path = path
        if os.path.exists(path):
            if if_exists == "fail":
                raise ResultsError(f"{path} exists; choose append or overwrite")
            if if_exists == "append":
                try:
                    with h5py.File(path, "r") as f:
                        _check_format(f, path)
                except OSError:
                    raise ResultsError(f"{path} exists and is not an HDF5 file; refusing to append") from None
        mode = "a" if if_exists == "append" and os.path.exists(path) else "w"
        with h5py.File(path, mode) as f:
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.require_group("runs")

    def _open(self):
        # A reader (the plot command, h5ls) may hold the file for a moment: retry before failing.
        for attempt in range(20):
            try:
                return h5py.File(self.path, "a")
            except BlockingIOError:
                time.sleep(0.25)
        return h5py.File(self.path, "a")

    def begin_run(self, name: str, config: dict, meta: dict) -> str:
        with self._open() as f:
            runs = f["runs"]
            base, i = name, 1
            while name in runs:
                i += 1
                name = f"{base}-{i}"
            g = runs.create_group(name)
            g.attrs["config"] = json.dumps(config, sort_keys=True)
            g.attrs["status"] = "running"
            for k, v in meta.items():
                g.attrs[k] = _attr(v)
        return name

    def update_run(self, name: str, **attrs):
        with self._open() as f:
            for k, v in attrs.items():
                f["runs"][name].attrs[k] = _attr(v)

    def run_status(self, name: str) -> str:
        """The @status of a run group (KeyError when there is no such run)."""
        with self._open() as f:
            v = f["runs"][name].attrs.get("status", "")
        return v.decode() if isinstance(v, bytes) else str(v)

    def write_rank(self, name: str, rank: int, arrays: dict, attrs: dict):
        with self._open() as f:
            ranks = f["runs"][name].require_group("ranks")
            key = str(rank)
            if key in ranks:
                del ranks[key]
            g = ranks.create_group(key)
            for k, v in attrs.items():
                g.attrs[k] = _attr(v)
            for k, v in arrays.items():
                _write(g, k, v)

    def write_group(self, name: str, sub: str, data: dict):
        """Nested dicts of arrays/scalars under runs/<name>/<sub> (metrics, samples, comm)."""
        with self._open() as f:
            run = f["runs"][name]
            if sub in run:
                del run[sub]
            _write(run, sub, data)


def _write(parent: h5py.Group, key: str, value):
    if isinstance(value, dict):
        g = parent.create_group(key)
        for k, v in value.items():
            _write(g, str(k), v)
    elif isinstance(value, str):
        parent.attrs[key] = value
    elif np.isscalar(value) or value is None:
        parent.attrs[key] = np.nan if value is None else value
    else:
        arr = np.asarray(value)
        if arr.dtype.kind == "U":
            arr = arr.astype(h5py.string_dtype())
        parent.create_dataset(key, data=arr, compression="gzip" if arr.size > 4096 else None)


def _read(node):
    if isinstance(node, h5py.Dataset):
        v = node[()]
        if node.dtype.kind == "O":
            v = np.array([s.decode() if isinstance(s, bytes) else s for s in np.ravel(v)])
        return v
    out = {k: _plain(v) for k, v in node.attrs.items()}
    for k in node:
        out[k] = _read(node[k])
    return out


def _plain(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def read(path: str) -> dict:
    """{'attrs': {...}, 'runs': {name: {attrs..., 'config': dict, 'ranks': {int: {...}}, ...}}}."""
    try:
        f = h5py.File(path, "r", locking=False)  # never block the run that is writing it
    except FileNotFoundError:
        raise ResultsError(f"{path} does not exist") from None
    except OSError:
        raise ResultsError(f"{path} is not an HDF5 file") from None
    with f:
        _check_format(f, path)
        out = {"attrs": {k: _plain(v) for k, v in f.attrs.items()}, "runs": {}}
        for name, g in f["runs"].items():
            run = _read(g)
            run["ranks"] = {int(r): v for r, v in run.get("ranks", {}).items()}
            out["runs"][name] = run
        return out


def phase_stats(rank: dict, phases: list, include_warmup: bool = False) -> dict:
    """Per phase: median, IQR, P90, P99 of seconds per step (warm-up steps left out by default)."""
    secs = np.asarray(rank["phase_seconds"], dtype=float)
    if not include_warmup and "warmup" in rank:
        secs = secs[~np.asarray(rank["warmup"], dtype=bool)]
    out = {}
    for i, name in enumerate(phases):
        col = secs[:, i] if len(secs) else np.array([np.nan])
        q25, q50, q75, q90, q99 = np.percentile(col, [25, 50, 75, 90, 99])
        out[name] = {"median": q50, "iqr": q75 - q25, "p90": q90, "p99": q99}
    return out
