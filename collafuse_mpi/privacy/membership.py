"""Loss-based membership inference on a released denoiser (Carlini et al. 2021, arXiv 2112.03570,
report TPR at a low FPR beside ROC AUC; for diffusion models Matsumoto et al. 2023, arXiv 2302.01316).

Threat model: the model's weights are released (the server model after training, or a client
model if a client publishes it). The attacker holds candidate images and wants to tell which were
in the training set. It scores each candidate by the model's own training loss on it, computed
over the part of the chain the model was trained on, and calls low-loss candidates members.

- Server model: the protocol's loss |eps_s - eps_server(x_t, t, k)|^2 with
  x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps_c, t ~ U{k+1..T},
  x_t = sqrt(g_t) x_k + sqrt(1 - g_t) eps_s (schedule.q_sample / sub_sample / uniform_t).
- Client model: |eps - eps_client(x_t, t)|^2 with t ~ U{1..k}, x_t = q_sample(x0, t, eps).

Every candidate sees the SAME n_draws draws of (noise, t) (common random numbers), so two
candidates' scores differ only through the images and the model, not through luck of the draw.
"""
from __future__ import annotations

import numpy as np
import torch

from collafuse_mpi import schedule


def _draws(x0: torch.Tensor, n_draws: int, seed: int, lo: int, hi: int, n_noises: int):
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn((n_draws, *x0.shape[1:]), generator=gen, dtype=x0.dtype) for _ in range(n_noises)]
    return schedule.uniform_t(lo, hi, n_draws, gen), noises


def _per_image_loss(eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    return (eps_hat.double() - eps.double()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def server_losses(model_fn, sched, x0: torch.Tensor, k: int, n_draws: int, seed: int,
                  batch_size: int = 256) -> torch.Tensor:
    """Per-image server loss, float64 [N] on the CPU, averaged over n_draws protocol draws.

    model_fn(x_t, t, k_tensor) -> eps_hat (put a module in eval mode first). Draw d uses one
    (eps_c, t, eps_s) for every image. Needs 0 <= k < T. batch_size bounds images per call.
    """
    if not 0 <= k < sched.T:
        raise ValueError(f"server losses need 0 <= k < T = {sched.T}, got k = {k}")
    t_all, (eps_c_all, eps_s_all) = _draws(x0, n_draws, seed, k + 1, sched.T, 2)
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for d in range(n_draws):
        for lo in range(0, x0.shape[0], batch_size):
            x = x0[lo:lo + batch_size]
            n = x.shape[0]
            kk = torch.full((n,), k, dtype=torch.long)
            t = t_all[d].repeat(n)
            eps_c = eps_c_all[d].expand_as(x).to(x.device)
            eps_s = eps_s_all[d].expand_as(x).to(x.device)
            x_k = schedule.q_sample(sched, x, kk, eps_c)
            x_t = schedule.sub_sample(sched, x_k, t, kk, eps_s)
            eps_hat = model_fn(x_t, t.to(x.device), kk.to(x.device))
            total[lo:lo + n] += _per_image_loss(eps_s, eps_hat).cpu()
    return total / n_draws


@torch.no_grad()
def client_losses(model_fn, sched, x0: torch.Tensor, k: int, n_draws: int, seed: int,
                  batch_size: int = 256) -> torch.Tensor:
    """Per-image client loss over t in 1..k, float64 [N], same draws for every image.

    model_fn(x_t, t) -> eps_hat. Needs 1 <= k <= T (at k = 0 the client trains nothing).
    """
    if not 1 <= k <= sched.T:
        raise ValueError(f"client losses need 1 <= k <= T = {sched.T}, got k = {k}")
    t_all, (eps_all,) = _draws(x0, n_draws, seed, 1, k, 1)
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for d in range(n_draws):
        for lo in range(0, x0.shape[0], batch_size):
            x = x0[lo:lo + batch_size]
            n = x.shape[0]
            t = t_all[d].repeat(n)
            eps = eps_all[d].expand_as(x).to(x.device)
            x_t = schedule.q_sample(sched, x, t, eps)
            total[lo:lo + n] += _per_image_loss(eps, model_fn(x_t, t.to(x.device))).cpu()
    return total / n_draws


def _as_scores(losses, name: str) -> np.ndarray:
    a = np.asarray(losses.cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values")
    return -a  # lower loss = more likely a member


def _tpr_at_fpr(tp: np.ndarray, fp: np.ndarray, n_m: int, n_n: int, max_fpr: float) -> float:
    ok = fp <= max_fpr * n_n + 1e-9
    return float(tp[ok].max() / n_m)


def mia_scores(member_losses, nonmember_losses) -> dict:
    """Attack quality of the rule "member if -loss >= tau", over every threshold tau.

    Returns auc (Mann-Whitney: P(score_member > score_nonmember), ties counted half),
    tpr_at_1pct_fpr and tpr_at_10pct_fpr (the largest TPR among thresholds whose FPR, measured on
    the non-members, is <= 1 % / 10 %), balanced_accuracy (max over tau of (TPR + TNR) / 2, at
    least 0.5), n_members, n_nonmembers, and auc_null_std, the AUC's standard deviation when
    membership does not matter, sqrt((n_m + n_n + 1) / (12 n_m n_n)), to judge a value near 0.5.

    FPR moves in steps of 1 / n_nonmembers. With fewer than 100 non-members, FPR <= 1 % allows no
    false positive at all, so tpr_at_1pct_fpr is the fraction of members scoring strictly above
    every non-member (likewise 10 % with fewer than 10). Such a figure is a worst case over very
    few non-members, not an estimate of a 1 % operating point: report n_nonmembers beside it.
    """
    sm, sn = _as_scores(member_losses, "member_losses"), _as_scores(nonmember_losses, "nonmember_losses")
    n_m, n_n = sm.size, sn.size
    # Mann-Whitney U from mid-ranks (ties get the average rank, so they count half).
    allv = np.concatenate([sm, sn])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size)
    sorted_v = allv[order]
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(mid, counts)
    u = ranks[:n_m].sum() - n_m * (n_m + 1) / 2.0
    auc = u / (n_m * n_n)
    # Every distinct classifier "score >= tau": tau at each distinct score, plus +inf (none).
    taus = np.append(np.unique(allv), np.inf)
    tp = n_m - np.searchsorted(np.sort(sm), taus, side="left")
    fp = n_n - np.searchsorted(np.sort(sn), taus, side="left")
    bal = 0.5 * (1.0 + (tp / n_m - fp / n_n).max())
    return {
        "auc": float(auc),
        "tpr_at_1pct_fpr": _tpr_at_fpr(tp, fp, n_m, n_n, 0.01),
        "tpr_at_10pct_fpr": _tpr_at_fpr(tp, fp, n_m, n_n, 0.10),
        "balanced_accuracy": float(bal),
        "n_members": int(n_m),
        "n_nonmembers": int(n_n),
        "auc_null_std": float(np.sqrt((n_m + n_n + 1) / (12.0 * n_m * n_n))),
    }
