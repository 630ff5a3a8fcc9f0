"""Open MPI parameters a run sets for itself, in its own environment, before MPI starts.

Over TCP, Open MPI sends a message above `btl_tcp_eager_limit` (64 KiB by default) by rendezvous:
the data leaves the client only after the server has matched the message and answered. The
server matches a client's training batch when it is done computing, so every batch then costs it
a handshake and an idle connection's slow start, one client after another: 0.95-5.30 ms per
client between emulated hosts, against 0.06-0.33 ms for the same batch sent eagerly, which lands
while the server computes (bench/results/multihost.md).

With `run.tcp_eager` the limit is raised to hold one training message (and one sampling
message), up to EAGER_CAP. A limit the launch environment set is kept, and nothing is set (or
recorded) when MPI was started before the run, by a wrapper that imported mpi4py.MPI first: the
variable would not be read. The price would be memory on the receiver: a plain eager send
completes once buffered, so clients faster than the server would run ahead, as far as TCP's
buffers and the stop vote (2 * run.stop_check_every steps) let them, and rank 0 would hold their
batches. Clients therefore send training batches by synchronous send (train.sync_sends): the
batch still leaves at once, inline, but the send completes only when the server has matched it,
so train.max_in_flight bounds the run-ahead at max_in_flight + 1 steps (bench/results/run-ahead.md).
Other MPI libraries ignore the variable; shared memory within a node is unaffected (large
messages go by single copy).
"""
from __future__ import annotations

import sys

from .comm import HEADER_BYTES

EAGER_VAR = "OMPI_MCA_btl_tcp_eager_limit"
EAGER_CAP = 4 << 20  # beyond this, eager buffering on rank 0 costs more than the handshake saves
FLOAT_BYTES = 4  # training and sampling payloads travel as float32


def message_bytes(cfg) -> int:
    """The largest message of a step: one client's training batch (x_t, eps and t per image) or
    one sampling tensor of the client's samples, header included."""
    pixels = cfg.data.channels * cfg.data.image_size ** 2
    train = cfg.train.batch_size * (2 * pixels + 1) * FLOAT_BYTES
    sample = cfg.sample.samples_per_client * pixels * FLOAT_BYTES
    return max(train, sample) + HEADER_BYTES


def limit_for(nbytes: int) -> int:
    """The TCP eager limit that holds a message of nbytes, rounded up to 4 KiB; 0 above the cap."""
    need = -(-int(nbytes) // 4096) * 4096
    return need if need <= EAGER_CAP else 0


def eager_limit(cfg) -> int:
    return limit_for(message_bytes(cfg))


def environment(cfg, environ) -> dict:
    """The variables to add to `environ` before MPI_Init (empty when nothing is to change)."""
    if not cfg.run.tcp_eager or EAGER_VAR in environ:
        return {}
    limit = eager_limit(cfg)
    return {EAGER_VAR: str(limit)} if limit > 65536 else {}


def mpi_started() -> bool:
    """True when MPI_Init has already run in this process (a wrapper imported mpi4py.MPI before the
    run's CLI): a variable set now is never read, so the run must not set or record it."""
    mod = sys.modules.get("mpi4py.MPI")
    return bool(mod is not None and mod.Is_initialized())
