"""Domain KID features: the shipped classifiers, their recorded split, and that every offline
feature set ranks held-out real images above noised, blurred and half-trained-model images.

The sets are those of bench/feature_sets.py (which records the full table): a reference half and
a known-good half of each classifier's test split, the known-good half noised (sigma 0.2) and
blurred (gaussian, sigma 1 px), and the samples of a diffusion model trained for 150 steps, kept
in bench/results/feature_sets-samples.npz. A set "ranks above" another when its KID against the
reference is lower by a margin of at least MARGIN standard errors, (KID_bad - KID_good) /
sqrt(std_bad^2 + std_good^2), stds over 50 random half-size subsets (the bench's numbers).
Measured there: the classifier sets separate every degraded set by 2.1 to 8 standard errors;
random-conv does not see pixel noise of sigma 0.2 on digits (0.7), only from sigma 0.4 (5.9),
so it is held to that level.
"""
import hashlib
import os
import sys

import numpy as np
import pytest
import torch

from collafuse_mpi import config, features, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import feature_sets as fsb  # noqa: E402  (the bench's own set construction, not a copy of it)

SAMPLES = os.path.join(REPO, "bench", "results", "feature_sets-samples.npz")
MARGIN = 2.0


@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


@pytest.mark.parametrize("dataset", features.DOMAIN_DATASETS)
def test_shipped_weights_record_and_split(dataset):
    net, record = features.load(dataset)
    assert record["command"] == f"python scripts/train_features.py --dataset {dataset}"
    assert os.path.getsize(features.weights_paths(dataset)[0]) < 200_000  # small enough to ship
    _, te = features.split(record["split"]["n_train"] + record["split"]["n_test"])
    # the recorded test split is the one split() makes: nothing it is evaluated on was trained on
    assert hashlib.sha256(te.astype(np.int64).tobytes()).hexdigest() == record["split"]["test_index_sha256"]
    ref, good, _ = fsb.sets_for(dataset)
    from collafuse_mpi.data import load_images
    from collafuse_mpi.config import DataConfig
    x, labels = load_images(DataConfig(dataset=dataset, image_size=16, channels=1))
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x[te])).argmax(1).numpy() == labels[te]).mean())
    assert acc == pytest.approx(record["test_accuracy"]["channels1"], abs=0.01)  # float16 weights
    assert acc > 0.95
    f = features.DomainFeatures(dataset)(torch.from_numpy(x[te[:50]]))
    assert f.shape == (50, features.DomainFeatures(dataset).num_features)


def test_auto_picks_the_datasets_own_features(no_inception):
    assert metrics.feature_set("auto", "digits") == "digits-classifier"
    assert metrics.feature_set("auto", "shapes") == "shapes-classifier"
    assert metrics.feature_set("auto", "npz") == "random-conv"  # no domain extractor, no Inception
    assert metrics.feature_set("auto") == "random-conv"
    assert set(config.KID_FEATURES) == {"auto", *metrics.FEATURE_SETS}  # the config offers exactly these
    with pytest.raises(config.ConfigError, match="kid_features"):
        cfg = config.Config()
        cfg.sample.kid_features = "vgg"
        config.validate(cfg)


def _kid(ref, cand, fs):
    return metrics.kid(ref, cand, features=fs, subsets=fsb.SUBSETS, subset_size=len(ref) // 2, seed=fsb.SEED)


@pytest.mark.parametrize("dataset", features.DOMAIN_DATASETS)
@pytest.mark.parametrize("kind", ["classifier", "random-conv"])
def test_feature_sets_rank_real_above_degraded(dataset, kind, no_inception):
    fs = features.name_for(dataset) if kind == "classifier" else "random-conv"
    ref, good, _ = fsb.sets_for(dataset)
    half = torch.from_numpy(np.load(SAMPLES)[f"{dataset}_half_trained"]).float() / 127.5 - 1
    base = _kid(ref, good, fs)
    assert abs(base["mean"]) < 3 * base["std"] + 1e-6  # two halves of the same set: KID ~ 0
    sigma = fsb.NOISE_SIGMA if kind == "classifier" else 0.4
    for name, bad in (("noised", fsb.noised(good, sigma)), ("blurred", fsb.blur(good)), ("half-trained", half)):
        k = _kid(ref, bad, fs)
        margin = (k["mean"] - base["mean"]) / np.hypot(k["std"], base["std"])
        assert margin > MARGIN, f"{fs} on {dataset}: {name} only {margin:.2f} standard errors above real"
