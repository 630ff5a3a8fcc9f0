"""FLOP counts: 2 per multiply-add of conv and linear layers, the convention of torch's counter."""
import torch
from torch import nn

from collafuse_mpi.flops import FlopCache, forward_flops
from collafuse_mpi.model import UNet


def test_hand_counts():
    # Conv2d 3->8, 3x3, 'same' on 5x5: every one of 8*5*5 outputs is 3*3*3 multiply-adds.
    assert forward_flops(nn.Conv2d(3, 8, 3, padding=1), torch.zeros(2, 3, 5, 5)) == 2 * 2 * 8 * 25 * 27
    # grouped: each output sees Cin/groups input channels
    assert forward_flops(nn.Conv2d(4, 8, 1, groups=2), torch.zeros(1, 4, 3, 3)) == 2 * 8 * 9 * 2
    assert forward_flops(nn.Linear(4, 5), torch.zeros(3, 4)) == 2 * 3 * 5 * 4
    # elementwise layers are not counted
    assert forward_flops(nn.Sequential(nn.SiLU(), nn.GroupNorm(1, 4)), torch.zeros(2, 4, 3, 3)) == 0


def test_unet_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    model = UNet(1, "tiny", cut_conditioned=True, dropout=0.1).train()
    x, t, k = torch.randn(4, 1, 16, 16), torch.randint(1, 100, (4,)), torch.full((4,), 40)
    with FlopCounterMode(display=False) as fc:
        model(x, t, k)
    state = torch.get_rng_state()
    assert forward_flops(model, x, t, k) == fc.get_total_flops()
    assert torch.equal(torch.get_rng_state(), state)  # dropout drew nothing: counted in eval mode
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_cache_counts_each_shape_once():
    model = nn.Linear(4, 2)
    cache = FlopCache(model)
    assert cache(torch.zeros(3, 4)) == 48
    assert cache(torch.zeros(5, 4)) == 80
    assert len(cache.cache) == 2
    cache(torch.zeros(3, 4))
    assert len(cache.cache) == 2
