"""What taking one waiting message off MPI costs the server after a training step, when its caches are cold.

    mpirun -n 2 --bind-to core python bench/recv_cold.py          # ~30 s; writes bench/results/recv_cold.{json,md}
    mpirun -n 2 python bench/recv_cold.py --samples 40            # smoke test

The projection (bench/projection.py) charges the server a host cost per client message, measured
as the CLI's "recv" phase: tens of microseconds, several times what transport.py measures for the
same size when messages stream back to back. This benchmark separates the two. Per sample rank 0
sends one message; rank 1 sleeps 2 ms (the message, header and payload's rendezvous, is waiting),
then, unless the sample is warm, streams through a buffer of --flush-mib MiB (as a training step's
tensors do: caches and TLB hold none of the receive path afterwards), and times the receive alone:
  raw        mpi4py Comm.Recv into a preallocated numpy buffer
  landing    MPITransport.recv(into=a Landing), as the server receives a client's batch
  tensor     MPITransport.recv(into=a plain tensor): the checks of the memory run on every message
Each method cold and warm (no flush), one random order over all samples, the same on both ranks.
Size: --bytes, default the default config's training message (32 x 513 float32 = 65,664 bytes of
payload, 65,760 with the transport's header).
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np

import common  # also puts the repository on sys.path

METHODS = ("raw", "landing", "tensor")
TAG_RAW = 100


def main(argv=None):
    from mpi4py import MPI
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=32 * 513 * 4, help="payload bytes (default: the training message)")
    ap.add_argument("--flush-mib", type=int, default=64, help="memory streamed through before a cold receive")
    ap.add_argument("--samples", type=int, default=600, help="samples over all methods and states (10%% warm-up)")
    ap.add_argument("--name", default="recv_cold", help="results file name in bench/results")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD.Dup()
    if comm.Get_size() != 2:
        if comm.Get_rank() == 0:
            print("recv_cold.py needs exactly 2 ranks: mpirun -n 2 python bench/recv_cold.py", file=sys.stderr)
        return 2
    import torch

    from collafuse_mpi import comm as cm
    torch.set_num_threads(1)
    rank, n = comm.Get_rank(), args.bytes // 4
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    buf = np.empty_like(x)
    xt, dst = torch.from_numpy(x), torch.from_numpy(buf)
    land = cm.Landing(dst)
    tp = cm.MPITransport(comm)
    flush = np.ones(args.flush_mib * 2 ** 20 // 8)
    receive = {"raw": lambda: comm.Recv(buf, 0, TAG_RAW),
               "landing": lambda: tp.recv(0, cm.TRAIN, into=lambda info: land),
               "tensor": lambda: tp.recv(0, cm.TRAIN, into=lambda info: dst)}
    cases = [(m, state) for m in METHODS for state in ("cold", "warm")]
    rng = random.Random(0)
    order = [rng.choice(cases) for _ in range(args.samples)]
    got = {c: [] for c in cases}
    for i, (m, state) in enumerate(order):
        comm.Barrier()
        if rank == 0:
            if m == "raw":
                comm.Send(x, 1, TAG_RAW)
            else:
                tp.send(1, cm.TRAIN, 0, i, xt)
            continue
        time.sleep(0.002)
        if state == "cold":
            flush += 1.0
        t0 = time.perf_counter()
        receive[m]()
        dt = time.perf_counter() - t0
        if i >= args.samples // 10:
            got[(m, state)].append(dt)
    if rank == 1:
        assert np.array_equal(buf, x), "the last payload did not land whole"
        comm.send(got, dest=0, tag=7)
    else:
        got = comm.recv(source=1, tag=7)
        report(comm, args, got)
    comm.Free()
    return 0


def report(comm, args, got):
    summary = {f"{m} {s}": common.pct(v) for (m, s), v in got.items() if v}
    us = {k: v["p50"] * 1e6 for k, v in summary.items()}
    rows = [[m] + [f"{summary[f'{m} {s}']['p50'] * 1e6:.1f} / {summary[f'{m} {s}']['p90'] * 1e6:.1f} "
                   f"(n={summary[f'{m} {s}']['n']})" for s in ("cold", "warm")] for m in METHODS]
    extra = {m: us[f"{m} cold"] - us["raw cold"] for m in ("landing", "tensor")}
    text = (f"A receive of {args.bytes:,} bytes after {args.flush_mib} MiB of other memory traffic takes "
            f"{us['raw cold']:.0f} us raw, {us['landing cold']:.0f} us through the transport into a Landing "
            f"(+{extra['landing']:.0f} us) and {us['tensor cold']:.0f} us into a plain tensor "
            f"(+{extra['tensor']:.0f} us); warm, {us['raw warm']:.0f}, {us['landing warm']:.0f} and "
            f"{us['tensor warm']:.0f} us. A cold receive costs several times a warm one even raw: the path "
            "through mpi4py and the MPI library is out of cache too. Into a plain tensor the checks of the "
            "memory (tensor queries through torch's Python bindings) run on every message; a Landing makes "
            "them once. What the Landing path still adds over raw is the header message, its parsing and "
            "the transport's own Python path: "
            f"{us['landing warm'] - us['raw warm']:.0f} us warm, {extra['landing']:.0f} us cold. The server's "
            "per-message host cost in the CLI (bench/results/projection.md) is of the cold kind: between "
            "two receives it runs a training step.")
    record = {"benchmark": "recv_cold", "command": common.command(2), "machine": common.machine(comm),
              "bytes": args.bytes, "flush_mib": args.flush_mib, "samples": args.samples,
              "summary_seconds": summary, "explanation": text,
              "samples_seconds": {f"{m} {s}": v for (m, s), v in got.items()}}
    md = ["# recv_cold: one waiting message off MPI, after a step's memory traffic and without", "",
          f"Command: `{record['command']}`", "", common.machine_md(record["machine"]), "",
          f"Payload {args.bytes:,} bytes (+{cm_header()} header bytes for the transport); "
          f"flush {args.flush_mib} MiB; P50 / P90 microseconds of the receive call alone.", "",
          common.table(["method", "cold P50 / P90 us", "warm P50 / P90 us"], rows), "",
          "## explanation", "", text]
    common.publish(args.name, record, md)


def cm_header() -> int:
    from collafuse_mpi import comm as cm
    return cm.HEADER_BYTES


if __name__ == "__main__":
    sys.exit(common.run_or_abort(main))
