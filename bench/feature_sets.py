"""Do the KID feature sets tell good images from bad? The discrimination table.

    python bench/feature_sets.py          # -> bench/results/feature_sets.{json,md} and feature_sets-samples.npz
    python bench/feature_sets.py --reuse-samples   # the models' samples from that npz (no training)

For each embedded dataset (16x16 gray), the classifier's test split (images its classifier
never saw) is cut in two: a reference half and a known-good half. Every candidate set is scored
by KID against the reference, with every feature set:

  held-out real   the known-good half itself
  noised          known-good + N(0, 0.2^2) per pixel, clamped to [-1, 1]
  blurred         known-good through a 5x5 gaussian, sigma 1 pixel
  half-trained    samples of a diffusion model trained for HALF_STEPS steps (the run's defaults:
                  tiny UNet, T = 100 cosine, batch 32, lr 2e-3, EMA 0.99, DDIM 20 steps) on the
                  classifier's training split; the 500 steps of the recorded sweep (FULL_STEPS) for scale

The margin of a degraded set is (KID_degraded - KID_good) / sqrt(std_degraded^2 + std_good^2),
stds over 50 random half-size subsets. A second table gives the margin along a ladder of
noise and blur levels, to show where each feature set starts to see them. The models' samples
are kept (uint8, npz) so that tests/test_features.py checks the ranking without training a model.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
from collafuse_mpi import features, metrics, schedule
from collafuse_mpi.config import DataConfig
from collafuse_mpi.data import load_images
from collafuse_mpi.model import EMA, UNet

HALF_STEPS, FULL_STEPS, T, SEED = 150, 500, 100, 0
NOISE_SIGMA, BLUR_SIGMA = 0.2, 1.0
NOISE_LADDER, BLUR_LADDER = (0.1, 0.2, 0.4), (0.5, 1.0, 1.5)
SUBSETS = 50


def blur(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k, groups=x.shape[1])


def noised(x: torch.Tensor, sigma: float = NOISE_SIGMA, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def sets_for(dataset: str):
    """(reference, known-good, classifier-train images) at 16x16 gray."""
    x, _ = load_images(DataConfig(dataset=dataset, image_size=16, channels=1))
    tr, te = features.split(len(x))
    te = np.random.default_rng(SEED).permutation(te)
    half = len(te) // 2
    return (torch.from_numpy(x[te[:half]]), torch.from_numpy(x[te[half:2 * half]]),
            torch.from_numpy(x[tr]))


def train_and_sample(train: torch.Tensor, steps: int, n: int) -> torch.Tensor:
    """A purely local model (c = 1) trained for `steps` steps, then n DDIM samples."""
    torch.manual_seed(SEED)
    sched = schedule.Schedule(T, "cosine")
    model = UNet(1, "tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ema = EMA(model, 0.99)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(steps):
        x0 = train[torch.randint(0, len(train), (32,), generator=gen)]
        x_t, t, eps = schedule.client_target(sched, x0, T, gen)
        loss = F.mse_loss(model(x_t, t), eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
    x = torch.randn((n, 1, 16, 16), generator=gen)
    pairs = schedule.side_steps(T, T, "ddim", 20, "client")
    return schedule.run_chain(sched, ema.model, x, 0, pairs, "ddim", gen, clip=True).clamp(-1, 1)


def to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def score(ref, cands: dict, fs: str) -> dict:
    size = len(ref) // 2
    return {name: metrics.kid(ref, c, features=fs, subsets=SUBSETS, subset_size=size, seed=SEED)
            for name, c in cands.items()}


def margins(scores: dict) -> dict:
    good = scores["held-out real"]
    return {name: (s["mean"] - good["mean"]) / max(np.hypot(s["std"], good["std"]), 1e-12)
            for name, s in scores.items() if name != "held-out real"}


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--reuse-samples", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = f"{common.RESULTS}/feature_sets-samples.npz"
    saved = np.load(path) if args.reuse_samples else None
    ladder_rows = []
    record = {"machine": common.machine(), "command": "python bench/feature_sets.py",
              "settings": {"half_steps": HALF_STEPS, "full_steps": FULL_STEPS, "noise_sigma": NOISE_SIGMA,
                           "blur_sigma": BLUR_SIGMA, "subsets": SUBSETS, "image_size": 16},
              "inception": metrics._inception_problem() or "available", "datasets": {}}
    kept, rows = {}, []
    for dataset in features.DOMAIN_DATASETS:
        t0 = time.perf_counter()
        ref, good, train = sets_for(dataset)
        if saved is not None:
            half, full = (torch.from_numpy(saved[f"{dataset}_{k}_trained"]).float() / 127.5 - 1 for k in ("half", "full"))
        else:
            half = train_and_sample(train, HALF_STEPS, len(good))
            full = train_and_sample(train, FULL_STEPS, len(good))
        kept[f"{dataset}_half_trained"] = to_u8(half)
        kept[f"{dataset}_full_trained"] = to_u8(full)
        cands = {"held-out real": good, "noised": noised(good), "blurred": blur(good),
                 f"half-trained ({HALF_STEPS} steps)": half, f"trained ({FULL_STEPS} steps)": full}
        out = {"n_reference": len(ref), "n_candidate": len(good), "feature_sets": {}}
        sets = ["random-conv", features.name_for(dataset)] + (["inception"] if record["inception"] == "available" else [])
        for fs in sets:
            s = score(ref, cands, fs)
            m = margins(s)
            out["feature_sets"][fs] = {"kid": s, "margin": m}
            rows.append([dataset, fs] + [f"{s[c]['mean']:.4f} ± {s[c]['std']:.4f}" + (f" ({m[c]:.1f})" if c in m else "")
                                         for c in cands])
            ladder = {"held-out real": good, **{f"noise {v:g}": noised(good, v) for v in NOISE_LADDER},
                      **{f"blur {v:g}": blur(good, v) for v in BLUR_LADDER}}
            lm = margins(score(ref, ladder, fs))
            out["feature_sets"][fs]["ladder_margin"] = lm
            ladder_rows.append([dataset, fs] + [f"{lm[c]:.1f}" for c in list(ladder)[1:]])
            ladder_header = list(ladder)[1:]
        out["seconds"] = time.perf_counter() - t0
        record["datasets"][dataset] = out
        header = list(cands)
    if saved is None:
        np.savez_compressed(path, **kept)
    md = ["# KID feature sets: held-out real against degraded sets", "",
          "Command: `python bench/feature_sets.py`", "", common.machine_md(record["machine"]), "",
          "KID (mean ± std over 50 half-size subsets) of each candidate set against a reference half "
          "of the classifier's test split; in brackets the margin over held-out real in standard "
          "errors, (KID - KID_real) / sqrt(std^2 + std_real^2). Lower KID is better.", "",
          common.table(["dataset", "feature set"] + header, rows), "",
          "Margin over held-out real (standard errors, as above) along a ladder of pixel noise sigma and "
          "gaussian blur sigma (pixels):", "",
          common.table(["dataset", "feature set"] + ladder_header, ladder_rows), "",
          f"Inception: {record['inception']}.",
          f"{record['datasets']['digits']['n_reference']} (digits) and "
          f"{record['datasets']['shapes']['n_reference']} (shapes) images per side."]
    common.publish("feature_sets", record, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
