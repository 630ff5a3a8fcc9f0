"""Across hosts: runs over real TCP between emulated hosts (network namespaces, scripts/netns-cluster.sh).

Root only; skipped with the reason where namespaces cannot be made. One cluster of 3 hosts serves
the module (prefix cftest, so a developer's own cluster is left alone); `down` is tested last and
must leave nothing behind. Contract: rank r runs on host r+1; every train_batch message a client
sends crosses the wire as B*(2*C*H*W+1) float32 values plus a 96-byte header, so the bytes a client
sent and the server received per peer are steps * (B*(2*C*H*W+1)*4 + 96), and the x_k the server
sends each client for sampling is samples * C*H*W * 4 + 96 bytes; a host whose link goes
down is named by the server within run.recv_timeout, and the job ends.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from collafuse_mpi import results
from conftest import TINY

pytestmark = pytest.mark.mpi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "netns-cluster.sh")
ENV = dict(os.environ, CF_NETNS_PREFIX="cftest")
STEPS, SAMPLES, IMAGE, CHANNELS = 4, 4, 16, 1  # TINY's steps and samples; digits' size
BATCH = 32  # 65,760-byte training messages: above Open MPI's 64 KiB TCP eager limit unless run.tcp_eager raises it


def cluster(*args, timeout=120, check=True):
    p = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"netns-cluster.sh {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def _why_not() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None or shutil.which("unshare") is None:
        return "needs iproute2 (ip, tc) and unshare"
    if shutil.which("mpirun") is None:
        return "no mpirun on PATH (run the tests through scripts/test.sh)"
    p = subprocess.run(["ip", "netns", "add", "cftest-canmake"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create network namespaces here: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "cftest-canmake"], capture_output=True)
    return ""


@pytest.fixture(scope="module")
def hosts():
    why = _why_not()
    if why:
        pytest.skip(why)
    cluster("down", check=False)  # a cluster a killed test run left
    cluster("up", "3")
    yield 3
    cluster("down", check=False)


def run_cli(args, timeout=240, popen=False):
    cmd = ["bash", SCRIPT, "run", "-n", "3", "--map-by", "node", sys.executable, "-m", "collafuse_mpi.run", *args]
    env = dict(ENV, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_three_hosts_over_tcp(hosts, tmp_path):
    out = tmp_path / "r.h5"
    p = run_cli([*TINY, "--batch-size", str(BATCH), "-o", str(out)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = next(iter(results.read(out)["runs"].values()))
    assert run["hosts"] == ["cftestnode1", "cftestnode2", "cftestnode3"]
    assert run["transport_settings"]["OMPI_MCA_btl_tcp_if_include"] == "10.213.0.0/24"
    # the run raised the eager limit to hold its message (65,760 bytes -> 17 pages of 4 KiB)
    assert run["transport_settings"]["OMPI_MCA_btl_tcp_eager_limit"] == str(17 * 4096)
    cfg = run["config"]
    assert (cfg["data"]["image_size"], cfg["data"]["channels"]) == (IMAGE, CHANNELS)
    per_message = BATCH * (2 * CHANNELS * IMAGE * IMAGE + 1) * 4 + 96
    server = run["ranks"][0]["comm"]
    for r in (1, 2):
        sent = run["ranks"][r]["comm"]
        sel = (sent["direction"] == "sent") & (sent["kind"] == "train_batch")
        assert sent["messages"][sel].tolist() == [STEPS] and sent["bytes"][sel].tolist() == [STEPS * per_message]
        got = (server["direction"] == "recv") & (server["kind"] == "train_batch") & (server["peer"] == r)
        assert server["bytes"][got].tolist() == [STEPS * per_message]
        # sampling: the server sends each client its x_k, samples_per_client float32 images
        cut = (server["direction"] == "sent") & (server["kind"] == "cut_tensor") & (server["peer"] == r)
        assert server["bytes"][cut].tolist() == [SAMPLES * CHANNELS * IMAGE * IMAGE * 4 + 96]
    # the path MPI took: every peer on another node, over a TCP connection between the hosts' addresses
    peers = run["ranks"][0]["peers"]
    assert peers["peer"].tolist() == [1, 2] and peers["host"].tolist() == ["cftestnode2", "cftestnode3"]
    assert set(peers["locality"]) == {"other node"} and set(peers["transport"]) == {"tcp via eth0"}
    assert [a.split(":")[0] for a in peers["remote_address"]] == ["10.213.0.12", "10.213.0.13"]
    assert {a.split(":")[0] for a in peers["local_address"]} == {"10.213.0.11"}
    client = run["ranks"][2]["peers"]
    server_row = client["peer"].tolist().index(0)
    assert client["transport"][server_row] == "tcp via eth0"
    assert client["remote_address"][server_row].startswith("10.213.0.11:")


def test_shaped_link_has_the_rate_and_delay_asked_for(hosts):
    """tbf caps a TCP stream at the rate; the delay helper adds its delay to each direction, so a round
    trip takes at least twice the one-way delay (measured minimum over 20 UDP round trips)."""
    if shutil.which("iptables") is None:
        pytest.skip("link delay needs iptables (NFQUEUE); apt-get install iptables")
    probe = [sys.executable, os.path.join(REPO, "scripts", "netns_probe.py")]
    cluster("shape", "40mbit", "2000us", "2", "3")
    server = subprocess.Popen(["bash", SCRIPT, "exec", "3", *probe, "serve", "--seconds", "20"], env=ENV)
    try:
        time.sleep(1.0)
        ping = json.loads(cluster("exec", "2", *probe, "ping", "cftestnode3", "--count", "20").stdout)
        push = json.loads(cluster("exec", "2", *probe, "push", "cftestnode3", "--mbytes", "2").stdout)
    finally:
        server.kill()
        server.wait()
        cluster("shape", "none", "0", "2", "3")
    assert ping["rtt_min_us"] >= 4000  # 2 x 2000 us, plus the stack's own time
    assert ping["rtt_min_us"] < 40000
    assert 20 < push["mbit_s"] <= 40 * 1.05  # capped at the rate (tbf's 50 us burst aside)


def test_a_host_cut_off_is_named_within_the_receive_deadline(hosts, tmp_path):
    """Link of host 3 (rank 2) down mid-run: the server waits run.recv_timeout for rank 2's next
    batch, names it and aborts the job. Flushes are off: they are collectives, which have no
    deadline of their own here."""
    out = tmp_path / "r.h5"
    proc = run_cli([*TINY, "--steps", "100000", "--set", "run.flush_every=0", "--set", "run.recv_timeout=5",
                    "-o", str(out)], popen=True)
    cut = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                if results.read(out)["runs"]:
                    break  # rank 0 wrote the run's start: training begins right after
            except Exception:  # noqa: BLE001 -- not written yet, or mid-write
                pass
        time.sleep(3)  # a few steps under way
        assert proc.poll() is None, proc.stdout.read()
        subprocess.run(["ip", "-n", "cftest-h3", "link", "set", "eth0", "down"], check=True)
        cut = time.monotonic()
        text, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - cut
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "-n", "cftest-h3", "link", "set", "eth0", "up"])
    assert "no train_batch message from rank 2 within 5 s" in text, text[-3000:]
    assert proc.returncode != 0, text[-3000:]
    assert elapsed < 5 + 25, f"job ended {elapsed:.1f} s after the cut"
    run = next(iter(results.read(out)["runs"].values()))  # the file still opens
    # the rank that timed out records the failure in the group when it still can
    assert run["status"] in ("failed", "running") and run["world_size"] == 3


def test_down_leaves_nothing_behind(hosts):
    """Last in this module: down after a delay helper ran removes namespaces, /etc/netns files, the
    state folder, the helper process and (when up added it) the unreachable route."""
    if shutil.which("iptables") is None:
        pytest.skip("the delay helper needs iptables (NFQUEUE); apt-get install iptables")
    cluster("shape", "1gbit", "100us")
    pids = [int(open(f"/run/collafuse-netns-cftest/delay-{i}.pid").read()) for i in (1, 2, 3)]
    route_ours = os.path.exists("/run/collafuse-netns-route-10.213.0")
    cluster("down")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cftest-" not in names
    assert not os.path.isdir("/etc/netns") or not [n for n in os.listdir("/etc/netns") if n.startswith("cftest-")]
    assert not os.path.exists("/run/collafuse-netns-cftest")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "netns_delay" not in open(f"/proc/{pid}/cmdline").read()
    routes = subprocess.run(["ip", "route", "show", "type", "unreachable"], capture_output=True, text=True).stdout
    others = [d for d in os.listdir("/run") if d.startswith("collafuse-netns-") and os.path.isdir(f"/run/{d}")]
    if route_ours and not others:
        assert "10.213.0.0/24" not in routes
    up = cluster("up", "2")  # and a cluster comes up again cleanly after it
    cluster("down")
    assert "up: 2 hosts" in up.stderr
    assert not [n for n in os.listdir("/run/netns") if n.startswith("cftest-")] if os.path.isdir("/run/netns") else True
