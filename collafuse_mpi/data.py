"""Client partitions, held-out splits and the training batch iterator; the datasets themselves
are read in datasets.py.

Every rank calls `client_data` with the same config and gets the same answer: the partition
depends only on the labels and `run.seed`, never on the rank. Labels are read first and pixels
decoded only for the images a client owns, so a large folder (CelebA) is not decoded per rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .config import Config
from .datasets import (  # noqa: F401  (loading is part of this module's API)
    AUX_STREAM, MIN_PER_CLIENT, DataError, _rng, _source, count_images, load_images)

if TYPE_CHECKING:
    import torch

def partition(labels: np.ndarray, n_clients: int, scheme: str, alpha: float,
              seed: int) -> list[np.ndarray]:
    """Disjoint, sorted index arrays (one per client) that together cover every image."""
    labels = np.asarray(labels)
    n = len(labels)
    if n_clients < 1:
        raise DataError(f"need at least 1 client, got {n_clients}")
    if n < MIN_PER_CLIENT * n_clients:
        raise DataError(f"{n} images are too few for {n_clients} clients: each client needs at "
                        f"least {MIN_PER_CLIENT} (one to train on, one held out)")
    if scheme not in ("iid", "dirichlet"):
        raise DataError(f"unknown partition {scheme!r}; choose iid or dirichlet")
    rng = _rng(seed)
    if scheme == "iid" or np.all(labels == -1):
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_clients)]
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha!r}")
    # The usual non-IID recipe (Hsu et al. 2019): each label's images are split across clients
    # in Dirichlet(alpha) proportions; re-drawn while some client is below the minimum.
    for _ in range(100):
        parts = [[] for _ in range(n_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.nonzero(labels == c)[0])
            share = np.cumsum(rng.dirichlet(np.full(n_clients, float(alpha))))[:-1]
            for k, chunk in enumerate(np.split(idx, (share * len(idx)).astype(int))):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_PER_CLIENT:
            break
    else:  # tiny alpha with many clients: top up the short clients from the largest one
        for p in parts:
            while len(p) < MIN_PER_CLIENT:
                big = max(parts, key=len)
                p.append(big.pop(int(rng.integers(len(big)))))
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


@dataclass
class ClientData:
    train: np.ndarray
    train_labels: np.ndarray
    heldout: np.ndarray
    heldout_labels: np.ndarray
    train_index: np.ndarray | None = None    # rows of load_images' output, for logs and checks
    heldout_index: np.ndarray | None = None


def split_aux(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(public, private) sorted indices: floor(fraction * n) images carved out for the attacker
    before any partition, so they are disjoint from every client's data."""
    n_aux = int(float(fraction) * n)
    perm = _rng(seed, AUX_STREAM).permutation(n)
    return np.sort(perm[:n_aux]), np.sort(perm[n_aux:])


def private_count(cfg: Config) -> int:
    """Images left for the clients after the public carve."""
    n = count_images(cfg.data)
    return n - int(float(cfg.privacy.aux_fraction) * n)


def aux_images(cfg: Config) -> np.ndarray:
    """The attacker's public images: privacy.aux_path if set, else the carved share (may be empty)."""
    if cfg.privacy.aux_path:
        import dataclasses
        kind = "folder" if os.path.isdir(cfg.privacy.aux_path) else "npz"
        return load_images(dataclasses.replace(cfg.data, dataset=kind, path=cfg.privacy.aux_path, max_images=0))[0]
    labels, fetch = _source(cfg.data)
    aux, _ = split_aux(len(labels), cfg.privacy.aux_fraction, cfg.run.seed)
    return fetch(aux) if len(aux) else np.zeros((0, cfg.data.channels, cfg.data.image_size,
                                                  cfg.data.image_size), np.float32)


def client_data(cfg: Config, client: int, n_clients: int) -> ClientData:
    """Client `client`'s (0-based; client 0 is MPI rank 1) training and held-out images."""
    if not 0 <= client < n_clients:
        raise DataError(f"client {client} out of range for {n_clients} clients")
    labels, fetch = _source(cfg.data)
    _, private = split_aux(len(labels), cfg.privacy.aux_fraction, cfg.run.seed)
    own = private[partition(labels[private], n_clients, cfg.data.partition, cfg.data.alpha, cfg.run.seed)[client]]
    m = len(own)
    n_held = min(max(int(round(cfg.data.holdout * m)), 1), m - 1)  # at least 1 on each side
    perm = _rng(cfg.run.seed, client, 7).permutation(m)  # 7: a stream apart from the partition's
    held, train = np.sort(own[perm[:n_held]]), np.sort(own[perm[n_held:]])
    images = fetch(np.concatenate([train, held]))
    return ClientData(train=images[:len(train)], train_labels=labels[train],
                      heldout=images[len(train):], heldout_labels=labels[held],
                      train_index=train, heldout_index=held)


class Batches:
    """Endless training batches of min(batch_size, n) images, shuffled epoch by epoch: every
    image once per epoch. A batch that straddles two epochs takes the old epoch's leftovers and
    tops up from the new order with images not already in it, so no batch repeats an image."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int):
        import torch  # here, not at the top: loading and counting data must not need torch
        if len(images) == 0:
            raise DataError("no training images for the batch iterator")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self.n, self.batch_size = len(images), min(batch_size, len(images))
        self.gen = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
        self.order, self.pos = torch.empty(0, dtype=torch.long), 0

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])

    def __next__(self) -> torch.Tensor:
        import torch
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        if len(idx) < self.batch_size:  # epoch ends: new order, the leftovers moved to its end
            order = torch.randperm(self.n, generator=self.gen)
            dup = torch.isin(order, idx)
            self.order = torch.cat([order[~dup], order[dup]])
            self.pos = self.batch_size - len(idx)
            idx = torch.cat([idx, self.order[:self.pos]])
        self.last_index = idx  # which training images this batch holds (for the privacy scoring)
        return self.data[idx]
