"""A full disk: "No space left on device on <path>" once, no partial files, earlier runs intact.

The disk is a small tmpfs mounted for the test (needs root; skipped where mount is refused)."""
import os
import subprocess
import time

import numpy as np
import pytest

from collafuse_mpi import checkpoint, results
from conftest import TINY, launch


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(disk)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip() or 'mount refused'}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk, leave: int):
    """Fill the disk up to `leave` bytes free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))


def _earlier_run(path):
    w = results.ResultsWriter(str(path))
    name = w.begin_run("earlier", {}, {})
    w.write_rank(name, 1, {"loss": np.arange(100.0)}, {"role": "client"})
    w.update_run(name, status="complete")


def _tmp_files(disk):
    return [os.path.join(d, f) for d, _, files in os.walk(disk) for f in files if ".tmp" in f]


def test_append_on_a_full_disk_writes_nothing_and_keeps_earlier_runs(small_disk):
    out = small_disk / "r.h5"
    _earlier_run(out)
    _fill(small_disk, 64 * 1024)
    w = results.ResultsWriter(str(out), "append")  # the format check reads only
    with pytest.raises(OSError, match=r"No space left on device on .*r\.h5 .*nothing written"):
        w.begin_run("second", {}, {})
    run = results.read(out)["runs"]["earlier"]
    assert set(results.read(out)["runs"]) == {"earlier"} and run["status"] == "complete"
    np.testing.assert_array_equal(run["ranks"][1]["loss"], np.arange(100.0))


def test_atomic_write_on_a_full_disk_names_the_path_and_leaves_no_partial_file(small_disk):
    _fill(small_disk, 16 * 1024)
    target = small_disk / "ckpt" / "rank1.pt"
    target.parent.mkdir()
    with pytest.raises(OSError, match=r"No space left on device on .*ckpt/rank1\.pt"):
        checkpoint.write_atomic(str(target), b"x" * (1 << 20))
    assert not target.exists() and _tmp_files(small_disk) == []


@pytest.mark.mpi
def test_disk_full_during_a_run_ends_the_job_cleanly(small_disk):
    """Checkpoints (about 1.6 MB per rank) fill the disk: the job ends with the reason, leaves no
    .tmp file, and the run appended before it still reads."""
    out = small_disk / "r.h5"
    _earlier_run(out)
    _fill(small_disk, 1536 * 1024)
    t0 = time.monotonic()
    p = launch(3, [*TINY, "--steps", "6", "--checkpoint-every", "2", "--append", "-o", str(out)], timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert "No space left on device on " + str(small_disk) in p.stderr, p.stderr[-3000:]
    assert "unexpected pos" not in p.stderr and "Segmentation fault" not in p.stderr
    assert _tmp_files(small_disk) == []
    runs = results.read(out)["runs"]
    assert runs["earlier"]["status"] == "complete" and len(runs["earlier"]["ranks"][1]["loss"]) == 100
    assert elapsed < 60
