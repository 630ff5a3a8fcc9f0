"""The transport's contract: header fields, exact payloads, reuse, the bytes on the wire."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collafuse_mpi import comm as cm
from collafuse_mpi.loopback import LoopbackTransport
from conftest import mpi_env, mpirun_prefix


@pytest.mark.parametrize("dtype", cm.DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (1, 2, 3, 4, 5, 6)])
def test_header_round_trip(dtype, shape):
    t = torch.zeros(shape, dtype=dtype)
    h = cm.make_header(cm.CUT, 3, 11, t, meta=42)
    assert h.nbytes == cm.HEADER_BYTES == 96
    info = cm.parse_header(h)
    assert info == {"kind": cm.CUT, "client": 3, "step": 11, "dtype": dtype, "shape": shape, "meta": 42}


def test_header_refuses_more_dims_than_it_holds():
    with pytest.raises(ValueError, match="more than 6 dims"):
        cm.make_header(cm.TRAIN, 0, 0, torch.zeros((1,) * 7))


def test_stats_count_a_header_per_message():
    s = cm.Stats()
    s.add("sent", cm.TRAIN, 0, 1000)
    s.add("sent", cm.TRAIN, 0, 0)
    assert s.rows() == [("sent", "train_batch", 0, 1000 + 2 * cm.HEADER_BYTES, 2)]


def test_header_refuses_a_dtype_it_cannot_name():
    with pytest.raises(ValueError, match="complex64 cannot be sent"):
        cm.make_header(cm.TRAIN, 0, 0, torch.zeros(2, dtype=torch.complex64))


def test_landing_mismatch_names_what_does_not_fit():
    assert cm.landing_mismatch(torch.zeros(2, 3), torch.float32, (3, 2)) == ""  # same count, reshaped
    assert "does not fit" in cm.landing_mismatch(torch.zeros(2, 3), torch.float32, (2, 4))
    assert "does not fit" in cm.landing_mismatch(torch.zeros(2, 3), torch.float64, (2, 3))
    assert "contiguous=False" in cm.landing_mismatch(torch.zeros(3, 4)[:, :2], torch.float32, (3, 2))


def test_loopback_recv_into_lands_in_the_given_memory():
    server, client = LoopbackTransport.group(2)
    x = torch.arange(12.0).view(3, 4)
    client.isend(0, cm.TRAIN, 0, 0, x)
    client.isend(0, cm.TRAIN, 0, 1, x)
    buf = torch.zeros(5, 4)
    info, got = server.recv(1, cm.TRAIN, into=lambda info: buf[1:1 + info["shape"][0]])
    assert got.data_ptr() == buf[1].data_ptr() and torch.equal(buf[1:4], x) and info["step"] == 0
    with pytest.raises(ValueError, match="does not fit"):
        server.recv(1, cm.TRAIN, into=lambda info: buf[:2])


def test_poll_times_out_with_the_given_message():
    with pytest.raises(TimeoutError, match="peer 9 is silent"):
        cm.poll(lambda: False, timeout=0.05, on_timeout=lambda: "peer 9 is silent")


def test_two_ranks_exchange_exact_tensors():
    script = Path(__file__).with_name("comm_pair.py")
    p = subprocess.run(mpirun_prefix(2) + [sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env=mpi_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "all checks passed" in p.stdout


def test_loopback_collectives_have_the_deadline_too():
    a, _ = LoopbackTransport.group(2)
    a.timeout = 0.2
    with pytest.raises(TimeoutError, match=r"rank 0: not every rank arrived within 0.2 s in the final gather"):
        a.gather_obj(1, what="in the final gather")


def test_loopback_vote_gives_the_maximum_and_names_a_rank_that_never_votes():
    a, b, c = LoopbackTransport.group(3)
    first = [tp.vote(v) for tp, v in ((a, 0), (b, 1), (c, 0))]
    assert [v.result() for v in first] == [1, 1, 1]  # max over ranks, the same on every rank
    a.timeout = 0.2
    b.vote(0)  # rank 2 never starts this vote
    with pytest.raises(TimeoutError, match=r"rank 0: no answer from rank 2 within 0.2 s in a stop vote"):
        a.vote(0, what="in a stop vote").result()


def test_handle_wait_names_the_receiver_that_never_takes_the_send():
    class Never:
        def Testall(self, requests):
            return False
    h = cm.Handle([Never()], None, timeout=0.1, rank=1, dest=0, kind=cm.TRAIN)
    with pytest.raises(TimeoutError, match=r"rank 1: no answer from rank 0 within 0.1 s while sending it a train_batch"):
        h.wait()
