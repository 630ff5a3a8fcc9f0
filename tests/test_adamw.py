"""The servers' and clients' AdamW is torch.optim.AdamW: same update (bit for bit on CPU), same
state_dict."""
import pytest
import torch

from collafuse_mpi.adamw import AdamW
from conftest import imported_after


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def _train(model, opt, steps, seed=1, skip_bias_at=None):
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        x = torch.randn(5, 1, 8, 8, generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        if s == skip_bias_at:  # a parameter without a gradient this step: its step count falls behind
            model[3].bias.grad = None
        opt.step()


@pytest.mark.parametrize("wd", [0.01, 0.3])
def test_steps_equal_torch_adamw(wd):
    a, b = _model(), _model()
    ours = AdamW(a.parameters(), lr=3e-3, weight_decay=wd)
    theirs = torch.optim.AdamW(b.parameters(), lr=3e-3, weight_decay=wd)
    _train(a, ours, 12, skip_bias_at=4)
    _train(b, theirs, 12, skip_bias_at=4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"])
        assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])
    assert float(ours.state[a[3].bias]["step"]) == 11  # the skipped step is not counted


def test_state_dict_moves_either_way_and_training_continues_alike():
    a, b = _model(), _model()
    ours, theirs = AdamW(a.parameters(), lr=2e-3), torch.optim.AdamW(b.parameters(), lr=2e-3)
    _train(a, ours, 5)
    _train(b, theirs, 5)
    a2, b2 = _model(7), _model(7)  # other weights, then the trained ones and the swapped optimiser state
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    ours2, theirs2 = AdamW(a2.parameters(), lr=2e-3), torch.optim.AdamW(b2.parameters(), lr=2e-3)
    ours2.load_state_dict(theirs.state_dict())
    theirs2.load_state_dict(ours.state_dict())
    assert theirs2.param_groups[0]["decoupled_weight_decay"] is True
    _train(a2, ours2, 4, seed=2)
    _train(b2, theirs2, 4, seed=2)
    for p, q in zip(a2.parameters(), b2.parameters()):
        assert torch.equal(p, q)


def test_a_state_dict_of_another_model_or_optimizer_is_refused():
    ours = AdamW(_model().parameters())
    with pytest.raises(ValueError, match="does not match the model's parameters"):
        ours.load_state_dict(AdamW(torch.nn.Linear(2, 2).parameters()).state_dict())
    adam = torch.optim.Adam(_model().parameters(), weight_decay=0.1)
    with pytest.raises(ValueError, match="not plain AdamW"):
        ours.load_state_dict(adam.state_dict())


def test_training_leaves_torch_dynamo_unimported():
    code = ("import torch\n"
            "from collafuse_mpi.adamw import AdamW\n"
            "m = torch.nn.Linear(3, 3); o = AdamW(m.parameters())\n"
            "m(torch.randn(2, 3)).sum().backward(); o.step(); o.zero_grad(); o.load_state_dict(o.state_dict())")
    assert not imported_after(code, "torch._dynamo")
    assert imported_after(code + "\ntorch.optim.AdamW(m.parameters()).step()", "torch._dynamo")  # what it avoids
