"""The attack suite as a phase of the run: its own window, after sampling, never in training.

Rank 0 runs the attacks on what it holds and hands each client rank its package in one scatter
(the only way anything of the suite travels: server to client); each client scores its package
against its own images. Scores reach rank 0 with the rest of the client's results.
"""
from __future__ import annotations

import torch

from .. import config as cfgmod
from ..training import derive_seed


def active(cfg, ks) -> tuple:
    """The attacks this run performs: none when no client sends anything to the server."""
    names = cfgmod.attack_set(cfg)
    return names if any(k < cfg.diffusion.timesteps for k in ks) else ()


def server_side(cfg, tp, server, names: tuple) -> dict:
    """Rank 0: attack, hand out the packages; returns the run-wide cost table."""
    from ..data import aux_images
    from .attack import server_attacks
    aux = torch.from_numpy(aux_images(cfg)) if {"public_linear", "learned"} & set(names) else torch.zeros(0)
    packages, cost = server_attacks(cfg, server.sched, server.views, server.sample_views, names, aux)
    if "membership" in names and server.learner is not None:  # the released model
        state = {k: v.detach().cpu() for k, v in server.learner.ema.model.state_dict().items()}
        for pkg in packages.values():
            pkg["server_model"] = state
    tp.scatter_obj([None] + [packages.get(i) for i in range(tp.size - 1)])
    cost["n_aux"] = int(len(aux))
    return cost


def client_side(cfg, tp, client, final, names: tuple) -> dict | None:
    """A client: receive the package rank 0 made from this client's messages, score it."""
    from .score import score
    # rank 0 trains and runs its attacks meanwhile: its deadline is the attack phase's own
    pkg = tp.scatter_obj(None, timeout=cfg.run.recv_timeout + cfg.privacy.max_seconds)
    if pkg is None:
        return None
    return score(client, pkg, final, names, derive_seed(cfg.run.seed, client.rank, "privacy") % (2**31))
