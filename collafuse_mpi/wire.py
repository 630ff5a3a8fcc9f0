"""The transport's wire format and its waits, without MPI: the fixed int64 header of every
message, the memory payloads land in, byte counts, and the polling wait every deadline uses.
comm.py (MPI) and loopback.py (threads, for tests) both speak it.
"""
from __future__ import annotations

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


def poll(ready, timeout=None, on_timeout=None, what="a message", spin=SPIN_S, watch=None):
    """Wait until ready() is true, polling so that a dead peer is noticed. After a few polls back
    to back it spins (yielding the core) for `spin` seconds, long enough for a message in flight
    to land, then sleeps with backoff so an idle rank leaves its core to ranks that compute
    (oversubscribed CPU runs). A sleeping sender notices completion late, so for large messages
    the caller stretches `spin` with the message size. `on_timeout()` gives the error's text
    (built only then: this runs per message). `watch()`, called while it sleeps, may raise to
    end the wait (a peer reported its failure)."""
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
        if watch is not None:
            watch()
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


def late(rank: int, peers, what: str, timeout: float) -> str:
    """The deadline's message: who waited, on whom, in which wait."""
    names = ", ".join(map(str, sorted(peers)))
    return (f"rank {rank}: no answer from rank {names} within {timeout:g} s {what} "
            "(peer hung, stopped or too slow; see --set run.recv_timeout)")
