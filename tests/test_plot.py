"""collafuse-plot: figures from a real (loopback) results file, error handling, no torch import."""
import copy
import glob
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from collafuse_mpi import plot, results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CUTS = (0.3, 1.0)  # 0.3: everything (messages, disclosure, server view); 1.0: purely local, server idle
STORE_REAL = {0.3: True, 1.0: False}  # held-out images in the file only on request: one run each way
FIGURE_STEMS = ("phases", "timeline", "energy", "kid-*", "disclosure", "bytes",
                "samples-cut0.3-n2", "samples-cut1-n2", "scaling", "trends")


def _gather_copies(self, obj, root=0, what=""):
    """LoopbackTransport.gather_obj, except that the root gets shallow copies, as MPI's pickled gather
    gives it. run.execute() pops each rank's "features" from its own dict right after the gather; over
    loopback the root would otherwise find them gone before it computes the pooled KID."""
    self._mail.slots[self.rank] = obj
    self.barrier()
    out = [copy.copy(self._mail.slots[r]) for r in range(self.size)] if self.rank == root else None
    self.barrier()
    return out


def _run_loopback(path):
    from collafuse_mpi import config, run
    from collafuse_mpi.loopback import LoopbackTransport
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoopbackTransport, "gather_obj", _gather_copies)
        _run_loopback_runs(path, config, run)


def _run_loopback_runs(path, config, run):
    for i, cut in enumerate(CUTS):
        cfg = config.Config()
        cfg.diffusion.cut = cut
        cfg.diffusion.timesteps = 10
        cfg.diffusion.sample_steps = 4
        cfg.train.steps = 5
        cfg.train.warmup_steps = 2
        cfg.train.batch_size = 8
        cfg.sample.samples_per_client = 4
        cfg.data.max_images = 60
        cfg.run.device = "cpu"
        cfg.run.output = str(path)
        cfg.run.if_exists = "overwrite" if i == 0 else "append"
        cfg.run.quiet = True
        cfg.run.save_models = False
        cfg.run.store_real = STORE_REAL[cut]
        cfg.privacy.attacks = "quick"  # the learned attacker's training is tested on its own
        run.run_loopback(cfg, 2)


def _fill_energy(path):
    """CI machines rarely have a readable energy meter: give every rank plausible NVML readings
    (100 W over each window) so the energy figure is drawn; the rest of the file stays real."""
    with h5py.File(path, "a") as f:
        for name, g in f["runs"].items():
            for r, rg in g["ranks"].items():
                rg.attrs["energy_source"] = "nvml-energy"
                rg.attrs["energy_device"] = f"gpu:GPU-{name}-{r}"
                rg.attrs["energy_owner"] = True
                for wg in rg["windows"].values():
                    wg.attrs["energy_j"] = 100.0 * (wg.attrs["end"] - wg.attrs["start"])
                rg["energy_j"][...] = 100.0 * (rg["step_end"][()] - rg["step_start"][()])


def _strip_energy_and_samples(path):
    with h5py.File(path, "a") as f:
        for g in f["runs"].values():
            for rg in g["ranks"].values():
                rg.attrs["energy_source"] = "unavailable"
                rg.attrs["energy_device"] = ""
                rg.attrs["energy_owner"] = False
                for wg in rg["windows"].values():
                    wg.attrs["energy_j"] = np.nan
                rg["energy_j"][...] = np.nan
            for c in list(g["samples"]):
                del g["samples"][c]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    real = d / "real.h5"
    _run_loopback(real)
    energy = d / "energy.h5"
    shutil.copy(real, energy)
    _fill_energy(energy)
    bare = d / "bare.h5"
    shutil.copy(real, bare)
    _strip_energy_and_samples(bare)
    plain = d / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    text = d / "notes.h5"
    text.write_text("not an HDF5 file\n")
    return {"real": str(real), "energy": str(energy), "bare": str(bare), "plain": str(plain), "text": str(text)}


def _cli(*args):
    return CliRunner().invoke(plot.cli, [str(a) for a in args], catch_exceptions=False)


def _check_png(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC, path
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100, (path, im.size)


def _check_pdf(path):
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.startswith(b"%PDF-"), path
    assert data.rstrip().endswith(b"%%EOF"), path
    assert len(data) > 1000, path


def test_fixture_is_a_real_results_file(files):
    data = results.read(files["real"])
    runs = data["runs"]
    assert sorted(r["cut"] for r in runs.values()) == list(CUTS)
    for r in runs.values():
        assert r["status"] == "complete"
        assert sorted(r["ranks"]) == [0, 1, 2]
        phases = r["phases"] if isinstance(r["phases"], list) else json.loads(r["phases"])
        assert phases[0] == "data"
        assert r["resumed_from_step"] == 0
        assert np.isfinite(r["metrics"]["pooled"]["kid"]["mean"])
        assert ("real" in r["samples"]["client_0"]) == STORE_REAL[r["cut"]]


def _ctx(*paths):
    runs, problems = plot.load(paths)
    assert not problems
    return plot.Ctx(runs)


def _by_cut(ctx):
    return {r.cut: r for r in ctx.runs}


def test_kid_data_pooled_beside_clients(files):
    data = results.read(files["real"])["runs"]
    sets, no_kid = plot.kid_data(_ctx(files["real"]))
    assert no_kid == [] and len(sets) == 1
    (features, dataset, _, _), d = next(iter(sets.items()))
    assert d["stem"] == f"kid-{features}" and dataset == "digits"
    assert len(d["clients"]) == 2 * len(CUTS) and d["no_pooled"] == []
    pooled = sorted(d["pooled"], key=lambda p: p["x"])
    assert [p["x"] for p in pooled] == list(CUTS)
    for p in pooled:
        stored = data[p["run"].name]["metrics"]["pooled"]["kid"]
        assert stored["features"] == features
        assert p["mean"] == stored["mean"] and p["std"] == stored["std"]
        assert p["n_fake"] == 2 * 4 and p["n_real"] == sum(
            data[p["run"].name]["metrics"][f"client_{i}"]["kid"]["n_real"] for i in range(2))
    # one line per configuration for the pooled values, beside the clients' mean line
    assert [(c, m) for c, m, _, _ in d["pooled_mean"][2]] == [(p["x"], p["mean"]) for p in pooled]
    assert [c for c, _, _, _ in d["mean"][2]] == list(CUTS)


def test_kid_figure_draws_pooled_stars(files, tmp_path):
    ctx = _ctx(files["real"])
    (stem, fig), = plot.fig_kid(ctx)
    ax = fig.axes[0]
    stars = [ln for ln in ax.lines if ln.get_marker() == "*" and len(ln.get_xdata())]
    assert len(stars) == 1
    sets, _ = plot.kid_data(ctx)
    pooled = sorted(next(iter(sets.values()))["pooled"], key=lambda p: p["x"])
    np.testing.assert_allclose(sorted(stars[0].get_ydata()), sorted(p["mean"] for p in pooled))
    assert any("pooled" in t.get_text() for t in ax.get_legend().get_texts())
    res = _cli(files["real"], "-o", tmp_path, "--only", "kid", "--format", "png")
    assert res.exit_code == 0, res.output
    (name,) = os.listdir(tmp_path)
    _check_png(tmp_path / name)


def test_kid_feature_sets_never_mixed(files, tmp_path):
    """A pooled KID on another feature set goes to that set's figure, never beside these clients."""
    mixed = tmp_path / "mixed.h5"
    shutil.copy(files["real"], mixed)
    with h5py.File(mixed, "a") as f:
        runs = sorted(f["runs"].values(), key=lambda g: g.attrs["cut"])
        runs[0]["metrics/pooled/kid"].attrs["features"] = "inception"
        del runs[1]["metrics/pooled"]
        client_set = runs[0]["metrics/client_0/kid"].attrs["features"]
    sets, _ = plot.kid_data(_ctx(str(mixed)))
    by_features = {key[0]: d for key, d in sets.items()}
    assert set(by_features) == {client_set, "inception"}
    assert by_features["inception"]["clients"] == [] and len(by_features["inception"]["pooled"]) == 1
    assert by_features[client_set]["pooled"] == [] and len(by_features[client_set]["no_pooled"]) == 2
    res = _cli(str(mixed), "-o", tmp_path / "figs", "--only", "kid", "--format", "png")
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path / "figs")) == sorted([f"kid-{client_set}.png", "kid-inception.png"])


def test_samples_real_row_only_when_stored(files, tmp_path):
    data = results.read(files["real"])["runs"]
    runs = _by_cut(_ctx(files["real"]))
    clients, kinds, cells = plot.sample_panels(runs[0.3])
    assert clients == [0, 1] and [k for k, _ in kinds] == ["real", "generated", "server_view"]
    for i in clients:
        stored = data[runs[0.3].name]["samples"][f"client_{i}"]["real"]
        assert stored.dtype == np.uint8 and stored.shape == (4, 1, 16, 16)
        np.testing.assert_array_equal(cells[(i, "real")], stored)
    clients, kinds, cells = plot.sample_panels(runs[1.0])
    assert [k for k, _ in kinds] == ["generated"]  # no real column, no server view at cut 1
    # real stored for one client only: the other's cell says so
    partial = tmp_path / "partial.h5"
    shutil.copy(files["real"], partial)
    with h5py.File(partial, "a") as f:
        del f["runs"][runs[0.3].name]["samples/client_1/real"]
    _, _, cells = plot.sample_panels(_by_cut(_ctx(str(partial)))[0.3])
    assert isinstance(cells[(0, "real")], np.ndarray) and cells[(1, "real")] == "not stored"
    res = _cli(files["real"], "-o", tmp_path / "figs", "--only", "samples", "--format", "png")
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path / "figs")) == ["samples-cut0.3-n2.png", "samples-cut1-n2.png"]
    for name in os.listdir(tmp_path / "figs"):
        _check_png(tmp_path / "figs" / name)


def test_every_figure_png_and_pdf(files, tmp_path):
    out = tmp_path / "figs"
    res = _cli(files["energy"], "-o", out, "--format", "png,pdf")
    assert res.exit_code == 0, res.output
    listed = [ln for ln in res.stdout.splitlines() if ln.strip()]
    for stem in FIGURE_STEMS:
        for ext, check in (("png", _check_png), ("pdf", _check_pdf)):
            found = glob.glob(str(out / f"{stem}.{ext}"))
            assert len(found) == 1, (stem, ext, sorted(os.listdir(out)))
            check(found[0])
            assert found[0] in listed
    assert len(listed) == len(os.listdir(out)) == 2 * len(FIGURE_STEMS)
    assert "not drawn" not in res.stderr


def test_only_and_format_select(files, tmp_path):
    res = _cli(files["real"], "-o", tmp_path, "--only", "kid,scaling", "--format", "png")
    assert res.exit_code == 0, res.output
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[1] == "scaling.png" and names[0].startswith("kid-")
    assert all(n.endswith(".png") for n in names)


def test_missing_energy_and_samples_other_figures_still_drawn(files, tmp_path):
    res = _cli(files["bare"], "-o", tmp_path, "--format", "png")
    assert res.exit_code == 0, res.output
    assert "energy: not drawn" in res.stderr and "energy_source" in res.stderr
    assert "samples: not drawn" in res.stderr and "samples/client_<i>/generated" in res.stderr
    names = set(os.listdir(tmp_path))
    for stem in ("phases", "timeline", "disclosure", "bytes", "scaling"):
        assert f"{stem}.png" in names
        _check_png(tmp_path / f"{stem}.png")
    assert any(n.startswith("kid-") for n in names)
    assert not any(n.startswith(("energy", "samples")) for n in names)


def test_nothing_drawable_exits_1(files, tmp_path):
    res = _cli(files["bare"], "-o", tmp_path, "--only", "energy,samples")
    assert res.exit_code == 1
    assert "energy: not drawn" in res.stderr and "samples: not drawn" in res.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind, message", [
    ("plain", "is not a collafuse_mpi results file"),
    ("text", "is not an HDF5 file"),
    ("missing", "no such file"),
])
def test_bad_input_clear_message_exit_2(files, tmp_path, kind, message):
    path = str(tmp_path / "absent.h5") if kind == "missing" else files[kind]
    out = tmp_path / "figs"
    res = _cli(path, "-o", out)
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and message in errors[0] and path in errors[0], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists()


def test_one_bad_file_among_good_ones_draws_nothing(files, tmp_path):
    res = _cli(files["real"], files["text"], "-o", tmp_path / "figs")
    assert res.exit_code == 2
    assert files["text"] in res.stderr and "nothing drawn" in res.stderr
    assert not (tmp_path / "figs").exists()


def test_usage_errors_exit_2(files, tmp_path):
    for args in (["--only", "phases,bogus"], ["--format", "jpg"], ["--timeline-steps", "5:2"]):
        res = _cli(files["real"], "-o", tmp_path, *args)
        assert res.exit_code == 2, args
        assert "Invalid value" in res.output


def test_timeline_window_outside_kept_events(files, tmp_path):
    res = _cli(files["real"], "-o", tmp_path, "--only", "timeline", "--timeline-steps", "1000:1002")
    assert res.exit_code == 1
    assert "timeline: not drawn" in res.stderr and "events are kept for steps" in res.stderr


def test_runs_without_torch_or_mpi4py(files, tmp_path):
    code = (
        "import sys\n"
        "from collafuse_mpi import plot\n"
        f"sys.argv = ['collafuse-plot', {files['energy']!r}, '-o', {str(tmp_path)!r}, '--format', 'png']\n"
        "try:\n"
        "    plot.main()\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mpi4py', 'torchmetrics'))\n"
        "import os\n"
        "print('RC', rc, 'BAD', bad, 'LOCK', os.environ.get('HDF5_USE_FILE_LOCKING'), file=sys.stderr)\n"
        "sys.exit(0 if rc == 0 and not bad else 3)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HDF5_USE_FILE_LOCKING", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "BAD []" in proc.stderr
    assert "LOCK FALSE" in proc.stderr  # reading never blocks a run that is still writing the file
    assert len(glob.glob(str(tmp_path / "*.png"))) == len(FIGURE_STEMS)


def test_disclosure_curves_carry_the_95_percent_interval_over_seeds():
    """Repeats of a cut (seeds) give the mean and the t-interval half-width t_{0.975, n-1} s / sqrt(n);
    a cut with one run has no interval (nan); c = 0's near-exact copy is drawn at 80 dB, no value at all."""
    from types import SimpleNamespace
    from collafuse_mpi.plot import privacy as pp
    runs = [SimpleNamespace(x_cut=0.2, v=v) for v in (20.0, 22.0, 24.0)] + [SimpleNamespace(x_cut=0.0, v=149.3),
                                                                           SimpleNamespace(x_cut=0.4, v=15.0),
                                                                           SimpleNamespace(x_cut=0.6, v=np.nan)]
    xs, ys, ci = pp._series(runs, lambda r: r.v)
    assert xs.tolist() == [0.0, 0.2, 0.4]  # a run without a value leaves its cut out
    assert ys[0] == 80.0 and ys[1] == pytest.approx(22.0) and ci[1] == pytest.approx(4.303 * 2.0 / np.sqrt(3))
    assert ys[2] == 15.0 and np.isnan(ci[2])
