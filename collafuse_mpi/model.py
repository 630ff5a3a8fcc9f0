"""A compact time-conditioned UNet. The server variant is also conditioned on the cut k.

Nothing distributed here: the roles own the models and the transport moves tensors.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import MODEL_PRESETS


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _groups(ch: int) -> int:
    return 8 if ch % 8 == 0 else 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return h + self.skip(x)


class UNet(nn.Module):
    """eps-prediction UNet: one ResBlock per level down and up, skip connections, 2x resampling."""

    def __init__(self, channels: int = 1, preset: str = "tiny", cut_conditioned: bool = False, dropout: float = 0.0):
        super().__init__()
        base, mults, emb = MODEL_PRESETS[preset]
        self.emb_dim = emb
        self.cut_conditioned = cut_conditioned
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        # k enters like t: its own sinusoidal embedding, summed before the MLP.
        self.cut_mlp = nn.Linear(emb, emb) if cut_conditioned else None
        widths = [base * m for m in mults]
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(c, w, emb, dropout))
            self.pool.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
            c = w
        self.mid = ResBlock(c, c, emb, dropout)
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up.append(ResBlock(c + w, w, emb, dropout))
            self.unpool.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
            c = w
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, k=None):
        e = timestep_embedding(t, self.emb_dim)
        if self.cut_mlp is not None:
            if k is None:
                raise ValueError("the server model needs the cut k")
            e = e + self.cut_mlp(timestep_embedding(k, self.emb_dim))
        e = self.time_mlp(e)
        h = self.inp(x)
        skips = []
        for block, pool in zip(self.down, self.pool):
            h = block(h, e)
            skips.append(h)
            h = pool(h)
        h = self.mid(h, e)
        for block, unpool in zip(self.up, self.unpool):
            h = block(torch.cat([h, skips.pop()], 1), e)
            h = unpool(h)
        return self.out(h)


class EMA:
    """Exponential moving average of a model's weights, used for sampling."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
