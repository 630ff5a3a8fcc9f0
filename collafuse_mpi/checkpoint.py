"""Checkpoints: one file per rank per step, written atomically; resume from the newest step
that every rank completed, so a rank that died mid-write never makes the set inconsistent."""
from __future__ import annotations

import os
import re

import torch


def folder(cfg) -> str:
    return cfg.run.checkpoint_dir or os.path.splitext(os.path.abspath(cfg.run.output))[0] + "-checkpoints"


def save(cfg, rank: int, step: int, state: dict) -> str:
    """State after `step` completed steps, as <folder>/step<step>/rank<rank>.pt."""
    d = os.path.join(folder(cfg), f"step{step:08d}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"rank{rank}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a half-written file never carries the final name
    return path


def steps(cfg) -> list[int]:
    """Steps that have a folder (complete or not), newest first."""
    root = folder(cfg)
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)) for m in map(re.compile(r"step(\d+)$").match, os.listdir(root)) if m),
                  reverse=True)


def any_steps(cfg) -> bool:
    """True when the folder holds a saved rank file: a fresh run must not mix its steps in."""
    root = folder(cfg)
    return any(any(n.endswith(".pt") for n in os.listdir(os.path.join(root, f"step{s:08d}"))) for s in steps(cfg))


def latest_any(cfg) -> int:
    return next(iter(steps(cfg)), 0)


def latest_complete(cfg, ranks: list[int]) -> int:
    """The largest step with a checkpoint from every one of `ranks`, or 0 when there is none."""
    root = folder(cfg)
    for step in steps(cfg):
        d = os.path.join(root, f"step{step:08d}")
        if all(os.path.exists(os.path.join(d, f"rank{r}.pt")) for r in ranks):
            return step
    return 0


def load(cfg, rank: int, step: int) -> dict:
    return torch.load(os.path.join(folder(cfg), f"step{step:08d}", f"rank{rank}.pt"), weights_only=False)
