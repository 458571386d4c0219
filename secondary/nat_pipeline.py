"""The NAT44 pipeline a worker runs (docs/CONTRACTS.md "The pipeline a worker runs").

Fast path (numpy over the burst, no per-packet Python), for the common frame
-- untagged IPv4, IHL 5, not a fragment, TTL > 1, TCP/UDP/ICMP query with a
whole L4 header, intact header checksum -- read straight from fixed columns
of the burst (:meth:`NatPipeline._fast`): keys, one batch lookup (``in2out``
session table from the inside, the session index from the outside, confirmed
against the session's entry), route (LPM) and next hop (neighbour table), then
one fused rewrite per packet: address, port, both checksums (RFC 1624 eqn. 3
over address + port + TTL in one step) and MACs. Session accounting (packets,
bytes, last seen) is logged per burst and written to the sessions in batches
(:meth:`flush`): when the clock's second changes (checked per burst and at
``tick``), every ``ACCT_FLUSH`` packets, and before the expiry sweep removes a
session. A session is thus written at most once per flush however many
packets it had; a killed worker loses at most the last second's counters and
refreshes, never a session. TCP state changes are written at once.

Every other row -- a miss, a frame with IP options or a VLAN tag, anything
odd or invalid -- goes through the general path: the full parser
(:func:`hotplane.shared.packet.parse_burst`, every bad-input check), the same
lookups, and the slow path (plain Python per row): ARP, ICMP echo to the
gateway, ICMP errors (RFC 5508: the received ICMP checksum checked, embedded
header reverted, every checksum fixed; never refreshes a session), TTL expiry
(ICMP time exceeded), fragments (virtual reassembly; every translated fragment
counts in its session like any packet: packets, bytes, last seen, and the
first fragment's TCP flags move the TCP state), hairpinning (the receiver's
mapping filters the packet as one from outside), static mappings, filtering,
limits, allocation. New sessions of one burst are published together (one batch
insert into ``in2out``, one into the index: :meth:`_flush_new`). Within a
burst, packets of one session that take different paths have their TCP state
applied fast path first.

Session model (this worker is the only writer of both structures, DESIGN invariant 2)::

    in2out (SessionTable v1, 64 B entries, the session's state; what readers in other processes read)
        SESSION key (iaddr, raddr, proto, iport, rport) -> xaddr, xport, tcp_state, times, counters
        MAP     key (iaddr, proto, iport)   -> xaddr, xport, packets:=sessions using it  [shared mappings only]
        ADDR    key (raddr, xaddr, proto, xport) -> packets:=sessions   [address-dependent filtering only]
    index (SessionIndex, schema id 11, 8 B hints: fingerprint | in2out slot, confirmed against the entry)
        O2I  (raddr, xaddr, proto, rport, xport) -> the session's slot
        FWD  (iaddr, proto, iport)  -> the mapping's holder: its only session, or its MAP entry
        REV  (xaddr, proto, xport)  -> the same holder

(raddr/rport: the remote endpoint; for ICMP queries every port is the
identifier.) A mapping used by one session lives in that session's entry
(its key has iaddr/iport, its value xaddr/xport) and needs no entry of its
own; the second session of a mapping creates its MAP entry (reference count)
and the FWD/REV hints move to it. The mapping lives as long as one session
uses it; its port then goes back to the allocator's 120 s hold.

Readers in other processes (stats, CLI, another worker hairpinning, an
upgrade candidate) read ``in2out`` only through the session table's seqlock
(``read_consistent`` / ``lookup_consistent``); the index is a hint they may
use to find a slot, never a source of data: every hint is confirmed against
the seqlocked entry it points to (an 8-byte hint is written by one store, so
it is never torn), and an outdated or colliding hint reads as a miss. Crash safety: ``in2out`` keeps its redo
journal; changes spanning both structures run inside the index's ``wseq``
group (entries before hints on insert, hints before entries on delete), and a
worker finding ``wseq`` odd at start rebuilds the index from ``in2out``
(:meth:`NatPipeline.rebuild_index`).

Memory per session (one mapping per session, the usual client case): one
64-byte entry at most ``MAX_LOAD`` (0.8) full plus three 8-byte hints at most
``INDEX_LOAD`` (0.9) full: 64/0.8 + 24/0.9 = 106.7 bytes (:func:`memory_per_session`).

Key packing of ``in2out`` (KEY_FORMAT 2; recorded in the index header)::

    k1 = tag << 48 | proto << 32 | pa << 16 | pb      k0 = (a << 32 | b) ^ (k1 * KMIX mod 2**64)

The xor spreads the port entropy into ``k0``, the word the session table's
first probe block compares, so sessions between one pair of hosts do not all
share a ``k0``.

Clock: ``clock.now()`` (whole seconds, :mod:`hotplane.shared.nat_clock`) stamps
sessions and drives expiry; ``tick(now)`` ignores its argument's value except
as "time passed" so tests control time with a ManualClock.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hotplane.schema.counters import DROP_REASONS, N_REASONS
from hotplane.schema.session import ELEMENT, USED
from hotplane.shared import nat_tcp
from hotplane.shared.checksum import internet_checksum
from hotplane.shared.nat_clock import Clock, MonotonicClock
from hotplane.shared.nat_config import Filtering, GatewayConfig
from hotplane.shared.nat_expiry import ExpirySweeper, expired_mask
from hotplane.shared.nat_frag import FragmentTracker, Verdict
from hotplane.shared.nat_lpm import MISS, Lpm, NextHop, NextHops
from hotplane.shared.nat_neighbour import (
    ARP_REPLY,
    ArpReply,
    ArpRequest,
    Drop,
    NeighbourTable,
    Transmit,
    int_to_mac,
    macs_to_bytes,
)
from hotplane.shared.nat_pool import AllocStatus, PortAllocator
from hotplane.shared.packet import (
    ETHERTYPE_ARP,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DropReason,
    ParsedBurst,
    build_arp_reply,
    build_arp_request,
    build_icmp_echo,
    build_icmp_error,
    decrement_ttl,
    dnat,
    icmp_error_allowed,
    ip_packet,
    mac_bytes,
    parse_arp,
    parse_burst,
    rewrite_macs,
    snat,
)
from hotplane.shared.session_index import SessionIndex
from hotplane.shared.session_table import SessionTable, mix_hash

INSIDE, OUTSIDE = 0, 1
TAG_SESSION, TAG_MAP, TAG_ADDR = 0, 1, 2
TAG_FWD, TAG_REV = 3, 4  # index-only keys
FLAG_SESSION, FLAG_MAP, FLAG_ADDR, FLAG_STATIC = 0, 1, 2, 4
KEY_FORMAT = 2
KMIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1

#: Table capacity per worker when nothing else is said: 2**18 entries = 16 MiB (``[nat] max_sessions`` sizes it).
DEFAULT_TABLE_CAPACITY = 1 << 18
#: New sessions are refused ("table_full") above this load of ``in2out``, leaving probe room
#: (two-choice probing refuses ~1 insert in 10**4 at 0.8 with max_probe 32).
MAX_LOAD = 0.8
#: The index is sized for three hints per session at most this full (max_probe 64: ~1 in 10**4 refused at 0.9).
INDEX_LOAD = 0.9
#: Logged packets are written to their sessions at the latest after this many (and when the clock's second changes).
ACCT_FLUSH = 1 << 16
DEFAULT_MACS = {"inside_gw": "02:68:70:00:00:01", "outside_gw": "02:68:70:00:00:02"}

_ICMP_ERRORS = (3, 4, 5, 11, 12)
_QUERY_REQ = np.zeros(256, bool)
_QUERY_REQ[[8, 13]] = True
_QUERY_REP = np.zeros(256, bool)
_QUERY_REP[[0, 14]] = True
_S32 = np.uint64(32)
_S16 = np.uint64(16)
_U64 = np.uint64
_KMIX = np.uint64(KMIX)
_M32 = np.uint64(0xFFFFFFFF)

# Fast-path classification: [protocol, first L4 byte] -> kind (0: not for the fast path).
K_TCP, K_UDP, K_ICMP = 1, 2, 3


def _kind_lut(query_types: tuple[int, ...]) -> np.ndarray:
    lut = np.zeros((256, 256), np.uint8)
    lut[IPPROTO_TCP, :] = K_TCP
    lut[IPPROTO_UDP, :] = K_UDP
    lut[IPPROTO_ICMP, list(query_types)] = K_ICMP
    return lut


_KIND = (_kind_lut((8, 13)), _kind_lut((0, 14)))  # by direction: queries from inside, replies from outside
_L4_LO = np.array([1 << 20, 20, 8, 8], np.int32)  # smallest L4 header by kind (kind 0 never passes)
# Word (16-bit, IHL 5, untagged) of the L4 checksum by kind; of the port rewritten by [direction, kind].
_CSUM_WORD = np.array([0, 25, 20, 18], np.intp)
_PORT_WORD = np.array([[0, 17, 17, 19], [0, 18, 18, 19]], np.intp)
# The session table's hash constants (shared/session_table._mix), for the writer's own lookup.
_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX3 = np.uint64(0x165667B19E3779F9)
BURST_SCRATCH = 512
_HDR = 52  # header bytes the fast path reads and writes (Ethernet, IPv4 without options, TCP up to its checksum)
_K_IP = 0xFFFF + 0x1FFFE + 0xFEFF  # ~HC + ~old address words + (~ttl_word + new ttl_word); see _fast
_K_L4 = 0xFFFF + 0x1FFFE + 0xFFFF  # ~C + ~old address words (pseudo-header) + ~old port


def _fold2(t: np.ndarray, scratch: np.ndarray) -> None:
    """End-around carry, twice: any sum below 2**20 into 1..0xFFFF (0 only for 0), in place."""
    for _ in range(2):
        np.right_shift(t, 16, out=scratch)
        np.bitwise_and(t, 0xFFFF, out=t)
        t += scratch


def _r(name: str) -> int:
    return DROP_REASONS.index(name) if name in DROP_REASONS else DROP_REASONS.index("other")


R = {n: _r(n) for n in DROP_REASONS}
PACKET_TO_COUNTER = np.array(
    [_r(n) for n in ("other", "runt", "oversized", "not_ipv4", "truncated", "bad_ip_header", "bad_ip_checksum",
                     "fragment", "ttl_expired", "unsupported_protocol", "malformed_l4")], np.intp)


def make_key(a: int, b: int, proto: int, pa: int, pb: int, tag: int = TAG_SESSION) -> tuple[int, int]:
    """The (k0, k1) words of one ``in2out`` entry (see the module docstring)."""
    k1 = (tag << 48) | (proto << 32) | (pa << 16) | pb
    return ((a << 32) | b) ^ ((k1 * KMIX) & _M64), k1


def split_key(k0: int, k1: int) -> tuple[int, int, int, int, int, int]:
    """``(a, b, tag, proto, pa, pb)`` of an ``in2out`` key (inverse of :func:`make_key`)."""
    ab = k0 ^ ((k1 * KMIX) & _M64)
    return ab >> 32, ab & 0xFFFFFFFF, k1 >> 48, (k1 >> 32) & 0xFF, (k1 >> 16) & 0xFFFF, k1 & 0xFFFF


def split_keys(k0: np.ndarray, k1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized: ``(a, b)`` (uint64 arrays) of ``in2out`` keys; the rest of the key is in ``k1``."""
    ab = k0 ^ (k1 * _KMIX)
    return ab >> _S32, ab & _M32


def o2i_key(raddr: int, xaddr: int, proto: int, rport: int, xport: int) -> tuple[int, int]:
    """Index key of a session seen from outside (``rport`` is the identifier for ICMP)."""
    return (raddr << 32) | xaddr, (TAG_SESSION << 48) | (proto << 32) | (rport << 16) | xport


def fwd_key(iaddr: int, proto: int, iport: int) -> tuple[int, int]:
    return iaddr, (TAG_FWD << 48) | (proto << 32) | iport


def rev_key(xaddr: int, proto: int, xport: int) -> tuple[int, int]:
    return xaddr, (TAG_REV << 48) | (proto << 32) | xport


# ----------------------------------------------------------------------------- scalar checksum helpers

def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _cs_replace(c: int, old: int, new: int, width: int = 16) -> int:
    """RFC 1624 eqn. 3 for a 16- or 32-bit field change (ints)."""
    s = (~c & 0xFFFF)
    if width == 32:
        s += (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
    else:
        s += (~old & 0xFFFF) + (new & 0xFFFF)
    return ~_fold(s) & 0xFFFF


def _g16(b: bytearray, o: int) -> int:
    return (b[o] << 8) | b[o + 1]


def _p16(b: bytearray, o: int, v: int) -> None:
    b[o] = (v >> 8) & 0xFF
    b[o + 1] = v & 0xFF


def _g32(b: bytearray, o: int) -> int:
    return int.from_bytes(b[o:o + 4], "big")


def _p32(b: bytearray, o: int, v: int) -> None:
    b[o:o + 4] = v.to_bytes(4, "big")


def rewrite_ip(b: bytearray, l3: int, which: str, addr: int, port: int | None, *, l4: bool = True,
               end: int | None = None) -> None:
    """Translate one IPv4 packet held in ``b`` (header at ``l3``) in place, incremental checksums.

    ``which`` "src" or "dst"; ``port`` None keeps the port; ``l4`` False for a
    non-first fragment (no L4 header). The L4 checksum is updated only where it
    lies inside ``end`` (an ICMP error's quote may cut it); a UDP 0 stays 0.
    """
    end = len(b) if end is None else end
    ihl = (b[l3] & 0x0F) * 4
    proto = b[l3 + 9]
    ao = l3 + (12 if which == "src" else 16)
    old_a = _g32(b, ao)
    _p16(b, l3 + 10, _cs_replace(_g16(b, l3 + 10), old_a, addr, 32))
    _p32(b, ao, addr)
    if not l4:
        return
    p = l3 + ihl
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        po = p + (0 if which == "src" else 2)
        co = p + (16 if proto == IPPROTO_TCP else 6)
        if po + 2 > end:
            return
        old_p = _g16(b, po)
        new_p = old_p if port is None else port
        if co + 2 <= end:
            c = _g16(b, co)
            if not (proto == IPPROTO_UDP and c == 0):
                c = _cs_replace(_cs_replace(c, old_a, addr, 32), old_p, new_p)
                if proto == IPPROTO_UDP and c == 0:
                    c = 0xFFFF
                _p16(b, co, c)
        _p16(b, po, new_p)
    elif proto == IPPROTO_ICMP and port is not None and p + 8 <= end and b[p] in (0, 8, 13, 14):
        old_p = _g16(b, p + 4)
        _p16(b, p + 2, _cs_replace(_g16(b, p + 2), old_p, port))
        _p16(b, p + 4, port)


# ----------------------------------------------------------------------------- FIB (routes + neighbour mirror)

def next_hops_for(config: GatewayConfig) -> NextHops:
    """Next-hop indices in the order :func:`fill_lpm` assigns them (deterministic from the config)."""
    hops = NextHops()
    for port in ("inside", "outside"):
        hops.index(NextHop(port))
    for r in config.routes:
        hops.index(NextHop(r.port, None if r.via is None else int(r.via)))
    return hops


def fill_lpm(lpm: Lpm, config: GatewayConfig) -> NextHops:
    """Add the on-link networks and every configured route to ``lpm``."""
    hops = NextHops()
    gw = config.gateway
    for port in ("inside", "outside"):
        net = gw.network_of(port)
        lpm.add(int(net.network_address), net.prefixlen, hops.index(NextHop(port)))
    for r in config.routes:
        via = None if r.via is None else int(r.via)
        lpm.add(int(r.prefix.network_address), r.prefix.prefixlen, hops.index(NextHop(r.port, via)))
    return hops


NEIGH_QUEUE = 1024
NEIGH_QUEUE_BYTES = 4 << 20


class NeighbourMirror:
    """Published neighbours (see schema/nat.py): written by the worker that receives ARP, read by all."""

    def __init__(self, entries: np.ndarray) -> None:
        self.e = entries
        self.mask = len(entries) - 1

    def _slot(self, side: int, ip: int) -> int:
        return ((ip * 0x9E3779B1) ^ (side << 31)) & 0xFFFFFFFF & self.mask

    def publish(self, side: int, ip: int, mac: bytes, now: int) -> None:
        s = self._slot(side, ip)
        e = self.e
        m = int.from_bytes(mac, "big")
        if e["valid"][s] and int(e["ip"][s]) == ip and int(e["side"][s]) == side and int(e["mac"][s]) == m \
                and int(e["updated"][s]) == now:
            return
        seq = int(e["seq"][s])
        e["seq"][s] = seq + 1  # odd: being written (single writer: the worker receiving ARP)
        e["side"][s] = side
        e["ip"][s] = ip
        e["mac"][s] = m
        e["updated"][s] = now
        e["valid"][s] = 1
        e["seq"][s] = seq + 2

    def get(self, side: int, ip: int) -> tuple[bytes, int] | None:
        s = self._slot(side, ip)
        for _ in range(8):
            a = int(self.e["seq"][s])
            rec = self.e[s].copy()
            if a & 1 or int(self.e["seq"][s]) != a:
                continue
            if rec["valid"] and int(rec["ip"]) == ip and int(rec["side"]) == side:
                return int_to_mac(int(rec["mac"])), int(rec["updated"])
            return None
        return None


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + 64, np.uint8)
    skip = (-raw.ctypes.data) % 64
    return raw[skip:skip + nbytes]


class _PMap:
    """A mapping touched by the burst being processed (slow path bookkeeping until :meth:`NatPipeline._flush_new`)."""

    __slots__ = ("iaddr", "iport", "proto", "xa", "xp", "state", "target", "added")

    def __init__(self, iaddr: int, iport: int, proto: int, xa: int, xp: int, state: str, target: int = -1) -> None:
        self.iaddr, self.iport, self.proto, self.xa, self.xp = iaddr, iport, proto, xa, xp
        self.state = state  # "new" (allocated now), "sess" (held by its only session), "map" (a MAP entry)
        self.target = target  # in2out slot of the holder ("sess"/"map")
        self.added: list[int] = []  # new sessions (positions in NatPipeline._new) using it


class _FragFlow:
    """What the fragments of one datagram share (the fragment tracker's ``ports``): the translation,
    the route, and the session they are accounted to (``key0`` guards against a reused slot)."""

    __slots__ = ("which", "addr", "port", "hop", "fdst", "slot", "key0", "refresh")

    def __init__(self, which: str, addr: int, port: int, hop: int, fdst: int, slot: int, key0: int) -> None:
        self.which, self.addr, self.port, self.hop, self.fdst = which, addr, port, hop, fdst
        self.slot, self.key0 = slot, key0
        self.refresh = True  # set from the first fragment's TCP flags when it is translated


class NatPipeline:
    """NAT44 for one worker: both directions of the sessions whose outside ports are in its block.

    ``zones``: the worker's buffers from :func:`hotplane.primary.nat_zones.attach_nat_zones`
    (``in2out`` session table, ``index`` session index, ``pool`` header + allocator, ``lpm``
    FIB); None builds private ones (tests, benchmarks) of ``table_capacity`` entries. ``clock``:
    the session clock (:class:`MonotonicClock` by default). ``macs``: the gateway's own MACs
    (``inside_gw``/``outside_gw``) when the config does not name them.
    """

    def __init__(self, config: GatewayConfig, worker: int = 0, zones: dict[str, Any] | None = None,
                 clock: Clock | None = None, *, macs: dict[str, Any] | None = None, capacity: int = 512,
                 table_capacity: int | None = None, expiry_slice: int | None = None) -> None:
        self.config = config
        self.nat = config.nat
        self.worker = worker
        self.clock = clock or MonotonicClock()
        gw = config.gateway
        macs = dict(DEFAULT_MACS, **(macs or {}))
        self.own_mac = (mac_bytes(gw.inside_mac or macs["inside_gw"]), mac_bytes(gw.outside_mac or macs["outside_gw"]))
        self._own_mac_row = tuple(np.frombuffer(m, np.uint8) for m in self.own_mac)
        self.own_ip = (int(gw.inside_address.ip), int(gw.outside_address.ip))
        self.pool = [int(a) for a in self.nat.pool_addresses()]
        self.statics = list(self.nat.static)
        # Static lookups (slow path): port forwards by (proto, outside addr, port) and
        # (proto, inside addr, port); 1:1 by address.
        self.fwd_out = {(m.proto_number, int(m.outside_addr), m.outside_port): (int(m.inside_addr), m.inside_port)
                        for m in self.statics if not m.one_to_one}
        self.fwd_in = {(m.proto_number, int(m.inside_addr), m.inside_port): (int(m.outside_addr), m.outside_port)
                       for m in self.statics if not m.one_to_one}
        self.one_out = {int(m.outside_addr): int(m.inside_addr) for m in self.statics if m.one_to_one}
        self.one_in = {int(m.inside_addr): int(m.outside_addr) for m in self.statics if m.one_to_one}
        self.pool_set = frozenset(self.pool)
        # Addresses the gateway answers for / hairpins to (outside side).
        outside_own = sorted(self.pool_set | set(self.one_out) | {a for (_, a, _) in self.fwd_out} | {self.own_ip[1]})
        self.outside_addrs = np.array(outside_own, np.uint32)
        self.local_in = np.array(sorted({self.own_ip[0], *outside_own}), np.uint32)
        self.filtering = self.nat.filtering
        w = self.nat.workers
        self.host_session_limit = self.nat.per_worker_limit(self.nat.per_host_sessions, w)
        self.port_lo, self.port_hi = self.nat.worker_port_range(worker)

        # Shared state: session table + index, allocator, FIB.
        self.zone_header = None
        if zones is None:
            if table_capacity is None:
                table_capacity = table_capacity_for(config)
            zones = private_zones(config, worker, self.clock, table_capacity)
        self.in2out: SessionTable = zones["in2out"]
        self.index: SessionIndex = zones["index"]
        if self.index.key_format != KEY_FORMAT:
            raise RuntimeError(f"session index of worker {worker} uses key format {self.index.key_format}, this "
                               f"build understands {KEY_FORMAT}: migrate the sessions or start with fresh zones")
        self.alloc: PortAllocator = zones["pool"]
        self.alloc.clock = self.clock
        self.lpm: Lpm = zones["lpm"]
        self.mirror = NeighbourMirror(zones["neigh"])
        self.zone_header = zones.get("pool_header")
        self.peers: dict[int, tuple[SessionIndex, SessionTable]] = {}
        if zones.get("peers"):
            self.attach_peers(zones["peers"])
        self.hops = next_hops_for(config)
        hl = self.hops.as_list()
        self.hop_port = np.array([0 if h.port == "inside" else 1 for h in hl], np.uint8)
        self.hop_via = np.array([0 if h.via is None else h.via for h in hl], np.uint32)
        self.hop_has_via = np.array([h.via is not None for h in hl], bool)
        # The same, indexed by any 15-bit next-hop value (MISS included), for the fast path.
        self._hop_port_lut = np.full(MISS + 1, 255, np.uint8)
        self._hop_port_lut[: len(hl)] = self.hop_port
        self._hop_via_lut = np.zeros(MISS + 1, np.uint32)
        self._hop_via_lut[: len(hl)] = self.hop_via
        self._any_via = bool(self.hop_has_via.any())
        self.max_entries = int(self.in2out.capacity * MAX_LOAD)
        self._init_lookup()
        self.max_hints = int(self.index.capacity * INDEX_LOAD)

        self.neigh = (
            # Up to a ring's worth of packets per next hop may arrive in the time one ARP
            # exchange takes (workers that do not receive ARP learn via the mirror on tick):
            # hold them, bounded in bytes, rather than drop them.
            NeighbourTable(self.clock, self.own_ip[0], queue_len=NEIGH_QUEUE, max_queued_bytes=NEIGH_QUEUE_BYTES),
            NeighbourTable(self.clock, self.own_ip[1], own=outside_own, queue_len=NEIGH_QUEUE, max_queued_bytes=NEIGH_QUEUE_BYTES),
        )
        self.frag = FragmentTracker.from_limits(self.nat.fragments, self.clock)
        cursor = 0 if self.zone_header is None else int(self.zone_header["expiry_cursor"][0])
        self.sweeper = ExpirySweeper(self.in2out.capacity, expiry_slice or max(1024, self.in2out.capacity // 256),
                                     self.nat.timeouts, cursor)

        # Contract outputs.
        self.pb = ParsedBurst(capacity)
        self.drops = np.zeros(N_REASONS, np.int64)
        self.forwarded = 0
        self.punted = 0
        self.emit: list[tuple[int, bytes]] = []
        self.stats = {"sessions_created": 0, "sessions_expired": 0, "icmp_errors_translated": 0, "hairpinned": 0,
                      "echo_replies": 0, "arp_replies": 0, "icmp_bad_checksum": 0, "neigh_drops": 0,
                      "frag_translated": 0, "fast": 0, "index_full": 0, "index_rebuilds": 0}
        self._empty = np.zeros(0, np.intp)
        self._arange = np.arange(capacity, dtype=np.intp)
        # Fast-path scratch (bursts up to ``capacity``) and tables.
        self._s_ok = np.zeros(capacity, bool)
        self._s_b1 = np.zeros(capacity, bool)
        self._s_u32 = np.zeros(capacity, np.uint32)
        self._s_i32 = np.zeros(capacity, np.int32)
        self._s_i32b = np.zeros(capacity, np.int32)
        self._s_k0 = np.zeros(capacity, _U64)
        self._s_k1 = np.zeros(capacity, _U64)
        self._s_i64 = np.zeros(capacity, np.int64)
        self._s_i64b = np.zeros(capacity, np.int64)
        self._s_i64c = np.zeros(capacity, np.int64)
        self._s_i64d = np.zeros(capacity, np.int64)
        self._kind = _KIND
        self._mac_rows: dict[tuple[int, int], np.ndarray] = {}  # (next-hop MAC, side) -> the 12 header bytes
        # Local addresses, padded so that searchsorted never runs off the end.
        self._local_pad = np.append(self.local_in.astype(np.uint64), np.uint64(1 << 32))
        self._host_sessions: dict[int, int] = {}
        # Slow-path batch (one burst) and the fast path's accounting log.
        self._pending: dict[tuple[int, int], tuple[int, int, int]] = {}
        self._slots_done: list[int] = []
        self._new_base = 0
        self._pre_ok = False
        self._new: list[tuple] = []
        self._pmaps: dict[tuple[int, int, int], _PMap] = {}
        self._pmaps_rev: dict[tuple[int, int, int], _PMap] = {}
        self._log: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]] = []  # (slots, bytes, refresh, inbound)
        # A version-2 table (schema/session.py) also counts the reply direction's bytes per session.
        self._bytes_in = "bytes_in" in (self.in2out.entries.dtype.names or ())
        self._cur_dir = INSIDE  # the direction of the burst being processed (for the accounting log)
        self._log_n = 0
        self._log_now = 0
        if self.in2out.is_writer:
            self._check_index()
        else:
            self.index.writer = False  # an upgrade candidate: reads only until resume()
        self._rebuild_host_counts()

    # ------------------------------------------------------------------ in2out lookup

    def _init_lookup(self) -> None:
        """Flat views and constants for :meth:`_t_lookup` (the writer's own lookups of ``in2out``)."""
        t = self.in2out
        self._e64 = t.entries.view(np.uint64)  # word w of slot s at 8 * s + w (key0: 1, key1: 2)
        self._e8 = t.entries.view(np.uint8)  # state of slot s at 64 * s + 4
        self._tmask = t._mask_i  # slot arithmetic: capacity - 1, or all ones where windows do not wrap
        self._tmask_u = np.uint64(t.capacity - 1)
        self._twraps = t.wraps
        self._tnhome_u = np.uint64(t.nhome)
        self._tseed = t.seed
        self._tseed_u = np.uint64(t.seed)
        self._off07 = np.arange(min(8, t.max_probe), dtype=np.int64)
        self._h_x = np.zeros(BURST_SCRATCH, _U64)
        self._h_y = np.zeros(BURST_SCRATCH, _U64)
        self._h_h = np.zeros((BURST_SCRATCH, 2), np.int64)
        # The probing below is the table's (module docstring of shared/session_table.py); if its
        # hashing ever differs from this reading, use the table's own lookup.
        k = np.arange(1, 9, dtype=_U64) * _KMIX
        self._lean = bool((self._t_homes(k, ~k) == t.homes(k, ~k)).all())

    def _t_homes(self, k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
        """Home slots (n, 2) of keys in ``in2out``: the table's hash (``mix_hash``), into scratch."""
        n = k0.shape[0]
        if n > self._h_x.shape[0]:
            x = mix_hash(k0, k1, self._tseed)
            y = np.empty_like(x)
            h = np.empty((n, 2), np.int64)
        else:
            x, y, h = self._h_x[:n], self._h_y[:n], self._h_h[:n]
            # The multiply-xorshift of shared/session_table._mix, written out with scratch.
            np.bitwise_xor(k0, self._tseed_u, out=x)
            np.multiply(x, _MIX1, out=x)
            np.multiply(k1, _MIX2, out=y)
            x += y
            np.right_shift(x, _U64(29), out=y)
            x ^= y
            np.multiply(x, _MIX3, out=x)
            np.right_shift(x, _S32, out=y)
            x ^= y
        if self._twraps:
            np.bitwise_and(x, self._tmask_u, out=h[:, 0], casting="unsafe")
            x >>= _S32
            np.bitwise_and(x, self._tmask_u, out=h[:, 1], casting="unsafe")
            return h
        # The table's multiply-shift range reduction of each 32-bit half (no power-of-two capacity).
        np.bitwise_and(x, _M32, out=y)
        y *= self._tnhome_u
        np.right_shift(y, _S32, out=h[:, 0], casting="unsafe")
        x >>= _S32
        x *= self._tnhome_u
        np.right_shift(x, _S32, out=h[:, 1], casting="unsafe")
        return h

    def _t_lookup(self, k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
        """Slots of keys in ``in2out`` (-1: absent); the writer's exact lookup, vectorized.

        Two-choice windows as the table probes them: first the home slot of
        both windows (where ~80% of keys sit at load 0.8, ~90% at 0.6), whole
        key and state compared: two cache lines per key; then offsets 0-7 for
        the keys left (key0 first; an EMPTY ends a window), then the table's own lookup.
        """
        n = k0.shape[0]
        if n == 0:
            return np.zeros(0, np.int64)
        if not self._lean:
            idx = np.empty(n, np.int64)
            self.in2out.lookup_batch(k0, k1, idx, np.empty(n, bool))
            return idx
        e64, e8 = self._e64, self._e8
        h = self._t_homes(k0, k1)
        i8 = h << 3
        m = np.take(e64, i8 + 1) == k0[:, None]
        m &= np.take(e64, i8 + 2) == k1[:, None]
        i8 <<= 3
        i8 += 4
        m &= np.take(e8, i8) == USED
        slot = np.where(m[:, 0], h[:, 0], h[:, 1])
        miss = ~(m[:, 0] | m[:, 1])
        if np.count_nonzero(miss):
            # Offsets 0-7 of both windows by key0, the first match confirmed; a key not there
            # whose both windows hold an EMPTY entry there is absent (chain invariant); what is
            # still unsettled (about 1 key in 100 at load 0.8) goes to the table's own lookup.
            r = miss.nonzero()[0]
            ws = ((h[r][:, :, None] + self._off07) & self._tmask).reshape(r.size, -1)
            w8 = ws << 3
            eq = np.take(e64, w8 + 1) == k0[r, None]
            ar = np.arange(r.size)
            f = eq.argmax(axis=1)
            cand = ws[ar, f]
            ok = eq[ar, f] & (np.take(e64, (cand << 3) + 2) == k1[r]) & (np.take(e8, (cand << 6) + 4) == USED)
            slot[r] = np.where(ok, cand, -1)
            ended = (np.take(e8, (w8 << 3) + 4) == 0).reshape(r.size, 2, -1).any(axis=2).all(axis=1)
            rest = r[~ok & ~(ended & ~eq.any(axis=1))]
            if rest.size:
                idx = np.empty(rest.size, np.int64)
                self.in2out.lookup_batch(k0[rest], k1[rest], idx, np.empty(rest.size, bool))
                slot[rest] = idx
        return slot

    # ------------------------------------------------------------------ restart support and hand-over

    def _check_index(self) -> None:
        """As the writer: rebuild the index if a writer died inside a group (or it was lost)."""
        if self.index.needs_rebuild or (self.index.count == 0 and self.in2out.count):
            self.rebuild_index()

    def suspend(self) -> None:
        """Stop writing (the old side of a hot upgrade, at a burst boundary): write the accounting
        log, save the expiry cursor, give up the writer role of the table and the index."""
        self.flush()
        if self.zone_header is not None:
            self.zone_header["expiry_cursor"] = self.sweeper.cursor
        self.in2out.release()
        self.index.writer = False

    def resume(self, *, rebuild_host_counts: bool = True) -> None:
        """Take the writer role (the new side of a hot upgrade, after the old one suspended):
        table recovery, index check, expiry cursor and per-host counts from shared memory.

        O(1) on a clean hand-over (the previous writer released the table after a finished
        batch): recovery scans the table only after a writer died. ``rebuild_host_counts=False``:
        the per-host counts were kept exact meanwhile (:meth:`adjust_host_counts`)."""
        if not self.in2out.is_writer:
            h = self.in2out._hdr[0]
            prev, jseq, jdone = int(h["writer_pid"]), int(h["jseq"]), int(h["jdone"])
            self.in2out._take_writer(False)
            if prev not in (0, os.getpid()) or jseq & 1 or jdone != jseq:
                self.in2out.recovered = self.in2out.recover()
        self.index.hdr["writer_pid"] = os.getpid()
        self.index.writer = True
        self._check_index()
        if self.zone_header is not None:
            self.sweeper.cursor = int(self.zone_header["expiry_cursor"][0]) % self.sweeper.capacity
        if rebuild_host_counts:
            self._host_sessions = {}
            self._rebuild_host_counts()

    def adjust_host_counts(self, old: np.ndarray, new: np.ndarray) -> None:
        """Per-inside-host session counts follow entries rewritten outside this pipeline (a hot
        upgrade's migration copying into this table): ``old``/``new`` are the entries before/after."""
        hs = self._host_sessions
        for recs, sign in ((old, -1), (new, 1)):
            fl = recs["flags"]
            live = (recs["state"] == USED) & ((fl == FLAG_SESSION) | (fl == FLAG_STATIC))
            if not live.any():
                continue
            hosts, _ = split_keys(recs["key0"][live], recs["key1"][live])
            u, c = np.unique(hosts.astype(np.uint32), return_counts=True)
            for h, k in zip(u.tolist(), c.tolist()):
                v = hs.get(h, 0) + sign * k
                if v > 0:
                    hs[h] = v
                else:
                    hs.pop(h, None)

    def _rebuild_host_counts(self) -> None:
        """Per-inside-host session counts, derived from the in2out table (so they survive restarts)."""
        e = self.in2out.entries
        live = (e["state"] == USED) & ((e["flags"] == FLAG_SESSION) | (e["flags"] == FLAG_STATIC))
        if live.any():
            hosts, _ = split_keys(e["key0"][live], e["key1"][live])
            u, c = np.unique(hosts.astype(np.uint32), return_counts=True)
            self._host_sessions = dict(zip(u.tolist(), c.tolist()))

    def rebuild_index(self) -> int:
        """Rebuild every hint from the ``in2out`` entries (after a writer died inside a group); returns hints stored."""
        idx = self.index
        idx.begin()
        idx.clear()
        e = self.in2out.entries
        used = np.flatnonzero(e["state"] == USED)
        stored = 0
        for a in range(0, used.size, 1 << 16):
            s = used[a:a + (1 << 16)]
            rec = e[s]
            k1 = rec["key1"]
            hi, lo = split_keys(rec["key0"], k1)
            proto = (k1 >> _S32) & _U64(0xFF)
            pa, pb = (k1 >> _S16) & _U64(0xFFFF), k1 & _U64(0xFFFF)
            fl = rec["flags"]
            xa, xp = rec["xaddr"].astype(_U64), rec["xport"].astype(_U64)
            sess = (fl == FLAG_SESSION) | (fl == FLAG_STATIC)
            rp = np.where(proto == IPPROTO_ICMP, xp, pb)
            kas = [(lo << _S32 | xa)[sess]]
            kbs = [((proto << _S32) | (rp << _S16) | xp)[sess]]
            vals = [s[sess]]
            # Mapping holders: MAP entries, and sessions whose mapping has no MAP entry.
            maps = fl == FLAG_MAP
            mk = (hi << _S32) | (proto << _S16) | pa
            plain = (fl == FLAG_SESSION) & ~np.isin(mk, self._all_map_keys())
            hold = maps | plain
            for ka, kb in ((hi[hold], (_U64(TAG_FWD) << _U64(48)) | (proto[hold] << _S32) | pa[hold]),
                           (xa[hold], (_U64(TAG_REV) << _U64(48)) | (proto[hold] << _S32) | xp[hold])):
                kas.append(ka)
                kbs.append(kb)
                vals.append(s[hold])
            ok = idx.insert_batch(np.concatenate(kas), np.concatenate(kbs), np.concatenate(vals))
            stored += int(ok.sum())
            self.stats["index_full"] += int((~ok).sum())
        idx.end()
        self.stats["index_rebuilds"] += 1
        return stored

    def _all_map_keys(self) -> np.ndarray:
        """(iaddr << 32 | proto << 16 | iport) of every MAP entry (for rebuilds)."""
        e = self.in2out.entries
        m = np.flatnonzero((e["state"] == USED) & (e["flags"] == FLAG_MAP))
        k1 = e["key1"][m]
        hi, _ = split_keys(e["key0"][m], k1)
        return (hi << _S32) | (((k1 >> _S32) & _U64(0xFF)) << _S16) | ((k1 >> _S16) & _U64(0xFFFF))

    # ------------------------------------------------------------------ the burst

    def process(self, direction: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Translate a burst in place; returns ``(to_other, to_same)`` row indices (contract)."""
        self.forwarded = 0
        self.punted = 0
        self._cur_dir = direction
        n = int(lengths.shape[0])
        if n == 0:
            return self._empty, self._empty
        fast = None
        if n <= self.pb.capacity and frames.ndim == 2 and frames.dtype == np.uint8 and frames.shape[1] >= 52 \
                and frames.shape[1] % 4 == 0 and frames.strides[1] == 1 and frames.strides[0] % 4 == 0:
            fast, handled = self._fast(direction, frames, lengths, valid, n)
            if fast.size == n:
                return fast, self._empty
            if fast.size:
                valid = valid & ~handled
        rows = self._general(direction, frames, lengths, valid, n)
        if fast is not None and fast.size:
            rows = np.concatenate((fast, rows)) if rows.size else fast
        return rows, self._empty

    def _fast(self, d: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray, n: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Translate the session hits among the plain frames; returns (rows done, mask of rows done).

        Reads fixed columns (untagged Ethernet, IHL 5) of the burst and leaves
        every row it does not fully handle untouched, for the general path.
        Its checks are those of ``parse_burst`` for such a frame, or stricter.
        When only some rows qualify, their first ``_HDR`` bytes are gathered
        into a compact copy, translated there and copied back.
        """
        F = frames[:n]
        W = F.view(">u2")
        U4 = F.view(">u4")
        ok = self._s_ok[:n]
        b1 = self._s_b1[:n]
        s32 = self._s_u32[:n]
        tot = self._s_i32[:n]
        i32 = self._s_i32b[:n]
        # Ethertype 0x0800, version 4, IHL 5 (TOS ignored).
        np.bitwise_and(U4[:, 3], 0xFFFFFF00, out=s32)
        np.equal(s32, 0x08004500, out=ok)
        # No MF, fragment offset 0, TTL >= 2 (a TTL-1 packet needs the slow path's ICMP): one range test.
        np.bitwise_and(U4[:, 5], 0x3FFFFF00, out=s32)
        np.subtract(s32, 0x200, out=s32)
        np.less(s32, 0x10000 - 0x200, out=b1)
        ok &= b1
        np.copyto(tot, W[:, 8])
        np.add(tot, 14, out=i32)
        np.less_equal(i32, lengths, out=b1)
        ok &= b1
        if int(lengths.max()) > F.shape[1]:
            ok &= lengths <= F.shape[1]
        # Header checksum: the ten words sum to a multiple of 0xFFFF (non-zero: the version nibble).
        np.add.reduce(W[:, 7:17], axis=1, dtype=np.uint32, out=s32)
        np.remainder(s32, 0xFFFF, out=s32)
        np.equal(s32, 0, out=b1)
        ok &= b1
        # L4 header inside the datagram: TCP 20 <= data offset <= l4 length, UDP 8 <= length <= l4
        # length, ICMP (queries of this direction only) 8 <= l4 length.
        kind = self._kind[d][F[:, 23], F[:, 34]]
        np.choose(kind, (tot, F[:, 46] >> 4 << 2, W[:, 19], 8), out=i32)
        np.greater_equal(i32, _L4_LO[kind], out=b1)
        ok &= b1
        np.subtract(tot, 20, out=tot)
        np.less_equal(i32, tot, out=b1)
        ok &= b1
        ok &= valid[:n]
        if d == INSIDE:
            # Hairpin and to-gateway traffic never takes the fast path.
            dst = U4[:, 7]
            np.not_equal(self._local_pad[np.searchsorted(self._local_pad, dst)], dst, out=b1)
            ok &= b1
        m = int(np.count_nonzero(ok))
        if m == 0:
            return self._empty, ok
        if m == n:
            rows = self._arange[:n]
            G = F  # every row: work on the burst itself
        else:
            rows = ok.nonzero()[0]
            kind = kind[rows]
            G = F[rows, :_HDR]  # compact copy of the headers
        GW = G.view(">u2")
        # Keys: src|dst is one big-endian 64-bit word (bytes 26-33), sport|dport one 32-bit word.
        ab = G[:, 26:34].view(">u8")[:, 0]
        k1 = self._s_k1[:m]
        np.copyto(k1, G[:, 34:38].view(">u4")[:, 0])
        icmp = kind == K_ICMP
        anyicmp = bool(np.count_nonzero(icmp))
        if anyicmp:
            idw = GW[:, 19].astype(_U64)
            np.copyto(k1, idw * _U64(0x10001), where=icmp)  # the identifier is both "ports"
        proto = G[:, 23]
        np.bitwise_or(k1, np.left_shift(proto, _S32, dtype=_U64), out=k1)
        ent = self.in2out.entries
        if d == INSIDE:
            k0 = self._s_k0[:m]
            np.multiply(k1, _KMIX, out=k0)
            np.bitwise_xor(k0, ab, out=k0)
            slot = self._t_lookup(k0, k1)
            hit = slot >= 0
            rec = ent[np.where(hit, slot, 0)]
            xaddr = rec["xaddr"]
            xport = rec["xport"]
            fdst = G[:, 30:34].view(">u4")[:, 0].astype(np.uint32)
        else:
            # Outside: the index hint, confirmed against the session entry.
            ka = ab.astype(_U64)
            slot = self.index.lookup(ka, k1)
            hit = slot >= 0
            rec = ent[np.where(hit, slot, 0)]
            rk1 = rec["key1"]
            ia, ra = split_keys(rec["key0"], rk1)
            fl = rec["flags"]
            # The entry must be this session: remote address and port, outside address and port, protocol.
            hit &= (rec["state"] == USED) & ((fl == FLAG_SESSION) | (fl == FLAG_STATIC)) & (ra == (ka >> _S32)) \
                & (rec["xaddr"] == (ka & _M32)) & (rec["xport"] == (k1 & _U64(0xFFFF))) & ((rk1 >> _S32) == (k1 >> _S32)) \
                & (icmp | ((rk1 & _U64(0xFFFF)) == ((k1 >> _S16) & _U64(0xFFFF))))
            fdst = ia.astype(np.uint32)
            xaddr = fdst
            xport = ((rk1 >> _S16) & _U64(0xFFFF)).astype(np.uint16)
        hop = self.lpm.lookup_batch(fdst)
        out_side = OUTSIDE if d == INSIDE else INSIDE
        hit &= self._hop_port_lut[hop] == out_side
        if self._any_via:
            via = self._hop_via_lut[hop]
            nh = np.where(via != 0, via, fdst)
        else:
            nh = fdst
        macs, found, actions = self.neigh[out_side].lookup_batch(nh)
        if actions:
            self._actions(out_side, actions)
        hit &= found
        k = int(np.count_nonzero(hit))
        if k != m:
            if k == 0:
                ok[:] = False
                return self._empty, ok
            keep = hit.nonzero()[0]
            ok[rows[~hit]] = False
            rows, kind, slot, rec, xaddr, xport, macs, icmp = (
                rows[keep], kind[keep], slot[keep], rec[keep], xaddr[keep], xport[keep], macs[keep], icmp[keep])
            G = G[keep] if G is not F else F[rows, :_HDR]
            GW = G.view(">u2")
            anyicmp = bool(np.count_nonzero(icmp))
            m = k
        # Sessions: TCP state (written at once when it changes), then the accounting log.
        tcp = kind == K_TCP
        refresh = None
        if np.count_nonzero(tcp):
            refresh = self._tcp(d, slot, tcp, rec["tcp_state"], G[:, 47])
        self._log_acct(slot, GW[:, 8], refresh)
        # Rewrite: one eqn. 3 step per checksum: the address (and the TTL, IP header; the
        # pseudo-header address and the port, L4). All sums stay far below 2**31.
        aw = 13 if d == INSIDE else 15  # first word of the rewritten address
        na = self._s_i64[:m]
        np.copyto(na, xaddr)
        da = self._s_i64b[:m]
        np.right_shift(na, 16, out=da)
        np.bitwise_and(na, 0xFFFF, out=na)
        da += na
        da -= GW[:, aw]
        da -= GW[:, aw + 1]  # da: change of the address's word sum
        t = self._s_i64c[:m]
        np.subtract(np.int64(_K_IP), GW[:, 12], out=t)
        t += da
        _fold2(t, na)
        np.subtract(0xFFFF, t, out=t)
        GW[:, 12] = t
        GW[:, 11] -= np.uint16(0x100)
        kmin = int(kind.min())
        if kmin == int(kind.max()):
            cw = int(_CSUM_WORD[kmin])
            pw = int(_PORT_WORD[d, kmin])
            c4, op = GW[:, cw], GW[:, pw]
        else:
            ar = self._arange[:m]
            cw = _CSUM_WORD[kind]
            pw = _PORT_WORD[d][kind]
            c4, op = GW[ar, cw], GW[ar, pw]
        t4 = self._s_i64d[:m]
        np.subtract(np.int64(_K_L4), c4, out=t4)
        t4 -= op
        t4 += xport
        if anyicmp:
            # ICMP has no pseudo-header: its constant's address share goes instead of the change.
            np.copyto(da, -0x1FFFE, where=icmp)
        t4 += da
        _fold2(t4, na)
        np.subtract(0xFFFF, t4, out=t4)
        udp = kind == K_UDP
        if np.count_nonzero(udp):
            # UDP: a checksum of 0 ("none") stays 0; a computed 0 is sent as 0xFFFF.
            t4[udp & (t4 == 0)] = 0xFFFF
            t4[udp & (c4 == 0)] = 0
        GW[:, aw] = xaddr >> 16
        GW[:, aw + 1] = xaddr & 0xFFFF
        if isinstance(cw, int):
            GW[:, cw] = t4
            GW[:, pw] = xport
        else:
            GW[ar, cw] = t4
            GW[ar, pw] = xport
        # MACs: one broadcast when every packet goes to one next hop.
        osrc = self._own_mac_row[out_side]
        if np.count_nonzero(macs != macs[0]) == 0:
            key = (int(macs[0]), out_side)
            row = self._mac_rows.get(key)
            if row is None:
                if len(self._mac_rows) > 4096:
                    self._mac_rows.clear()
                row = self._mac_rows[key] = np.concatenate((macs_to_bytes(macs[:1])[0], osrc))
            G[:, 0:12] = row
        else:
            G[:, 0:6] = macs_to_bytes(macs)
            G[:, 6:12] = osrc
        if G is not F:
            F[rows, :_HDR] = G
        self.forwarded += m
        self.stats["fast"] += m
        return rows, ok

    def _tcp(self, d: int, slot: np.ndarray, tcp: np.ndarray, state: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """TCP state machine for the TCP rows of a burst; writes changed states; returns refresh per row."""
        refresh = np.ones(slot.size, bool)
        t = np.flatnonzero(tcp)
        st = state[t]
        ev = nat_tcp.EVENT_OF_FLAGS[flags[t]]
        ns = nat_tcp.NEXT_STATE[st, d, ev]
        refresh[t] = nat_tcp.REFRESH[st, d, ev]
        if (ns != st).any():
            # Some state changes: apply the burst in packet order (several packets of one session).
            u, inv = np.unique(slot[t], return_inverse=True)
            cur = self.in2out.entries["tcp_state"][u]
            states = cur.copy()
            _, _, ref = nat_tcp.advance(states, inv, np.full(t.size, d, np.uint8), flags[t])
            refresh[t] = ref
            ch = np.flatnonzero(states != cur)
            if ch.size:
                v = np.zeros(ch.size, dtype=[("tcp_state", "u1")])
                v["tcp_state"] = states[ch]
                self.in2out.update_batch(u[ch], v)
        return refresh

    # ------------------------------------------------------------------ session accounting (batched)

    def _log_acct(self, slots: np.ndarray, nbytes: np.ndarray, refresh: np.ndarray | None) -> None:
        """Log a burst's packets for their sessions; :meth:`flush` writes them."""
        now = self.clock.now()
        if self._log_n and now != self._log_now:
            self.flush()
        self._log_now = now
        self._log.append((slots.copy(), np.asarray(nbytes, np.uint64), None if refresh is None else refresh.copy(), self._cur_dir == OUTSIDE))
        self._log_n += slots.size
        if self._log_n >= ACCT_FLUSH:
            self.flush()

    def flush(self) -> int:
        """Write the logged packets to their sessions: packets, bytes, and last_seen where refreshed.

        One journaled update per chunk of distinct sessions. Returns the sessions updated.
        """
        if not self._log_n:
            return 0
        log, self._log, self._log_n = self._log, [], 0
        slots = np.concatenate([x[0] for x in log])
        nbytes = np.concatenate([x[1] for x in log])
        u, inv = np.unique(slots, return_inverse=True)
        e = self.in2out.entries
        cur = e[u]
        fields = [("last_seen", "<u4"), ("packets", "<u8"), ("bytes", "<u8")] + ([("bytes_in", "<u8")] if self._bytes_in else [])
        vals = np.zeros(u.size, dtype=fields)
        vals["packets"] = cur["packets"] + np.bincount(inv, minlength=u.size).astype(np.uint64)
        vals["bytes"] = cur["bytes"] + np.bincount(inv, weights=nbytes, minlength=u.size).astype(np.uint64)
        if self._bytes_in:  # bytes received on the outside port (reply direction)
            inb = np.concatenate([x[1] if x[3] else np.zeros(x[1].size, np.uint64) for x in log])
            vals["bytes_in"] = cur["bytes_in"] + np.bincount(inv, weights=inb, minlength=u.size).astype(np.uint64)
        if all(x[2] is None for x in log):
            vals["last_seen"] = self._log_now
        else:
            ref = np.concatenate([np.ones(x[0].size, bool) if x[2] is None else x[2] for x in log])
            fresh = np.zeros(u.size, bool)
            fresh[inv[ref]] = True
            vals["last_seen"] = np.where(fresh, self._log_now, cur["last_seen"])
        self.in2out.update_batch(u, vals)
        return int(u.size)

    # ------------------------------------------------------------------ the general path

    def _general(self, direction: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray, n: int
                 ) -> np.ndarray:
        """Full parse and lookups for the rows the fast path left; slow path for the misses."""
        pb = self.pb
        self._pending, self._slots_done, self._new_base = {}, [], 0
        parse_burst(frames, lengths, pb)
        ok = pb.valid[:n] & valid
        bad = valid & ~ok
        if bad.any():
            self._invalid_rows(direction, frames, lengths, np.flatnonzero(bad))
        proto = pb.proto[:n]
        tcpudp = (proto == IPPROTO_TCP) | (proto == IPPROTO_UDP)
        itype = pb.icmp_type[:n]
        q = (_QUERY_REQ if direction == INSIDE else _QUERY_REP)[itype] & (proto == IPPROTO_ICMP)
        elig = ok & (tcpudp | q) & (pb.ttl[:n] > 1)
        dst = pb.dst[:n]
        if direction == INSIDE:
            pos = np.searchsorted(self.local_in, dst)
            pos[pos >= len(self.local_in)] = 0
            elig &= self.local_in[pos] != dst
        rows = np.flatnonzero(elig)
        src = pb.src[:n][rows].astype(_U64)
        dr = dst[rows].astype(_U64)
        k1 = (proto[rows].astype(_U64) << _S32) | (pb.sport[:n][rows].astype(_U64) << _S16) | pb.dport[:n][rows]
        ent = self.in2out.entries
        if direction == INSIDE:
            k0 = ((src << _S32) | dr) ^ (k1 * _KMIX)
            idx = self._t_lookup(k0, k1)
            hits = idx >= 0
            hit_rows, sess = rows[hits], idx[hits]
            xaddr, xport = ent["xaddr"][sess], ent["xport"][sess]
        else:
            cand = self.index.lookup((src << _S32) | dr, k1)
            sess = np.array([self._o2i_confirm(int(c), int(s), int(d_), int(k)) if c >= 0 else -1
                             for c, s, d_, k in zip(cand.tolist(), src.tolist(), dr.tolist(), k1.tolist())], np.int64)
            hits = sess >= 0
            hit_rows, sess = rows[hits], sess[hits]
            rk1 = ent["key1"][sess]
            ia, _ = split_keys(ent["key0"][sess], rk1)
            xaddr = ia.astype(np.uint32)
            xport = ((rk1 >> _S16) & _U64(0xFFFF)).astype(np.uint16)
        # Everything else valid goes to the slow path.
        slow = ok.copy()
        slow[hit_rows] = False
        s_rows, s_sess, s_x, s_p = self._slow(direction, frames, lengths, np.flatnonzero(slow))
        nfast = hit_rows.size
        if s_rows.size:
            hit_rows = np.concatenate((hit_rows, s_rows))
            sess = np.concatenate((sess, s_sess))
            xaddr = np.concatenate((xaddr, s_x.astype(np.uint32)))
            xport = np.concatenate((xport, s_p.astype(np.uint16)))
        self._flush_new()  # sessions planned outside _slow (fragments)
        if hit_rows.size == 0:
            return self._empty
        return self._translate_and_send(direction, frames, hit_rows, sess, xaddr, xport, nfast)

    def _o2i_confirm(self, cand: int, raddr: int, xaddr: int, k1: int) -> int:
        """The session slot for an outside packet (raddr -> xaddr, k1 = proto|sport|dport), or -1.

        Tries the first hint, then every hint of the key (a fingerprint can collide)."""
        proto, sp, dp = (k1 >> 32) & 0xFF, (k1 >> 16) & 0xFFFF, k1 & 0xFFFF
        if self._o2i_ok(cand, raddr, xaddr, proto, sp, dp):
            return cand
        for c in self.index.candidates((raddr << 32) | xaddr, k1):
            if self._o2i_ok(c, raddr, xaddr, proto, sp, dp):
                return c
        return -1

    def _o2i_ok(self, s: int, raddr: int, xaddr: int, proto: int, rport: int, xport: int,
                table: SessionTable | None = None) -> bool:
        if s < 0 or s >= self.in2out.capacity:
            return False
        r = (table or self.in2out).entries[s]
        if r["state"] != USED or int(r["flags"]) not in (FLAG_SESSION, FLAG_STATIC):
            return False
        _, b, _, p, _, pb_ = split_key(int(r["key0"]), int(r["key1"]))
        return (b == raddr and p == proto and int(r["xaddr"]) == xaddr and int(r["xport"]) == xport
                and (proto == IPPROTO_ICMP or pb_ == rport))

    def _o2i_find(self, raddr: int, xaddr: int, proto: int, rport: int, xport: int) -> int:
        """Slot of the session an outside packet (raddr:rport -> xaddr:xport) belongs to, or -1."""
        ka, kb = o2i_key(raddr, xaddr, proto, rport, xport)
        for c in self.index.candidates(ka, kb):
            if self._o2i_ok(c, raddr, xaddr, proto, rport, xport):
                return c
        return -1

    def _translate_and_send(self, d: int, frames: np.ndarray, rows: np.ndarray, sess: np.ndarray,
                            xaddr: np.ndarray, xport: np.ndarray, nfast: int) -> np.ndarray:
        pb = self.pb
        out_side = OUTSIDE if d == INSIDE else INSIDE
        # Route the final destination.
        fdst = pb.dst[rows] if d == INSIDE else xaddr
        hop = self.lpm.lookup_batch(fdst)
        miss = hop == MISS
        hop_c = np.where(miss, 0, hop)
        good = ~miss & (self.hop_port[hop_c] == out_side)
        if not good.all():
            bad = ~good
            self._count_drop("no_route", int(bad.sum()))
            nfast -= int(bad[:nfast].sum())
            rows, sess, xaddr, xport, hop_c, fdst = rows[good], sess[good], xaddr[good], xport[good], hop_c[good], fdst[good]
            if rows.size == 0:
                return self._empty
        nh = np.where(self.hop_has_via[hop_c], self.hop_via[hop_c], fdst)
        self._account(d, rows, sess)
        if d == INSIDE:
            snat(frames, pb, rows, xaddr, xport)
        else:
            dnat(frames, pb, rows, xaddr, xport)
        decrement_ttl(frames, pb, rows)  # TTL <= 1 rows never got here
        macs, found, actions = self.neigh[out_side].lookup_batch(nh)
        if actions:
            self._actions(out_side, actions)
        if not found.all():
            nf = np.flatnonzero(~found)
            nfast -= int((nf < nfast).sum())
            for j in nf.tolist():
                i = int(rows[j])
                frame = bytearray(frames[i, : int(self.pb.l3_off[i]) + int(self.pb.ip_total_len[i])].tobytes())
                self._send_via(out_side, frame, int(nh[j]))
            self.punted += int(nf.size)
            rows, macs = rows[found], macs[found]
        if rows.size:
            rewrite_macs(frames, pb, rows, self.own_mac[out_side], macs_to_bytes(macs))
        self.forwarded += max(nfast, 0)
        self.punted += int(rows.size) - max(nfast, 0)
        return rows

    def _account(self, d: int, rows: np.ndarray, sess: np.ndarray) -> None:
        """TCP state advance (written now), packets, bytes and last_seen (logged) of rows ``rows``."""
        pb = self.pb
        tcp = pb.proto[rows] == IPPROTO_TCP
        refresh = None
        if tcp.any():
            refresh = self._tcp(d, sess, tcp, self.in2out.entries["tcp_state"][sess], pb.tcp_flags[rows])
        self._log_acct(np.asarray(sess, np.int64), pb.ip_total_len[rows], refresh)

    # ------------------------------------------------------------------ rows the parser refused

    def _invalid_rows(self, d: int, frames: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> None:
        pb = self.pb
        reasons = pb.drop_reason[rows]
        special = (reasons == DropReason.NOT_IPV4) | (reasons == DropReason.FRAGMENT)
        if not special.all():
            np.add.at(self.drops, PACKET_TO_COUNTER[reasons[~special]], 1)
        for i in rows[special].tolist():
            if pb.drop_reason[i] == DropReason.NOT_IPV4:
                if pb.ethertype[i] == ETHERTYPE_ARP:
                    self._arp(d, frames[i, : int(lengths[i])].tobytes())
                else:
                    self._count_drop("not_ipv4")
            else:
                self._fragment(d, frames, i)

    # ------------------------------------------------------------------ slow path

    def _slow(self, d: int, frames: np.ndarray, lengths: np.ndarray, rows: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-row decisions for the misses; returns the rows to translate with their sessions.

        New sessions are planned row by row and published together at the end
        (:meth:`_flush_new`); a row whose session could not be stored is dropped.
        """
        if rows.size == 0:
            return self._empty, self._empty, self._empty, self._empty
        out: list[tuple[int, int, int, int]] = []
        pb = self.pb
        cols = [getattr(pb, f)[rows].tolist() for f in ("src", "dst", "proto", "sport", "dport", "ttl", "icmp_type", "tcp_flags")]
        # The mapping of every row, looked up in one batch (the rows' own sessions were
        # looked up by the caller: a row here has none, unless planned in this burst).
        pr = pb.proto[rows]
        if d == INSIDE:
            pre = self._fwd_batch(pb.src[rows], pr, pb.sport[rows]).tolist()
        else:
            pre = self._rev_batch(pb.dst[rows], pr, pb.dport[rows]).tolist()
        self._pre_ok = True  # cleared when the burst publishes early (the batch is then stale)
        for j, i in enumerate(rows.tolist()):
            src, dst, proto, sp, dp, ttl, itype, flags = (c[j] for c in cols)
            if d == INSIDE:
                r = self._slow_in(frames, i, src, dst, proto, sp, dp, ttl, itype, flags, pre[j])
            else:
                r = self._slow_out(frames, i, src, dst, proto, sp, dp, ttl, itype, flags, pre[j])
            if r is not None:
                out.append((i, r[0], r[1], r[2]))
        self._flush_new()
        if not out:
            return self._empty, self._empty, self._empty, self._empty
        a = np.array(out, np.int64)
        sess = a[:, 1]
        pend = sess < -1
        if pend.any():
            sess[pend] = np.array(self._slots_done, np.int64)[-sess[pend] - 2]
            good = sess >= 0
            if not good.all():
                self._count_drop("table_full", int((~good).sum()))
                a, sess = a[good], sess[good]
        return a[:, 0].astype(np.intp), sess, a[:, 2], a[:, 3]

    def _frame(self, frames: np.ndarray, i: int) -> bytearray:
        return bytearray(frames[i, : int(self.pb.l3_off[i]) + int(self.pb.ip_total_len[i])].tobytes())

    def _slow_in(self, frames, i, src, dst, proto, sp, dp, ttl, itype, flags, pre=None):
        if dst == self.own_ip[INSIDE] or dst == self.own_ip[OUTSIDE] and not (proto, dst, dp) in self.fwd_out:
            return self._local(INSIDE, frames, i, dst, proto, itype)
        if proto == IPPROTO_ICMP and itype in _ICMP_ERRORS:
            return self._icmp_error(INSIDE, frames, i)
        if ttl <= 1:
            return self._ttl_expired(INSIDE, frames, i)
        if proto == IPPROTO_ICMP and itype not in (0, 8, 13, 14):
            return self._count_drop("unsupported_protocol")
        if dst in self.pool_set or dst in self.one_out or (proto, dst, dp) in self.fwd_out:
            return self._hairpin(frames, i, src, dst, proto, sp, dp)
        return self._session_in2out(src, dst, proto, sp, dp, flags, frames, i, pre)

    def _slow_out(self, frames, i, src, dst, proto, sp, dp, ttl, itype, flags, pre=None):
        if proto == IPPROTO_ICMP and itype in _ICMP_ERRORS:
            return self._icmp_error(OUTSIDE, frames, i)
        fwd = (proto, dst, dp) in self.fwd_out
        if dst == self.own_ip[OUTSIDE] and not fwd:
            return self._local(OUTSIDE, frames, i, dst, proto, itype)
        if ttl <= 1:
            return self._ttl_expired(OUTSIDE, frames, i)
        if proto == IPPROTO_ICMP and itype not in (0, 8, 13, 14):
            return self._count_drop("unsupported_protocol")
        if proto == IPPROTO_ICMP and itype in (8, 13) and dst in self.pool_set and dst not in self.one_out:
            return self._local(OUTSIDE, frames, i, dst, proto, itype)
        return self._session_out2in(src, dst, proto, sp, dp, flags, frames, i, pre)

    # -- lookups of the slow path

    def _holders_ok(self, cand: np.ndarray, a: np.ndarray, proto: np.ndarray, port: np.ndarray, rev: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectorized :meth:`_holder_ok` of candidate slots; returns (ok, records)."""
        rec = self.in2out.entries[np.where(cand >= 0, cand, 0)]
        k1 = rec["key1"]
        ia, _ = split_keys(rec["key0"], k1)
        fl = rec["flags"]
        ok = (cand >= 0) & (rec["state"] == USED) & ((fl == FLAG_SESSION) | (fl == FLAG_MAP)) \
            & (((k1 >> _S32) & _U64(0xFF)) == proto)
        if rev:
            ok &= (rec["xaddr"] == a) & (rec["xport"] == port)
        else:
            ok &= (ia == a) & (((k1 >> _S16) & _U64(0xFFFF)) == port)
        return ok, rec

    def _fwd_batch(self, ia: np.ndarray, proto: np.ndarray, ip: np.ndarray) -> np.ndarray:
        """:meth:`_fwd_find` of many (iaddr, proto, iport) at once: holder slots, -1 for none."""
        ia, proto, ip = ia.astype(_U64), proto.astype(_U64), ip.astype(_U64)
        cand = self.index.lookup(ia, (_U64(TAG_FWD) << _U64(48)) | (proto << _S32) | ip)
        ok, _ = self._holders_ok(cand, ia, proto, ip, False)
        res = np.where(ok, cand, -1)
        for r in np.flatnonzero((cand >= 0) & ~ok).tolist():  # a colliding fingerprint: every hint
            res[r] = self._fwd_find(int(ia[r]), int(proto[r]), int(ip[r]))
        return res

    def _rev_batch(self, xa: np.ndarray, proto: np.ndarray, xp: np.ndarray) -> np.ndarray:
        """Holder slots of many (xaddr, proto, xport) at once (-1 for none)."""
        xa, proto, xp = xa.astype(_U64), proto.astype(_U64), xp.astype(_U64)
        cand = self.index.lookup(xa, (_U64(TAG_REV) << _U64(48)) | (proto << _S32) | xp)
        ok, _ = self._holders_ok(cand, xa, proto, xp, True)
        res = np.where(ok, cand, -1)
        for r in np.flatnonzero((cand >= 0) & ~ok).tolist():
            h = self._rev_find(int(xa[r]), int(proto[r]), int(xp[r]))
            res[r] = -1 if h is None else h[0]
        return res

    def _lookup1(self, table: SessionTable, k: tuple[int, int]) -> int:
        return int(self._t_lookup(np.array([k[0]], _U64), np.array([k[1]], _U64))[0])

    def _holder_ok(self, s: int, key: tuple[int, int, int], rev: bool, table: SessionTable | None = None,
                   rec=None) -> bool:
        """Is the entry at ``s`` the holder of the mapping ``key`` ((iaddr, proto, iport), or with ``rev``
        (xaddr, proto, xport))?"""
        t = table or self.in2out
        if s < 0 or s >= t.capacity:
            return False
        r = t.entries[s] if rec is None else rec
        if r["state"] != USED or int(r["flags"]) not in (FLAG_SESSION, FLAG_MAP):
            return False
        a, _, _, p, pa, _ = split_key(int(r["key0"]), int(r["key1"]))
        if rev:
            return p == key[1] and int(r["xaddr"]) == key[0] and int(r["xport"]) == key[2]
        return a == key[0] and p == key[1] and pa == key[2]

    def _fwd_find(self, iaddr: int, proto: int, iport: int) -> int:
        """Slot of the holder of the mapping of (iaddr, proto, iport): its session or its MAP entry; -1: none."""
        k = (iaddr, proto, iport)
        for c in self.index.candidates(*fwd_key(iaddr, proto, iport)):
            if self._holder_ok(c, k, False):
                return c
        return -1

    def _rev_find(self, xaddr: int, proto: int, xport: int, peer: tuple[SessionIndex, SessionTable] | None = None
                  ) -> tuple[int, int, int] | None:
        """(holder slot, iaddr, iport) of the mapping owning (xaddr, proto, xport), or None.

        With ``peer`` (another worker's index and table, read-only) the entry is read with its seqlock."""
        k = (xaddr, proto, xport)
        idx, table = peer if peer is not None else (self.index, self.in2out)
        for c in idx.candidates(*rev_key(xaddr, proto, xport)):
            if c >= table.capacity:
                continue
            if peer is None:
                rec = table.entries[c]
            else:
                recs, ok = table.read_consistent(np.array([c], np.int64), retries=8)
                if not ok[0]:
                    continue
                rec = recs[0]
            if self._holder_ok(c, k, True, table, rec):
                a, _, _, _, pa, _ = split_key(int(rec["key0"]), int(rec["key1"]))
                return c, a, pa
        return None

    def _ref(self, slot: int, delta: int) -> int:
        """Add ``delta`` to the reference count (``packets``) of a MAP/ADDR entry; returns the new count."""
        c = int(self.in2out.entries["packets"][slot]) + delta
        v = np.zeros(1, dtype=[("packets", "<u8")])
        v["packets"] = max(c, 0)
        self.in2out.update_batch(np.array([slot], np.int64), v)
        return c

    def _full(self) -> bool:
        k = len(self._new)
        return (self.in2out.count + 2 * k + 3 > self.max_entries
                or self.index.count + 3 * k + 3 > self.max_hints)

    def _limit_drop(self, reason: str, frames, i, side: int) -> None:
        self._count_drop(reason)
        if self.nat.icmp_on_limit:
            self._icmp_to_sender(side, frames, i, 3, 13)

    # -- session creation: planned per row, published per burst

    def _session_in2out(self, src, dst, proto, sp, dp, flags, frames, i, pre=None):
        """The session of an inside packet, planned if new. ``pre``: the mapping holder from
        :meth:`_fwd_batch` when the caller already looked the session up and found none."""
        rp = sp if proto == IPPROTO_ICMP else dp
        key = make_key(src, dst, proto, sp, rp)
        pend = self._pending.get(key)
        if pend is not None:
            return pend
        if pre is None or not self._pre_ok:
            slot = self._lookup1(self.in2out, key)
            if slot >= 0:  # e.g. a fragment's or hairpinned flow's session
                e = self.in2out.entries[slot]
                return slot, int(e["xaddr"]), int(e["xport"])
            pre = None
        # Static first (a port forward's own host, a 1:1 host), then the EIM mapping, then allocate.
        static = False
        pm = None
        if (proto, src, sp) in self.fwd_in:
            xa, xp = self.fwd_in[(proto, src, sp)]
            static = True
        elif src in self.one_in:
            xa, xp = self.one_in[src], sp
            static = True
        else:
            pm = self._pmaps.get((src, proto, sp))
            if pm is None:
                t = self._fwd_find(src, proto, sp) if pre is None else pre
                if t >= 0:
                    r = self.in2out.entries[t]
                    pm = _PMap(src, sp, proto, int(r["xaddr"]), int(r["xport"]),
                               "map" if int(r["flags"]) == FLAG_MAP else "sess", t)
            if pm is not None:
                xa, xp = pm.xa, pm.xp
        if self.host_session_limit and self._host_sessions.get(src, 0) >= self.host_session_limit:
            return self._limit_drop("quota_exceeded", frames, i, INSIDE)
        if self._full():
            return self._limit_drop("table_full", frames, i, INSIDE)
        hop = self.lpm.lookup(dst)
        if hop == MISS or self.hops[hop].port != "outside":
            return self._count_drop("no_route")
        if not static and pm is None:
            a = self.alloc.allocate(proto, src, sp)
            if not a.ok:
                reason = "quota_exceeded" if a.status in (AllocStatus.HOST_PORT_QUOTA, AllocStatus.HOST_TABLE_FULL) else "ports_exhausted"
                return self._limit_drop(reason, frames, i, INSIDE)
            xa, xp = a.addr, a.port
            pm = _PMap(src, sp, proto, xa, xp, "new")
        xrp = xp if proto == IPPROTO_ICMP else dp
        state = nat_tcp.CLOSED if (proto == IPPROTO_TCP and flags & 0x02 and not flags & 0x04) else nat_tcp.TRANS
        return self._plan(key, key, (dst, xa, proto, xrp, xp), src, sp, xa, xp, proto, state, static, pm, (xa, xp))

    def _plan(self, key, pkey, okey_parts, iaddr, iport, xa, xp, proto, state, static, pm, view):
        """Plan a new session (published by :meth:`_flush_new`); returns (pending slot, translation)."""
        now = self.clock.now()
        j = len(self._new)
        raddr, _, _, rport, _ = okey_parts
        self._new.append((key[0], key[1], proto, state if proto == IPPROTO_TCP else 0,
                          FLAG_STATIC if static else FLAG_SESSION, xa, xp, now, o2i_key(raddr, xa, proto, rport, xp),
                          iaddr, raddr))
        if pm is not None:
            pm.added.append(j)
            self._pmaps[(pm.iaddr, pm.proto, pm.iport)] = pm
            self._pmaps_rev[(pm.xa, pm.proto, pm.xp)] = pm
        self._host_sessions[iaddr] = self._host_sessions.get(iaddr, 0) + 1
        r = (-(self._new_base + j) - 2, view[0], view[1])
        self._pending[pkey] = r
        return r

    def _flush_new(self) -> None:
        """Publish the planned sessions: one batch into ``in2out``, one into the index.

        Appends the slot of each planned session to ``_slots_done`` (-1: not
        stored, its row is dropped as table_full). Mappings shared by a second
        session get their MAP entry here (a second, small insert) and their
        hints move to it.
        """
        new, pmaps = self._new, self._pmaps
        if not new:
            return
        self._new, self._pmaps, self._pmaps_rev = [], {}, {}
        self._new_base += len(new)
        m = len(new)
        cols = list(zip(*new))
        vals = np.zeros(m, dtype=[("protocol", "u1"), ("tcp_state", "u1"), ("flags", "u1"), ("xaddr", "<u4"),
                                  ("xport", "<u2"), ("created", "<u4"), ("last_seen", "<u4")])
        vals["protocol"], vals["tcp_state"], vals["flags"] = cols[2], cols[3], cols[4]
        vals["xaddr"], vals["xport"], vals["created"], vals["last_seen"] = cols[5], cols[6], cols[7], cols[7]
        idx = self.index
        idx.begin()
        slots = self.in2out.insert_batch(np.array(cols[0], _U64), np.array(cols[1], _U64), vals, update=False)
        ok = slots >= 0
        hk_a: list[int] = []
        hk_b: list[int] = []
        hv: list[int] = []
        for j in np.flatnonzero(ok).tolist():
            ka, kb = new[j][8]
            hk_a.append(ka)
            hk_b.append(kb)
            hv.append(int(slots[j]))
        for j in np.flatnonzero(~ok).tolist():  # not stored: undo its host count
            ia = new[j][9]
            c = self._host_sessions.get(ia, 0) - 1
            if c > 0:
                self._host_sessions[ia] = c
            else:
                self._host_sessions.pop(ia, None)
        # Mappings: hints to a lone session, or a MAP entry for a shared one.
        make_map: list[tuple[_PMap, int]] = []
        for pm in pmaps.values():
            used = [j for j in pm.added if ok[j]]
            if pm.state == "new":
                if not used:
                    self.alloc.release(pm.proto, pm.xa, pm.xp, pm.iaddr)
                elif len(used) == 1:
                    self._add_holder_hints(pm, int(slots[used[0]]), hk_a, hk_b, hv)
                else:
                    make_map.append((pm, len(used)))
            elif pm.state == "sess":
                if used:
                    make_map.append((pm, 1 + len(used)))
            elif used:
                self._ref(pm.target, len(used))
        if make_map:
            mk = [make_key(pm.iaddr, 0, pm.proto, pm.iport, 0, TAG_MAP) for pm, _ in make_map]
            now = self.clock.now()
            mv = np.zeros(len(mk), dtype=[("protocol", "u1"), ("flags", "u1"), ("xaddr", "<u4"), ("xport", "<u2"),
                                          ("created", "<u4"), ("last_seen", "<u4"), ("packets", "<u8")])
            mv["protocol"] = [pm.proto for pm, _ in make_map]
            mv["flags"] = FLAG_MAP
            mv["xaddr"] = [pm.xa for pm, _ in make_map]
            mv["xport"] = [pm.xp for pm, _ in make_map]
            mv["created"] = mv["last_seen"] = now
            mv["packets"] = [c for _, c in make_map]
            ms = self.in2out.insert_batch(np.array([k[0] for k in mk], _U64), np.array([k[1] for k in mk], _U64), mv,
                                          update=False)
            for (pm, _), s in zip(make_map, ms.tolist()):
                if s < 0:
                    # No room for the MAP entry: the mapping stays with one holder (refcount lost: counted).
                    self.stats["index_full"] += 1
                    if pm.state == "new":
                        first = next(j for j in pm.added if ok[j])
                        self._add_holder_hints(pm, int(slots[first]), hk_a, hk_b, hv)
                    continue
                if pm.state == "sess":
                    idx.repoint(*fwd_key(pm.iaddr, pm.proto, pm.iport), pm.target, s)
                    idx.repoint(*rev_key(pm.xa, pm.proto, pm.xp), pm.target, s)
                else:
                    self._add_holder_hints(pm, s, hk_a, hk_b, hv)
        if hv:
            stored = idx.insert_batch(np.array(hk_a, _U64), np.array(hk_b, _U64), np.array(hv, np.int64))
            self.stats["index_full"] += int((~stored).sum())
        idx.end()
        if self.filtering == Filtering.ADDRESS_DEPENDENT:
            for j in np.flatnonzero(ok).tolist():
                if new[j][4] == FLAG_SESSION:
                    self._addr_ref(new[j][10], new[j][5], new[j][2], new[j][6], +1)
        self.stats["sessions_created"] += int(ok.sum())
        self._slots_done.extend(slots.tolist())

    @staticmethod
    def _add_holder_hints(pm: _PMap, slot: int, ka: list[int], kb: list[int], v: list[int]) -> None:
        for a, b in (fwd_key(pm.iaddr, pm.proto, pm.iport), rev_key(pm.xa, pm.proto, pm.xp)):
            ka.append(a)
            kb.append(b)
            v.append(slot)

    def _addr_ref(self, raddr: int, xa: int, proto: int, xp: int, delta: int) -> None:
        """Address-dependent filtering: sessions of mapping (xa, xp) with remote ``raddr`` (an ADDR entry)."""
        akey = make_key(raddr, xa, proto, 0, xp, TAG_ADDR)
        a = self._lookup1(self.in2out, akey)
        if a >= 0:
            if self._ref(a, delta) <= 0:
                self.in2out.delete_batch(np.array([akey[0]], _U64), np.array([akey[1]], _U64))
        elif delta > 0:
            v = np.zeros(1, dtype=[("protocol", "u1"), ("flags", "u1"), ("packets", "<u8")])
            v["protocol"], v["flags"], v["packets"] = proto, FLAG_ADDR, delta
            self.in2out.insert_batch(np.array([akey[0]], _U64), np.array([akey[1]], _U64), v)

    def _session_out2in(self, src, dst, proto, sp, dp, flags, frames, i, pre=None):
        """A new flow from outside: only what a static mapping or the filtering mode lets in.
        ``pre``: the mapping holder of (dst, proto, dp) from :meth:`_rev_batch`."""
        xp = dp
        rp = dp if proto == IPPROTO_ICMP else sp
        okey = o2i_key(src, dst, proto, rp, xp)
        pend = self._pending.get(okey)
        if pend is not None:
            return pend
        static = False
        pm = None
        if (proto, dst, dp) in self.fwd_out:
            ia, ip_ = self.fwd_out[(proto, dst, dp)]
            static = True
        elif dst in self.one_out:
            ia, ip_ = self.one_out[dst], dp
            static = True
        else:
            if dst not in self.pool_set:
                return self._count_drop("no_session")
            pm = self._pmaps_rev.get((dst, proto, xp))
            if pm is None:
                if pre is not None and self._pre_ok:
                    h = None
                    if pre >= 0:
                        r = self.in2out.entries[pre]
                        a_, _, _, _, pa_, _ = split_key(int(r["key0"]), int(r["key1"]))
                        h = (pre, a_, pa_)
                else:
                    h = self._rev_find(dst, proto, xp)
                if h is None:
                    return self._count_drop("no_session")
                t, ia, ip_ = h
                pm = _PMap(ia, ip_, proto, dst, xp, "map" if int(self.in2out.entries["flags"][t]) == FLAG_MAP else "sess", t)
            ia, ip_ = pm.iaddr, pm.iport
            if self.filtering == Filtering.ADDRESS_AND_PORT_DEPENDENT:
                return self._count_drop("filtered")
            if self.filtering == Filtering.ADDRESS_DEPENDENT and \
                    self._lookup1(self.in2out, make_key(src, dst, proto, 0, xp, TAG_ADDR)) < 0:
                return self._count_drop("filtered")
        if self.host_session_limit and self._host_sessions.get(ia, 0) >= self.host_session_limit:
            return self._count_drop("quota_exceeded")
        if self._full():
            return self._count_drop("table_full")
        hop = self.lpm.lookup(ia)
        if hop == MISS or self.hops[hop].port != "inside":
            return self._count_drop("no_route")
        irp = ip_ if proto == IPPROTO_ICMP else sp
        key = make_key(ia, src, proto, ip_, irp)
        state = nat_tcp.CLOSED if (proto == IPPROTO_TCP and flags & 0x02 and not flags & 0x04) else nat_tcp.TRANS
        return self._plan(key, okey, (src, dst, proto, rp, xp), ia, ip_, dst, xp, proto, state, static, pm, (ia, ip_))

    # -- hairpinning (RFC 4787 REQ-9): inside host to a pool address:port of another inside host

    def _hairpin(self, frames, i, src, dst, proto, sp, dp):
        """Inside to a pool address: the sender's packet leaves through its own mapping and comes back in
        through the receiver's, so the receiver's mapping filters it as it would a packet from outside."""
        frame = self._frame(frames, i)
        l3 = int(self.pb.l3_off[i])
        # 1. The sender's own mapping (created as for any outgoing flow; the "remote" is dst:dp).
        r = self._session_in2out(src, dst, proto, sp, dp, int(self.pb.tcp_flags[i]), frames, i)
        if r is None:
            return None
        slot, xa, xp = r
        slot = self._published(slot)  # planned just now: publish it to have its slot
        if slot < 0:
            return self._count_drop("table_full")
        # 2. The receiver: a static mapping, or the EIM mapping of a session of the worker owning dp.
        target = self._hairpin_target(dst, proto, dp, xa, xp)
        if target is None:
            return self._count_drop("no_session")
        ia, ip_, table, static = target
        # The outgoing leg happened (the sender's session counts it) whatever the filter decides.
        self._account(INSIDE, np.array([i], np.intp), np.array([slot], np.int64))
        if not static and not self._hairpin_admitted(table, ia, ip_, dst, proto, dp, xa, xp):
            return self._count_drop("filtered")
        rewrite_ip(frame, l3, "src", xa, xp)
        rewrite_ip(frame, l3, "dst", ia, ip_)
        self._dec_ttl_bytes(frame, l3)
        self.stats["hairpinned"] += 1
        self._send_via(INSIDE, frame, ia)
        self.punted += 1
        return None

    def _hairpin_target(self, dst, proto, dp, xa, xp):
        """``(iaddr, iport, table, static)`` of the receiver of a hairpinned packet to ``dst:dp``, or None.

        ``table``: the session table holding the receiver's mapping (None: this worker's own)."""
        if (proto, dst, dp) in self.fwd_out:
            return (*self.fwd_out[(proto, dst, dp)], None, True)
        if dst in self.one_out:
            return self.one_out[dst], dp, None, True
        owner = self._owner(dp)
        if owner is not None and owner != self.worker and owner in self.peers:
            sources = [self.peers[owner]]
        else:
            sources = [None] + list(self.peers.values())
        for peer in sources:
            h = self._rev_find(dst, proto, dp, peer)
            if h is not None:
                return h[1], h[2], None if peer is None else peer[1], False
        return None

    def _hairpin_admitted(self, table: SessionTable | None, ia: int, ip_: int, dst: int, proto: int, dp: int,
                          xa: int, xp: int) -> bool:
        """The configured filtering, applied to a hairpinned packet from the sender's mapping ``xa:xp`` to
        the receiver's mapping ``dst:dp`` (receiver ``ia:ip_``, its sessions in ``table``).

        Address-and-port-dependent: the receiver has a session with ``xa:xp`` as its remote end;
        address-dependent: it has a session with remote address ``xa`` on this mapping (an ADDR entry);
        endpoint-independent: always.
        """
        if self.filtering == Filtering.ENDPOINT_INDEPENDENT:
            return True
        if self.filtering == Filtering.ADDRESS_DEPENDENT:
            key = make_key(xa, dst, proto, 0, dp, TAG_ADDR)
        else:
            key = make_key(ia, xa, proto, ip_, ip_ if proto == IPPROTO_ICMP else xp)
        if table is None:
            if self._new:  # sessions planned earlier in this burst count too: publish them
                self._flush_new()
                self._pre_ok = False
            return self._lookup1(self.in2out, key) >= 0
        _, _, hits = table.lookup_consistent(np.array([key[0]], _U64), np.array([key[1]], _U64))
        return bool(hits[0])

    def _owner(self, port: int) -> int | None:
        if port < self.nat.port_lo:
            return None
        return ((port - self.nat.port_lo) // self.nat.block) % self.nat.workers

    def attach_peers(self, peers: dict[int, tuple[SessionIndex, SessionTable]]) -> None:
        """Readers of the other workers' (index, in2out), for hairpinning to their mappings."""
        self.peers = {w: t for w, t in peers.items() if w != self.worker}

    # -- ICMP errors (RFC 5508 REQ-4/5)

    def _icmp_error(self, d: int, frames, i):
        """Translate an ICMP error about a translated flow: outer and embedded headers, all checksums."""
        pb = self.pb
        b = self._frame(frames, i)
        l3 = int(pb.l3_off[i])
        ihl = (b[l3] & 0x0F) * 4
        l4 = l3 + ihl
        e = l4 + 8
        end = len(b)
        if end < e + 20 or b[e] >> 4 != 4:
            return self._count_drop("malformed_l4")
        # The ICMP checksum is recomputed below over the translated quote: check the received one first,
        # so that a corrupted error is dropped instead of being forwarded with a fresh, valid checksum.
        if internet_checksum(bytes(b[l4:l3 + _g16(b, l3 + 2)])) != 0:
            self.stats["icmp_bad_checksum"] += 1
            return self._count_drop("malformed_l4")
        eihl = (b[e] & 0x0F) * 4
        el4 = e + eihl
        eproto = b[e + 9]
        esrc, edst = _g32(b, e + 12), _g32(b, e + 16)
        if eproto in (IPPROTO_TCP, IPPROTO_UDP):
            if end < el4 + 4:
                return self._count_drop("malformed_l4")
            esp, edp = _g16(b, el4), _g16(b, el4 + 2)
        elif eproto == IPPROTO_ICMP:
            if end < el4 + 8 or b[el4] not in (0, 8, 13, 14):
                return self._count_drop("no_session")
            esp = edp = _g16(b, el4 + 4)
        else:
            return self._count_drop("unsupported_protocol")
        if d == OUTSIDE:
            # The quoted packet is one we sent: src = our X:xport, dst = the remote.
            slot = self._o2i_find(edst, esrc, eproto, edp, esp)
            if slot < 0:
                return self._count_drop("no_session")
            r = self.in2out.entries[slot]
            ia, _, _, _, ip_, _ = split_key(int(r["key0"]), int(r["key1"]))
            rewrite_ip(b, e, "src", ia, ip_, end=end)
            rewrite_ip(b, l3, "dst", ia, None, l4=False)
            to, nh_dst = INSIDE, ia
        else:
            # The inside host quotes a packet it received: src = remote, dst = iaddr:iport.
            slot = self._lookup1(self.in2out, make_key(edst, esrc, eproto, edp, esp))
            if slot < 0:
                return self._count_drop("no_session")
            xa, xp = int(self.in2out.entries["xaddr"][slot]), int(self.in2out.entries["xport"][slot])
            rewrite_ip(b, e, "dst", xa, xp, end=end)
            rewrite_ip(b, l3, "src", xa, None, l4=False)
            to, nh_dst = OUTSIDE, _g32(b, l3 + 16)
        # The ICMP checksum covers the quote, which changed: recompute it whole.
        tot = _g16(b, l3 + 2)
        _p16(b, l4 + 2, 0)
        _p16(b, l4 + 2, internet_checksum(bytes(b[l4:l3 + tot])))
        if b[l3 + 8] <= 1:
            return self._count_drop("ttl_expired")  # never an error about an error
        self._dec_ttl_bytes(b, l3)
        hop = self.lpm.lookup(nh_dst)
        if hop == MISS or self.hops[hop].port != ("inside" if to == INSIDE else "outside"):
            return self._count_drop("no_route")
        h = self.hops[hop]
        self.stats["icmp_errors_translated"] += 1
        self._send_via(to, b, h.via if h.via is not None else nh_dst)
        self.punted += 1
        return None

    @staticmethod
    def _dec_ttl_bytes(b: bytearray, l3: int) -> None:
        old = _g16(b, l3 + 8)
        new = old - 0x100
        _p16(b, l3 + 10, _cs_replace(_g16(b, l3 + 10), old, new))
        _p16(b, l3 + 8, new)

    # -- the gateway's own duties

    def _local(self, side: int, frames, i, dst, proto, itype):
        """A packet for the gateway: answer ICMP echo, count the rest."""
        pb = self.pb
        if proto == IPPROTO_ICMP and itype == 8:
            b = self._frame(frames, i)
            l3 = int(pb.l3_off[i])
            l4 = l3 + int(pb.ihl[i]) * 4
            tot = int(pb.ip_total_len[i])
            ident, seq = _g16(b, l4 + 4), _g16(b, l4 + 6)
            reply = build_icmp_echo(self.own_mac[side], bytes(b[6:12]), dst, int(pb.src[i]), ident, seq,
                                    bytes(b[l4 + 8:l3 + tot]), reply=True)
            self.emit.append((side, reply))
            self.stats["echo_replies"] += 1
            self.punted += 1
            return None
        if proto == IPPROTO_ICMP and itype in _ICMP_ERRORS:
            return self._count_drop("no_session")
        if proto in (IPPROTO_TCP, IPPROTO_UDP) and dst == self.own_ip[side]:
            return self._count_drop("no_session")
        return self._count_drop("no_session")

    def _icmp_to_sender(self, side: int, frames, i, icmp_type: int, code: int) -> None:
        """An ICMP error from the gateway back to the sender of row ``i`` (to its MAC)."""
        orig = ip_packet(frames, self.pb, i)
        if not icmp_error_allowed(orig):
            return
        src_mac = frames[i, 6:12].tobytes()
        self.emit.append((side, build_icmp_error(icmp_type, code, orig, self.own_ip[side], src_mac=self.own_mac[side],
                                                 dst_mac=src_mac)))

    def _ttl_expired(self, side: int, frames, i):
        self._icmp_to_sender(side, frames, i, 11, 0)
        return self._count_drop("ttl_expired")

    def _arp(self, side: int, frame: bytes) -> None:
        a = parse_arp(frame)
        if a is None:
            self._count_drop("not_ipv4")
            return
        net = self.config.gateway.network_of("inside" if side == INSIDE else "outside")
        nt = self.neigh[side]
        acts = nt.handle_arp(a.op, a.spa, a.sha, a.tpa)
        # Publish what we learn for the other workers (this worker receives every ARP frame).
        if a.spa and a.spa not in nt.own and not (a.sha[0] & 1) and a.sha != b"\0" * 6 and a.tpa in nt.own \
                and (a.spa >> (32 - net.prefixlen)) == (int(net.network_address) >> (32 - net.prefixlen)):
            self.mirror.publish(side, a.spa, a.sha, self.clock.now())
        self._actions(side, acts)
        self.punted += 1

    def _send_via(self, side: int, frame: bytearray, next_hop: int) -> None:
        """Send a frame (its L3 already final) to ``next_hop`` on ``side``, resolving its MAC."""
        nt = self.neigh[side]
        acts = nt.send(next_hop, (side, frame), len(frame))
        if not any(isinstance(a, Transmit) for a in acts):
            m = self.mirror.get(side, next_hop)
            if m is not None:
                acts += nt.handle_arp(ARP_REPLY, next_hop, m[0], self.own_ip[side])
        self._actions(side, acts)

    def _actions(self, side: int, acts) -> None:
        mac = self.own_mac[side]
        for a in acts:
            if isinstance(a, Transmit):
                s, frame = a.packet
                frame[0:6] = a.mac
                frame[6:12] = mac
                self.emit.append((s, bytes(frame)))
            elif isinstance(a, ArpRequest):
                f = build_arp_request(mac, a.sender_ip, a.target_ip)
                if a.target_mac is not None:
                    f = a.target_mac + f[6:]
                self.emit.append((side, f))
            elif isinstance(a, ArpReply):
                self.emit.append((side, build_arp_reply(mac, a.sender_ip, a.target_mac, a.target_ip)))
                self.stats["arp_replies"] += 1
            elif isinstance(a, Drop):
                self.stats["neigh_drops"] += 1

    # -- fragments (virtual reassembly)

    def _fragment(self, d: int, frames, i) -> None:
        pb = self.pb
        b = self._frame(frames, i)
        l3 = int(pb.l3_off[i])
        ihl = (b[l3] & 0x0F) * 4
        fw = _g16(b, l3 + 6)
        offset, more = (fw & 0x1FFF) * 8, bool(fw & 0x2000)
        proto = b[l3 + 9]
        src, dst = _g32(b, l3 + 12), _g32(b, l3 + 16)
        ident = _g16(b, l3 + 4)
        plen = _g16(b, l3 + 2) - ihl
        if proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP):
            self._count_drop("unsupported_protocol")
            return
        if b[l3 + 8] <= 1:
            # Before any session work: an expiring fragment must not create or refresh one.
            self._ttl_expired(d, frames, i)
            return
        ports = None
        if offset == 0:
            l4 = l3 + ihl
            if proto == IPPROTO_ICMP and plen >= 8 and b[l4] in (0, 8, 13, 14):
                sp = dp = _g16(b, l4 + 4)
                ports = (sp, dp)
            elif proto != IPPROTO_ICMP and plen >= 8:
                ports = (_g16(b, l4), _g16(b, l4 + 2))
            if ports is not None:
                x = self._frag_translation(d, frames, i, src, dst, proto, ports,
                                           b[l4 + 13] if proto == IPPROTO_TCP and plen >= 14 else 0)
                if x is None:
                    return  # counted by the session code
                ports = x
        pkt = (d, b, l3)
        acts = self.frag.submit(pkt, src, dst, proto, ident, offset, more, plen, ports, len(b))
        if any(a.packet is pkt and a.verdict == Verdict.DROP for a in acts):
            self._count_drop("hostile")  # malformed, duplicate, overlapping or over a bound
        else:
            self.punted += 1  # translated now or held (a later drop of a held one is in frag.counters)
        self._frag_actions([a for a in acts if not (a.packet is pkt and a.verdict == Verdict.DROP)])

    def _published(self, slot: int) -> int:
        """The slot of a session: a pending one (planned in this burst) is published first; -1: not stored."""
        if slot < -1:
            self._flush_new()
            self._pre_ok = False  # the slow path's batch of mapping lookups is stale now
            slot = self._slots_done[-slot - 2]
        return slot

    def _frag_translation(self, d, frames, i, src, dst, proto, ports, flags) -> "_FragFlow | None":
        """The translation and the session of a fragmented datagram, from its first fragment."""
        sp, dp = ports
        if d == INSIDE:
            r = self._session_in2out(src, dst, proto, sp, dp, flags, frames, i)
            if r is None:
                return None
            slot, xa, xp = r
            which, addr, port, fdst = "src", xa, xp, dst
        else:
            slot = self._o2i_find(src, dst, proto, dp if proto == IPPROTO_ICMP else sp, dp)
            if slot >= 0:
                r = self.in2out.entries[slot]
                ia, _, _, _, ip_, _ = split_key(int(r["key0"]), int(r["key1"]))
            else:
                r = self._session_out2in(src, dst, proto, sp, dp, flags, frames, i)
                if r is None:
                    return None
                slot, ia, ip_ = r
            which, addr, port, fdst = "dst", ia, ip_, ia
        slot = self._published(slot)
        if slot < 0:
            return self._count_drop("table_full")
        return _FragFlow(which, addr, port, self.lpm.lookup(fdst), fdst, slot, int(self.in2out.entries["key0"][slot]))

    def _frag_actions(self, acts) -> None:
        for a in acts:
            if a.verdict == Verdict.TRANSLATE:
                d, b, l3 = a.packet
                flow: _FragFlow = a.ports
                first = (_g16(b, l3 + 6) & 0x1FFF) == 0
                self._frag_account(d, b, l3, flow, first)
                rewrite_ip(b, l3, flow.which, flow.addr, flow.port if first else None, l4=first)
                self._dec_ttl_bytes(b, l3)
                if flow.hop == MISS:
                    self.stats["neigh_drops"] += 1
                    continue
                h = self.hops[flow.hop]
                self.stats["frag_translated"] += 1
                self._send_via(OUTSIDE if d == INSIDE else INSIDE, b, h.via if h.via is not None else flow.fdst)
            elif a.verdict == Verdict.DROP:
                self.stats["neigh_drops"] += 1  # already counted as punted when it arrived

    def _frag_account(self, d: int, b: bytearray, l3: int, flow: "_FragFlow", first: bool) -> None:
        """Each translated fragment is a packet of its session: packets, bytes and last_seen (as the
        first fragment's TCP flags decide), and the first fragment of a TCP segment moves the TCP state."""
        e = self.in2out.entries
        s = flow.slot
        if e["state"][s] != USED or int(e["key0"][s]) != flow.key0:
            return  # the session ended while fragments were held
        sl = np.array([s], np.int64)
        ihl = (b[l3] & 0x0F) * 4
        if first and b[l3 + 9] == IPPROTO_TCP and len(b) >= l3 + ihl + 14:
            ref = self._tcp(d, sl, np.ones(1, bool), e["tcp_state"][sl], np.array([b[l3 + ihl + 13]], np.uint8))
            flow.refresh = bool(ref[0])
        self._log_acct(sl, np.array([_g16(b, l3 + 2)], np.uint64), None if flow.refresh else np.zeros(1, bool))

    # ------------------------------------------------------------------ helpers

    def _count_drop(self, reason: str, k: int = 1):
        self.drops[R.get(reason, R["other"])] += k
        return None

    # ------------------------------------------------------------------ time

    def tick(self, now: float | None = None) -> None:
        """Session accounting flush, expiry slice (sessions out of the table and index, ports to the
        allocator's hold), neighbour ageing, fragment timeouts, and adoption of neighbours published
        by the ARP worker."""
        t = self.clock.now()
        if self._log_n and t != self._log_now:
            self.flush()
        self.expire(t)
        for side in (INSIDE, OUTSIDE):
            nt = self.neigh[side]
            for n in list(nt.entries.values()):
                if n.mac is None or n.probing:
                    m = self.mirror.get(side, n.addr)
                    if m is not None and (n.mac is None or m[1] >= n.confirmed):
                        self._actions(side, nt.handle_arp(ARP_REPLY, n.addr, m[0], self.own_ip[side]))
            self._actions(side, nt.tick())
        self._frag_actions(self.frag.expire())

    def expire(self, now: int, rounds: int = 1) -> int:
        """Run ``rounds`` sweep slices; returns the number of sessions removed."""
        e = self.in2out.entries
        removed = 0
        for _ in range(rounds):
            slots = self.sweeper.poll(now, e["last_seen"], e["protocol"], e["tcp_state"], e["state"])
            if self.zone_header is not None:
                self.zone_header["expiry_cursor"] = self.sweeper.cursor
            if slots.size == 0:
                continue
            fl = e["flags"][slots]
            slots = slots[(fl == FLAG_SESSION) | (fl == FLAG_STATIC)]
            if slots.size and self._log_n:
                # The log may hold refreshes of these: write it, then look again.
                self.flush()
                slots = slots[expired_mask(now, e["last_seen"][slots], e["protocol"][slots], e["tcp_state"][slots],
                                           e["state"][slots], self.sweeper.table)]
            for s in slots.tolist():
                removed += self._remove_session(s)
        self.stats["sessions_expired"] += removed
        return removed

    def _remove_session(self, slot: int) -> int:
        """Delete one session: hints first, then entries (each group inside the index's wseq)."""
        rec = self.in2out.entries[slot].copy()
        if rec["state"] != USED:
            return 0
        k0, k1 = int(rec["key0"]), int(rec["key1"])
        iaddr, raddr, _, proto, iport, rport = split_key(k0, k1)
        xa, xp = int(rec["xaddr"]), int(rec["xport"])
        xrp = xp if proto == IPPROTO_ICMP else rport
        idx = self.index
        idx.begin()
        idx.delete(*o2i_key(raddr, xa, proto, xrp, xp), slot)
        c = self._host_sessions.get(iaddr, 0) - 1
        if c > 0:
            self._host_sessions[iaddr] = c
        else:
            self._host_sessions.pop(iaddr, None)
        if int(rec["flags"]) == FLAG_SESSION:
            if self.filtering == Filtering.ADDRESS_DEPENDENT:
                self._addr_ref(raddr, xa, proto, xp, -1)
            holder = self._fwd_find(iaddr, proto, iport)
            if holder == slot:  # the mapping's only session
                idx.delete(*fwd_key(iaddr, proto, iport), slot)
                idx.delete(*rev_key(xa, proto, xp), slot)
                self.alloc.release(proto, xa, xp, iaddr)
            elif holder >= 0 and self._ref(holder, -1) <= 0:  # the last session of a shared mapping
                idx.delete(*fwd_key(iaddr, proto, iport), holder)
                idx.delete(*rev_key(xa, proto, xp), holder)
                mk = make_key(iaddr, 0, proto, iport, 0, TAG_MAP)
                self.in2out.delete_batch(np.array([mk[0]], _U64), np.array([mk[1]], _U64))
                self.alloc.release(proto, xa, xp, iaddr)
        self.in2out.delete_batch(np.array([k0], _U64), np.array([k1], _U64))
        idx.end()
        return 1

    # ------------------------------------------------------------------ introspection

    def sessions(self) -> list[dict[str, int]]:
        """Every live session of this worker (slow; tests and CLI). Flushes the accounting log first."""
        self.flush()
        e = self.in2out.entries
        out = []
        for s in np.flatnonzero((e["state"] == USED) & ((e["flags"] == FLAG_SESSION) | (e["flags"] == FLAG_STATIC))).tolist():
            r = e[s]
            ia, ra, _, proto, ip_, rp = split_key(int(r["key0"]), int(r["key1"]))
            out.append({"slot": s, "iaddr": ia, "raddr": ra, "proto": proto,
                        "iport": ip_, "rport": rp, "xaddr": int(r["xaddr"]),
                        "xport": int(r["xport"]), "tcp_state": int(r["tcp_state"]), "last_seen": int(r["last_seen"]),
                        "created": int(r["created"]), "packets": int(r["packets"]), "bytes": int(r["bytes"])})
        return out


# ----------------------------------------------------------------------------- sizing and zones

#: Sessions per worker added to ``max_sessions``' share when sizing: room for the refusal margin of
#: :meth:`NatPipeline._full` (a burst's worth of planned sessions), so the configured number really fits.
SIZING_SLACK = 1024


def table_capacity_for(config: GatewayConfig, workers: int | None = None) -> int:
    """``in2out`` entries per worker: ``[nat] max_sessions``' share of each worker (plus
    :data:`SIZING_SLACK`) at ``MAX_LOAD``, exactly -- not rounded to a power of two, which could
    nearly double the zones (the table then uses its range-reduced geometry, shared/session_table.py)."""
    ms = getattr(config.nat, "max_sessions", 0) or 0
    if not ms:
        return DEFAULT_TABLE_CAPACITY
    w = workers or config.nat.workers
    per = -(-int(ms) // w) + SIZING_SLACK
    return max(1024, int(np.ceil(per / MAX_LOAD)))


def index_capacity_for(table_capacity: int) -> int:
    """Index home positions for an ``in2out`` of ``table_capacity``: 3 hints per storable session at ``INDEX_LOAD``."""
    return int(np.ceil(3 * table_capacity * MAX_LOAD / INDEX_LOAD))


def memory_per_session(table_capacity: int = DEFAULT_TABLE_CAPACITY) -> dict[str, float]:
    """Shared bytes per session from the zone sizes: ``in2out`` + index, at the most sessions they admit.

    ``sessions`` is ``MAX_LOAD`` x capacity (one mapping per session, the usual
    client case); a mapping shared by several sessions adds one 64-byte MAP
    entry for all of them (and saves their FWD/REV hints but one pair).
    """
    from hotplane.shared.session_index import SessionIndex

    t = SessionTable.zone_size(table_capacity)
    i = SessionIndex.zone_size(index_capacity_for(table_capacity))
    sessions = int(table_capacity * MAX_LOAD)
    per = (t + i) / sessions
    return {"entry_bytes": ELEMENT.itemsize, "hint_bytes": 8, "hints_per_session": 3, "table_load": MAX_LOAD,
            "index_load": INDEX_LOAD, "table_capacity": table_capacity, "max_sessions": sessions,
            "zone_bytes": t + i, "bytes_per_session": per, "sessions_in_1GiB": int((1 << 30) / per)}


def session_zone_bytes(config: GatewayConfig, workers: int | None = None) -> int:
    """Bytes of the session zones (``in2out`` + index) of all workers as the primary reserves them for ``config``."""
    from hotplane.shared.session_index import SessionIndex

    w = workers or config.nat.workers
    cap = table_capacity_for(config, w)
    return w * (SessionTable.zone_size(cap) + SessionIndex.zone_size(index_capacity_for(cap)))


def private_zones(config: GatewayConfig, worker: int, clock: Clock, table_capacity: int = DEFAULT_TABLE_CAPACITY
                  ) -> dict[str, Any]:
    """Process-private stand-ins for the worker's zones (tests, benchmarks)."""
    from hotplane.schema.nat import NEIGH_ENTRY, NEIGH_SLOTS

    t1 = SessionTable.create(_aligned(SessionTable.zone_size(table_capacity)), table_capacity, seed=worker * 2 + 1)
    icap = index_capacity_for(table_capacity)
    ix = SessionIndex.create(_aligned(SessionIndex.zone_size(icap)), icap, seed=worker * 2 + 2, key_format=KEY_FORMAT)
    alloc = PortAllocator.for_worker(config, worker, clock)
    lpm = Lpm(64)
    fill_lpm(lpm, config)
    neigh = np.zeros(NEIGH_SLOTS, NEIGH_ENTRY)
    return {"in2out": t1, "index": ix, "pool": alloc, "lpm": lpm, "neigh": neigh}


def build_pipeline(cfg: dict, worker_id: int, inst, *, in2out: SessionTable | None = None) -> NatPipeline:
    """The worker's entry point: the NAT pipeline for ``worker_id`` on the instance's zones.

    ``cfg`` is the primary's ``config`` answer (``config_toml``, ``config_path``, ``macs``).
    The gateway's own MACs come from the config, else from the af_packet interfaces, else
    from the primary's defaults. ``in2out``: the session table object to use (the worker
    picks the live table of the layout version its build writes, shared/session_migrate.py).
    """
    from hotplane.primary.nat_zones import attach_nat_zones
    from hotplane.shared.nat_config import parse_config

    config = parse_config(cfg["config_toml"], source=cfg.get("config_path") or "<primary config>")
    macs = {k: v for k, v in (cfg.get("macs") or {}).items() if k in ("inside_gw", "outside_gw")}
    for key, spec in (("inside_gw", cfg.get("inside", "")), ("outside_gw", cfg.get("outside", ""))):
        if spec.startswith("af_packet:"):
            iface = spec.split(":", 1)[1].split(",", 1)[0]
            try:
                with open(f"/sys/class/net/{iface}/address") as f:
                    macs[key] = f.read().strip()
            except OSError:
                pass
    clock = MonotonicClock(epoch=0.0)  # seconds since boot: the same reading in every process
    zones = attach_nat_zones(inst.directory, worker_id, config, clock, in2out=in2out)
    return NatPipeline(config, worker_id, zones, clock, macs=macs)
