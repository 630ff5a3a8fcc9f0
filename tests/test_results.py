"""The results file: writer/reader round trip, append/overwrite, statistics, a crash mid-run."""
import h5py
import numpy as np
import pytest

from collafuse_mpi import results


def _writer(path, mode="fail"):
    return results.ResultsWriter(str(path), mode)


def test_round_trip_and_append(tmp_path):
    path = tmp_path / "r.h5"
    w = _writer(path)
    name = w.begin_run("a", {"diffusion": {"cut": 0.4}}, {"cut_k": [4, 4], "versions": {"torch": "x"}})
    w.write_rank(name, 1, {"loss": np.arange(3.0), "comm": {"kind": np.array(["train_batch"])}}, {"role": "client"})
    w.update_run(name, status="complete")
    w2 = _writer(path, "append")
    assert w2.begin_run("a", {}, {}) == "a-2"  # never overwrites a run of the same name
    data = results.read(path)
    run = data["runs"]["a"]
    assert run["config"] == {"diffusion": {"cut": 0.4}}
    assert list(run["cut_k"]) == [4, 4] and run["versions"] == {"torch": "x"}
    assert run["status"] == "complete" and run["ranks"][1]["role"] == "client"
    np.testing.assert_array_equal(run["ranks"][1]["loss"], [0, 1, 2])
    assert list(run["ranks"][1]["comm"]["kind"]) == ["train_batch"]
    assert set(data["runs"]) == {"a", "a-2"}


def test_existing_file_needs_a_choice_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "r.h5"
    _writer(path)
    with pytest.raises(results.ResultsError, match="append or overwrite"):
        _writer(path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(results.ResultsError, match="not a collafuse_mpi results file"):
        _writer(other, "append")
    with pytest.raises(results.ResultsError, match="not a collafuse_mpi results file"):
        results.read(other)
    text = tmp_path / "t.h5"
    text.write_text("hello")
    with pytest.raises(results.ResultsError, match="not an HDF5 file"):
        results.read(text)
    assert text.read_text() == "hello"  # refusing to append left it alone
    _writer(other, "overwrite")  # an explicit overwrite replaces it
    assert results.read(other)["runs"] == {}


def test_phase_stats_leave_out_warmup():
    secs = np.array([[10.0, 0], [1, 0], [2, 0], [3, 0], [4, 0]])
    rank = {"phase_seconds": secs, "warmup": np.array([True, False, False, False, False])}
    st = results.phase_stats(rank, ["forward", "send"])
    assert st["forward"]["median"] == 2.5
    assert st["forward"]["iqr"] == pytest.approx(1.5)
    assert st["forward"]["p99"] < 4.0 + 1e-9
    assert results.phase_stats(rank, ["forward", "send"], include_warmup=True)["forward"]["p99"] > 9


_HOLD = """
import sys, time, h5py
with h5py.File(sys.argv[1], "a"):   # HDF5's file lock, held as another process holds it
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(path, seconds):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_append_to_a_file_held_open_waits_for_it(tmp_path):
    path = tmp_path / "r.h5"
    _writer(path).begin_run("a", {}, {})
    p = _hold(path, 1.5)
    w = _writer(path, "append")  # waits for the lock instead of calling the file "not an HDF5 file"
    assert w.begin_run("b", {}, {}) == "b"
    p.wait()
    assert set(results.read(path)["runs"]) == {"a", "b"}


def test_append_to_a_file_held_too_long_names_the_lock(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    _writer(path).begin_run("a", {}, {})
    monkeypatch.setattr(results, "LOCK_WAIT_S", 0.5)
    p = _hold(path, 5)
    try:
        with pytest.raises(results.ResultsError, match="held open by another process"):
            _writer(path, "append")
    finally:
        p.kill()
        p.wait()


_APPENDER = """
import sys
import numpy as np
from collafuse_mpi import results
w = results.ResultsWriter(sys.argv[1], "append")
name = w.begin_run("run", {}, {})
for i in range(15):
    w.update_run(name, steps_written=i + 1)
    w.write_rank(name, 1, {"loss": np.arange(float(i + 1))}, {})
w.update_run(name, status="complete")
"""


def test_concurrent_appends_lose_no_run(tmp_path):
    """Four processes append to one (new) file at once: every run is there, whole."""
    import subprocess
    import sys
    path = tmp_path / "r.h5"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    runs = results.read(path)["runs"]
    assert len(runs) == 4
    for run in runs.values():
        assert run["status"] == "complete" and run["steps_written"] == 15 and len(run["ranks"][1]["loss"]) == 15


def test_a_truncated_file_is_called_truncated_not_locked(tmp_path):
    from collafuse_mpi.plot import runs as plot_runs
    path = tmp_path / "r.h5"
    w = _writer(path)
    name = w.begin_run("a", {}, {})
    w.write_rank(name, 1, {"loss": np.arange(5000.0)}, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _, problems = plot_runs.load([str(path)])
    assert len(problems) == 1 and "damaged or truncated" in problems[0] and "running job" not in problems[0], problems
    (tmp_path / "t.h5").write_text("plain text")
    assert results_error(tmp_path / "t.h5").endswith("is not an HDF5 file")


def results_error(path):
    with pytest.raises(results.ResultsError) as err:
        results.read(str(path))
    return str(err.value)


_REWRITER = """
import sys
import numpy as np
from collafuse_mpi import results
w = results.ResultsWriter(sys.argv[1], "append")
name = w.begin_run("busy", {}, {})
print("writing", flush=True)
for i in range(100000):
    w.write_rank(name, 1, {"loss": np.random.rand(20000 + i), "phase_seconds": np.random.rand(2000, 8)}, {})
    w.update_run(name, steps_written=i + 1)
"""


def test_a_writer_killed_mid_update_leaves_the_file_readable(tmp_path):
    """SIGKILL at arbitrary moments of a process that rewrites a run group over and over: the
    file always reads, with the earlier run whole, and the killed run as of its last update."""
    import signal
    import subprocess
    import sys
    import time
    path = tmp_path / "r.h5"
    w = _writer(path)
    name = w.begin_run("earlier", {}, {})
    w.write_rank(name, 1, {"loss": np.arange(1000.0)}, {})
    w.update_run(name, status="complete")
    rng = np.random.default_rng(0)
    for trial in range(8):
        p = subprocess.Popen([sys.executable, "-c", _REWRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        runs = results.read(path)["runs"]
        np.testing.assert_array_equal(runs["earlier"]["ranks"][1]["loss"], np.arange(1000.0))
        busy = [r for n, r in runs.items() if n.startswith("busy")]
        assert len(busy) == trial + 1 and all(r["status"] == "running" for r in busy)
        for r in busy:  # what an update wrote, it wrote whole
            if 1 in r.get("ranks", {}):
                assert r["ranks"][1]["phase_seconds"].shape == (2000, 8)
    assert _writer(path, "append").begin_run("after", {}, {}) == "after"  # a stale copy is no obstacle


def test_an_update_that_fails_midway_changes_nothing(tmp_path):
    path = tmp_path / "r.h5"
    w = _writer(path)
    name = w.begin_run("a", {}, {})
    w.write_group(name, "metrics", {"kid": np.arange(3.0)})
    before = path.read_bytes()
    with pytest.raises(TypeError):  # "ok" is written first, then the object array fails
        w.write_group(name, "metrics", {"ok": np.arange(5.0), "bad": np.array([object()])})
    assert path.read_bytes() == before
    assert list(results.read(path)["runs"]["a"]["metrics"]) == ["kid"]
    assert not (tmp_path / "r.h5.tmp").exists()


def test_rewritten_groups_reuse_the_space_of_the_old_ones(tmp_path):
    """A flush rewrites each rank's group, a little longer each time; the file keeps the space
    the old groups freed for the new ones, so it stays near the size of what it holds (without
    that, 30 flushes of 4 ranks leave it 2.7 times as large)."""
    path = tmp_path / "r.h5"
    w = _writer(path)
    name = w.begin_run("a", {}, {})
    rng = np.random.default_rng(0)
    for flush in range(1, 31):
        for rank in range(4):
            w.write_rank(name, rank, {"phase_seconds": rng.random((500 * flush, 10))}, {})
    live = 4 * 500 * 30 * 10 * 8
    assert path.stat().st_size < 1.3 * live


def test_a_batch_lands_whole_or_not_at_all(tmp_path):
    path = tmp_path / "r.h5"
    w = _writer(path)
    name = w.begin_run("a", {}, {})
    with pytest.raises(RuntimeError):
        with w.batch():
            w.write_rank(name, 1, {"loss": np.arange(4.0)}, {})
            w.update_run(name, status="complete")
            raise RuntimeError("killed before the batch ended")
    run = results.read(path)["runs"]["a"]
    assert run["status"] == "running" and run["ranks"] == {}
    with w.batch():
        w.write_rank(name, 1, {"loss": np.arange(4.0)}, {})
        w.update_run(name, status="complete")
    run = results.read(path)["runs"]["a"]
    assert run["status"] == "complete" and list(run["ranks"][1]["loss"]) == [0, 1, 2, 3]
