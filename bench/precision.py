"""Server training step with bf16 autocast and/or channels_last against plain float32.

    python bench/precision.py            # ~2 min; writes bench/results/precision.{json,md}
    python bench/precision.py --iters 3  # smoke test
    python bench/precision.py --device cuda --name gpu-precision    # on a GPU (bench/gpu.sh)

Single process, no MPI, the config's torch threads (1). The package's server UNet and Learner
(train.autocast, train.channels_last) step on a fused batch of 2 clients' messages, built as
clients build them (bench/fused_server.py). The four variants run round robin, the order
rotating each iteration; reported: median step time and its ratio to float32. On a GPU this is
the comparison the config options exist for; on a CPU without bf16 matrix units bf16 is
expected to cost, not save.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import common
import fused_server

from collafuse_mpi.config import Config  # noqa: E402
from fused_server import NullTimer, client_batches, fused, make_learner, sync  # noqa: E402

VARIANTS = {"float32": {}, "bf16": {"autocast": "bf16"}, "channels_last": {"channels_last": True},
            "bf16+channels_last": {"autocast": "bf16", "channels_last": True}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--preset", default=None, help="model preset (default: the config's)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="images per client batch")
    ap.add_argument("--name", default="precision", help="results file name in bench/results")
    args = ap.parse_args(argv)
    cfg = Config()
    cfg.model.preset = args.preset or cfg.model.preset
    cfg.data.image_size = args.image_size or cfg.data.image_size
    cfg.train.batch_size = args.batch_size or cfg.train.batch_size
    torch.set_num_threads(cfg.run.torch_threads)
    fused_server.DEVICE = device = torch.device(args.device)
    batches = client_batches(cfg, args.clients)
    learners = {name: make_learner(cfg, 0, **options) for name, options in VARIANTS.items()}
    names = list(VARIANTS)
    samples = {n: [] for n in names}
    for i in range(args.warmup + args.iters):
        j = i % len(names)
        for name in names[j:] + names[:j]:
            sync()
            t0 = time.perf_counter()
            fused(learners[name], batches, NullTimer)
            sync()
            if i >= args.warmup:
                samples[name].append(time.perf_counter() - t0)
    base = float(np.median(samples["float32"]))
    rows = [[n, f"{np.median(v) * 1e3:.1f}", f"{np.percentile(v, 90) * 1e3:.1f}",
             f"**{np.median(v) / base:.3f}**"] for n, v in samples.items()]
    record = {"benchmark": "precision", "command": common.command(), "machine": common.machine(),
              "clients": args.clients, "batch_per_client": cfg.train.batch_size, "preset": cfg.model.preset,
              "image_size": cfg.data.image_size, "device": str(device), "samples_s": samples,
              "ratio_to_float32": {n: float(np.median(v)) / base for n, v in samples.items()}}
    md = ["# precision: server step with bf16 autocast / channels_last, against float32\n",
          f"Command: `{record['command']}`\n", common.machine_md(record["machine"]), "",
          f"Fused server step on {args.clients} x {cfg.train.batch_size} images "
          f"({cfg.data.image_size}x{cfg.data.image_size}, preset {cfg.model.preset}) on {device}, "
          f"{args.iters} iterations per variant, round robin.\n",
          common.table(["variant", "step P50 (ms)", "step P90 (ms)", "P50 / float32"], rows), "",
          "This is a CPU measurement: it says nothing about a GPU, where the options are meant to help. "
          "Both stay off by default until a GPU run shows they do." if device.type == "cpu" else
          "Measured on a GPU, each step bracketed by torch.cuda.synchronize(); a ratio below 1 is a gain."]
    common.publish(args.name, record, md)


if __name__ == "__main__":
    main()
