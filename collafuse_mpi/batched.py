"""A rank's logical-client models trained as one batched computation (`train.batched_clients`).

The M models share one architecture, so their weights are stacked along a new leading dimension
(torch.func.stack_module_state) and one vmapped functional call runs every client of the step on
its own weights and its own batch. Each client's update is its own: the loss of the step is the sum
of the clients' losses (client j's weights get only client j's gradient), gradient clipping takes
each client's own norm, and AdamW and the EMA are elementwise, applied to the rows of the clients
that trained in the step (a client outside the step's cohort keeps its weights, moments and step
count). The result equals M separate `Learner` steps to float tolerance (tests/test_batched.py);
the sequential loop stays the reference.

Each client's `Learner` is the home of its state: the stack is built from them when training
starts and written back into them (`write_back`) before a checkpoint and when training ends, so
sampling, saving and resuming see ordinary per-client models and optimisers.
"""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F


class StackedLearners:
    def __init__(self, learners: list):
        first = learners[0]
        if list(first.model.buffers()):
            raise ValueError("batched clients: models with buffers are not supported")
        group = first.opt.param_groups[0]
        self.lr, self.betas, self.eps, self.wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        self.clip, self.decay, self.learners = first.grad_clip, first.ema.decay, learners
        self.names = [n for n, _ in first.model.named_parameters()]
        params, _ = stack_module_state([lr.model for lr in learners])
        self.params = {n: params[n].detach().clone().requires_grad_(True) for n in self.names}
        self.ema = {n: torch.stack([dict(lr.ema.model.named_parameters())[n].detach() for lr in learners]).clone()
                    for n in self.names}
        self.m, self.v, self.steps = self._moments(learners)
        base = copy.deepcopy(first.model).to("meta")
        self._call = vmap(lambda p, x, t: functional_call(base, p, (x, t)))

    def _moments(self, learners):
        """AdamW's moments and step counts as the learners hold them (zero before their first step)."""
        m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        steps = torch.zeros(len(learners), dtype=torch.float64)
        for j, lr in enumerate(learners):
            for n, p in lr.model.named_parameters():
                st = lr.opt.state.get(p)
                if st:
                    m[n][j], v[n][j] = st["exp_avg"], st["exp_avg_sq"]
                    steps[j] = float(st["step"])
        return m, v, steps

    def step(self, timer, rows: list, inputs: list) -> torch.Tensor:
        """One training step of the clients at stack rows `rows` (ascending), client j on
        inputs[j] = (x_t, t, eps). Returns their losses, detached, in that order."""
        idx = torch.tensor(rows)
        for j, (x_t, t, _) in zip(rows, inputs):
            f = self.learners[j].flops(x_t, t)
            timer.add_flops("forward", f)
            timer.add_flops("backward", 2 * f)
        with timer.phase("forward"):
            losses = [None] * len(rows)
            by_shape = {}
            for pos, (x_t, _, _) in enumerate(inputs):
                by_shape.setdefault(tuple(x_t.shape), []).append(pos)
            for group in by_shape.values():  # one vmapped call per batch shape (nearly always one)
                sub = {n: p[idx[group]] for n, p in self.params.items()}
                x = torch.stack([inputs[g][0] for g in group])
                t = torch.stack([inputs[g][1] for g in group])
                eps = torch.stack([inputs[g][2] for g in group])
                out = self._call(sub, x, t)
                per = F.mse_loss(out.float(), eps, reduction="none").flatten(1).mean(1)
                for g, value in zip(group, per):
                    losses[g] = value
            loss = torch.stack(losses)
        with timer.phase("backward"):
            for p in self.params.values():
                p.grad = None
            loss.sum().backward()
        with timer.phase("optimizer"), torch.no_grad():
            self._update(idx)
        return loss.detach()

    def _update(self, idx: torch.Tensor) -> None:
        """Per-client clipping, AdamW (torch's update, row by row) and EMA on the rows `idx`."""
        grads = {n: p.grad[idx] for n, p in self.params.items()}
        shape = lambda v, like: v.view(-1, *([1] * (like.dim() - 1)))  # noqa: E731
        if self.clip > 0:  # torch.nn.utils.clip_grad_norm_, one norm per client
            norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()], 1)
            coef = (self.clip / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
            grads = {n: g * shape(coef, g) for n, g in grads.items()}
        b1, b2 = self.betas
        self.steps[idx] += 1
        step = self.steps[idx]
        step_size = (self.lr / (1 - b1 ** step)).float()
        bc2_sqrt = ((1 - b2 ** step) ** 0.5).float()
        for n, p in self.params.items():
            g, w = grads[n], p.data[idx]
            w.mul_(1 - self.lr * self.wd)
            m = self.m[n][idx].lerp_(g, 1 - b1)
            v = self.v[n][idx].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / shape(bc2_sqrt, v)).add_(self.eps)
            w.sub_(shape(step_size, m) * m / denom)
            p.data[idx], self.m[n][idx], self.v[n][idx] = w, m, v
            self.ema[n][idx] = self.ema[n][idx].lerp_(w, 1 - self.decay)

    @torch.no_grad()
    def write_back(self) -> None:
        """Each client's weights, EMA and AdamW state into its own Learner."""
        for j, lr in enumerate(self.learners):
            ema = dict(lr.ema.model.named_parameters())
            for n, p in lr.model.named_parameters():
                p.copy_(self.params[n][j])
                ema[n].copy_(self.ema[n][j])
                if self.steps[j] > 0:
                    lr.opt.state[p] = {"step": torch.tensor(float(self.steps[j])),
                                       "exp_avg": self.m[n][j].clone(), "exp_avg_sq": self.v[n][j].clone()}
