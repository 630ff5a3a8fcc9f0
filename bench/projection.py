"""Scaling projection, on paper: step time and server load at 64..1024 clients and 10..400 Gbit/s.

    python bench/projection.py                          # ~3 min on 2 cores; writes bench/results/projection.{json,md}
    python bench/projection.py --quick                  # smoke test (~1 min; writes the same files)
    python bench/projection.py --results a.h5 b.h5 --out projection-mycluster
                                                        # project from results files made on your cluster, run nothing
    python bench/projection.py --results a.h5 --server-speedup 20 --client-speedup 1 --out projection-gpu20

Inputs. By default it runs the real command line, one after the other,
    mpirun -n 3 --oversubscribe python -m collafuse_mpi.run --steps 40 --batch-size 32 --quiet -o <tmp>/n3.h5
and the same with -n 5 (2 and 4 clients), reads both files with `collafuse_mpi.results.read`, and
times the server's and a client's training step directly in this one process (`--direct`): the
package's own `UNet(channels, preset, cut_conditioned=True)` and `training.Learner` on fused
batches of 1, 2, 4, 8, 16 client batches, unpack + concatenation of the client messages included,
and a client's `UNet(..., cut_conditioned=False)` step with its noise draws and message packing.
The direct timings are the default source ("auto"): in the MPI runs 3 or 5 ranks share 2 cores, so
their per-phase times carry that contention. With --results FILE.h5 ... nothing is run and, unless
--direct is given, the files' own per-phase times are the source: that is how a cluster's numbers
are projected (the model, sizes and batch are taken from the files' config).

What is derived, per results run (warm-up steps excluded, medians over steps):
    server compute/step = step - wait - recv - io   (unpack, concat, forward, backward, optimizer)
    server recv/client  = recv phase / clients      (host cost of taking one message off MPI)
    client own step     = step - wait - io          (what a client needs when it never waits;
                          over M for a rank hosting M logical clients, run.clients_per_rank, loop runs only)
    message bytes       = train_batch bytes sent / messages, from a client's comm table
                          (= B*(2*C*H*W+1)*4 payload + 96 header bytes, sent as 2 MPI messages)
and the server compute is fitted as a + b * n_images (least squares over the runs' medians, or
over the direct timings); with one fused size only, a = 0 and b = time / images.

The model, for N clients, a link of bandwidth BW and one-way latency L per MPI message:
    compute(N) = (a + b * N * B) / server_speedup
    wire(N)    = N * bytes/BW                        one server NIC, messages serialised on it
    eager      the payload fits the eager limit (--eager-limit; the package raises Open MPI's TCP
               limit to hold one message up to 4 MiB, run.tcp_eager): a message lands while the
               server computes, so the server's receive costs it only the host cost, and the
               latency is hidden: recv(N) = N * host, and the NIC runs beside the compute
    rendezvous the payload is above it: the data moves only once the server, done computing, has
               answered, client after client: recv(N) = N * (bytes/BW + 2 L + handshake + host)
               (2 L: the answer and the data; handshake: what a link costs beyond that, measured
               by bench/link_probe.py, --handshake-us; 0 by default)
    host       = server recv/client measured above (0 with --host-overhead-us 0)
    client     = client own step / client_speedup        (clients run in parallel, one device each)
    serial     step = client + wire + N * latencies + N * host + compute    no overlap at all
    pipelined  step = max(client, recv + compute, wire)  the package: clients keep max_in_flight
                                                          batches ahead; the server receives, then computes
    overlapped step = max(client, recv, compute, wire)   the server also took in step s+1's messages
                                                          while computing step s
    server utilisation = compute / step; NIC utilisation = wire / step;
    saturation: the largest N with recv + compute <= client and wire <= client (pipelined), i.e.
    the server is not the bottleneck; beyond it every added client lengthens every step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

import common
from link_model import BANDWIDTHS_GBIT, CLIENTS, HEADER_BYTES, LATENCY_US, SPEEDUPS, latency_msgs, project, saturation
from projection_inputs import direct_timing, fit_linear, load_runs, run_cli
from projection_report import assumptions, headline, markdown

from collafuse_mpi import mpi_params  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", default=None, metavar="FILE.h5",
                    help="results files to project from (run nothing); default: run the CLI with --ranks")
    ap.add_argument("--ranks", default="3,5", help="world sizes to run when no --results (1 server + clients)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--keep", default="", help="folder to keep the CLI's results files in (default: deleted)")
    ap.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                    help="time the server/client steps in this process (default: on without --results, off with)")
    ap.add_argument("--direct-clients", default="1,2,4,8,16,32", help="fused sizes timed directly, in client batches")
    ap.add_argument("--direct-iters", type=int, default=3)
    ap.add_argument("--direct-device", default="cpu", help="cpu, cuda or auto for the direct timing")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the direct timing (0 = the runs' run.torch_threads)")
    ap.add_argument("--compute-source", choices=("auto", "direct", "runs"), default="auto",
                    help="where server compute and client step come from (auto: direct when timed, else runs)")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    ap.add_argument("--bandwidths", default=",".join(map(str, BANDWIDTHS_GBIT)), help="Gbit/s, comma-separated")
    ap.add_argument("--latency-us", default="", help="one value for every link, or one per bandwidth "
                    "(default: 25, 15, 2, 1.5, 1.5 µs for 10, 25, 100, 200, 400 Gbit/s; 2 µs otherwise)")
    ap.add_argument("--eager-limit", type=int, default=0,
                    help="bytes; payloads above it wait for a rendezvous (default: the package's own, which "
                    "raises Open MPI's TCP limit to hold one message up to 4 MiB; 65536 = Open MPI's default)")
    ap.add_argument("--handshake-us", type=float, default=0.0,
                    help="what a rendezvous costs beyond 2 latencies (bench/link_probe.py measures a link's)")
    ap.add_argument("--host-overhead-us", type=float, default=None,
                    help="server host cost per client message (default: measured recv per client, "
                    "least contended run)")
    ap.add_argument("--server-speedup", type=float, default=1.0,
                    help="server compute this many times faster than measured")
    ap.add_argument("--client-speedup", type=float, default=1.0,
                    help="client step this many times faster than measured")
    ap.add_argument("--quick", action="store_true", help="smoke test: 12 steps, direct sizes 1,2,4 client batches")
    ap.add_argument("--out", default="projection", help="name of the bench/results/<name>.{json,md} pair")
    args = ap.parse_args(argv)
    clients = tuple(int(v) for v in args.clients.split(","))
    if args.quick:
        args.steps, args.direct_clients, args.direct_iters = 12, "1,2,4", 2
    bws = floats(args.bandwidths)
    lat = floats(args.latency_us)
    if len(lat) not in (0, 1, len(bws)):
        raise SystemExit("--latency-us takes one value or one per bandwidth")
    lats = {b: (lat[0] if len(lat) == 1 else lat[i] if lat else LATENCY_US.get(b, 2.0)) for i, b in enumerate(bws)}
    do_direct = args.direct if args.direct is not None else not args.results

    commands, walls, tmp = [], [], None
    t_start = time.perf_counter()
    if args.results:
        files = args.results
    else:
        tmp = args.keep or tempfile.mkdtemp(prefix="cf-projection-")
        os.makedirs(tmp, exist_ok=True)
        files = []
        for n in (int(v) for v in args.ranks.split(",")):
            path = os.path.join(tmp, f"projection-n{n}.h5")
            if os.path.exists(path):
                os.remove(path)
            print(f"running {n} ranks, {args.steps} steps ...", flush=True)
            cmd, wall = run_cli(n, args.steps, args.batch_size, path)
            commands.append(cmd)
            walls.append(wall)
            files.append(path)
    try:
        runs = load_runs(files)
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    cfg = runs[0]["config"]
    fit_runs = fit_linear([r["server"]["images_per_step"] for r in runs], [r["server"]["compute_s"] for r in runs])

    direct = None
    if do_direct:
        print("direct timing ...", flush=True)
        direct = direct_timing(cfg, [int(v) for v in args.direct_clients.split(",")], args.direct_iters, 1,
                               args.threads or int(cfg["torch_threads"]), args.direct_device)
    source = args.compute_source
    if source == "auto":
        source = "direct" if direct else "runs"
    if source == "direct" and not direct:
        raise SystemExit("--compute-source direct needs --direct")
    least = min(runs, key=lambda r: (r["ranks_per_host_max"], r["n_clients"]))
    if source == "direct":
        fit, client_s = direct["fit"], direct["client"]["p50"]
        compute_source = f"direct timing, {direct['device']}"
        max_images = max(v["images"] for v in direct["server"].values())
        compute_device = f"direct: {direct['device']}, {direct['threads']} thread(s)"
    else:
        fit, client_s = fit_runs, least["client_own_step_s"]
        compute_source = "results runs (client step from the least contended run)"
        max_images = max(r["server"]["images_per_step"] for r in runs)
        compute_device = "runs: server " + ", ".join(sorted({r["server"]["device"] for r in runs}))
    msgs = [r["message_bytes_measured"] for r in runs if r["message_bytes_measured"]]
    message_bytes = float(np.mean(msgs)) if msgs else float(runs[0]["message_bytes_formula"])
    if args.eager_limit:
        eager_limit, eager_source = args.eager_limit, "--eager-limit"
    else:
        eager_limit = max(65536, mpi_params.limit_for(message_bytes))
        eager_source = "the package's run.tcp_eager" if eager_limit > 65536 else "Open MPI's TCP default"
    if args.host_overhead_us is not None:
        host_s, host_source = args.host_overhead_us * 1e-6, "--host-overhead-us"
    else:
        host_s = least["server"]["recv_per_client_s"]
        host_source = (f"server recv phase per client message in the least contended run "
                       f"({least['n_clients']} clients; over "
                       f"{'shared memory' if len(least['hosts']) == 1 else 'the runs network'}, "
                       "so it includes an intra-node copy: an upper bound of the software cost)")
    p = {"batch": int(cfg["batch_size"]), "preset": cfg["preset"], "channels": cfg["channels"],
         "image_size": cfg["image_size"], "a_s": max(fit["a_s"], 0.0), "a_fit_s": fit["a_s"],
         "b_s": fit["b_s_per_image"],
         "fit_kind": fit["kind"], "client_s": client_s, "message_bytes": message_bytes,
         "message_source": ("client comm table (train_batch bytes / messages)" if msgs
                            else "formula B*(2*C*H*W+1)*4 + 96"),
         "eager_limit": eager_limit, "eager_source": eager_source, "handshake_s": args.handshake_us * 1e-6,
         "latency_msgs": latency_msgs(message_bytes - HEADER_BYTES, eager_limit),
         "host_s": host_s, "host_source": host_source, "server_speedup": args.server_speedup,
         "client_speedup": args.client_speedup, "compute_source": compute_source,
         "compute_device": compute_device, "max_measured_images": int(max_images),
         "latency_table": {b: lats[b] for b in bws}, "max_in_flight": cfg["max_in_flight"],
         "clients": list(clients), "bandwidths_gbit": bws}
    proj = [project(p, n, b, lats[b]) for n in clients for b in bws]
    by_speedup = {str(sp): [project(dict(p, server_speedup=float(sp)), n, b, lats[b]) for n in clients for b in bws]
                  for sp in SPEEDUPS if float(sp) != p["server_speedup"]}
    sat = {"main": [saturation(p, b, lats[b]) for b in bws],
           "by_speedup": {b: {str(s): saturation(p, b, lats[b], s) for s in SPEEDUPS} for b in bws}}
    note = None
    if any(r["ranks_per_host_max"] > (os.cpu_count() or 1) for r in runs) and not args.results:
        note = (f"Contention: the MPI runs put {', '.join(str(r['world_size']) for r in runs)} ranks on "
                f"{os.cpu_count()} cores, so their phase times include time-sharing; the direct timings run one "
                "process alone (other jobs on the machine aside: see loadavg) and are the source unless "
                "--compute-source runs.")
    rec = {"benchmark": "projection", "command": common.command(), "machine": common.machine(),
           "cli_commands": commands, "cli_wall_s": walls,
           "inputs": [os.path.abspath(f) for f in files] if args.results else [],
           "runs": runs, "fit_runs": fit_runs, "direct": direct, "parameters": p, "saturation": sat,
           "projection": proj, "projection_by_speedup": by_speedup, "contention_note": note,
           "assumptions": assumptions(p, source),
           "elapsed_s": time.perf_counter() - t_start}
    rec["headline"] = headline(p, sat, proj, bws)
    md = markdown(rec)
    paths = common.write(args.out, rec, md)
    print("\n".join(rec["headline"]))
    print(f"({rec['elapsed_s']:.0f} s) wrote", *paths)


if __name__ == "__main__":
    main()
