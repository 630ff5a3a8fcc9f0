"""The privacy contract, audited on a real mpirun run: every message the server received is
recorded (COLLAFUSE_RECORD_DIR) next to the clients' true batches, and checked against them."""
import glob
import json
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


def _views_by_image(rec, sched):
    """Every x_k rank 0 could recover from its inbox, keyed by (client, training image)."""
    by = {}
    for f in sorted(glob.glob(str(rec / "recv-r0-*train_batch*.npz"))):
        msg = np.load(f)
        c, step = int(msg["client"]), int(msg["step"])
        x0 = np.load(rec / f"x0-client{c}-s{step}.npy")
        x_t, eps_s, t = unpack_train(torch.from_numpy(msg["payload"]).double(), tuple(x0.shape[1:]))
        x_k = schedule.recover_cut(sched, x_t, t, torch.full_like(t, int(msg["meta"])), eps_s)
        for img, view in zip(x0, x_k):
            by.setdefault((c, img.tobytes()), []).append(view.numpy())
    return by


def test_per_image_cut_noise_sends_one_view_per_image_and_linking_gains_nothing(tmp_path):
    rec = tmp_path / "rec"
    out = tmp_path / "r.h5"
    p = launch(3, [*TINY, "--timesteps", str(T), "--cut", str(CUT), "--steps", "12", "-o", str(out),
                   "--set", "privacy.cut_noise=per_image", "--set", "data.max_images=40"],
               env_extra={"COLLAFUSE_RECORD_DIR": str(rec)})
    assert p.returncode == 0, p.stderr
    by = _views_by_image(rec, schedule.Schedule(T, "cosine"))
    repeated = [v for v in by.values() if len(v) > 1]
    assert repeated  # 12 steps over ~14 images per client: images come back
    for views in repeated:  # the same x_k each time, up to float32 rounding of the message (1/sqrt(g) amplifies it)
        assert max(np.abs(v - views[0]).max() for v in views) < 1e-4
    run = next(iter(results.read(out)["runs"].values()))
    for c in (0, 1):
        pr = run["metrics"][f"client_{c}"]["privacy"]
        assert pr["cut_noise"] == "per_image"
        assert pr["linking"]["precision"] == 1.0  # copies are found, and are copies
        # averaging copies adds nothing: the linked estimate is the single-view one
        assert pr["linked"]["linear"]["psnr"] == pytest.approx(pr["reconstruction"]["linear"]["psnr"], abs=1e-3)


def test_fresh_cut_noise_sends_a_new_view_of_an_image_every_time(tmp_path):
    rec = tmp_path / "rec"
    p = launch(3, [*TINY, "--timesteps", str(T), "--cut", str(CUT), "--steps", "12", "-o", str(tmp_path / "r.h5"),
                   "--set", "data.max_images=40"], env_extra={"COLLAFUSE_RECORD_DIR": str(rec)})
    assert p.returncode == 0, p.stderr
    by = _views_by_image(rec, schedule.Schedule(T, "cosine"))
    repeated = [v for v in by.values() if len(v) > 1]
    assert repeated
    for views in repeated:
        assert min(np.abs(v - views[0]).max() for v in views[1:]) > 0.1


def test_rank0_attacks_use_only_what_it_received(tmp_path):
    """Re-run rank 0's attacks from the recorded inbox alone (plus the public share, which this
    test loads as rank 0 does): the scores match the run's, so nothing else went into them."""
    from collafuse_mpi import config
    from collafuse_mpi.data import aux_images, client_data
    from collafuse_mpi.privacy.attack import server_attacks
    from collafuse_mpi.privacy.views import ViewLog
    from collafuse_mpi import metrics

    rec, out = tmp_path / "rec", tmp_path / "r.h5"
    args = [*TINY, "--timesteps", str(T), "--cut", str(CUT), "--steps", "6", "-o", str(out),
            "--set", "privacy.attacks=scalar,linear,public_linear,multiview"]
    p = launch(3, args, env_extra={"COLLAFUSE_RECORD_DIR": str(rec)})
    assert p.returncode == 0, p.stderr
    run = next(iter(results.read(out)["runs"].values()))
    cfg = config.from_dict(json.loads(run["config"]) if isinstance(run["config"], str) else run["config"])
    sched = schedule.Schedule(T, "cosine")
    log = ViewLog(sched, cfg.privacy.max_views)
    for f in sorted(glob.glob(str(rec / "recv-r0-*train_batch*.npz")), key=lambda f: int(np.load(f)["step"])):
        msg = np.load(f)
        x_t, eps_s, t = unpack_train(torch.from_numpy(msg["payload"]), (1, 16, 16))
        log.add(int(msg["client"]), int(msg["step"]), x_t, t, int(msg["meta"]), eps_s)
    packages, _ = server_attacks(cfg, sched, log, {}, ("scalar", "linear", "public_linear", "multiview"),
                                 torch.from_numpy(aux_images(cfg)))
    for c, pkg in packages.items():
        data = client_data(cfg, c, 2)
        truth = [np.load(rec / f"x0-client{c}-s{s}.npy") for s in sorted(set(pkg["steps"].tolist()))]
        x0 = torch.from_numpy(np.concatenate(truth))
        assert x0.shape[0] == len(pkg["views"]) and len(data.train) >= 1
        for name in ("scalar", "linear", "public_linear"):
            psnr = float(metrics.psnr(pkg["recon"][name], x0).mean())
            assert psnr == pytest.approx(run["metrics"][f"client_{c}"]["privacy"]["reconstruction"][name]["psnr"], abs=1e-3)


def test_every_attack_reports_and_the_headline_is_the_strongest(tmp_path):
    out = tmp_path / "r.h5"
    p = launch(3, [*TINY, "--timesteps", str(T), "--cut", str(CUT), "--steps", "6", "-o", str(out),
                   "--set", "privacy.attacks=all", "--set", "privacy.learned_steps=20"])
    assert p.returncode == 0, p.stderr
    assert "disclosure: strongest attack" in p.stdout
    run = next(iter(results.read(out)["runs"].values()))
    pooled = run["metrics"]["pooled"]["privacy"]
    assert set(pooled["reconstruction"]) == {"scalar", "linear", "public_linear", "learned"}
    assert set(pooled["linked"]) == {"linear", "learned"}
    assert {"server", "client"} <= set(pooled["membership"]) and {"m10", "m100"} <= set(pooled["reid"])
    scores = {n: q["psnr"] for n, q in pooled["reconstruction"].items()}
    scores.update({f"multiview_{n}": q["psnr"] for n, q in pooled["linked"].items()})
    best = max(scores, key=scores.get)
    assert run["disclosure_attack"] == pooled["headline"]["attack"] == best
    assert run["disclosure_psnr"] == pytest.approx(scores[best])
    cost = pooled["cost"]["learned_training"]
    assert cost["steps"] == 20 and cost["seconds"] > 0 and cost["train_flops"] > 0
    for c in (0, 1):  # each client's own analytic anchors, per message and per run
        a = run["metrics"][f"client_{c}"]["privacy"]["analytic"]
        assert a["linear_mse"] <= a["scalar_mse"] <= a["rescale_mse"] + 1e-9
        assert a["mi_bits"] <= a["mi_diagonal_bits"] and a["mi_bits_run"] >= a["mi_bits"]
