"""Run configuration: one typed dataclass tree, loadable from TOML, validated up front.

No torch here: the plot command and the job scripts read configs on nodes without a GPU stack.
Every field carries its meaning in the docstring below its class; `describe()` prints them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

DATASETS = ("digits", "shapes", "npz", "folder")
SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")
PARTITIONS = ("iid", "dirichlet")
MODEL_PRESETS = {  # base channels, channel multipliers, time-embedding width
    "tiny": (16, (1, 2), 64),
    "small": (32, (1, 2, 2), 128),
    "base": (64, (1, 2, 2, 4), 256),
}
IF_EXISTS = ("fail", "append", "overwrite")
TIMING_MODES = ("attribution", "throughput")
TRISTATE = ("auto", "yes", "no")
CUT_NOISE = ("fresh", "per_image")
ATTACKS = ("scalar", "linear", "public_linear", "learned", "multiview", "reid", "membership", "sampling")
ATTACK_SETS = {"all": ATTACKS, "quick": tuple(a for a in ATTACKS if a != "learned"), "none": ()}
KID_FEATURES = ("auto", "digits-classifier", "shapes-classifier", "inception", "random-conv")


class ConfigError(ValueError):
    """An invalid configuration: raised before any rank starts work. `problems` lists every
    problem found; the message is the one problem, or all of them one per line."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        one = len(self.problems) == 1
        super().__init__(self.problems[0] if one else f"{len(self.problems)} problems in the config:\n  "
                         + "\n  ".join(self.problems))


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """UNet size preset: tiny (16 ch, 2 levels), small (32 ch, 3 levels), base (64 ch, 4 levels)."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""


@dataclass
class DiffusionConfig:
    timesteps: int = 100
    """T, the length of the denoising chain (t = 1..T)."""
    schedule: str = "cosine"
    """Noise schedule: linear or cosine."""
    cut: float = 0.4
    """Cut ratio c in [0, 1]: the client's share of the chain, k = round(c*T).
    c = 1 is purely local (server idle), c = 0 purely central."""
    client_cuts: list = field(default_factory=list)
    """Per-client cut ratios (one per logical client, in logical-client order) for heterogeneous
    cuts; empty means all use `cut`."""
    sampler: str = "ddim"
    """Sampler: ddpm (every step) or ddim (eta = 0, `sample_steps` steps; the cut is always one)."""
    sample_steps: int = 20
    """Number of DDIM steps over the whole chain (ignored for ddpm)."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    """digits (scikit-learn's 8x8 digits, shipped with the package), shapes (procedural),
    npz (MedMNIST-layout file at `path`), folder (PNG/JPG images under `path`)."""
    path: str = ""
    """Data file (npz) or folder (folder); unused by digits and shapes."""
    image_size: int = 16
    """Side of the square images the model sees; must be divisible by 2**(levels-1) of the preset."""
    channels: int = 1
    """Image channels: 1 (grayscale) or 3 (RGB)."""
    partition: str = "iid"
    """How images are split across clients: iid or dirichlet (non-IID by label)."""
    alpha: float = 0.5
    """Dirichlet concentration for the non-IID partition (small = more skewed)."""
    holdout: float = 0.2
    """Fraction of each client's partition kept out of training for evaluation."""
    max_images: int = 0
    """Use at most this many images in all (0 = all)."""


@dataclass
class TrainConfig:
    steps: int = 150
    """Training steps per client."""
    batch_size: int = 32
    """Images per client per step (the server fuses one batch from each client)."""
    lr: float = 2e-3
    """AdamW learning rate, for the server and every client."""
    ema_decay: float = 0.99
    """Decay of the exponential moving average of the weights used for sampling."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 = off)."""
    max_in_flight: int = 2
    """Server batches a client may have sent that the server has not yet taken, before it waits."""
    sync_sends: bool = True
    """Send training batches by synchronous send (MPI_Issend): a batch counts as in flight until
    the server has matched it, so max_in_flight bounds how far a client runs ahead whatever the
    protocol. An eager batch still leaves at once. False: plain sends, which complete once
    buffered when eager; clients may then run up to 2 * run.stop_check_every steps ahead and
    rank 0 holds their batches (bench/results/run-ahead.md)."""
    warmup_steps: int = 3
    """Steps marked as warm-up in the results (kept, never dropped)."""
    autocast: str = "off"
    """Training forward pass under torch.autocast: off, or bf16 (the loss stays float32)."""
    channels_last: bool = False
    """Keep models and training inputs in channels_last memory format."""
    batched_clients: bool = False
    """Train a rank's logical clients as one batched computation (their stacked weights under
    torch.func.vmap) instead of one after another; equal to the loop to float tolerance. Needs
    model.dropout = 0, train.autocast = off and train.channels_last = false."""
    clients_per_step: int = 0
    """Cohort size: logical clients that take part in each step, drawn from the run seed and the
    step (the same draw on every rank); 0 = all. Clients outside the cohort skip the step."""


@dataclass
class SampleConfig:
    samples_per_client: int = 16
    """Images each client generates after training (through the server when k < T)."""
    kid_features: str = "auto"
    """KID feature set: auto (the dataset's own classifier for digits and shapes, else inception
    where its weights are on disk, else random-conv), or one of digits-classifier,
    shapes-classifier, inception, random-conv. Recorded with every KID."""
    eta: float = 0.0
    """DDIM stochasticity in [0, 1]: 0 is deterministic (the final sample is a function of the
    x_k the server sent), 1 has DDPM's posterior variance. Ignored by ddpm."""
    fused: bool = True
    """The server answers every client's sample request in one batched chain (all chains start at
    T, each leaves at its own k + 1); false: one client after another (the reference)."""


@dataclass
class PrivacyConfig:
    attacks: str = "all"
    """Attacks rank 0 runs on what it received: all, quick (all but the learned attacker), none,
    or a comma list of scalar, linear, public_linear, learned, multiview, reid, membership, sampling."""
    cut_noise: str = "fresh"
    """Noise of the cut image x_k: fresh (a new eps_c for every batch: every epoch sends a new
    view of each image) or per_image (one eps_c per training image, kept on the client: every
    view of an image is the same x_k)."""
    aux_fraction: float = 0.1
    """Share of the dataset carved out, before partitioning, as the attacker's public data
    (disjoint from every client's); 0 = none (then aux_path, or no public-data attacks)."""
    aux_path: str = ""
    """Public data for the attacker from another file or folder (same format as data.dataset)."""
    max_views: int = 8192
    """Views (received cut images) per client that rank 0 keeps for the attacks."""
    learned_steps: int = 600
    """Training steps of the learned attacker (a denoiser trained on the public data)."""
    mia_samples: int = 256
    """Members and non-members each used for membership inference (at most the held-out count)."""
    mia_draws: int = 8
    """Noise draws per image in the membership losses."""
    reid_views: int = 512
    """Views scored by re-identification."""
    link_z: float = 3.0
    """Linking threshold: a view is linked to views of other steps whose likelihood-ratio distance
    is below its mean for one image plus link_z standard deviations (docs/privacy.md)."""
    max_seconds: float = 3600.0
    """How long the clients wait for rank 0's attacks (beyond run.recv_timeout) before they end
    the job naming rank 0."""


@dataclass
class RunConfig:
    seed: int = 0
    """Run seed; the server and every logical client derive their own seeds from it."""
    clients_per_rank: int = 1
    """Logical clients each client rank hosts, each with its own data partition, model, optimiser,
    random streams and cut: a world of R ranks runs (R - 1) * clients_per_rank clients."""
    device: str = "auto"
    """cpu, cuda, or auto (local rank -> GPU when GPUs exist, else CPU)."""
    output: str = "results.h5"
    """HDF5 results file (rank 0 writes it)."""
    if_exists: str = "fail"
    """What to do when `output` exists: fail, append (a new run group) or overwrite."""
    run_name: str = ""
    """Name of the run group in the results file ('' = derived from the cut and time)."""
    timing: str = "attribution"
    """attribution (sync at phase edges) or throughput (no extra syncs)."""
    cuda_aware: str = "auto"
    """Pass CUDA tensors to MPI directly: auto (detect), yes, no (stage through host)."""
    torch_threads: int = 1
    """torch intra-op threads per rank."""
    save_dir: str = ""
    """Folder for final models and samples, one sub-folder per run name ('' = <output>-models)."""
    quiet: bool = False
    """No progress output on rank 0 (a bar on a terminal, plain lines in a job log)."""
    progress_every: float = 30.0
    """Seconds between progress lines when stderr is not a terminal (a batch job's log)."""
    flush_every: int = 25
    """Write every rank's completed steps to the results file every this many steps (0 = only at the end)."""
    recv_timeout: float = 600.0
    """Seconds a rank waits on a peer (a message, a send in flight, a flush or the final gather)
    before it ends the job naming that peer; must exceed the longest a peer computes without
    answering (loading its data, metrics). Clients wait twice this for rank 0, so that rank 0,
    which may be waiting on a silent client, names it first."""
    checkpoint_every: int = 0
    """Every rank saves model, optimiser, EMA and RNG state every this many steps (0 = never)."""
    checkpoint_dir: str = ""
    """Folder for checkpoints ('' = next to `output`, named <output>-checkpoints)."""
    resume: bool = False
    """Continue from the last checkpoint that every rank completed."""
    stop_check_every: int = 5
    """On SIGUSR1/SIGTERM every rank saves and stops at one shared step edge; ranks vote on it
    every this many steps (a vote is read one such interval after it starts)."""
    pooled_kid: bool = True
    """Pool KID over clients on rank 0; clients send it feature vectors of held-out images, never images."""
    store_real: bool = False
    """Store a grid of each client's held-out real images in the results file (off: client data stays out)."""
    save_models: bool = True
    """Save each rank's final (EMA) model and each client's samples under `save_dir`."""
    tcp_eager: bool = True
    """Raise Open MPI's TCP eager limit (OMPI_MCA_btl_tcp_eager_limit) to hold one training
    message, up to 4 MiB, so that batches from other hosts land while the server computes
    instead of each waiting for a rendezvous handshake; a limit set in the environment is kept.
    Training batches go by synchronous send (train.sync_sends), so train.max_in_flight still
    bounds how many of them rank 0 holds per client (see collafuse_mpi/mpi_params.py)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def n_clients(self, world_size: int) -> int:
        """Logical clients of a world of `world_size` ranks (rank 0 is the server)."""
        return (world_size - 1) * self.run.clients_per_rank

    def cut_steps(self, n_clients: int) -> list[int]:
        """k for each logical client (index 0 = the first client of rank 1)."""
        cuts = self.diffusion.client_cuts or [self.diffusion.cut] * n_clients
        return [cut_to_k(c, self.diffusion.timesteps) for c in cuts]


def cut_to_k(cut: float, timesteps: int) -> int:
    """k = round(c*T): the client owns t in 1..k, the server t in k+1..T."""
    return int(round(float(cut) * timesteps))


SECTIONS = {f.name: f.type for f in fields(Config)}


def _section_classes():
    return {f.name: f.default_factory().__class__ for f in fields(Config)}


def from_dict(data: dict) -> Config:
    """A Config from nested tables; every unknown section or key is reported at once. Values
    are taken as given: validate() checks their types and ranges."""
    cfg = Config()
    classes = _section_classes()
    problems = []
    for section, values in data.items():
        if section not in classes:
            problems.append(f"unknown config section [{section}]; known: {', '.join(classes)}")
            continue
        if not isinstance(values, dict):
            problems.append(f"config section [{section}] must be a table")
            continue
        sub = getattr(cfg, section)
        names = {f.name for f in fields(sub)}
        for key, value in values.items():
            if key not in names:
                problems.append(f"unknown config key {section}.{key}; known: {', '.join(sorted(names))}")
            else:
                setattr(sub, key, value)
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path: str | None) -> Config:
    if not path:
        return Config()
    try:
        with open(path, "rb") as fh:
            return from_dict(tomllib.load(fh))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def set_value(cfg: Config, dotted: str, raw) -> None:
    """Apply one override `section.key=value`, coercing text to the field's declared type."""
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r} must look like section.key")
    section, key = dotted.split(".", 1)
    classes = _section_classes()
    if section not in classes:
        raise ConfigError(f"unknown config section {section!r}")
    sub = getattr(cfg, section)
    kinds = field_kinds(classes[section])
    if key not in kinds:
        raise ConfigError(f"unknown config key {dotted}")
    setattr(sub, key, _coerce(dotted, kinds[key], raw))


def _coerce(name, kind, raw):
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (int, float):
            return kind(raw)
        if kind is list:
            return [float(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None
    return raw


def field_kinds(cls) -> dict:
    """{field name: bool | int | float | str | list}, from each field's default."""
    out = {}
    for f in fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = next(k for k in (bool, int, float, str, list, object) if isinstance(default, k))
    return out


def describe() -> str:
    """Every field with its default and docstring, for --help-config."""
    import ast
    import inspect
    lines = []
    for sec in fields(Config):
        cls = sec.default_factory().__class__
        tree = ast.parse(inspect.getsource(cls))
        docs = {}
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
        inst = cls()
        lines.append(f"[{sec.name}]")
        for f in fields(cls):
            lines.append(f"  {f.name} = {getattr(inst, f.name)!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


CHECKS = ("validate", "output_problems", "type_problems", "attack_set")


def __getattr__(name):
    """The checks live in validation.py (which imports this module); they stay reachable here."""
    if name in CHECKS:
        from . import validation
        return getattr(validation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
