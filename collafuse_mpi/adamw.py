"""AdamW for the server and client models: torch.optim.AdamW's update and state_dict format,
without torch.optim.

torch.optim's optimisers import torch._dynamo on their first call (to mark themselves as not
to be compiled). That import costs about 2.7 s of CPU on every rank at start-up, a fifth of a
small run, and nothing here compiles. The update is torch's own (decoupled weight decay,
bias-corrected moments, no amsgrad), applied with torch's multi-tensor (foreach) kernels to
each group of parameters that share device, dtype and step count; tests/test_adamw.py checks
it against torch.optim.AdamW, step by step and through a state_dict in either direction.
"""
from __future__ import annotations

import torch

_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
             "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
             "decoupled_weight_decay": True}  # the keys torch.optim.AdamW's param group has


class AdamW:
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        params = list(params)
        if not params:
            raise ValueError("AdamW got an empty parameter list")
        group = dict(_DEFAULTS, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.param_groups = [dict(group, params=params)]
        self.state: dict = {}  # parameter -> {"step", "exp_avg", "exp_avg_sq"}, as torch keeps it

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        buckets: dict = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            st = self.state.get(p)
            if not st:
                st = self.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            st["step"] += 1
            buckets.setdefault((p.device, p.dtype, float(st["step"])), []).append((p, st))
        for (_, _, step), pairs in buckets.items():
            ps = [p for p, _ in pairs]
            grads = [p.grad for p in ps]
            m = [st["exp_avg"] for _, st in pairs]
            v = [st["exp_avg_sq"] for _, st in pairs]
            torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, 1 - b2)
            step_size = lr / (1 - b1 ** step)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, (1 - b2 ** step) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, m, denom, -step_size)

    def state_dict(self) -> dict:
        """As torch.optim.Optimizer.state_dict(): parameters by index, state tensors by reference."""
        group = self.param_groups[0]
        index = {id(p): i for i, p in enumerate(group["params"])}
        packed = dict(group, params=list(range(len(group["params"]))))
        return {"state": {index[id(p)]: dict(st) for p, st in self.state.items()}, "param_groups": [packed]}

    def load_state_dict(self, state_dict: dict) -> None:
        """A state_dict of this class or of torch.optim.AdamW over the same parameters."""
        groups = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(params):
            raise ValueError("loaded optimizer state does not match the model's parameters "
                             f"({sum(len(g['params']) for g in groups)} saved, {len(params)} here)")
        saved = groups[0]
        if saved.get("amsgrad") or saved.get("maximize") or not saved.get("decoupled_weight_decay", True):
            raise ValueError("loaded optimizer state is not plain AdamW (amsgrad, maximize or L2 weight decay)")
        by_index = dict(zip(saved["params"], params))
        self.param_groups[0].update({k: v for k, v in saved.items() if k in _DEFAULTS})
        self.param_groups[0]["betas"] = tuple(self.param_groups[0]["betas"])
        self.state = {}
        for i, st in state_dict["state"].items():
            p = by_index[i]
            self.state[p] = {"step": torch.as_tensor(st["step"], dtype=torch.float32).detach().clone().cpu(),
                             "exp_avg": st["exp_avg"].detach().to(p.device, p.dtype).clone(),
                             "exp_avg_sq": st["exp_avg_sq"].detach().to(p.device, p.dtype).clone()}
