"""Diffusion math of the split chain (DDPM, Ho et al. 2020, arXiv 2006.11239; DDIM, arXiv 2010.02502).

Timesteps t = 1..T, data at t = 0, abar_0 = 1. The client owns t in 1..k, the server t in k+1..T.
The server's sub-chain treats the cut image x_k as its data: g_t = abar_t / abar_k, so
x_t = sqrt(g_t) x_k + sqrt(1 - g_t) eps_s has exactly the marginal q(x_t | x0) when
x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps_c with eps_c independent of eps_s.
Schedules are computed in float64; tensors handed to models are float32.
"""
from __future__ import annotations

import math

import torch


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    # Scaled so the chain ends near pure noise for any T (the 1e-4..0.02 range is for T = 1000).
    scale = 1000.0 / T
    return torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    # Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17.
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class Schedule:
    """Per-step betas and cumulative products, indexed by t = 0..T (index 0 is the data)."""

    def __init__(self, T: int, kind: str = "cosine"):
        betas = linear_betas(T) if kind == "linear" else cosine_betas(T)
        self.T = T
        self.kind = kind
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # betas[0] unused
        self.alphas = 1 - self.betas
        self.abar = torch.cumprod(self.alphas, 0)  # abar[0] = 1

    def g(self, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """abar_t / abar_k, the cumulative product of the sub-chain that starts at x_k."""
        return self.abar[t] / self.abar[k]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).to(like.device).view(-1, *([1] * (like.dim() - 1)))


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = sched.abar[t.cpu()]
    return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * eps


def sub_sample(sched: Schedule, x_k: torch.Tensor, t: torch.Tensor, k: torch.Tensor, eps: torch.Tensor):
    """x_t = sqrt(g_t) x_k + sqrt(1 - g_t) eps for t > k."""
    g = sched.g(t.cpu(), k.cpu())
    return _bcast(g.sqrt(), x_k) * x_k + _bcast((1 - g).sqrt(), x_k) * eps


def uniform_t(lo: int, hi: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n timesteps uniform on {lo..hi}."""
    return torch.randint(lo, hi + 1, (n,), generator=gen)


def client_target(sched, x0, k: int, gen: torch.Generator):
    """Client training input: t ~ U{1..k}, x_t, and the noise to predict. Needs k >= 1."""
    t = uniform_t(1, k, x0.shape[0], gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
    return q_sample(sched, x0, t, eps), t, eps


def server_message(sched, x0, k: int, gen: torch.Generator, eps_c=None):
    """What a client sends the server for one batch: (x_t, t, eps_s). Needs k < T.

    eps_c, the noise that makes the cut image x_k, stays here: the server can recover x_k
    from the message but nothing closer to x0. None draws a fresh one from gen.
    """
    n = x0.shape[0]
    kk = torch.full((n,), k, dtype=torch.long)
    if eps_c is None:
        eps_c = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
    x_k = q_sample(sched, x0, kk, eps_c)
    t = uniform_t(k + 1, sched.T, n, gen)
    eps_s = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
    return sub_sample(sched, x_k, t, kk, eps_s), t, eps_s


def recover_cut(sched, x_t, t, k, eps_s):
    """The server's best view of the data: x_k = (x_t - sqrt(1 - g_t) eps_s) / sqrt(g_t)."""
    g = sched.g(t.cpu(), k.cpu())
    return (x_t - _bcast((1 - g).sqrt(), x_t) * eps_s) / _bcast(g.sqrt(), x_t)


def anchor_bound(sched, k: int) -> float:
    """Range the anchor can take: [-1, 1] data at k = 0; at k > 0 the cut image
    sqrt(abar_k) x0 + sqrt(1 - abar_k) eps_c with x0 in [-1, 1] and eps_c within 4 sigma.
    Clamping the predicted anchor to it keeps early, very noisy steps from blowing up."""
    a = sched.abar[k].item()
    return 1.0 if k == 0 else math.sqrt(a) + 4 * math.sqrt(1 - a)


def _clamp(x, clip):
    if clip is True:
        return x.clamp(-1, 1)
    if clip:  # a number: symmetric bound
        return x.clamp(-clip, clip)
    return x


def ddpm_step(sched, x_t, t: int, k: int, eps_hat, gen: torch.Generator, clip):
    """One ancestral step t -> t-1 of the chain anchored at k (k = 0: the plain DDPM step).

    The posterior q(x_{t-1} | x_t, x_k) with g in place of abar; at t = k+1 its variance is
    zero and it returns the predicted x_k itself, which is the exact hand-off at the cut.
    """
    g_t = (sched.abar[t] / sched.abar[k]).item()
    g_prev = (sched.abar[t - 1] / sched.abar[k]).item()
    beta, alpha = sched.betas[t].item(), sched.alphas[t].item()
    x_anchor = (x_t - math.sqrt(1 - g_t) * eps_hat) / math.sqrt(g_t)
    x_anchor = _clamp(x_anchor, clip)
    if t - 1 == k:
        return x_anchor
    mean = (math.sqrt(g_prev) * beta / (1 - g_t)) * x_anchor + (math.sqrt(alpha) * (1 - g_prev) / (1 - g_t)) * x_t
    var = beta * (1 - g_prev) / (1 - g_t)
    if var <= 0:
        return mean
    noise = torch.randn(x_t.shape, generator=gen, dtype=x_t.dtype).to(x_t.device)
    return mean + math.sqrt(var) * noise


def ddim_sigma2(sched, t: int, t_next: int, k: int, eta: float) -> float:
    """DDIM step variance (Song et al. 2020, eq. 16) on the chain anchored at k, g in place of abar:
    sigma^2 = eta^2 (1 - g_next) / (1 - g_t) (1 - g_t / g_next). At eta = 1 and t_next = t - 1
    it is the DDPM posterior variance beta_t (1 - g_{t-1}) / (1 - g_t)."""
    g_t = (sched.abar[t] / sched.abar[k]).item()
    g_next = (sched.abar[t_next] / sched.abar[k]).item()
    return eta * eta * (1 - g_next) / (1 - g_t) * (1 - g_t / g_next)


def ddim_step(sched, x_t, t: int, t_next: int, k: int, eps_hat, clip, eta: float = 0.0,
              gen: torch.Generator | None = None):
    """DDIM step from t to t_next >= k on the chain anchored at k.

    eta = 0 (default): deterministic, draws nothing. eta > 0: adds sigma z with z from gen and
    shrinks the eps direction to sqrt(1 - g_next - sigma^2), so q(x_next | x_k) is kept.
    Into the cut (t_next == k) it returns the predicted x_k with no noise, for any eta.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"ddim eta must be in [0, 1], got {eta}")
    g_t = (sched.abar[t] / sched.abar[k]).item()
    g_next = (sched.abar[t_next] / sched.abar[k]).item()
    x_anchor = (x_t - math.sqrt(1 - g_t) * eps_hat) / math.sqrt(g_t)
    x_anchor = _clamp(x_anchor, clip)
    if t_next == k:
        return x_anchor
    if eta == 0:
        return math.sqrt(g_next) * x_anchor + math.sqrt(1 - g_next) * eps_hat
    if gen is None:
        raise ValueError("ddim with eta > 0 needs a generator for its noise")
    var = ddim_sigma2(sched, t, t_next, k, eta)
    noise = torch.randn(x_t.shape, generator=gen, dtype=x_t.dtype).to(x_t.device)
    return (math.sqrt(g_next) * x_anchor + math.sqrt(max(1 - g_next - var, 0.0)) * eps_hat
            + math.sqrt(var) * noise)


def ddim_timesteps(T: int, k: int, steps: int) -> list[int]:
    """Descending timesteps T = s_0 > ... > 0 with k always among them.

    Steps are shared between the sides in proportion to their length of the chain, at least
    one per non-empty side, so the hand-off always lands on the cut.
    """
    steps = max(2, min(steps, T))
    if k in (0, T):
        return sorted({int(round(v)) for v in torch.linspace(T, 0, steps + 1).tolist()}, reverse=True)
    n_server = min(max(1, round(steps * (T - k) / T)), T - k)
    n_client = min(max(1, steps - n_server), k)
    server = {int(round(v)) for v in torch.linspace(T, k, n_server + 1).tolist()}
    client = {int(round(v)) for v in torch.linspace(k, 0, n_client + 1).tolist()}
    return sorted(server | client, reverse=True)


def side_steps(T: int, k: int, sampler: str, steps: int, side: str) -> list[tuple[int, int]]:
    """(t, t_next) pairs a side evaluates: server t > k down to k, client t <= k down to 0."""
    ts = list(range(T, -1, -1)) if sampler == "ddpm" else ddim_timesteps(T, k, steps)
    pairs = list(zip(ts[:-1], ts[1:]))
    if side == "server":
        return [(a, b) for a, b in pairs if a > k]
    return [(a, b) for a, b in pairs if a <= k]


@torch.no_grad()
def run_chain(sched, model_fn, x, k: int, pairs, sampler: str, gen: torch.Generator, clip,
              eta: float = 0.0):
    """Apply a side's steps to x. model_fn(x, t_tensor) -> eps_hat. clip: False, True ([-1, 1])
    or a bound for the predicted anchor (see anchor_bound). eta: DDIM stochasticity (0 keeps
    the deterministic sampler; ignored by ddpm)."""
    for t, t_next in pairs:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps_hat = model_fn(x, tt)
        if sampler == "ddpm":
            x = ddpm_step(sched, x, t, k, eps_hat, gen, clip)
        else:
            x = ddim_step(sched, x, t, t_next, k, eps_hat, clip, eta, gen)
    return x
