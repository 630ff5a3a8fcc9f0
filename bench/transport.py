"""Ping-pong latency and streaming bandwidth of ways to move a float32 buffer between 2 ranks.

    mpirun -n 2 --bind-to core python bench/transport.py   # ~40 s; writes bench/results/transport.{json,md}
    mpirun -n 2 python bench/transport.py --quick          # fewer samples, for a smoke test
    for i in 1 2 3; do mpirun -n 2 --bind-to core python bench/transport.py --name transport-run$i; done

Pass 1, side by side (each sample runs the methods in a new random order):
  (a) transport  collafuse_mpi.comm.MPITransport.send/recv of a CPU float32 tensor, received with
                 into= a Landing (the caller's memory, named once), as the server receives training
                 batches into its fused batch. It sends from and receives into the same memory as (b).
  (b) raw        mpi4py Comm.Send/Recv of a numpy float32 buffer into a preallocated buffer (osu_*).
  (c) pickle     mpi4py Comm.send/recv of the same numpy array (pickled with MPI.pickle.PROTOCOL).
  (f) raw_two    the transport's protocol in bare mpi4py: a 96-byte header message matched by
                 Improbe, then the payload as its own message, in (b)'s memory, both sides polling
                 as the transport does (back to back, then yielding the core). (f)/(b) is what the
                 protocol costs; (a)/(f) is what the transport's Python work costs.
  (e) transport_kept  the transport with reuse=True: its own kept receive buffer and its own
                 source tensor. Other memory than (b)'s moved the same protocol by 10-40% here
                 (cache and page placement), which is why (a) shares (b)'s.
  With CUDA (torch.cuda.is_available()) also (d) transport of CUDA tensors, on the path the
  transport picks (cuda-aware when the MPI library says so, else host-staged through pinned memory).
Pass 2, diagnostics, side by side with each other only (fresh memory per message slows whatever
runs beside it on this machine, so they stay out of pass 1):
  (a') transport_fresh  as (a) with reuse=False: a new tensor per message.
  (b') raw_alloc        as (b) into a new torch.empty per message.

All buffers get the same page backing (--pages, default 4k): otherwise numpy and torch both ask
for transparent huge pages, which the kernel grants per buffer or not, and a method whose buffers
got them moves data faster whatever its protocol. The page backing found is recorded.

Two tests per size, warm-up samples discarded, a Barrier before each size and test, only rank 0
prints:
  latency    one round trip (rank 0 -> 1 -> 0) per sample; sample = elapsed / 2, the one-way time.
  bandwidth  a window of W messages (16 at <= 256 KiB down to 2 at >= 2 MiB) sent back to back by
             rank 0, rank 1 answers with a 4-byte ack after the last; sample = elapsed / W per
             message, bandwidth = bytes / that.
Targets (sizes >= 1 MiB): bandwidth(a) >= 0.95 * bandwidth(b) and >= 20 * bandwidth(c).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

import common  # also puts the repository on sys.path
from transport_report import KiB, MiB, report, summarise_runs

SIZES = [KiB * 4 ** i for i in range(8)]  # 1 KiB .. 16 MiB
TAG_RAW, TAG_PICKLE, TAG_ACK, TAG_TWO = 100, 101, 102, 104
TIGHT = 64  # polls back to back before yielding, as collafuse_mpi.comm.TIGHT_POLLS
_now = time.perf_counter


def memory(nbytes):
    """(source, receive) numpy float32 buffers of one size, shared by the methods that compare."""
    return np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32), np.empty(nbytes // 4, np.float32)


class Raw:
    name = "raw"

    def __init__(self, comm):
        self.comm = comm

    def make(self, nbytes, shared):
        x, self.buf = shared
        return x

    def send(self, dest, x):
        self.comm.Send(x, dest=dest, tag=TAG_RAW)

    def buffers(self, x):
        return [x.ctypes.data, self.buf.ctypes.data]

    def recv(self, source):
        self.comm.Recv(self.buf, source=source, tag=TAG_RAW)
        return self.buf


class RawTwo(Raw):
    """(f) header message, then payload message, in bare mpi4py: the floor of the protocol."""
    name = "raw_two"

    def __init__(self, comm):
        from mpi4py import MPI
        super().__init__(comm)
        self.testall = MPI.Request.Testall
        self.head, self.rhead = np.zeros(12, np.int64), np.zeros(12, np.int64)

    def send(self, dest, x):  # both sides wait as the transport does: back to back, then yielding
        reqs = [self.comm.Isend(self.head, dest, TAG_TWO), self.comm.Isend(x, dest, TAG_TWO + 1)]
        for _ in range(TIGHT):
            if self.testall(reqs):
                return
        while not self.testall(reqs):
            os.sched_yield()

    def recv(self, source):
        for _ in range(TIGHT):
            msg = self.comm.Improbe(source, TAG_TWO)
            if msg is not None:
                break
        while msg is None:
            os.sched_yield()
            msg = self.comm.Improbe(source, TAG_TWO)
        msg.Recv(self.rhead)
        self.comm.Recv(self.buf, source, TAG_TWO + 1)
        return self.buf


class RawAlloc(Raw):
    """(b') raw Send/Recv into a fresh torch.empty per message: what (a') pays for its allocation."""
    name = "raw_alloc"

    def buffers(self, x):
        return [x.ctypes.data]

    def recv(self, source):
        import torch
        buf = torch.empty(self.buf.shape, dtype=torch.float32)
        self.comm.Recv(buf.numpy(), source=source, tag=TAG_RAW)
        return buf.numpy()


class Pickle:
    name = "pickle"

    def __init__(self, comm):
        self.comm = comm

    def make(self, nbytes, shared):
        return shared[0]

    def send(self, dest, x):
        self.comm.send(x, dest=dest, tag=TAG_PICKLE)

    def buffers(self, x):
        return [x.ctypes.data]

    def recv(self, source):
        return self.comm.recv(source=source, tag=TAG_PICKLE)


class Transport:
    name = "transport"

    def __init__(self, comm, device="cpu", reuse=True, shared=True):
        import torch

        from collafuse_mpi import comm as cm
        self.torch, self.cm = torch, cm
        self.tp = cm.MPITransport(comm)  # collective (Split_type): every rank builds it
        self.device, self.reuse, self.shared = torch.device(device), reuse, shared
        self.into = None
        if not shared:
            self.name = "transport_kept" if reuse else "transport_fresh"
        if self.device.type == "cuda":
            self.name = f"transport-cuda ({self.tp.path(self.device)})"

    def make(self, nbytes, shared):
        if self.shared and self.device.type == "cpu":  # (b)'s memory, viewed as tensors
            land = self.cm.Landing(self.torch.from_numpy(shared[1]))  # as the server names its rows
            self.into = lambda info: land
            return self.torch.from_numpy(shared[0])
        g = self.torch.Generator().manual_seed(0)
        return self.torch.randn(nbytes // 4, generator=g).to(self.device)

    def send(self, dest, x):
        self.tp.send(dest, self.cm.TRAIN, 0, 0, x)

    def buffers(self, x):
        landing = [self.into(None).tensor.data_ptr()] if self.into else [kept[0].data_ptr() for kept in self.tp._pool.values()]
        return [x.data_ptr()] + landing

    def recv(self, source):
        return self.tp.recv(source, self.cm.TRAIN, self.device, reuse=self.reuse, into=self.into)[1]


def latency(comm, m, x, window):
    """One sample on rank 0: seconds per one-way message over `window` round trips."""
    rank = comm.Get_rank()
    t0 = _now()
    for _ in range(window):
        if rank == 0:
            m.send(1, x)
            m.recv(1)
        elif rank == 1:
            m.send(0, m.recv(0))
    return (_now() - t0) / (2 * window)


def bandwidth(comm, m, x, window, ack):
    """One sample on rank 0: seconds per message when `window` messages stream to rank 1."""
    rank = comm.Get_rank()
    t0 = _now()
    if rank == 0:
        for _ in range(window):
            m.send(1, x)
        comm.Recv(ack, source=1, tag=TAG_ACK)
    elif rank == 1:
        for _ in range(window):
            m.recv(0)
        comm.Send(ack, dest=0, tag=TAG_ACK)
    return (_now() - t0) / window


def plan(test: str, nbytes: int, quick: bool) -> tuple[int, int, int]:
    """(window, samples, warm-up samples) for a test and size.

    Latency samples are single round trips: on a machine shared with other jobs a preemption
    (milliseconds) averaged into a window of W messages shifts the P50 of the slower methods
    most, since their windows last longest; a single round trip is either hit or not.
    """
    if test == "latency":
        window = 1
        samples = 2000 if nbytes <= 64 * KiB else 500 if nbytes <= MiB else 100
    else:
        window = int(np.clip(4 * MiB // nbytes, 2, 16))
        samples = 400 if nbytes <= 64 * KiB else 200 if nbytes <= MiB else 60
    if quick:
        samples = max(8, samples // 10)
    return window, samples, max(2, samples // 10)


def run(comm, methods, sizes, quick=False):
    """Every (test, size, method) -> list of per-message seconds on rank 0 (warm-up dropped).

    Each sample runs every method once, in a new random order (the same seed on every rank), so a
    burst of load from other processes lands on every method alike, and no method always follows the
    same one: a method run right after another that used the same buffers finds them warm in cache
    (the fixed rotation used before, a b c, b c a, ..., mostly ran raw right after the transport).
    """
    ack = np.zeros(1, dtype=np.float32)
    out = {"latency": {}, "bandwidth": {}, "anon_huge_kib": {}}
    for nbytes in sizes:
        shared = memory(nbytes)
        payload = {m.name: m.make(nbytes, shared) for m in methods}
        for test in ("latency", "bandwidth"):
            window, samples, warmup = plan(test, nbytes, quick)
            comm.Barrier()
            got = {m.name: [] for m in methods}
            for m in methods:  # warm-up, discarded
                for _ in range(warmup):
                    _one(test, comm, m, payload[m.name], window, ack)
            order, rng = list(methods), random.Random(nbytes)
            for i in range(samples):
                rng.shuffle(order)
                for m in order:
                    got[m.name].append(_one(test, comm, m, payload[m.name], window, ack))
            for name, v in got.items():
                out[test].setdefault(name, {})[nbytes] = {"window": window, "seconds": v}
        if comm.Get_rank() == 0:  # the page backing each method's buffers had, as measured
            out["anon_huge_kib"][nbytes] = {m.name: [huge_kib(a) for a in m.buffers(payload[m.name])]
                                            for m in methods}
    return out


def _one(test, comm, m, x, window, ack):
    return latency(comm, m, x, window) if test == "latency" else bandwidth(comm, m, x, window, ack)


def python_overhead(n: int = 5000) -> dict:
    """Microseconds per call of the transport's per-message Python/torch work, no MPI (best of 5)."""
    import timeit

    import torch

    from collafuse_mpi import comm as cm
    x, dst = torch.randn(256), torch.empty(256)
    land = cm.Landing(dst)
    h = cm.make_header(cm.TRAIN, 0, 0, x)  # received by the stub below as the header bytes
    stats = cm.Stats()
    big = np.empty(4 * MiB, np.float32)

    class _Req:
        @staticmethod
        def Testall(requests):
            return True

    class _Msg:
        def Recv(self, buf):
            buf[:] = h.tobytes()

    class _NoComm:
        """Stands in for the communicator: MPI costs nothing, only the transport's own work remains."""

        def Isend(self, buf, dest, tag):
            return _Req()

        def Improbe(self, source, tag):
            return _Msg()

        def Recv(self, buf, source, tag):
            pass

    from mpi4py import MPI
    tp = cm.MPITransport(MPI.COMM_SELF)  # the real object, then its communicator swapped out
    tp.comm = _NoComm()
    calls = {
        "MPITransport.send, MPI stubbed out (1 KiB)": lambda: tp.send(1, cm.TRAIN, 0, 0, x),
        "MPITransport.recv, MPI stubbed out (1 KiB)": lambda: tp.recv(1, cm.TRAIN),
        "MPITransport.recv(reuse=True), MPI stubbed out (1 KiB)": lambda: tp.recv(1, cm.TRAIN, reuse=True),
        "MPITransport.recv(into=...), MPI stubbed out (1 KiB)": lambda: tp.recv(1, cm.TRAIN, into=lambda info: dst),
        "MPITransport.recv(into=Landing), MPI stubbed out (1 KiB)": lambda: tp.recv(1, cm.TRAIN, into=lambda info: land),
        "make_header": lambda: cm.make_header(cm.TRAIN, 0, 0, x),
        "parse_header": lambda: cm.parse_header(h),
        "MPITransport._buf (buffer from the data pointer)": lambda: tp._buf(x, 1024),
        "torch.empty (1 KiB)": lambda: torch.empty((256,), dtype=torch.float32, device=torch.device("cpu"),
                                                   pin_memory=False),
        "Stats.add": lambda: stats.add("sent", cm.TRAIN, 1, 1024),
        "torch.empty(16 MiB) + fill (fresh memory each time)": lambda: torch.empty(4 * MiB).fill_(1),
        "np.empty(16 MiB) + fill": lambda: np.empty(4 * MiB, np.float32).fill(1),
        "fill of a reused 16 MiB buffer": lambda: big.fill(1),
    }
    return {k: min(timeit.repeat(f, number=n if "16 MiB" not in k else 20, repeat=5)) / (n if "16 MiB" not in k else 20) * 1e6
            for k, f in calls.items()}


def set_pages(pages: str) -> None:
    """Give numpy's and torch's large buffers the same page backing. Both would otherwise ask for
    transparent huge pages, which the kernel grants or not per buffer, depending on free memory:
    a method whose buffers got them moves data up to 2x faster, whatever its protocol."""
    assert "torch" not in sys.modules, "must run before torch allocates"
    huge = pages == "huge"
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if huge else "0"
    np._core.multiarray._set_madvise_hugepage(huge)


def huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping that holds `address` (0 where smaps is unreadable)."""
    try:
        with open("/proc/self/smaps") as fh:
            inside = False
            for line in fh:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--summary":
        summarise_runs(sys.argv[2:])
        return 0
    from mpi4py import MPI
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 samples per size, for a smoke test")
    ap.add_argument("--max-bytes", type=int, default=16 * MiB)
    ap.add_argument("--pages", choices=["4k", "huge"], default="4k",
                    help="page backing of every method's buffers (default 4k): the same for all, so "
                         "the comparison is of the transports, not of whether the kernel found huge pages")
    ap.add_argument("--name", default="transport", help="results file name in bench/results (default transport)")
    ap.add_argument("--no-diagnostics", action="store_true",
                    help="skip the second pass (raw_alloc, transport_fresh: a fresh buffer per message)")
    args = ap.parse_args(argv)
    set_pages(args.pages)
    comm = MPI.COMM_WORLD.Dup()
    if comm.Get_size() != 2:
        if comm.Get_rank() == 0:
            print("transport.py needs exactly 2 ranks: mpirun -n 2 python bench/transport.py", file=sys.stderr)
        comm.Free()
        return 2
    import torch
    torch.set_num_threads(1)
    sizes = [s for s in SIZES if s <= args.max_bytes]
    methods = [Transport(comm), Raw(comm), Pickle(comm), RawTwo(comm), Transport(comm, shared=False)]
    diagnostics = [] if args.no_diagnostics else [RawAlloc(comm), Transport(comm, reuse=False, shared=False)]
    cuda_note = "skipped: torch.cuda.is_available() is False on this machine"
    if torch.cuda.is_available():
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        dev = f"cuda:{local.Get_rank() % torch.cuda.device_count()}"
        local.Free()
        methods.append(Transport(comm, dev))
        cuda_note = f"measured as (d) {methods[-1].name}"
    raw = run(comm, methods, sizes, args.quick)
    if diagnostics:  # a pass of their own: fresh memory per message slows whatever runs beside it
        more = run(comm, diagnostics, sizes, args.quick)
        for key, by in more.items():
            for k, v in by.items():
                raw[key].setdefault(k, {}).update(v) if key == "anon_huge_kib" else raw[key].update({k: v})
    if comm.Get_rank() == 0:
        report(comm, raw, sizes, methods + diagnostics, args.quick, cuda_note, args.pages, python_overhead(),
               args.name)
        comm.Ibarrier().Wait()
    else:  # sleep rather than spin in MPI while rank 0 times the transport's Python work
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.01)
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(common.run_or_abort(main))
