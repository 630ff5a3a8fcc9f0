#!/usr/bin/env python3
"""Fixed one-way delay for the packets an iptables NFQUEUE rule hands over (this kernel has no netem).

    ip netns exec cf-h1 python3 scripts/netns_delay.py --queue 0 --delay-us 200

Run in the host namespace whose rule feeds the queue (netlink sockets belong to one namespace).
Each packet is held in the kernel until `delay` after it was queued, then accepted; with one fixed
delay the release order is the arrival order, so one batch verdict accepts everything due. Talks
nfnetlink_queue directly over a netlink socket (standard library only, no libnetfilter_queue).
Packets keep flowing undelayed if this process dies: the rule is `--queue-bypass` and the queue
fails open when full.
"""
from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1, 4  # fail open when full; take GSO packets whole
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, seq, pid


def _attr(kind: int, payload: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def _message(msg_type: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue)  # family, version, res_id
    body = nfgen + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def _check_ack(sock: socket.socket, what: str) -> None:
    data = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        err = struct.unpack_from("=i", data, _NLMSG.size)[0]
        if err:
            raise OSError(-err, f"nfnetlink_queue refused {what}: {os.strerror(-err)}")


def open_queue(queue: int, maxlen: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    sock.bind((0, 0))
    cmd = _attr(NFQA_CFG_CMD, struct.pack("=BB", NFQNL_CFG_CMD_BIND, 0) + struct.pack("!H", socket.AF_INET))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, cmd, NLM_F_REQUEST | NLM_F_ACK, 1))
    _check_ack(sock, f"binding queue {queue}")
    params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
    params += _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
    flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO  # whole: one verdict per 64 KiB, not per frame
    params += _attr(NFQA_CFG_MASK, struct.pack("!I", flags))
    params += _attr(NFQA_CFG_FLAGS, struct.pack("!I", flags))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, params, NLM_F_REQUEST | NLM_F_ACK, 2))
    _check_ack(sock, "its parameters")
    return sock


def packet_ids(data: bytes):
    """The packet ids in one datagram of NFQNL_MSG_PACKET messages."""
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < _NLMSG.size:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a, end = off + _NLMSG.size + 4, off + length  # past nlmsghdr and nfgenmsg
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, a + 4)[0]
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def _tight_timers() -> None:
    """Wake-ups within ~1 us of the due time, not the default 50 us timer slack."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):
        pass


def serve(queue: int, delay_s: float, maxlen: int) -> None:
    _tight_timers()
    sock = open_queue(queue, maxlen)
    held = collections.deque()  # (due, packet id), due ascending

    def stop(*_):
        raise KeyboardInterrupt  # out of select at once

    signal.signal(signal.SIGTERM, stop)
    try:
        _loop(sock, queue, delay_s, held)
    except KeyboardInterrupt:
        pass
    if held:  # let what is held go now rather than leave it to the queue's teardown
        sock.send(_message(NFQNL_MSG_VERDICT_BATCH, queue,
                           _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, held[-1][1]))))


def _loop(sock, queue: int, delay_s: float, held) -> None:
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 1.0
        ready, _, _ = select.select([sock], [], [], timeout)
        if ready:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                data = b""
            now = time.monotonic()
            for pid in packet_ids(data):
                held.append((now + delay_s, pid))
        now = time.monotonic()
        last = None
        while held and held[0][0] <= now:
            last = held.popleft()[1]
        if last is not None:  # accepts every queued packet with an id up to `last`
            sock.send(_message(NFQNL_MSG_VERDICT_BATCH, queue,
                               _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, default=0, help="NFQUEUE number the iptables rule names")
    ap.add_argument("--delay-us", type=float, required=True, help="one-way delay added to each packet")
    ap.add_argument("--maxlen", type=int, default=16384, help="packets the kernel may hold for this queue")
    args = ap.parse_args()
    serve(args.queue, args.delay_us * 1e-6, args.maxlen)


if __name__ == "__main__":
    main()
