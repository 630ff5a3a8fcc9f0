#!/usr/bin/env python3
"""What a link between two emulated hosts does: round-trip time and bulk rate (standard library only).

    netns-cluster.sh exec 2 python3 scripts/netns_probe.py serve --seconds 20 &
    netns-cluster.sh exec 1 python3 scripts/netns_probe.py ping cfnode2 --count 200
    netns-cluster.sh exec 1 python3 scripts/netns_probe.py push cfnode2 --mbytes 8

ping: UDP round trips of 64 bytes, prints min/median in us. push: one TCP stream of the given size,
prints Mbit/s (elapsed until the server's acknowledgement of the last byte). One JSON line each.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time

PORT = 9931


def serve(seconds: float) -> None:
    end = time.monotonic() + seconds
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", PORT))
    udp.settimeout(0.2)
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", PORT))
    tcp.listen(4)
    tcp.settimeout(0.2)

    def sink():
        while time.monotonic() < end:
            try:
                conn, _ = tcp.accept()
            except socket.timeout:
                continue
            with conn:
                want = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
                got = 0
                while got < want:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    got += len(chunk)
                conn.sendall(b"k")

    threading.Thread(target=sink, daemon=True).start()
    while time.monotonic() < end:
        try:
            data, peer = udp.recvfrom(2048)
        except socket.timeout:
            continue
        udp.sendto(data, peer)


def ping(host: str, count: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    rtts = []
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendto(b"x" * 64, (host, PORT))
        s.recvfrom(2048)
        rtts.append(time.perf_counter() - t0)
    rtts.sort()
    return {"rtt_min_us": rtts[0] * 1e6, "rtt_p50_us": rtts[len(rtts) // 2] * 1e6, "count": count}


def push(host: str, mbytes: float) -> dict:
    n = int(mbytes * 1e6)
    block = b"\0" * (1 << 20)
    with socket.create_connection((host, PORT), timeout=60) as s:
        t0 = time.perf_counter()
        s.sendall(n.to_bytes(8, "big"))
        left = n
        while left > 0:
            left -= s.send(block[:min(left, len(block))])
        s.recv(1)
        dt = time.perf_counter() - t0
    return {"bytes": n, "seconds": dt, "mbit_s": n * 8 / dt / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--seconds", type=float, default=30)
    p = sub.add_parser("ping")
    p.add_argument("host")
    p.add_argument("--count", type=int, default=100)
    q = sub.add_parser("push")
    q.add_argument("host")
    q.add_argument("--mbytes", type=float, default=4)
    args = ap.parse_args()
    if args.what == "serve":
        serve(args.seconds)
    elif args.what == "ping":
        print(json.dumps(ping(args.host, args.count)), flush=True)
    else:
        print(json.dumps(push(args.host, args.mbytes)), flush=True)


if __name__ == "__main__":
    main()
