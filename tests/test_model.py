"""Tests for collafuse_mpi.model: UNet shapes, cut conditioning, EMA, and that training learns."""
import contextlib

import pytest
import torch
from torch.nn import functional as F

from collafuse_mpi.config import MODEL_PRESETS
from collafuse_mpi.model import EMA, UNet, n_params, timestep_embedding
from collafuse_mpi.schedule import Schedule, client_target, server_message
from collafuse_mpi.training import Learner


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randomise_output(model, seed=0):
    """The output conv is zero-initialised (eps_hat = 0 at start); give it weights so that the
    output depends on the inputs."""
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    torch.nn.init.normal_(model.out[-1].bias, std=0.1)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, as each rank runs


class NullTimer:
    def phase(self, name):
        return contextlib.nullcontext()

    def add_flops(self, name, flops):
        pass


@pytest.mark.parametrize("preset,size", [("tiny", 8), ("tiny", 16), ("small", 16), ("small", 12),
                                         ("base", 32)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("cut_conditioned", [False, True])
def test_unet_output_shape_equals_input(preset, size, channels, cut_conditioned):
    torch.manual_seed(0)
    m = randomise_output(UNet(channels=channels, preset=preset, cut_conditioned=cut_conditioned))
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([1, 57])
    k = torch.tensor([0, 40]) if cut_conditioned else None
    with torch.no_grad():
        y = m(x, t, k)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all() and y.abs().sum() > 0


def test_presets_grow_in_size():
    sizes = [n_params(UNet(1, p)) for p in ("tiny", "small", "base")]
    assert sizes[0] < sizes[1] < sizes[2]
    assert set(MODEL_PRESETS) == {"tiny", "small", "base"}


def test_zero_init_output_predicts_zero_noise():
    m = UNet(1, "tiny")
    with torch.no_grad():
        y = m(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    assert torch.equal(y, torch.zeros_like(y))


def test_server_model_requires_k():
    m = randomise_output(UNet(1, "tiny", cut_conditioned=True))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([50, 60])
    with pytest.raises(ValueError, match="cut k"):
        m(x, t)
    with torch.no_grad():
        assert m(x, t, torch.tensor([10, 10])).shape == x.shape


def test_server_output_depends_on_k_client_does_not_take_it():
    torch.manual_seed(1)
    m = randomise_output(UNet(1, "tiny", cut_conditioned=True)).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([70, 70])
    with torch.no_grad():
        a = m(x, t, torch.tensor([10, 10]))
        b = m(x, t, torch.tensor([40, 40]))
        a2 = m(x, t, torch.tensor([10, 10]))
    assert torch.equal(a, a2)                      # deterministic
    assert (a - b).abs().max() > 1e-4              # k changes the prediction
    # per-sample k: row i of a mixed batch matches the batch with that k everywhere
    with torch.no_grad():
        mixed = m(x, t, torch.tensor([10, 40]))
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], b[1])
    # and the output depends on t as well
    with torch.no_grad():
        c = m(x, torch.tensor([20, 20]), torch.tensor([10, 10]))
    assert (a - c).abs().max() > 1e-4
    # the client model has no cut input: k, if passed, is ignored
    client = randomise_output(UNet(1, "tiny")).eval()
    with torch.no_grad():
        assert torch.equal(client(x, t), client(x, t, torch.tensor([3, 3])))
    assert client.cut_mlp is None and m.cut_mlp is not None


def test_timestep_embedding_distinct_and_bounded():
    e = timestep_embedding(torch.arange(0, 1001), 64)
    assert e.shape == (1001, 64)
    assert e.abs().max() <= 1.0
    # distinct embeddings for distinct t
    d = torch.cdist(e, e) + torch.eye(1001) * 10
    assert d.min() > 1e-3


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_ema_one_update_is_convex_combination(decay):
    torch.manual_seed(2)
    model = UNet(1, "tiny", cut_conditioned=True)
    ema = EMA(model, decay)
    old = [p.detach().clone() for p in ema.model.parameters()]
    # The EMA is a separate copy, frozen and in eval mode.
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    for o, e in zip(old, ema.model.parameters()):
        assert torch.equal(o, e)               # changing the model did not touch the EMA
    new = [p.detach().clone() for p in model.parameters()]
    ema.update(model)
    for o, n, e in zip(old, new, ema.model.parameters()):
        torch.testing.assert_close(e, decay * o + (1 - decay) * n, rtol=1e-5, atol=1e-6)
    # a second update keeps averaging: with the model fixed, the EMA moves towards it
    ema.update(model)
    for o, n, e in zip(old, new, ema.model.parameters()):
        torch.testing.assert_close(e, decay ** 2 * o + (1 - decay ** 2) * n, rtol=1e-5, atol=1e-6)


def test_ema_does_not_share_storage_with_model():
    model = UNet(1, "tiny")
    ema = EMA(model, 0.9)
    for p, e in zip(model.parameters(), ema.model.parameters()):
        assert p.data_ptr() != e.data_ptr()


@pytest.mark.parametrize("role", ["client", "server"])
def test_a_few_optimiser_steps_reduce_the_loss(role):
    torch.manual_seed(3)
    sched = Schedule(50, "cosine")
    x0 = torch.rand(8, 1, 8, 8, generator=gen(4)) * 2 - 1
    k = 20
    if role == "client":
        model = UNet(1, "tiny")
        x_t, t, eps = client_target(sched, x0, k, gen(5))
        inputs = (x_t, t)
    else:
        model = UNet(1, "tiny", cut_conditioned=True)
        x_t, t, eps = server_message(sched, x0, k, gen(5))
        inputs = (x_t, t, torch.full_like(t, k))
    learner = Learner(model, lr=2e-3, ema_decay=0.9, grad_clip=1.0)
    with torch.no_grad():
        first = F.mse_loss(model(*inputs), eps).item()
    ema_before = [p.detach().clone() for p in learner.ema.model.parameters()]
    losses = [float(learner.step(NullTimer(), eps, *inputs)) for _ in range(10)]
    with torch.no_grad():
        last = F.mse_loss(model(*inputs), eps).item()
    assert abs(losses[0] - first) < 1e-5        # step returns the loss before the update
    assert last < 0.8 * first, (first, last, losses)
    # the EMA followed the model
    moved = any(not torch.equal(a, b) for a, b in zip(ema_before, learner.ema.model.parameters()))
    assert moved


def _server_batch():
    sched = Schedule(50, "cosine")
    x0 = torch.rand(8, 1, 8, 8, generator=gen(4)) * 2 - 1
    x_t, t, eps = server_message(sched, x0, 20, gen(5))
    return eps, (x_t, t, torch.full_like(t, 20))


def _losses(steps=3, **options):
    torch.manual_seed(3)
    learner = Learner(UNet(1, "tiny", cut_conditioned=True), 2e-3, 0.9, 1.0, **options)
    eps, inputs = _server_batch()
    return learner, [float(learner.step(NullTimer(), eps, *inputs)) for _ in range(steps)]


def test_channels_last_is_the_same_computation_in_another_layout():
    _, plain = _losses()
    learner, last = _losses(channels_last=True)
    convs = [p for p in learner.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in learner.ema.model.parameters() if p.dim() == 4)  # sampling uses the same format
    torch.testing.assert_close(torch.tensor(last), torch.tensor(plain), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_weights_and_loss_in_float32():
    _, plain = _losses()
    learner, low = _losses(autocast="bf16")
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    # the output layer starts at zero, so the first losses agree exactly; once it has moved, the
    # forward runs in bf16 (not bit-identical to float32) and agrees to bf16 precision
    assert low[0] == plain[0] and low[-1] != plain[-1]
    assert abs(low[-1] - plain[-1]) < 0.05 * plain[-1]
