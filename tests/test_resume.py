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
    models = tmp_path / "parts-models"  # one folder per run: runs appended to one file keep their own models
    assert os.listdir(models) == ["second"]
    assert sorted(os.listdir(models / "second")) == ["rank0-server.pt", "rank1-client0.pt", "rank2-client1.pt"]
    assert b["resumed_from_step"] == 4
    # the crashed run recorded its failure (rank 1); the resumed one keeps that and both name each other
    first = _run(parts, "first")
    assert first["status"] == "failed" and first["failed_rank"] == 1 and first["continued_in"] == f"{parts}::second"
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


# ---- whose checkpoints: a resume takes only its own run's, a fresh run never mixes with another's

def _cfg(tmp_path, **run):
    from collafuse_mpi import config
    cfg = config.Config()
    cfg.run.checkpoint_dir = str(tmp_path / "ckpt")
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def _saved_run(cfg, world_size=3):
    """A run's checkpoints as save() leaves them: a step folder and the folder's identity."""
    from collafuse_mpi import checkpoint
    checkpoint.claim(cfg, world_size, overwrite=False)
    checkpoint.save(cfg, 1, 4, {"x": 1})


def test_identity_counts_training_fields_not_where_outputs_go(tmp_path):
    from collafuse_mpi import checkpoint
    cfg = _cfg(tmp_path)
    base = checkpoint.identity(cfg, 3)
    cfg.run.output, cfg.run.quiet, cfg.train.steps, cfg.sample.samples_per_client = "x.h5", True, 9999, 3
    assert checkpoint.identity(cfg, 3)["config_hash"] == base["config_hash"]
    for change in (lambda c: setattr(c.run, "seed", 4), lambda c: setattr(c.diffusion, "cut", 0.7),
                   lambda c: setattr(c.train, "lr", 1e-4), lambda c: setattr(c.data, "partition", "dirichlet")):
        other = _cfg(tmp_path)
        change(other)
        assert checkpoint.identity(other, 3)["config_hash"] != base["config_hash"]
    assert checkpoint.identity(cfg, 4)["config_hash"] != base["config_hash"]


def test_resume_refuses_another_runs_checkpoints_saying_what_differs(tmp_path):
    from collafuse_mpi import checkpoint
    cfg = _cfg(tmp_path, seed=3)
    _saved_run(cfg)
    checkpoint.verify(cfg, 3)  # its own: fine
    cfg.run.seed, cfg.diffusion.cut = 4, 0.7
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.verify(cfg, 2)
    text = str(err.value)
    assert "world size: 3 ranks in the checkpoints, 2 now" in text
    assert "run.seed: 3 in the checkpoints, 4 now" in text and "diffusion.cut: 0.4 in the checkpoints, 0.7 now" in text


def test_resume_refuses_checkpoints_without_identity(tmp_path):
    from collafuse_mpi import checkpoint
    cfg = _cfg(tmp_path)
    (tmp_path / "ckpt" / "step00000004").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="have no identity.json"):
        checkpoint.verify(cfg, 3)


def test_fresh_run_refuses_an_unfinished_other_run_and_overwrite_clears_it(tmp_path):
    from collafuse_mpi import checkpoint
    old = _cfg(tmp_path, seed=3)
    _saved_run(old)
    new = _cfg(tmp_path, seed=4)
    with pytest.raises(checkpoint.CheckpointError, match="did not complete .*run.seed: 3 in the checkpoints, 4 now"):
        checkpoint.claim(new, 3, overwrite=False)
    assert checkpoint.latest_complete(old, [1]) == 4  # refused: nothing removed
    checkpoint.claim(new, 3, overwrite=True)
    assert checkpoint.latest_complete(new, [1]) == 0 and checkpoint.read_identity(new) is None


def test_fresh_run_replaces_a_completed_run_or_its_own_earlier_one(tmp_path):
    from collafuse_mpi import checkpoint
    old = _cfg(tmp_path, seed=3)
    _saved_run(old)
    checkpoint.claim(_cfg(tmp_path, seed=3), 3, overwrite=False)  # the same run again: stale steps go
    assert checkpoint.latest_complete(old, [1]) == 0
    _saved_run(old)
    checkpoint.mark_complete(old)
    new = _cfg(tmp_path, seed=4)
    checkpoint.claim(new, 3, overwrite=False)
    assert checkpoint.latest_complete(new, [1]) == 0
    checkpoint.save(new, 1, 2, {"x": 2})
    assert checkpoint.read_identity(new)["config"]["run.seed"] == 4


def test_resume_after_overwrite_with_another_seed_or_fewer_ranks_is_refused(tmp_path):
    """The cases that used to resume silently: another seed after --overwrite, fewer ranks."""
    out = tmp_path / "r.h5"
    p = launch(3, [*ARGS, "-o", str(out)], env_extra={"COLLAFUSE_FAIL_AT": "1:6"})
    assert p.returncode != 0
    p = launch(3, [*ARGS, "--seed", "4", "-o", str(out), "--overwrite", "--resume"])
    assert p.returncode != 0 and "belong to another run" in p.stderr and "run.seed: 3 in the checkpoints, 4 now" in p.stderr
    p = launch(2, [*ARGS, "-o", str(out), "--overwrite", "--resume"])
    assert p.returncode != 0 and "world size: 3 ranks in the checkpoints, 2 now" in p.stderr
    p = launch(3, [*ARGS, "--seed", "4", "-o", str(out), "--overwrite"])  # a fresh run clears them
    assert p.returncode == 0, p.stderr
    p = launch(3, [*ARGS, "--seed", "3", "-o", str(out), "--overwrite", "--resume"])
    assert p.returncode != 0 and "run.seed: 4 in the checkpoints, 3 now" in p.stderr
