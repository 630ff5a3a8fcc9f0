"""The TCP eager limit a run sets for itself: large enough for its largest message, never above
the cap, never over a limit the launch environment chose, and nothing for messages Open MPI sends
eagerly already (<= 64 KiB). The message size is what the transport sends: a 96-byte header and
the float32 rows pack_train builds (x_t, eps, t per image) or the sampling tensor."""
import torch

from collafuse_mpi import comm, mpi_params
from collafuse_mpi.config import Config
from collafuse_mpi.training import pack_train

VAR = mpi_params.EAGER_VAR


def cfg_with(batch=32, size=16, channels=1, samples=16, eager=True):
    c = Config()
    c.train.batch_size, c.data.image_size, c.data.channels = batch, size, channels
    c.sample.samples_per_client, c.run.tcp_eager = samples, eager
    return c


def test_message_bytes_is_what_pack_train_sends():
    c = cfg_with(batch=32, size=16, channels=3)
    x = torch.zeros(32, 3, 16, 16)
    payload = pack_train(x, x, torch.zeros(32, dtype=torch.long))
    assert mpi_params.message_bytes(c) == payload.nbytes + comm.HEADER_BYTES == 32 * (2 * 768 + 1) * 4 + 96


def test_sampling_message_counts_when_larger():
    c = cfg_with(batch=2, size=16, samples=64)  # 64 images of 256 floats beat 2 rows of 513
    assert mpi_params.message_bytes(c) == 64 * 256 * 4 + 96


def test_limit_rounds_up_to_pages_and_is_set():
    c = cfg_with()  # 32 * 513 * 4 + 96 = 65,760 bytes: 96 above 64 KiB + 128
    assert mpi_params.environment(c, {}) == {VAR: str(17 * 4096)}
    assert int(mpi_params.environment(c, {})[VAR]) >= mpi_params.message_bytes(c)


def test_small_messages_change_nothing():
    assert mpi_params.environment(cfg_with(batch=8), {}) == {}  # 16,512 bytes: eager already


def test_a_limit_from_the_environment_is_kept():
    assert mpi_params.environment(cfg_with(), {VAR: "65536"}) == {}


def test_off_changes_nothing():
    assert mpi_params.environment(cfg_with(eager=False), {}) == {}


def test_above_the_cap_the_default_stays():
    c = cfg_with(batch=64, size=128, channels=3)  # 64 * (2 * 49152 + 1) * 4 bytes: 24 MiB
    assert mpi_params.message_bytes(c) > mpi_params.EAGER_CAP
    assert mpi_params.environment(c, {}) == {}


def test_a_limit_set_after_mpi_started_is_neither_claimed_nor_recorded(tmp_path):
    """A wrapper that starts MPI (imports mpi4py.MPI) before the CLI: the variable would never be
    read, so the run says so and leaves it out of @transport_settings; launched plainly, it is set."""
    import subprocess
    import sys

    import pytest

    from collafuse_mpi import results
    from conftest import TINY, launch, mpi_env, mpirun_prefix

    pytest.importorskip("mpi4py")
    args = [*TINY, "--batch-size", "32", "--set", "privacy.attacks=none"]
    code = ("import sys; from mpi4py import MPI; from collafuse_mpi.run import cli; "
            "cli.main(args=sys.argv[1:])")
    late = tmp_path / "late.h5"
    p = subprocess.run(mpirun_prefix(2) + [sys.executable, "-c", code, *args, "-o", str(late)],
                       capture_output=True, text=True, timeout=240, env=mpi_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count(f"MPI started before the run could set {VAR}=69632; it is not in effect") == 1
    settings = next(iter(results.read(late)["runs"].values())).get("transport_settings", {})
    assert VAR not in settings
    plain = tmp_path / "plain.h5"
    q = launch(2, [*args, "-o", str(plain)])
    assert q.returncode == 0, q.stderr[-3000:]
    assert "not in effect" not in q.stderr
    assert next(iter(results.read(plain)["runs"].values()))["transport_settings"][VAR] == "69632"
