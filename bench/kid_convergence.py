"""How many generated images does KID need? The convergence curve behind sample.samples_per_client.

    python bench/kid_convergence.py      # -> bench/results/kid_convergence.{json,md}

A purely local model is trained as in bench/feature_sets.py (500 steps, the recorded sweep's
length; and 150 steps, a half-trained one), and draws 1024 samples. KID is computed against a
fixed real set of 180 images (the size of one client's held-out split of digits over 2 clients)
for n generated images, n = 16 .. 1024, on 20 independent draws of n from the 1024 (without
replacement, so draws overlap at large n: the spread there is a lower bound). Reported per n:
mean and standard deviation over the draws, and the std relative to the gap between the two
models (how well n tells them apart) and to the trained model's own KID.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

import common
import feature_sets as fsb
from collafuse_mpi import metrics

NS = (16, 32, 64, 128, 256, 512, 1024)
DRAWS, N_REAL = 20, 180


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with KID's kernel (x.y/d + 1)^3 for sets of unequal size (all of both)."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def curve(real_f: torch.Tensor, fake_f: torch.Tensor) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for n in NS:
        vals = [mmd2(real_f, fake_f[torch.from_numpy(rng.choice(len(fake_f), n, replace=False))])
                for _ in range(DRAWS)]
        out[n] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
    return out


def main() -> int:
    torch.set_num_threads(1)
    ref, good, train = fsb.sets_for("digits")
    real = torch.cat([ref, good])[:N_REAL]
    models = {"trained (500 steps)": fsb.train_and_sample(train, 500, max(NS)),
              "half-trained (150 steps)": fsb.train_and_sample(train, fsb.HALF_STEPS, max(NS))}
    record = {"machine": common.machine(), "command": "python bench/kid_convergence.py",
              "n_real": N_REAL, "draws": DRAWS, "curves": {}}
    rows = []
    for fs in ("digits-classifier", "random-conv"):
        real_f = metrics.extract_features(real, fs)
        curves = {name: curve(real_f, metrics.extract_features(x, fs)) for name, x in models.items()}
        record["curves"][fs] = curves
        t, h = curves["trained (500 steps)"], curves["half-trained (150 steps)"]
        for n in NS:
            gap = h[n]["mean"] - t[n]["mean"]
            rows.append([fs, n, f"{t[n]['mean']:.4g} ± {t[n]['std']:.2g}", f"{h[n]['mean']:.4g} ± {h[n]['std']:.2g}",
                         f"{t[n]['std'] / abs(gap):.3f}" if gap else "-",
                         f"{t[n]['std'] / abs(t[n]['mean']):.2f}" if t[n]["mean"] else "-"])
    md = ["# KID against the number of generated images", "", "Command: `python bench/kid_convergence.py`", "",
          common.machine_md(record["machine"]), "",
          f"Digits 16x16; real set: {N_REAL} held-out images (one client's share over 2 clients); "
          f"mean ± std over {DRAWS} draws of n generated images out of 1024.", "",
          common.table(["feature set", "n generated", "KID trained (500 steps)", "KID half-trained (150 steps)",
                        "std / gap", "std / KID (trained)"], rows)]
    common.publish("kid_convergence", record, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
