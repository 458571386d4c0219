"""Vectorized packet parsing and header rewriting for bursts, plus slow-path builders.

A burst is ``frames[n, slot_size]`` (``uint8``, one Ethernet frame per row
starting at column 0, garbage after its length; usually a view into a ring)
with ``lengths[n]``. :func:`parse_burst` fills a preallocated
:class:`ParsedBurst` with one numpy array per header field; the rewrite helpers
(:func:`set_ipv4_src`, :func:`set_ipv4_dst`, :func:`set_l4_sport`,
:func:`set_l4_dport`, :func:`snat`, :func:`dnat`, :func:`decrement_ttl`,
:func:`rewrite_macs`) change the selected rows in place and update the IPv4
and L4 checksums incrementally (RFC 1624). Nothing on this path loops over
packets in Python. :func:`parse_frame` is the per-packet ``struct`` twin of
:func:`parse_burst` (same rules), for the slow path and as a test reference.

Selections: the rewrite helpers take ``sel`` = None (every row), a boolean
mask over the burst, or an array of *unique* row indices; rows that are not
``valid`` are skipped (never written). Values are a scalar, one per selected
row (in selection order), or -- for a mask/None selection -- one per burst row.

Supported: Ethernet II with at most one 802.1Q tag; IPv4 with options; TCP,
UDP and ICMP. Everything else gets a :class:`DropReason` and ``valid = False``;
hostile input never raises and is never read outside its row.

The builders at the bottom (:func:`build_ipv4_udp`, :func:`build_ipv4_tcp`,
:func:`build_icmp_echo`, :func:`build_icmp_error`, :func:`build_arp_request`,
:func:`build_arp_reply`) are plain per-packet Python for the slow path, the
traffic generator and the tests; they return ``bytes`` with correct checksums.

Addresses are host-order integers in the arrays (``uint32``); on the wire
every multi-byte field is big-endian.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence, Union

import numpy as np

from hotplane.shared.checksum import (
    csum_replace16,
    csum_replace32,
    csum_replace_addr_port,
    internet_checksum,
    pseudo_header_sum_scalar,
    udp_csum_fixup,
)

ETH_HLEN = 14
VLAN_HLEN = 4
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_IPV6 = 0x86DD

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

#: ICMP messages that carry an identifier at bytes 4-5 (echo reply/request,
#: timestamp request/reply); NAT treats that identifier as the "port".
ICMP_QUERY_TYPES = (0, 8, 13, 14)
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAM_PROBLEM = 12

#: Bytes of each frame copied into the parse scratch window: Ethernet + VLAN
#: tag (18) + the longest IPv4 header (60) + the L4 bytes we read (20).
_WIN = ETH_HLEN + VLAN_HLEN + 60 + 20
_L4W = 20
#: Largest IPv4 datagram an ICMP error may grow to (RFC 1812 4.3.2.3).
ICMP_ERROR_MAX = 576

MacLike = Union[bytes, bytearray, str, Sequence[int], np.ndarray]
IpLike = Union[int, str, ipaddress.IPv4Address]


class DropReason(IntEnum):
    """Why ``parse_burst`` (or a later stage) marked a row invalid. Stored as ``uint8``.

    Codes are stable (they index per-reason counters in shared memory):
    append new ones, never renumber.
    """

    OK = 0
    #: shorter than an Ethernet header (14 bytes, 18 with an 802.1Q tag)
    RUNT = 1
    #: descriptor length larger than the slot it sits in
    OVERSIZE = 2
    #: ethertype is not IPv4 (ARP, IPv6, stacked VLAN tags...); see ``ethertype``
    NOT_IPV4 = 3
    #: frame ends inside the IPv4 header or before the IPv4 total length
    TRUNCATED = 4
    #: version != 4, IHL < 5, or total length < header length
    BAD_IP_HEADER = 5
    BAD_IP_CHECKSUM = 6
    #: MF set or fragment offset != 0 (no reassembly on the fast path)
    FRAGMENT = 7
    #: TTL below ``min_ttl`` at parse time, or <= 1 at :func:`decrement_ttl`
    TTL_EXPIRED = 8
    #: IPv4 payload is not TCP, UDP or ICMP
    UNSUPPORTED_PROTOCOL = 9
    #: L4 header does not fit the IPv4 payload (or bad TCP data offset / UDP length)
    MALFORMED_L4 = 10


# The checks of parse_burst in priority order: the first that fails names the
# drop reason. (Several checks can share a reason.)
_CHECKS = (
    ("OVERSIZE", DropReason.OVERSIZE),
    ("RUNT", DropReason.RUNT),
    ("NOT_IPV4", DropReason.NOT_IPV4),
    ("SHORT_HDR", DropReason.TRUNCATED),  # frame ends before 20 bytes of IPv4 header
    ("BAD_VER_IHL", DropReason.BAD_IP_HEADER),  # version != 4 or IHL < 5
    ("SHORT_OPTS", DropReason.TRUNCATED),  # frame ends inside the options
    ("BAD_TOTLEN", DropReason.BAD_IP_HEADER),  # total length < header length
    ("SHORT_TOTLEN", DropReason.TRUNCATED),  # frame ends before total length
    ("CHECKSUM", DropReason.BAD_IP_CHECKSUM),
    ("FRAGMENT", DropReason.FRAGMENT),
    ("TTL", DropReason.TTL_EXPIRED),
    ("PROTO", DropReason.UNSUPPORTED_PROTOCOL),
    ("L4", DropReason.MALFORMED_L4),
)
_NCHECKS = len(_CHECKS)
_CHECK_CODES_OK = np.array([int(code) for _, code in _CHECKS] + [int(DropReason.OK)], dtype=np.uint8)
(
    _C_OVERSIZE,
    _C_RUNT,
    _C_NOT_IPV4,
    _C_SHORT_HDR,
    _C_BAD_VER_IHL,
    _C_SHORT_OPTS,
    _C_BAD_TOTLEN,
    _C_SHORT_TOTLEN,
    _C_CHECKSUM,
    _C_FRAGMENT,
    _C_TTL,
    _C_PROTO,
    _C_L4,
) = range(_NCHECKS)

_ICMP_QUERY_LUT = np.zeros(256, dtype=np.bool_)
_ICMP_QUERY_LUT[list(ICMP_QUERY_TYPES)] = True
_L4_CSUM_LUT = np.zeros(256, dtype=np.uint16)  # checksum offset within the L4 header
_L4_CSUM_LUT[IPPROTO_TCP] = 16
_L4_CSUM_LUT[IPPROTO_UDP] = 6
_L4_CSUM_LUT[IPPROTO_ICMP] = 2

_FIELDS: dict[str, np.dtype] = {
    "ethertype": np.dtype(np.uint16),  # inner ethertype when tagged
    "has_vlan": np.dtype(np.bool_),
    "vlan_tci": np.dtype(np.uint16),  # 0 when untagged
    "l3_off": np.dtype(np.uint16),  # 14, or 18 when tagged
    "l4_off": np.dtype(np.uint16),  # l3_off + ihl * 4
    "ihl": np.dtype(np.uint8),  # in 32-bit words
    "ip_total_len": np.dtype(np.uint16),
    "l4_len": np.dtype(np.uint16),  # ip_total_len - ihl * 4 (0 if negative)
    "proto": np.dtype(np.uint8),
    "ttl": np.dtype(np.uint8),
    "src": np.dtype(np.uint32),  # host order
    "dst": np.dtype(np.uint32),
    "frag": np.dtype(np.bool_),
    "sport": np.dtype(np.uint16),  # TCP/UDP source port; ICMP query identifier
    "dport": np.dtype(np.uint16),  # TCP/UDP destination port; ICMP query identifier
    "tcp_flags": np.dtype(np.uint8),  # 0 unless TCP
    "icmp_type": np.dtype(np.uint8),  # 0 unless ICMP
    "icmp_code": np.dtype(np.uint8),
    "l4_csum_off": np.dtype(np.uint16),  # frame column of the L4 checksum; 0 = none
    "valid": np.dtype(np.bool_),
    "drop_reason": np.dtype(np.uint8),  # DropReason
}


class ParsedBurst:
    """Preallocated per-field arrays for one burst, filled by :func:`parse_burst`.

    Every field in ``FIELDS`` is an array of length ``capacity``; after a parse
    the first ``n`` entries are meaningful. A field is meaningful for a row as
    far as that row parsed: L3 fields once the ethertype is IPv4 and the header
    fits, L4 fields only for valid rows. ``valid[i]`` is ``drop_reason[i] == OK``.
    ``sport``/``dport`` hold the identifier for ICMP query messages (echo,
    timestamp) and 0 for other ICMP types.
    """

    FIELDS = tuple(_FIELDS)

    ethertype: np.ndarray
    has_vlan: np.ndarray
    vlan_tci: np.ndarray
    l3_off: np.ndarray
    l4_off: np.ndarray
    ihl: np.ndarray
    ip_total_len: np.ndarray
    l4_len: np.ndarray
    proto: np.ndarray
    ttl: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    frag: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    tcp_flags: np.ndarray
    icmp_type: np.ndarray
    icmp_code: np.ndarray
    l4_csum_off: np.ndarray
    valid: np.ndarray
    drop_reason: np.ndarray

    def __init__(self, capacity: int = 512) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.n = 0
        for name, dt in _FIELDS.items():
            setattr(self, name, np.zeros(capacity, dtype=dt))
        # Scratch reused by every parse: the header window of each frame and
        # the L4 window of each IPv4 packet (both C-contiguous).
        self._win = np.zeros((capacity, _WIN), dtype=np.uint8)
        self._l4 = np.zeros((capacity, _L4W), dtype=np.uint8)
        self._h16 = np.zeros((capacity, 10), dtype=np.uint16)
        self._l16 = np.zeros((capacity, _L4W // 2), dtype=np.uint16)
        self._acc = np.zeros(capacity, dtype=np.uint64)
        self._u16 = np.zeros(capacity, dtype=np.uint16)
        self._u8 = np.zeros(capacity, dtype=np.uint8)
        self._i32 = np.zeros((7, capacity), dtype=np.int32)
        self._b = np.zeros((6, capacity), dtype=np.bool_)
        self._checks = np.zeros((_NCHECKS + 1, capacity), dtype=np.bool_)
        self._checks[_NCHECKS] = True  # sentinel: "no check failed"
        self._first = np.zeros(capacity, dtype=np.intp)

    def row(self, i: int) -> dict[str, int | bool]:
        """One row as a dict of Python scalars (slow path, debugging, tests)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {name: getattr(self, name)[i].item() for name in _FIELDS}

    def reason_counts(self) -> np.ndarray:
        """Rows per :class:`DropReason` in the last parse (``bincount`` over codes)."""
        return np.bincount(self.drop_reason[: self.n], minlength=len(DropReason))


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def _be16(win: np.ndarray, n: int, col: int) -> np.ndarray:
    """A strided big-endian 16-bit view of column ``col`` of the first n rows of a C-contiguous scratch."""
    return np.ndarray((n,), dtype=">u2", buffer=win, offset=col, strides=(win.shape[1],))


def _be32(win: np.ndarray, n: int, col: int) -> np.ndarray:
    return np.ndarray((n,), dtype=">u4", buffer=win, offset=col, strides=(win.shape[1],))


def parse_burst(frames: np.ndarray, lengths: np.ndarray, out: ParsedBurst, *, min_ttl: int = 1) -> int:
    """Parse ``frames[:n]`` (``n = len(lengths)``) into ``out``; return how many rows are valid.

    ``frames`` is a 2-D ``uint8`` array (a ring view is fine: only the last axis
    needs to be contiguous); ``lengths`` the frame lengths. Rows whose length
    exceeds the row are ``OVERSIZE``. The header window of each row (up to 98
    bytes, clipped to the row) is copied once into scratch held by ``out``;
    all fields are read from there, so no index ever leaves a row.

    ``min_ttl``: rows with ``ttl < min_ttl`` get ``TTL_EXPIRED`` (default 1:
    only TTL 0, which no sender may emit; a router forwarding a packet checks
    ``ttl <= 1`` in :func:`decrement_ttl` instead, because a TTL-1 packet
    addressed to the gateway itself is fine).

    Raises only for programming errors (wrong dtype or shape, burst larger
    than ``out.capacity``), never because of packet contents.
    """
    if frames.ndim != 2 or frames.dtype != np.uint8:
        raise TypeError("frames must be a 2-D uint8 array")
    lengths = np.asarray(lengths)
    n = int(lengths.shape[0])
    if n > out.capacity:
        raise ValueError(f"burst of {n} exceeds ParsedBurst capacity {out.capacity}")
    if frames.shape[0] < n:
        raise ValueError("fewer frame rows than lengths")
    out.n = n
    if n == 0:
        return 0
    slot = frames.shape[1]

    # 1. Copy the header window of every row into contiguous scratch; from
    # here on nothing reads the frames, so no index can leave a row.
    win = out._win[:n]
    w = min(slot, _WIN)
    win[:, :w] = frames[:n, :w]
    if w < _WIN:
        win[:, w:] = 0
    I = out._i32[:, :n]  # int32 working rows: lengths and offsets compare without casts
    B = out._b[:, :n]  # bool working rows
    C = out._checks[:, :n]  # one row per check, in priority order (see _CHECKS)
    flen = I[0]
    np.minimum(lengths, slot, out=flen, casting="unsafe")
    np.greater(lengths, slot, out=C[_C_OVERSIZE])

    # 2. Ethernet + optional 802.1Q tag.
    eth = out.ethertype[:n]
    np.copyto(eth, _be16(out._win, n, 12))
    has_vlan = out.has_vlan[:n]
    np.equal(eth, ETHERTYPE_VLAN, out=has_vlan)
    vlan_tci = out.vlan_tci[:n]
    vlan_tci[:] = 0
    l3_off = out.l3_off[:n]
    l3_off[:] = ETH_HLEN
    np.less(flen, ETH_HLEN, out=C[_C_RUNT])
    vl = np.flatnonzero(has_vlan)
    if vl.size:
        vlan_tci[vl] = _be16(out._win, n, 14)[vl]
        eth[vl] = _be16(out._win, n, 16)[vl]
        l3_off[vl] = ETH_HLEN + VLAN_HLEN
        C[_C_RUNT, vl] |= flen[vl] < ETH_HLEN + VLAN_HLEN
        # Shift tagged rows left by 4 so that the IPv4 header starts at column
        # 14 for every row; the tag itself has been read already.
        win[vl, ETH_HLEN : _WIN - VLAN_HLEN] = win[vl, ETH_HLEN + VLAN_HLEN : _WIN]
    np.not_equal(eth, ETHERTYPE_IPV4, out=C[_C_NOT_IPV4])
    avail = I[1]  # bytes of the frame from the start of the IPv4 header
    np.subtract(flen, l3_off, out=avail, casting="unsafe")
    np.less(avail, 20, out=C[_C_SHORT_HDR])

    # 3. IPv4 header (at column 14 of the window for every row now), its ten
    # 16-bit words byte-swapped into native order in one copy.
    L3 = ETH_HLEN
    h16 = out._h16[:n]
    np.copyto(h16, win[:, L3 : L3 + 20].view(">u2"))
    vihl = win[:, L3]
    ihl = out.ihl[:n]
    np.bitwise_and(vihl, 0x0F, out=ihl)
    # version 4 and IHL >= 5  <=>  0x45 <= vihl <= 0x4F  <=>  (vihl - 0x45) mod 256 <= 10
    u8 = out._u8[:n]
    np.subtract(vihl, np.uint8(0x45), out=u8)
    np.greater(u8, 10, out=C[_C_BAD_VER_IHL])
    hlen = I[2]
    np.left_shift(ihl, 2, out=hlen, casting="unsafe")
    np.less(avail, hlen, out=C[_C_SHORT_OPTS])
    tot = I[3]
    np.copyto(tot, h16[:, 1])
    np.copyto(out.ip_total_len[:n], h16[:, 1])
    np.less(tot, hlen, out=C[_C_BAD_TOTLEN])
    np.less(avail, tot, out=C[_C_SHORT_TOTLEN])
    frag = out.frag[:n]
    np.bitwise_and(h16[:, 3], 0x3FFF, out=out._u16[:n])  # MF bit or a non-zero offset
    np.not_equal(out._u16[:n], 0, out=frag)
    np.copyto(C[_C_FRAGMENT], frag)
    ttl = out.ttl[:n]
    np.copyto(ttl, win[:, L3 + 8])
    np.less(ttl, min_ttl, out=C[_C_TTL])
    proto = out.proto[:n]
    np.copyto(proto, win[:, L3 + 9])
    np.copyto(out.src[:n], _be32(out._win, n, L3 + 12))
    np.copyto(out.dst[:n], _be32(out._win, n, L3 + 16))
    l3_end = I[4]  # where the L4 header starts
    np.add(l3_off, hlen, out=l3_end, casting="unsafe")
    np.copyto(out.l4_off[:n], l3_end, casting="unsafe")

    # Header checksum. The one's-complement sum does not depend on byte order
    # (RFC 1071 2.B) and 2**16 == 1 (mod 0xFFFF), so we add the header as five
    # native 32-bit words and test the sum modulo 0xFFFF: intact iff the sum is
    # a non-zero multiple of 0xFFFF. (A zero sum means a zero first byte, which
    # fails the version check first.)
    acc = out._acc[:n]
    words = win[:, L3 : L3 + 20].view("<u4")
    np.copyto(acc, words[:, 0])
    for k in range(1, 5):
        np.add(acc, words[:, k], out=acc)
    opt_rows = np.flatnonzero(ihl > 5)
    if opt_rows.size:
        opt = win[opt_rows, L3 + 20 : L3 + 60].view("<u4")  # gathered copy, contiguous
        nwords = (ihl[opt_rows].astype(np.int32) - 5)[:, None]
        acc[opt_rows] += np.where(np.arange(10)[None, :] < nwords, opt, 0).sum(axis=1, dtype=np.uint64)
    np.remainder(acc, 0xFFFF, out=acc)
    np.not_equal(acc, 0, out=C[_C_CHECKSUM])

    # 4. L4: 20 bytes after the IPv4 header (gathered only for rows with
    # options), as bytes and as native 16-bit words.
    l4w = out._l4[:n]
    l4w[:] = win[:, L3 + 20 : L3 + 20 + _L4W]
    if opt_rows.size:
        cols = (L3 + hlen[opt_rows])[:, None] + np.arange(_L4W)[None, :]  # <= 14+60+19 < _WIN
        l4w[opt_rows] = win[opt_rows[:, None], cols]
    l16 = out._l16[:n]
    np.copyto(l16, l4w.view(">u2"))
    is_tcp, is_udp, is_icmp, tcpudp, icmp_q, ports = B[0], B[1], B[2], B[3], B[4], B[5]
    np.equal(proto, IPPROTO_TCP, out=is_tcp)
    np.equal(proto, IPPROTO_UDP, out=is_udp)
    np.equal(proto, IPPROTO_ICMP, out=is_icmp)
    np.logical_or(is_tcp, is_udp, out=tcpudp)
    np.logical_or(tcpudp, is_icmp, out=C[_C_PROTO])
    np.logical_not(C[_C_PROTO], out=C[_C_PROTO])
    itype = l4w[:, 0]
    np.take(_ICMP_QUERY_LUT, itype, out=icmp_q)
    np.logical_and(icmp_q, is_icmp, out=icmp_q)
    np.logical_or(tcpudp, icmp_q, out=ports)
    sport = out.sport[:n]
    dport = out.dport[:n]
    np.copyto(sport, l16[:, 0])
    np.copyto(dport, l16[:, 1])
    np.copyto(sport, l16[:, 2], where=icmp_q)  # the identifier is both "ports"
    np.copyto(dport, l16[:, 2], where=icmp_q)
    np.multiply(sport, ports, out=sport)
    np.multiply(dport, ports, out=dport)
    np.multiply(l4w[:, 13], is_tcp, out=out.tcp_flags[:n])
    np.multiply(itype, is_icmp, out=out.icmp_type[:n])
    np.multiply(l4w[:, 1], is_icmp, out=out.icmp_code[:n])
    co = out.l4_csum_off[:n]
    csum_rel = out._u16[:n]
    np.take(_L4_CSUM_LUT, proto, out=csum_rel)  # 16 / 6 / 2 for TCP / UDP / ICMP, else 0
    np.add(l3_end, csum_rel, out=co, casting="unsafe")
    np.multiply(co, csum_rel != 0, out=co)
    l4_len = I[5]
    np.subtract(tot, hlen, out=l4_len)
    np.maximum(l4_len, 0, out=I[6])
    np.copyto(out.l4_len[:n], I[6], casting="unsafe")
    # The L4 header must fit the IPv4 payload: TCP 20 <= data offset <= l4_len;
    # UDP 8 <= length <= l4_len; ICMP 8 <= l4_len.
    need = I[6]
    need[:] = 8
    np.right_shift(l4w[:, 12], 4, out=u8)
    np.left_shift(u8, 2, out=need, where=is_tcp, casting="unsafe")
    np.copyto(need, l16[:, 2], where=is_udp)
    bad = C[_C_L4]
    np.less(need, 8, out=bad)
    np.logical_or(bad, need > l4_len, out=bad)
    np.logical_or(bad, is_tcp & (need < 20), out=bad)

    # 5. The first failing check (in priority order) names the drop reason:
    # argmax down the columns finds the first True row; the last row of the
    # check matrix is always True and maps to OK.
    first = out._first[:n]
    np.argmax(out._checks[:, :n], axis=0, out=first)
    reason = out.drop_reason[:n]
    np.take(_CHECK_CODES_OK, first, out=reason)
    valid = out.valid[:n]
    np.equal(reason, 0, out=valid)
    return int(np.count_nonzero(valid))


def parse_frame(frame: bytes, *, min_ttl: int = 1, slot: int | None = None) -> dict[str, int | bool]:
    """Parse one frame with ``struct``: the scalar twin of :func:`parse_burst`.

    Same rules, same drop-reason priority, same field meanings (a dict keyed
    like :attr:`ParsedBurst.FIELDS`). For the slow path, as the reference the
    vectorized parser is tested against, and as the benchmark's baseline.
    ``slot``: if given and ``len(frame) > slot`` the frame is ``OVERSIZE``.
    Fields the frame does not reach are 0.
    """
    r: dict[str, int | bool] = dict.fromkeys(_FIELDS, 0)
    r["valid"] = r["has_vlan"] = r["frag"] = False
    r["l3_off"] = r["l4_off"] = ETH_HLEN

    def drop(reason: DropReason) -> dict[str, int | bool]:
        r["drop_reason"] = int(reason)
        return r

    ln = len(frame)
    if slot is not None and ln > slot:
        return drop(DropReason.OVERSIZE)
    if ln < ETH_HLEN:
        return drop(DropReason.RUNT)
    (eth,) = struct.unpack_from("!H", frame, 12)
    l3 = ETH_HLEN
    if eth == ETHERTYPE_VLAN:
        r["has_vlan"] = True
        if ln < ETH_HLEN + VLAN_HLEN:
            return drop(DropReason.RUNT)
        r["vlan_tci"], eth = struct.unpack_from("!HH", frame, 14)
        l3 += VLAN_HLEN
    r["ethertype"] = eth
    r["l3_off"] = r["l4_off"] = l3
    if eth != ETHERTYPE_IPV4:
        return drop(DropReason.NOT_IPV4)
    if ln < l3 + 20:
        return drop(DropReason.TRUNCATED)
    vihl, _tos, tot, _id, fragw, ttl, proto, _c, src, dst = struct.unpack_from("!BBHHHBBHII", frame, l3)
    ihl = vihl & 0x0F
    hlen = ihl * 4
    r.update(ihl=ihl, ip_total_len=tot, ttl=ttl, proto=proto, src=src, dst=dst, frag=bool(fragw & 0x3FFF))
    r["l4_off"] = l4 = l3 + hlen
    r["l4_len"] = max(tot - hlen, 0)
    if vihl >> 4 != 4 or ihl < 5:
        return drop(DropReason.BAD_IP_HEADER)
    if ln < l4:
        return drop(DropReason.TRUNCATED)
    if tot < hlen:
        return drop(DropReason.BAD_IP_HEADER)
    if ln < l3 + tot:
        return drop(DropReason.TRUNCATED)
    if internet_checksum(frame[l3:l4]) != 0:
        return drop(DropReason.BAD_IP_CHECKSUM)
    if r["frag"]:
        return drop(DropReason.FRAGMENT)
    if ttl < min_ttl:
        return drop(DropReason.TTL_EXPIRED)
    if proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP):
        return drop(DropReason.UNSUPPORTED_PROTOCOL)
    l4_len = tot - hlen
    if proto == IPPROTO_TCP:
        if l4_len < 20 or not 20 <= (frame[l4 + 12] >> 4) * 4 <= l4_len:
            return drop(DropReason.MALFORMED_L4)
        r["sport"], r["dport"] = struct.unpack_from("!HH", frame, l4)
        r["tcp_flags"] = frame[l4 + 13]
        r["l4_csum_off"] = l4 + 16
    elif proto == IPPROTO_UDP:
        if l4_len < 8:
            return drop(DropReason.MALFORMED_L4)
        sport, dport, ulen = struct.unpack_from("!HHH", frame, l4)
        if not 8 <= ulen <= l4_len:
            return drop(DropReason.MALFORMED_L4)
        r.update(sport=sport, dport=dport, l4_csum_off=l4 + 6)
    else:
        if l4_len < 8:
            return drop(DropReason.MALFORMED_L4)
        r["icmp_type"], r["icmp_code"] = frame[l4], frame[l4 + 1]
        r["l4_csum_off"] = l4 + 2
        if frame[l4] in ICMP_QUERY_TYPES:
            (ident,) = struct.unpack_from("!H", frame, l4 + 4)
            r["sport"] = r["dport"] = ident
    r["valid"] = True
    return r


# ---------------------------------------------------------------------------
# Rewriting (vectorized over a selection of valid rows)
# ---------------------------------------------------------------------------

Selection = Union[None, np.ndarray, Sequence[int]]


class _Sel:
    """A resolved selection: ``idx`` are the valid selected rows; ``base`` the whole selection."""

    __slots__ = ("idx", "base", "keep", "n", "by_row")

    def __init__(self, idx: np.ndarray, base: np.ndarray, keep: np.ndarray | None, n: int, by_row: bool) -> None:
        self.idx = idx
        self.base = base
        self.keep = keep  # mask over base, None when every selected row is valid
        self.n = n
        self.by_row = by_row  # values may also be given per burst row (mask or None selection)


def _resolve(pb: ParsedBurst, sel: Selection) -> _Sel:
    """Resolve ``sel`` to the valid selected rows.

    ``sel`` is None (every row), a boolean mask over the burst, or an array of
    unique row indices. Invalid rows are skipped silently so that a rewrite can
    never touch bytes the parser did not vouch for.
    """
    n = pb.n
    valid = pb.valid[:n]
    if sel is None:
        base = np.arange(n)
        by_row = True
    else:
        s = np.asarray(sel)
        if s.dtype == np.bool_:
            if s.ndim != 1 or s.shape[0] < n:
                raise ValueError("boolean selection shorter than the burst")
            base = np.flatnonzero(s[:n])
            by_row = True
        else:
            base = s.astype(np.intp, copy=False).ravel()
            if base.size and (base.min() < 0 or base.max() >= n):
                raise IndexError("row index outside the burst")
            by_row = False
    keep = valid[base]
    if keep.all():
        return _Sel(base, base, None, n, by_row)
    return _Sel(base[keep], base, keep, n, by_row)


def _values(v, s: _Sel, dtype) -> np.ndarray:
    """Per-selected-row values from a scalar (broadcast) or an array.

    An array is aligned with the selection (one value per selected row, in
    selection order) or, for a mask/None selection, may have one value per row
    of the burst.
    """
    a = np.asarray(v)
    if a.ndim == 0:
        return np.full(s.idx.shape[0], a, dtype=dtype)
    if a.shape[0] == s.base.shape[0]:
        return (a if s.keep is None else a[s.keep]).astype(dtype, copy=False)
    if s.by_row and a.shape[0] == s.n:
        return a[s.idx].astype(dtype, copy=False)
    raise ValueError("value array matches neither the selection nor the burst")


class _Access:
    """Reads and writes of big-endian 16/32-bit fields at per-row columns of a burst.

    Every field we rewrite sits at an even column (L3 at 14 or 18, header
    lengths in 4-byte units), so when the rows allow it we go through a
    big-endian 16-bit view of the frames: one gather or scatter per word
    instead of one per byte, with numpy doing the byte swap.
    """

    __slots__ = ("frames", "words")

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames
        self.words = None
        if frames.shape[1] % 2 == 0 and frames.strides[1] == 1 and frames.strides[0] % 2 == 0:
            try:
                self.words = frames.view(">u2")
            except ValueError:  # a layout numpy cannot reinterpret: stay byte-wise
                self.words = None

    def get16(self, idx: np.ndarray, col: np.ndarray) -> np.ndarray:
        if self.words is not None:
            return self.words[idx, col >> 1].astype(np.uint16)
        f = self.frames
        return (f[idx, col].astype(np.uint16) << 8) | f[idx, col + 1]

    def put16(self, idx: np.ndarray, col: np.ndarray, v: np.ndarray) -> None:
        if self.words is not None:
            self.words[idx, col >> 1] = v
            return
        v = np.asarray(v, dtype=np.uint16)
        self.frames[idx, col] = (v >> 8).astype(np.uint8)
        self.frames[idx, col + 1] = (v & 0xFF).astype(np.uint8)

    def put32(self, idx: np.ndarray, col: np.ndarray, v: np.ndarray) -> None:
        v = np.asarray(v, dtype=np.uint32)
        self.put16(idx, col, (v >> 16).astype(np.uint16))
        self.put16(idx, col + 2, v.astype(np.uint16))  # the cast keeps the low 16 bits


def _l4_fix(fa: _Access, pb: ParsedBurst, idx: np.ndarray, proto: np.ndarray, fix) -> None:
    """Rewrite the L4 checksum of rows ``idx`` with ``fix(old_csum) -> new_csum``; UDP keeps its zero rule."""
    co = pb.l4_csum_off[idx].astype(np.intp)
    old = fa.get16(idx, co)
    new = fix(old)
    udp = proto == IPPROTO_UDP
    if udp.any():
        new = np.where(udp, udp_csum_fixup(old, new), new)
    fa.put16(idx, co, new)


def _set_addr(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_addr, field: str, off: int) -> None:
    s = _resolve(pb, sel)
    idx = s.idx
    if idx.size == 0:
        return
    new = _values(new_addr, s, np.uint32)
    arr = getattr(pb, field)
    old = arr[idx]
    fa = _Access(frames)
    l3 = pb.l3_off[idx].astype(np.intp)
    ipc = fa.get16(idx, l3 + 10)
    fa.put16(idx, l3 + 10, csum_replace32(ipc, old, new))
    proto = pb.proto[idx]
    # TCP and UDP checksums cover the addresses through the pseudo-header;
    # ICMP has no pseudo-header, so only the IPv4 header checksum changes.
    m = (proto == IPPROTO_TCP) | (proto == IPPROTO_UDP)
    if m.any():
        o, nw = old[m], new[m]
        _l4_fix(fa, pb, idx[m], proto[m], lambda c: csum_replace32(c, o, nw))
    fa.put32(idx, l3 + off, new)
    arr[idx] = new


def set_ipv4_src(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_src) -> None:
    """Set the IPv4 source address (host-order int(s)) of the selected valid rows.

    Updates the IPv4 header checksum and the TCP/UDP checksum (pseudo-header)
    incrementally; a UDP checksum of 0 stays 0. ``pb.src`` follows.
    ``new_src``: scalar, or an array per selected row (or per burst row for a
    boolean-mask selection). Selected indices must be unique.
    """
    _set_addr(frames, pb, sel, new_src, "src", 12)


def set_ipv4_dst(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_dst) -> None:
    """Set the IPv4 destination address of the selected valid rows (see :func:`set_ipv4_src`)."""
    _set_addr(frames, pb, sel, new_dst, "dst", 16)


def _set_port(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_port, which: str) -> None:
    s = _resolve(pb, sel)
    idx = s.idx
    if idx.size == 0:
        return
    new = _values(new_port, s, np.uint16)
    proto = pb.proto[idx]
    itype = pb.icmp_type[idx]
    icmp_q = (proto == IPPROTO_ICMP) & np.isin(itype, ICMP_QUERY_TYPES)
    m = (proto == IPPROTO_TCP) | (proto == IPPROTO_UDP) | icmp_q
    if not m.all():
        idx, new, proto, icmp_q = idx[m], new[m], proto[m], icmp_q[m]
        if idx.size == 0:
            return
    arr = pb.sport if which == "sport" else pb.dport
    old = arr[idx]
    # TCP/UDP ports sit at l4+0 / l4+2; the ICMP query identifier (the NAT
    # "port" in both directions) at l4+4.
    col = pb.l4_off[idx].astype(np.intp) + np.where(icmp_q, 4, 0 if which == "sport" else 2)
    fa = _Access(frames)
    _l4_fix(fa, pb, idx, proto, lambda c: csum_replace16(c, old, new))
    fa.put16(idx, col, new)
    arr[idx] = new
    if icmp_q.any():
        other = pb.dport if which == "sport" else pb.sport
        other[idx[icmp_q]] = new[icmp_q]


def set_l4_sport(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_port) -> None:
    """Set the TCP/UDP source port (ICMP query: the identifier) of the selected valid rows.

    Updates the L4 checksum incrementally (UDP zero rule kept). Rows of other
    ICMP types are left alone. ``pb.sport`` follows (and ``pb.dport`` for ICMP).
    """
    _set_port(frames, pb, sel, new_port, "sport")


def set_l4_dport(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_port) -> None:
    """Set the TCP/UDP destination port (ICMP query: the identifier) of the selected valid rows."""
    _set_port(frames, pb, sel, new_port, "dport")


def _translate(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_addr, new_port, which: str) -> None:
    s = _resolve(pb, sel)
    idx = s.idx
    if idx.size == 0:
        return
    addr_new = _values(new_addr, s, np.uint32)
    port_new = _values(new_port, s, np.uint16)
    addr_arr, port_arr, other_port = (pb.src, pb.sport, pb.dport) if which == "src" else (pb.dst, pb.dport, pb.sport)
    addr_old = addr_arr[idx]
    proto = pb.proto[idx]
    is_icmp = proto == IPPROTO_ICMP
    icmp_q = is_icmp & _ICMP_QUERY_LUT[pb.icmp_type[idx]]
    fa = _Access(frames)
    l3 = pb.l3_off[idx].astype(np.intp)
    ipc = fa.get16(idx, l3 + 10)
    fa.put16(idx, l3 + 10, csum_replace32(ipc, addr_old, addr_new))
    fa.put32(idx, l3 + (12 if which == "src" else 16), addr_new)
    addr_arr[idx] = addr_new
    # Rows with a port: TCP, UDP and ICMP queries (whose "port" is the identifier).
    # ICMP has no pseudo-header: its address term is neutralised (old == new).
    has_port = ~is_icmp | icmp_q
    if not has_port.all():
        idx, addr_old, addr_new, port_new, proto, is_icmp, icmp_q = (
            a[has_port] for a in (idx, addr_old, addr_new, port_new, proto, is_icmp, icmp_q)
        )
        if idx.size == 0:
            return
    port_old = port_arr[idx]
    ao = np.where(is_icmp, addr_new, addr_old)
    co = pb.l4_csum_off[idx].astype(np.intp)
    c = fa.get16(idx, co)
    nc = csum_replace_addr_port(c, ao, addr_new, port_old, port_new)
    udp = proto == IPPROTO_UDP
    if udp.any():
        nc = np.where(udp, udp_csum_fixup(c, nc), nc)
    fa.put16(idx, co, nc)
    col = pb.l4_off[idx].astype(np.intp) + np.where(icmp_q, 4, 0 if which == "src" else 2)
    fa.put16(idx, col, port_new)
    port_arr[idx] = port_new
    if icmp_q.any():
        other_port[idx[icmp_q]] = port_new[icmp_q]


def snat(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_src, new_sport) -> None:
    """Source NAT of the selected valid rows: new source address and port in one pass.

    Equivalent to :func:`set_ipv4_src` then :func:`set_l4_sport`, but each L4
    checksum is updated once for both fields (RFC 1624 eqn. 3 over the
    pseudo-header address and the port). ICMP query rows get their
    identifier rewritten; other ICMP rows only their address.
    """
    _translate(frames, pb, sel, new_src, new_sport, "src")


def dnat(frames: np.ndarray, pb: ParsedBurst, sel: Selection, new_dst, new_dport) -> None:
    """Destination NAT of the selected valid rows (see :func:`snat`)."""
    _translate(frames, pb, sel, new_dst, new_dport, "dst")


def decrement_ttl(frames: np.ndarray, pb: ParsedBurst, sel: Selection = None) -> np.ndarray:
    """Decrement the TTL of the selected valid rows, updating the IPv4 checksum.

    Rows whose TTL is <= 1 are not forwarded by a router (RFC 1812 5.3.1):
    they are left unmodified, marked ``valid = False`` with ``TTL_EXPIRED`` and
    their indices returned, so the caller can punt them to the slow path to
    send ICMP time exceeded.
    """
    s = _resolve(pb, sel)
    idx = s.idx
    ttl = pb.ttl[idx]
    exp = ttl <= 1
    expired = idx[exp]
    n = pb.n
    fa = _Access(frames)
    if idx.size == n and s.by_row and not expired.size and fa.words is not None and not pb.has_vlan[:n].any():
        # Every row, all untagged: the TTL:protocol word (column 22) and the
        # header checksum (column 24) are two column slices, no gathers.
        words = fa.words
        old_w = words[:n, 11].astype(np.uint16)
        new_w = old_w - np.uint16(0x100)
        words[:n, 12] = csum_replace16(words[:n, 12].astype(np.uint16), old_w, new_w)
        words[:n, 11] = new_w
        pb.ttl[:n] -= np.uint8(1)
        return expired
    if expired.size:
        pb.valid[expired] = False
        pb.drop_reason[expired] = DropReason.TTL_EXPIRED
        idx, ttl = idx[~exp], ttl[~exp]
    if idx.size == 0:
        return expired
    l3 = pb.l3_off[idx].astype(np.intp)
    proto = pb.proto[idx].astype(np.uint16)
    new_ttl = ttl - np.uint8(1)
    # TTL and protocol share one 16-bit word of the header.
    old_w = (ttl.astype(np.uint16) << 8) | proto
    new_w = (new_ttl.astype(np.uint16) << 8) | proto
    ipc = fa.get16(idx, l3 + 10)
    fa.put16(idx, l3 + 10, csum_replace16(ipc, old_w, new_w))
    fa.put16(idx, l3 + 8, new_w)
    pb.ttl[idx] = new_ttl
    return expired


def _mac_rows(mac, s: _Sel) -> np.ndarray:
    if isinstance(mac, (bytes, bytearray, str)):
        return np.frombuffer(mac_bytes(mac), dtype=np.uint8)
    a = np.asarray(mac, dtype=np.uint8)
    if a.ndim == 1:
        if a.shape[0] != 6:
            raise ValueError("a MAC address has 6 bytes")
        return a
    if a.ndim != 2 or a.shape[1] != 6:
        raise ValueError("MAC array must be (k, 6)")
    return a[_values(np.arange(a.shape[0]), s, np.intp)]


def rewrite_macs(frames: np.ndarray, pb: ParsedBurst, sel: Selection, src_mac: MacLike, dst_mac: MacLike) -> None:
    """Set Ethernet source and destination MACs of the selected valid rows.

    Each MAC is 6 bytes (``bytes``, ``"aa:bb:..."`` or a length-6 array) for
    every row, or a ``(k, 6)`` uint8 array per selected row. No checksum
    covers the Ethernet header.
    """
    s = _resolve(pb, sel)
    idx = s.idx
    if idx.size == 0:
        return
    dst = _mac_rows(dst_mac, s)
    src = _mac_rows(src_mac, s)
    if dst.ndim == 1 and src.ndim == 1:
        both = np.concatenate((dst, src))
        if idx.size == pb.n and s.by_row:
            frames[: pb.n, 0:12] = both  # every row: one slice assignment, no gather
        else:
            frames[idx, 0:12] = both
        return
    frames[idx, 0:6] = dst
    frames[idx, 6:12] = src


def ip_packet(frames: np.ndarray, pb: ParsedBurst, i: int) -> bytes:
    """The IPv4 datagram of row ``i`` (header through total length), e.g. to quote in an ICMP error.

    Works for invalid rows too, clipped to what the frame holds.
    """
    l3 = int(pb.l3_off[i])
    end = min(l3 + int(pb.ip_total_len[i]), frames.shape[1])
    return frames[i, l3:max(end, l3)].tobytes()


# ---------------------------------------------------------------------------
# Builders (slow path: plain per-packet Python)
# ---------------------------------------------------------------------------


def mac_bytes(mac: MacLike) -> bytes:
    """6 raw bytes from ``"aa:bb:cc:dd:ee:ff"`` (or ``-`` separated), bytes or a sequence of ints."""
    if isinstance(mac, str):
        parts = mac.replace("-", ":").split(":")
        if len(parts) != 6:
            raise ValueError(f"bad MAC address {mac!r}")
        b = bytes(int(p, 16) for p in parts)
    else:
        b = bytes(bytearray(mac))
    if len(b) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return b


def ip_int(addr: IpLike) -> int:
    """Host-order int from ``"192.0.2.1"``, an ``IPv4Address`` or an int."""
    if isinstance(addr, int):
        if not 0 <= addr <= 0xFFFFFFFF:
            raise ValueError(f"bad IPv4 address {addr}")
        return addr
    return int(ipaddress.IPv4Address(addr))


def _ether(dst_mac: MacLike, src_mac: MacLike, ethertype: int, vlan: int | None) -> bytes:
    hdr = mac_bytes(dst_mac) + mac_bytes(src_mac)
    if vlan is not None:
        hdr += struct.pack("!HH", ETHERTYPE_VLAN, vlan & 0xFFFF)
    return hdr + struct.pack("!H", ethertype)


def build_ipv4_header(
    src: IpLike,
    dst: IpLike,
    proto: int,
    payload_len: int,
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = False,
    options: bytes = b"",
) -> bytes:
    """An IPv4 header (options padded to a multiple of 4) with its checksum."""
    if len(options) % 4:
        options = options + b"\x00" * (4 - len(options) % 4)
    if len(options) > 40:
        raise ValueError("IPv4 options longer than 40 bytes")
    ihl = 5 + len(options) // 4
    total = ihl * 4 + payload_len
    if total > 0xFFFF:
        raise ValueError("IPv4 datagram longer than 65535 bytes")
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        tos,
        total,
        ident & 0xFFFF,
        0x4000 if df else 0,
        ttl,
        proto,
        0,
        ip_int(src).to_bytes(4, "big"),
        ip_int(dst).to_bytes(4, "big"),
    ) + options
    c = internet_checksum(hdr)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:]


def _l4_checksum(src: IpLike, dst: IpLike, proto: int, segment: bytes) -> int:
    return internet_checksum(segment, pseudo_header_sum_scalar(ip_int(src), ip_int(dst), proto, len(segment)))


def build_ipv4_udp(
    src_mac: MacLike,
    dst_mac: MacLike,
    src: IpLike,
    dst: IpLike,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = False,
    checksum: bool = True,
    vlan: int | None = None,
    ip_options: bytes = b"",
) -> bytes:
    """An Ethernet/IPv4/UDP frame. ``checksum=False`` sends UDP checksum 0 ("none")."""
    ulen = 8 + len(payload)
    seg = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    if checksum:
        c = _l4_checksum(src, dst, IPPROTO_UDP, seg)
        seg = seg[:6] + struct.pack("!H", c or 0xFFFF) + seg[8:]  # computed 0 goes out as 0xFFFF
    ip = build_ipv4_header(src, dst, IPPROTO_UDP, len(seg), ttl=ttl, ident=ident, tos=tos, df=df, options=ip_options)
    return _ether(dst_mac, src_mac, ETHERTYPE_IPV4, vlan) + ip + seg


def build_ipv4_tcp(
    src_mac: MacLike,
    dst_mac: MacLike,
    src: IpLike,
    dst: IpLike,
    sport: int,
    dport: int,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = 0x02,
    window: int = 65535,
    urgent: int = 0,
    tcp_options: bytes = b"",
    payload: bytes = b"",
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = True,
    vlan: int | None = None,
    ip_options: bytes = b"",
) -> bytes:
    """An Ethernet/IPv4/TCP frame (``flags`` as the TCP flag byte, SYN by default)."""
    if len(tcp_options) % 4:
        tcp_options = tcp_options + b"\x00" * (4 - len(tcp_options) % 4)
    doff = 5 + len(tcp_options) // 4
    if doff > 15:
        raise ValueError("TCP options longer than 40 bytes")
    seg = (
        struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4, flags & 0xFF, window, 0, urgent)
        + tcp_options
        + payload
    )
    c = _l4_checksum(src, dst, IPPROTO_TCP, seg)
    seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    ip = build_ipv4_header(src, dst, IPPROTO_TCP, len(seg), ttl=ttl, ident=ident, tos=tos, df=df, options=ip_options)
    return _ether(dst_mac, src_mac, ETHERTYPE_IPV4, vlan) + ip + seg


def _icmp(icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    msg = struct.pack("!BBH", icmp_type, code, 0) + rest + body
    c = internet_checksum(msg)  # ICMP: no pseudo-header
    return msg[:2] + struct.pack("!H", c) + msg[4:]


def build_icmp_echo(
    src_mac: MacLike,
    dst_mac: MacLike,
    src: IpLike,
    dst: IpLike,
    ident: int,
    seq: int,
    payload: bytes = b"",
    *,
    reply: bool = False,
    ttl: int = 64,
    ip_ident: int = 0,
    vlan: int | None = None,
) -> bytes:
    """An Ethernet/IPv4/ICMP echo request (or reply with ``reply=True``)."""
    msg = _icmp(ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST, 0, struct.pack("!HH", ident & 0xFFFF, seq & 0xFFFF), payload)
    ip = build_ipv4_header(src, dst, IPPROTO_ICMP, len(msg), ttl=ttl, ident=ip_ident)
    return _ether(dst_mac, src_mac, ETHERTYPE_IPV4, vlan) + ip + msg


def icmp_error_allowed(original: bytes) -> bool:
    """Whether RFC 1812 4.3.2.7 allows an ICMP error about IPv4 datagram ``original``.

    No error about: a datagram too short to have an IPv4 header, an ICMP error
    message, a non-first fragment, a datagram sent to a multicast or the limited
    broadcast address, or one whose source is not a single host (0/8,
    127/8, multicast, class E, limited broadcast).
    """
    if len(original) < 20 or original[0] >> 4 != 4:
        return False
    ihl = (original[0] & 0x0F) * 4
    if ihl < 20:
        return False
    frag_off = struct.unpack_from("!H", original, 6)[0] & 0x1FFF
    if frag_off:
        return False
    src = int.from_bytes(original[12:16], "big")
    dst = int.from_bytes(original[16:20], "big")
    if dst == 0xFFFFFFFF or dst >> 28 == 0xE:
        return False
    if src >> 24 in (0, 127) or src >> 28 >= 0xE:
        return False
    if original[9] == IPPROTO_ICMP:
        if len(original) <= ihl:
            return False
        if original[ihl] not in ICMP_QUERY_TYPES and original[ihl] not in (9, 10, 15, 16, 17, 18):
            return False  # an error (or unknown) message: never answer it with an error
    return True


def build_icmp_error(
    icmp_type: int,
    icmp_code: int,
    original: bytes,
    src: IpLike,
    *,
    src_mac: MacLike,
    dst_mac: MacLike,
    dst: IpLike | None = None,
    ttl: int = 64,
    next_hop_mtu: int = 0,
    pointer: int = 0,
    max_len: int = ICMP_ERROR_MAX,
    vlan: int | None = None,
) -> bytes:
    """An ICMP error (destination unreachable, time exceeded, parameter problem...) about ``original``.

    ``original`` is the offending IPv4 datagram starting at its IP header
    (e.g. :func:`ip_packet`). The message quotes the original header and as
    much of its data as keeps the new datagram within ``max_len`` (576,
    RFC 1812 4.3.2.3; RFC 792 requires at least the header + 8 bytes).
    ``dst`` defaults to the original source. ``next_hop_mtu`` fills bytes 6-7
    (type 3 code 4, RFC 1191); ``pointer`` byte 4 (type 12). Whether an error
    may be sent at all is :func:`icmp_error_allowed`'s question.
    """
    if len(original) >= 4 and original[0] >> 4 == 4:
        tot = struct.unpack_from("!H", original, 2)[0]
        hl = (original[0] & 0x0F) * 4
        if tot >= hl:
            original = original[:tot]  # drop Ethernet padding
    room = max_len - 20 - 8
    if room < 28:
        raise ValueError("max_len too small to quote a header and 8 bytes")
    quote = original[:room]
    if dst is None:
        if len(original) < 16:
            raise ValueError("original too short to find its source address")
        dst = int.from_bytes(original[12:16], "big")
    if icmp_type == ICMP_PARAM_PROBLEM:
        rest = struct.pack("!BBH", pointer & 0xFF, 0, 0)
    else:
        rest = struct.pack("!HH", 0, next_hop_mtu & 0xFFFF)
    msg = _icmp(icmp_type, icmp_code, rest, quote)
    ip = build_ipv4_header(src, dst, IPPROTO_ICMP, len(msg), ttl=ttl)
    return _ether(dst_mac, src_mac, ETHERTYPE_IPV4, vlan) + ip + msg


ETH_MIN_FRAME = 60  # without FCS
BROADCAST_MAC = b"\xff" * 6


def _arp(op: int, sha: MacLike, spa: IpLike, tha: MacLike, tpa: IpLike) -> bytes:
    return struct.pack(
        "!HHBBH6s4s6s4s",
        1,  # Ethernet
        ETHERTYPE_IPV4,
        6,
        4,
        op,
        mac_bytes(sha),
        ip_int(spa).to_bytes(4, "big"),
        mac_bytes(tha),
        ip_int(tpa).to_bytes(4, "big"),
    )


def _pad(frame: bytes, pad: bool) -> bytes:
    return frame + b"\x00" * (ETH_MIN_FRAME - len(frame)) if pad and len(frame) < ETH_MIN_FRAME else frame


def build_arp_request(src_mac: MacLike, src_ip: IpLike, target_ip: IpLike, *, pad: bool = True, vlan: int | None = None) -> bytes:
    """A broadcast ARP who-has ``target_ip`` from ``src_mac``/``src_ip`` (padded to 60 bytes)."""
    return _pad(_ether(BROADCAST_MAC, src_mac, ETHERTYPE_ARP, vlan) + _arp(1, src_mac, src_ip, b"\x00" * 6, target_ip), pad)


def build_arp_reply(
    src_mac: MacLike, src_ip: IpLike, dst_mac: MacLike, dst_ip: IpLike, *, pad: bool = True, vlan: int | None = None
) -> bytes:
    """A unicast ARP reply "``src_ip`` is at ``src_mac``" to ``dst_mac``/``dst_ip``."""
    return _pad(_ether(dst_mac, src_mac, ETHERTYPE_ARP, vlan) + _arp(2, src_mac, src_ip, dst_mac, dst_ip), pad)


@dataclass(frozen=True)
class ArpPacket:
    """The fields of an Ethernet/IPv4 ARP packet (addresses host-order ints, MACs bytes)."""

    op: int
    sha: bytes
    spa: int
    tha: bytes
    tpa: int
    vlan: int | None = None


def parse_arp(frame: bytes) -> ArpPacket | None:
    """Parse an Ethernet/IPv4 ARP frame (optionally 802.1Q tagged); None if it is not one."""
    if len(frame) < ETH_HLEN:
        return None
    off = 12
    vlan = None
    et = struct.unpack_from("!H", frame, off)[0]
    if et == ETHERTYPE_VLAN:
        if len(frame) < ETH_HLEN + VLAN_HLEN:
            return None
        vlan = struct.unpack_from("!H", frame, 14)[0]
        off = 16
        et = struct.unpack_from("!H", frame, off)[0]
    off += 2
    if et != ETHERTYPE_ARP or len(frame) < off + 28:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, off)
    if htype != 1 or ptype != ETHERTYPE_IPV4 or hlen != 6 or plen != 4:
        return None
    return ArpPacket(op, sha, int.from_bytes(spa, "big"), tha, int.from_bytes(tpa, "big"), vlan)
