"""Faults a cluster produces: a rank killed outright must end the whole job, not hang it."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from collafuse_mpi import results
from conftest import TINY, mpi_env, mpirun_prefix

pytestmark = pytest.mark.mpi


def _find_rank(tag: str, rank: int):
    """The pid of the rank started with our tag (Open MPI and MPICH rank variables)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"CF_TEST_TAG") == tag.encode():
            r = env.get(b"OMPI_COMM_WORLD_RANK", env.get(b"PMI_RANK"))
            if r is not None and int(r) == rank:
                return int(pid)
    return None


def _start_long_run(out):
    """A run that would go on for hours, its ranks findable by a tag in their environment."""
    tag = uuid.uuid4().hex
    env = mpi_env()
    env["CF_TEST_TAG"] = tag
    cmd = mpirun_prefix(3) + [sys.executable, "-m", "collafuse_mpi.run", *TINY, "--steps", "100000",
                              "--set", "run.flush_every=2", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, tag


@pytest.mark.parametrize("victim", [2, 0])
def test_sigkill_of_a_rank_ends_the_job(tmp_path, victim):
    out = tmp_path / "r.h5"
    proc, tag = _start_long_run(out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until steps are being written: training is under way
            time.sleep(1)
            try:
                if results.read(out)["runs"] and next(iter(results.read(out)["runs"].values())).get("steps_written"):
                    break
            except Exception:  # noqa: BLE001 -- not written yet, or mid-write
                pass
        pid = _find_rank(tag, victim)
        assert pid is not None, "rank process not found"
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 30, f"job took {elapsed:.1f} s to end after SIGKILL of rank {victim}"
    run = next(iter(results.read(out)["runs"].values()))  # the file still opens
    assert run["status"] == "running" and run["steps_written"] >= 2
    assert len(run["ranks"][1]["loss"]) >= run["steps_written"]


def test_a_hung_peer_is_named_by_the_receive_deadline(tmp_path):
    from conftest import launch
    t0 = time.monotonic()
    p = launch(3, [*TINY, "--steps", "20", "--set", "run.recv_timeout=5", "-o", str(tmp_path / "r.h5")],
               timeout=90, env_extra={"COLLAFUSE_HANG_AT": "2:3"})
    assert p.returncode != 0
    assert "no train_batch message from rank 2 within 5 s" in p.stderr
    assert time.monotonic() - t0 < 60


def test_sigterm_saves_every_rank_at_one_step_edge(tmp_path):
    """SLURM signals every task at the time limit (or the job script forwards its early warning):
    the ranks agree on one step edge, each saves that step, and the job ends with code 75."""
    out = tmp_path / "r.h5"
    proc, tag = _start_long_run(out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "r.h5").exists():
            time.sleep(1)
        time.sleep(8)
        pids = [_find_rank(tag, r) for r in range(3)]
        assert None not in pids
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, text
    assert "stopped at step" in text and "SIGTERM" in text
    root = tmp_path / "r-checkpoints"
    steps = sorted(d for d in os.listdir(root) if d.startswith("step"))
    assert len(steps) == 1, steps  # one edge, shared by all
    assert sorted(os.listdir(root / steps[0])) == ["rank0.pt", "rank1.pt", "rank2.pt"]
    run = next(iter(results.read(out)["runs"].values()))
    assert run["status"] == "stopped" and run["stopped_at_step"] == int(steps[0][4:])
    import torch
    assert "identity.json" in os.listdir(root)  # what the checkpoints belong to, for --resume
    for f in os.listdir(root / steps[0]):
        assert "learner" in torch.load(root / steps[0] / f, weights_only=False)


def test_nan_loss_stops_the_run_naming_step_and_rank(tmp_path):
    from conftest import launch
    p = launch(3, [*TINY, "--steps", "20", "--lr", "1e30", "-o", str(tmp_path / "r.h5")], timeout=90)
    assert p.returncode != 0
    assert "training loss is nan at step" in p.stderr or "training loss is inf at step" in p.stderr
    assert "FAILED: FloatingPointError: rank " in p.stderr


def test_a_stopped_server_is_named_within_the_deadline(tmp_path):
    """SIGSTOP of rank 0 mid-run: the clients' every wait on it (in-flight sends, the flush's
    gather) has the run.recv_timeout deadline, so the job ends soon after it, naming rank 0."""
    out = tmp_path / "r.h5"
    tag = uuid.uuid4().hex
    env = mpi_env()
    env["CF_TEST_TAG"] = tag
    cmd = mpirun_prefix(3) + [sys.executable, "-m", "collafuse_mpi.run", *TINY, "--steps", "100000",
                              "--set", "run.flush_every=2", "--set", "run.recv_timeout=5", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # training is under way once steps are in the file
            time.sleep(1)
            try:
                if next(iter(results.read(out)["runs"].values())).get("steps_written"):
                    break
            except Exception:  # noqa: BLE001 -- not written yet, or mid-write
                pass
        pid = _find_rank(tag, 0)
        assert pid is not None, "rank process not found"
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            text, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            text = ""
        elapsed = time.monotonic() - stopped
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (None, 0)
    assert elapsed < 5 + 15, f"job took {elapsed:.1f} s to end after SIGSTOP of rank 0 (deadline 5 s)"
    assert "rank 0" in text and "within 10 s" in text, text[-3000:]  # clients wait 2 x run.recv_timeout
