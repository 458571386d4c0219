"""Helpers for the af_packet / bpf tests: frame builders, throwaway netns with veth pairs,
slow-path ring readers/writers, and the child process that maps a passed fd.

Run as a script (``python _af_packet_util.py child FD``) it is that child.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import time

import numpy as np

# --- frames ---------------------------------------------------------------------------

ETH_TEST = 0x88B5  # IEEE "local experimental" ethertype: nothing in the kernel reacts to it


def mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def ip4(s: str) -> bytes:
    return socket.inet_aton(s)


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, frag: int = 0, options: bytes = b"", ttl: int = 64, ident: int = 1) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), ident, frag, ttl, proto, 0, ip4(src), ip4(dst)) + options
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + payload


def icmp(type_: int, ident: int, seq: int = 1, payload: bytes = b"") -> bytes:
    body = struct.pack("!BBHHH", type_, 0, 0, ident, seq) + payload
    return body[:2] + struct.pack("!H", csum(body)) + body[4:]


def test_frame(dst: bytes, src: bytes, seq: int, size: int = 96) -> bytes:
    """A frame of the experimental ethertype carrying ``seq`` and a seq-derived pattern."""
    body = struct.pack("!I", seq) + bytes((seq + i) & 0xFF for i in range(size - 18))
    return eth(dst, src, ETH_TEST, body)


def seq_of(frame: bytes) -> int:
    return struct.unpack_from("!I", frame, 14)[0]


class one_cpu:
    """Pin this thread to one CPU while sending: a veth delivers through per-CPU backlogs,
    so frames sent from two CPUs may be processed out of order (the sender's fault, not ours)."""

    def __enter__(self):
        self.saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(self.saved)})
        return self

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.saved)


# --- namespaces and links ----------------------------------------------------------------


def need_root() -> str | None:
    """Why netns tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, AF_PACKET): run the tests as root"
    if shutil.which("ip") is None:
        return "needs iproute2 (`apt-get install -y iproute2`)"
    return None


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def new_netns(prefix: str = "hpt") -> str:
    """A fresh, quiet netns (IPv6 off so no ND/MLD frames appear on its links)."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        for key in ("all", "default"):
            sh("ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        sh("ip", "-n", name, "link", "set", "lo", "up")
    except BaseException:
        del_netns(name)
        raise
    return name


def del_netns(name: str) -> None:
    sh("ip", "netns", "del", name, check=False)


def add_veth(ns: str, a: str, b: str, *, up: bool = True) -> None:
    sh("ip", "-n", ns, "link", "add", "name", a, "type", "veth", "peer", "name", b)
    if up:
        sh("ip", "-n", ns, "link", "set", a, "up")
        sh("ip", "-n", ns, "link", "set", b, "up")


def link_mac(ns: str, name: str) -> bytes:
    out = json.loads(sh("ip", "-j", "-n", ns, "link", "show", name).stdout)
    return mac(out[0]["address"])


def raw_socket(ns: str, iface: str, *, receive: bool = False) -> socket.socket:
    """A plain AF_PACKET socket on ``iface`` in ``ns``; receiving ones ignore their own sends."""
    from hotplane.shared.af_packet import PACKET_IGNORE_OUTGOING, SOL_PACKET, netns_scope

    with netns_scope(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003) if receive else 0)
        if receive:
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((iface, 0x0003))
        else:
            s.bind((iface, 0))
    return s


def recv_frames(s: socket.socket, n: int, *, timeout: float = 5.0, ethertype: int | None = ETH_TEST) -> list[bytes]:
    """Up to ``n`` frames (of ``ethertype``, None: any) within ``timeout`` seconds."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if not r:
            break
        data, addr = s.recvfrom(65536)
        if addr[2] == 4:  # PACKET_OUTGOING
            continue
        if ethertype is None or struct.unpack_from("!H", data, 12)[0] == ethertype:
            out.append(data)
    return out


# --- slow-path ring access (the burst engine does this with numpy in production) --------


class RxReader:
    """Consume an RX ring (CONTRACTS format) from ``cursor`` on, one slot at a time."""

    def __init__(self, frames: np.ndarray, cursor: int = 0) -> None:
        self.frames = frames
        self.words = frames.view(np.uint32)
        self.n = frames.shape[0]
        self.cursor = cursor
        self.macs: set[int] = set()
        self.nets: set[int] = set()
        self.statuses: list[int] = []

    def take(self, limit: int = 1 << 30) -> list[bytes]:
        out = []
        while len(out) < limit:
            i = self.cursor % self.n
            status = int(self.words[i, 0])
            if not status & 1:
                break
            slot = self.frames[i]
            tp_snaplen = int(self.words[i, 2])
            tp_mac, tp_net = struct.unpack_from("=HH", slot, 12)
            out.append(bytes(slot[tp_mac : tp_mac + tp_snaplen]))
            self.macs.add(tp_mac)
            self.nets.add(tp_net)
            self.statuses.append(status)
            self.words[i, 0] = 0  # hand the slot back to the kernel
            self.cursor += 1
        return out

    def wait(self, fd: int, n: int, *, timeout: float = 5.0, ethertype: int | None = ETH_TEST) -> list[bytes]:
        """Take until ``n`` frames (of ``ethertype``) arrived or ``timeout`` passed."""
        out: list[bytes] = []
        p = select.poll()
        p.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while len(out) < n:
            got = [f for f in self.take() if ethertype is None or struct.unpack_from("!H", f, 12)[0] == ethertype]
            out.extend(got)
            if len(out) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not got:
                p.poll(min(left, 0.05) * 1000)
        return out


class TxWriter:
    """Fill a TX ring (CONTRACTS format) from ``cursor`` on."""

    def __init__(self, frames: np.ndarray, cursor: int = 0) -> None:
        self.frames = frames
        self.words = frames.view(np.uint32)
        self.n = frames.shape[0]
        self.cursor = cursor

    def put(self, frame: bytes) -> bool:
        i = self.cursor % self.n
        if int(self.words[i, 0]) != 0:
            return False  # still owned by the kernel
        self.frames[i, 32 : 32 + len(frame)] = np.frombuffer(frame, np.uint8)
        self.words[i, 1] = len(frame)  # tp_len
        self.words[i, 0] = 1  # TP_STATUS_SEND_REQUEST: publish last
        self.cursor += 1
        return True

    def all_free(self) -> bool:
        return not self.words[:, 0].any()


# --- the child: receives a queue fd and the ring geometry, maps, reads, writes ----------


def child_main(ctl_fd: int) -> int:
    from hotplane.shared.af_packet import map_af_packet_queue

    ctl = socket.socket(fileno=ctl_fd)
    msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 20, 1)
    req = json.loads(msg)
    rx, tx, doorbell = map_af_packet_queue(fds[0], req["ring"])
    os.close(fds[0])  # the mapping and the doorbell keep the socket
    reader = RxReader(rx, req.get("rx_cursor", 0))
    got = reader.wait(doorbell.fileno(), req["expect"], timeout=10.0)
    writer = TxWriter(tx, req.get("tx_cursor", 0))
    sent = 0
    for hexframe in req.get("send", []):
        sent += writer.put(bytes.fromhex(hexframe))
    if sent:
        doorbell()
    reply = {
        "frames": [f.hex() for f in got],
        "rx_cursor": reader.cursor,
        "tx_cursor": writer.cursor,
        "macs": sorted(reader.macs),
        "shape": [list(rx.shape), list(tx.shape)],
        "sent": sent,
        "doorbell": doorbell.counters(),
        "pid": os.getpid(),
    }
    ctl.send(json.dumps(reply).encode())
    ctl.recv(1)  # wait for the parent to say it has read the TX frames
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        sys.exit(child_main(int(sys.argv[2])))
    print("usage: _af_packet_util.py child FD", file=sys.stderr)
    sys.exit(2)
