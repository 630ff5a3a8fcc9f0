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

`loopback.LoopbackTransport` runs the same protocol between threads of one process, for tests.
"""
from __future__ import annotations

import ctypes
import math
import os
import struct
import time
from collections import defaultdict

import numpy as np
import torch

TRAIN, SAMPLE_REQUEST, CUT, STOP = 1, 2, 3, 4
KIND_NAMES = {TRAIN: "train_batch", SAMPLE_REQUEST: "sample_request", CUT: "cut_tensor", STOP: "stop"}
HEADER_LEN = 12  # kind, client, step, dtype, ndim, shape[0..5], meta
HEADER_BYTES = HEADER_LEN * 8
MAX_DIMS = 6
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]


_HEADER = struct.Struct(f"<{HEADER_LEN}q")
_DTYPE_INDEX = {d: i for i, d in enumerate(DTYPES)}
_LAYOUT = slice(24, 88)  # the header's dtype, ndim and shape: what decides where a payload can land


def header_bytes(kind: int, client: int, step: int, tensor: torch.Tensor, meta: int = 0) -> bytes:
    """The header as the 96 bytes that go on the wire (struct, not numpy: this runs per message)."""
    shape = tuple(tensor.shape)
    ndim = len(shape)
    if ndim > MAX_DIMS:
        raise ValueError(f"tensors of more than {MAX_DIMS} dims cannot be sent")
    dtype = _DTYPE_INDEX.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"tensors of dtype {tensor.dtype} cannot be sent (known: {DTYPES})")
    return _HEADER.pack(kind, client, step, dtype, ndim, *shape, *(0,) * (MAX_DIMS - ndim), meta)


def make_header(kind: int, client: int, step: int, tensor: torch.Tensor, meta: int = 0) -> np.ndarray:
    return np.frombuffer(header_bytes(kind, client, step, tensor, meta), dtype=np.int64)


def parse_header(h) -> dict:
    v = _HEADER.unpack_from(h)
    return {"kind": v[0], "client": v[1], "step": v[2], "dtype": DTYPES[v[3]],
            "shape": v[5:5 + v[4]], "meta": v[11]}


def _tags(kind: int) -> tuple[int, int]:
    """(header tag, payload tag) of a kind."""
    return 2 * kind, 2 * kind + 1


_CPU = torch.device("cpu")


def landing_mismatch(target: torch.Tensor, dtype: torch.dtype, shape: tuple) -> str:
    """Why `target` cannot take a payload of this dtype and shape ('' when it can)."""
    if target.dtype != dtype or target.numel() != math.prod(shape) or not target.is_contiguous():
        return (f"of {dtype} {tuple(shape)} does not fit the memory given for it "
                f"({target.dtype} {tuple(target.shape)}, contiguous={target.is_contiguous()})")
    return ""


class Landing:
    """Memory named once for payloads that keep landing there (the server's rows of its fused
    batch, step after step). The transport checks it against the first payload's header and keeps
    what it found (layout, MPI buffer), so later payloads of that layout land with no tensor query:
    after a training step those queries run with cold caches and cost several microseconds each.
    It holds its own alias of the memory, so moving a caller's tensor elsewhere (set_, resize_)
    does not move where payloads land."""

    __slots__ = ("tensor", "layout", "out", "buf", "nbytes", "cuda")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()  # a tensor object only the landing holds, on the same memory
        # Set by the transport once it checked the memory: the header bytes (dtype, ndim, shape) it
        # was checked for, the payload's view of it, its MPI buffer and size, whether it is on a GPU.
        self.layout, self.out, self.buf, self.nbytes, self.cuda = None, None, None, 0, False


class Stats:
    """Bytes and message counts per (direction, kind, peer); header bytes included. Kept by kind
    number (add runs per message), read by kind name."""

    def __init__(self):
        self._n = defaultdict(lambda: [0, 0])  # (direction, kind, peer) -> [bytes, count]

    def add(self, direction: str, kind: int, peer: int, nbytes: int):
        entry = self._n[(direction, kind, peer)]
        entry[0] += nbytes + HEADER_BYTES
        entry[1] += 1

    def _named(self, i: int) -> dict:
        return defaultdict(int, {(d, KIND_NAMES.get(k, str(k)), p): v[i] for (d, k, p), v in self._n.items()})

    @property
    def bytes(self) -> dict:
        return self._named(0)

    @property
    def count(self) -> dict:
        return self._named(1)

    def total(self, direction: str) -> int:
        return sum(v[0] for (d, _, _), v in self._n.items() if d == direction)

    def rows(self) -> list[tuple]:
        b, c = self.bytes, self.count
        return [(d, k, p, b[(d, k, p)], c[(d, k, p)]) for (d, k, p) in sorted(b)]


def record(folder: str, rank: int, source: int, info: dict, payload: torch.Tensor) -> None:
    """Testing hook (COLLAFUSE_RECORD_DIR): keep every received message, to audit what crossed."""
    os.makedirs(folder, exist_ok=True)
    name = f"recv-r{rank}-from{source}-{KIND_NAMES.get(info['kind'], info['kind'])}-s{info['step']}.npz"
    np.savez(os.path.join(folder, name), payload=payload.detach().cpu().numpy(), meta=info["meta"],
             client=info["client"], step=info["step"])


SPIN_S = 5e-4  # poll without sleeping this long first: the shortest sleep costs ~60 us on Linux
SPIN_BYTES_PER_S = 1e9  # a send keeps spinning while its bytes could still be moving at this rate
TIGHT_POLLS = 64  # polls back to back first (tens of us, no system call): a landing message is seen at once


def poll(ready, timeout=None, on_timeout=None, what="a message", spin=SPIN_S):
    """Wait until ready() is true, polling so that a dead peer is noticed. After a few polls back
    to back it spins (yielding the core) for `spin` seconds, long enough for a message in flight to land, then sleeps with backoff so an idle rank leaves its
    core to ranks that compute (oversubscribed CPU runs). A sleeping sender notices completion
    late, so for large messages the caller stretches `spin` with the message size. `on_timeout()`
    gives the error's text (built only then: this runs per message)."""
    for _ in range(TIGHT_POLLS):
        if ready():
            return
    start = time.monotonic()
    spin_until = start + spin
    deadline = None if timeout is None else start + timeout
    pause = 5e-5
    while not ready():
        now = time.monotonic()
        if now < spin_until:
            os.sched_yield()  # lets a rank that shares this core run (oversubscribed CPU runs)
            continue
        if deadline is not None and now > deadline:
            raise TimeoutError(on_timeout() if on_timeout else f"no {what} within {timeout:g} s")
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


class Handle:
    """A send in flight; keeps its buffers alive until it completes."""

    def __init__(self, requests, keep, nbytes=0):
        self.requests, self.keep = requests, keep
        self.spin = SPIN_S + nbytes / SPIN_BYTES_PER_S

    def wait(self):
        poll(self.test, what="a send in flight to complete", spin=self.spin)
        self.requests, self.keep = [], None

    def test(self) -> bool:
        return not self.requests or self.requests[0].Testall(self.requests)  # one call into MPI


class Vote:
    """A max-reduction in flight; its buffers live until it completes."""

    def __init__(self, request, buffers, timeout: float, rank: int):
        self.request, self.buffers, self.timeout, self.rank = request, buffers, timeout, rank

    def result(self) -> int:
        if self.request is not None:
            poll(self.request.Test, self.timeout,
                 lambda: f"rank {self.rank}: a stop vote did not complete within {self.timeout:g} s (a peer hung)",
                 "a stop vote")
            self.request = None
        return int(self.buffers[1][0])


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
        self.local_rank = local.Get_rank()
        local.Free()

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

    def isend(self, dest: int, kind: int, client: int, step: int, tensor: torch.Tensor, meta: int = 0) -> Handle:
        wire = self._wire(tensor)
        header = header_bytes(kind, client, step, wire, meta)
        nbytes = wire.nbytes
        reqs = [self.comm.Isend(header, dest, 2 * kind)]  # _tags(kind), inline: this runs per message
        if nbytes:
            reqs.append(self.comm.Isend(self._buf(wire, nbytes), dest, 2 * kind + 1))
        self.stats.add("sent", kind, dest, nbytes)
        return Handle(reqs, (header, wire), nbytes)

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
             f"rank {source}")

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

    def barrier(self):
        self.comm.Barrier()

    def bcast_obj(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def gather_obj(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def allreduce_max(self, value: float) -> float:
        return self.comm.allreduce(value, op=self.MPI.MAX)

    def vote(self, value: int) -> "Vote":
        """Start a max-reduction of one integer over all ranks (MPI_Iallreduce) and return at
        once; `Vote.result()` later gives the maximum. Every rank must start the same votes in
        the same order (they are collectives), so ranks start them at shared step edges."""
        mine = np.array([value], dtype=np.int64)
        out = np.zeros(1, dtype=np.int64)
        req = self.comm.Iallreduce(mine, out, op=self.MPI.MAX)
        return Vote(req, (mine, out), self.timeout, self.rank)

    def clock_offset(self, rounds: int = 8) -> float:
        """Offset to add to this rank's perf_counter to get rank 0's (ping-pong, min round trip)."""
        best, offset = float("inf"), 0.0
        buf = np.zeros(1, dtype=np.float64)
        for _ in range(rounds):
            for r in range(1, self.size):
                if self.rank == 0:
                    self.comm.Recv(buf, source=r, tag=90)
                    buf[0] = time.perf_counter()
                    self.comm.Send(buf, dest=r, tag=91)
                elif self.rank == r:
                    t0 = time.perf_counter()
                    self.comm.Send(buf, dest=0, tag=90)
                    self.comm.Recv(buf, source=0, tag=91)
                    t1 = time.perf_counter()
                    if t1 - t0 < best:
                        best, offset = t1 - t0, buf[0] - (t0 + t1) / 2
        return offset

    def library(self) -> str:
        return self.MPI.Get_library_version().replace("\0", "").strip().splitlines()[0]

    def abort(self, code: int = 1):
        self.comm.Abort(code)
