"""HDF5 results: writer (rank 0 only) and reader. No torch: the plot command runs without it.

Each update is made on a copy that replaces the file in one rename (h5file.update), so a
process killed at any moment leaves a complete, readable file: as it was before that update
or after it. Layout: docs/results-schema.md.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os

import h5py
import numpy as np

from . import h5file

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


LOCK_WAIT_S = 120.0  # how long a writer waits for a file another process holds (HDF5's lock, another run)


@contextlib.contextmanager
def _held(path: str):
    """Turns a lock held past LOCK_WAIT_S into the reason, named."""
    try:
        yield
    except h5file.Held:
        raise ResultsError(f"{path} is held open by another process (HDF5 file lock) for more than "
                           f"{LOCK_WAIT_S:g} s; close it (or end that run) and retry") from None


SPACE_MARGIN = 256 * 1024  # room HDF5 needs beyond the data for an update (metadata, B-trees)


def _nbytes(value) -> int:
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (str, bytes)) or value is None or np.isscalar(value):
        return 64
    return int(np.asarray(value).nbytes)


class ResultsWriter:
    def __init__(self, path: str, if_exists: str = "fail"):
        self.path = path
        self._batch = None  # the open copy while a batch() is under way
        if os.path.exists(path) and os.path.getsize(path) and if_exists != "overwrite":
            if if_exists == "fail":
                raise ResultsError(f"{path} exists; choose append or overwrite")
            with _held(path), h5file.locked(path, LOCK_WAIT_S):  # waits while another process holds it
                try:
                    with h5py.File(path, "r", locking=False) as f:
                        _check_format(f, path)
                except ResultsError:
                    raise
                except OSError:
                    raise ResultsError(f"{path} exists and is not an HDF5 file; refusing to append") from None
            return  # a results file already: nothing to write yet
        # a missing (or empty) file is created under the lock, so two runs appending to a new
        # file at once never replace each other's; only overwrite starts from nothing
        self._room()
        with self._update(fresh=if_exists == "overwrite") as f:
            if f.attrs.get("format") != FORMAT:
                f.attrs["format"] = FORMAT
                f.attrs["schema_version"] = SCHEMA_VERSION
            f.require_group("runs")

    @contextlib.contextmanager
    def _update(self, payload=None, fresh: bool = False):
        """The file for one update, once there is room for it and for the copy the update is
        made on (h5file.update). A reader (the plot command) or another run may hold the file
        for a moment: wait for it."""
        self._room(payload, copy=self._batch is None)  # a batch's copy is made once, at its start
        if self._batch is not None:
            yield self._batch
            return
        with _held(self.path), h5file.update(self.path, LOCK_WAIT_S, fresh) as f:
            yield f

    @contextlib.contextmanager
    def batch(self):
        """The writes inside made as one update: the file gets all of them or none of them
        (a flush of every rank, the end of a run), for the cost of one copy."""
        if self._batch is not None:
            yield
            return
        with self._update() as f:
            self._batch = f
            try:
                yield
            finally:
                self._batch = None

    def _room(self, payload=None, copy: bool = True):
        try:
            size = os.path.getsize(self.path) if copy else 0
        except OSError:
            size = 0
        need = SPACE_MARGIN + size + 2 * _nbytes(payload)
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = need
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device on {self.path} (an update needs about "
                                        f"{need // 1024} KiB, {free // 1024} KiB free; nothing written)")

    def begin_run(self, name: str, config: dict, meta: dict) -> str:
        with self._update() as f:
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
        with self._update() as f:
            for k, v in attrs.items():
                f["runs"][name].attrs[k] = _attr(v)

    def run_status(self, name: str) -> str:
        """The @status of a run group (KeyError when there is no such run)."""
        with h5py.File(self.path, "r", locking=False) as f:  # a rename replaces the file whole
            v = f["runs"][name].attrs.get("status", "")
        return v.decode() if isinstance(v, bytes) else str(v)

    def write_rank(self, name: str, rank: int, arrays: dict, attrs: dict):
        with self._update(arrays) as f:
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
        with self._update(data) as f:
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


def _unopenable(path: str, exc: OSError) -> str:
    """Why h5py cannot open `path`: not HDF5 at all, or HDF5 that is damaged (read() takes no
    lock, so a running job holding the file is never the reason)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        head = b""
    if head == b"" and os.path.exists(path) and os.path.getsize(path) == 0:
        return f"{path} is empty (a run that is creating it has not written it yet, or was killed first)"
    if head != b"\x89HDF\r\n\x1a\n":
        return f"{path} is not an HDF5 file"
    return f"{path} is an HDF5 file but damaged or truncated (h5py: {str(exc).splitlines()[0][:200]})"


def read(path: str) -> dict:
    """{'attrs': {...}, 'runs': {name: {attrs..., 'config': dict, 'ranks': {int: {...}}, ...}}}."""
    try:
        f = h5py.File(path, "r", locking=False)  # never block the run that is writing it
    except FileNotFoundError:
        raise ResultsError(f"{path} does not exist") from None
    except OSError as exc:
        raise ResultsError(_unopenable(path, exc)) from None
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
