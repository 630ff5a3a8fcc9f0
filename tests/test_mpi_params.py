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
