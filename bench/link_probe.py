"""What one training message costs the server to receive over a link, as the run sends it.

    scripts/netns-cluster.sh run -n 2 --map-by node python bench/link_probe.py --bytes 65664,32768

Rank 1 sends with the package's transport (header, then payload: two MPI messages; the payload by
Issend, as clients send training batches, or plain Isend with --plain) and waits in MPI for the
send to finish, as a client ahead of the server does; rank 0 stays out of MPI for
`--gap` seconds (the server computing), then times its receive of the message that is waiting.
After a gap longer than TCP's retransmission timeout the sender's connection restarts from its
initial congestion window (Linux's tcp_slow_start_after_idle), and a payload above the eager
limit needs the receiver's handshake first, so the cost is round trips, not bytes/bandwidth.
`--gap 0` gives the back-to-back cost. Rank 0 prints one JSON line: per size and gap, the
receive's min and median in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from collafuse_mpi import comm  # noqa: E402

GO = 7  # kind of the small go-ahead from rank 0 (outside the package's kinds)


def probe(tp, nbytes: int, gap: float, reps: int, sync: bool = True) -> list[float] | None:
    payload = torch.zeros(nbytes // 4, dtype=torch.float32)
    go = np.zeros(1, dtype=np.int64)
    times = []
    for _ in range(reps + 1):  # the first one opens the connection and is dropped
        if tp.rank == 1:
            tp.isend(0, comm.TRAIN, 0, 0, payload, sync=sync).wait()
            tp.comm.Recv(go, 0, GO)
        else:
            time.sleep(gap)
            t0 = time.perf_counter()
            tp.recv(1, comm.TRAIN)
            times.append(time.perf_counter() - t0)
            tp.comm.Send(go, 1, GO)
    return times[1:] if tp.rank == 0 else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", default="65664", help="payload sizes, comma-separated (the header is added)")
    ap.add_argument("--gaps", default="0,0.3", help="seconds rank 0 stays out of MPI before each receive")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--plain", action="store_true",
                    help="send the payload by plain Isend instead of Issend, as clients did before they "
                         "bounded their run-ahead (a plain eager send completes unmatched)")
    args = ap.parse_args(argv)
    tp = comm.MPITransport(timeout=120.0)
    if tp.size != 2:
        raise SystemExit("link_probe: run with exactly 2 ranks, one per host")
    rows = []
    for nbytes in (int(v) for v in args.bytes.split(",")):
        for gap in (float(v) for v in args.gaps.split(",")):
            t = probe(tp, nbytes, gap, args.reps, sync=not args.plain)
            if t is not None:
                rows.append({"payload_bytes": nbytes, "gap_s": gap, "reps": args.reps, "sync": not args.plain,
                             "min_s": float(np.min(t)), "p50_s": float(np.median(t)), "max_s": float(np.max(t))})
    if tp.rank == 0:
        print(json.dumps({"library": tp.library(), "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
