"""Checkpoint and resume: an interrupted run, resumed, equals the uninterrupted one on CPU."""
import os

import numpy as np
import pytest

from collafuse_mpi import results
from conftest import TINY, launch

pytestmark = pytest.mark.mpi
ARGS = [*TINY, "--steps", "8", "--checkpoint-every", "4", "--cut", "0.5", "--seed", "3"]


def _run(path, name=None):
    runs = results.read(path)["runs"]
    return runs[name] if name else next(iter(runs.values()))


def test_resumed_run_equals_uninterrupted(tmp_path):
    whole, parts = tmp_path / "whole.h5", tmp_path / "parts.h5"
    p = launch(3, [*ARGS, "-o", str(whole)])
    assert p.returncode == 0, p.stderr
    p = launch(3, [*ARGS, "-o", str(parts), "--run-name", "first"], env_extra={"COLLAFUSE_FAIL_AT": "1:6"})
    assert p.returncode != 0
    ckpt = str(parts).replace(".h5", "-checkpoints")
    # rank 1 died in step 6; a rank running ahead may have saved step 8 alone, which resume must skip
    assert "step00000004" in os.listdir(ckpt)
    p = launch(3, [*ARGS, "-o", str(parts), "--append", "--resume", "--run-name", "second"])
    assert p.returncode == 0, p.stderr
    a, b = _run(whole), _run(parts, "second")
    assert b["resumed_from_step"] == 4
    # the crashed run stayed "running"; the resumed one marks it and both name each other
    first = _run(parts, "first")
    assert first["status"] == "interrupted" and first["continued_in"] == f"{parts}::second"
    assert b["resumed_from"] == f"{parts}::first"
    for rank in range(3):
        assert list(b["ranks"][rank]["step"]) == [4, 5, 6, 7]
        np.testing.assert_allclose(b["ranks"][rank]["loss"], a["ranks"][rank]["loss"][4:], rtol=1e-5, atol=1e-6)
    for c in ("client_0", "client_1"):
        diff = np.abs(a["samples"][c]["generated"].astype(int) - b["samples"][c]["generated"].astype(int))
        assert diff.max() <= 1


def test_resume_without_checkpoints_fails_clearly(tmp_path):
    p = launch(3, [*TINY, "--resume", "-o", str(tmp_path / "r.h5")])
    assert p.returncode != 0 and "no checkpoint completed by all 3 training ranks" in p.stderr


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    """A step folder missing one rank's file (or holding only a .tmp) is skipped."""
    from collafuse_mpi import checkpoint, config
    cfg = config.Config()
    cfg.run.checkpoint_dir = str(tmp_path)
    for step, ranks in ((4, (0, 1, 2)), (8, (0, 1))):
        d = tmp_path / f"step{step:08d}"
        d.mkdir()
        for r in ranks:
            (d / f"rank{r}.pt").write_bytes(b"x")
    (tmp_path / "step00000008" / "rank2.pt.tmp").write_bytes(b"half")
    assert checkpoint.latest_complete(cfg, [0, 1, 2]) == 4
    assert checkpoint.latest_complete(cfg, [0, 1]) == 8
