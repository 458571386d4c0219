"""Steering: which queue of a port a frame belongs to, vectorized over a burst.

Two functions come from docs/CONTRACTS.md ("Steering") and together keep both
directions of a NAT session on one queue (DESIGN invariant 2); the AF_PACKET
fanout cBPF program computes exactly the same thing:

* ``inside`` (traffic from the inside hosts):
  ``h = (src_ip & 0xFFFF) ^ (src_ip >> 16) ^ sport``, ``queue = h % nq``; ``sport`` is
  the TCP/UDP source port or the ICMP echo-request identifier, 0 for fragments
  (MF set or offset != 0), other protocols and other ICMP types; a frame that
  is not IPv4 goes to queue 0.
* ``outside`` (traffic to the NAT's outside addresses):
  ``queue = ((dport - port_lo) // block) % nq`` when ``dport >= port_lo``, else
  ``dport % nq``; ``dport`` is the TCP/UDP destination port or the ICMP
  echo-reply identifier, 0 for fragments, other protocols, other ICMP types and
  non-IPv4 (queue 0).
* ICMP errors (types 3, 4, 5, 11, 12) are steered by the packet they quote
  (starting 8 bytes into the ICMP message), so they reach the worker owning
  its session: ``outside`` uses the quote's *source* port (the translated
  port) as ``dport``, ``inside`` the quote's *destination* port as ``sport``;
  a quoted echo/echo reply gives its identifier to both. The quote must be
  IPv4 (first byte 0x45..0x4F), TCP/UDP with both ports inside the frame or
  ICMP echo/echo reply with its identifier inside the frame; otherwise the
  port is 0 (a short quote is *not* a short frame: no queue 0 for it).

The NAT allocates a session's outside port (or ICMP identifier) from the
block of the queue that saw the inside packet, ``[port_lo + q*block,
port_lo + (q+1)*block)``, so the replies come back to that queue.

Details that make the numpy and cBPF versions agree:

* "IPv4" means ethertype 0x0800 right after the MAC addresses (a VLAN-tagged
  frame is not IPv4 here) and a version/IHL byte in 0x45..0x4F; the header
  length is ``4 * IHL``, as cBPF's ``ldxb 4*([14]&0xf)`` computes it.
* A frame too short for a field the function reads goes to queue 0 (a cBPF
  load beyond the packet ends the program with 0). The inside function reads
  the source address (bytes 26..29) of every IPv4 frame; both read the
  protocol and fragment fields; ports are read only for unfragmented TCP/UDP,
  the ICMP type only for unfragmented ICMP, the identifier only for the echo
  types that use it.

A third mode, ``rss``, is a software RSS as a NIC does it: a Toeplitz hash of
(src, dst[, sport, dport]) and a 128-entry indirection table. It spreads load
well for ring ports fed by a generator but is *not* symmetric and knows
nothing of NAT port blocks: only the ``inside``/``outside`` pair guarantees
DESIGN invariant 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

MODES = ("inside", "outside", "rss")
DEFAULT_PORT_LO = 1024
ETHERTYPE_IPV4 = 0x0800
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
ICMP_ERRORS = (3, 4, 5, 11, 12)  # unreachable, source quench, redirect, time exceeded, parameter problem
RSS_TABLE_SIZE = 128

# The 40-byte key most NICs ship with (the one in Microsoft's RSS verification suite).
DEFAULT_RSS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)

_L4_SPAN = 6  # bytes read from the L4 header: ports (0..3) or ICMP type (0) and identifier (4..5)


def default_block(nqueues: int, port_lo: int = DEFAULT_PORT_LO) -> int:
    """The NAT port block per queue when the config names none: ``(65536 - port_lo) // nq``."""
    if nqueues < 1:
        raise ValueError(f"steering: nqueues must be at least 1, got {nqueues}")
    if not 0 <= port_lo < 65536:
        raise ValueError(f"steering: port_lo must be a port number, got {port_lo}")
    return max(1, (65536 - port_lo) // nqueues)


class _Fields:
    """What steering reads from a burst of frames, all as int64 arrays / bool masks."""

    __slots__ = ("n", "frames", "length", "ipv4", "tcpudp", "icmp", "l4", "src_hi", "src_lo", "dst_hi", "dst_lo", "p0", "p1", "icmp_type", "icmp_id")


def _parse(frames: np.ndarray, lengths: np.ndarray | None) -> _Fields:
    if frames.ndim != 2 or frames.dtype != np.uint8:
        raise ValueError(f"steering: frames must be a 2-d uint8 array, got {frames.dtype} {frames.shape}")
    n, width = frames.shape
    f = _Fields()
    f.n = n
    f.frames = frames
    if lengths is None:
        length = np.full(n, width, dtype=np.int64)
    else:
        length = np.minimum(np.asarray(lengths, dtype=np.int64)[:n], width)
    f.length = length
    if width < 14:
        # Not even an Ethernet header: every frame is "too short".
        z = np.zeros(n, dtype=np.int64)
        f.ipv4 = f.tcpudp = f.icmp = np.zeros(n, dtype=bool)
        f.l4 = f.src_hi = f.src_lo = f.dst_hi = f.dst_lo = f.p0 = f.p1 = f.icmp_type = f.icmp_id = z
        return f
    # Pad to the widest offset we may read so column indexing never fails; the
    # padded bytes belong to frames the length checks send to queue 0 anyway.
    need = 14 + 60 + _L4_SPAN
    if width < need:
        wide = np.zeros((n, need), dtype=np.uint8)
        wide[:, :width] = frames
        frames = wide
    col = frames
    ether = (col[:, 12].astype(np.int64) << 8) | col[:, 13]
    vihl = col[:, 14]
    ipv4 = (length >= 15) & (ether == ETHERTYPE_IPV4) & (vihl >= 0x45) & (vihl <= 0x4F)
    l4 = 14 + 4 * (vihl.astype(np.int64) & 0xF)
    proto = col[:, 23]
    frag = ((col[:, 20] & 0x3F) != 0) | (col[:, 21] != 0)
    whole = ipv4 & ~frag
    f.ipv4 = ipv4
    f.tcpudp = whole & ((proto == IPPROTO_TCP) | (proto == IPPROTO_UDP))
    f.icmp = whole & (proto == IPPROTO_ICMP)
    f.l4 = l4
    f.src_hi = (col[:, 26].astype(np.int64) << 8) | col[:, 27]
    f.src_lo = (col[:, 28].astype(np.int64) << 8) | col[:, 29]
    f.dst_hi = (col[:, 30].astype(np.int64) << 8) | col[:, 31]
    f.dst_lo = (col[:, 32].astype(np.int64) << 8) | col[:, 33]
    b = col[np.arange(n)[:, None], l4[:, None] + np.arange(_L4_SPAN)].astype(np.int64)
    f.p0 = (b[:, 0] << 8) | b[:, 1]
    f.p1 = (b[:, 2] << 8) | b[:, 3]
    f.icmp_type = b[:, 0]
    f.icmp_id = (b[:, 4] << 8) | b[:, 5]
    return f


_QUOTE_SPAN = 60 + 6  # bytes of a quote read: its header (IHL <= 15) and 6 L4 bytes


def _quoted_port(f: _Fields, err: np.ndarray, off: int) -> np.ndarray:
    """Per frame: for the ICMP errors in ``err`` (outer type readable), the port at ``off``
    (0: source, 2: destination) of the quoted TCP/UDP packet or the quoted echo/echo-reply
    identifier; 0 for every other frame and for quotes that are not IPv4 (first byte
    0x45..0x4F), of another protocol or type, or too short for the bytes read.

    Only the rows of ``err`` are parsed: one gather of a fixed window from the start
    of each quote (at clipped columns; a byte is used only when the length check
    shows it lies inside the frame), then small per-row picks from that window.
    """
    port = np.zeros(f.n, dtype=np.int64)
    rows = np.flatnonzero(err)
    if rows.size == 0:
        return port
    frames = f.frames
    e = f.l4[rows] + 8  # the quote follows the 8-byte ICMP header
    avail = f.length[rows] - e  # bytes of the quote inside the frame (may be negative)
    cols = np.minimum(e[:, None] + np.arange(_QUOTE_SPAN), frames.shape[1] - 1)
    win = frames[rows[:, None], cols].astype(np.int64)
    k = np.arange(rows.size)
    vihl = win[:, 0]
    el4 = 4 * (vihl & 0xF)  # relative to the quote
    eproto = win[:, 9]
    etype = win[k, el4]
    ports = (eproto == IPPROTO_TCP) | (eproto == IPPROTO_UDP)
    echo = (eproto == IPPROTO_ICMP) & ((etype == ICMP_ECHO_REPLY) | (etype == ICMP_ECHO_REQUEST))
    ok = (avail >= 24) & (vihl >= 0x45) & (vihl <= 0x4F)
    ok &= (ports & (avail >= el4 + 4)) | (echo & (avail >= el4 + 6))
    at = np.where(ports, el4 + off, el4 + 4)
    port[rows] = np.where(ok, (win[k, at] << 8) | win[k, at + 1], 0)
    return port


def _icmp_errors(f: _Fields) -> np.ndarray | None:
    """Unfragmented IPv4 ICMP errors whose type byte lies inside the frame (None: no ICMP at all)."""
    if not f.icmp.any():
        return None
    t = f.icmp_type
    return f.icmp & (f.length >= f.l4 + 1) & (((t >= 3) & (t <= 5)) | (t == 11) | (t == 12))


def steer_inside(frames: np.ndarray, lengths: np.ndarray | None, nqueues: int) -> np.ndarray:
    """Queue index (int64) per frame for an inside port: source address and source port/echo-request id."""
    f = _parse(frames, lengths)
    L = f.length
    echo = f.icmp & (f.icmp_type == ICMP_ECHO_REQUEST)
    sport = np.where(f.tcpudp, f.p0, np.where(echo, f.icmp_id, 0))
    err = _icmp_errors(f)
    if err is not None and err.any():
        sport = np.where(err, _quoted_port(f, err, 2), sport)  # the quote's destination port
    h = np.where(f.ipv4, f.src_hi ^ f.src_lo ^ sport, 0)
    short = (L < 14) | (f.ipv4 & (L < 30))
    short |= f.tcpudp & (L < f.l4 + 2)
    short |= f.icmp & (L < f.l4 + 1)
    short |= echo & (L < f.l4 + 6)
    return np.where(short, 0, h % nqueues)


def steer_outside(frames: np.ndarray, lengths: np.ndarray | None, nqueues: int, port_lo: int = DEFAULT_PORT_LO, block: int | None = None) -> np.ndarray:
    """Queue index (int64) per frame for an outside port: the NAT port block of the destination port/echo-reply id."""
    if block is None:
        block = default_block(nqueues, port_lo)
    if block < 1:
        raise ValueError(f"steering: block must be at least 1, got {block}")
    f = _parse(frames, lengths)
    L = f.length
    reply = f.icmp & (f.icmp_type == ICMP_ECHO_REPLY)
    dport = np.where(f.tcpudp, f.p1, np.where(reply, f.icmp_id, 0))
    err = _icmp_errors(f)
    if err is not None and err.any():
        dport = np.where(err, _quoted_port(f, err, 0), dport)  # the quote's source port: the translated one
    q = np.where(dport >= port_lo, ((dport - port_lo) // block) % nqueues, dport % nqueues)
    short = (L < 14) | (f.ipv4 & (L < 24))
    short |= f.tcpudp & (L < f.l4 + 4)
    short |= f.icmp & (L < f.l4 + 1)
    short |= reply & (L < f.l4 + 6)
    return np.where(short, 0, q)


# -- Toeplitz hash (software RSS) ----------------------------------------------


@lru_cache(maxsize=16)
def _toeplitz_table(key: bytes, nbytes: int) -> np.ndarray:
    """``T[p, v]``: the hash contribution of byte value ``v`` at input position ``p``.

    The Toeplitz hash XORs, for every set input bit ``b`` (most significant
    bit of byte 0 first), the 32-bit window of the key that starts at key bit
    ``b``. That is linear in the input, so a byte's contribution depends only
    on its position and value and can be tabulated.
    """
    if nbytes + 4 > len(key):
        raise ValueError(f"toeplitz: a {len(key)}-byte key hashes at most {len(key) - 4} bytes of input, got {nbytes}")
    k = int.from_bytes(key, "big")
    kbits = 8 * len(key)
    windows = np.array([(k >> (kbits - 32 - b)) & 0xFFFF_FFFF for b in range(8 * nbytes)], dtype=np.uint32)
    values = np.arange(256)
    bits = ((values[:, None] >> (7 - np.arange(8))) & 1).astype(bool)  # [256, 8], bit 7 first
    table = np.zeros((nbytes, 256), dtype=np.uint32)
    for p in range(nbytes):
        win = windows[8 * p : 8 * p + 8]
        table[p] = np.bitwise_xor.reduce(np.where(bits, win, np.uint32(0)), axis=1)
    table.flags.writeable = False
    return table


def toeplitz_hash(key40: bytes, data: np.ndarray) -> np.ndarray:
    """Toeplitz hash (uint32) of each row of ``data`` (``uint8[n, L]``, L <= len(key) - 4) under ``key40``."""
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim == 1:
        data = data[None, :]
    n, nbytes = data.shape
    if nbytes == 0:
        return np.zeros(n, dtype=np.uint32)
    table = _toeplitz_table(bytes(key40), nbytes)
    return np.bitwise_xor.reduce(table[np.arange(nbytes), data], axis=1).astype(np.uint32)


def default_indirection(nqueues: int) -> np.ndarray:
    """The usual 128-entry indirection table: entry ``i`` -> queue ``i % nq``."""
    return (np.arange(RSS_TABLE_SIZE) % nqueues).astype(np.int64)


def rss_hash(frames: np.ndarray, lengths: np.ndarray | None, key40: bytes = DEFAULT_RSS_KEY) -> np.ndarray:
    """RSS hash per frame: 4-tuple for unfragmented TCP/UDP, 2-tuple for other IPv4, 0 otherwise."""
    f = _parse(frames, lengths)
    n = f.n
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    L = f.length
    tup = np.empty((n, 12), dtype=np.uint8)
    for j, word in enumerate((f.src_hi, f.src_lo, f.dst_hi, f.dst_lo, f.p0, f.p1)):
        tup[:, 2 * j] = word >> 8
        tup[:, 2 * j + 1] = word & 0xFF
    ip_ok = f.ipv4 & (L >= 34)
    ports_ok = f.tcpudp & ip_ok & (L >= f.l4 + 4)
    h2 = toeplitz_hash(key40, tup[:, :8])
    # The hash is linear: the 4-tuple hash is the 2-tuple hash XOR the ports' part.
    ports_part = np.bitwise_xor.reduce(_toeplitz_table(bytes(key40), 12)[np.arange(8, 12), tup[:, 8:12]], axis=1)
    h = np.where(ports_ok, h2 ^ ports_part, h2)
    return np.where(ip_ok, h, 0).astype(np.uint32)


def steer_rss(frames: np.ndarray, lengths: np.ndarray | None, nqueues: int, key40: bytes = DEFAULT_RSS_KEY, indirection: np.ndarray | None = None) -> np.ndarray:
    """Queue index per frame by software RSS (Toeplitz hash, 128-entry indirection table)."""
    table = default_indirection(nqueues) if indirection is None else np.asarray(indirection, dtype=np.int64)
    if table.shape != (RSS_TABLE_SIZE,) or table.min(initial=0) < 0 or table.max(initial=0) >= nqueues:
        raise ValueError(f"steering: the RSS indirection table must have {RSS_TABLE_SIZE} entries in [0, {nqueues})")
    return table[rss_hash(frames, lengths, key40) & (RSS_TABLE_SIZE - 1)]


@dataclass
class Steering:
    """A port's steering function with its parameters; call it on a burst to get queue indexes."""

    mode: str
    nqueues: int
    port_lo: int = DEFAULT_PORT_LO
    block: int | None = None
    key: bytes = DEFAULT_RSS_KEY
    indirection: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"steering: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.nqueues < 1:
            raise ValueError(f"steering: nqueues must be at least 1, got {self.nqueues}")
        if self.block is None:
            self.block = default_block(self.nqueues, self.port_lo)
        if len(self.key) != 40:
            raise ValueError(f"steering: the RSS key must be 40 bytes, got {len(self.key)}")

    def __call__(self, frames: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        if self.nqueues == 1:
            return np.zeros(frames.shape[0], dtype=np.int64)
        if self.mode == "inside":
            return steer_inside(frames, lengths, self.nqueues)
        if self.mode == "outside":
            return steer_outside(frames, lengths, self.nqueues, self.port_lo, self.block)
        return steer_rss(frames, lengths, self.nqueues, self.key, self.indirection)

    def port_block(self, queue: int) -> range:
        """The outside ports (or ICMP ids) the NAT allocates for sessions seen on ``queue``."""
        lo = self.port_lo + queue * self.block
        return range(lo, min(lo + self.block, 65536))
