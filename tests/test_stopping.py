"""Stopping on a signal: every rank saves the same step edge, and the resumed run equals the
uninterrupted one. The vote's rule (one shared edge, decided a check interval late) without MPI."""
import os
import threading

import numpy as np
import pytest

from collafuse_mpi import results, stopping
from collafuse_mpi.loopback import LoopbackTransport

ARGS = ["--steps", "12", "--batch-size", "4", "--timesteps", "10", "--sample-steps", "4",
        "--samples-per-client", "4", "--quiet", "--cut", "0.5", "--seed", "3",
        "--set", "run.stop_check_every=2", "--set", "run.flush_every=3", "--set", "privacy.attacks=quick"]


def _edges(n_ranks, flag_rank, flag_step, every, steps):
    """Run StopVote on n_ranks threads; rank flag_rank raises its flag after step flag_step."""
    tps = LoopbackTransport.group(n_ranks)
    out = [None] * n_ranks

    def work(tp):
        flag = threading.Event()
        vote = stopping.StopVote(tp, every, steps, flag)
        for step in range(steps):
            if tp.rank == flag_rank and step == flag_step:
                flag.set()
            if vote.at_edge(step):
                out[tp.rank] = step + 1
                return
        out[tp.rank] = None

    threads = [threading.Thread(target=work, args=(tp,)) for tp in tps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_every_rank_stops_at_the_same_edge():
    # flag raised during step 5 (edge 6): the vote started at edge 6 is read at edge 8
    assert _edges(4, 2, 5, every=2, steps=20) == [8] * 4
    # raised just before a checked edge: seen by the vote started there, read one interval later
    assert _edges(3, 0, 3, every=4, steps=20) == [8] * 3
    # the last step's edge decides at once (a flag after the last check still stops there)
    assert _edges(3, 1, 10, every=4, steps=11) == [11] * 3
    # never raised: nobody stops
    assert _edges(3, 9, 0, every=2, steps=10) == [None] * 3


def _run(path, name):
    return results.read(path)["runs"][name]


@pytest.mark.mpi
def test_stop_saves_every_rank_at_one_edge_and_resume_matches(tmp_path):
    from conftest import launch
    whole, parts = tmp_path / "whole.h5", tmp_path / "parts.h5"
    p = launch(3, [*ARGS, "-o", str(whole), "--run-name", "whole"])
    assert p.returncode == 0, p.stderr
    # rank 2 alone "gets the signal" during step 5; no other rank knows until the vote
    p = launch(3, [*ARGS, "-o", str(parts), "--run-name", "first"], env_extra={"COLLAFUSE_STOP_AT": "2:5"})
    assert p.returncode == stopping.EXIT_STOPPED, p.stdout + p.stderr
    assert "stopped at step 8 of 12" in p.stdout
    ckpt = tmp_path / "parts-checkpoints"
    assert sorted(os.listdir(ckpt)) == ["identity.json", "origin.json", "step00000008"]
    assert sorted(os.listdir(ckpt / "step00000008")) == ["rank0.pt", "rank1.pt", "rank2.pt"]
    first = _run(parts, "first")
    assert first["status"] == "stopped" and first["stopped_at_step"] == 8
    for rank in range(3):
        assert list(first["ranks"][rank]["step"]) == list(range(8))
    # a fresh run must not write into a folder holding another run's steps
    from collafuse_mpi import config, run
    cfg = config.Config()
    cfg.run.output, cfg.run.if_exists = str(parts), "append"
    with pytest.raises(config.ConfigError, match="holds checkpoints of another run that did not complete"):
        run.verify(cfg, 3)
    p = launch(3, [*ARGS, "-o", str(parts), "--append", "--resume", "--run-name", "second"])
    assert p.returncode == 0, p.stderr
    a, b = _run(whole, "whole"), _run(parts, "second")
    # where it ran: no SLURM here; this host's CPUs; every rank's placement
    assert a["slurm"] == {} and a["cpu"]["logical_cores"] == os.cpu_count()
    assert [r["local_rank"] for r in a["placement"]] == [0, 1, 2]
    assert a["oversubscribed"] == (3 > len(set().union(*(r["cpus"] for r in a["placement"]))))
    assert b["resumed_from_step"] == 8 and b["resumed_from"] == f"{parts}::first"
    assert _run(parts, "first")["continued_in"] == f"{parts}::second"
    assert _run(parts, "first")["status"] == "stopped"  # it stopped cleanly: not "interrupted"
    for rank in range(3):
        np.testing.assert_allclose(first["ranks"][rank]["loss"], a["ranks"][rank]["loss"][:8], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["ranks"][rank]["loss"], a["ranks"][rank]["loss"][8:], rtol=1e-5, atol=1e-6)


def test_a_resubmitted_run_marks_the_run_it_continues_in_the_other_file(tmp_path):
    """A resubmission writes a new results file; the checkpoint folder's origin.json leads it to
    the earlier file, whose group (still "running": it was killed) becomes "interrupted"."""
    from collafuse_mpi import config, report
    old_file, new_file, ckpt = tmp_path / "results-1.h5", tmp_path / "results-2.h5", tmp_path / "ck"
    cfg = config.Config()
    cfg.run.output, cfg.run.checkpoint_dir = str(old_file), str(ckpt)
    old = results.ResultsWriter(str(old_file))
    old.begin_run("r", {}, {})
    report.write_origin(cfg, "r")
    cfg.run.output = str(new_file)
    new = results.ResultsWriter(str(new_file))
    name = new.begin_run("r", {}, {})
    report._link_resumed(cfg, new, name)
    a, b = results.read(old_file)["runs"]["r"], results.read(new_file)["runs"]["r"]
    assert a["status"] == "interrupted" and a["continued_in"] == f"{new_file}::r"
    assert b["resumed_from"] == f"{old_file}::r" and b["status"] == "running"
