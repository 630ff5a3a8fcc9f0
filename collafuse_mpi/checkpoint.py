"""Checkpoints: one file per rank per step, written atomically; resume from the newest step
that every rank completed, so a rank that died mid-write never makes the set inconsistent.

A checkpoint folder belongs to one run: `identity.json` beside the step folders records the
config fields that decide the training state (hash and values), the world size and a run id.
A resume whose identity differs is refused, saying what differs; a fresh run clears the folder
when it may (--overwrite, the same identity, or a run that completed) and is refused otherwise,
so it never mixes its steps with another run's.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid

IDENTITY = "identity.json"
ORIGIN = "origin.json"  # the results file and run group the newest steps came from (report.py)
# Settings that leave the training state alone: where things go, how they are timed and logged,
# sampling (after training) and train.steps (a resume may extend a run). Every other field of
# every section counts, so a new section or field counts unless it is named here.
NOT_IDENTITY_SECTIONS = {"sample", "run"}
NOT_IDENTITY_FIELDS = {"train.steps", "train.warmup_steps"}
IDENTITY_RUN_FIELDS = {"run.seed", "run.clients_per_rank"}  # the latter decides which client a rank holds
_STEP = re.compile(r"step(\d+)$")
_bound = {}  # checkpoint folder -> the identity this process's run writes there


class CheckpointError(ValueError):
    """Checkpoints that do not belong to this run: the message says what differs."""


def folder(cfg) -> str:
    return cfg.run.checkpoint_dir or os.path.splitext(os.path.abspath(cfg.run.output))[0] + "-checkpoints"


def identity(cfg, world_size: int) -> dict:
    """What a checkpoint belongs to: the fields that decide the training state, their hash, the
    world size."""
    fields = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            name = f"{section}.{key}"
            counted = section not in NOT_IDENTITY_SECTIONS and name not in NOT_IDENTITY_FIELDS
            if counted or name in IDENTITY_RUN_FIELDS:
                fields[name] = value
    text = json.dumps({"config": fields, "world_size": world_size}, sort_keys=True)
    return {"config": fields, "world_size": world_size, "config_hash": hashlib.sha256(text.encode()).hexdigest()}


def differences(saved: dict, now: dict) -> list[str]:
    """'<what>: <saved> in the checkpoints, <now> now' for each difference."""
    out = []
    if saved.get("world_size") != now["world_size"]:
        out.append(f"world size: {saved.get('world_size')} ranks in the checkpoints, {now['world_size']} now")
    old, new = saved.get("config", {}), now["config"]
    for name in sorted(set(old) | set(new)):
        if old.get(name, "(absent)") != new.get(name, "(absent)"):
            out.append(f"{name}: {old.get(name, '(absent)')!r} in the checkpoints, {new.get(name, '(absent)')!r} now")
    return out


def _steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)) for m in map(_STEP.match, os.listdir(root)) if m), reverse=True)


def read_identity(cfg) -> dict | None:
    try:
        with open(os.path.join(folder(cfg), IDENTITY)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _write_identity(root: str, ident: dict) -> None:
    write_atomic(os.path.join(root, IDENTITY), json.dumps(ident, indent=1, sort_keys=True).encode())


def problem(cfg, world_size: int | None, resume: bool, overwrite: bool) -> str:
    """Why this run may not use the checkpoint folder ('' when it may); changes nothing, so the
    submit-time check asks it too. Without `world_size` the world size is not compared."""
    root, saved = folder(cfg), read_identity(cfg)
    now = identity(cfg, saved.get("world_size") if world_size is None and saved else world_size or 0)
    diff = differences(saved, now) if saved else []
    if resume:
        if saved is None and _steps(root):
            return (f"--resume: the checkpoints in {root} have no {IDENTITY}, so nothing says which "
                    "run they belong to; refusing to resume from them")
        if diff:
            return (f"--resume: the checkpoints in {root} belong to another run (run id "
                    f"{saved.get('run_id', '?')}); it differs in " + "; ".join(diff))
        return ""
    if (_steps(root) or saved) and not (overwrite or (saved and not diff) or (saved or {}).get("complete")):
        what = "; ".join(diff) if saved else f"no {IDENTITY} says which run"
        return (f"{root} holds checkpoints of another run that did not complete ({what}); continue it with "
                "--resume, replace them with --overwrite, or give this run its own --set run.checkpoint_dir=...")
    return ""


def verify(cfg, world_size: int) -> None:
    """Before a resume (rank 0): the checkpoints must be this run's; else say what differs."""
    bad = problem(cfg, world_size, resume=True, overwrite=False)
    if bad:
        raise CheckpointError(bad)
    saved = read_identity(cfg)
    if saved is not None:
        bind(cfg, saved)


def claim(cfg, world_size: int, overwrite: bool) -> None:
    """Before a fresh run (rank 0): clear the folder's old checkpoints when that loses nothing
    resumable (--overwrite, the same identity, a run that completed), else refuse."""
    bad = problem(cfg, world_size, resume=False, overwrite=overwrite)
    if bad:
        raise CheckpointError(bad)
    root = folder(cfg)
    if _steps(root) or read_identity(cfg):
        clear(root)
    bind(cfg, dict(identity(cfg, world_size), run_id=uuid.uuid4().hex,
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), output=os.path.abspath(cfg.run.output)))


def clear(root: str) -> None:
    """Remove the step folders and identity of `root` (nothing else a user keeps there)."""
    for step in _steps(root):
        shutil.rmtree(os.path.join(root, f"step{step:08d}"), ignore_errors=True)
    for name in (IDENTITY, ORIGIN):
        try:
            os.remove(os.path.join(root, name))
        except FileNotFoundError:
            pass


def bind(cfg, ident: dict) -> None:
    """This process's run writes its checkpoints under this identity (every rank calls it)."""
    _bound[folder(cfg)] = ident


def bound(cfg) -> dict | None:
    return _bound.get(folder(cfg))


def mark_complete(cfg) -> None:
    """The run finished: its checkpoints are no longer needed to resume it."""
    saved = read_identity(cfg)
    if saved is not None:
        _write_identity(folder(cfg), dict(saved, complete=True))


def save(cfg, rank: int, step: int, state: dict) -> str:
    """State after `step` completed steps, as <folder>/step<step>/rank<rank>.pt, beside the
    folder's identity. Serialised in memory first, then written: a full disk fails in a plain
    write (naming the path), and the partial file is removed."""
    import torch
    root = folder(cfg)
    d = os.path.join(root, f"step{step:08d}")
    os.makedirs(d, exist_ok=True)
    ident = bound(cfg)
    if ident is not None and not os.path.exists(os.path.join(root, IDENTITY)):
        _write_identity(root, ident)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = os.path.join(d, f"rank{rank}.pt")
    write_atomic(path, buf.getbuffer())
    return path


def write_atomic(path: str, data) -> None:
    """`data` under `path`, never half-written under the final name; on failure (a full disk)
    the partial file is removed and the error names the path."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: ranks may write the same identity at once
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(exc.errno, f"{exc.strerror} on {path}" if exc.strerror else f"cannot write {path}") from None


def latest_any(cfg) -> int:
    """The newest step with a folder (complete or not), or 0."""
    return next(iter(_steps(folder(cfg))), 0)


def latest_complete(cfg, ranks: list[int]) -> int:
    """The largest step with a checkpoint from every one of `ranks`, or 0 when there is none."""
    root = folder(cfg)
    for step in _steps(root):
        d = os.path.join(root, f"step{step:08d}")
        if all(os.path.exists(os.path.join(d, f"rank{r}.pt")) for r in ranks):
            return step
    return 0


def load(cfg, rank: int, step: int) -> dict:
    import torch
    return torch.load(os.path.join(folder(cfg), f"step{step:08d}", f"rank{rank}.pt"), weights_only=False)
