"""Train the domain feature extractor of an embedded dataset (the weights the package ships).

    python scripts/train_features.py --dataset digits     # -> collafuse_mpi/weights/digits-classifier.{pt,json}
    python scripts/train_features.py --dataset shapes

Reproducible on a CPU: fixed seeds, one torch thread, the fixed split of features.split()
(80% train, 20% test, by a seeded permutation of the images in load_images order). Images are
rendered at 16x16; shapes are rendered in gray and in colour (the same images), so the one
extractor serves both channel settings. A few seconds of CPU each.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from collafuse_mpi import features
from collafuse_mpi.config import DataConfig
from collafuse_mpi.data import load_images

EPOCHS, BATCH, LR, SEED = 30, 64, 3e-3, 0


def dataset_images(dataset: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """All images of the dataset as the classifier sees them, their labels, and the channel
    renderings used (shapes: gray and colour)."""
    channels = [1] if dataset == "digits" else [1, 3]
    imgs, labels = [], None
    for c in channels:
        x, labels = load_images(DataConfig(dataset=dataset, image_size=features.INPUT_SIZE, channels=c))
        imgs.append(np.repeat(x, 3, axis=1) if c == 1 else x)
    return np.stack(imgs), labels, channels  # [renderings, N, 3, H, W]


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (background -1 fills in): a little robustness to position."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    x = F.pad(x, (1, 1, 1, 1), value=-1.0)
    h, w = x.shape[-2] - 2, x.shape[-1] - 2
    return x[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def train(dataset: str) -> tuple[features.SmallClassifier, dict]:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    imgs, labels, channels = dataset_images(dataset)
    tr, te = features.split(len(labels))
    classes = int(labels.max()) + 1
    net = features.SmallClassifier(classes)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    x_tr = torch.from_numpy(imgs[:, tr].reshape(-1, *imgs.shape[2:]))
    y_tr = torch.from_numpy(np.tile(labels[tr], len(channels)))
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        net.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            loss = F.cross_entropy(net(_shift(x_tr[idx], gen)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        emb = torch.cat([net.embedding(x_tr[i:i + 512]) for i in range(0, len(x_tr), 512)]).double()
        net.feat_mean.copy_(emb.mean(0))
        net.feat_std.copy_(emb.std(0) + 1e-3)  # + 1e-3: never divide by a dead unit's zero spread
        acc = {}
        for c, rendering in zip(channels, imgs):
            pred = net(torch.from_numpy(rendering[te])).argmax(1).numpy()
            acc[f"channels{c}"] = float((pred == labels[te]).mean())
    record = {
        "dataset": dataset, "feature_set": features.name_for(dataset), "classes": classes,
        "command": f"python scripts/train_features.py --dataset {dataset}",
        "split": {"seed": features.SPLIT_SEED, "test_fraction": features.TEST_FRACTION,
                  "n_train": int(len(tr)), "n_test": int(len(te)),
                  "rule": "numpy default_rng(seed).permutation(N); first round(0.2 N) are test",
                  "test_index_sha256": hashlib.sha256(te.astype(np.int64).tobytes()).hexdigest()},
        "renderings": [f"{features.INPUT_SIZE}x{features.INPUT_SIZE}, channels={c}" for c in channels],
        "training": {"epochs": EPOCHS, "batch": BATCH, "lr": LR, "seed": SEED, "optimizer": "Adam, cosine lr",
                     "augmentation": "random shift of up to 1 pixel", "seconds": round(time.perf_counter() - t0, 1)},
        "test_accuracy": acc, "num_features": int(net.feat_mean.numel()),
        "features": "penultimate 64 + conv2 on a 4x4 grid + conv3 on a 2x2 grid, standardised "
                    "by the training split's mean and std",
        "made_with": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return net, record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=features.DOMAIN_DATASETS)
    args = ap.parse_args(argv)
    net, record = train(args.dataset)
    pt, js = features.save(net, record, args.dataset)
    print(f"{record['feature_set']}: test accuracy {record['test_accuracy']}, "
          f"{record['training']['seconds']} s; wrote {pt} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
