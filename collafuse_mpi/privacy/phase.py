"""The attack suite as a phase of the run: its own window, after sampling, never in training.

Rank 0 runs the attacks on what it holds and hands each client rank the packages of the logical
clients it hosts in one scatter (the only way anything of the suite travels: server to client);
each client scores its package against its own images. Scores reach rank 0 with the rest of the client's results.
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
    from ..clients import ids_of_rank
    per_rank = cfg.run.clients_per_rank
    tp.scatter_obj([None] + [{i: packages[i] for i in ids_of_rank(r, per_rank) if i in packages}
                             for r in range(1, tp.size)])
    cost["n_aux"] = int(len(aux))
    return cost


def client_side(cfg, tp, clients: list, finals: dict, names: tuple) -> dict:
    """A client rank: receive the packages rank 0 made from its logical clients' messages, score
    each against that client's images. {logical id: scores} for the clients that sent."""
    from .score import score
    # rank 0 trains and runs its attacks meanwhile: its deadline is the attack phase's own
    packages = tp.scatter_obj(None, timeout=cfg.run.recv_timeout + cfg.privacy.max_seconds)
    return {c.index: score(c, packages[c.index], finals[c.index], names,
                           derive_seed(cfg.run.seed, c.seed_id, "privacy") % (2**31))
            for c in clients if c.index in packages}
