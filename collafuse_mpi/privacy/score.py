"""A client's side of the attack suite: it alone holds the true images, and uses them only to
score what rank 0's attacks produced. Nothing here goes back to rank 0 but the scores."""
from __future__ import annotations

import math

import torch

from .. import metrics
from ..training import generator
from .gaussian import LinearPrior, linked_abar, rescale_linked
from .linking import link_quality, linked_means
from .reident import candidates, top1

REID_M = (10, 100)
SSIM_VIEWS = 1024  # SSIM (float64 convolutions) on the first views only; PSNR and MSE on all


def _quality(est: torch.Tensor, truth: torch.Tensor) -> dict:
    s = slice(0, SSIM_VIEWS)  # views come in the order of arrival, the images in random order
    return {"psnr": float(metrics.psnr(est, truth).mean()), "ssim": float(metrics.ssim(est[s], truth[s]).mean()),
            "mse": float(metrics.mse(est, truth).mean()), "n": int(len(truth)), "n_ssim": int(len(truth[s]))}


def score(client, pkg: dict, final: torch.Tensor, names: tuple, seed: int) -> dict:
    """Every attack's result for this client, with its parameters."""
    cfg, data = client.cfg, client.data
    a, steps, views = pkg["abar"], pkg["steps"], pkg["views"]
    idx = client.sent.truth(steps)
    train = torch.from_numpy(data.train)
    x0 = train[idx]
    out = {"k": pkg["k"], "abar_k": a, "views": int(len(views)), "cut_noise": cfg.privacy.cut_noise,
           "reconstruction": {n: _quality(r, x0) for n, r in pkg["recon"].items()},
           "analytic": dict(pkg["analytic"]), "skipped": pkg["skipped"]}
    counts = torch.unique(idx, return_counts=True)[1].double()
    if cfg.privacy.cut_noise == "per_image":  # every view of an image is one x_k: one independent view
        counts = torch.ones_like(counts)
    out["analytic"].update(_per_run(pkg["spectrum"].double(), a, counts))
    if pkg["linked"]:
        out["linked"] = {n: _quality(r, x0) for n, r in pkg["linked"].items()}
    if "links" in pkg:
        flat, off = pkg["links"]
        out["linking"] = link_quality(flat, off, idx, steps)
        out["linking"]["z"] = cfg.privacy.link_z
    if "reid" in names:
        out["reid"] = _reid(pkg, views, idx, train, a, cfg.privacy.reid_views, seed)
    if pkg["sample"]:
        out["sampling"] = {n: _quality(r, final.cpu().float()) for n, r in pkg["sample"].items()}
    if "membership" in names:
        out["membership"] = _membership(client, pkg.get("server_model"), seed)
    return out


def _per_run(spectrum, a: float, counts: torch.Tensor) -> dict:
    """The anchors for the independent views sent per image: m views are one view at linked_abar(a, m).
    views_per_image is then the number of independent views (1 with per_image cut noise)."""
    if a >= 1.0:
        return {"views_per_image": float(counts.mean()), "linear_mse_run": 0.0, "mi_bits_run": math.inf}
    prior = LinearPrior(torch.zeros(len(spectrum), dtype=torch.float64), torch.eye(len(spectrum), dtype=torch.float64),
                        spectrum, "views")
    mses = [prior.mse(float(linked_abar(a, m))) for m in counts.tolist()]
    bits = [prior.mutual_information_bits(float(linked_abar(a, m))) for m in counts.tolist()]
    return {"views_per_image": float(counts.mean()), "linear_mse_run": sum(mses) / len(mses),
            "mi_bits_run": sum(bits) / len(bits)}


def _reid(pkg, views, idx, train, a: float, n_views: int, seed: int) -> dict:
    g = generator(seed)
    pick = torch.randperm(len(views), generator=g)[:n_views]
    out = {"n": int(len(pick))}
    linked = None
    if "links" in pkg:
        means, m = linked_means(views.double(), *pkg["links"])
        linked = (rescale_linked(means, a, m)[pick], linked_abar(a, m)[pick] if a < 1 else 1.0)
    for m_c in REID_M:
        cands = candidates(idx[pick], len(train), m_c, g)
        size = cands.shape[1]
        row = {"candidates": size, "chance": 1.0 / size, "top1": top1(views[pick], a, train, cands)}
        if linked is not None:
            row["top1_linked"] = top1(linked[0], linked[1], train, cands)
        out[f"m{m_c}"] = row
    return out


def _membership(client, server_state, seed: int) -> dict:
    """Loss-based membership inference: members are training images, non-members held-out ones."""
    from ..model import UNet
    from .membership import client_losses, mia_scores, server_losses
    cfg, data = client.cfg, client.data
    n = min(cfg.privacy.mia_samples, len(data.train), len(data.heldout))
    g = generator(seed + 1)
    members = torch.from_numpy(data.train)[torch.randperm(len(data.train), generator=g)[:n]]
    others = torch.from_numpy(data.heldout)[torch.randperm(len(data.heldout), generator=g)[:n]]
    draws = cfg.privacy.mia_draws
    out = {}
    if server_state is not None:
        model = UNet(cfg.data.channels, cfg.model.preset, True, cfg.model.dropout)
        model.load_state_dict(server_state)
        model.eval()
        fn = lambda x, t, k: model(x, t, k)  # noqa: E731
        out["server"] = mia_scores(server_losses(fn, client.sched, members, client.k, draws, seed),
                                   server_losses(fn, client.sched, others, client.k, draws, seed))
    if client.learner is not None:
        model, dev = client.learner.ema.model, client.device
        fn = lambda x, t: model(x.to(dev), t.to(dev)).cpu()  # noqa: E731
        out["client"] = mia_scores(client_losses(fn, client.sched, members, client.k, draws, seed),
                                   client_losses(fn, client.sched, others, client.k, draws, seed))
    return out
