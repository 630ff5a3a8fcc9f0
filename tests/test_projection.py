"""bench/link_model.py, the projection's model. An eager payload lands while the server computes: the server's
path pays only the host cost per message, latency is hidden and the NIC's wire time runs beside
the compute. A rendezvous payload moves only once the server reaches its receive: each client
then costs it the wire time, 2 one-way latencies (answer, data), the measured handshake and the
host cost, one after another. The closed-form saturation point is the largest N whose pipelined
step project() gives as the client step."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import link_model  # noqa: E402

BW, LAT = 10.0, 50.0  # Gbit/s, us


def params(message_bytes=65760, eager_limit=69632, handshake_s=0.0):
    return {"a_s": 0.01, "b_s": 1e-4, "batch": 32, "client_s": 0.2, "host_s": 5e-5,
            "message_bytes": message_bytes, "handshake_s": handshake_s,
            "latency_msgs": link_model.latency_msgs(message_bytes - link_model.HEADER_BYTES, eager_limit),
            "server_speedup": 1.0, "client_speedup": 1.0}


def test_latencies_by_protocol():
    assert link_model.latency_msgs(65536, 65536) == 0
    assert link_model.latency_msgs(65537, 65536) == 2


def test_eager_server_pays_host_cost_only_and_latency_is_hidden():
    p, n = params(), 16
    r = link_model.project(p, n, BW, LAT)
    wire = n * p["message_bytes"] / (BW * 1e9 / 8)
    assert r["eager"] and r["recv_s"] == pytest.approx(n * p["host_s"])
    assert r["wire_s"] == pytest.approx(wire)
    compute = p["a_s"] + p["b_s"] * n * p["batch"]
    assert r["step_s"]["pipelined"] == pytest.approx(max(p["client_s"], compute + n * p["host_s"], wire))
    assert link_model.project(p, n, BW, 10 * LAT)["step_s"] == r["step_s"]  # latency changes nothing


def test_eager_nic_can_be_the_bottleneck():
    p = params()
    r = link_model.project(p, 64, 0.01, LAT)  # 10 Mbit/s: 64 messages take 3.4 s of wire
    assert r["bottleneck"] == "server NIC" and r["step_s"]["pipelined"] == pytest.approx(r["wire_s"])
    assert math.isinf(r["server_speedup_needed"])


def test_rendezvous_costs_wire_latency_handshake_and_host_per_client():
    p, n = params(eager_limit=65536, handshake_s=3e-3), 8
    r = link_model.project(p, n, BW, LAT)
    each = p["message_bytes"] / (BW * 1e9 / 8) + 2 * LAT * 1e-6 + 3e-3 + p["host_s"]
    assert not r["eager"] and r["recv_s"] == pytest.approx(n * each)
    assert r["server_s"] == pytest.approx(n * each + p["a_s"] + p["b_s"] * n * p["batch"])


@pytest.mark.parametrize("limit,handshake", [(69632, 0.0), (65536, 0.0), (65536, 3e-3)])
@pytest.mark.parametrize("bw", [0.05, 1.0, 100.0])
def test_saturation_is_where_the_step_leaves_the_client_step(limit, handshake, bw):
    p = params(eager_limit=limit, handshake_s=handshake)
    n_max = link_model.saturation(p, bw, LAT)["n_max_pipelined"]
    step = lambda n: link_model.project(p, n, bw, LAT)["step_s"]["pipelined"]  # noqa: E731
    assert n_max >= 1
    assert step(n_max) == pytest.approx(p["client_s"])
    assert step(n_max + 1) > p["client_s"] * (1 + 1e-9)
