"""Transport: the only module that talks MPI.

Every message is a fixed-size int64 header followed, when the tensor is not empty, by one
contiguous payload as raw bytes (no pickling on the hot path), on the kind's second tag; MPI keeps
per-tag order. The receiver matches the header with a matched probe, so no other receive can take
it, and lands the payload in a fresh buffer, a kept one, or memory the caller names from the header
(`into`: the server's fused batch, named once as a `Landing`). CUDA tensors go to MPI directly when
the library is CUDA-aware, else through pinned host buffers.

Why not one message, header and payload gathered by a derived datatype: it measured as fast as a
plain Send in isolation, but MPI cannot move a non-contiguous message by single copy, so a large
one advances only while its sender calls into MPI. A client that computes after its Isend then
stalls the server's receive for most of a step (bench/results/overlap.md).

The header, landings, byte counts and the polling wait are in wire.py (no MPI there); their
names are re-exported here. `loopback.LoopbackTransport` runs the same protocol between threads
of one process, for tests.
"""
from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import torch

from .wire import (  # noqa: F401  (the wire format is part of this module's API)
    TRAIN, SAMPLE_REQUEST, CUT, STOP, KIND_NAMES, HEADER_LEN, HEADER_BYTES, MAX_DIMS, DTYPES, _HEADER,
    _DTYPE_INDEX, _LAYOUT, header_bytes, make_header, parse_header, _tags, _CPU, landing_mismatch,
    Landing, Stats, record, SPIN_S, SPIN_BYTES_PER_S, TIGHT_POLLS, poll, late)

GATHER_TAG, BCAST_TAG, CLOCK_TAG, FAIL_TAG, SCATTER_TAG, VOTE_TAG = 100, 101, 90, 102, 103, 104  # beside the kinds' (2..9)
FAIL_GRACE_S = 5.0


class PeerFailed(RuntimeError):
    """Another rank reported that it fails (rank 0 learns it while it waits)."""

    def __init__(self, rank: int, text: str):
        super().__init__(f"rank {rank} failed: {text}")
        self.rank, self.text = rank, text


class Handle:
    """A send in flight; keeps its buffers alive until it completes. Its wait has the receive
    deadline: a receiver that stopped (SIGSTOP, a hung node) never completes a large send."""

    def __init__(self, requests, keep, nbytes=0, timeout=None, rank=-1, dest=-1, kind=0, watch=None):
        self.requests, self.keep, self.watch = requests, keep, watch
        self.spin = SPIN_S + nbytes / SPIN_BYTES_PER_S
        self.timeout, self.rank, self.dest, self.kind = timeout, rank, dest, kind

    def _late(self) -> str:
        return late(self.rank, [self.dest], f"while sending it a {KIND_NAMES.get(self.kind, self.kind)} message",
                    self.timeout)

    def wait(self):
        poll(self.test, self.timeout, self._late, "a send in flight to complete", self.spin, self.watch)
        self.requests, self.keep = [], None

    def test(self) -> bool:
        return not self.requests or self.requests[0].Testall(self.requests)  # one call into MPI


class Vote:
    """A max-vote in flight, through rank 0 on point-to-point messages: each rank's value goes to
    rank 0, which sends the maximum back. Every wait has the receive deadline and its message
    names the rank that did not vote (a stopped peer would hang an MPI_Iallreduce forever)."""

    def __init__(self, tp, value: int, what: str):
        self.tp, self.value, self.what, self.out = tp, int(value), what, None
        if tp.rank != 0:
            self.sent = tp.comm.isend(self.value, dest=0, tag=VOTE_TAG)

    def _take(self, peers, tag, box) -> None:
        tp = self.tp

        def arrived():
            for peer in sorted(peers):
                msg = tp.comm.improbe(source=peer, tag=tag)
                if msg is not None:
                    box.append(msg.recv())
                    peers.discard(peer)
            return not peers
        poll(arrived, tp.timeout, lambda: late(tp.rank, peers, self.what, tp.timeout), self.what, watch=tp.watch)

    def result(self) -> int:
        if self.out is None:
            tp, box = self.tp, [self.value]
            if tp.rank == 0:
                self._take(set(range(1, tp.size)), VOTE_TAG, box)
                tp._wait_all({r: tp.comm.isend(max(box), dest=r, tag=VOTE_TAG + 1) for r in range(1, tp.size)},
                             self.what)
            else:
                tp._wait_all({0: self.sent}, self.what)
                box.clear()
                self._take({0}, VOTE_TAG + 1, box)
            self.out = int(max(box))
        return self.out


def cuda_aware_mpi() -> bool:
    """Ask the MPI library, through ctypes, whether it takes CUDA device pointers."""
    for lib in _mpi_libraries():
        for name, args in (("MPIX_Query_cuda_support", ()), ("MPIX_GPU_query_support", (0,))):
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            try:
                if args:  # MPICH: int MPIX_GPU_query_support(int gpu_type, int *is_supported)
                    out = ctypes.c_int(0)
                    fn(ctypes.c_int(args[0]), ctypes.byref(out))
                    return bool(out.value)
                fn.restype = ctypes.c_int
                return bool(fn())
            except Exception:
                continue
    return False


def _mpi_libraries():
    """The process itself, then every libmpi* shared object the loader mapped for mpi4py."""
    libs = []
    try:
        libs.append(ctypes.CDLL(None))
    except OSError:
        pass
    try:
        with open("/proc/self/maps") as fh:
            paths = {ln.split()[-1] for ln in fh if "/libmpi" in ln and ".so" in ln}
    except OSError:
        paths = set()
    for p in sorted(paths):
        try:
            libs.append(ctypes.CDLL(p))
        except OSError:
            pass
    return libs


class MPITransport:
    """Point-to-point tensors over an mpi4py communicator."""

    def __init__(self, comm=None, cuda_aware: str = "auto", timeout: float = 600.0):
        import mpi4py
        from mpi4py import MPI
        self.mpi4py_version = mpi4py.__version__
        self.timeout = timeout
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        detected = cuda_aware_mpi()
        self.cuda_aware_detected = detected
        self.cuda_aware = detected if cuda_aware == "auto" else cuda_aware == "yes"
        self.record_dir = os.environ.get("COLLAFUSE_RECORD_DIR", "")
        self.stats = Stats()
        self._pool = {}  # (source, kind, direct) -> (tensor, shape, MPI buffer, bytes) kept for reuse
        self._matched = {}  # (source, kind) -> (Message, Status) that probe matched, for recv
        self._header = bytearray(HEADER_BYTES)
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        # world ranks that MPI places on this rank's node (shared memory reaches them)
        self.same_node = sorted(MPI.Group.Translate_ranks(local.Get_group(), list(range(local.Get_size())),
                                                          self.comm.Get_group()))
        local.Free()
        self.watch = self._peer_failure if self.rank == 0 else None  # rank 0 records who failed

    def report_failure(self, text: str, grace: float = FAIL_GRACE_S) -> None:
        """Tell rank 0 why this rank fails, so it can record it before the job ends; rank 0
        ends the job once it has (a rank 0 busy computing for longer than `grace` misses it)."""
        if self.rank == 0 or self.size < 2:
            return
        req = self.comm.isend(text[:4000], dest=0, tag=FAIL_TAG)
        end = time.monotonic() + grace
        while time.monotonic() < end:  # rank 0 aborts the job once it has written the record
            req.Test()
            time.sleep(0.05)

    def _peer_failure(self) -> None:
        status = self.MPI.Status()
        if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=FAIL_TAG, status=status):
            peer = status.Get_source()
            raise PeerFailed(peer, self.comm.recv(source=peer, tag=FAIL_TAG))

    def path(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "host"
        return "cuda-aware" if self.cuda_aware else "host-staged"

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """The bytes handed to MPI: the tensor itself, or a pinned host copy."""
        tensor = tensor.contiguous()
        if tensor.is_cuda:
            torch.cuda.current_stream(tensor.device).synchronize()  # the kernel that wrote it must finish
            if not self.cuda_aware:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor)
                return host
        return tensor

    def _buf(self, tensor: torch.Tensor, nbytes: int):
        """The tensor's bytes as an MPI buffer, without a copy."""
        if tensor.is_cuda:
            return tensor.reshape(-1).view(torch.uint8)  # mpi4py reads __cuda_array_interface__
        return self.MPI.buffer.fromaddress(tensor.data_ptr(), nbytes)

    def isend(self, dest: int, kind: int, client: int, step: int, tensor: torch.Tensor, meta: int = 0,
              sync: bool = False) -> Handle:
        """sync: the payload goes by Issend, so the handle completes only once the receiver has
        matched it, whatever protocol the size takes. An eager payload still leaves at once (Open
        MPI sends it inline and acknowledges it at the match); a plain eager send completes when
        buffered, which would let a sender run any distance ahead of its receiver."""
        wire = self._wire(tensor)
        header = header_bytes(kind, client, step, wire, meta)
        nbytes = wire.nbytes
        reqs = [self.comm.Isend(header, dest, 2 * kind)]  # _tags(kind), inline: this runs per message
        if nbytes:
            send = self.comm.Issend if sync else self.comm.Isend
            reqs.append(send(self._buf(wire, nbytes), dest, 2 * kind + 1))
        self.stats.add("sent", kind, dest, nbytes)
        return Handle(reqs, (header, wire), nbytes, self.timeout, self.rank, dest, kind, self.watch)

    def send(self, dest, kind, client, step, tensor, meta=0):
        self.isend(dest, kind, client, step, tensor, meta).wait()

    def probe(self, source: int, kind: int) -> None:
        """Block until a message of this kind from source is ready (time spent here is idle wait).

        Polls (see `poll`) instead of a blocking Probe: an idle rank soon leaves its core to ranks
        that compute (oversubscribed CPU runs), and a peer that stops answering is reported after
        `timeout` seconds instead of hanging the job. The header it matches waits for recv.
        """
        key = (source, kind)
        if key in self._matched:
            return
        tag = _tags(kind)[0]

        def arrived():
            msg = self.comm.Improbe(source=source, tag=tag)
            if msg is not None:  # matched: only this Message can receive it now
                self._matched[key] = msg
            return msg is not None

        poll(arrived, self.timeout,
             lambda: (f"rank {self.rank}: no {KIND_NAMES.get(kind, kind)} message from rank {source} within "
                      f"{self.timeout:g} s (peer hung or too slow; see --set run.recv_timeout)"),
             f"rank {source}", watch=self.watch)

    def _landing(self, slot, dtype, shape, device: torch.device, pinned: bool, reuse: bool):
        """(tensor, MPI buffer, bytes) where a payload lands: fresh, or with `reuse` the one kept for
        this (source, kind, path) while dtype and shape stay the same (they do, step after step).
        Reuse saves the allocation, the page faults of fresh memory and, per message, the buffer
        object and size that MPI needs."""
        if reuse:
            kept = self._pool.get(slot)
            if kept is not None and kept[0].dtype == dtype and kept[1] == shape:
                if kept[0].is_cuda:  # kernels queued on the last payload must finish before MPI overwrites it
                    torch.cuda.current_stream(kept[0].device).synchronize()
                return kept[0], kept[2], kept[3]
        out = torch.empty(shape, dtype=dtype, device=device, pin_memory=pinned)
        nbytes = out.nbytes
        buf = self._buf(out, nbytes) if nbytes else None
        if reuse:
            self._pool[slot] = (out, shape, buf, nbytes)
        return out, buf, nbytes

    def recv(self, source: int, kind: int, device: torch.device = _CPU, reuse: bool = False, into=None):
        """(header info, payload). With `reuse` the payload lives in a buffer that the next
        recv of the same kind from the same source overwrites: the caller must be done with it.
        `into(info)` gives the caller's own memory for the payload whose header is `info` (a
        contiguous tensor of its dtype and element count, e.g. rows of a fused batch), or a
        `Landing` of such memory that it names step after step: MPI writes there directly, and the
        payload comes back as that memory in the header's shape."""
        msg = self._matched.pop((source, kind), None)
        if msg is None:
            for _ in range(TIGHT_POLLS):  # arrived or about to: no polling loop
                msg = self.comm.Improbe(source, 2 * kind)
                if msg is not None:
                    break
            else:
                self.probe(source, kind)
                msg = self._matched.pop((source, kind))
        header = self._header
        msg.Recv(header)
        info = parse_header(header)
        target = land = None
        if into is not None:
            target = into(info)
            if type(target) is Landing:
                land, target = target, target.tensor
        if land is not None and land.layout == header[_LAYOUT]:  # checked for this layout already
            if land.cuda:  # kernels still reading the caller's memory must finish first
                torch.cuda.current_stream(target.device).synchronize()
            out, buf, nbytes, direct, bad = land.out, land.buf, land.nbytes, True, ""
        else:
            out, buf, nbytes, direct, bad = self._place(source, kind, device, reuse, target, land, info)
        if nbytes:
            self.comm.Recv(buf, source, 2 * kind + 1)
        self.stats.add("recv", kind, source, nbytes)
        if bad:
            raise ValueError(f"rank {self.rank}: {KIND_NAMES.get(kind, kind)} from rank {source} {bad}")
        if self.record_dir:
            record(self.record_dir, self.rank, source, info, out)
        if not direct:
            out = target.view(info["shape"]).copy_(out) if target is not None else out.to(device, non_blocking=False)
        return info, out

    def _place(self, source, kind, device, reuse, target, land, info):
        """(payload view, MPI buffer, bytes, direct, why the target does not fit) for a payload
        whose memory has not been checked yet; a Landing keeps what was found."""
        dtype, shape = info["dtype"], info["shape"]
        bad = ""
        if target is not None:
            bad = landing_mismatch(target, dtype, shape)
            cuda = target.is_cuda
            device = target.device if cuda else _CPU
        else:
            cuda = device.type == "cuda"
        direct = not cuda or self.cuda_aware
        if target is not None and direct and not bad:
            if cuda:  # kernels still reading the caller's memory must finish first
                torch.cuda.current_stream(target.device).synchronize()
            out = target if tuple(target.shape) == shape else target.view(shape)
            nbytes = target.nbytes
            buf = self._buf(target, nbytes) if nbytes else None
            if land is not None:
                land.out, land.buf, land.nbytes, land.cuda = out, buf, nbytes, cuda
                land.layout = bytes(self._header[_LAYOUT])
            return out, buf, nbytes, direct, bad
        # a bad target still takes the payload off the wire, so the stream stays in step
        out, buf, nbytes = self._landing((source, kind, direct), dtype, shape, device if direct else _CPU,
                                         not direct, reuse or target is not None)
        return out, buf, nbytes, direct, bad

    # Collectives, built on point-to-point messages so that every wait has the deadline and its
    # message names the ranks that did not answer (a blocking MPI collective waits forever on a
    # stopped peer). Objects are pickled: these run a few times per run, never per step.

    def _wait_all(self, requests: dict, what: str) -> None:
        """Wait for sends in flight {peer: request}; on the deadline name the peers still pending."""
        pending = dict(requests)

        def done():
            for peer in [p for p, req in pending.items() if req.Test()]:
                del pending[peer]
            return not pending
        poll(done, self.timeout, lambda: late(self.rank, pending, what, self.timeout), what, watch=self.watch)

    def gather_obj(self, obj, root=0, what="in a gather of every rank's results"):
        if self.rank != root:
            self._wait_all({root: self.comm.isend(obj, dest=root, tag=GATHER_TAG)}, what)
            return None
        out, pending = [None] * self.size, set(range(self.size)) - {root}
        out[root] = obj

        def arrived():
            for peer in sorted(pending):
                msg = self.comm.improbe(source=peer, tag=GATHER_TAG)
                if msg is not None:
                    out[peer] = msg.recv()
                    pending.discard(peer)
            return not pending
        poll(arrived, self.timeout, lambda: late(self.rank, pending, what, self.timeout), what, watch=self.watch)
        return out

    def bcast_obj(self, obj, root=0, what="in a broadcast from rank 0"):
        if self.rank == root:
            self._wait_all({r: self.comm.isend(obj, dest=r, tag=BCAST_TAG)
                            for r in range(self.size) if r != root}, what)
            return obj
        return self._from_root(root, BCAST_TAG, what, self.timeout)

    def _from_root(self, root: int, tag: int, what: str, timeout: float):
        """The object the root sent this rank with `tag`, within the deadline."""
        box = []

        def arrived():
            msg = self.comm.improbe(source=root, tag=tag)
            if msg is not None:
                box.append(msg.recv())
            return bool(box)
        poll(arrived, timeout, lambda: late(self.rank, [root], what, timeout), what, watch=self.watch)
        return box[0]

    def scatter_obj(self, objs, root=0, what="waiting for the attack results from rank 0", timeout=None):
        """objs[r] to rank r (objs is read on the root only); after the run, never on the hot path.
        timeout: the receivers' deadline when the root has long work before it (default: the usual)."""
        timeout = timeout or self.timeout
        if self.rank == root:
            self._wait_all({r: self.comm.isend(objs[r], dest=r, tag=SCATTER_TAG)
                            for r in range(self.size) if r != root}, what)
            return objs[root]
        return self._from_root(root, SCATTER_TAG, what, timeout)

    def barrier(self, what="at a barrier"):
        self.gather_obj(None, what=what)
        self.bcast_obj(None, what=what)

    def vote(self, value: int, what: str = "in a stop vote") -> "Vote":
        """Start a max-vote of one integer over all ranks and return at once; `Vote.result()`
        later gives the maximum. Every rank must start the same votes in the same order (they
        are collectives), so ranks start them at shared step edges."""
        return Vote(self, value, what)

    def clock_offset(self, rounds: int = 8) -> float:
        """Offset to add to this rank's perf_counter to get rank 0's (ping-pong, min round trip)."""
        best, offset = float("inf"), 0.0
        buf = np.zeros(1, dtype=np.float64)
        what = "while measuring clock offsets"

        def exchange(send: bool, peer: int, tag: int):
            req = self.comm.Isend(buf, peer, tag) if send else self.comm.Irecv(buf, peer, tag)
            self._wait_all({peer: req}, what)
        for _ in range(rounds):
            for r in range(1, self.size):
                if self.rank == 0:
                    exchange(False, r, CLOCK_TAG)
                    buf[0] = time.perf_counter()
                    exchange(True, r, CLOCK_TAG + 1)
                elif self.rank == r:
                    t0 = time.perf_counter()
                    exchange(True, 0, CLOCK_TAG)
                    exchange(False, 0, CLOCK_TAG + 1)
                    t1 = time.perf_counter()
                    if t1 - t0 < best:
                        best, offset = t1 - t0, buf[0] - (t0 + t1) / 2
        return offset

    def library(self) -> str:
        return self.MPI.Get_library_version().replace("\0", "").strip().splitlines()[0]

    def abort(self, code: int = 1):
        self.comm.Abort(code)
