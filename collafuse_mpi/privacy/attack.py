"""Rank 0's side of the attack suite: every attack uses only what the server holds (the views it
recovered from received messages, the x_k it generated at sampling, its own model) and public
data. What it produces per client goes to that client's rank, which alone can score it."""
from __future__ import annotations

import math
import time

import torch

from .gaussian import LinearPrior, linked_abar, rescale_linked
from .linking import link, linked_means

TOP = 0.9999  # the learned attacker's highest noise level; above it a view is x0 to float precision


class Clock:
    """Wall and CPU seconds per attack, for the cost table."""

    def __init__(self):
        self.seconds = {}

    def __call__(self, name):
        clock = self

        class _Span:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                w, c = clock.seconds.get(name, (0.0, 0.0))
                clock.seconds[name] = (w + time.perf_counter() - self.t, c + time.process_time() - self.c)
        return _Span()


def train_attacker(cfg, aux: torch.Tensor, abars: list[float], clock: Clock):
    """The learned attacker: a denoiser trained on public images over the noise levels it will
    meet (single views at the clients' cuts up to views linked across the whole run)."""
    from .learned import train_denoiser
    lo = min(max(min(abars), 1e-4), TOP)
    hi = min(max(linked_abar(a, 64) for a in abars), TOP)
    with clock("learned_training"):
        model, cost = train_denoiser(aux, lo, max(hi, lo), cfg.privacy.learned_steps, 64, 2e-3,
                                     cfg.run.seed)
    return model, cost


def _estimators(names, views_prior, scalar_prior, public_prior, learned):
    out = {"scalar": lambda y, a: scalar_prior.estimate(y, a),
           "linear": lambda y, a: views_prior.estimate(y, a)}
    if public_prior is not None and "public_linear" in names:
        out["public_linear"] = lambda y, a: public_prior.estimate(y, a)
    if learned is not None:
        from .learned import reconstruct
        out["learned"] = lambda y, a: reconstruct(learned, y.float(), torch.as_tensor(a).clamp(max=TOP))
    return out


def server_attacks(cfg, sched, log, sample_views: dict, names: tuple, aux: torch.Tensor) -> tuple[dict, dict]:
    """Per client index, the package its rank scores; and the run-wide attack costs."""
    clock, skipped, learned, learned_cost = Clock(), {}, None, {}
    public_prior = None
    if len(aux) < 2:
        for n in ("public_linear", "learned"):
            if n in names:
                skipped[n] = "no public data (privacy.aux_fraction = 0 and no privacy.aux_path)"
    else:
        with clock("public_linear"):
            public_prior = LinearPrior.from_images(aux)
        abars = [float(sched.abar[log.k[c]]) for c in log.clients()]
        if "learned" in names and abars and min(abars) >= TOP:
            skipped["learned"] = "nothing to learn: at k = 0 every view is the image itself"
        elif "learned" in names and abars:
            learned, learned_cost = train_attacker(cfg, aux, abars, clock)
    packages = {}
    for c in log.clients():
        views, steps = log.of(c)
        k = log.k[c]
        a = float(sched.abar[k])
        pkg = {"k": k, "abar": a, "steps": steps, "views": views, "recon": {}, "linked": {},
               "sample": {}, "skipped": dict(skipped)}
        with clock("linear"):
            prior = LinearPrior.from_views(views, a)
        with clock("scalar"):
            scalar = LinearPrior.scalar_from_views(views, a)
        est = _estimators(names, prior, scalar, public_prior, learned)
        for name, fn in est.items():
            if name in names:
                with clock(name):
                    pkg["recon"][name] = fn(views, a)
        if "multiview" in names or "reid" in names:
            with clock("multiview"):
                flat, off = link(views, steps, a, cfg.privacy.link_z, prior=prior)
                means, m = linked_means(views, flat, off)
                pkg["links"] = (flat, off)
            if "multiview" in names:
                a_m = linked_abar(a, m)
                y = rescale_linked(means.double(), a, m).float()
                for name in ("linear", "learned"):
                    if name in est:
                        with clock("multiview"):
                            pkg["linked"][name] = est[name](y, a_m)
        if "sampling" in names and c in sample_views:
            pkg["sample"] = {n: fn(sample_views[c], a) for n, fn in est.items() if n in names}
            # the x_k handed over at sampling is the server's denoised anchor, not a noisy view:
            # the plain rescale can beat the estimators that shrink it as if it were noisy
            pkg["sample"]["rescale"] = (sample_views[c] / math.sqrt(a)).clamp(-1, 1)
        pkg["analytic"] = _anchors(prior, scalar, public_prior, a, pkg)
        packages[c] = pkg
    cost = {n: {"seconds": w, "cpu_seconds": cpu} for n, (w, cpu) in clock.seconds.items()}
    if learned_cost:
        cost["learned_training"].update({k: v for k, v in learned_cost.items() if k not in ("wall_s", "cpu_s")})
    return packages, cost


def _anchors(prior, scalar, public_prior, a: float, pkg) -> dict:
    """Analytic anchors for one view at this cut: the linear MMSE floors and the Gaussian-channel
    mutual-information upper bounds. The spectrum goes along so the client, which knows how many
    views of each image were sent, can state the same anchors per run."""
    out = {"rescale_mse": (1 - a) / a if a > 0 else float("inf"),
           "scalar_mse": scalar.mse(a), "linear_mse": prior.mse(a),
           "mi_bits": prior.mutual_information_bits(a),
           "mi_diagonal_bits": prior.diagonal_information_bits(a)}
    if public_prior is not None:
        out["public_linear_mse"] = public_prior.mse(a)
    pkg["spectrum"] = prior.spectrum.float()
    return out
