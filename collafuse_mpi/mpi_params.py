"""Open MPI parameters a run sets for itself, in its own environment, before MPI starts.

Over TCP, Open MPI sends a message above `btl_tcp_eager_limit` (64 KiB by default) by rendezvous:
the data leaves the client only after the server has matched the message and answered. The
server matches a client's training batch when it is done computing, so every batch then costs it
a handshake and an idle connection's slow start, one client after another: 1.3-1.6 ms per client
unshaped and 3.8-4.4 ms at 1 Gbit/s + 200 us between emulated hosts, against 0.04-0.07 ms for
the same batch sent eagerly, which lands while the server computes (bench/results/multihost.md).

With `run.tcp_eager` the limit is raised to hold one training message (and one sampling
message), up to EAGER_CAP. A limit the launch environment set is kept. The price is memory on
the receiver, and train.max_in_flight does not bound it: an eager send completes once buffered,
so clients faster than the server run ahead and rank 0 holds their early batches in Open MPI's
buffers (at 2 Mbit/s clients ran several steps ahead; the stop vote every run.stop_check_every
steps should bound it, not yet measured). Turn it off (run.tcp_eager = false) for long runs of
many clients far faster than the server. Other MPI libraries ignore
the variable; shared memory within a node is unaffected (large messages go by single copy).
"""
from __future__ import annotations

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
