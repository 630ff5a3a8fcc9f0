"""Image quality (KID) and disclosure metrics for CollaFuse runs.

Images are float tensors [N, C, H, W] in [-1, 1], C = 1 or 3. See docs/metrics.md.

KID runs on one of these feature sets, and a KID value only means something next to
other values from the same set:
  "digits-classifier", "shapes-classifier"
                 a small classifier trained on that embedded dataset (features.py, weights
                 shipped in the package): the default for those datasets.
  "inception"    torchmetrics' Inception-v3 (torch-fidelity weights), used when the weights
                 file is already on disk; nothing here ever downloads it.
  "random-conv"  a fixed random conv net, built from a fixed seed: works offline, anywhere.
"""
from __future__ import annotations

import math
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import features as domain

FEATURE_SETS = ("inception", "random-conv") + tuple(domain.name_for(d) for d in domain.DOMAIN_DATASETS)
# torch-fidelity (0.4.0 read) fetches this file with torch.hub.load_state_dict_from_url, which reads
# <torch.hub.get_dir()>/checkpoints/<file name> when it exists and downloads it otherwise.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
_GLOBAL_RNG = threading.Lock()  # held while torch's global CPU generator is seeded and drawn from
_CHUNK = 256  # images per feature-extractor call: bounds memory, results do not depend on it


def inception_weights_path() -> str:
    """Where torch-fidelity looks for the Inception weights: $TORCH_HOME/hub/checkpoints/...
    ($TORCH_HOME defaults to ${XDG_CACHE_HOME:-~/.cache}/torch; torch.hub.set_dir overrides)."""
    try:  # follow torch-fidelity if it is installed and ever renames the file
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        name = os.path.basename(URL_INCEPTION_V3)
    except Exception:
        name = INCEPTION_WEIGHTS_FILE
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def _inception_problem() -> str | None:
    """Why the Inception feature set cannot be built offline, or None if it can. No network."""
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        return ("torch-fidelity is not installed "
                "(pip install --no-deps torch-fidelity, see docs/metrics.md)")
    try:  # torch-fidelity imports torchvision and tqdm at package import
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except Exception as exc:
        return f"torch-fidelity is installed but does not import: {exc!r}"
    path = inception_weights_path()
    if not (os.path.isfile(path) and os.path.getsize(path) > 0):
        return f"Inception weights not found at {path} (download: {INCEPTION_WEIGHTS_URL})"
    return None


def feature_set(name: str = "auto", dataset: str | None = None) -> str:
    """Resolve the KID feature set. 'auto': the dataset's own classifier for an embedded dataset
    (digits, shapes), else 'inception' if usable offline, else 'random-conv'."""
    if name == "auto":
        if dataset is not None and domain.available(dataset):
            return domain.name_for(dataset)
        return "inception" if _inception_problem() is None else "random-conv"
    if name not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {name!r}; expected 'auto' or one of {FEATURE_SETS}")
    if name == "inception":
        problem = _inception_problem()
        if problem is not None:
            raise RuntimeError(f"feature set 'inception' unavailable: {problem}")
    own = domain.dataset_of(name)
    if own is not None and not domain.available(own):
        raise RuntimeError(f"feature set {name!r} unavailable: no weights in {domain.WEIGHTS_DIR}")
    return name


def _extractor(fs: str):
    """(network, input preparation) of a resolved offline feature set (not inception)."""
    if fs == "random-conv":
        return RandomConvFeatures(), (lambda x: x)  # noqa: E731  (takes [-1, 1] directly)
    return domain.DomainFeatures(domain.dataset_of(fs)), (lambda x: x)  # noqa: E731


class RandomConvFeatures(nn.Module):
    """Offline KID features: three fixed random conv layers (He-scaled, ReLU), pooled on a grid.

    Weights come from a private generator seeded with `seed`, so the network is identical in every
    process and never touches the global RNG. Spatial grid pooling (not only a global average) keeps
    it sensitive to where strokes are, e.g. to shifts. Input: float in [-1, 1] or uint8 in [0, 255],
    1 or 3 channels, any size; output [N, widths[-1] * grid**2] (default 1024).
    """

    def __init__(self, size: int = 32, widths=(16, 32, 64), grid: int = 4, seed: int = 0):
        super().__init__()
        self.size, self.grid = size, grid
        g = torch.Generator().manual_seed(seed)
        self.strides = (1,) + (2,) * (len(widths) - 1)
        cin = 3
        for i, cout in enumerate(widths):
            w = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (cin * 9))
            # small bias, so that a flat -1 background does not map to all-zero features
            b = torch.randn(cout, generator=g) * 0.1
            self.register_buffer(f"w{i}", w)
            self.register_buffer(f"b{i}", b)
            cin = cout
        self.num_features = cin * grid * grid
        self.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float().clamp(-1, 1)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected [N, 1 or 3, H, W] images, got {tuple(x.shape)}")
        x = x.to(self.w0.device).expand(-1, 3, -1, -1)  # gray -> 3 identical channels
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
        for i, stride in enumerate(self.strides):
            x = F.relu(F.conv2d(x, getattr(self, f"w{i}"), getattr(self, f"b{i}"), stride, 1))
        return F.adaptive_avg_pool2d(x, self.grid).flatten(1)


def _to_uint8_rgb(x: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 RGB, the input torchmetrics' Inception expects (it resizes to 299)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def kid(real: Tensor, fake: Tensor, features: str = "auto", subsets: int = 10,
        subset_size: int | None = None, seed: int = 0, dataset: str | None = None) -> dict:
    """Kernel Inception Distance (unbiased MMD^2, cubic kernel) between two image sets.

    Mean/std over `subsets` random subsets of `subset_size` images per side. `seed` only fixes the
    subset draws (done in a forked RNG: the caller's global RNG state is left untouched); the
    random-conv extractor is always the same network.
    """
    for name, t in (("real", real), ("fake", fake)):
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"{name}: expected [N, 1 or 3, H, W] images, got {tuple(t.shape)}")
    fs = feature_set(features, dataset)
    n_real, n_fake = real.shape[0], fake.shape[0]
    if subset_size is None:
        subset_size = min(n_real, n_fake, 1000)
    if subset_size < 2:
        raise ValueError(f"KID needs subset_size >= 2 "
                         f"(got {subset_size}; n_real={n_real}, n_fake={n_fake})")
    if subset_size > min(n_real, n_fake):
        raise ValueError(f"subset_size {subset_size} > number of images "
                         f"(n_real={n_real}, n_fake={n_fake})")
    if fs != "inception":  # torchmetrics' KID computation on our own extractor, without importing it
        net, prep = _extractor(fs)
        real_f, fake_f = _features(net, prep, real), _features(net, prep, fake)
        mean, std = _subset_kid(real_f, fake_f, subsets, subset_size, seed)
        return {"mean": float(mean), "std": float(std), "features": fs,
                "n_real": int(n_real), "n_fake": int(n_fake)}
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=2048, subsets=subsets, subset_size=subset_size)
    with torch.no_grad():
        for imgs, is_real in ((real, True), (fake, False)):
            for i in range(0, imgs.shape[0], _CHUNK):
                metric.update(_to_uint8_rgb(imgs[i:i + _CHUNK].detach().cpu()), real=is_real)
        # torchmetrics draws subsets with torch.randperm on the global CPU generator: seed it inside
        # a fork (only the CPU one, so a caller's CUDA RNG is not reseeded either), one caller at a
        # time (roles run as threads of one process in loopback runs: the generator is shared)
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "features": fs,
            "n_real": int(n_real), "n_fake": int(n_fake)}


def extract_features(images: Tensor, features: str = "auto", dataset: str | None = None) -> Tensor:
    """[N, D] features of one image set with the given feature set (for pooling across ranks)."""
    fs = feature_set(features, dataset)
    if fs == "inception":
        from torchmetrics.image.kid import KernelInceptionDistance
        net, prep = KernelInceptionDistance(feature=2048).inception, _to_uint8_rgb
    else:
        net, prep = _extractor(fs)
    return _features(net, prep, images).double()


def _features(net, prep, images: Tensor) -> Tensor:
    """[N, D] features in chunks of _CHUNK images (bounds memory; the result does not depend on it)."""
    with torch.no_grad():
        return torch.cat([net(prep(images[i:i + _CHUNK].detach().cpu())) for i in range(0, images.shape[0], _CHUNK)])


def kid_from_features(real_f: Tensor, fake_f: Tensor, subsets: int = 10,
                      subset_size: int | None = None, seed: int = 0) -> dict:
    """KID from precomputed features: the same unbiased polynomial-kernel MMD as `kid`."""
    n = min(real_f.shape[0], fake_f.shape[0])
    subset_size = subset_size or min(n, 1000)
    if subset_size < 2 or subset_size > n:
        raise ValueError(f"subset_size must be in [2, {n}], got {subset_size}")
    mean, std = _subset_kid(real_f, fake_f, subsets, subset_size, seed)
    return {"mean": float(mean), "std": float(std),
            "n_real": int(real_f.shape[0]), "n_fake": int(fake_f.shape[0])}


def _subset_kid(real_f: Tensor, fake_f: Tensor, subsets: int, subset_size: int, seed: int):
    """Mean and (population) std of the MMD^2 over random subsets, drawn as torchmetrics draws
    them (a real permutation, then a fake one, per subset) from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = real_f[torch.randperm(real_f.shape[0], generator=g)[:subset_size]]
        f = fake_f[torch.randperm(fake_f.shape[0], generator=g)[:subset_size]]
        scores.append(mmd2_cubic(r, f))
    scores = torch.stack(scores)
    return scores.mean(), scores.std(unbiased=False)


def mmd2_cubic(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of two equal-size feature sets under k(a, b) = (a.b / d + 1)^3, summed in the
    order torchmetrics' poly_mmd sums (the same float result)."""
    gamma, m = 1.0 / x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((u @ v.T * gamma + 1.0) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    sxx = (kxx.sum(dim=-1) - torch.diag(kxx)).sum()
    syy = (kyy.sum(dim=-1) - torch.diag(kyy)).sum()
    value = (sxx + syy) / (m * (m - 1))
    value -= 2 * kxy.sum(dim=0).sum() / (m ** 2)
    return value


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError("expected two [N, C, H, W] tensors of the same shape, "
                         f"got {tuple(a.shape)}, {tuple(b.shape)}")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-image mean squared error, shape [N]."""
    _check_pair(a, b)
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).to(torch.float32)


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, shape [N]; inf for identical images. data_range 2: [-1, 1]."""
    err = mse(a, b).double()
    return (10 * torch.log10(data_range ** 2 / err)).to(torch.float32)  # x/0 -> inf


def ssim(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image SSIM, shape [N]: torchmetrics' definition (gaussian window, sigma 1.5 -> 11x11),
    computed here (importing torchmetrics costs every rank seconds at start-up).

    torchmetrics sizes the gaussian window from sigma (2*int(3.5*sigma+0.5)+1), so for images
    smaller than 11 px the window is shrunk by scaling sigma to the largest odd size that fits.
    """
    _check_pair(a, b)
    side = min(a.shape[-2:])
    k, sigma = 11, 1.5
    if side < 11:
        k = side if side % 2 else side - 1
        if k < 3:
            raise ValueError(f"SSIM needs images of at least 3x3, got {tuple(a.shape[-2:])}")
        sigma = 1.5 * k / 11
    # float64: SSIM of identical images comes out as 1 to ~1e-12, not ~1e-6
    return _gaussian_ssim(a.double(), b.double(), sigma, data_range).to(torch.float32)


def _gaussian_ssim(a: Tensor, b: Tensor, sigma: float, data_range: float) -> Tensor:
    """torchmetrics' structural_similarity_index_measure (gaussian window sized from sigma,
    reflect padding, k1 = 0.01, k2 = 0.03, mean over every pixel), per image."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    pad, channels = (size - 1) // 2, a.shape[1]
    d = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=a.dtype, device=a.device)
    g = torch.exp(-torch.pow(d / sigma, 2) / 2)
    g = (g / g.sum()).unsqueeze(0)
    kernel = torch.matmul(g.t(), g).expand(channels, 1, size, size)
    a, b = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (a, b))
    out = F.conv2d(torch.cat((a, b, a * a, b * b, a * b)), kernel, groups=channels).split(a.shape[0])
    mu_a2, mu_b2, mu_ab = out[0].pow(2), out[1].pow(2), out[0] * out[1]
    var_a = torch.clamp(out[2] - mu_a2, min=0.0)
    var_b = torch.clamp(out[3] - mu_b2, min=0.0)
    cov = out[4] - mu_ab
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    full = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_a2 + mu_b2 + c1) * (var_a + var_b + c2))
    return full.reshape(full.shape[0], -1).mean(-1)


def sampling_disclosure(server_view: Tensor, final: Tensor) -> dict:
    """The CollaFuse paper's measure: similarity of the server's intermediate x_k to the client's
    final sample made from it (lower MSE / higher SSIM = the server saw more of the result)."""
    _check_pair(server_view, final)
    return {"mse": float(mse(server_view, final).mean()),
            "ssim": float(ssim(server_view, final).mean()),
            "n": int(final.shape[0])}
