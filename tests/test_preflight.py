"""The memory estimate made before any rank trains: its form, and the refusal it gives."""
import pytest

from collafuse_mpi import config, preflight
from conftest import TINY, launch


def _cfg(size=16, batch=8):
    cfg = config.Config()
    cfg.data.image_size, cfg.train.batch_size = size, batch
    return cfg


def test_estimate_is_weights_plus_activations_linear_in_batch_and_pixels():
    """need(b, s) = fixed + per_pixel * s^2 * b + images: doubling the side quadruples the part that
    grows with the batch, and that part is linear in the batch."""
    fixed = preflight.rank_bytes(_cfg(16, 8), 0, 0, False)
    act = preflight.rank_bytes(_cfg(16, 8), 8, 0, False) - fixed
    assert act > 0
    assert preflight.rank_bytes(_cfg(16, 16), 16, 0, False) - fixed == pytest.approx(2 * act, rel=1e-6)
    big_fixed = preflight.rank_bytes(_cfg(32, 8), 0, 0, False)
    assert preflight.rank_bytes(_cfg(32, 8), 8, 0, False) - big_fixed == pytest.approx(4 * act, rel=1e-6)
    # images held: float32 C*S*S each
    assert preflight.rank_bytes(_cfg(16, 8), 0, 10, False) - fixed == 10 * 16 * 16 * 4


def test_default_run_fits_and_a_huge_image_is_refused_with_the_estimate():
    assert preflight.memory_problem(_cfg(), 3, 3, 1797) == ""
    why = preflight.memory_problem(_cfg(4096, 32), 3, 3, 1797)
    assert "data.image_size 4096 with train.batch_size 32 needs about" in why and "GiB" in why
    assert "lower --image-size or --batch-size" in why


@pytest.mark.mpi
def test_huge_image_size_is_refused_before_training(tmp_path):
    p = launch(3, [*TINY, "--image-size", "4096", "-o", str(tmp_path / "r.h5")], timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("needs about") == 1 and "MemoryError" not in p.stderr
    assert not (tmp_path / "r.h5").exists()
