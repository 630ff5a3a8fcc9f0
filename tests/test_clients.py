"""Many logical clients per rank, cohorts, fused server sampling.

The contract: a logical client's numbers (losses, samples, metrics) depend on its id and the run
seed only, not on the rank it lives on or on how many clients share that rank; a step's cohort is
a pure function of (seed, step); the server's batched sampling chain gives every client the same
x_k as answering it alone (the batch changes no random draw, only the model's batch, so equal to
float tolerance).
"""
import sys

import numpy as np
import pytest
import torch

from collafuse_mpi import config, results, run
from collafuse_mpi.clients import cohort, ids_of_rank, rank_of
from conftest import TINY, assert_same_kid, launch, tiny_config


def _only_run(path):
    runs = results.read(path)["runs"]
    assert len(runs) == 1
    return next(iter(runs.values()))


# ---- layout and cohorts (no MPI) ----

def test_layout_ids_and_ranks_agree():
    """Rank r hosts ids (r-1)*M .. r*M-1; rank_of inverts it; together they cover 0..(R-1)*M-1."""
    M, R = 3, 4
    ids = [i for r in range(1, R) for i in ids_of_rank(r, M)]
    assert ids == list(range((R - 1) * M))
    assert all(rank_of(i, M) == r for r in range(1, R) for i in ids_of_rank(r, M))
    assert ids_of_rank(2, 1) == [1] and rank_of(1, 1) == 2  # one client per rank: client i on rank i+1


def test_cohort_is_seeded_sized_and_varies_by_step():
    a = [cohort(5, s, 64, 8) for s in range(20)]
    assert a == [cohort(5, s, 64, 8) for s in range(20)]  # the same draw on every rank, every time
    assert all(len(c) == 8 == len(set(c)) and c == sorted(c) and 0 <= c[0] and c[-1] < 64 for c in a)
    assert len({tuple(c) for c in a}) > 15  # steps draw differently
    assert a != [cohort(6, s, 64, 8) for s in range(20)]  # so do seeds
    counts = np.bincount(np.concatenate(a + [cohort(5, s, 64, 8) for s in range(20, 400)]), minlength=64)
    # 400 draws of 8 of 64: each client is in 50 cohorts on average (binomial sd ~6.6)
    assert counts.min() > 20 and counts.max() < 80
    assert cohort(5, 3, 10, 0) == list(range(10)) == cohort(5, 3, 10, 10)  # 0 or all: everyone


def test_bad_values_fail_before_start(tmp_path):
    cfg = config.Config()
    cfg.run.clients_per_rank = 0
    with pytest.raises(config.ConfigError, match="run.clients_per_rank must be an integer >= 1"):
        config.validate(cfg, 3)
    cfg = config.Config()
    cfg.run.output = str(tmp_path / "r.h5")  # not ./results.h5, which the demo may have written
    cfg.run.clients_per_rank, cfg.train.clients_per_step = 2, 5
    with pytest.raises(config.ConfigError, match="clients_per_step 5 is more than the 4 clients"):
        config.validate(cfg, 3)
    cfg.train.clients_per_step = 4
    config.validate(cfg, 3)
    cfg.diffusion.client_cuts = [0.2, 0.4]  # one cut per logical client: 4 are needed
    with pytest.raises(config.ConfigError, match="2 client cuts given for 4 clients"):
        config.validate(cfg, 3)


def test_check_command_names_the_bad_value(tmp_path):
    import subprocess
    base = [sys.executable, "-m", "collafuse_mpi.run", "--check", "--ranks", "3", "-o", str(tmp_path / "r.h5")]
    p = subprocess.run(base + ["--clients-per-rank", "0"], capture_output=True, text=True)
    assert p.returncode == 2 and "run.clients_per_rank must be an integer >= 1, got 0" in p.stderr
    p = subprocess.run(base + ["--clients-per-rank", "2", "--clients-per-step", "9"], capture_output=True, text=True)
    assert p.returncode == 2 and "train.clients_per_step 9 is more than the 4 clients" in p.stderr
    p = subprocess.run(base + ["--clients-per-rank", "2"], capture_output=True, text=True)
    assert p.returncode == 0 and "1 server + 4 clients (2 on each of 2 ranks)" in p.stdout


# ---- fused sampling == serial sampling ----

class _Answers:
    def __init__(self):
        self.got, self.order = {}, []

    def __call__(self, req, x, handles):
        self.got[req.client] = x.clone()
        self.order.append(req.client)


def _server(tmp_path, ks, sampler, eta):
    from collafuse_mpi.harness import PhaseTimer
    from collafuse_mpi.loopback import LoopbackTransport
    from collafuse_mpi.server import Server
    cfg = tiny_config(tmp_path / "r.h5")
    cfg.diffusion.sampler, cfg.sample.eta = sampler, eta
    cfg.run.clients_per_rank = len(ks)
    server = Server(cfg, LoopbackTransport.group(2)[0], ks, torch.device("cpu"), PhaseTimer())
    server.learner.ema.model.eval()
    return server


def _requests(server, ns):
    from collafuse_mpi import schedule
    from collafuse_mpi.fused_sampling import Request
    from collafuse_mpi.training import derive_seed, generator
    d = server.cfg.diffusion
    return [Request(i, k, n, generator(derive_seed(server.cfg.run.seed, 0, "sample", i)),
                    schedule.side_steps(server.T, k, d.sampler, d.sample_steps, "server"))
            for i, (k, n) in enumerate(zip(server.ks, ns))]


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_fused_sampling_equals_serial(tmp_path, sampler, eta, one_thread):
    """Heterogeneous cuts (DDIM subsequences differ with k), different request sizes, stochastic
    samplers: every client's x_k is the serial chain's. Chains leave at their own k + 1, so the
    client with the largest k (fewest server steps) is answered first."""
    from collafuse_mpi.fused_sampling import run_fused, run_serial
    ks, ns = [2, 7, 4, 4], [3, 4, 2, 5]
    out = {}
    for how, fn in (("serial", run_serial), ("fused", run_fused)):
        server = _server(tmp_path, ks, sampler, eta)
        server.answer = answers = _Answers()
        fn(server, server.learner.ema.model, _requests(server, ns), [])
        out[how] = answers
    assert sorted(out["fused"].got) == [0, 1, 2, 3]
    for i in range(4):
        a, b = out["serial"].got[i], out["fused"].got[i]
        assert a.shape == (ns[i], 1, 16, 16)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert out["fused"].order[0] == 1  # k = 7: the shortest server chain ends first
    assert out["serial"].order == [0, 1, 2, 3]


# ---- a run: logical clients on one rank == one client per rank ----

def _loopback(path, ranks, per_rank, **train):
    cfg = tiny_config(path)
    cfg.diffusion.client_cuts, cfg.run.seed, cfg.run.clients_per_rank = [0.3, 0.6, 0.3, 0.6], 7, per_rank
    for k, v in train.items():
        setattr(cfg.train, k, v)
    run.run_loopback(cfg, ranks)
    return _only_run(path)


def test_cohorts_train_only_the_drawn_clients(tmp_path, one_thread):
    """4 logical clients on 2 ranks, 2 per step: a client's loss is NaN exactly in the steps it
    was not drawn for; the server's fused batch holds the cohort's batches only; a second run
    with the same seed repeats every number."""
    a = _loopback(tmp_path / "a.h5", 2, 2, clients_per_step=2)
    b = _loopback(tmp_path / "b.h5", 2, 2, clients_per_step=2)
    chosen = [cohort(7, s, 4, 2) for s in range(4)]
    for r in (1, 2):
        loss = a["ranks"][r]["client_loss"]
        assert loss.shape == (4, 2)
        for s in range(4):
            for j, i in enumerate(ids_of_rank(r, 2)):
                assert np.isnan(loss[s, j]) == (i not in chosen[s])
        assert list(a["ranks"][r]["images"]) == [4 * sum(i in chosen[s] for i in ids_of_rank(r, 2)) for s in range(4)]
        np.testing.assert_array_equal(loss, b["ranks"][r]["client_loss"])
    assert list(a["ranks"][0]["images"]) == [4 * 2] * 4  # every client sends (k < T): the cohort's batches
    np.testing.assert_array_equal(a["ranks"][0]["loss"], b["ranks"][0]["loss"])
    train_msgs = sum(int(a["metrics"][f"client_{i}"]["bytes"].get("sent_train_batch", 0) > 0) for i in range(4))
    assert train_msgs == len(set(sum(chosen, [])))


def _assert_same_clients(a, b, n):
    """Client i's numbers in run a (its rank layout) equal those in run b (another layout)."""
    def loss_of(r, i):
        d = r["ranks"]
        for rank in range(1, len(d)):
            ids = [int(v) for v in np.atleast_1d(d[rank]["clients"])]
            if i in ids:
                return d[rank]["client_loss"][:, ids.index(i)] if "client_loss" in d[rank] else d[rank]["loss"]
        raise KeyError(i)
    for i in range(n):
        np.testing.assert_allclose(loss_of(a, i), loss_of(b, i), rtol=1e-5, atol=1e-6)
        c = f"client_{i}"
        for key in ("generated", "server_view"):
            ga, gb = a["samples"][c][key].astype(int), b["samples"][c][key].astype(int)
            assert np.abs(ga - gb).max() <= 1  # uint8 rounding of float-tolerance differences
        assert_same_kid(a["metrics"][c]["kid"], b["metrics"][c]["kid"], a["samples"][c]["generated"],
                        b["samples"][c]["generated"])
        pa, pb = a["metrics"][c]["privacy"]["reconstruction"], b["metrics"][c]["privacy"]["reconstruction"]
        assert {n: pa[n]["psnr"] for n in pa} == pytest.approx({n: pb[n]["psnr"] for n in pb}, rel=1e-4)
        assert a["metrics"][c]["bytes"] == b["metrics"][c]["bytes"]
    np.testing.assert_allclose(a["ranks"][0]["loss"], b["ranks"][0]["loss"], rtol=1e-5, atol=1e-6)
    gen = [np.concatenate([r["samples"][f"client_{i}"]["generated"] for i in range(n)]) for r in (a, b)]
    assert_same_kid(a["metrics"]["pooled"]["kid"], b["metrics"]["pooled"]["kid"], *gen)


def test_loopback_layouts_agree(tmp_path, one_thread):
    """4 clients with per-client cuts: 2 ranks of 2 logical clients == 4 ranks of one client."""
    a = _loopback(tmp_path / "a.h5", 2, 2)
    b = _loopback(tmp_path / "b.h5", 4, 1)
    assert a["n_clients"] == b["n_clients"] == 4 and list(a["cut_k"]) == list(b["cut_k"]) == [3, 6, 3, 6]
    _assert_same_clients(a, b, 4)


@pytest.mark.mpi
def test_mpirun_one_rank_of_two_clients_equals_two_ranks(tmp_path):
    """Over MPI: 1 server + 1 client rank hosting 2 logical clients gives the same losses,
    samples and metrics as 1 server + 2 client ranks of one client each."""
    args = [*TINY, "--client-cuts", "0.3,0.6", "--seed", "7"]
    p = launch(2, [*args, "--clients-per-rank", "2", "-o", str(tmp_path / "m2.h5")])
    assert p.returncode == 0, p.stderr
    q = launch(3, [*args, "-o", str(tmp_path / "m1.h5")])
    assert q.returncode == 0, q.stderr
    a, b = _only_run(tmp_path / "m2.h5"), _only_run(tmp_path / "m1.h5")
    assert a["n_clients"] == b["n_clients"] == 2 and a["clients_per_rank"] == 2 and a["client_ranks"] == 1
    _assert_same_clients(a, b, 2)


@pytest.mark.mpi
def test_mpirun_refuses_more_cohort_than_clients(tmp_path):
    p = launch(2, [*TINY, "--clients-per-rank", "2", "--clients-per-step", "3", "-o", str(tmp_path / "r.h5")],
               timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("train.clients_per_step 3 is more than the 2 clients of the run") == 1
    assert not (tmp_path / "r.h5").exists()


def test_figures_aggregate_many_clients(tmp_path, one_thread):
    """10 logical clients on one rank: per-client metrics for each; the samples figure shows 8
    rows spread over the ids (and says so), the KID figure one quantile bar instead of 10 points."""
    from collafuse_mpi import plot
    from collafuse_mpi.plot.quality import MANY
    cfg = tiny_config(tmp_path / "r.h5")
    cfg.train.steps, cfg.run.clients_per_rank, cfg.privacy.attacks, cfg.run.save_models = 2, 10, "none", False
    run.run_loopback(cfg, 1)
    r = _only_run(tmp_path / "r.h5")
    assert r["n_clients"] == 10 and list(np.atleast_1d(r["ranks"][1]["clients"])) == list(range(10))
    assert r["ranks"][1]["client_loss"].shape == (2, 10)
    assert all(np.isfinite(r["metrics"][f"client_{i}"]["kid"]["mean"]) for i in range(10))
    runs, problems = plot.load([str(tmp_path / "r.h5")])
    assert not problems
    ctx = plot.Ctx(runs)
    clients, _, _ = plot.sample_panels(runs[0])
    assert clients == [0, 1, 3, 4, 5, 6, 8, 9] and len(clients) == MANY
    (_, fig), = plot.fig_samples(ctx)
    notes = " ".join(t.get_text() for t in fig.foot.texts).replace("\n  ", " ")
    assert "Rows: 8 of the run's 10 clients" in notes
    (_, fig), = plot.fig_kid(ctx)
    ax = fig.axes[0]
    assert any("median client" in t.get_text() for t in ax.get_legend().get_texts())


@pytest.mark.mpi
def test_resume_with_logical_clients_continues_every_client(tmp_path):
    """2 logical clients on one rank, batched, cohorts of 1, a checkpoint after step 2: the run
    resumed there trains steps 2 and 3 exactly as the run that never stopped (each client's
    model, optimiser, EMA and streams saved and restored through the stack)."""
    args = [*TINY, "--clients-per-rank", "2", "--clients-per-step", "1", "--checkpoint-every", "2",
            "--set", "train.batched_clients=true", "--set", "privacy.attacks=none"]
    for extra, out in ((["--steps", "4"], "full"), (["--steps", "2"], "part"),
                       (["--steps", "4", "--resume", "--append"], "part")):
        p = launch(2, [*args, *extra, "-o", str(tmp_path / f"{out}.h5")])
        assert p.returncode == 0, p.stderr
    full = _only_run(tmp_path / "full.h5")["ranks"][1]["client_loss"]
    runs = results.read(tmp_path / "part.h5")["runs"]
    resumed = next(r for r in runs.values() if r["resumed_from_step"] == 2)["ranks"][1]["client_loss"]
    assert resumed.shape == (2, 2)
    np.testing.assert_array_equal(resumed, full[2:])
