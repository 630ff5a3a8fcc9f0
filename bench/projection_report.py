"""The projection's record as markdown: parameters, assumptions, headline, step-time matrices."""
from __future__ import annotations

import math
import os

import numpy as np

import common
from link_model import HEADER_BYTES, SPEEDUPS


def t_str(s: float) -> str:
    if not math.isfinite(s):
        return "inf"
    if s < 0:
        return "-" + t_str(-s)
    if s >= 10:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def n_str(v) -> str:
    return "none" if v is None else ("0 (< 1)" if v == 0 else f"{v:,}")


def x_str(v: float) -> str:
    return "∞ (recv > client step)" if not math.isfinite(v) else (f"{v:.2g}x" if v < 10 else f"{v:,.0f}x")


def assumptions(p: dict, source: str) -> list[str]:
    return [
        f"Compute times come from `{source}` measurements on the machine in the header "
        f"({p['compute_device']}). **CPU-measured compute is not GPU compute**: a GPU runs this UNet "
        "one to three orders of magnitude faster and is far from linear in batch size at small batches. "
        "Use `--server-speedup S` (and `--client-speedup`) for hardware you did not measure, or better, "
        "measure it: run the CLI on your cluster and pass `--results FILE.h5 ...`; every number here "
        "scales with what is measured.",
        f"Server compute is linear in the fused batch: a + b*n_images with a = {t_str(p['a_s'])}, "
        f"b = {t_str(p['b_s'])}/image (fit: {p['fit_kind']}" + (
            f"; its intercept {t_str(p['a_fit_s'])} is clamped to 0, the per-image cost grew with the batch"
            if p["a_fit_s"] < 0 else "") + f"), extrapolated from at most "
        f"{p['max_measured_images']} images to {max(p['clients']) * p['batch']:,}. Memory is not modelled: "
        "a fused batch that does not fit would have to be split (more steps, not fewer seconds).",
        f"Client step = {t_str(p['client_s'])} (its own step with no waiting), the same for every client, "
        "each client on its own hardware, so clients run fully in parallel and do not slow as N grows.",
        f"One server NIC receives every message, one after the other (incast, no switch limits beyond "
        f"that): per client and step {p['message_bytes']:,.0f} bytes (a {HEADER_BYTES}-byte header and the "
        f"payload, 2 MPI messages) and a host cost of {t_str(p['host_s'])} per message ({p['host_source']}). "
        "Bandwidth is the nominal link rate; MPI usually reaches 85-95% of it.",
        (f"The payload fits the {p['eager_limit']:,}-byte eager limit ({p['eager_source']}): it lands while "
         "the server computes, so latency is hidden and the NIC's wire time runs beside the compute; only "
         "the host cost is on the server's path." if p["latency_msgs"] == 0 else
         f"The payload exceeds the {p['eager_limit']:,}-byte eager limit ({p['eager_source']}): each message "
         "waits for the server's answer once the server reaches its receive, so every client costs the "
         f"server 2 latencies, its wire time and a handshake of {t_str(p['handshake_s'])} "
         "(--handshake-us; bench/link_probe.py measures it), one client after another."),
        "Latencies per link are typical one-way MPI latencies (" +
        ", ".join(f"{b:g} Gbit/s: {l:g} µs" for b, l in p["latency_table"].items()) +
        "); `--latency-us` overrides them.",
        "Pipelined (what the package does: clients keep up to train.max_in_flight batches in flight, the "
        "server receives all N then computes) is the headline. Overlapped assumes the server also takes "
        "in step s+1's messages while computing step s; for eager payloads the two differ only by the host "
        "cost. Serial is the no-overlap upper bound.",
        "Nothing else is modelled: no sampling, metrics or checkpoint phases, no stragglers or jitter, "
        "no contention between clients on shared switches, no GPU-direct or compression.",
    ]


def markdown(rec: dict) -> str:
    p, sat, proj = rec["parameters"], rec["saturation"], rec["projection"]
    clamped = f" (fit gave {t_str(p['a_fit_s'])}: clamped)" if p["a_fit_s"] < 0 else ""
    L = [f"# projection: step time and server load at {min(p['clients'])}-{max(p['clients'])} clients, on paper\n",
         f"Command: `{rec['command']}`\n", common.machine_md(rec["machine"]), ""]
    if rec["cli_commands"]:
        L += ["CLI runs (inputs):\n" + "\n".join(f"- `{c}` ({w:.0f} s)" for c, w in
                                                 zip(rec["cli_commands"], rec["cli_wall_s"])), ""]
    L += ["## Headline\n", *rec["headline"], ""]
    L += ["## Saturation point per bandwidth\n",
          f"Largest number of clients the server keeps up with (server receive + compute <= client step), "
          f"server speed-up {p['server_speedup']:g}x, client speed-up {p['client_speedup']:g}x:\n",
          common.table(["link", "latency", "N max, pipelined", "N max, overlapped", "compute alone",
                        "receive alone (incl. host cost)", "NIC alone (wire + latency)"],
                       [[f"{s['bandwidth_gbit']:g} Gbit/s", f"{s['latency_us']:g} µs", n_str(s["n_max_pipelined"]),
                         n_str(s["n_max_overlapped"]), n_str(s["n_max_compute_only"]),
                         n_str(s["n_max_receive_only"]), n_str(s["n_max_nic_only"])] for s in sat["main"]]), "",
          "The same (pipelined) for a server 1x, 10x, 100x, 1000x faster than measured "
          "(a GPU server against CPU-speed clients is in the 10-1000x range):\n",
          common.table(["link"] + [f"server {s:g}x" for s in SPEEDUPS],
                       [[f"{bw:g} Gbit/s"] + [n_str(row[str(s)]["n_max_pipelined"]) for s in SPEEDUPS]
                        for bw, row in sat["by_speedup"].items()]), ""]
    L += ["## Per client count and bandwidth\n",
          f"Server speed-up {p['server_speedup']:g}x, client speed-up {p['client_speedup']:g}x. "
          "recv = what the server's path pays for all N messages (host cost; with a rendezvous also wire "
          "and latency); server = recv + compute; "
          "util = server compute / step; NIC = wire time / step; 'needed' = how many times faster than measured "
          "the server's compute must be for the pipelined step to come down to the client step (∞: receiving "
          "alone already takes longer than a client step).\n",
          common.table(["clients", "link", "fused images", "MB in/step", "recv", "compute", "client",
                        "step pipelined", "step overlapped", "step serial", "server util (pipelined)",
                        "NIC util (pipelined)", "bottleneck", "needed"],
                       [[r["clients"], f"{r['bandwidth_gbit']:g} Gbit/s", f"{r['fused_images']:,}",
                         f"{r['bytes_in_per_step'] / 1e6:.1f}", t_str(r["recv_s"]), t_str(r["compute_s"]),
                         t_str(r["client_s"]), t_str(r["step_s"]["pipelined"]), t_str(r["step_s"]["overlapped"]),
                         t_str(r["step_s"]["serial"]), f"{r['server_utilisation']['pipelined'] * 100:.0f}%",
                         f"{r['nic_utilisation']['pipelined'] * 100:.2g}%", r["bottleneck"],
                         x_str(r["server_speedup_needed"])] for r in proj]), "",
          "Pipelined step time · server compute utilisation for other server speed-ups (client speed-up "
          f"{p['client_speedup']:g}x; * = the server is the bottleneck):\n"]
    for sp, rows in rec["projection_by_speedup"].items():
        L += [f"Server {float(sp):g}x faster than measured:\n", matrix(rows, p["bandwidths_gbit"]), ""]
    L += ["## Parameters derived from the measurements\n",
          common.table(["parameter", "value", "from"],
                       [["images per client batch B", p["batch"], "results config"],
                        ["model", f"{p['preset']} UNet, {p['channels']}x{p['image_size']}x{p['image_size']}",
                         "results config"],
                        ["server compute a (fixed per step)", t_str(p["a_s"]) + clamped, p["compute_source"]],
                        ["server compute b (per image)", t_str(p["b_s"]), p["compute_source"]],
                        ["client step", t_str(p["client_s"]), p["compute_source"]],
                        ["message per client per step", f"{p['message_bytes']:,.0f} bytes", p["message_source"]],
                        ["latencies per client per step", p["latency_msgs"],
                         f"eager limit {p['eager_limit']:,} B ({p['eager_source']})"],
                        ["rendezvous handshake beyond 2 latencies", t_str(p["handshake_s"]),
                         "--handshake-us" if p["handshake_s"] else "not measured (0)"],
                        ["host receive cost per message", t_str(p["host_s"]), p["host_source"]],
                        ["server / client speed-up applied",
                         f"{p['server_speedup']:g}x / {p['client_speedup']:g}x", "command line"]]),
          ""]
    if rec["runs"]:
        L += ["Per results run (medians over non-warm-up steps; server compute = step - wait - recv - io; "
              "client own step = step - wait - io):\n",
              common.table(["file:run", "clients", "ranks/host", "fused images", "server step", "server compute",
                            "fwd+bwd+opt", "server recv/client", "server wait", "client step", "client own step",
                            "client wait", "message bytes (measured / formula)"],
                           [[f"{os.path.basename(r['file'])}:{r['run']}", r["n_clients"], r["ranks_per_host_max"],
                             r["server"]["images_per_step"], t_str(r["server"]["step_s"]),
                             t_str(r["server"]["compute_s"]), t_str(r["server"]["forward_backward_optimizer_s"]),
                             t_str(r["server"]["recv_per_client_s"]), t_str(r["server"]["wait_s"]),
                             t_str(float(np.mean([c["step_s"] for c in r["clients"]]))),
                             t_str(r["client_own_step_s"]),
                             t_str(float(np.mean([c["wait_s"] for c in r["clients"]]))),
                             f"{r['message_bytes_measured'] or float('nan'):,.0f} / {r['message_bytes_formula']:,}"]
                            for r in rec["runs"]]), "",
              f"Fit over the runs: a = {t_str(rec['fit_runs']['a_s'])}, b = {t_str(rec['fit_runs']['b_s_per_image'])}"
              f"/image ({rec['fit_runs']['kind']}).", ""]
    if rec["direct"]:
        d = rec["direct"]
        L += [f"Direct single-process timing ({d['device']}, {d['threads']} torch thread(s), k = {d['k']}; "
              f"server model {d['server_params']:,} parameters, client {d['client_params']:,}):\n",
              common.table(["client batches", "fused images", "server step P50", "P90", "samples"],
                           [[n, v["images"], t_str(v["p50"]), t_str(v["p90"]), v["n"]]
                            for n, v in d["server"].items()]
                           + [["client step", d["client"]["images"], t_str(d["client"]["p50"]),
                               t_str(d["client"]["p90"]), d["client"]["n"]]]), "",
              f"Fit: a = {t_str(d['fit']['a_s'])}, b = {t_str(d['fit']['b_s_per_image'])}/image "
              f"({d['fit']['kind']}" + (f", R² = {d['fit']['r2']:.4f}" if d["fit"]["r2"] is not None else "")
              + ").", ""]
    if rec.get("contention_note"):
        L += [rec["contention_note"], ""]
    L += ["## Assumptions\n", *[f"- {a}" for a in rec["assumptions"]], ""]
    return "\n".join(L)


def headline(p, sat, proj, bws) -> list[str]:
    by = {(r["clients"], r["bandwidth_gbit"]): r for r in proj}
    lo, hi = min(bws), max(bws)
    s_lo = next(s for s in sat["main"] if s["bandwidth_gbit"] == lo)
    s_hi = next(s for s in sat["main"] if s["bandwidth_gbit"] == hi)
    few, many = min(p["clients"]), max(p["clients"])
    r_few, r_many, r_many_lo = by[(few, hi)], by[(many, hi)], by[(many, lo)]

    def binds(s):
        c, r = s["n_max_compute_only"], s["n_max_receive_only"]
        return "compute" if r is None or (c is not None and c <= r) else "receiving"

    def needed(r):
        if math.isfinite(r["server_speedup_needed"]):
            return f"the server's compute must be {x_str(r['server_speedup_needed'])} faster than measured"
        return (f"no server speed-up suffices (receiving alone, {t_str(r['recv_s'])}, exceeds the "
                f"{t_str(r['client_s'])} client step)")

    out = [
        f"- Measured ({p['compute_source']}): server compute {t_str(p['a_s'])} + {t_str(p['b_s'])} per image, "
        f"client step {t_str(p['client_s'])}, {p['message_bytes']:,.0f} bytes per client message per step, "
        f"host receive cost {t_str(p['host_s'])} per message.",
        f"- Server speed-up {p['server_speedup']:g}x, client speed-up {p['client_speedup']:g}x: the server keeps "
        f"up with at most {n_str(s_lo['n_max_pipelined'])} clients at {lo:g} Gbit/s ({binds(s_lo)} binds first) "
        f"and {n_str(s_hi['n_max_pipelined'])} at {hi:g} Gbit/s ({binds(s_hi)} binds first).",
        f"- Pipelined step at {hi:g} Gbit/s: {t_str(r_few['step_s']['pipelined'])} with {few} clients, "
        f"{t_str(r_many['step_s']['pipelined'])} with {many} (client step {t_str(r_many['client_s'])}); server "
        f"compute is {r_many['server_utilisation']['pipelined'] * 100:.0f}% of that step, receiving "
        f"{t_str(r_many['recv_s'])} ({t_str(r_many_lo['recv_s'])} at {lo:g} Gbit/s). For {many} clients not to "
        f"wait: at {hi:g} Gbit/s {needed(r_many)}; at {lo:g} Gbit/s {needed(r_many_lo)}.",
    ]
    nic = [(s["bandwidth_gbit"], s["n_max_receive_only"], s["n_max_nic_only"]) for s in sat["main"]]
    out.append("- Even an infinitely fast server stops keeping up once receiving alone exceeds a client step: at "
               + ", ".join(f"{n_str(r)} clients at {b:g} Gbit/s" for b, r, _ in nic)
               + f" (with the {t_str(p['host_s'])}/message host cost; wire + latency alone: "
               + ", ".join(f"{n_str(w)}" for _, _, w in nic) + ").")
    by_s = sat["by_speedup"]
    out.append("- Pipelined saturation point for a server 10x / 100x / 1000x faster than measured: "
               + "; ".join(f"{b:g} Gbit/s: "
                           + " / ".join(n_str(by_s[b][str(s)]["n_max_pipelined"]) for s in SPEEDUPS[1:])
                           for b in bws) + " clients.")
    return out


def matrix(rows: list[dict], bws) -> str:
    by = {(r["clients"], r["bandwidth_gbit"]): r for r in rows}
    ns = sorted({r["clients"] for r in rows})
    def cell(r):
        mark = "" if r["bottleneck"] == "clients" else " *"
        return f"{t_str(r['step_s']['pipelined'])} · {r['server_utilisation']['pipelined'] * 100:.0f}%{mark}"

    return common.table(["clients"] + [f"{b:g} Gbit/s" for b in bws],
                        [[n] + [cell(by[(n, b)]) for b in bws] for n in ns])
