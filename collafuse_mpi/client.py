"""Client role: owns its data partition and the last k steps of the chain (t = 1..k)."""
from __future__ import annotations

import collections
import os

import numpy as np
import torch

from . import comm, schedule
from .data import Batches
from .model import UNet
from .training import Learner, check_loss, derive_seed, generator, seeded, pack_train, to_uint8

SERVER = 0


class Client:
    def __init__(self, cfg, transport, index: int, k: int, device, timer, data):
        """`index`: the logical client id (0-based over all clients of the run)."""
        self.cfg, self.tp, self.index, self.k = cfg, transport, index, k
        self.rank = transport.rank  # the MPI rank hosting this client
        # Seeds come from the logical id, so a client's numbers do not depend on the rank it
        # lives on; id + 1 is the rank a lone client has, keeping one-client-per-rank runs' numbers.
        self.seed_id = index + 1
        self.device, self.timer, self.data = device, timer, data
        self.sched = schedule.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
        self.T = cfg.diffusion.timesteps
        seed = cfg.run.seed
        self.noise_gen = generator(derive_seed(seed, self.seed_id, "noise"))
        self.batches = Batches(data.train, cfg.train.batch_size, derive_seed(seed, self.seed_id, "data"))
        self.learner = None
        if k >= 1:  # a client with k = 0 owns no timestep and trains nothing
            model = seeded(derive_seed(seed, self.seed_id, "init"),
                           lambda: UNet(cfg.data.channels, cfg.model.preset, False, cfg.model.dropout)).to(device)
            self.learner = Learner(model, cfg.train.lr, cfg.train.ema_decay, cfg.train.grad_clip,
                                   cfg.train.autocast, cfg.train.channels_last)
        self.in_flight = collections.deque()  # sends not yet known complete
        self.bytes = collections.Counter()  # payload + header bytes this client sent and received, by kind
        self.record_dir = os.environ.get("COLLAFUSE_RECORD_DIR", "")
        if self.record_dir:
            os.makedirs(self.record_dir, exist_ok=True)
        from .privacy.views import SentLog
        self.sent = SentLog(cfg.privacy.max_views)  # which images the kept messages came from

    def state_dict(self) -> dict:
        return {"learner": self.learner.state_dict() if self.learner else None,
                "noise_gen": self.noise_gen.get_state(), "batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.learner:
            self.learner.load_state_dict(state["learner"])
        self.noise_gen.set_state(state["noise_gen"])
        self.batches.load_state_dict(state["batches"])

    @property
    def sends(self) -> bool:
        return self.k < self.T

    def drain(self):
        with self.timer.phase("wait"):
            while self.in_flight:
                self.in_flight.popleft().wait()

    def train_step(self, step: int) -> tuple[float, int]:
        """This client's part of one training step (the host opens and closes the step):
        (loss, images)."""
        x0, target = self.begin_step(step)
        loss = self.learner.step(self.timer, target[2], target[0], target[1]) if target else torch.tensor(float("nan"))
        return self.end_step(step, x0, loss)

    def begin_step(self, step: int):
        """The batch and the client's own training target: (x0, (x_t, t, eps) or None when k = 0)."""
        with self.timer.phase("data"):
            x0 = next(self.batches).to(self.device)
        if self.record_dir:  # testing hook: the true batches, to audit what the server got
            np.save(os.path.join(self.record_dir, f"x0-client{self.index}-s{step}.npy"), x0.cpu().numpy())
        if self.learner is None:
            return x0, None
        with self.timer.phase("noise"):
            x_t, t, eps = schedule.client_target(self.sched, x0, self.k, self.noise_gen)
        return x0, (x_t, t.to(self.device), eps)

    def end_step(self, step: int, x0, loss) -> tuple[float, int]:
        """After the client's own update: the server's message from the same batch, sent."""
        cfg, timer = self.cfg, self.timer
        if self.sends:
            with timer.phase("noise"):
                index = self.batches.last_index
                eps_c = self._cut_noise(index) if cfg.privacy.cut_noise == "per_image" else None
                x_s, t_s, eps_s = schedule.server_message(self.sched, x0, self.k, self.noise_gen, eps_c)
                payload = pack_train(x_s, eps_s, t_s.to(self.device))
            with timer.phase("wait"):  # bounded: never more than max_in_flight batches the server has not taken
                while len(self.in_flight) >= cfg.train.max_in_flight:
                    self.in_flight.popleft().wait()
            with timer.phase("send"):  # sync: an eager send would complete unmatched and not bound it
                self.in_flight.append(self.tp.isend(SERVER, comm.TRAIN, self.index, step, payload, meta=self.k,
                                                    sync=cfg.train.sync_sends))
            self.bytes["sent_train_batch"] += payload.nbytes + comm.HEADER_BYTES
            self.sent.add(step, index)
        loss_value = float(loss)  # the only host sync of this client's step
        if self.learner is not None:
            check_loss(self.rank, step, loss_value)
        return loss_value, x0.shape[0]

    def _cut_noise(self, index: torch.Tensor) -> torch.Tensor:
        """per_image: one eps_c per training image, from a seed of its dataset index, so every
        view of an image is the same x_k (and resumes give the same noise)."""
        shape = tuple(self.batches.data.shape[1:])
        rows = [torch.randn(shape, generator=generator(derive_seed(self.cfg.run.seed, self.seed_id, "cut_noise",
                                                                   int(self.data.train_index[i]))))
                for i in index.tolist()]
        return torch.stack(rows).to(self.device)

    def request_sample(self) -> bool:
        """Ask the server for this client's x_k; False when the client owns the whole chain."""
        if not self.sends:
            return False
        req = torch.tensor([self.cfg.sample.samples_per_client], dtype=torch.int64)
        self.tp.send(SERVER, comm.SAMPLE_REQUEST, self.index, -1, req, meta=self.k)
        self.bytes["sent_sample_request"] += req.nbytes + comm.HEADER_BYTES
        return True

    @torch.no_grad()
    def finish_sample(self, x_k):
        """t = k..1 from the server's x_k (None: from x_T, the whole chain here).
        Returns (final samples, server view x_k or None)."""
        cfg, d = self.cfg, self.cfg.diffusion
        n = cfg.sample.samples_per_client
        shape = (n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        gen = generator(derive_seed(cfg.run.seed, self.seed_id, "sample"))
        if x_k is not None:
            self.bytes["recv_cut_tensor"] += x_k.nbytes + comm.HEADER_BYTES
            x, server_view = x_k, x_k.clone()
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

    def sample(self):
        """This client alone on its rank: request, receive, finish."""
        x_k = None
        if self.request_sample():
            with self.timer.phase("wait"):
                self.tp.probe(SERVER, comm.CUT)
            with self.timer.phase("recv"):
                _, x_k = self.tp.recv(SERVER, comm.CUT, self.device)
        return self.finish_sample(x_k)

    def sample_arrays(self, final, server_view) -> dict:
        out = {"generated": to_uint8(final)}
        if self.cfg.run.store_real:  # only on request: these are the client's own images
            out["real"] = to_uint8(torch.from_numpy(self.data.heldout[: len(final)]))
        if server_view is not None:
            # x_k is not in [-1, 1]; rescale by sqrt(abar_k) so it displays like an image.
            scale = self.sched.abar[self.k].sqrt().item()
            out["server_view"] = to_uint8(server_view / scale)
        return out
