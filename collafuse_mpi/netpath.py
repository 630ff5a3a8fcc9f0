"""Which way each peer's messages went: same node (MPI's locality) or a TCP connection (the kernel's
socket table of this process), recorded per rank in the results file. No MPI here: comm.py gives the
locality, this module reads Linux's /proc and the interface addresses.

A network transport that is not TCP (InfiniBand verbs, UCX, libfabric, Slingshot) opens no socket to
its peers, so an off-node peer without a TCP connection is recorded as such, not guessed at.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct

_SIOCGIFADDR = 0x8915


def addresses() -> dict:
    """IPv4 address -> interface name, for every interface of this host that has one."""
    out = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            out[socket.inet_ntoa(raw[20:24])] = name
    finally:
        s.close()
    return out


def _hex_addr(text: str) -> tuple[str, int]:
    ip, port = text.split(":")
    return socket.inet_ntoa(struct.pack("<I", int(ip, 16))), int(port, 16)


def tcp_connections(pid: str = "self") -> list[tuple[str, int, str, int]]:
    """(local ip, local port, remote ip, remote port) of this process's established IPv4 TCP sockets."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return []
    out = []
    try:
        with open(f"/proc/{pid}/net/tcp") as fh:
            next(fh)
            for line in fh:
                f = line.split()
                if f[3] == "01" and f[9] in inodes:  # 01 = ESTABLISHED
                    out.append((*_hex_addr(f[1]), *_hex_addr(f[2])))
    except OSError:
        return []
    return sorted(out)


def snapshot() -> dict:
    """What one rank contributes: its addresses and its TCP connections, taken at the end of the run
    (connections are made on first use and kept)."""
    return {"addresses": addresses(), "tcp": tcp_connections()}


def peer_paths(everyone: list[dict]) -> dict:
    """rank -> rows (peer, peer host, locality, transport, local address, remote address), one per
    other rank. `everyone[i]` has "host", "same_node" (ranks MPI places on this rank's node) and
    "net" (its snapshot)."""
    owner = {}  # address -> rank whose host has it (loopback and duplicates across hosts excluded)
    for r in everyone:
        for ip in r["net"]["addresses"]:
            if not ip.startswith("127."):
                owner.setdefault(ip, r["rank"])
    host_of = {r["rank"]: r["host"] for r in everyone}
    table = {}
    for r in everyone:
        by_host = {}
        for lip, lport, rip, rport in r["net"]["tcp"]:
            peer = owner.get(rip)
            if peer is not None:
                by_host.setdefault(host_of[peer], (lip, lport, rip, rport))
        rows = []
        for p in everyone:
            if p["rank"] == r["rank"]:
                continue
            if p["rank"] in r["same_node"]:
                rows.append((p["rank"], p["host"], "same node", "shared memory", "", ""))
                continue
            conn = by_host.get(p["host"])
            if conn is None:
                rows.append((p["rank"], p["host"], "other node", "network: no TCP connection from this rank "
                             "(not used, or a fabric that opens no socket)", "", ""))
                continue
            lip, lport, rip, rport = conn
            iface = r["net"]["addresses"].get(lip, "?")
            rows.append((p["rank"], p["host"], "other node", f"tcp via {iface}", f"{lip}:{lport}", f"{rip}:{rport}"))
        table[r["rank"]] = rows
    return table
