"""The projection's link model: step time and server load for N clients on one link, from
parameters measured on a run (see bench/projection.py for what each one is and how it is derived)."""
from __future__ import annotations

import math

CLIENTS = (64, 128, 256, 512, 1024)
BANDWIDTHS_GBIT = (10, 25, 100, 200, 400)
# One-way MPI small-message latency assumed per link (microseconds): TCP over 10/25 GbE,
# RDMA (InfiniBand EDR/HDR/NDR or RoCE) at 100/200/400 Gbit/s. Override with --latency-us.
LATENCY_US = {10: 25.0, 25: 15.0, 100: 2.0, 200: 1.5, 400: 1.5}
HEADER_BYTES = 96  # comm.HEADER_LEN int64s, sent as its own message
SPEEDUPS = (1, 10, 100, 1000)


def latency_msgs(payload_bytes: float, eager_limit: int) -> int:
    """One-way latencies per client message on the server's path: none when the payload goes
    eagerly (it lands while the server computes), 2 for a rendezvous (the server's answer, then
    the data), which starts only when the server reaches its receive."""
    return 0 if payload_bytes <= eager_limit else 2


def _per_message(p: dict, bw_gbit: float, lat_us: float) -> tuple[float, float, bool]:
    """(wire seconds, latency seconds incl. a measured handshake, eager) per client message."""
    wire = p["message_bytes"] / (bw_gbit * 1e9 / 8)
    eager = p["latency_msgs"] == 0
    lat = 0.0 if eager else p["latency_msgs"] * lat_us * 1e-6 + p.get("handshake_s", 0.0)
    return wire, lat, eager


def project(p: dict, n: int, bw_gbit: float, lat_us: float) -> dict:
    """All model quantities for n clients on one link; p holds the derived parameters (seconds, bytes)."""
    wire_each, lat_each, eager = _per_message(p, bw_gbit, lat_us)
    wire = n * wire_each
    recv = n * p["host_s"] + (0.0 if eager else wire + n * lat_each)  # on the server's path
    compute = (p["a_s"] + p["b_s"] * n * p["batch"]) / p["server_speedup"]
    client = p["client_s"] / p["client_speedup"]
    server = recv + compute
    steps = {"serial": client + wire + n * (lat_each + p["host_s"]) + compute,
             "pipelined": max(client, server, wire), "overlapped": max(client, recv, compute, wire)}
    out = {"clients": n, "bandwidth_gbit": bw_gbit, "latency_us": lat_us, "fused_images": n * p["batch"],
           "bytes_in_per_step": n * p["message_bytes"], "eager": eager, "wire_s": wire,
           "latency_s": n * lat_each, "host_s": n * p["host_s"], "recv_s": recv, "compute_s": compute,
           "server_s": server, "client_s": client, "step_s": steps}
    out["server_utilisation"] = {k: compute / v for k, v in steps.items()}
    out["server_busy"] = {k: min(1.0, (server if k != "overlapped" else max(recv, compute)) / v)
                          for k, v in steps.items()}
    out["nic_utilisation"] = {k: wire / v for k, v in steps.items()}
    out["ingress_gbit_s"] = {k: n * p["message_bytes"] * 8 / v / 1e9 for k, v in steps.items()}
    if max(server, wire) <= client:
        out["bottleneck"] = "clients"
    elif wire > server:
        out["bottleneck"] = "server NIC"
    else:
        out["bottleneck"] = "server compute" if compute >= recv else "server receive"
    # server compute speed-up over the measured one for the pipelined step to equal the client step
    spare = client - recv
    out["server_speedup_needed"] = (compute * p["server_speedup"] / spare) if spare > 0 and wire <= client \
        else math.inf
    return out


def saturation(p: dict, bw_gbit: float, lat_us: float, server_speedup: float | None = None) -> dict:
    """Largest N for which the server keeps up with the clients (closed form, linear model)."""
    s = p["server_speedup"] if server_speedup is None else server_speedup
    client = p["client_s"] / p["client_speedup"]
    a, b = p["a_s"] / s, p["b_s"] * p["batch"] / s  # compute = a + b*N
    wire_each, lat_each, eager = _per_message(p, bw_gbit, lat_us)
    r = p["host_s"] + (0.0 if eager else wire_each + lat_each)  # recv = r*N
    wire_only = wire_each + lat_each

    def floor_n(x):
        return max(0, int(math.floor(x + 1e-9))) if math.isfinite(x) else None

    nic = floor_n(client / wire_each)  # the NIC carries N messages per client step
    pipelined = min(floor_n((client - a) / (b + r)), nic)
    compute_only = floor_n((client - a) / b)
    receive_only = floor_n(client / r) if r > 0 else None
    overlapped = min(v for v in (compute_only, receive_only, nic) if v is not None)
    return {"bandwidth_gbit": bw_gbit, "latency_us": lat_us, "server_speedup": s,
            "n_max_pipelined": pipelined, "n_max_overlapped": overlapped,
            "n_max_compute_only": compute_only, "n_max_receive_only": receive_only,
            "n_max_nic_only": floor_n(client / wire_only)}
