"""Server role: one shared denoiser for t = k+1..T, trained on what every client sends.

It never holds client data: it receives (x_t, t, eps_s, k) built from a cut image whose noise
stays on the client, and for sampling it sends back only the x_k it generated itself.
"""
from __future__ import annotations

import torch

from . import comm, schedule
from .clients import cohort, rank_of
from .model import UNet
from .training import Learner, after_step, check_loss, derive_seed, fault_point, generator, seeded, unpack_train


class Server:
    def __init__(self, cfg, transport, ks: list[int], device, timer):
        self.cfg, self.tp, self.ks, self.device, self.timer = cfg, transport, ks, device, timer
        self.T = cfg.diffusion.timesteps
        self.sched = schedule.Schedule(self.T, cfg.diffusion.schedule)
        self.senders = [i for i, k in enumerate(ks) if k < self.T]  # logical clients with a server part
        self.per_rank = cfg.run.clients_per_rank
        c, s = cfg.data.channels, cfg.data.image_size
        self.image_shape = (c, s, s)
        self.learner = None
        self.start_step = 0
        self.stop = None  # a stopping.StopVote, set by the caller
        self._fused = None  # the fused batch buffer (rows = images of all senders)
        self._fused_layout = (0, 0, None)  # its rows, width, dtype: plain values, so no tensor query per message
        self._landings = {}  # (start, rows) -> Landing on those rows of the fused buffer
        from .privacy.views import ViewLog
        self.views = ViewLog(self.sched, cfg.privacy.max_views)  # what the attack suite works on
        self.sample_views = {}  # client -> the x_k this server generated and sent it
        if self.senders:
            model = seeded(derive_seed(cfg.run.seed, 0, "init"),
                           lambda: UNet(c, cfg.model.preset, True, cfg.model.dropout)).to(device)
            self.learner = Learner(model, cfg.train.lr, cfg.train.ema_decay, cfg.train.grad_clip,
                                   cfg.train.autocast, cfg.train.channels_last)

    def state_dict(self) -> dict:
        return {"learner": self.learner.state_dict() if self.learner else None}

    def load_state_dict(self, state: dict, step: int) -> None:
        if self.learner:
            self.learner.load_state_dict(state["learner"])
        self.start_step = step

    def _rows(self, start: int, info: dict) -> comm.Landing:
        """Rows start.. of the fused batch buffer, where one client's payload lands. The buffer is
        kept from step to step (shapes repeat) and grows, keeping the rows before `start`, when a
        step brings more rows. The same rows come back as the same Landing, which the transport
        checks once."""
        n, width = info["shape"]
        rows, have_width, dtype = self._fused_layout
        if rows < start + n or have_width != width or dtype != info["dtype"]:
            grown = torch.empty((start + n, width), dtype=info["dtype"], device=self.device)
            if start:
                grown[:start] = self._fused[:start]
            self._fused, self._fused_layout, self._landings = grown, (start + n, width, info["dtype"]), {}
        land = self._landings.get((start, n))
        if land is None:
            land = self._landings[(start, n)] = comm.Landing(self._fused[start:start + n])
        return land

    def step_senders(self, step: int) -> list[int]:
        """The sending clients of this step's cohort, in logical-id order."""
        chosen = set(cohort(self.cfg.run.seed, step, len(self.ks), self.cfg.train.clients_per_step))
        return [i for i in self.senders if i in chosen]

    def receive_step(self, step: int):
        """One batch from each sending client of the step's cohort, received by MPI straight into
        its rows of one fused batch, in logical-client order (deterministic: a rank's clients send
        in that order, and MPI keeps the order of one source's messages of one tag).
        None when no client of the cohort sends."""
        counts, ks, senders = [], [], self.step_senders(step)
        if not senders:
            return None
        for i in senders:
            src = rank_of(i, self.per_rank)
            with self.timer.phase("wait"):
                self.tp.probe(src, comm.TRAIN)
            with self.timer.phase("recv"):
                start = sum(counts)
                info, _ = self.tp.recv(src, comm.TRAIN, self.device, into=lambda info: self._rows(start, info))
            if info["client"] != i:  # a protocol break, never a silent mix-up of clients' rows
                raise RuntimeError(f"rank 0: expected client {i}'s batch of step {step} from rank {src}, "
                                   f"got client {info['client']}'s of step {info['step']}")
            counts.append(info["shape"][0])
            ks.append(info["meta"])
        fused = self._fused[:sum(counts)]
        x_t, eps_s, t = unpack_train(fused, self.image_shape)  # views of the fused rows
        with self.timer.phase("metrics"):  # keep what arrived: the attack suite runs on it later
            start = 0
            for i, n, k_i in zip(senders, counts, ks):
                rows = slice(start, start + n)
                self.views.add(i, step, x_t[rows], t[rows].cpu(), k_i, eps_s[rows])
                start += n
        k = torch.repeat_interleave(torch.tensor(ks), torch.tensor(counts)).to(self.device)
        return x_t, t, k, eps_s

    def train(self, on_step=None):
        timer = self.timer
        if not self.senders:  # nothing to train, but the stop votes at step edges are collective
            for step in range(self.start_step, self.cfg.train.steps):
                after_step(self.cfg, 0, step, timer, None, self.stop)
            return
        for step in range(self.start_step, self.cfg.train.steps):
            timer.start_step(step, step < self.cfg.train.warmup_steps)
            fault_point(0, step)
            fused = self.receive_step(step)
            if fused is None:  # no sender in this step's cohort: nothing to train on
                timer.end_step(float("nan"), 0)
            else:
                x_t, t, k, eps_s = fused
                loss = float(self.learner.step(timer, eps_s, x_t, t, k))
                check_loss(0, step, loss)
                timer.end_step(loss, x_t.shape[0])
            after_step(self.cfg, 0, step, timer, self.state_dict, self.stop)  # before the collective flush
            if on_step:
                on_step(step, loss)

    @torch.no_grad()
    def serve_samples(self):
        """Answer every sending client's request with the x_k of its chain T..k+1: all chains in
        one batched chain (sample.fused), or one client after another."""
        from .fused_sampling import Request, run_fused, run_serial
        d = self.cfg.diffusion
        model = self.learner.ema.model if self.learner else None
        requests, handles = [], []
        for i in self.senders:  # a rank sends its clients' requests in logical-id order
            src = rank_of(i, self.per_rank)
            with self.timer.phase("wait"):
                self.tp.probe(src, comm.SAMPLE_REQUEST)
            with self.timer.phase("recv"):
                info, req = self.tp.recv(src, comm.SAMPLE_REQUEST)
            k, n = info["meta"], int(req[0])
            gen = generator(derive_seed(self.cfg.run.seed, 0, "sample", info["client"]))
            requests.append(Request(info["client"], k, n, gen,
                                    schedule.side_steps(self.T, k, d.sampler, d.sample_steps, "server")))
            if not self.cfg.sample.fused:  # the reference: each request answered before the next is read
                run_serial(self, model, requests[-1:], handles)
        if self.cfg.sample.fused:
            run_fused(self, model, requests, handles)
        with self.timer.phase("wait"):
            for h in handles:
                h.wait()

    def answer(self, req, x, handles) -> None:
        """Send client `req.client` its x_k now, without waiting for the send to complete."""
        with self.timer.phase("send"):
            handles.append(self.tp.isend(rank_of(req.client, self.per_rank), comm.CUT, req.client, -1,
                                         x.contiguous(), meta=req.k))
        self.sample_views[req.client] = x.float().cpu()
