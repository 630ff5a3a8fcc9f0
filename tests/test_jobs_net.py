"""jobs/collafuse.sbatch's network knobs, run as a plain script with a stand-in mpirun that prints
what it was given (after the script's own --check of the run): CF_NET=tcp pins Open MPI to TCP between nodes on CF_NET_IF, CF_NET=ucx to UCX,
CF_HOSTFILE reaches mpirun, a bad CF_NET fails before anything is launched."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = """#!/bin/bash
echo "ARGS $*"
env | grep -E '^(OMPI_MCA|PRTE_MCA|UCX_)' | sort
"""


def _run(tmp_path, **env):
    fake = tmp_path / "fake-mpirun"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_MCA", "PRTE_MCA", "UCX_", "CF_"))}
    e.update(CF_MPIRUN=str(fake), CF_ENV="/dev/null", CF_NRANKS="3", CF_OUTDIR=str(tmp_path), **env)
    return subprocess.run(["bash", os.path.join(REPO, "jobs", "collafuse.sbatch")], capture_output=True,
                          text=True, env=e, cwd=tmp_path, timeout=60)


def test_tcp_on_one_network(tmp_path):
    p = _run(tmp_path, CF_NET="tcp", CF_NET_IF="10.1.0.0/16", CF_HOSTFILE="/h.txt")
    assert p.returncode == 0, p.stderr
    for line in ("OMPI_MCA_pml=ob1", "OMPI_MCA_btl=tcp,sm,self", "OMPI_MCA_btl_tcp_if_include=10.1.0.0/16",
                 "PRTE_MCA_oob_tcp_if_include=10.1.0.0/16"):
        assert line in p.stdout.splitlines()
    assert "--hostfile /h.txt" in p.stdout and "network: tcp on 10.1.0.0/16" in p.stdout


@pytest.mark.parametrize("net,lines,absent", [
    ("ucx", ["OMPI_MCA_pml=ucx", "UCX_NET_DEVICES=mlx5_0:1"], "OMPI_MCA_btl="),
    ("auto", [], "OMPI_MCA_"),
])
def test_fabric_or_the_mpis_choice(tmp_path, net, lines, absent):
    p = _run(tmp_path, CF_NET=net, CF_NET_IF="mlx5_0:1")
    assert p.returncode == 0, p.stderr
    for line in lines:
        assert line in p.stdout.splitlines()
    assert absent not in p.stdout and "--hostfile" not in p.stdout


def test_unknown_network_fails_before_launch(tmp_path):
    p = _run(tmp_path, CF_NET="infiniband")
    assert p.returncode == 2 and "CF_NET must be auto, tcp or ucx" in p.stderr and "ARGS" not in p.stdout
