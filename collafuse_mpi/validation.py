"""Config checks: every field's type and range, the world size, where the run writes. No torch,
no data: they run before any rank starts work, and at submit time (--check).

Types are driven by the dataclasses (every field must hold a value of its default's type: bool,
int, float, str, list, whatever it came from), so a new field or section is covered.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import fields

from .config import (ATTACK_SETS, ATTACKS, CUT_NOISE, DATASETS, IF_EXISTS, KID_FEATURES, MODEL_PRESETS,
                     PARTITIONS, SAMPLERS, SCHEDULES, TIMING_MODES, TRISTATE, Config, ConfigError, field_kinds)

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _of_kind(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _what(value) -> str:
    """A value as a user would name it: the string '100', the integer 5, true."""
    if isinstance(value, bool):
        return str(value).lower()
    for kind, word in ((str, "the string"), (int, "the integer"), (float, "the number"),
                       (list, "the list"), (dict, "the table")):
        if isinstance(value, kind):
            return f"{word} {value!r}"
    return "nothing" if value is None else repr(value)


def type_problems(cfg: Config) -> list[tuple[str, str, str]]:
    """(section, key, message) for every field whose value is not of the field's type."""
    out = []
    for sec in fields(cfg):
        sub = getattr(cfg, sec.name)
        for key, kind in field_kinds(type(sub)).items():
            value = getattr(sub, key)
            if kind is not object and not _of_kind(value, kind):
                out.append((sec.name, key, f"{sec.name}.{key} must be {_KIND_WORDS[kind]}, got {_what(value)}"))
    return out


def _with_defaults(cfg: Config, bad) -> Config:
    """A copy where the fields of the wrong type hold their defaults: the range checks then run on
    values of the right type, and a field of the wrong type gets that one message only."""
    out = Config(**{s.name: dataclasses.replace(getattr(cfg, s.name)) for s in fields(cfg)})
    for section, key, _ in bad:
        setattr(getattr(out, section), key, getattr(type(getattr(out, section))(), key))
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise one ConfigError listing every problem found. Checks that need no torch and no data."""
    bad = type_problems(cfg)
    problems = [msg for _, _, msg in bad]
    cfg = _with_defaults(cfg, bad)

    def _check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    d, m, data, tr, s, r = cfg.diffusion, cfg.model, cfg.data, cfg.train, cfg.sample, cfg.run
    _check(m.preset in MODEL_PRESETS, f"model.preset {m.preset!r} unknown; choose {', '.join(MODEL_PRESETS)}")
    _check(_is_number(m.dropout) and 0 <= m.dropout < 1, "model.dropout must be in [0, 1)")
    _check(_is_int(d.timesteps) and d.timesteps >= 2, "diffusion.timesteps must be an integer >= 2")
    _check(d.schedule in SCHEDULES, f"diffusion.schedule {d.schedule!r} unknown; choose {', '.join(SCHEDULES)}")
    _check(_is_number(d.cut) and 0.0 <= d.cut <= 1.0, f"cut must be a number in [0, 1], got {d.cut!r}")
    _check(isinstance(d.client_cuts, list), "diffusion.client_cuts must be a list of numbers, one per client")
    for c in d.client_cuts:
        _check(_is_number(c) and 0.0 <= c <= 1.0, f"client cut must be a number in [0, 1], got {c!r}")
    _check(d.sampler in SAMPLERS, f"diffusion.sampler {d.sampler!r} unknown; choose {', '.join(SAMPLERS)}")
    _check(_is_int(d.sample_steps) and 2 <= d.sample_steps <= d.timesteps,
           "diffusion.sample_steps must be an integer in [2, timesteps]")
    _check(data.dataset in DATASETS, f"unknown dataset {data.dataset!r}; choose {', '.join(DATASETS)}")
    if data.dataset in ("npz", "folder"):
        want_file = data.dataset == "npz"
        if not data.path:
            problems.append(f"dataset {data.dataset} needs data.path")
        elif not os.path.exists(data.path):
            problems.append(f"data path {data.path} does not exist")
        elif not os.access(data.path, os.R_OK):
            problems.append(f"data path {data.path} is not readable")
        elif want_file != os.path.isfile(data.path):
            problems.append(f"data path {data.path} is not a {'file' if want_file else 'folder'}")
    levels = len(MODEL_PRESETS.get(m.preset, (0, (1,), 0))[1])
    div = 2 ** (levels - 1)
    _check(_is_int(data.image_size) and data.image_size >= 4 and data.image_size % div == 0,
           f"image size {data.image_size} does not fit model preset {m.preset}: "
           f"it must be a multiple of {div} and at least 4")
    _check(_is_int(data.channels) and data.channels in (1, 3), "data.channels must be 1 or 3")
    _check(data.partition in PARTITIONS, f"data.partition {data.partition!r} unknown; choose {', '.join(PARTITIONS)}")
    _check(_is_number(data.alpha) and data.alpha > 0, "data.alpha must be > 0")
    _check(_is_number(data.holdout) and 0 < data.holdout < 1, "data.holdout must be in (0, 1)")
    _check(_is_int(data.max_images) and data.max_images >= 0, "data.max_images must be >= 0")
    _check(_is_int(tr.steps) and tr.steps >= 1, "train.steps must be >= 1")
    _check(_is_int(tr.batch_size) and tr.batch_size >= 1, "train.batch_size must be >= 1")
    _check(_is_number(tr.lr) and tr.lr > 0, "train.lr must be > 0")
    _check(_is_number(tr.ema_decay) and 0 <= tr.ema_decay < 1, "train.ema_decay must be in [0, 1)")
    _check(_is_number(tr.grad_clip) and tr.grad_clip >= 0, "train.grad_clip must be >= 0")
    _check(_is_int(tr.max_in_flight) and tr.max_in_flight >= 1, "train.max_in_flight must be >= 1")
    _check(tr.autocast in ("off", "bf16"), f"train.autocast must be off or bf16, not {tr.autocast!r}")
    _check(isinstance(tr.channels_last, bool), "train.channels_last must be true or false")
    _check(_is_int(tr.warmup_steps) and tr.warmup_steps >= 0, "train.warmup_steps must be >= 0")
    _check(_is_int(s.samples_per_client) and s.samples_per_client >= 1,
           "sample.samples_per_client must be >= 1")
    _check(s.kid_features in KID_FEATURES, f"sample.kid_features {s.kid_features!r} unknown; "
           f"choose {', '.join(KID_FEATURES)}")
    _check(r.device in ("auto", "cpu", "cuda"), "run.device must be auto, cpu or cuda")
    _check(r.if_exists in IF_EXISTS, f"run.if_exists must be one of {', '.join(IF_EXISTS)}")
    _check(r.timing in TIMING_MODES, f"run.timing must be one of {', '.join(TIMING_MODES)}")
    _check(r.cuda_aware in TRISTATE, f"run.cuda_aware must be one of {', '.join(TRISTATE)}")
    _check(_is_int(r.torch_threads) and r.torch_threads >= 1, "run.torch_threads must be >= 1")
    _check(not (tr.batched_clients is True and (m.dropout != 0 or tr.autocast != "off" or tr.channels_last)),
           "train.batched_clients needs model.dropout = 0, train.autocast = off and train.channels_last = false")
    _check(_is_int(r.clients_per_rank) and r.clients_per_rank >= 1,
           f"run.clients_per_rank must be an integer >= 1, got {r.clients_per_rank!r}")
    _check(_is_int(tr.clients_per_step) and tr.clients_per_step >= 0,
           f"train.clients_per_step must be an integer >= 0 (0 = all clients), got {tr.clients_per_step!r}")
    _check(_is_int(r.flush_every) and r.flush_every >= 0, "run.flush_every must be >= 0")
    _check(_is_int(r.checkpoint_every) and r.checkpoint_every >= 0, "run.checkpoint_every must be >= 0")
    _check(_is_int(r.stop_check_every) and r.stop_check_every >= 1, "run.stop_check_every must be an integer >= 1")
    _check(_is_number(r.progress_every) and r.progress_every >= 0, "run.progress_every must be >= 0")
    _check(_is_number(r.recv_timeout) and r.recv_timeout > 0, "run.recv_timeout must be > 0")
    _check(_is_int(r.seed) and 0 <= r.seed < 2**63, f"run.seed must be an integer in [0, 2**63), got {r.seed!r}")
    _check("/" not in r.run_name and r.run_name != ".",
           f"run.run_name {r.run_name!r} must not contain '/': it names one group of the results file")
    problems.extend(output_problems(cfg))
    problems.extend(_privacy_problems(cfg))
    _check(_is_number(s.eta) and 0 <= s.eta <= 1, "sample.eta must be a number in [0, 1]")
    if world_size is not None:
        _check(world_size >= 2, f"need at least 2 ranks (1 server + 1 client), got {world_size}; "
               "launch with mpirun -n 3 or more")
        per_rank = r.clients_per_rank if _is_int(r.clients_per_rank) and r.clients_per_rank >= 1 else 1
        n_clients = (world_size - 1) * per_rank  # a bad clients_per_rank has its own message
        _check(not d.client_cuts or len(d.client_cuts) == n_clients,
               f"{len(d.client_cuts)} client cuts given for {n_clients} clients")
        _check(not _is_int(tr.clients_per_step) or tr.clients_per_step <= n_clients,
               f"train.clients_per_step {tr.clients_per_step} is more than the {n_clients} clients of the run "
               f"({world_size - 1} client ranks x run.clients_per_rank {r.clients_per_rank})")
    if problems:
        raise ConfigError(problems)


def _writable_folder(path: str) -> str:
    """Why files cannot be written under folder `path`, created if missing ('' when they can).
    Tried for real (a temporary file in the nearest folder that exists): permissions alone
    do not show a read-only file system, and root passes every permission check."""
    import tempfile
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".collafuse-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"{probe} is not writable ({exc.strerror})"
    return ""


def output_problems(cfg: Config) -> list[str]:
    """Every place a run writes, checked before it trains: the results file, the models folder,
    the checkpoint folder. The results file may not be the data it reads."""
    r, out = cfg.run, []
    if not r.output:
        return ["run.output must be a file path"]
    if os.path.isdir(r.output):
        return [f"output {r.output} is a folder, not a file"]
    out_dir = os.path.dirname(os.path.abspath(r.output))
    why = _writable_folder(out_dir) if os.path.isdir(out_dir) else "it does not exist"
    if why:
        out.append(f"output folder {out_dir} is not writable: {why}")
    if os.path.exists(r.output):
        if r.if_exists == "fail":
            out.append(f"output {r.output} exists; pass --append to add a run or --overwrite to replace it")
        if cfg.data.path and os.path.exists(cfg.data.path) and os.path.samefile(r.output, cfg.data.path):
            out.append(f"output {r.output} is the data file the run reads (data.path); choose another --output")
    for name, folder, used in (("run.save_dir", r.save_dir, r.save_models),
                               ("run.checkpoint_dir", r.checkpoint_dir, True)):
        why = _writable_folder(folder) if folder and used else ""
        if why:
            out.append(f"{name} {folder} cannot be written: {why}")
    return out


def attack_set(cfg: Config) -> tuple:
    """The attacks privacy.attacks names, in the suite's order."""
    spec = cfg.privacy.attacks.strip()
    if spec in ATTACK_SETS:
        return ATTACK_SETS[spec]
    names = [a.strip() for a in spec.split(",") if a.strip()]
    return tuple(a for a in ATTACKS if a in names)


def _privacy_problems(cfg: Config) -> list[str]:
    p, problems = cfg.privacy, []

    def _check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)
    _check(isinstance(p.attacks, str), "privacy.attacks must be a string")
    if isinstance(p.attacks, str) and p.attacks.strip() not in ATTACK_SETS:
        bad = [a.strip() for a in p.attacks.split(",") if a.strip() and a.strip() not in ATTACKS]
        _check(not bad, f"privacy.attacks: unknown attack {', '.join(bad)}; choose all, quick, none "
               f"or from {', '.join(ATTACKS)}")
    _check(p.cut_noise in CUT_NOISE, f"privacy.cut_noise must be one of {', '.join(CUT_NOISE)}")
    _check(_is_number(p.aux_fraction) and 0 <= p.aux_fraction < 0.5, "privacy.aux_fraction must be in [0, 0.5)")
    _check(isinstance(p.aux_path, str), "privacy.aux_path must be a path string")
    if p.aux_path:
        _check(os.path.exists(p.aux_path), f"privacy.aux_path {p.aux_path} does not exist")
    for name in ("max_views", "learned_steps", "mia_samples", "mia_draws", "reid_views"):
        v = getattr(p, name)
        _check(_is_int(v) and v >= 1, f"privacy.{name} must be an integer >= 1")
    _check(_is_number(p.link_z) and p.link_z > 0, "privacy.link_z must be > 0")
    _check(_is_number(p.max_seconds) and p.max_seconds > 0, "privacy.max_seconds must be > 0")
    return problems
