"""Re-identification: which of M candidate images did a view come from?

The maximum-likelihood rule of the Gaussian channel, argmin_j |y - sqrt(a) c_j|^2, with the
true image among M candidates drawn from the client's own training data. Chance is 1/M.
"""
from __future__ import annotations

import torch


def candidates(truth: torch.Tensor, pool: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """[n, m] candidate indices per view; column 0 is the true image, the rest distinct others."""
    m = min(m, pool)
    rows = []
    for j in truth.tolist():
        others = torch.randperm(pool - 1, generator=gen)[:m - 1]
        others = others + (others >= j).long()  # skip the true image
        rows.append(torch.cat([torch.tensor([j]), others]))
    return torch.stack(rows)


def top1(views: torch.Tensor, a, images: torch.Tensor, cands: torch.Tensor) -> float:
    """Share of views whose ML choice among their candidates is the true one (column 0).
    a: one value or one per view. Ties go against the attacker."""
    y = views.reshape(views.shape[0], 1, -1).double()
    c = images.reshape(images.shape[0], -1).double()[cands]          # [n, m, D]
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1, 1)
    d2 = (y - a.sqrt() * c).pow(2).sum(-1)                             # [n, m]
    wins = d2[:, 0] < d2[:, 1:].min(1).values if cands.shape[1] > 1 else torch.ones(len(y), dtype=torch.bool)
    return float(wins.double().mean())
