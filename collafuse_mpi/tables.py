"""Tidy tables from a results file: plain lists of dicts, one row per observation. No torch.

    runs      one row per run: its attributes and every config field (config.<section>.<key>)
    steps     one row per run, rank, step: wall seconds, loss, images, energy
    phases    one row per run, rank, step, phase: wall seconds, process CPU-seconds, FLOPs
    windows   one row per run, rank, window (data_load, train, sample, metrics)
    metrics   one row per run, client (or 'pooled'), metric: the value and its KID feature set
    comm      one row per run, rank, direction, message kind, peer: bytes and messages

`collafuse-export` writes them as CSV or JSON (records), which pandas reads directly.
"""
from __future__ import annotations

import math

import numpy as np

TABLES = ("runs", "steps", "phases", "windows", "metrics", "comm")


def _num(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # CSV: empty, JSON: null (never a fake zero)
    return v


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0):
            out[key] = ",".join(str(_num(x)) for x in np.ravel(v))
        else:
            out[key] = _num(v)
    return out


def seed_of(run: dict) -> int:
    return int(run.get("config", {}).get("run", {}).get("seed", 0))


def runs(res: dict) -> list[dict]:
    rows = []
    for name, run in res["runs"].items():
        row = {"run": name, "seed": seed_of(run)}
        for key in ("status", "cut", "n_clients", "timesteps", "world_size", "timing_mode", "git_commit",
                    "start_time", "end_time", "resumed_from_step"):
            if key in run:
                row[key] = _num(run[key])
        kid = run.get("metrics", {}).get("pooled", {}).get("kid", {})
        row["pooled_kid"], row["kid_features"] = _num(kid.get("mean")), kid.get("features")
        row.update(_flat(run.get("config", {}), "config."))
        rows.append(row)
    return rows


def _ranks(res):
    for name, run in res["runs"].items():
        phases = list(run.get("phases", []))
        for r, rank in sorted(run.get("ranks", {}).items()):
            yield name, run, r, rank, phases


def steps(res: dict) -> list[dict]:
    rows = []
    for name, _run, r, rank, _ in _ranks(res):
        if "step" not in rank:
            continue
        wall = np.asarray(rank["step_end"]) - np.asarray(rank["step_start"])
        for i, s in enumerate(np.asarray(rank["step"])):
            rows.append({"run": name, "rank": r, "role": rank.get("role"), "step": int(s),
                         "warmup": bool(rank["warmup"][i]), "seconds": _num(wall[i]),
                         "loss": _num(float(rank["loss"][i])), "images": int(rank["images"][i]),
                         "energy_j": _num(float(rank["energy_j"][i]))})
    return rows


def phases(res: dict) -> list[dict]:
    rows = []
    for name, _run, r, rank, names in _ranks(res):
        if "phase_seconds" not in rank:
            continue
        secs = np.asarray(rank["phase_seconds"])
        cpu = np.asarray(rank.get("phase_cpu_seconds", np.full(secs.shape, np.nan)))
        flops = np.asarray(rank.get("phase_flops", np.full(secs.shape, np.nan)))
        for i, s in enumerate(np.asarray(rank["step"])):
            for j, ph in enumerate(names):
                rows.append({"run": name, "rank": r, "role": rank.get("role"), "step": int(s),
                             "warmup": bool(rank["warmup"][i]), "phase": ph, "seconds": _num(secs[i, j]),
                             "cpu_seconds": _num(float(cpu[i, j])), "flops": _num(float(flops[i, j]))})
    return rows


def windows(res: dict) -> list[dict]:
    rows = []
    for name, _run, r, rank, _ in _ranks(res):
        for w, v in rank.get("windows", {}).items():
            rows.append({"run": name, "rank": r, "role": rank.get("role"), "window": w,
                         "seconds": _num(v.get("end", np.nan) - v.get("start", np.nan)),
                         "cpu_seconds": _num(v.get("cpu_seconds")), "flops": _num(v.get("flops")),
                         "energy_j": _num(v.get("energy_j"))})
    return rows


def metrics(res: dict) -> list[dict]:
    rows = []
    for name, run in res["runs"].items():
        for who, m in run.get("metrics", {}).items():
            features = m.get("kid", {}).get("features") if isinstance(m.get("kid"), dict) else None
            for key, value in _flat(m).items():
                if isinstance(value, str):
                    continue  # names (features, estimator) are columns, not values
                rows.append({"run": name, "client": who, "metric": key, "value": value,
                             "kid_features": features if key.startswith("kid.") else None})
    return rows


def comm(res: dict) -> list[dict]:
    rows = []
    for name, _run, r, rank, _ in _ranks(res):
        c = rank.get("comm", {})
        for i in range(len(np.atleast_1d(c.get("bytes", [])))):
            rows.append({"run": name, "rank": r, "direction": str(c["direction"][i]), "kind": str(c["kind"][i]),
                         "peer": int(c["peer"][i]), "bytes": int(c["bytes"][i]), "messages": int(c["messages"][i])})
    return rows


def build(res: dict, name: str) -> list[dict]:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; choose from {', '.join(TABLES)}")
    return globals()[name](res)
