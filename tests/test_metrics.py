"""Tests for collafuse_mpi.metrics (CPU only, offline, a few seconds)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from collafuse_mpi import metrics as M


@pytest.fixture(scope="module")
def digits():
    """sklearn digits (8x8, 0..16) -> [-1, 1], upsampled to 16x16, in a fixed random order."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(-1, 1)
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def halves(digits):
    return digits[:500], digits[500:1000]  # two disjoint samples of the same distribution


@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    """An empty torch hub cache: the Inception weights cannot be there, whatever is installed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case someone called torch.hub.set_dir
    return tmp_path


# ---------------------------------------------------------------- KID, offline feature set

def test_kid_real_vs_real_near_zero_and_far_below_distortions(halves, no_inception):
    a, b = halves
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(b.shape, generator=g).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(b, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    shifted = torch.roll(b, shifts=(2, 2), dims=(2, 3))
    kw = dict(subsets=5, subset_size=250, seed=0)
    real = M.kid(a, b, **kw)
    assert real["features"] == "random-conv"
    assert (real["n_real"], real["n_fake"]) == (500, 500)
    assert abs(real["mean"]) < 5e-4  # observed ~5e-5; the distortions below give 5e-3 .. 6e-2
    out = {}
    for name, fake in (("noise", noise), ("blurred", blurred), ("shifted", shifted)):
        out[name] = r = M.kid(a, fake, **kw)
        assert r["mean"] > 20 * max(abs(real["mean"]), 1e-5), (name, r, real)
        assert r["mean"] > 3 * r["std"], (name, r)
    # a gross distortion must score worse than a mild one
    assert out["noise"]["mean"] > out["blurred"]["mean"]


def test_kid_deterministic_for_seed_and_leaves_global_rng_alone(halves):
    a, b = halves[0][:300], halves[1][:300]
    kw = dict(features="random-conv", subsets=4, subset_size=100)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    r1 = M.kid(a, b, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    torch.manual_seed(999)  # a different global state must not matter
    r2 = M.kid(a, b, seed=7, **kw)
    assert r1 == r2
    r3 = M.kid(a, b, seed=8, **kw)  # the seed really drives the subset draws
    assert r3["mean"] != r1["mean"]


def test_kid_subset_size_checks(halves):
    a, b = halves
    assert M.kid(a[:30], b[:20], features="random-conv", subsets=2)["n_fake"] == 20  # default 20
    with pytest.raises(ValueError):
        M.kid(a[:1], b[:5], features="random-conv")  # default subset_size 1 < 2
    with pytest.raises(ValueError):
        M.kid(a[:10], b[:10], features="random-conv", subset_size=11)
    with pytest.raises(ValueError):
        M.kid(a[:10, 0], b[:10, 0], features="random-conv")  # not [N, C, H, W]


def test_feature_set_auto_falls_back_offline(halves, no_inception):
    assert M.feature_set("auto") == "random-conv"
    assert M.feature_set("random-conv") == "random-conv"
    with pytest.raises(RuntimeError, match="inception"):
        M.feature_set("inception")
    with pytest.raises(ValueError):
        M.feature_set("vgg")
    a, b = halves
    assert M.kid(a[:40], b[:40], subsets=2)["features"] == "random-conv"


def test_inception_weights_path_follows_torch_home(no_inception):
    expected = os.path.join(str(no_inception), "hub", "checkpoints", M.INCEPTION_WEIGHTS_FILE)
    assert M.inception_weights_path() == expected
    assert M.inception_weights_path() == os.path.join(torch.hub.get_dir(), "checkpoints",
                                                      M.INCEPTION_WEIGHTS_FILE)


def test_random_conv_features_inputs(digits):
    torch.manual_seed(1)
    f1 = M.RandomConvFeatures()
    torch.manual_seed(2)
    f2 = M.RandomConvFeatures()
    x = digits[:16]
    out = f1(x)
    assert out.shape == (16, f1.num_features) and 256 <= f1.num_features <= 2048
    assert torch.equal(out, f2(x))  # weights do not depend on the global RNG
    assert torch.allclose(f1(x.expand(-1, 3, -1, -1)), out)  # gray == identical RGB channels
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(f1(u8), out, atol=2e-2 * out.abs().max().item())  # uint8 path, same scale
    for size in (8, 64):
        assert f1(F.interpolate(x, size=size, mode="bilinear")).shape == out.shape
    with pytest.raises(ValueError):
        f1(torch.zeros(2, 2, 16, 16))


_INCEPTION_PROBLEM = M._inception_problem()


@pytest.mark.skipif(_INCEPTION_PROBLEM is not None,
                    reason=f"Inception feature set unavailable offline: {_INCEPTION_PROBLEM}")
def test_kid_inception_runs(halves):
    a, b = halves
    assert M.feature_set("auto") == "inception"
    r = M.kid(a[:12], b[:12], features="inception", subsets=2, subset_size=10)
    assert r["features"] == "inception" and math.isfinite(r["mean"])


# ---------------------------------------------------------------- MSE / PSNR / SSIM

@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (4, 3, 16, 16), (2, 3, 64, 64)])
def test_identical_images(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(M.mse(x, x), torch.zeros(shape[0]))
    assert torch.isinf(M.psnr(x, x)).all() and (M.psnr(x, x) > 0).all()
    s = M.ssim(x, x)
    assert s.shape == (shape[0],)
    assert torch.allclose(s, torch.ones(shape[0]), atol=1e-6)


@pytest.mark.parametrize("size", [8, 16])
def test_noisy_images_known_psnr(size):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, size, size, generator=g) - 0.5
    sign = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    prev = 1.0
    for sigma in (0.05, 0.1, 0.3):
        y = x + sigma * sign  # every pixel off by exactly sigma: MSE = sigma^2
        assert torch.allclose(M.mse(x, y), torch.full((6,), sigma ** 2), rtol=1e-5)
        expected = 10 * math.log10(2.0 ** 2 / sigma ** 2)
        assert torch.allclose(M.psnr(x, y), torch.full((6,), expected), atol=1e-3)
        s = M.ssim(x, y)
        assert (s < prev).all() and (s > -1).all()
        prev = s.max().item()


@pytest.mark.parametrize("size, sigma", [(16, 1.5), (12, 1.5), (9, 1.5 * 9 / 11), (8, 1.5 * 7 / 11)])
def test_ssim_window(size, sigma):
    """torchmetrics' default 11x11 window (sigma 1.5) where it fits, a shrunk one below 11 px."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, size, size, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ref = tm_ssim(y.double(), x.double(), sigma=sigma, data_range=2.0, reduction="none").float()
    assert torch.allclose(M.ssim(y, x), ref, atol=1e-6)
    if size < 11:  # the default window gives a different value: the shrink really happened
        default = tm_ssim(y.double(), x.double(), data_range=2.0, reduction="none").float()
        assert not torch.allclose(M.ssim(y, x), default, atol=1e-4)


# ---------------------------------------------------------------- disclosure

def _forward(x0, abar, seed=0):
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps


def test_sampling_disclosure(digits):
    final = digits[:32]
    same = M.sampling_disclosure(final, final)
    assert same["mse"] == 0 and same["ssim"] == pytest.approx(1.0, abs=1e-6) and same["n"] == 32
    near = M.sampling_disclosure(_forward(final, 0.9), final)
    far = M.sampling_disclosure(_forward(final, 0.2), final)
    assert 0 < near["mse"] < far["mse"] and far["ssim"] < near["ssim"] < 1


# ---------------------------------------------------------------- pooled KID from features

def test_pooled_kid_from_features_matches_the_image_kid_scale(halves, no_inception):
    """Features pooled from several clients: real vs real near zero, noise far above it."""
    a, b = halves
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    fa, fb, fn = (M.extract_features(x) for x in (a, b, noise))
    assert fa.shape == (500, 1024)
    same = M.kid_from_features(fa, fb, subsets=5, subset_size=250, seed=0)
    far = M.kid_from_features(fa, fn, subsets=5, subset_size=250, seed=0)
    assert abs(same["mean"]) < 5e-4
    assert far["mean"] > 20 * max(abs(same["mean"]), 1e-5)
    # the same estimator as the image path: on the full sets (subset = everything) they agree
    whole = M.kid_from_features(fa, fn, subsets=1, subset_size=500)
    direct = M.kid(a, noise, subsets=1, subset_size=500)
    assert whole["mean"] == pytest.approx(direct["mean"], rel=1e-3)
