"""The server's sampling chains T..k+1 for many clients: one batched chain, or one after another.

Fused: every chain starts at T and the chains advance in lockstep, one of their steps per tick;
each tick evaluates the model once on the rows of every chain still running, each row with its
own t and k (the model is conditioned on both), so chains whose schedules differ (DDIM steps
depend on k, cuts differ between clients) share every model call. A chain leaves after its
last step, into its own cut k, and its x_k goes to its client at once. The step math after the
model call is each chain's own, with its own generator: x_T and every noise draw come from the
client's stream in the same order as in the serial chain, so fusing changes no random number,
only the batch the model sees (equal to float tolerance).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import schedule


@dataclass
class Request:
    client: int  # logical client id
    k: int  # its cut: the chain ends at x_k
    n: int  # images
    gen: torch.Generator  # the client's sampling stream on the server
    pairs: list  # (t, t_next) steps of the server's side, T first


def _start(server, req: Request) -> torch.Tensor:
    return torch.randn((req.n, *server.image_shape), generator=req.gen).to(server.device)


def _step(server, req: Request, x, t: int, t_next: int, eps_hat):
    cfg = server.cfg
    clip = schedule.anchor_bound(server.sched, req.k)
    if cfg.diffusion.sampler == "ddpm":
        return schedule.ddpm_step(server.sched, x, t, req.k, eps_hat, req.gen, clip)
    return schedule.ddim_step(server.sched, x, t, t_next, req.k, eps_hat, clip, cfg.sample.eta, req.gen)


def _per_image_flops(server, x, t, k) -> int:
    """Forward FLOPs of one image (counted once per shape), times the rows of a call."""
    return server.learner.flops(x[:1], t[:1], k[:1]) * x.shape[0]


@torch.no_grad()
def run_serial(server, model, requests: list[Request], handles: list) -> None:
    """The reference: each chain on its own, the whole chain before the next starts."""
    dev = server.device
    for req in requests:
        x = _start(server, req)
        kk = torch.full((req.n,), req.k, dtype=torch.long, device=dev)
        for t, t_next in req.pairs:
            tt = torch.full((req.n,), t, dtype=torch.long, device=dev)
            server.timer.add_flops("sample", _per_image_flops(server, x, tt, kk))
            with server.timer.phase("sample"):
                x = _step(server, req, x, t, t_next, model(x, tt, kk))
        server.answer(req, x, handles)


@torch.no_grad()
def run_fused(server, model, requests: list[Request], handles: list) -> None:
    """All chains in lockstep, one model call per tick on every running chain's rows."""
    dev = server.device
    xs = [_start(server, req) for req in requests]  # each from its own stream, as serially
    pos = [0] * len(requests)
    running = [j for j, req in enumerate(requests) if req.pairs]
    for j, req in enumerate(requests):
        if not req.pairs:  # no server step (cannot happen for a sender, k < T): x_T is x_k
            server.answer(req, xs[j], handles)
    while running:
        rows = [requests[j].n for j in running]
        x = torch.cat([xs[j] for j in running])
        t = torch.cat([torch.full((requests[j].n,), requests[j].pairs[pos[j]][0], dtype=torch.long)
                       for j in running]).to(dev)
        k = torch.cat([torch.full((requests[j].n,), requests[j].k, dtype=torch.long) for j in running]).to(dev)
        server.timer.add_flops("sample", _per_image_flops(server, x, t, k))
        with server.timer.phase("sample"):
            eps = torch.split(model(x, t, k), rows)
            still = []
            for j, e in zip(running, eps):
                req = requests[j]
                t_now, t_next = req.pairs[pos[j]]
                xs[j] = _step(server, req, xs[j], t_now, t_next, e)
                pos[j] += 1
                if pos[j] < len(req.pairs):
                    still.append(j)
        for j in running:
            if pos[j] == len(requests[j].pairs):  # done this tick: its client gets x_k now
                server.answer(requests[j], xs[j], handles)
        running = still
