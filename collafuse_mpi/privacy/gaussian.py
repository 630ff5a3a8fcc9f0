"""Gaussian-channel attacks and anchors: what x_k = sqrt(a) x0 + sqrt(1 - a) eps reveals of x0.

Every estimate here uses only statistics the attacker has: the views it received (the mean and
covariance of x0 follow from Cov[x_k] = a Cov[x0] + (1 - a) I) or public images of the same
kind. On Gaussian data the full-covariance linear MMSE is the optimal estimator and its
expected MSE is `LinearPrior.mse(a)`; on other data it is the best linear one, and a learned
attacker may do better (see learned.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG2 = math.log(2.0)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def linked_abar(a: float, m) -> torch.Tensor | float:
    """The channel of the mean of m independent views, rescaled to unit total variance:
    a' / (1 - a') = m a / (1 - a)."""
    if a >= 1.0:
        return 1.0
    return m * a / (m * a + 1.0 - a)


def rescale_linked(mean_view: torch.Tensor, a: float, m) -> torch.Tensor:
    """Scale the mean of m views so that it reads as one view at linked_abar(a, m)."""
    if a >= 1.0:
        return mean_view
    a_m = linked_abar(a, m)
    scale = torch.sqrt(torch.as_tensor(a_m, dtype=torch.float64) / a)
    return mean_view * scale.reshape(-1, *([1] * (mean_view.dim() - 1))) if scale.dim() else mean_view * scale


@dataclass
class LinearPrior:
    """x0 ~ (mean, U diag(s) U^T): a prior the attacker holds, and the linear MMSE under it."""
    mean: torch.Tensor       # [D] float64
    basis: torch.Tensor      # [D, D] eigenvectors of Cov[x0]
    spectrum: torch.Tensor   # [D] eigenvalues, >= 0
    source: str

    @classmethod
    def from_images(cls, x0: torch.Tensor, source: str = "public") -> "LinearPrior":
        """Mean and covariance of images the attacker holds (public data)."""
        f = _flat(x0)
        cov = torch.cov(f.T) if f.shape[0] > 1 else torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        s, u = torch.linalg.eigh(cov)
        return cls(f.mean(0), u, s.clamp_min(0), source)

    @classmethod
    def from_views(cls, views: torch.Tensor, a: float) -> "LinearPrior":
        """Moments of x0 from the views alone: E[x0] = E[x_k]/sqrt(a), Cov[x0] = (Cov[x_k] - (1-a) I)/a,
        with negative eigenvalues (sampling noise) clipped to zero."""
        f = _flat(views)
        cov = torch.cov(f.T) if f.shape[0] > 1 else torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        s, u = torch.linalg.eigh(cov)
        return cls(f.mean(0) / math.sqrt(a), u, ((s - (1 - a)) / a).clamp_min(0), "views")

    @classmethod
    def scalar_from_views(cls, views: torch.Tensor, a: float) -> "LinearPrior":
        """The scalar model: every pixel independent with one mean and one variance."""
        f = _flat(views)
        d = f.shape[1]
        var = max((float(f.var()) - (1 - a)) / a, 0.0)
        mean = torch.full((d,), float(f.mean()) / math.sqrt(a), dtype=torch.float64)
        return cls(mean, torch.eye(d, dtype=torch.float64), torch.full((d,), var, dtype=torch.float64), "scalar")

    def _gain(self, a) -> torch.Tensor:
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
        return a.sqrt() * self.spectrum / (a * self.spectrum + (1 - a)).clamp_min(1e-300)

    def estimate(self, y: torch.Tensor, a, clip: bool = True) -> torch.Tensor:
        """E_lin[x0 | y] for y = sqrt(a) x0 + sqrt(1-a) eps; a a float or one per row."""
        f = _flat(y)
        a_t = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
        centred = (f - a_t.sqrt() * self.mean) @ self.basis
        x = self.mean + (centred * self._gain(a)) @ self.basis.T
        x = x.reshape(y.shape).to(y.dtype)
        return x.clamp(-1, 1) if clip else x

    def mse(self, a) -> float:
        """Expected per-pixel MSE of `estimate` (unclipped) when the prior is true: the linear
        MMSE floor, and the MMSE itself for Gaussian data."""
        if a >= 1.0:
            return 0.0
        s = self.spectrum
        return float((s * (1 - a) / (a * s + 1 - a)).mean())

    def mutual_information_bits(self, a) -> float:
        """Upper bound on I(x0; y) per image, in bits: for any x0 with this covariance the
        Gaussian channel carries at most 1/2 logdet(I + a/(1-a) Cov[x0]) (equality for Gaussian x0)."""
        if a >= 1.0:
            return math.inf
        return float(0.5 * torch.log1p(a / (1 - a) * self.spectrum).sum() / LOG2)

    def diagonal_information_bits(self, a) -> float:
        """The same bound from the per-pixel variances alone (looser, by Hadamard's inequality)."""
        if a >= 1.0:
            return math.inf
        var = (self.basis ** 2 * self.spectrum).sum(1)  # diagonal of U diag(s) U^T
        return float(0.5 * torch.log1p(a / (1 - a) * var).sum() / LOG2)
