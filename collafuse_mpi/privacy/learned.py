"""A learned reconstruction attacker: a denoiser x0 <- y trained on public images only.

Channel: y = sqrt(a) x0 + sqrt(1 - a) eps, eps ~ N(0, I), images [N, C, H, W] in [-1, 1]. A cut
image x_k is this channel at a = abar_k. The mean of m independent views of one image is the same
channel at a higher signal-to-noise ratio once rescaled (effective_view): SNR a / (1 - a) becomes
m a / (1 - a), i.e. a_eff = m a / (m a + 1 - a). So one model, conditioned on the noise level
through log-SNR log(a / (1 - a)), serves single views and linked views alike.

Threat model: the attacker (the server) holds public images of the same kind (never a client's
data) and trains on them alone; the cost of that training is part of the result (train_denoiser's
cost dict), since it is what the attack asks of the attacker.

Parameterisation (Karras et al. 2022, arXiv 2206.00364, "EDM" preconditioning): with
u = y / sqrt(a) - mu = (x0 - mu) + sigma n, sigma^2 = (1 - a) / a and mu, s the public mean and
standard deviation of a pixel,

    x0_hat = mu + c_skip u + c_out F(c_in u, log-SNR),   c_skip = s^2 / (sigma^2 + s^2),
    c_out = sigma s / sqrt(sigma^2 + s^2),   c_in = 1 / sqrt(sigma^2 + s^2).

The skip term alone is the scalar Wiener estimate; F (a small conv net with FiLM conditioning,
last layer zero-initialised) learns what the image structure adds, and its target has unit
variance at every noise level, so the loss weighs all levels alike.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

N_FREQ = 4  # sin/cos features of log-SNR fed to the FiLM MLP


def log_snr(a: torch.Tensor) -> torch.Tensor:
    return torch.log(a) - torch.log1p(-a)


def _level_features(lam: torch.Tensor) -> torch.Tensor:
    w = lam[:, None] * (0.25 * 2.0 ** torch.arange(N_FREQ, dtype=lam.dtype, device=lam.device))
    return torch.cat([lam[:, None] / 8, torch.sin(w), torch.cos(w)], 1)


class _FiLMBlock(nn.Module):
    """h + conv(silu(conv(silu(h)) * (1 + scale) + shift)); scale, shift from the noise level."""

    def __init__(self, ch: int, emb: int):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb, 2 * ch)

    def forward(self, h, e):
        scale, shift = self.film(e)[:, :, None, None].chunk(2, 1)
        return h + self.c2(F.silu(self.c1(F.silu(h)) * (1 + scale) + shift))


class Denoiser(nn.Module):
    """Two-level conv net predicting x0 from y at noise level a (see the module docstring).

    mu, s: scalar pixel mean and standard deviation of the public training images (buffers).
    lam_range: the log-SNR range it was trained on; the FiLM input is clamped into it, so a level
    outside the range is treated as the nearest trained one (the skip term still uses the true a).
    """

    def __init__(self, channels: int = 1, width: int = 16, emb: int = 64):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(1 + 2 * N_FREQ, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.b1 = _FiLMBlock(width, emb)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.b2 = _FiLMBlock(2 * width, emb)
        self.b3 = _FiLMBlock(2 * width, emb)
        self.merge = nn.Conv2d(3 * width, width, 3, padding=1)
        self.b4 = _FiLMBlock(width, emb)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("mu", torch.zeros(()))
        self.register_buffer("s", torch.ones(()))
        self.register_buffer("lam_range", torch.tensor([-20.0, 20.0]))

    def net(self, u_in, lam):
        e = self.emb(_level_features(lam.clamp(self.lam_range[0], self.lam_range[1])))
        h1 = self.b1(self.inp(u_in), e)
        h2 = self.b3(self.b2(self.down(F.silu(h1)), e), e)
        up = F.interpolate(h2, size=h1.shape[-2:], mode="nearest")
        return self.out(F.silu(self.b4(self.merge(torch.cat([h1, up], 1)), e)))

    def precondition(self, y, a):
        """u, c_skip, c_out, c_in, log-SNR for y at levels a ([N], float)."""
        a = a.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
        sig2 = (1 - a) / a
        s2 = self.s.to(y.dtype) ** 2
        u = y / a.sqrt() - self.mu.to(y.dtype)
        c_skip, c_out, c_in = s2 / (sig2 + s2), (sig2 * s2 / (sig2 + s2)).sqrt(), (sig2 + s2).rsqrt()
        return u, c_skip, c_out, c_in, log_snr(a.flatten())

    def forward(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Unclamped x0 estimate; a: [N] levels in (0, 1)."""
        u, c_skip, c_out, c_in, lam = self.precondition(y, a)
        return self.mu.to(y.dtype) + c_skip * u + c_out * self.net(c_in * u, lam)


def _levels(a, n: int, device) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float32, device=device).flatten()
    a = a.expand(n) if a.numel() == 1 else a
    if a.numel() != n:
        raise ValueError(f"a must be a number or one level per image ({n}), got {a.numel()}")
    if not ((a > 0) & (a < 1)).all():
        raise ValueError("noise levels a must lie in (0, 1)")
    return a


def noisy(x0: torch.Tensor, a, gen: torch.Generator) -> torch.Tensor:
    """y = sqrt(a) x0 + sqrt(1 - a) eps, eps from gen (a CPU generator); a a number or [N]."""
    lv = _levels(a, x0.shape[0], "cpu").to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return (lv.sqrt() * x0.cpu() + (1 - lv).sqrt() * eps).to(x0.device)


def effective_view(y_mean: torch.Tensor, a: float, m: int) -> tuple[torch.Tensor, float]:
    """The mean of m independent views at level a, rescaled to the channel at a_eff:
    returns (sqrt(a_eff / a) * y_mean, a_eff) with a_eff = m a / (m a + 1 - a)."""
    if m < 1 or not 0 < a < 1:
        raise ValueError(f"need m >= 1 and 0 < a < 1, got m = {m}, a = {a}")
    a_eff = m * a / (m * a + 1 - a)
    return y_mean * math.sqrt(a_eff / a), a_eff


@torch.no_grad()
def reconstruct(model: Denoiser, y: torch.Tensor, a, batch_size: int = 1024) -> torch.Tensor:
    """x0 estimate in [-1, 1] for y at level a (a number or one per image), in y's dtype and device."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    lv = _levels(a, y.shape[0], dev)
    out = [model(y[i:i + batch_size].to(dev, torch.float32), lv[i:i + batch_size]).clamp(-1, 1)
           for i in range(0, y.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out).to(y.device, y.dtype)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _train_step(model, opt, aux, a_lo_lam, a_hi_lam, batch_size, gen):
    idx = torch.randint(aux.shape[0], (batch_size,), generator=gen)
    x0 = aux[idx.to(aux.device)]
    lam = a_lo_lam + (a_hi_lam - a_lo_lam) * torch.rand(batch_size, generator=gen, dtype=torch.float64)
    a = torch.sigmoid(lam).float()
    eps = torch.randn(x0.shape, generator=gen).to(aux.device)
    av = a.to(aux.device).view(-1, 1, 1, 1)
    y = av.sqrt() * x0 + (1 - av).sqrt() * eps
    u, c_skip, c_out, c_in, lam_t = model.precondition(y, a.to(aux.device))
    target = (x0 - model.mu - c_skip * u) / c_out       # unit variance at every level
    loss = F.mse_loss(model.net(c_in * u, lam_t), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def train_denoiser(aux: torch.Tensor, a_min: float, a_max: float, steps: int, batch_size: int,
                   lr: float, seed: int, width: int = 16) -> tuple[Denoiser, dict]:
    """Train a Denoiser on public images aux [N, C, H, W] (float, in [-1, 1]) with levels a drawn
    log-uniformly in SNR a / (1 - a) over [a_min, a_max]. AdamW, cosine-decayed lr, grad clip 1.

    Deterministic given seed on the CPU (init and every draw come from the seed; the global RNG
    is left as it was). Returns (model in eval mode, cost) with cost: wall_s, cpu_s (this
    process's CPU seconds), steps, batch_size, n_aux, n_params, train_flops (matmul and conv
    FLOPs of one step from torch.utils.flop_counter, times steps),
    final_loss (mean loss of the last 10 % of steps, in units of the unit-variance target).
    """
    if not 0 < a_min <= a_max < 1:
        raise ValueError(f"need 0 < a_min <= a_max < 1, got {a_min}, {a_max}")
    if steps < 1 or batch_size < 1 or aux.shape[0] < 2:
        raise ValueError("need steps >= 1, batch_size >= 1 and at least 2 auxiliary images")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    aux = aux.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Denoiser(aux.shape[1], width).to(aux.device)
    lo, hi = math.log(a_min / (1 - a_min)), math.log(a_max / (1 - a_max))
    model.mu.fill_(aux.mean().item())
    model.s.fill_(max(aux.std().item(), 1e-3))
    model.lam_range.copy_(torch.tensor([lo, hi]))
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    counter = FlopCounterMode(display=False)
    for step in range(steps):
        with counter if step == 0 else _nothing():   # count the first step: all steps are alike
            losses.append(_train_step(model, opt, aux, lo, hi, batch_size, gen))
        sched.step()
    flops = int(counter.get_total_flops()) * steps
    model.eval()
    tail = losses[-max(1, steps // 10):]
    cost = {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
            "steps": steps, "batch_size": batch_size, "n_aux": int(aux.shape[0]),
            "n_params": sum(p.numel() for p in model.parameters()), "train_flops": flops,
            "final_loss": sum(tail) / len(tail)}
    return model, cost
