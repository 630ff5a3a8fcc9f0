"""collafuse-compare, collafuse-export and the trends over seeds, on real (loopback) results files.

The contracts: B/A is the ratio of medians over steps (one run per side) or of means over seeds
(several), its CI comes from resampling, a regression fails the command only when it is beyond
the threshold, outside the CI and significant; the export's rows are exactly the file's numbers;
none of it imports torch.
"""
import copy
import csv
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from collafuse_mpi import compare, results, tables
from collafuse_mpi.harness import PHASES
from collafuse_mpi.plot import trends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
STEPS, WARMUP = 12, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from collafuse_mpi import config, run
    d = tmp_path_factory.mktemp("cmp")
    a = d / "a.h5"
    for i, seed in enumerate(SEEDS):
        cfg = config.Config()
        cfg.diffusion.cut, cfg.diffusion.timesteps, cfg.diffusion.sample_steps = 0.4, 10, 4
        cfg.train.steps, cfg.train.warmup_steps, cfg.train.batch_size = STEPS, WARMUP, 8
        cfg.sample.samples_per_client, cfg.data.max_images = 6, 60
        cfg.run.seed, cfg.run.run_name = seed, f"cut0.4-s{seed}"
        cfg.run.device, cfg.run.output, cfg.run.quiet, cfg.run.save_models = "cpu", str(a), True, False
        cfg.run.if_exists = "overwrite" if i == 0 else "append"
        cfg.privacy.attacks = "quick"
        run.run_loopback(cfg, 2)
    b = d / "b.h5"  # the same runs with the server's forward phase made 10x slower
    shutil.copy(a, b)
    fwd = PHASES.index("forward")
    with h5py.File(b, "a") as f:
        for g in f["runs"].values():
            ps = g["ranks"]["0"]["phase_seconds"]
            v = ps[()]
            added = 9 * v[:, fwd]
            v[:, fwd] *= 10
            ps[...] = v
            g["ranks"]["0"]["step_end"][...] = g["ranks"]["0"]["step_end"][()] + added
    return {"a": str(a), "b": str(b), "dir": d}


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_ratio_ci_and_test_math():
    a = np.arange(1.0, 31.0)
    row = compare.compare_samples(a, 2 * a, "steps")
    assert row["ratio"] == pytest.approx(2.0)  # ratio of medians: 31 / 15.5
    assert row["ci_low"] < 2.0 < row["ci_high"]
    assert row["p"] < 0.01
    same = compare.compare_samples(a, a[::-1].copy(), "steps")
    assert same["ratio"] == 1.0 and same["p"] > 0.5
    seeds = compare.compare_samples([1.0, 1.1, 0.9], [2.0, 2.2, 1.8], "seeds")  # means, Welch's t
    assert seeds["ratio"] == pytest.approx(2.0) and seeds["p"] < 0.01 and seeds["over"] == "seeds"
    one = compare.compare_samples([1.0], [3.0], "seeds")
    assert one["ratio"] == 3.0 and np.isnan(one["ci_low"]) and np.isnan(one["p"])  # no CI invented


def test_regression_needs_threshold_ci_and_significance():
    base = {"ratio": 1.2, "ci_low": 1.1, "ci_high": 1.3, "p": 0.001}
    assert compare.regressed(base, 0.05, 0.01)
    assert not compare.regressed(dict(base, ratio=1.04), 0.05, 0.01)      # within the threshold
    assert not compare.regressed(dict(base, ci_low=0.98), 0.05, 0.01)     # CI reaches 1
    assert not compare.regressed(dict(base, p=0.2), 0.05, 0.01)           # not significant
    assert compare.regressed(dict(base, ci_low=np.nan, p=np.nan), 0.05, 0.01)  # counted: ratio alone


def test_compare_cli_detects_the_slower_server(files, tmp_path):
    out = tmp_path / "rows.json"
    p = _run("collafuse_mpi.compare", files["a"], files["b"], "--fail-on", "phase:forward", "--json", str(out))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "regression: rank 0 phase:forward" in p.stderr
    rows = json.loads(out.read_text())
    fwd = [r for r in rows if r["rank"] == 0 and r["metric"] == "phase:forward"]
    assert len(fwd) == 1 and fwd[0]["over"] == "seeds" and fwd[0]["ratio"] == pytest.approx(10.0, rel=1e-6)
    client = [r for r in rows if r["rank"] == 1 and r["metric"] == "phase:forward"][0]
    assert client["ratio"] == 1.0  # untouched ranks compare equal
    assert {r["metric"] for r in rows} >= {"step", "cpu:forward", "flops", "kid"}
    # the same comparison passes when forward is not a metric that must hold, and A vs A passes all
    assert _run("collafuse_mpi.compare", files["a"], files["b"], "--fail-on", "cpu:forward").returncode == 0
    assert _run("collafuse_mpi.compare", files["a"], files["a"], "--fail-on", "all").returncode == 0


def test_compare_one_run_per_side_uses_steps(files):
    p = _run("collafuse_mpi.compare", files["a"], files["b"], "--run-a", "cut0.4-s0", "--run-b", "cut0.4-s0",
             "--fail-on", "phase:forward", "--threshold", "0.05")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("0 ") and " phase:forward " in ln][0]
    assert f"{STEPS - WARMUP}/{STEPS - WARMUP}" in line and "steps" in line  # samples = steps after warm-up
    assert p.returncode == 1 and "REGRESSED" in line, p.stdout
    bad = _run("collafuse_mpi.compare", files["a"], files["b"], "--run-a", "nope")
    assert bad.returncode == 2 and "has no run nope" in bad.stderr
    missing = _run("collafuse_mpi.compare", files["a"], str(files["dir"] / "none.h5"))
    assert missing.returncode == 2


def test_export_rows_are_the_files_numbers(files, tmp_path):
    p = _run("collafuse_mpi.export", files["a"], "-o", str(tmp_path / "csv"))
    assert p.returncode == 0, p.stderr
    res = results.read(files["a"])
    with open(tmp_path / "csv" / "phases.csv") as fh:
        rows = list(csv.DictReader(fh))
    n_ranks = 3
    assert len(rows) == len(SEEDS) * n_ranks * STEPS * len(PHASES)  # one row per run, rank, step, phase
    r = next(x for x in rows if x["run"] == "cut0.4-s1" and x["rank"] == "2" and x["step"] == "5"
             and x["phase"] == "backward")
    rank = res["runs"]["cut0.4-s1"]["ranks"][2]
    j = PHASES.index("backward")
    assert float(r["seconds"]) == rank["phase_seconds"][5, j]
    assert float(r["cpu_seconds"]) == rank["phase_cpu_seconds"][5, j]
    assert float(r["flops"]) == rank["phase_flops"][5, j] > 0
    with open(tmp_path / "csv" / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert sorted(int(x["seed"]) for x in runs) == list(SEEDS) and runs[0]["kid_features"] == "digits-classifier"
    p = _run("collafuse_mpi.export", files["a"], "-o", str(tmp_path / "js"), "--format", "json", "--tables", "metrics")
    recs = json.loads((tmp_path / "js" / "metrics.json").read_text())
    kid = [x for x in recs if x["run"] == "cut0.4-s0" and x["client"] == "client_1" and x["metric"] == "kid.mean"]
    assert kid[0]["value"] == res["runs"]["cut0.4-s0"]["metrics"]["client_1"]["kid"]["mean"]
    assert _run("collafuse_mpi.export", files["a"], "--tables", "bogus").returncode == 2


def test_export_reads_in_pandas(files, tmp_path):
    pd = pytest.importorskip("pandas")
    assert _run("collafuse_mpi.export", files["a"], "-o", str(tmp_path)).returncode == 0
    df = pd.read_csv(tmp_path / "phases.csv")
    assert set(df.columns) >= {"run", "rank", "step", "phase", "seconds", "cpu_seconds", "flops"}


def test_trends_mean_ci_and_compute_share(files):
    m, ci, n = trends.mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and ci == pytest.approx(4.303 * 1.0 / np.sqrt(3))
    assert np.isnan(trends.mean_ci([5.0])[1]) and trends.mean_ci([float("nan")])[2] == 0
    from collafuse_mpi.plot.runs import Ctx, load
    runs, problems = load([files["a"]])
    assert not problems
    run = runs[0]
    total = {r: sum(run.ranks[r]["windows"][w]["flops"] for w in ("train", "sample")) for r in run.ranks}
    share = trends.client_share(run, "flops")
    assert share == pytest.approx((total[1] + total[2]) / sum(total.values()))
    assert 0 < share < 1
    data, features = trends.trend_data(Ctx(runs))
    (cut, mean, half, k), = data[2]["flops share"]
    assert cut == 0.4 and k == len(SEEDS) and features == "digits-classifier"
    # runs with another cut-noise mode are their own series, never averaged with fresh ones
    other = copy.deepcopy(runs[0].d)
    cfg = json.loads(other["config"]) if isinstance(other["config"], str) else other["config"]
    cfg["privacy"]["cut_noise"] = "per_image"
    other["config"] = cfg
    mixed = [*runs[1:], type(run)(run.path, "per-image copy", other)]
    data, _ = trends.trend_data(Ctx(mixed))
    assert data[2]["flops share"][0][3] == len(SEEDS) - 1 and data[(2, "per_image")]["flops share"][0][3] == 1


def test_no_torch_in_compare_and_export(files, tmp_path):
    code = ("import sys\n"
            "from collafuse_mpi import compare, export, tables\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mpi4py', 'torchmetrics'))\n"
            "print('BAD', bad)\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "BAD []" in p.stdout, p.stdout + p.stderr
    assert tables.TABLES == ("runs", "steps", "phases", "windows", "metrics", "comm")
