"""Two ranks exercise MPITransport end to end; run by tests/test_comm.py under mpirun -n 2.

Rank 0 sends, rank 1 receives and checks; every failed check raises, so the job exits non-zero.
"""
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from collafuse_mpi import comm as cm

world = MPI.COMM_WORLD
rank = world.Get_rank()
tp = cm.MPITransport(world, timeout=2.0)
g = torch.Generator().manual_seed(0)

# (dtype, shape): every dtype the header knows, 0-d, empty, the largest rank, eager and rendezvous sizes
CASES = [(torch.float32, ()), (torch.float32, (0, 3)), (torch.float16, (5, 7)), (torch.bfloat16, (3, 4, 5)),
         (torch.float64, (2, 2)), (torch.int64, (9,)), (torch.int32, (1, 1, 1, 1, 1, 4)), (torch.uint8, (33,)),
         (torch.float32, (64, 3, 32, 32))]


def make(dtype, shape):
    x = torch.randn(shape, generator=g) * 100
    return x.to(dtype)


def nbytes(t):
    return t.numel() * t.element_size()


tensors = [make(d, s) for d, s in CASES]

# 1. every case arrives exactly, with its header fields, fresh and reused
if rank == 0:
    for reuse in (False, True):
        for i, t in enumerate(tensors):
            tp.send(1, cm.TRAIN, client=i, step=7, tensor=t, meta=-3)
else:
    for reuse in (False, True):
        for i, t in enumerate(tensors):
            info, got = tp.recv(0, cm.TRAIN, reuse=reuse)
            assert (info["client"], info["step"], info["meta"], info["kind"]) == (i, 7, -3, cm.TRAIN), info
            assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape), (got.dtype, got.shape, t.shape)
            assert torch.equal(got, t), f"case {i} differs"

# 2. reuse: same size lands in the same memory and overwrites the last payload
if rank == 0:
    a, b = torch.full((4096,), 1.0), torch.full((4096,), 2.0)
    tp.send(1, cm.CUT, 0, 0, a)
    tp.send(1, cm.CUT, 0, 1, b)
    tp.send(1, cm.CUT, 0, 2, torch.full((8, 512), 3.0))  # same bytes, other shape
else:
    _, first = tp.recv(0, cm.CUT, reuse=True)
    kept = first.clone()
    _, second = tp.recv(0, cm.CUT, reuse=True)
    assert second.data_ptr() == first.data_ptr(), "reuse=True must land in the kept buffer"
    assert torch.equal(kept, torch.full((4096,), 1.0)) and torch.equal(first, torch.full((4096,), 2.0))
    _, third = tp.recv(0, cm.CUT, reuse=True)
    assert tuple(third.shape) == (8, 512) and torch.equal(third, torch.full((8, 512), 3.0))

# 3. the wire: a header message of exactly HEADER_BYTES, then exactly the payload's bytes on the
#    kind's second tag; an empty tensor sends the header alone
big, empty = tensors[-1], tensors[1]
htag, ptag = 2 * cm.SAMPLE_REQUEST, 2 * cm.SAMPLE_REQUEST + 1
if rank == 0:
    tp.send(1, cm.SAMPLE_REQUEST, 1, 2, big, meta=5)
    tp.send(1, cm.SAMPLE_REQUEST, 1, 3, empty)
    tp.send(1, cm.SAMPLE_REQUEST, 1, 4, big)
else:
    st = MPI.Status()
    for step in (2, 3):
        world.Probe(source=0, tag=htag, status=st)
        assert st.Get_count(MPI.BYTE) == cm.HEADER_BYTES, st.Get_count(MPI.BYTE)
        head = np.empty(cm.HEADER_LEN, np.int64)
        world.Recv(head, source=0, tag=htag)
        info = cm.parse_header(head)
        t = big if step == 2 else empty
        assert info["step"] == step and info["shape"] == tuple(t.shape), info
        if step == 2:
            assert info["meta"] == 5
            world.Probe(source=0, tag=ptag, status=st)
            assert st.Get_count(MPI.BYTE) == nbytes(big)
            pay = np.empty(nbytes(big), np.uint8)
            world.Recv(pay, source=0, tag=ptag)
            assert np.array_equal(pay, big.reshape(-1).view(torch.uint8).numpy())
    # nothing of the empty tensor follows on the payload tag: the next payload is step 4's
    info, got = tp.recv(0, cm.SAMPLE_REQUEST)
    assert info["step"] == 4 and torch.equal(got, big)

# 4. counted bytes: payload plus one header per message
if rank == 1:  # (before part 5, which adds train batches)
    sent_to_me = sum(nbytes(t) for t in tensors) * 2 + 4096 * 4 * 2 + 8 * 512 * 4
    got = tp.stats.bytes[("recv", "train_batch", 0)] + tp.stats.bytes[("recv", "cut_tensor", 0)]
    assert got == sent_to_me + cm.HEADER_BYTES * (2 * len(tensors) + 3), (got, sent_to_me)

# 5. into: the payload lands in the caller's memory (rows of a bigger buffer) in the header's
#    shape; memory that does not fit is refused after the payload is taken off the wire, so the
#    next message still arrives whole
rows = torch.arange(6 * 5, dtype=torch.float32).view(6, 5)
if rank == 0:
    tp.send(1, cm.TRAIN, 0, 20, rows[:2].clone())
    tp.send(1, cm.TRAIN, 1, 21, rows[2:].clone())
    tp.send(1, cm.TRAIN, 2, 22, rows[:3].clone())  # 3 rows offered 2
    tp.send(1, cm.TRAIN, 3, 23, rows)
    tp.send(1, cm.TRAIN, 5, 25, torch.zeros(0, 5))  # an empty payload into empty memory
else:
    fused = torch.zeros(6, 5)
    _, a = tp.recv(0, cm.TRAIN, into=lambda info: fused[:info["shape"][0]])
    _, b = tp.recv(0, cm.TRAIN, into=lambda info: fused[2:2 + info["shape"][0]])
    assert a.data_ptr() == fused.data_ptr() and b.data_ptr() == fused[2].data_ptr()
    assert torch.equal(fused, rows), fused
    try:
        tp.recv(0, cm.TRAIN, into=lambda info: torch.zeros(2, 5))
    except ValueError as e:
        assert "does not fit" in str(e) and "rank 0" in str(e), e
    else:
        raise AssertionError("a payload larger than the memory given for it was accepted")
    try:
        tp.recv(0, cm.TRAIN, into=lambda info: torch.zeros(6, 5, dtype=torch.float64))
    except ValueError as e:
        assert "does not fit" in str(e), e
    else:
        raise AssertionError("a payload of another dtype was accepted")
    info, none = tp.recv(0, cm.TRAIN, into=lambda info: fused[:0])
    assert info["step"] == 25 and tuple(none.shape) == (0, 5), none.shape
    tp.send(0, cm.STOP, 0, 0, torch.zeros(0))
if rank == 0:  # the refused messages left nothing behind: the next one on the same tag is intact
    tp.recv(1, cm.STOP)
    tp.send(1, cm.TRAIN, 4, 24, rows * 2)
else:
    info, got = tp.recv(0, cm.TRAIN)
    assert info["step"] == 24 and torch.equal(got, rows * 2), info

# 5b. a Landing: checked on its first payload, then payloads of that layout land with no checks;
#     one that does not fit is still refused (and taken off the wire), and the memory stays the
#     landing's own even when the caller's tensor object is moved elsewhere
world.Barrier()
big = torch.arange(4 * 5, dtype=torch.float32).view(4, 5)
if rank == 0:
    for i in range(3):
        tp.send(1, cm.TRAIN, 0, 30 + i, big[:2] + i)  # lands three times in the same landing
    tp.send(1, cm.TRAIN, 0, 33, big[:3])  # a layout that does not fit it
    tp.send(1, cm.TRAIN, 0, 34, big[:2] * 5)  # fits again
    tp.send(1, cm.TRAIN, 0, 35, big[:2] * 7)  # after the caller's view was moved
    tp.send(1, cm.TRAIN, 0, 36, big.reshape(-1)[:10] * 9)  # another shape of the same element count
else:
    fused = torch.zeros(4, 5)
    view = fused[1:3]
    land = cm.Landing(view)
    assert land.layout is None
    for i in range(3):
        info, out = tp.recv(0, cm.TRAIN, into=lambda info: land)
        assert info["step"] == 30 + i and out.data_ptr() == view.data_ptr(), info
        assert torch.equal(fused[1:3], big[:2] + i) and torch.equal(out, big[:2] + i), fused
    assert land.layout == cm.header_bytes(cm.TRAIN, 0, 0, view)[24:88]
    try:
        tp.recv(0, cm.TRAIN, into=lambda info: land)
    except ValueError as e:
        assert "does not fit" in str(e), e
    else:
        raise AssertionError("a larger payload was accepted into a landing checked for a smaller one")
    assert torch.equal(fused[1:3], big[:2] + 2), "a refused payload wrote into the landing"
    info, out = tp.recv(0, cm.TRAIN, into=lambda info: land)
    assert info["step"] == 34 and torch.equal(fused[1:3], big[:2] * 5)
    moved = torch.zeros(2, 5)
    view.set_(moved)  # the caller's object now points elsewhere; the landing's memory does not move
    info, out = tp.recv(0, cm.TRAIN, into=lambda info: land)
    assert info["step"] == 35 and torch.equal(fused[1:3], big[:2] * 7) and not moved.any()
    info, out = tp.recv(0, cm.TRAIN, into=lambda info: land)  # (10,) into the (2, 5) rows: checked, lands
    assert info["step"] == 36 and tuple(out.shape) == (10,) and torch.equal(fused[1:3].reshape(-1), big.reshape(-1)[:10] * 9)
    assert land.layout == cm.header_bytes(cm.TRAIN, 0, 0, out)[24:88]

# 6. a peer that never sends is named after the timeout, not waited on forever
world.Barrier()
if rank == 1:
    try:
        tp.probe(0, cm.STOP)
    except TimeoutError as e:
        assert "rank 0" in str(e) and "run.recv_timeout" in str(e), e
    else:
        raise AssertionError("probe of a silent peer did not time out")
world.Barrier()

# 7. the collectives: exact objects (a large one too), and a peer that never joins is named by the
# deadline in the rank that waits for it (root of a gather, a receiver of a broadcast, a sender)
big_obj = {"r": rank, "x": np.arange(200_000) * (rank + 1)}  # 1.6 MB: rendezvous, not eager
got = tp.gather_obj(big_obj)
if rank == 0:
    assert [o["r"] for o in got] == [0, 1] and np.array_equal(got[1]["x"], np.arange(200_000) * 2), got
else:
    assert got is None
assert tp.bcast_obj({"word": "cut"} if rank == 0 else None) == {"word": "cut"}
tp.barrier()
world.Barrier()
try:
    if rank == 0:
        tp.gather_obj(1, what="in test gather A")  # rank 1 skips gather A
    else:
        tp.bcast_obj(None, what="in test broadcast B")  # rank 0 skips broadcast B
except TimeoutError as e:
    expect = "no answer from rank 1" if rank == 0 else "no answer from rank 0"
    assert expect in str(e) and ("test gather A" in str(e) or "test broadcast B" in str(e)), e
else:
    raise AssertionError("a collective with a missing peer did not time out")
world.Barrier()

# 8. the stop vote: each reads the maximum over all ranks, later than it starts (two in flight, read
# in order); a rank that never votes is named by the deadline in the rank that waits for it
v1 = tp.vote(rank)
v2 = tp.vote(5 if rank == 0 else 2)
assert (v1.result(), v2.result(), v1.result()) == (1, 5, 1)
world.Barrier()
try:
    if rank == 0:
        tp.vote(0, what="in test vote C").result()  # rank 1 never votes
    else:
        world.Barrier()
        tp.vote(1, what="in test vote D").result()  # rank 0 never reads it
except TimeoutError as e:
    expect = "no answer from rank 1" if rank == 0 else "no answer from rank 0"
    assert expect in str(e) and ("test vote C" in str(e) or "test vote D" in str(e)), e
else:
    raise AssertionError("a vote with a missing peer did not time out")
if rank == 0:
    world.Barrier()
    assert world.recv(source=1, tag=cm.VOTE_TAG) == 1  # rank 1's unread vote D: nothing left in flight
world.Barrier()

# 9. sync=True (the client's training batches): the send completes only once the receiver matched it,
# while a plain send of the same eager size completes unmatched; both land intact
small = torch.arange(16, dtype=torch.float32)  # 64 bytes: eager on every transport
if rank == 0:
    plain = tp.isend(1, cm.TRAIN, 0, 40, small)
    synced = tp.isend(1, cm.TRAIN, 0, 41, small, sync=True)
    t_end = time.monotonic() + 0.5  # rank 1 is in a Barrier meanwhile, not receiving TRAIN
    while time.monotonic() < t_end and not plain.test():
        time.sleep(0.001)
    time.sleep(0.05)
    assert plain.test(), "a plain eager send did not complete before its receive"
    assert not synced.test(), "a sync send completed before the receiver matched it"
    world.Barrier()
    synced.wait()
    assert synced.test()
else:
    world.Barrier()
    for step in (40, 41):
        info, got = tp.recv(0, cm.TRAIN)
        assert info["step"] == step and torch.equal(got, small), (info, got)
world.Barrier()
if rank == 1:
    print("all checks passed", flush=True)
sys.exit(0)
