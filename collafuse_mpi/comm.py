"""Transport: the only module that talks MPI.

Every message is a fixed-size int64 header followed by one contiguous tensor payload, sent as
raw bytes with buffer-based Send/Isend/Recv (no pickling on the hot path). Header and payload
use different tags so a receiver can never take one for the other; MPI keeps per-tag order.
CUDA tensors go to MPI directly when the library is CUDA-aware, else through pinned host buffers.
`LoopbackTransport` runs the same protocol between threads of one process, for tests.
"""
from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections import defaultdict

import numpy as np
import torch

TRAIN, SAMPLE_REQUEST, CUT, STOP = 1, 2, 3, 4
KIND_NAMES = {TRAIN: "train_batch", SAMPLE_REQUEST: "sample_request", CUT: "cut_tensor", STOP: "stop"}
HEADER_LEN = 12  # kind, client, step, dtype, ndim, shape[0..5], meta
MAX_DIMS = 6
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]


def make_header(kind: int, client: int, step: int, tensor: torch.Tensor, meta: int = 0) -> np.ndarray:
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"tensors of more than {MAX_DIMS} dims cannot be sent")
    h = np.zeros(HEADER_LEN, dtype=np.int64)
    h[:5] = kind, client, step, DTYPES.index(tensor.dtype), tensor.dim()
    h[5:5 + tensor.dim()] = tensor.shape
    h[11] = meta
    return h


def parse_header(h: np.ndarray) -> dict:
    ndim = int(h[4])
    return {"kind": int(h[0]), "client": int(h[1]), "step": int(h[2]), "dtype": DTYPES[int(h[3])],
            "shape": tuple(int(v) for v in h[5:5 + ndim]), "meta": int(h[11])}


def _tags(kind: int) -> tuple[int, int]:
    return 2 * kind, 2 * kind + 1


class Stats:
    """Bytes and message counts per (direction, kind, peer); header bytes included."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.count = defaultdict(int)

    def add(self, direction: str, kind: int, peer: int, nbytes: int):
        key = (direction, KIND_NAMES.get(kind, str(kind)), peer)
        self.bytes[key] += nbytes + HEADER_LEN * 8
        self.count[key] += 1

    def total(self, direction: str) -> int:
        return sum(v for (d, _, _), v in self.bytes.items() if d == direction)

    def rows(self) -> list[tuple]:
        return [(d, k, p, self.bytes[(d, k, p)], self.count[(d, k, p)]) for (d, k, p) in sorted(self.bytes)]


def record(folder: str, rank: int, source: int, info: dict, payload: torch.Tensor) -> None:
    """Testing hook (COLLAFUSE_RECORD_DIR): keep every received message, to audit what crossed."""
    os.makedirs(folder, exist_ok=True)
    name = f"recv-r{rank}-from{source}-{KIND_NAMES.get(info['kind'], info['kind'])}-s{info['step']}.npz"
    np.savez(os.path.join(folder, name), payload=payload.detach().cpu().numpy(), meta=info["meta"],
             client=info["client"], step=info["step"])


INTERRUPT_GRACE_S = 1.0
_interrupt_seen = {}


def _given_up(event) -> bool:
    """True once `event` has been set for a grace period: a wait that a live peer is about to
    satisfy still completes, so that rank reaches its step edge and saves its state."""
    if event is None or not event.is_set():
        return False
    first = _interrupt_seen.setdefault(id(event), time.monotonic())
    return time.monotonic() - first > INTERRUPT_GRACE_S


class Handle:
    """A send in flight; keeps its buffers alive until it completes."""

    def __init__(self, requests, keep, interrupt=None):
        self.requests, self.keep, self.interrupt = requests, keep, interrupt

    def wait(self):
        pause = 1e-5
        while not all(r.Test() for r in self.requests):  # polled, so a preempted rank can stop
            if _given_up(self.interrupt):
                raise InterruptedError("interrupted while a send was in flight")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        self.requests, self.keep = [], None

    def test(self) -> bool:
        return all(r.Test() for r in self.requests)


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
        self.interrupt = None  # an Event: when set, blocked waits give up (preemption)
        self.stats = Stats()
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

    @staticmethod
    def _buf(tensor: torch.Tensor):
        flat = tensor.reshape(-1).view(torch.uint8)
        return flat if flat.is_cuda else flat.numpy()

    def isend(self, dest: int, kind: int, client: int, step: int, tensor: torch.Tensor, meta: int = 0) -> Handle:
        header = make_header(kind, client, step, tensor, meta)
        wire = self._wire(tensor)
        htag, ptag = _tags(kind)
        reqs = [self.comm.Isend(header, dest=dest, tag=htag),
                self.comm.Isend(self._buf(wire), dest=dest, tag=ptag)]
        self.stats.add("sent", kind, dest, wire.numel() * wire.element_size())
        return Handle(reqs, (header, wire), self.interrupt)

    def send(self, dest, kind, client, step, tensor, meta=0):
        self.isend(dest, kind, client, step, tensor, meta).wait()

    def probe(self, source: int, kind: int) -> None:
        """Block until a message of this kind from source is ready (time spent here is idle wait).

        Polls with short sleeps instead of a blocking Probe: an idle rank then leaves its core to
        ranks that compute (oversubscribed CPU runs), and a peer that stops answering is reported
        after `timeout` seconds instead of hanging the job.
        """
        tag = _tags(kind)[0]
        if self.comm.Iprobe(source=source, tag=tag):
            return
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not self.comm.Iprobe(source=source, tag=tag):
            if _given_up(self.interrupt):
                raise InterruptedError(f"rank {self.rank}: interrupted while waiting for rank {source}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: no {KIND_NAMES.get(kind, kind)} message from rank "
                                   f"{source} within {self.timeout:g} s (peer hung or too slow; see --set run.recv_timeout)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def recv(self, source: int, kind: int, device: torch.device = torch.device("cpu")):
        header = np.empty(HEADER_LEN, dtype=np.int64)
        htag, ptag = _tags(kind)
        self.comm.Recv(header, source=source, tag=htag)
        info = parse_header(header)
        direct = device.type != "cuda" or self.cuda_aware
        out = torch.empty(info["shape"], dtype=info["dtype"], device=device if direct else "cpu",
                          pin_memory=(device.type == "cuda" and not direct))
        self.comm.Recv(self._buf(out), source=source, tag=ptag)
        self.stats.add("recv", kind, source, out.numel() * out.element_size())
        if self.record_dir:
            record(self.record_dir, self.rank, source, info, out)
        if not direct:
            out = out.to(device, non_blocking=False)
        return info, out

    def barrier(self):
        self.comm.Barrier()

    def bcast_obj(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def gather_obj(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def allreduce_max(self, value: float) -> float:
        return self.comm.allreduce(value, op=self.MPI.MAX)

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


class _Mailboxes:
    def __init__(self):
        self.lock = threading.Lock()
        self.boxes = {}
        self.slots = {}

    def box(self, src, dst, kind) -> queue.Queue:
        with self.lock:
            return self.boxes.setdefault((src, dst, kind), queue.Queue())


class _Done:
    def wait(self):
        pass

    def test(self):
        return True


class LoopbackTransport:
    """The same protocol between threads of one process: one transport object per role.

    Payloads are cloned on send, so no role ever shares memory with another.
    """

    cuda_aware = False
    cuda_aware_detected = False

    def __init__(self, rank: int, size: int, mailboxes: _Mailboxes, barrier: threading.Barrier):
        self.rank, self.size, self._mail, self._barrier = rank, size, mailboxes, barrier
        self.local_rank = rank
        self.stats = Stats()
        self.timeout = 600.0
        self._peeked = {}

    @staticmethod
    def group(size: int) -> list["LoopbackTransport"]:
        mail, barrier = _Mailboxes(), threading.Barrier(size)
        return [LoopbackTransport(r, size, mail, barrier) for r in range(size)]

    def path(self, device) -> str:
        return "loopback"

    def isend(self, dest, kind, client, step, tensor, meta=0):
        header = make_header(kind, client, step, tensor, meta)
        payload = tensor.detach().contiguous().clone()
        self._mail.box(self.rank, dest, kind).put((header, payload))
        self.stats.add("sent", kind, dest, payload.numel() * payload.element_size())
        return _Done()

    def send(self, dest, kind, client, step, tensor, meta=0):
        self.isend(dest, kind, client, step, tensor, meta)

    def probe(self, source, kind):
        key = (source, kind)
        if key not in self._peeked:
            try:
                self._peeked[key] = self._mail.box(source, self.rank, kind).get(timeout=self.timeout)
            except queue.Empty:
                raise TimeoutError(f"rank {self.rank}: no {KIND_NAMES.get(kind, kind)} message from rank "
                                   f"{source} within {self.timeout:g} s") from None

    def recv(self, source, kind, device=torch.device("cpu")):
        self.probe(source, kind)
        header, payload = self._peeked.pop((source, kind))
        self.stats.add("recv", kind, source, payload.numel() * payload.element_size())
        return parse_header(header), payload.to(device)

    def barrier(self):
        self._barrier.wait()

    def gather_obj(self, obj, root=0):
        self._mail.slots[self.rank] = obj
        self.barrier()
        out = [self._mail.slots[r] for r in range(self.size)] if self.rank == root else None
        self.barrier()
        return out

    def bcast_obj(self, obj, root=0):
        if self.rank == root:
            self._mail.slots["bcast"] = obj
        self.barrier()
        out = self._mail.slots["bcast"]
        self.barrier()
        return out

    def allreduce_max(self, value: float) -> float:
        self._mail.slots[("max", self.rank)] = value
        self.barrier()
        out = max(self._mail.slots[("max", r)] for r in range(self.size))
        self.barrier()
        return out

    def clock_offset(self, rounds: int = 8) -> float:
        return 0.0

    def library(self) -> str:
        return "loopback (threads in one process)"

    def abort(self, code: int = 1):
        self._barrier.abort()
        raise SystemExit(code)
