"""What server and client share: seeds, devices, the optimiser step, the train message layout."""
from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import torch
from torch.nn import functional as F

from .adamw import AdamW

PURPOSES = {"init": 0, "data": 1, "noise": 2, "sample": 3, "metrics": 4, "cut_noise": 5, "privacy": 6}


def derive_seed(run_seed: int, rank: int, purpose: str, extra: int = 0) -> int:
    """One independent seed per (run, rank, purpose): ranks never share a random stream."""
    ss = np.random.SeedSequence([run_seed, rank, PURPOSES[purpose], extra])
    return int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


global_rng_lock = threading.Lock()


def seeded(seed: int, build):
    """build() under torch's global seed; locked because loopback roles share one process."""
    with global_rng_lock:
        torch.manual_seed(seed)
        return build()


def fault_point(rank: int, step: int) -> None:
    """Testing hooks: COLLAFUSE_FAIL_AT=rank:step raises there (the abort path);
    COLLAFUSE_HANG_AT=rank:step stops answering there (the receive deadline);
    COLLAFUSE_STEP_DELAY_S=s makes every step s seconds longer (a long job, for signal tests)."""
    delay = os.environ.get("COLLAFUSE_STEP_DELAY_S")
    if delay:
        time.sleep(float(delay))
    here = f"{rank}:{step}"
    if os.environ.get("COLLAFUSE_FAIL_AT") == here:
        raise RuntimeError(f"injected failure at step {step} (COLLAFUSE_FAIL_AT={here})")
    if os.environ.get("COLLAFUSE_HANG_AT") == here:
        time.sleep(3600)


def check_loss(rank: int, step: int, loss: float) -> None:
    """A NaN or Inf loss ends the run at once, naming where: nothing after it can be trusted."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"rank {rank}: training loss is {loss} at step {step} "
                                 "(lower --lr, or check the data)")


def after_step(cfg, rank: int, step: int, timer, state_fn, stop=None) -> None:
    """Checkpoint every run.checkpoint_every steps; and when the ranks agree to stop (`stop`, a
    stopping.StopVote), save here and raise Stopped on every rank at this same edge.
    `state_fn` None: this rank has nothing to save (a server that trains nothing)."""
    from . import checkpoint
    from .stopping import Stopped, hook
    hook(rank, step)
    done = step + 1
    every = cfg.run.checkpoint_every
    stopping = stop is not None and stop.at_edge(step)
    if state_fn is not None and ((every and done % every == 0) or stopping):
        with timer.phase("checkpoint"):
            checkpoint.save(cfg, rank, done, state_fn())
    if stopping:
        raise Stopped(done)


def pick_device(choice: str, local_rank: int) -> torch.device:
    """auto: local rank -> GPU (round robin when ranks outnumber GPUs), else CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but no CUDA device is visible")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def sync_fn(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


class Learner:
    """A model with its optimiser, EMA and gradient clipping; timed in phases."""

    def __init__(self, model, lr: float, ema_decay: float, grad_clip: float, autocast: str = "off",
                 channels_last: bool = False):
        from .model import EMA
        self.channels_last = channels_last
        if channels_last:  # before the EMA copy, so sampling runs in the same format
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.autocast = autocast
        self.opt = AdamW(model.parameters(), lr=lr)
        self.ema = EMA(model, ema_decay)
        self.grad_clip = grad_clip
        from .flops import FlopCache
        self.flops = FlopCache(model)  # forward FLOPs per input shape, counted once each

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.ema.model.load_state_dict(state["ema"])

    def step(self, timer, eps, *inputs) -> float:
        if self.channels_last:
            inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs)
        f = self.flops(*inputs)  # outside the phases: a 1-image forward the first time a shape is seen
        timer.add_flops("forward", f)
        timer.add_flops("backward", 2 * f)
        with timer.phase("forward"):
            device = inputs[0].device.type
            with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast == "bf16"):
                out = self.model(*inputs)
            loss = F.mse_loss(out.float(), eps)
        with timer.phase("backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with timer.phase("optimizer"):
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.opt.step()
            self.ema.update(self.model)
        return loss.detach()


def pack_train(x_t: torch.Tensor, eps_s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One contiguous float32 row per image: x_t, eps_s, t (exact in float32 for t < 2**24)."""
    b = x_t.shape[0]
    return torch.cat([x_t.reshape(b, -1), eps_s.reshape(b, -1), t.to(x_t.dtype).view(b, 1)], 1).contiguous()


def unpack_train(payload: torch.Tensor, image_shape: tuple):
    b = payload.shape[0]
    d = int(np.prod(image_shape))
    x_t = payload[:, :d].reshape(b, *image_shape)
    eps_s = payload[:, d:2 * d].reshape(b, *image_shape)
    t = payload[:, 2 * d].round().long()
    return x_t, eps_s, t


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images to uint8 for grids in the results file."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
