"""Shared helpers: how to launch mpirun here, and a tiny config that runs in seconds."""
import os
import shutil
import subprocess
import sys

import pytest

from collafuse_mpi import config

TINY = ["--steps", "4", "--batch-size", "4", "--timesteps", "10", "--sample-steps", "4",
        "--samples-per-client", "4", "--quiet", "--set", "privacy.attacks=quick"]


def mpirun_prefix(n: int) -> list:
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("no mpirun on PATH (run the tests through scripts/test.sh)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    flags = ["--oversubscribe"] if "Open MPI" in version else []
    return [exe, "-n", str(n), *flags]


def mpi_env() -> dict:
    env = dict(os.environ)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def launch(n: int, args: list, timeout: float = 240, env_extra: dict | None = None, cwd=None):
    env = mpi_env()
    env.update(env_extra or {})
    cmd = mpirun_prefix(n) + [sys.executable, "-m", "collafuse_mpi.run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def imported_after(code: str, module: str) -> bool:
    """Whether `module` is in sys.modules after `code` ran in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint({module!r} in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


def tiny_config(output) -> config.Config:
    cfg = config.Config()
    cfg.train.steps, cfg.train.batch_size = 4, 4
    cfg.diffusion.timesteps, cfg.diffusion.sample_steps = 10, 4
    cfg.sample.samples_per_client = 4
    cfg.run.output, cfg.run.quiet = str(output), True
    cfg.privacy.attacks = "quick"
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests, as each rank runs; restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_kid(a: dict, b: dict, images_a, images_b):
    """KIDs of two runs that should agree. KID scores the stored uint8 samples, so identical samples
    are identical inputs; the unbiased MMD^2 is a difference of large cubic-kernel sums in float32,
    so feature rounding (thread counts differ between MPI and loopback runs) still moves it:
    1.4e-4 apart was seen for identical samples, 0.15-0.2% for samples 1 uint8 level apart in a
    few pixels."""
    import numpy as np

    same = np.array_equal(np.asarray(images_a), np.asarray(images_b))
    assert b["mean"] == pytest.approx(a["mean"], rel=1e-3 if same else 1e-2, abs=1e-5)
