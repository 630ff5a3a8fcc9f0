"""The transport's protocol between threads of one process: one transport object per role, so
roles run (and are tested) without MPI. Same headers, stats and landing rules as comm.py."""
from __future__ import annotations

import queue
import threading
import time

from .wire import _CPU, KIND_NAMES, Landing, Stats, landing_mismatch, late, make_header, parse_header


class _Mailboxes:
    def __init__(self):
        self.lock = threading.Lock()
        self.boxes = {}
        self.slots = {}
        self.votes = threading.Condition()

    def box(self, src, dst, kind) -> queue.Queue:
        with self.lock:
            return self.boxes.setdefault((src, dst, kind), queue.Queue())


class _Done:
    def wait(self):
        pass

    def test(self):
        return True


class _Vote:
    def __init__(self, mail, key, rank, size, timeout, barrier, what):
        self.mail, self.key, self.rank, self.size, self.timeout = mail, key, rank, size, timeout
        self.barrier, self.what = barrier, what

    def result(self) -> int:
        end = time.monotonic() + self.timeout
        with self.mail.votes:
            votes = self.mail.slots[self.key]  # {rank: value}
            while len(votes) < self.size:
                if self.barrier.broken:  # a role failed (run_loopback aborts the barrier): do not wait for it
                    raise threading.BrokenBarrierError
                if time.monotonic() > end:
                    raise TimeoutError(late(self.rank, set(range(self.size)) - set(votes), self.what, self.timeout))
                self.mail.votes.wait(0.05)
            return max(votes.values())


class LoopbackTransport:
    """The same protocol between threads of one process: one transport object per role.

    Payloads are cloned on send, so no role ever shares memory with another.
    """

    cuda_aware = False
    cuda_aware_detected = False

    def __init__(self, rank: int, size: int, mailboxes: _Mailboxes, barrier: threading.Barrier):
        self.rank, self.size, self._mail, self._barrier = rank, size, mailboxes, barrier
        self.local_rank, self.local_size = rank, size
        self.same_node = list(range(size))  # threads of one process
        self.stats = Stats()
        self.timeout = 600.0
        self._peeked = {}
        self._votes = 0  # votes this role started; every role starts the same ones in order

    @staticmethod
    def group(size: int) -> list["LoopbackTransport"]:
        mail, barrier = _Mailboxes(), threading.Barrier(size)
        return [LoopbackTransport(r, size, mail, barrier) for r in range(size)]

    def path(self, device) -> str:
        return "loopback"

    def isend(self, dest, kind, client, step, tensor, meta=0, sync=False):  # mailboxes: sync is moot
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

    def recv(self, source, kind, device=_CPU, reuse=False, into=None):
        self.probe(source, kind)
        header, payload = self._peeked.pop((source, kind))
        self.stats.add("recv", kind, source, payload.numel() * payload.element_size())
        info = parse_header(header)
        if into is None:
            return info, payload.to(device)
        target = into(info)
        if type(target) is Landing:
            target = target.tensor
        bad = landing_mismatch(target, info["dtype"], info["shape"])
        if bad:
            raise ValueError(f"rank {self.rank}: {KIND_NAMES.get(kind, kind)} from rank {source} {bad}")
        return info, target.view(info["shape"]).copy_(payload)

    def barrier(self, what="at a barrier", timeout=None):
        start, timeout = time.monotonic(), timeout or self.timeout
        try:
            self._barrier.wait(timeout=timeout)
        except threading.BrokenBarrierError:
            if time.monotonic() - start < timeout:
                raise  # a peer failed and broke it
            raise TimeoutError(f"rank {self.rank}: not every rank arrived within {timeout:g} s {what}") from None

    def gather_obj(self, obj, root=0, what="in a gather of every rank's results"):
        self._mail.slots[self.rank] = obj
        self.barrier(what)
        out = [self._mail.slots[r] for r in range(self.size)] if self.rank == root else None
        self.barrier(what)
        return out

    def scatter_obj(self, objs, root=0, what="waiting for the attack results from rank 0", timeout=None):
        if self.rank == root:
            self._mail.slots["scatter"] = list(objs)
        self.barrier(what, timeout)
        out = self._mail.slots["scatter"][self.rank]
        self.barrier(what)
        return out

    def bcast_obj(self, obj, root=0, what="in a broadcast from rank 0"):
        if self.rank == root:
            self._mail.slots["bcast"] = obj
        self.barrier(what)
        out = self._mail.slots["bcast"]
        self.barrier(what)
        return out

    def report_failure(self, text: str) -> None:
        pass  # the roles are threads of one process: run_loopback() reports the failing one

    def vote(self, value: int, what: str = "in a stop vote") -> "_Vote":
        key = ("vote", self._votes)
        self._votes += 1
        with self._mail.votes:
            self._mail.slots.setdefault(key, {})[self.rank] = int(value)
            self._mail.votes.notify_all()
        return _Vote(self._mail, key, self.rank, self.size, self.timeout, self._barrier, what)

    def clock_offset(self, rounds: int = 8) -> float:
        return 0.0

    def library(self) -> str:
        return "loopback (threads in one process)"

    def abort(self, code: int = 1):
        self._barrier.abort()
        raise SystemExit(code)
