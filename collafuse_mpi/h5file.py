"""Updates of one HDF5 file that several processes share, none of which can damage it.

HDF5 does not journal: a process killed while it changes a file in place (SIGKILL, a node's
OOM killer, preemption, a full disk) can leave the whole file unreadable, earlier runs too.
So an update is made on a copy, which replaces the file in one rename: a reader, or a process
killed at any moment, sees the file as it was before the update or after it, never between.
Updates are serialised by an exclusive flock on the file, the lock HDF5 itself takes, so a
process holding the file open with h5py is waited for.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time

import h5py

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # filesystems mounted without flock


class Held(OSError):
    """Another process kept the file locked for longer than the wait."""


@contextlib.contextmanager
def locked(path: str, wait_s: float):
    """An exclusive lock on the file now at `path`, created empty when missing. The lock must
    be on the file the path names once we hold it: another writer may have replaced it while
    we waited, and a lock on the old file excludes nobody."""
    deadline = time.monotonic() + wait_s
    pause = 0.05
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:  # without flock, like HDF5_USE_FILE_LOCKING=FALSE: go on
                os.close(fd)
                if not isinstance(exc, BlockingIOError):
                    raise
                if time.monotonic() > deadline:
                    raise Held(errno.EAGAIN, f"{path} is held by another process") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
                continue
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def update(path: str, wait_s: float, fresh: bool = False):
    """The file at `path` open for writing (h5py), as a copy that replaces it when the block
    ends without error; on an error the file is left exactly as it was. `fresh`, or an empty
    file (just created by the lock), starts from nothing. New files track their free space, so
    groups rewritten at every update reuse the space of the old ones instead of growing the file."""
    tmp = path + ".tmp"  # only the lock holder writes it; a copy a killed update left is overwritten
    with locked(path, wait_s):
        new = fresh or os.path.getsize(path) == 0
        try:
            if new:
                f = h5py.File(tmp, "w", locking=False, libver=("v110", "latest"),
                              fs_strategy="fsm", fs_persist=True, fs_threshold=1)
            else:
                shutil.copyfile(path, tmp)
                f = h5py.File(tmp, "a", locking=False)
            with f:
                yield f
            shutil.copymode(path, tmp)
            _fsync(tmp)  # the data is on disk before the name points at it
            os.replace(tmp, path)
            _fsync(os.path.dirname(os.path.abspath(path)))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            with contextlib.suppress(OSError):
                if os.path.getsize(path) == 0:  # the empty file the lock made: nothing was there
                    os.remove(path)
            raise
