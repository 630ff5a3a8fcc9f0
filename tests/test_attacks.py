"""The attack suite's math, without MPI: the linear attack is optimal on Gaussian data and its
MSE is the closed form, the information bounds are the Gaussian-channel formulas, linking finds
views of one image and nothing in copies, re-identification is trivial without noise and
chance-level with only noise."""
import math

import pytest
import torch

from collafuse_mpi.privacy import pool, strongest
from collafuse_mpi.privacy.gaussian import LinearPrior, linked_abar, rescale_linked
from collafuse_mpi.privacy.linking import link, link_quality, linked_means
from collafuse_mpi.privacy.reident import candidates, top1

D = 16


def gaussian_images(n, seed=0, spread=False):
    """x0 ~ N(mu, C) with a known covariance (low rank plus small, or spread over every
    direction), as [n, 1, 4, 4]."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    spectrum = (torch.linspace(0.3, 1.0, D, dtype=torch.float64) if spread else
                torch.tensor([2.0, 1.0, 0.5, 0.25] + [0.01] * (D - 4), dtype=torch.float64))
    mu = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    x0 = mu + (z * spectrum.sqrt()) @ basis.T
    return x0.reshape(n, 1, 4, 4), LinearPrior(mu, basis, spectrum, "true")


def channel(x0, a, seed=1):
    g = torch.Generator().manual_seed(seed)
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)


@pytest.mark.parametrize("a", [0.2, 0.5, 0.9])
def test_linear_attack_from_views_reaches_the_closed_form_mmse(a):
    x0, true = gaussian_images(20000)
    y = channel(x0, a)
    est = LinearPrior.from_views(y, a)  # moments from the views alone, as the server has them
    mse = float((est.estimate(y, a, clip=False) - x0).pow(2).mean())
    closed = true.mse(a)  # tr(C - a C (aC + (1-a) I)^-1 C) / D: the MMSE of Gaussian data
    assert mse == pytest.approx(closed, rel=0.03)
    # and it is the best: the scalar model and the plain rescale are worse
    scalar = LinearPrior.scalar_from_views(y, a)
    assert float((scalar.estimate(y, a, clip=False) - x0).pow(2).mean()) > 1.2 * mse
    assert float((y / math.sqrt(a) - x0).pow(2).mean()) == pytest.approx((1 - a) / a, rel=0.03)


def test_information_bounds_are_the_gaussian_channel_formulas():
    _, true = gaussian_images(10)
    a = 0.4
    snr = a / (1 - a)
    full = 0.5 * sum(math.log2(1 + snr * s) for s in true.spectrum.tolist())
    assert true.mutual_information_bits(a) == pytest.approx(full)
    assert true.diagonal_information_bits(a) >= full  # Hadamard: the diagonal bound is looser
    # m views of one image carry what one view at m times the SNR carries
    m = 5
    a_m = linked_abar(a, m)
    assert a_m / (1 - a_m) == pytest.approx(m * snr)
    assert true.mutual_information_bits(a_m) > full
    assert true.mutual_information_bits(1.0) == math.inf and true.mse(1.0) == 0.0


def test_mean_of_views_is_one_view_at_the_linked_level():
    x0, true = gaussian_images(4000)
    a, m = 0.3, 6
    views = torch.stack([channel(x0, a, seed=s) for s in range(m)])
    y = rescale_linked(views.mean(0), a, m)
    a_m = linked_abar(a, m)
    noise = y - math.sqrt(a_m) * x0
    assert float(noise.var()) == pytest.approx(1 - a_m, rel=0.03)
    assert float((true.estimate(y, a_m, clip=False) - x0).pow(2).mean()) == pytest.approx(true.mse(a_m), rel=0.05)


def _epochs(x0, a, epochs, seed=0, fresh=True):
    """Every image once per step-group (epoch), as the server receives them: views, steps, truth."""
    n = len(x0)
    views, steps, truth = [], [], []
    g = torch.Generator().manual_seed(seed)
    fixed = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    for e in range(epochs):
        order = torch.randperm(n, generator=g)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype) if fresh else fixed
        views.append(math.sqrt(a) * x0[order] + math.sqrt(1 - a) * noise[order])
        steps.append(torch.full((n,), e))
        truth.append(order)
    return torch.cat(views).float(), torch.cat(steps), torch.cat(truth)


def test_linking_finds_the_views_of_one_image_when_the_noise_is_small():
    x0, true = gaussian_images(200, spread=True)
    views, steps, truth = _epochs(x0, 0.95, 5)
    flat, off = link(views, steps, 0.95, 3.0, prior=LinearPrior.from_views(views, 0.95))
    q = link_quality(flat, off, truth, steps)
    assert q["precision"] > 0.95 and q["recall"] > 0.9
    assert q["views_per_image"] == 5
    # averaging linked views beats one view
    means, m = linked_means(views, flat, off)
    a_m = linked_abar(0.95, m)
    single = (true.estimate(views, 0.95, clip=False) - x0[truth]).pow(2).mean()
    linked = (true.estimate(rescale_linked(means.double(), 0.95, m), a_m, clip=False) - x0[truth]).pow(2).mean()
    assert float(linked) < 0.5 * float(single)


def test_copies_are_linked_to_each_other_alone_and_add_nothing():
    x0, true = gaussian_images(100)
    views, steps, truth = _epochs(x0, 0.5, 4, fresh=False)  # per_image noise: every view a copy
    flat, off = link(views, steps, 0.5, 3.0, prior=LinearPrior.from_views(views, 0.5))
    q = link_quality(flat, off, truth, steps)
    assert q["precision"] == 1.0 and q["recall"] == 1.0
    means, m = linked_means(views, flat, off)
    assert torch.equal(m, torch.ones_like(m))  # copies count as one view
    assert torch.allclose(means, views, atol=1e-6)


def test_views_of_one_step_are_never_linked():
    x0, _ = gaussian_images(50)
    views, steps, _ = _epochs(x0, 0.99, 1)
    flat, off = link(views, steps, 0.99, 10.0)
    assert len(flat) == 0 and int(off[-1]) == 0


def test_reidentification_is_trivial_without_noise_and_chance_with_only_noise():
    """A view identical to its image (a = 1, the cut at 0) is always re-identified; a view of
    pure noise is re-identified at chance, 1/M."""
    x0, _ = gaussian_images(300)
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(300)
    cands = candidates(truth, 300, 10, g)
    assert bool((cands[:, 0] == truth).all())
    assert all(len(set(r.tolist())) == 10 for r in cands)  # distinct, the true one once
    assert top1(x0, 1.0, x0, cands) == 1.0
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    acc = top1(noise, 1e-9, x0, cands)
    assert abs(acc - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 300)


def test_pool_weights_by_views_and_names_the_strongest_attack():
    per = {"client_0": {"reconstruction": {"linear": {"psnr": 20.0, "ssim": 0.5, "mse": 0.04, "n": 300},
                                           "scalar": {"psnr": 12.0, "ssim": 0.2, "mse": 0.2, "n": 300}},
                        "linked": {"linear": {"psnr": 23.0, "ssim": 0.6, "mse": 0.02, "n": 300}}},
           "client_1": {"reconstruction": {"linear": {"psnr": 10.0, "ssim": 0.1, "mse": 0.4, "n": 100},
                                           "scalar": {"psnr": 8.0, "ssim": 0.1, "mse": 0.6, "n": 100}},
                        "linked": {"linear": {"psnr": 11.0, "ssim": 0.2, "mse": 0.3, "n": 100}}}}
    out = pool(per)
    assert out["reconstruction"]["linear"]["psnr"] == pytest.approx((20 * 300 + 10 * 100) / 400)
    assert out["headline"]["attack"] == "multiview_linear"
    assert strongest(per["client_1"])[0] == "multiview_linear"


def test_privacy_config_names_the_attacks_and_refuses_unknown_ones():
    from collafuse_mpi import config
    cfg = config.Config()
    assert config.attack_set(cfg) == config.ATTACKS
    cfg.privacy.attacks = "quick"
    assert "learned" not in config.attack_set(cfg) and "linear" in config.attack_set(cfg)
    cfg.privacy.attacks = "reid, linear"
    assert config.attack_set(cfg) == ("linear", "reid")  # the suite's order
    for field, bad in (("attacks", "linear,telepathy"), ("cut_noise", "sometimes"), ("aux_fraction", 0.7)):
        cfg = config.Config()
        setattr(cfg.privacy, field, bad)
        with pytest.raises(config.ConfigError, match=f"privacy.{field}"):
            config.validate(cfg)
