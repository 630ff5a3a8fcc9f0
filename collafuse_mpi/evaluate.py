"""Per-client evaluation after sampling: image quality and what the server could learn."""
from __future__ import annotations

import torch

from . import metrics
from .training import derive_seed, global_rng_lock, to_uint8


def evaluate_client(client, final: torch.Tensor, server_view) -> dict:
    """KID of the samples against this client's held-out images, and the paper's sampling
    disclosure measure. What the server learns in training is the attack suite's (privacy/)."""
    out = {}
    real = torch.from_numpy(client.data.heldout)
    fake = final.detach().cpu().float()
    size = min(len(real), len(fake))
    if size >= 2:
        seed = derive_seed(client.cfg.run.seed, client.seed_id, "metrics") % (2**31)
        with global_rng_lock:  # the Inception KID seeds torch's global generator; loopback roles share it
            out["kid"] = metrics.kid(real, stored(final), features=kid_features(client.cfg), subsets=10,
                                     subset_size=size, seed=seed)
    if server_view is not None:
        abar_k = client.sched.abar[client.k].sqrt().item()
        # compare like with like: the server's view rescaled to image range vs the final sample
        out["sampling_disclosure"] = metrics.sampling_disclosure(
            (server_view.cpu().float() / abar_k).clamp(-1, 1), fake)
    return out


def client_features(client, final: torch.Tensor) -> dict:
    """Feature vectors (never images) of the held-out set and the samples, for the pooled KID."""
    real = torch.from_numpy(client.data.heldout)
    fs = kid_features(client.cfg)
    return {"real": metrics.extract_features(real, fs), "fake": metrics.extract_features(stored(final), fs),
            "feature_set": fs}


def stored(final: torch.Tensor) -> torch.Tensor:
    """The samples as the results file holds them (uint8): KID scores those images, so it can be
    recomputed from the file and does not move with float noise below one grey level."""
    return torch.from_numpy(to_uint8(final)).float() / 127.5 - 1.0


def kid_features(cfg) -> str:
    """The resolved KID feature set of a run (the config's choice, 'auto' made concrete)."""
    return metrics.feature_set(cfg.sample.kid_features, cfg.data.dataset)


def pooled_kid(feature_sets: list[dict], seed: int) -> dict:
    """KID of all clients' samples against all clients' held-out images, on rank 0."""
    if not feature_sets:
        return {}
    real = torch.cat([f["real"] for f in feature_sets])
    fake = torch.cat([f["fake"] for f in feature_sets])
    size = min(len(real), len(fake))
    if size < 2:
        return {}
    out = metrics.kid_from_features(real, fake, subsets=10, subset_size=size, seed=seed)
    out["features"] = feature_sets[0]["feature_set"]
    return out
