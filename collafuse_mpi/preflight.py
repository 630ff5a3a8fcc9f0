"""Memory a run will need, estimated on rank 0 before any rank trains, so that an image size or
batch that cannot fit is refused with the estimate instead of failing later (an empty
MemoryError, or the OOM killer).

The estimate is measured, not guessed: one forward pass of the real model at two small image
sizes counts the bytes autograd keeps for the backward pass. They are a + b * pixels (weights
kept for backward, plus activations that grow with the image), so the training step at the real
size and batch needs about b * pixels * batch, plus the model's weights, gradients, AdamW's two
moments and the EMA copy (5x the weights), plus the rank's images.
"""
from __future__ import annotations

import torch

from .config import MODEL_PRESETS

GiB = 2**30
HEADROOM = 1.5  # forward temporaries and allocator slack beyond what autograd keeps


def _saved_bytes(model, channels: int, size: int, cut_conditioned: bool) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    x = torch.zeros(1, channels, size, size)
    t = torch.ones(1, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, t if cut_conditioned else None).square().mean()
    return total[0]


def rank_bytes(cfg, batch: int, n_images: int, server: bool) -> int:
    """Bytes one rank needs to train `batch` images a step while holding `n_images` images."""
    from .model import UNet
    c, s = cfg.data.channels, cfg.data.image_size
    model = UNet(c, cfg.model.preset, server, 0.0)
    s0 = 2 ** (len(MODEL_PRESETS[cfg.model.preset][1]) - 1) * 4
    m1, m2 = (_saved_bytes(model, c, k, server) for k in (s0, 2 * s0))
    per_pixel = max(m2 - m1, 0) / (3 * s0 * s0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = per_pixel * s * s * batch * HEADROOM
    return int(activations + 5 * weights + n_images * c * s * s * 4)


def available_bytes(device: str, ranks_here: int) -> tuple[int, str]:
    """(bytes, where) one rank of `ranks_here` on this node may use."""
    if device != "cpu" and torch.cuda.is_available():
        n_gpu = torch.cuda.device_count()
        per_gpu = -(-ranks_here // n_gpu)
        total = torch.cuda.get_device_properties(0).total_memory
        return total // per_gpu, f"GPU memory ({per_gpu} ranks per GPU)"
    try:
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ":" in ln}
        avail = info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return 0, ""
    return avail // max(ranks_here, 1), f"available host memory ({ranks_here} ranks on this node)"


def memory_problem(cfg, world_size: int, ranks_here: int, n_images: int) -> str:
    """Why the run cannot fit in memory ('' when it can, or when memory cannot be read)."""
    n_clients, per_rank = cfg.n_clients(world_size), cfg.run.clients_per_rank
    ks = cfg.cut_steps(n_clients)
    senders = sum(k < cfg.diffusion.timesteps for k in ks)
    if cfg.train.clients_per_step:
        senders = min(senders, cfg.train.clients_per_step)
    per_client = -(-n_images // n_clients)
    # a rank's logical clients train one after another: one batch of activations, every client's data
    need = {"a client": rank_bytes(cfg, cfg.train.batch_size, per_client * per_rank, False)}
    if senders:
        need["the server"] = rank_bytes(cfg, cfg.train.batch_size * senders, 0, True)
    who, most = max(need.items(), key=lambda kv: kv[1])
    have, where = available_bytes(cfg.run.device, ranks_here)
    if not have or most <= have:
        return ""
    return (f"data.image_size {cfg.data.image_size} with train.batch_size {cfg.train.batch_size} needs about "
            f"{most / GiB:.1f} GiB for {who} (model {cfg.model.preset}, {per_client} images per client), more than "
            f"the {have / GiB:.1f} GiB of {where} for each rank; lower --image-size or --batch-size, "
            "or use fewer ranks per node")
