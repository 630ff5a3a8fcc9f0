"""Blind linking: which received views show the same image, with no labels.

Two views of one image differ by noise only, v - w ~ N(0, 2(1-a) I); views of different images
(under the attacker's Gaussian prior) by N(0, 2(1-a) I + 2a Cov[x0]). The likelihood-ratio test
between the two weighs each eigendirection i of Cov[x0] (eigenvalue s_i) by
w_i = a s_i / ((1-a)(1-a + a s_i)): directions without signal carry only noise and count for
nothing. A view is linked to the views of other steps whose weighted squared distance is below
its mean for one image plus z standard deviations (an image is in a batch at most once, so
views of one step never show one image), at most `limit` of them, nearest first. Exact
duplicates (one eps_c per image) are linked to each other alone: averaging copies adds nothing.
"""
from __future__ import annotations

import math

import torch

CHUNK = 512
DUPLICATE = 1e-8  # mean squared difference per pixel below which two views are copies


def link(views: torch.Tensor, steps: torch.Tensor, a: float, z: float, limit: int = 32, prior=None):
    """Neighbour lists as (flat indices, offsets): row i's links are flat[off[i]:off[i+1]].
    prior: the attacker's LinearPrior (None: every pixel weighs the same)."""
    raw = views.reshape(views.shape[0], -1)
    n, d = raw.shape
    dup_tol = DUPLICATE * d
    if prior is not None and a < 1.0:
        w = a * prior.spectrum / ((1 - a) * (1 - a + a * prior.spectrum))
        f = (raw.double() @ prior.basis) * w.sqrt()
        mean, sd = 2 * (1 - a) * float(w.sum()), 2 * (1 - a) * math.sqrt(2 * float((w * w).sum()))
        dup_tol *= float(w.max())
    else:
        f = raw.double()  # float64: copies must come out at distance ~0, not at rounding noise
        mean, sd = 2 * (1 - a) * d, 2 * (1 - a) * math.sqrt(2 * d)
    tau = mean + z * sd
    sq = (f * f).sum(1)
    flat, counts = [], []
    for lo in range(0, n, CHUNK):
        blk = f[lo:lo + CHUNK]
        d2 = (sq[lo:lo + CHUNK, None] + sq[None] - 2 * blk @ f.T).clamp_min(0)
        d2[steps[lo:lo + CHUNK, None] == steps[None]] = math.inf  # same step: never the same image
        k = min(limit, n)
        val, idx = torch.topk(d2, k, dim=1, largest=False)
        dup = val < dup_tol
        keep = torch.where(dup.any(1, keepdim=True), dup, val < tau)
        flat.append(idx[keep])  # row by row, nearest first
        counts.append(keep.sum(1))
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.cat(counts), 0)
    return (torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long)), offsets


def linked_means(views: torch.Tensor, flat: torch.Tensor, offsets: torch.Tensor):
    """(mean of each view with its links, number of independent views in it). Copies count once."""
    f = views.reshape(views.shape[0], -1).double()
    n = f.shape[0]
    rows = torch.repeat_interleave(torch.arange(n), offsets[1:] - offsets[:-1])
    sums = f.clone().index_add_(0, rows, f[flat])
    m = (offsets[1:] - offsets[:-1] + 1).double()
    means = (sums / m[:, None]).reshape(views.shape).to(views.dtype)
    dup = torch.zeros(n, dtype=torch.bool)
    if len(flat):
        same = (f[rows] - f[flat]).pow(2).mean(1) < DUPLICATE
        dup = torch.zeros(n, dtype=torch.long).index_add_(0, rows, same.long()) > 0
    return means, torch.where(dup, torch.ones_like(m), m)


def link_quality(flat: torch.Tensor, offsets: torch.Tensor, truth: torch.Tensor, steps: torch.Tensor) -> dict:
    """Precision and recall of the links against the true image of each view (scored by the client)."""
    n = len(truth)
    rows = torch.repeat_interleave(torch.arange(n), offsets[1:] - offsets[:-1])
    hits = int((truth[rows] == truth[flat]).sum()) if len(flat) else 0
    same = (truth[:, None] == truth[None]) & (steps[:, None] != steps[None])
    possible = int(same.sum())
    return {"precision": hits / len(flat) if len(flat) else math.nan,
            "recall": hits / possible if possible else math.nan,
            "links_per_view": len(flat) / max(n, 1),
            "views_per_image": float(torch.unique(truth, return_counts=True)[1].double().mean())}
