"""Client role: owns its data partition and the last k steps of the chain (t = 1..k)."""
from __future__ import annotations

import collections
import os

import numpy as np
import torch

from . import comm, schedule
from .data import Batches
from .model import UNet
from .stopping import Stopped
from .training import Learner, after_step, check_loss, derive_seed, fault_point, generator, seeded, pack_train, to_uint8

SERVER = 0


class Client:
    def __init__(self, cfg, transport, index: int, k: int, device, timer, data):
        self.cfg, self.tp, self.index, self.k = cfg, transport, index, k
        self.rank = index + 1
        self.device, self.timer, self.data = device, timer, data
        self.sched = schedule.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
        self.T = cfg.diffusion.timesteps
        seed = cfg.run.seed
        self.noise_gen = generator(derive_seed(seed, self.rank, "noise"))
        self.batches = Batches(data.train, cfg.train.batch_size, derive_seed(seed, self.rank, "data"))
        self.learner = None
        if k >= 1:  # a client with k = 0 owns no timestep and trains nothing
            model = seeded(derive_seed(seed, self.rank, "init"),
                           lambda: UNet(cfg.data.channels, cfg.model.preset, False, cfg.model.dropout)).to(device)
            self.learner = Learner(model, cfg.train.lr, cfg.train.ema_decay, cfg.train.grad_clip,
                                   cfg.train.autocast, cfg.train.channels_last)
        self.start_step = 0
        self.stop = None  # a stopping.StopVote, set by the caller
        self.record_dir = os.environ.get("COLLAFUSE_RECORD_DIR", "")
        if self.record_dir:
            os.makedirs(self.record_dir, exist_ok=True)
        from .privacy.views import SentLog
        self.sent = SentLog(cfg.privacy.max_views)  # which images the kept messages came from

    def state_dict(self) -> dict:
        return {"learner": self.learner.state_dict() if self.learner else None,
                "noise_gen": self.noise_gen.get_state(), "batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict, step: int) -> None:
        if self.learner:
            self.learner.load_state_dict(state["learner"])
        self.noise_gen.set_state(state["noise_gen"])
        self.batches.load_state_dict(state["batches"])
        self.start_step = step

    @property
    def sends(self) -> bool:
        return self.k < self.T

    def train(self, on_step=None):
        in_flight = collections.deque()
        try:
            self._train(in_flight, on_step)
        except Stopped:  # the server has taken every batch up to the edge where all stopped
            self._drain(in_flight)
            raise
        self._drain(in_flight)

    def _drain(self, in_flight):
        with self.timer.phase("wait"):
            while in_flight:
                in_flight.popleft().wait()

    def _train(self, in_flight, on_step):
        cfg, timer = self.cfg, self.timer
        for step in range(self.start_step, cfg.train.steps):
            timer.start_step(step, step < cfg.train.warmup_steps)
            fault_point(self.rank, step)
            with timer.phase("data"):
                x0 = next(self.batches).to(self.device)
            if self.record_dir:  # testing hook: the true batches, to audit what the server got
                np.save(os.path.join(self.record_dir, f"x0-client{self.index}-s{step}.npy"), x0.cpu().numpy())
            loss = torch.tensor(float("nan"))
            if self.learner is not None:
                with timer.phase("noise"):
                    x_t, t, eps = schedule.client_target(self.sched, x0, self.k, self.noise_gen)
                loss = self.learner.step(timer, eps, x_t, t.to(self.device))
            if self.sends:
                with timer.phase("noise"):
                    index = self.batches.last_index
                    eps_c = self._cut_noise(index) if cfg.privacy.cut_noise == "per_image" else None
                    x_s, t_s, eps_s = schedule.server_message(self.sched, x0, self.k, self.noise_gen, eps_c)
                    payload = pack_train(x_s, eps_s, t_s.to(self.device))
                with timer.phase("wait"):  # bounded: never more than max_in_flight batches unacknowledged
                    while len(in_flight) >= cfg.train.max_in_flight:
                        in_flight.popleft().wait()
                with timer.phase("send"):
                    in_flight.append(self.tp.isend(SERVER, comm.TRAIN, self.index, step, payload, meta=self.k))
                self.sent.add(step, index)
            loss_value = float(loss)  # the only host sync of the step
            if self.learner is not None:
                check_loss(self.rank, step, loss_value)
            timer.end_step(loss_value, x0.shape[0])
            # before on_step: a preempted rank must not enter the collective flush its peers left
            after_step(cfg, self.rank, step, timer, self.state_dict, self.stop)
            if on_step:
                on_step(step, loss_value)

    def _cut_noise(self, index: torch.Tensor) -> torch.Tensor:
        """per_image: one eps_c per training image, from a seed of its dataset index, so every
        view of an image is the same x_k (and resumes give the same noise)."""
        shape = tuple(self.batches.data.shape[1:])
        rows = [torch.randn(shape, generator=generator(derive_seed(self.cfg.run.seed, self.rank, "cut_noise",
                                                                   int(self.data.train_index[i]))))
                for i in index.tolist()]
        return torch.stack(rows).to(self.device)

    @torch.no_grad()
    def sample(self):
        """Returns (final samples, server view x_k or None)."""
        cfg, d = self.cfg, self.cfg.diffusion
        n = cfg.sample.samples_per_client
        shape = (n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        gen = generator(derive_seed(cfg.run.seed, self.rank, "sample"))
        if self.sends:
            req = torch.tensor([n], dtype=torch.int64)
            self.tp.send(SERVER, comm.SAMPLE_REQUEST, self.index, -1, req, meta=self.k)
            with self.timer.phase("wait"):
                self.tp.probe(SERVER, comm.CUT)
            with self.timer.phase("recv"):
                _, x = self.tp.recv(SERVER, comm.CUT, self.device)
            server_view = x.clone()
        else:
            x = torch.randn(shape, generator=gen).to(self.device)
            server_view = None
        if self.k >= 1:
            model = self.learner.ema.model
            pairs = schedule.side_steps(self.T, self.k, d.sampler, d.sample_steps, "client")
            tt = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            self.timer.add_flops("sample", len(pairs) * self.learner.flops(x, tt))
            with self.timer.phase("sample"):
                x = schedule.run_chain(self.sched, model, x, 0, pairs, d.sampler, gen, clip=True,
                                       eta=cfg.sample.eta)
        return x.clamp(-1, 1), server_view

    def sample_arrays(self, final, server_view) -> dict:
        out = {"generated": to_uint8(final)}
        if self.cfg.run.store_real:  # only on request: these are the client's own images
            out["real"] = to_uint8(torch.from_numpy(self.data.heldout[: len(final)]))
        if server_view is not None:
            # x_k is not in [-1, 1]; rescale by sqrt(abar_k) so it displays like an image.
            scale = self.sched.abar[self.k].sqrt().item()
            out["server_view"] = to_uint8(server_view / scale)
        return out
