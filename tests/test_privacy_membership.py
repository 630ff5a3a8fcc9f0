"""Tests for collafuse_mpi.privacy.membership: loss-based membership inference.

The contract: losses are the protocol's own training losses (server: t in k+1..T on the sub-chain
from x_k; client: t in 1..k), every candidate sees the same draws, and mia_scores computes
ROC AUC / TPR at low FPR exactly as their definitions over the rule "member if -loss >= tau".
Statistical tolerances are z-bounds from the sample size (false alarm about 1e-4 or less).
"""
import math

import numpy as np
import pytest
import torch

from collafuse_mpi.config import DataConfig
from collafuse_mpi.data import load_images
from collafuse_mpi.model import UNet
from collafuse_mpi.privacy.membership import client_losses, mia_scores, server_losses
from collafuse_mpi.schedule import Schedule

T, K = 100, 30


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, as each rank runs


@pytest.fixture(scope="module")
def split():
    """Embedded digits (16x16, [-1, 1]); a random member / non-member split of 120 images."""
    x = torch.from_numpy(load_images(DataConfig())[0])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:60]], x[perm[60:120]]


def nearest(x_t, a, members):
    """Residuals x_t - sqrt(a) m_j for the member m_j nearest in that sense (the channel's ML pick)."""
    r = x_t.flatten(1)[:, None, :] - a.sqrt().view(-1, 1, 1) * members.flatten(1)[None]
    j = r.pow(2).sum(-1).argmin(1)
    return r[torch.arange(len(j)), j].view_as(x_t)


def memorising_server(sched, members):
    """Knows the member images: the MMSE eps_s given x_t and the nearest member x0,
    E[eps_s | x_t, x0] = sqrt(1 - g_t) (x_t - sqrt(abar_t) x0) / (1 - abar_t)."""
    def f(x_t, t, k):
        a = sched.abar[t].to(x_t.dtype)
        g = (sched.abar[t] / sched.abar[k]).to(x_t.dtype)
        return ((1 - g).sqrt() / (1 - a)).view(-1, 1, 1, 1) * nearest(x_t, a, members)
    return f


def memorising_client(sched, members):
    """Returns the eps exactly implied by the nearest member: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    def f(x_t, t):
        a = sched.abar[t].to(x_t.dtype)
        return nearest(x_t, a, members) / (1 - a).sqrt().view(-1, 1, 1, 1)
    return f


# ------------------------------------------------------------------ the attack end to end

def test_memorising_server_model_is_caught(split):
    mem, non = split
    sched = Schedule(T, "cosine")
    f = memorising_server(sched, mem)
    s = mia_scores(server_losses(f, sched, mem, K, 16, 1), server_losses(f, sched, non, K, 16, 1))
    assert s["n_members"] == 60 and s["n_nonmembers"] == 60
    assert s["auc"] > 0.97 and s["tpr_at_1pct_fpr"] > 0.5 and s["tpr_at_10pct_fpr"] > 0.9
    assert s["balanced_accuracy"] > 0.9


def test_memorising_client_model_is_caught(split):
    mem, non = split
    sched = Schedule(T, "cosine")
    f = memorising_client(sched, mem)
    lm, ln = client_losses(f, sched, mem, K, 8, 2), client_losses(f, sched, non, K, 8, 2)
    assert lm.max() < 1e-8          # every member's noise is recovered exactly
    s = mia_scores(lm, ln)
    assert s["auc"] == 1.0 and s["tpr_at_1pct_fpr"] == 1.0 and s["balanced_accuracy"] == 1.0


@pytest.mark.parametrize("side", ["server", "client"])
def test_untrained_model_gives_chance(split, side):
    """A random-init UNet never saw the members: with a random split, members and non-members are
    exchangeable, so AUC has mean 1/2 and std sqrt((n_m + n_n + 1) / (12 n_m n_n)) (0.053 here);
    we allow 4 std. The project's UNet zero-initialises its output layer (every loss equal: AUC
    exactly 1/2, ties counted half); re-randomising it gives image-dependent losses."""
    mem, non = split
    sched = Schedule(T, "cosine")
    torch.manual_seed(3)
    net = UNet(1, "tiny", cut_conditioned=side == "server").eval()
    if side == "server":
        f, losses = (lambda x, t, k: net(x, t, k)), server_losses
    else:
        f, losses = (lambda x, t: net(x, t)), client_losses
    zero = mia_scores(losses(f, sched, mem, K, 4, 5), losses(f, sched, non, K, 4, 5))
    assert zero["auc"] == 0.5 and zero["balanced_accuracy"] == 0.5
    net.out[-1].reset_parameters()
    lm, ln = losses(f, sched, mem, K, 4, 5), losses(f, sched, non, K, 4, 5)
    assert lm.std() > 1e-3              # the scores really vary from image to image
    s = mia_scores(lm, ln)
    assert abs(s["auc"] - 0.5) <= 4 * s["auc_null_std"]
    assert s["auc_null_std"] == pytest.approx(math.sqrt(121 / (12 * 60 * 60)))


# ------------------------------------------------------------------ the losses follow the protocol

def test_server_losses_use_the_protocol_draws_shared_by_every_candidate(split):
    """Recorded inputs: t in k+1..T, k constant; the residual x_t - sqrt(abar_t) x0 is the same for
    every image of a draw (common random numbers) and is N(0, (1 - abar_t) I); and the target is
    eps_s, not the total noise: the MMSE eps_s predictor has expected loss 1 - (1 - g_t)/(1 - abar_t)."""
    mem, _ = split
    x0 = mem[:5].double()
    sched = Schedule(T, "cosine")
    seen = []

    def rec(x_t, t, k):
        seen.append((x_t.clone(), t.clone(), k.clone()))
        return torch.zeros_like(x_t)
    n_draws = 200
    server_losses(rec, sched, x0, K, n_draws, 7)
    assert len(seen) == n_draws
    z, ts = [], []
    for x_t, t, k in seen:
        assert (k == K).all() and (t == t[0]).all() and K < t[0] <= T
        a = sched.abar[t[0]]
        r = x_t - a.sqrt() * x0
        torch.testing.assert_close(r, r[:1].expand_as(r), rtol=0, atol=1e-12)
        z.append(r[0].flatten() / (1 - a).sqrt())
        ts.append(t[0].item())
    z = torch.cat(z)
    assert abs(z.mean().item()) < 4.5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 4.5 * math.sqrt(2 / z.numel())
    assert min(ts) <= K + 5 and max(ts) >= T - 5       # spread over the server's range
    # the target is eps_s: the memorising MMSE predictor's loss matches its closed form
    f = memorising_server(sched, x0)
    got = server_losses(f, sched, x0, K, n_draws, 7)
    t_used = torch.tensor(ts)
    g = sched.abar[t_used] / sched.abar[K]
    v = 1 - (1 - g) / (1 - sched.abar[t_used])       # per-pixel error variance of draw d
    D = x0[0].numel()
    sd = math.sqrt((2 * v ** 2).sum().item() / D) / n_draws
    assert (got - v.mean()).abs().max() < 4.5 * sd


def test_losses_do_not_depend_on_the_other_candidates_or_the_batching(split):
    mem, non = split
    sched = Schedule(T, "cosine")
    f = memorising_server(sched, mem)
    both = torch.cat([mem[:7], non[:7], mem[:1]])
    full = server_losses(f, sched, both, K, 6, 11, batch_size=4)
    assert full[0] == full[-1]                      # the same image twice: the same loss
    part = server_losses(f, sched, non[:7], K, 6, 11, batch_size=256)
    torch.testing.assert_close(full[7:14], part, rtol=1e-12, atol=1e-12)
    g = memorising_client(sched, mem)
    c_full = client_losses(g, sched, both, K, 6, 11, batch_size=3)
    c_part = client_losses(g, sched, both[7:14], K, 6, 11)
    torch.testing.assert_close(c_full[7:14], c_part, rtol=1e-12, atol=1e-12)
    assert full.dtype == torch.float64 and full.shape == (15,)
    # seeded: the same seed gives the same losses, another seed other draws
    assert torch.equal(server_losses(f, sched, non[:7], K, 6, 11), part)
    assert not torch.equal(server_losses(f, sched, non[:7], K, 6, 12), part)


def test_bad_inputs_are_refused(split):
    mem, _ = split
    sched = Schedule(T, "cosine")
    zero3 = lambda x, t, k: torch.zeros_like(x)
    zero2 = lambda x, t: torch.zeros_like(x)
    with pytest.raises(ValueError, match="k"):
        server_losses(zero3, sched, mem[:2], T, 2, 0)      # c = 1: the server trains nothing
    with pytest.raises(ValueError, match="k"):
        client_losses(zero2, sched, mem[:2], 0, 2, 0)      # c = 0: the client trains nothing
    with pytest.raises(ValueError, match="n_draws"):
        server_losses(zero3, sched, mem[:2], K, 0, 0)
    with pytest.raises(ValueError, match="empty"):
        mia_scores([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        mia_scores([1.0, float("nan")], [1.0])


# ------------------------------------------------------------------ mia_scores against definitions

def brute(member_losses, nonmember_losses):
    sm, sn = -np.asarray(member_losses, float), -np.asarray(nonmember_losses, float)
    auc = sum((a > b) + 0.5 * (a == b) for a in sm for b in sn) / (sm.size * sn.size)
    rows = []
    for tau in list(np.concatenate([sm, sn])) + [np.inf]:
        rows.append(((sm >= tau).mean(), (sn >= tau).mean()))
    tpr = lambda lim: max(tp for tp, fp in rows if fp <= lim + 1e-12)
    bal = max((tp + 1 - fp) / 2 for tp, fp in rows)
    return auc, tpr(0.01), tpr(0.10), bal


def test_hand_computed_example():
    # scores -1 -2 -3 vs -2 -4 -5: pairs won 3 + 2.5 + 2 of 9
    s = mia_scores([1, 2, 3], [2, 4, 5])
    assert s["auc"] == pytest.approx(7.5 / 9)
    assert s["tpr_at_1pct_fpr"] == pytest.approx(1 / 3)   # no false positive allowed: only -1 > -2
    assert s["tpr_at_10pct_fpr"] == pytest.approx(1 / 3)
    assert s["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert mia_scores([0.0], [0.0])["auc"] == 0.5


def test_matches_brute_force_on_small_lists_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n_m, n_n = rng.integers(1, 25), rng.integers(1, 250)
        hi = rng.integers(2, 12)                             # few values: many ties
        lm, ln = rng.integers(0, hi, n_m) * 0.5, rng.integers(0, hi, n_n) * 0.5 + rng.integers(0, 2)
        s = mia_scores(lm, ln)
        auc, t1, t10, bal = brute(lm, ln)
        assert s["auc"] == pytest.approx(auc, abs=1e-12), trial
        assert s["tpr_at_1pct_fpr"] == pytest.approx(t1, abs=1e-12), trial
        assert s["tpr_at_10pct_fpr"] == pytest.approx(t10, abs=1e-12), trial
        assert s["balanced_accuracy"] == pytest.approx(bal, abs=1e-12), trial


def test_tpr_at_1pct_fpr_with_many_nonmembers_allows_one_percent():
    # 200 non-members at losses 1..200, members at 0.5 (below all) and 1.5 (between the two
    # lowest non-members): FPR <= 1 % allows 2 false positives, so both are caught
    s = mia_scores([0.5, 1.5, 2.5, 300.0], np.arange(1, 201))
    assert s["tpr_at_1pct_fpr"] == pytest.approx(3 / 4)
    s = mia_scores([0.5, 1.5, 2.5, 300.0], np.arange(1, 51))   # 50 non-members: no false positive
    assert s["tpr_at_1pct_fpr"] == pytest.approx(1 / 4)


def test_symmetric_and_invariant_to_monotone_transforms():
    rng = np.random.default_rng(1)
    lm, ln = rng.gamma(2.0, 1.0, 80), rng.gamma(2.5, 1.0, 120)
    s = mia_scores(lm, ln)
    assert mia_scores(ln, lm)["auc"] == pytest.approx(1 - s["auc"], abs=1e-12)
    assert mia_scores(-ln, -lm)["auc"] == pytest.approx(s["auc"], abs=1e-12)
    for f in (np.log, lambda v: v ** 3 + 7, lambda v: np.exp(2 * v)):
        assert mia_scores(f(lm), f(ln)) == pytest.approx(s)
    assert mia_scores(torch.tensor(lm), torch.tensor(ln)) == pytest.approx(s)
