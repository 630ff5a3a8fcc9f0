"""KID on the offline feature sets and SSIM are computed in this package, as torchmetrics defines
them: the same numbers as torchmetrics, without importing it (seconds per rank at start-up)."""
import pytest
import torch

from collafuse_mpi import metrics
from conftest import imported_after


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (5, 3, 16, 16), (4, 1, 28, 28), (3, 3, 32, 32)])
def test_ssim_equals_torchmetrics(shape):
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(shape, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
    side = shape[-1]
    k = 11 if side >= 11 else (side if side % 2 else side - 1)
    sigma = 1.5 if side >= 11 else 1.5 * k / 11
    ref = tm_ssim(a.double(), b.double(), gaussian_kernel=True, sigma=sigma, kernel_size=k,
                  data_range=2.0, reduction="none").to(torch.float32)
    assert torch.allclose(metrics.ssim(a, b), ref, rtol=0, atol=1e-6)
    assert torch.allclose(metrics.ssim(a, a), torch.ones(shape[0]), atol=1e-6)
    assert (metrics.ssim(a, b) < 0.95).all()


def test_kid_equals_torchmetrics_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance
    g = torch.Generator().manual_seed(0)
    real = torch.rand((40, 1, 16, 16), generator=g) * 2 - 1
    fake = (real[:30] + 0.2 * torch.randn((30, 1, 16, 16), generator=g)).clamp(-1, 1)
    ours = metrics.kid(real, fake, features="random-conv", subsets=7, subset_size=20, seed=5)
    net, prep = metrics._extractor("random-conv")
    tm = KernelInceptionDistance(feature=net, subsets=7, subset_size=20)
    tm.update(prep(real), real=True)
    tm.update(prep(fake), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        mean, std = tm.compute()
    assert ours["mean"] == float(mean) and ours["std"] == float(std)
    far = metrics.kid(real, torch.full((30, 1, 16, 16), -1.0), features="random-conv", subsets=7, subset_size=20, seed=5)
    assert far["mean"] > 10 * abs(ours["mean"])
    rf, ff = metrics.extract_features(real, "random-conv"), metrics.extract_features(fake, "random-conv")
    pooled = metrics.kid_from_features(rf, ff, subsets=7, subset_size=20, seed=5)
    assert pooled["mean"] == pytest.approx(ours["mean"], rel=1e-4)  # float64 features there


def test_mmd2_is_the_unbiased_estimate():
    """Written out: mean over i != j of k(x_i, x_j) + the same for y - 2 * mean over all k(x_i, y_j)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn((6, 4), generator=g, dtype=torch.float64), torch.randn((6, 4), generator=g, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 4 + 1) ** 3
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    assert float(metrics.mmd2_cubic(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert float(metrics.mmd2_cubic(x, x)) < 0.5 * float(metrics.mmd2_cubic(x, y + 3))


def test_a_run_s_metrics_do_not_import_torchmetrics():
    code = ("import torch; from collafuse_mpi import metrics as m; x = torch.rand(8, 1, 16, 16) * 2 - 1; "
            "m.kid(x, x.flip(0), features=m.feature_set('auto', 'digits'), subset_size=8); "
            "m.kid(x, x, features='random-conv', subset_size=8); m.ssim(x, x.flip(0)); m.feature_set('auto'); "
            "f = m.extract_features(x, 'random-conv'); m.kid_from_features(f, f, subset_size=8)")
    assert not imported_after(code, "torchmetrics")
