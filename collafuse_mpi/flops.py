"""Exact FLOP counts of a model call: conv and linear layers, 2 FLOPs per multiply-add.

The same convention as torch.utils.flop_counter (which counts matmuls and convolutions only):
normalisation, activations, resampling and the optimiser's elementwise update are not counted.
The count runs the model once on the first image of the batch (in eval mode, so dropout draws
no random numbers) and multiplies by the batch size: every counted layer treats images
independently. That costs one 1-image forward, once per input shape; torch's FlopCounterMode
gives the same forward count (tests/test_flops.py) but its first call took seconds here. Backward is counted as 2x forward
(gradients of the input and of the weights, each the forward's cost); torch's counter gives
2x minus the first layer's input gradient, which nothing needs (within 0.3% for the UNets here).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def forward_flops(model: nn.Module, *inputs) -> int:
    """FLOPs of model(*inputs) (batch = the first dimension of every tensor input): sum over
    Conv2d of 2 * out.numel() * Cin/groups * kh * kw and over Linear of 2 * out.numel() * in."""
    total = [0]

    def conv(mod, _inp, out):
        total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)

    def linear(mod, _inp, out):
        total[0] += 2 * out.numel() * mod.in_features

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear))
    batch = next(x.shape[0] for x in inputs if torch.is_tensor(x))
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*(x[:1] if torch.is_tensor(x) else x for x in inputs))
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes:
            mod.training = mode
    return total[0] * batch


class FlopCache:
    """forward_flops per input shape, so that a training loop counts each shape once."""

    def __init__(self, model: nn.Module):
        self.model, self.cache = model, {}

    def __call__(self, *inputs) -> int:
        key = tuple(tuple(x.shape) if torch.is_tensor(x) else x for x in inputs)
        if key not in self.cache:
            self.cache[key] = forward_flops(self.model, *inputs)
        return self.cache[key]
