"""Time per training step of the paper-scale configs (configs/*.toml) on this machine.

    python bench/paper_scale.py [--steps 4]     # -> bench/results/paper_scale.{json,md}

The real data is not here, so each config runs on stand-in images of its shape (64x64 gray in
an .npz for paper-mri, 64x64 RGB JPGs in a folder for celeba64): the step time depends on the
shapes, not the pixels. 1 server + 2 clients through mpirun, `--steps` steps (the first one is
warm-up and left out), sampling cut to 2 images and 2 DDIM steps (it is not what is timed).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

import common
from collafuse_mpi import results

CONFIGS = ("paper-mri", "celeba64")


def stand_in(kind: str, where: str) -> str:
    rng = np.random.default_rng(0)
    if kind == "paper-mri":
        path = os.path.join(where, "mri.npz")
        np.savez(path, train_images=rng.integers(0, 256, (120, 64, 64), dtype=np.uint8),
                 train_labels=rng.integers(0, 4, (120, 1)))
        return path
    folder = os.path.join(where, "faces")
    os.makedirs(folder)
    for i in range(120):
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    record = {"machine": common.machine(), "command": "python bench/paper_scale.py", "configs": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            out = os.path.join(tmp, f"{name}.h5")
            cmd = common.mpirun(3) + [sys.executable, "-m", "collafuse_mpi.run", "--config",
                                      os.path.join(common.REPO, "configs", f"{name}.toml"),
                                      "--data-path", stand_in(name, tmp), "--steps", str(args.steps),
                                      "--set", "train.warmup_steps=1", "--samples-per-client", "2",
                                      "--sample-steps", "2", "--set", "run.save_models=false",
                                      "--set", "run.checkpoint_every=0", "--set", "run.pooled_kid=false",
                                      "-o", out, "--quiet"]
            subprocess.run(cmd, check=True, env=common.mpi_env(), cwd=common.REPO)
            run = next(iter(results.read(out)["runs"].values()))
            per = {}
            for r, g in sorted(run["ranks"].items()):
                keep = ~np.asarray(g["warmup"], dtype=bool)
                wall = (np.asarray(g["step_end"]) - np.asarray(g["step_start"]))[keep]
                flops = np.asarray(g["phase_flops"])[keep].sum(1)
                per[r] = {"role": g["role"], "median_step_s": float(np.median(wall)), "steps": wall.tolist(),
                          "flops_per_step": float(np.median(flops))}
                rows.append([name, r, g["role"], f"{np.median(wall):.2f}", f"{np.median(flops) / 1e9:.0f}",
                             f"{np.median(flops) / np.median(wall) / 1e9:.1f}"])
            record["configs"][name] = {"ranks": per, "config": run["config"]}
    md = ["# Paper-scale configs: time per training step here", "", "Command: `python bench/paper_scale.py`", "",
          common.machine_md(record["machine"]), "",
          f"1 server + 2 clients (3 ranks on 2 cores), {args.steps} steps, the first left out; batch 32 per "
          "client, base UNet, 64x64, T = 1000, stand-in images of the config's shape.", "",
          common.table(["config", "rank", "role", "median s/step", "GFLOP/step", "GFLOP/s"], rows)]
    common.publish("paper_scale", record, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
