"""Domain feature extractors: a small classifier per embedded dataset, for KID/FID-style features.

Inception features mean little on 16x16 digits, and the fixed random convolutions of
`metrics.RandomConvFeatures` were never trained to tell a digit from a blob. For each embedded
dataset (digits, shapes) the package ships a small CNN classifier trained on that dataset's own
training split by `scripts/train_features.py`; its penultimate activations (64 values, after
ReLU) are the features, as Inception's pool layer is for FID. The weights (float16, ~80 KB)
and a JSON record (command, seed, split, accuracy) live in `collafuse_mpi/weights/`.

Feature-set names: "<dataset>-classifier" (e.g. "digits-classifier").
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DOMAIN_DATASETS = ("digits", "shapes")
INPUT_SIZE = 16             # images are resized to 16x16 before the network
SPLIT_SEED = 0xFEA7         # the classifier's train/test split of the dataset (see split())
TEST_FRACTION = 0.2
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def name_for(dataset: str) -> str:
    return f"{dataset}-classifier"


def dataset_of(feature_set: str) -> str | None:
    """'digits-classifier' -> 'digits'; None for a name that is not a domain feature set."""
    if feature_set.endswith("-classifier") and feature_set[:-len("-classifier")] in DOMAIN_DATASETS:
        return feature_set[:-len("-classifier")]
    return None


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into the dataset's images in load_images order: a fixed-seed
    permutation, the first 20% (rounded) are the classifier's test split."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


class SmallClassifier(nn.Module):
    """3 conv layers (16, 32, 64 channels; strides 1, 2, 2) + ReLU, 2x2 average-pool grid,
    a 64-wide feature layer, a linear classifier. Input: [N, 1 or 3, H, W] in [-1, 1]
    (gray is repeated to 3 channels), resized to 16x16."""

    def __init__(self, classes: int, width: int = 64):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 2, 1),
                                    nn.Conv2d(32, 64, 3, 2, 1)])
        self.feature = nn.Linear(64 * 4, width)
        self.head = nn.Linear(width, classes)
        n = width + 32 * 16 + 64 * 4
        # set after training from the training split (train_features.py); saved with the weights
        self.register_buffer("feat_mean", torch.zeros(n))
        self.register_buffer("feat_std", torch.ones(n))

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float().clamp(-1, 1)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected [N, 1 or 3, H, W] images, got {tuple(x.shape)}")
        x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def layers(self, x: Tensor) -> list[Tensor]:
        h = self.prepare(x).to(self.feature.weight.device)
        out = []
        for conv in self.convs:
            h = F.relu(conv(h))
            out.append(h)
        out.append(F.relu(self.feature(F.adaptive_avg_pool2d(h, 2).flatten(1))))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(x)[-1])

    def embedding(self, x: Tensor) -> Tensor:
        """Raw KID features: [penultimate (64), conv2 on a 4x4 grid (512), conv3 on 2x2 (256)]."""
        _, c2, c3, fc = self.layers(x)
        return torch.cat([fc, F.adaptive_avg_pool2d(c2, 4).flatten(1),
                          F.adaptive_avg_pool2d(c3, 2).flatten(1)], 1)


class DomainFeatures(nn.Module):
    """The feature half of a shipped classifier, as a frozen extractor (forward -> [N, 64])."""

    def __init__(self, dataset: str):
        super().__init__()
        self.net, self.record = load(dataset)
        self.register_buffer("mean", self.net.feat_mean.clone())
        self.register_buffer("std", self.net.feat_std.clone())
        self.num_features = int(self.mean.numel())
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return (self.net.embedding(x) - self.mean) / self.std


def weights_paths(dataset: str) -> tuple[str, str]:
    return (os.path.join(WEIGHTS_DIR, f"{dataset}-classifier.pt"),
            os.path.join(WEIGHTS_DIR, f"{dataset}-classifier.json"))


def available(dataset: str) -> bool:
    return dataset in DOMAIN_DATASETS and all(os.path.isfile(p) for p in weights_paths(dataset))


def load(dataset: str) -> tuple[SmallClassifier, dict]:
    """The shipped classifier (float32 on CPU) and its training record."""
    if dataset not in DOMAIN_DATASETS:
        raise ValueError(f"no domain feature extractor for dataset {dataset!r}; have {DOMAIN_DATASETS}")
    pt, js = weights_paths(dataset)
    if not available(dataset):
        raise RuntimeError(f"weights for {name_for(dataset)} missing at {pt} "
                           f"(make them: python scripts/train_features.py --dataset {dataset})")
    with open(js) as fh:
        record = json.load(fh)
    state = torch.load(pt, map_location="cpu", weights_only=True)
    net = SmallClassifier(record["classes"])
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval(), record


def save(net: SmallClassifier, record: dict, dataset: str) -> tuple[str, str]:
    """float16 weights (half the size; features change by < 1e-3 relative) and the JSON record."""
    os.makedirs(WEIGHTS_DIR, exist_ok=True)
    pt, js = weights_paths(dataset)
    torch.save({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, pt)
    with open(js, "w") as fh:
        json.dump(record, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return pt, js
