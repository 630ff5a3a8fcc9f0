"""bench/gpu.sh must work the first time it meets a GPU machine: its smoke mode runs every
step tiny on the CPU, and the summary it writes counts what was trained."""
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import mpi_env, mpirun_prefix

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.mpi
@pytest.mark.slow
def test_gpu_script_smoke_runs_every_step_and_counts_the_images(tmp_path):
    mpirun_prefix(2)  # skips without an MPI runtime
    env = mpi_env()
    env.update(OUT=str(tmp_path), CF_GPU_SMOKE="1", PYTHON=sys.executable)
    p = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and "every step passed" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]
    with tarfile.open(tmp_path / "smoke-results.tar.gz") as t:
        names = t.getnames()
    assert "./smoke.h5" in names and "./smoke-transport.json" in names and "./smoke-precision-small.md" in names
    assert any(n.startswith("./figures/") and n.endswith(".png") for n in names)
    assert not any("-models" in n for n in names), "model weights stay out of the archive"
    assert not list((REPO / "bench" / "results").glob("smoke-*")), "a smoke run must not leave records"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in (tmp_path / "smoke-summary.md").read_text().splitlines() if line.startswith("| n")}
    assert set(rows) == {"n2-attribution", "n2-throughput", "n3-attribution", "n3-throughput"}
    # 2 clients x batch 4 x (6 steps - 3 warm-up); 3 clients x 4 x (4 - 3)
    assert rows["n2-attribution"][6] == str(2 * 4 * 3) and rows["n3-throughput"][6] == str(3 * 4 * 1)
    for cells in rows.values():  # no meter is "n/a", never a zero
        assert (cells[9] == "n/a") == (cells[5] == "unavailable"), cells
