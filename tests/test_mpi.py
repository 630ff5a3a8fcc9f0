"""End-to-end runs under mpirun: the results, the bytes on the wire, equivalence, failures."""
import os
import time

import numpy as np
import pytest

from collafuse_mpi import results, run
from conftest import TINY, assert_same_kid, launch, tiny_config

pytestmark = pytest.mark.mpi

D = 1 * 16 * 16  # pixels of one default image
HEADER = 12 * 8  # the int64 header that travels with every payload


def _only_run(path):
    runs = results.read(path)["runs"]
    assert len(runs) == 1
    return next(iter(runs.values()))


def _comm(rank_data, direction, kind):
    c = rank_data["comm"]
    sel = (c["direction"] == direction) & (c["kind"] == kind)
    return int(c["bytes"][sel].sum()), int(c["messages"][sel].sum())


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    """One tiny mpirun -n 3 run at c = 0.4, shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("three") / "r.h5"
    p = launch(3, [*TINY, "--cut", "0.4", "-o", str(out)])
    assert p.returncode == 0, p.stderr
    return p, out


def test_three_ranks_train_and_sample(three_ranks):
    p, out = three_ranks
    assert "collafuse-plot" in p.stdout
    r = _only_run(out)
    assert r["status"] == "complete" and r["n_clients"] == 2
    assert list(r["cut_k"]) == [4, 4]
    for rank in range(3):
        d = r["ranks"][rank]
        assert d["phase_seconds"].shape == (4, 12)
        assert np.all(np.isfinite(d["loss"]))
    for c in ("client_0", "client_1"):
        assert r["samples"][c]["generated"].shape == (4, 1, 16, 16)
        assert r["samples"][c]["generated"].dtype == np.uint8
        assert np.isfinite(r["metrics"][c]["kid"]["mean"])


def test_bytes_on_the_wire(three_ranks):
    """The server receives exactly (x_t, eps_s, t) per image per step, plus one sample request."""
    _, out = three_ranks
    server = _only_run(out)["ranks"][0]
    b, n = _comm(server, "recv", "train_batch")
    assert n == 2 * 4  # two clients, four steps
    assert b == n * (4 * (2 * D + 1) * 4 + HEADER)
    assert set(server["comm"]["kind"]) == {"train_batch", "sample_request", "cut_tensor"}
    sent_cut, n_cut = _comm(server, "sent", "cut_tensor")
    assert n_cut == 2 and sent_cut == 2 * (4 * D * 4 + HEADER)


def test_heterogeneous_cuts_four_ranks(tmp_path):
    """c = 1 for the last client: it never sends; the others send with their own k."""
    out = tmp_path / "r.h5"
    p = launch(4, [*TINY, "--client-cuts", "0.2,0.6,1.0", "-o", str(out)])
    assert p.returncode == 0, p.stderr
    r = _only_run(out)
    assert list(r["cut_k"]) == [2, 6, 10]
    server = r["ranks"][0]
    peers = set(server["comm"]["peer"][server["comm"]["direction"] == "recv"])
    assert peers == {1, 2}
    assert _comm(r["ranks"][3], "sent", "train_batch") == (0, 0)
    assert "server_view" not in r["samples"]["client_2"]
    assert "server_view" in r["samples"]["client_0"]


def test_mpi_equals_loopback(tmp_path):
    """Same seeds: the MPI run and the single-process loopback run give the same numbers."""
    mpi_out, lb_out = tmp_path / "mpi.h5", tmp_path / "lb.h5"
    p = launch(3, [*TINY, "--cut", "0.5", "--seed", "7", "-o", str(mpi_out)])
    assert p.returncode == 0, p.stderr
    cfg = tiny_config(lb_out)
    cfg.diffusion.cut, cfg.run.seed = 0.5, 7
    run.run_loopback(cfg, 2)
    a, b = _only_run(mpi_out), _only_run(lb_out)
    for rank in range(3):
        np.testing.assert_allclose(a["ranks"][rank]["loss"], b["ranks"][rank]["loss"], rtol=1e-5, atol=1e-6)
    for c in ("client_0", "client_1"):
        ga, gb = a["samples"][c]["generated"].astype(int), b["samples"][c]["generated"].astype(int)
        assert np.abs(ga - gb).max() <= 1  # uint8 rounding of float-tolerance differences
        assert_same_kid(a["metrics"][c]["kid"], b["metrics"][c]["kid"], ga, gb)
    gen = [np.concatenate([r["samples"][c]["generated"] for c in ("client_0", "client_1")]) for r in (a, b)]
    assert_same_kid(a["metrics"]["pooled"]["kid"], b["metrics"]["pooled"]["kid"], *gen)


def test_bad_input_fails_once_and_keeps_the_file(tmp_path):
    out = tmp_path / "r.h5"
    out.write_bytes(b"precious")
    p = launch(3, [*TINY, "--cut", "1.5", "-o", str(tmp_path / "new.h5")])
    assert p.returncode != 0
    assert p.stderr.count("cut must be a number in [0, 1]") == 1
    assert not (tmp_path / "new.h5").exists()
    p = launch(3, [*TINY, "-o", str(out)])
    assert p.returncode != 0 and "--overwrite" in p.stderr
    assert out.read_bytes() == b"precious"
    p = launch(3, [*TINY, "--dataset", "nope", "-o", str(tmp_path / "n.h5")])
    assert p.returncode != 0 and "unknown dataset" in p.stderr


def test_one_rank_is_refused(tmp_path):
    p = launch(1, [*TINY, "-o", str(tmp_path / "r.h5")])
    assert p.returncode != 0 and "at least 2 ranks" in p.stderr


@pytest.mark.parametrize("rank", [0, 2])
def test_a_crash_on_any_rank_ends_the_job(tmp_path, rank):
    out = tmp_path / "r.h5"
    t0 = time.monotonic()
    p = launch(3, [*TINY, "--steps", "50", "-o", str(out)], timeout=60,
               env_extra={"COLLAFUSE_FAIL_AT": f"{rank}:2"})
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert f"[{rank}@" in p.stderr and "injected failure" in p.stderr
    assert elapsed < 30 + 15  # 30 s budget for the abort, plus start-up on a loaded machine
    # rank 0 wrote the run header before training: the file still opens, and the group says which
    # rank failed and why (a client reports it to rank 0 before the job ends)
    run = next(iter(results.read(out)["runs"].values()))
    assert run["status"] == "failed" and run["failed_rank"] == rank, run
    assert "injected failure at step 2" in run["error"]


def test_client_images_stay_out_of_the_results_file(three_ranks):
    """By default only generated images and the server's own view are stored, never real ones."""
    _, out = three_ranks
    r = _only_run(out)
    for c in ("client_0", "client_1"):
        assert set(r["samples"][c]) == {"generated", "server_view"}
    assert r["metrics"]["pooled"]["kid"]["n_real"] == sum(r["ranks"][i]["n_heldout"] for i in (1, 2))


def _steps_ahead(run):
    """The most steps any client had completed beyond the server, at its step ends (rank 0's clock)."""
    server_end = np.sort(np.asarray(run["ranks"][0]["step_end"]))
    worst = 0
    for rk in run["ranks"].values():
        if rk["role"] == "client":
            ends = np.asarray(rk["step_end"])
            worst = max(worst, int(np.max(np.arange(1, ends.size + 1) - np.searchsorted(server_end, ends, "right"))))
    return worst


def test_clients_run_at_most_max_in_flight_ahead(tmp_path):
    """Cut 0 clients only add noise and send (much faster than the server, which trains on both), with
    2 KB batches that shared memory sends eagerly: by synchronous send a client waits once
    max_in_flight batches are untaken, so it is at most max_in_flight + 1 steps ahead. Plain sends
    complete unmatched and only the stop vote (every 10 steps here) holds them back."""
    args = [*TINY, "--steps", "30", "--batch-size", "1", "--cut", "0", "--set", "run.flush_every=0",
            "--set", "run.stop_check_every=10", "--set", "privacy.attacks=none"]
    ahead = {}
    for sync in (True, False):
        out = tmp_path / f"sync{sync}.h5"
        p = launch(3, [*args, "--set", f"train.sync_sends={str(sync).lower()}", "-o", str(out)])
        assert p.returncode == 0, p.stderr
        ahead[sync] = _steps_ahead(_only_run(out))
    assert ahead[True] <= 2 + 1, ahead
    assert ahead[False] > 3, ahead  # what the synchronous send prevents
