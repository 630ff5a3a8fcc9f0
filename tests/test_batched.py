"""The batched training of a rank's logical clients equals the loop of their own Learner steps.

Contract: client j's weights move by client j's gradient alone (the summed loss), clipped by its
own norm, through AdamW and the EMA as torch applies them; a client outside the step's rows keeps
its weights, moments and step count; the learners get the stack's state back (`write_back`).
"""
import copy

import numpy as np
import pytest
import torch

from collafuse_mpi import results, run
from collafuse_mpi.batched import StackedLearners
from collafuse_mpi.harness import PhaseTimer
from collafuse_mpi.model import UNet
from collafuse_mpi.training import Learner
from conftest import assert_same_kid, tiny_config


def _learners(n, clip):
    out = []
    for j in range(n):
        torch.manual_seed(100 + j)
        model = UNet(1, "tiny", False, 0.0)
        for p in model.parameters():  # the output conv starts at zero: give every layer a gradient
            p.data.add_(0.05 * torch.randn_like(p))
        out.append(Learner(model, 2e-3, 0.9, clip))
    return out


def _inputs(step, j, b=4):
    g = torch.Generator().manual_seed(1000 * step + j)
    return (torch.randn((b, 1, 16, 16), generator=g), torch.randint(1, 10, (b,), generator=g),
            torch.randn((b, 1, 16, 16), generator=g))


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_stacked_step_equals_the_loop(clip, one_thread):
    loop = _learners(3, clip)
    stack = StackedLearners(copy.deepcopy(loop))
    timer = PhaseTimer()
    timer.start_step(0, False)
    for step, rows in enumerate([[0, 1, 2], [0, 2], [1], [0, 1]]):  # cohorts leave some out
        inputs = [_inputs(step, j) for j in rows]
        want = [float(loop[j].step(timer, eps, x, t)) for j, (x, t, eps) in zip(rows, inputs)]
        got = stack.step(timer, rows, inputs)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    stack.write_back()
    # Adam moves a weight by about lr per step whatever the gradient's size, so where a gradient is
    # near 0 the ~1e-7 relative differences of the batched convolutions show up magnified: weights
    # agree to 1 % of the 4 steps' largest move (4 * lr), moments to 1e-3 of their largest value.
    move = 0.01 * 4 * 2e-3
    for a, b, start in zip(loop, stack.learners, _learners(3, clip)):
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=move, msg=name)
        for p, q in zip(a.ema.model.parameters(), b.ema.model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=move)
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            sa, sb = a.opt.state[p], b.opt.state[q]
            assert float(sa["step"]) == float(sb["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sb[key], sa[key], rtol=1e-3, atol=1e-3 * float(sa[key].abs().max()))
        moved = max(float((p - q).detach().abs().max()) for p, q in zip(a.model.parameters(), start.model.parameters()))
        assert moved > 10 * move  # the check is not vacuous: the weights did move
    assert [float(lr.opt.state[next(lr.model.parameters())]["step"]) for lr in stack.learners] == [3, 3, 2]


def _run(path, batched):
    cfg = tiny_config(path)
    cfg.diffusion.client_cuts = [0.3, 0.6, 0.3]
    cfg.run.clients_per_rank, cfg.run.seed, cfg.run.save_models = 3, 3, False
    cfg.train.batched_clients, cfg.train.clients_per_step = batched, 2
    cfg.privacy.attacks = "none"
    run.run_loopback(cfg, 1)
    return next(iter(results.read(path)["runs"].values()))


def test_batched_run_equals_the_loop_run(tmp_path, one_thread):
    """A whole run with 3 logical clients in cohorts of 2: losses, samples and KID as the loop's."""
    a, b = _run(tmp_path / "loop.h5", False), _run(tmp_path / "batched.h5", True)
    np.testing.assert_allclose(b["ranks"][1]["client_loss"], a["ranks"][1]["client_loss"], rtol=1e-4, atol=1e-6)
    assert np.isnan(a["ranks"][1]["client_loss"]).sum() == 4  # one of three clients sits out each of 4 steps
    np.testing.assert_allclose(b["ranks"][0]["loss"], a["ranks"][0]["loss"], rtol=1e-4, atol=1e-6)
    for i in range(3):
        c = f"client_{i}"
        ga, gb = a["samples"][c]["generated"], b["samples"][c]["generated"]
        assert np.abs(ga.astype(int) - gb.astype(int)).max() <= 1
        assert_same_kid(a["metrics"][c]["kid"], b["metrics"][c]["kid"], ga, gb)
