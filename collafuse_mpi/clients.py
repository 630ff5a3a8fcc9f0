"""Many logical clients on one rank, and the cohort of each step.

A client rank hosts `run.clients_per_rank` = M logical clients: rank r holds the ids
(r - 1) * M .. r * M - 1. Each is a full `Client` (its own data partition, model, optimiser, EMA,
random streams and cut) with seeds from its logical id, so its numbers do not depend on the rank it
lives on. Per step every client of the step's cohort sends its own TRAIN message, in logical-id
order; the server receives them in that order from each client's rank (MPI keeps the order of
messages from one source with one tag), so the fused batch is the same as with one client per rank.

The cohort (`train.clients_per_step`) is drawn from the run seed and the step alone: every rank
draws the same one and nothing is communicated.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import comm
from .stopping import Stopped
from .training import after_step, fault_point

COHORT_STREAM = 0xC0407  # apart from every derive_seed stream


def ids_of_rank(rank: int, per_rank: int) -> list[int]:
    """Logical client ids hosted by client rank `rank` (>= 1)."""
    return list(range((rank - 1) * per_rank, rank * per_rank))


def rank_of(client: int, per_rank: int) -> int:
    """The rank hosting logical client `client`."""
    return client // per_rank + 1


def cohort(seed: int, step: int, n_clients: int, per_step: int) -> list[int]:
    """The sorted logical ids that take part in `step`: `per_step` of `n_clients` drawn without
    replacement from (seed, step); all of them when per_step is 0 or covers every client."""
    if per_step <= 0 or per_step >= n_clients:
        return list(range(n_clients))
    rng = np.random.default_rng(np.random.SeedSequence([seed, COHORT_STREAM, step]))
    return sorted(int(i) for i in rng.choice(n_clients, per_step, replace=False))


class ClientHost:
    """The logical clients of one rank, stepped together: one timer row per step for the rank,
    each client's loss beside it."""

    def __init__(self, cfg, tp, clients: list, timer, n_clients: int):
        self.cfg, self.tp, self.clients, self.timer, self.n_clients = cfg, tp, clients, timer, n_clients
        self.start_step = 0
        self.stop = None  # a stopping.StopVote, set by the caller
        self.stack = None  # batched.StackedLearners while training batched

    def state_dict(self) -> dict:
        if self.stack is not None:  # the stack holds the newest state: the learners get it first
            self.stack.write_back()
        if len(self.clients) == 1:  # the layout of a one-client rank's checkpoint
            return self.clients[0].state_dict()
        return {"logical": {c.index: c.state_dict() for c in self.clients}}

    def load_state_dict(self, state: dict, step: int) -> None:
        per_client = state["logical"] if "logical" in state else {self.clients[0].index: state}
        for c in self.clients:
            c.load_state_dict(per_client[c.index])
        self.start_step = step

    def train(self, on_step=None):
        learners = [c.learner for c in self.clients if c.learner is not None]
        if self.cfg.train.batched_clients and len(learners) > 1:
            from .batched import StackedLearners
            self.stack = StackedLearners(learners)
            self.rows = {c.index: j for j, c in enumerate(c for c in self.clients if c.learner is not None)}
        try:
            self._train(on_step)
        except Stopped:  # the server has taken every batch up to the edge where all stopped
            self._drain()
            raise
        finally:
            if self.stack is not None:
                self.stack.write_back()
                self.stack = None
        self._drain()

    def _drain(self):
        for c in self.clients:
            c.drain()

    def _train(self, on_step):
        cfg, timer = self.cfg, self.timer
        for step in range(self.start_step, cfg.train.steps):
            timer.start_step(step, step < cfg.train.warmup_steps)
            fault_point(self.tp.rank, step)
            chosen = set(cohort(cfg.run.seed, step, self.n_clients, cfg.train.clients_per_step))
            members = [c for c in self.clients if c.index in chosen]  # in logical-id order, as the server reads
            done = self._batched_step(step, members) if self.stack is not None else \
                {c.index: c.train_step(step) for c in members}
            losses = [done[c.index][0] if c.index in done else math.nan for c in self.clients]
            images = sum(n for _, n in done.values())
            trained = [v for v in losses if not math.isnan(v)]
            loss_value = sum(trained) / len(trained) if trained else math.nan
            timer.end_step(loss_value, images, losses if len(self.clients) > 1 else None)
            # before on_step: a preempted rank must not enter the collective flush its peers left
            after_step(cfg, self.tp.rank, step, timer, self.state_dict, self.stop)
            if on_step:
                on_step(step, loss_value)

    def _batched_step(self, step: int, members: list) -> dict:
        """The members' models in one batched update; every random draw and message is each
        client's own, in the order the loop makes them."""
        begun = [(c, *c.begin_step(step)) for c in members]
        trained = [(c, target) for c, _, target in begun if target is not None]
        losses = {}
        if trained:
            values = self.stack.step(self.timer, [self.rows[c.index] for c, _ in trained], [t for _, t in trained])
            losses = {c.index: v for (c, _), v in zip(trained, values)}
        nan = torch.tensor(float("nan"))
        return {c.index: c.end_step(step, x0, losses.get(c.index, nan)) for c, x0, _ in begun}

    def sample(self) -> dict:
        """Every client's (final samples, server view): all requests go out first (the server may
        answer them in one batched chain), and each client finishes its chain as soon as its x_k
        arrives, in whatever order the server's chains end."""
        out, waiting = {}, {}
        for c in self.clients:
            if c.request_sample():
                waiting[c.index] = c
            else:
                out[c.index] = c.finish_sample(None)
        while waiting:
            with self.timer.phase("wait"):
                self.tp.probe(0, comm.CUT)
            with self.timer.phase("recv"):
                info, x_k = self.tp.recv(0, comm.CUT, self.clients[0].device)
            c = waiting.pop(info["client"])
            out[c.index] = c.finish_sample(x_k)
        return out


def client_role(cfg, tp, ks, device, timer, mine, flush, resume_step, stop):
    """A client rank's whole run: its logical clients' data, training, sampling, metrics, privacy
    scores; what it measured goes into `mine` (per logical client under mine["clients"])."""
    from . import checkpoint
    from .client import Client
    from .data import client_data
    from .evaluate import client_features, evaluate_client
    from .privacy import phase
    n_clients, per_rank = len(ks), cfg.run.clients_per_rank
    ids = ids_of_rank(tp.rank, per_rank)
    clients = []
    with timer.window("data_load"):
        for i in ids:
            clients.append(Client(cfg, tp, i, ks[i], device, timer, client_data(cfg, i, n_clients)))
    host = ClientHost(cfg, tp, clients, timer, n_clients)
    host.stop = stop
    if resume_step:
        host.load_state_dict(checkpoint.load(cfg, tp.rank, resume_step), resume_step)
    with timer.window("train"):
        host.train(on_step=flush)
    with timer.window("sample"):
        sampled = host.sample()
    per = {}
    with timer.window("metrics"), timer.loose("metrics"):
        for c in clients:
            final, view = sampled[c.index]
            per[c.index] = {"metrics": evaluate_client(c, final, view), "k": c.k,
                            "n_train": len(c.data.train), "n_heldout": len(c.data.heldout)}
            if cfg.run.pooled_kid:
                per[c.index]["features"] = client_features(c, final)
    names = phase.active(cfg, ks)
    if names:
        with timer.window("privacy"):
            scores = phase.client_side(cfg, tp, clients, {i: f for i, (f, _) in sampled.items()}, names)
        for i, result in scores.items():
            per[i]["metrics"]["privacy"] = result
    for c in clients:
        final, view = sampled[c.index]
        per[c.index]["samples"] = c.sample_arrays(final, view)
        per[c.index]["bytes"] = dict(c.bytes)
    mine["clients"] = per
    mine["n_train"] = sum(p["n_train"] for p in per.values())
    mine["n_heldout"] = sum(p["n_heldout"] for p in per.values())
    return sampled, clients
