"""The privacy contract, audited on a real mpirun run: every message the server received is
recorded (COLLAFUSE_RECORD_DIR) next to the clients' true batches, and checked against them."""
import glob
import os

import numpy as np
import pytest
import torch

from collafuse_mpi import results, schedule
from collafuse_mpi.training import unpack_train
from conftest import TINY, launch

pytestmark = pytest.mark.mpi
T, CUT = 10, 0.4
K = round(CUT * T)


def _record_run(tmp_path, cut):
    rec = tmp_path / "rec"
    p = launch(3, [*TINY, "--timesteps", str(T), "--cut", str(cut), "-o", str(tmp_path / "r.h5")],
               env_extra={"COLLAFUSE_RECORD_DIR": str(rec)})
    assert p.returncode == 0, p.stderr
    return rec


def test_server_never_receives_x0_or_noise_relative_to_it(tmp_path):
    rec = _record_run(tmp_path, CUT)
    sched = schedule.Schedule(T, "cosine")
    inbox = sorted(glob.glob(str(rec / "recv-r0-*.npz")))
    kinds = {os.path.basename(f).split("-")[3] for f in inbox}
    assert kinds == {"train_batch", "sample_request"}
    x0_all = {c: np.concatenate([np.load(f) for f in glob.glob(str(rec / f"x0-client{c}-s*.npy"))]) for c in (0, 1)}
    floor = (1 - sched.abar[K].item()) / sched.abar[K].item()
    n_train = 0
    for f in inbox:
        msg = np.load(f)
        if "train_batch" not in f:
            assert msg["payload"].size == 1  # a sample request carries only a count
            continue
        n_train += 1
        c, step = int(msg["client"]), int(msg["step"])
        assert int(msg["meta"]) == K
        x0 = torch.from_numpy(np.load(rec / f"x0-client{c}-s{step}.npy")).double()
        x_t, eps_s, t = unpack_train(torch.from_numpy(msg["payload"]).double(), tuple(x0.shape[1:]))
        assert bool((t > K).all()) and bool((t <= T).all())
        # the naive attack (treat eps_s as noise relative to x0) does not give x0 back
        a_t = sched.abar[t].view(-1, 1, 1, 1)
        naive = (x_t - (1 - a_t).sqrt() * eps_s) / a_t.sqrt()
        assert float(((naive - x0) ** 2).mean()) > 0.1
        # the server's best view is x_k: rescaled, it misses x0 by the analytic floor for k
        x_k = schedule.recover_cut(sched, x_t, t, torch.full_like(t, K), eps_s)
        err = float(((x_k / sched.abar[K].sqrt() - x0) ** 2).mean())
        assert 0.7 * floor < err < 1.3 * floor
        # no received tensor is any client's training image
        for part in (x_t, eps_s, x_k):
            for c2, imgs in x0_all.items():
                d = ((part.numpy()[:, None] - imgs[None]) ** 2).reshape(len(part), len(imgs), -1).mean(-1)
                assert d.min() > 1e-3
    assert n_train == 2 * 4  # two clients, four steps: every message was audited


def test_at_c1_the_server_receives_nothing(tmp_path):
    rec = _record_run(tmp_path, 1.0)
    assert glob.glob(str(rec / "recv-r0-*")) == []
    server = next(iter(results.read(tmp_path / "r.h5")["runs"].values()))["ranks"][0]
    assert int(server["comm"]["bytes"][server["comm"]["direction"] == "recv"].sum()) == 0
