"""Per-client evaluation scores the samples as the results file stores them (uint8)."""
from types import SimpleNamespace

import numpy as np
import torch

from collafuse_mpi import config, metrics
from collafuse_mpi.evaluate import client_features, evaluate_client, stored
from collafuse_mpi.training import derive_seed, to_uint8


def _client():
    cfg = config.Config()
    cfg.sample.kid_features = "random-conv"
    g = np.random.default_rng(0)
    heldout = (g.integers(0, 256, (16, 1, 16, 16)).astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    return SimpleNamespace(cfg=cfg, seed_id=3, data=SimpleNamespace(heldout=heldout))


def _samples(seed=1):
    levels = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (16, 1, 16, 16)).astype(np.float32))
    return levels / 127.5 - 1.0


def test_kid_does_not_move_below_one_grey_level():
    """Float noise that leaves every stored pixel the same leaves the KID bit-identical; a
    change of a few grey levels moves it."""
    client, final = _client(), _samples()
    base = evaluate_client(client, final, None)["kid"]["mean"]
    small = final + (torch.rand(final.shape, generator=torch.Generator().manual_seed(2)) - 0.5) * (0.9 / 127.5)
    assert np.array_equal(to_uint8(small), to_uint8(final))
    assert evaluate_client(client, small, None)["kid"]["mean"] == base
    big = (final + 8 / 127.5).clamp(-1, 1)
    assert evaluate_client(client, big, None)["kid"]["mean"] != base


def test_kid_is_recomputable_from_the_stored_images():
    client, final = _client(), _samples()
    out = evaluate_client(client, final, None)["kid"]
    from_file = torch.from_numpy(to_uint8(final)).float() / 127.5 - 1.0
    seed = derive_seed(client.cfg.run.seed, client.seed_id, "metrics") % (2**31)
    again = metrics.kid(torch.from_numpy(client.data.heldout), from_file, features="random-conv",
                        subsets=10, subset_size=16, seed=seed)
    assert again["mean"] == out["mean"] and again["std"] == out["std"]
    f = client_features(client, final)
    assert torch.equal(f["fake"], metrics.extract_features(stored(final), "random-conv"))
