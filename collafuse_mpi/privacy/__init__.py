"""The attack suite: how much a curious server learns about the clients' images.

Threat model: the server (rank 0) follows the protocol and is curious. It holds every message
it received (x_t, t, eps_s, k, from which it recovers each cut image x_k exactly), the x_k it
generated at sampling, its own model, and public images of the same kind, disjoint from every
client's data. It never holds eps_c, a client's model or a client's image. Attacks run on
rank 0 on exactly that (attack.py); each client scores them on its own rank against its true
images (score.py), and only the scores travel back.

Attacks (privacy.attacks):
  scalar         the scalar Wiener estimate, moments estimated from the views
  linear         linear MMSE with the mean and full pixel covariance estimated from the views
  public_linear  linear MMSE with the mean and covariance of the public images
  learned        a noise-level-conditioned denoiser trained on the public images
  multiview      blind linking of the views of one image across steps, averaged, then linear
                 and learned reconstruction (per run rather than per message)
  reid           which of M candidate images a view came from (maximum likelihood)
  membership     loss-based membership inference on the released server and client models
  sampling       reconstruction of the client's final sample from the x_k the server sent
Analytic anchors beside them: linear MMSE floors and Gaussian-channel information bounds.
"""
from __future__ import annotations

import math

SINGLE = ("scalar", "linear", "public_linear", "learned")


def strongest(result: dict) -> tuple[str, dict] | None:
    """The best reconstruction in one client's (or the pooled) result, single view or linked."""
    best = None
    for group, prefix in (("reconstruction", ""), ("linked", "multiview_")):
        for name, q in result.get(group, {}).items():
            if best is None or q["psnr"] > best[1]["psnr"]:
                best = (prefix + name, q)
    return best


def pool(per_client: dict) -> dict:
    """Pooled over clients: view-weighted means of every reconstruction score, mean re-id and
    membership figures, and the headline (the strongest attack)."""
    out = {}
    for group in ("reconstruction", "linked", "sampling"):
        names = {n for r in per_client.values() for n in r.get(group, {})}
        for n in sorted(names):
            rows = [r[group][n] for r in per_client.values() if n in r.get(group, {})]
            w = sum(q["n"] for q in rows)
            out.setdefault(group, {})[n] = {
                key: sum(q[key] * q["n"] for q in rows) / w for key in ("psnr", "ssim", "mse")} | {"n": w}
    for key in ("m10", "m100"):
        rows = [r["reid"][key] for r in per_client.values() if key in r.get("reid", {})]
        if rows:
            out.setdefault("reid", {})[key] = {f: sum(q[f] for q in rows) / len(rows)
                                               for f in rows[0] if isinstance(rows[0][f], (int, float))}
    for side in ("server", "client"):
        rows = [r["membership"][side] for r in per_client.values() if side in r.get("membership", {})]
        if rows:
            out.setdefault("membership", {})[side] = {f: sum(q[f] for q in rows) / len(rows) for f in ("auc", "tpr_at_1pct_fpr", "tpr_at_10pct_fpr", "balanced_accuracy")}
    best = strongest(out)
    if best is not None:
        out["headline"] = {"attack": best[0], "psnr": best[1]["psnr"], "ssim": best[1]["ssim"], "mse": best[1]["mse"]}
    return out


def summary_line(pooled: dict) -> str:
    """The run's disclosure headline, as printed at the end of a run."""
    h = pooled.get("headline")
    if not h:
        return "disclosure: nothing was sent to the server"
    text = f"disclosure: strongest attack {h['attack']} reconstructs x0 at {h['psnr']:.1f} dB PSNR (SSIM {h['ssim']:.2f})"
    r = pooled.get("reid", {}).get("m100")
    if r:
        top = max(r.get("top1", 0.0), r.get("top1_linked", 0.0))
        text += f"; re-identification among {r['candidates']:.0f}: {top:.0%} (chance {r['chance']:.0%})"
    m = pooled.get("membership", {}).get("server")
    if m and not math.isnan(m["auc"]):
        text += f"; membership AUC on the server model {m['auc']:.2f}"
    return text
