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
