"""Helpers for the port tests: aligned buffers, shared mappings, frame builders."""

from __future__ import annotations

import mmap
import struct

import numpy as np

from hotplane.shared.burst import Queue, QueueState
from hotplane.shared.frame_ring import FrameRing


def aligned(nbytes: int) -> np.ndarray:
    """A zeroed, 64-byte aligned uint8 buffer of ``nbytes`` (private memory)."""
    raw = np.zeros(nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + nbytes]


def shared(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """An anonymous MAP_SHARED mapping (inherited by forked children) and its uint8 view."""
    mm = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE))
    return mm, np.frombuffer(mm, dtype=np.uint8)[:nbytes]


def make_queue(nslots: int = 64, frame_size: int = 256, *, doorbell=None) -> tuple[Queue, QueueState]:
    rx = FrameRing.create(aligned(FrameRing.zone_size(nslots, frame_size)), nslots, frame_size)
    tx = FrameRing.create(aligned(FrameRing.zone_size(nslots, frame_size)), nslots, frame_size)
    qs = QueueState.create(aligned(QueueState.zone_size(1)), 1)
    return Queue(rx, tx, qs.words[0], doorbell), qs


def random_frames(rng: np.random.Generator, n: int, width: int, lo: int = 14, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random frames of random lengths in [lo, hi] in a ``uint8[n, width]`` array; the first bytes carry a serial number."""
    hi = width if hi is None else hi
    frames = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
    lengths = rng.integers(lo, hi + 1, size=n).astype(np.uint32)
    serial = np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 4)
    frames[:, 0:4] = serial
    return frames, lengths


def as_bytes(frames: np.ndarray, lengths) -> list[bytes]:
    return [bytes(frames[i, : int(lengths[i])]) for i in range(len(lengths))]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_frame(
    src: int,
    dst: int,
    proto: int,
    l4: bytes,
    *,
    frag: int = 0,
    ihl: int = 5,
    ethertype: int = 0x0800,
    ttl: int = 64,
) -> bytes:
    """Ethernet + IPv4 header (``ihl`` words, ``frag`` = flags/offset field) + ``l4`` bytes."""
    opts = b"\x01" * (4 * ihl - 20)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), 1, frag, ttl, proto, 0, src.to_bytes(4, "big"), dst.to_bytes(4, "big")) + opts
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    eth = bytes.fromhex("020000000002020000000001") + struct.pack("!H", ethertype)
    return eth + hdr + l4


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 65535, 0, 0)


def icmp_echo(icmp_type: int, ident: int, seq: int = 1) -> bytes:
    return struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + b"ping"


def to_array(frames: list[bytes], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    width = width or max(len(f) for f in frames)
    a = np.zeros((len(frames), width), dtype=np.uint8)
    for i, f in enumerate(frames):
        a[i, : len(f)] = np.frombuffer(f, dtype=np.uint8)
    return a, np.array([len(f) for f in frames], dtype=np.uint32)
