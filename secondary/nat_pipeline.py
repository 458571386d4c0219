"""The NAT44 pipeline a worker runs (docs/CONTRACTS.md "The pipeline a worker runs").

Fast path (numpy over the burst, no per-packet Python): parse, pick the rows a
session can serve (TCP/UDP/ICMP query, TTL > 1, not addressed to the gateway
or to a pool address from the inside), build the 128-bit keys, one batch
lookup in this worker's ``in2out`` (inside -> outside) or ``out2in`` table, then
for the hits: route (LPM), resolve the next hop (neighbour table), source or
destination NAT with incremental checksums, TTL decrement, MAC rewrite, TCP
state machine and one journaled update of the sessions (last seen, counters).

Slow path (plain Python per missed row, then back into the vectorized
translation): ARP, ICMP echo to the gateway, ICMP errors (RFC 5508: embedded
header reverted, every checksum fixed; never refreshes a session), TTL expiry
(ICMP time exceeded), fragments (virtual reassembly), hairpinning, static
mappings, filtering, limits, allocation and publication of new sessions.

Session model (both tables are :class:`SessionTable` v1 in this worker's zones;
this worker is their only writer, DESIGN invariant 2)::

    in2out  key (iaddr, raddr, proto, iport, rport)   -> xaddr, xport, tcp_state, times, counters
    out2in  key (raddr, xaddr, proto, rport, xport)   -> xaddr:=iaddr, xport:=iport, packets:=in2out slot
    in2out  MAP key (iaddr, proto, iport)             -> xaddr, xport, packets:=sessions using it
    out2in  MAP key (xaddr, proto, xport)             -> iaddr, iport
    out2in  ADDR key (raddr, xaddr, proto, xport)     -> packets:=sessions (address-dependent filtering)

(raddr/rport: the remote endpoint; for ICMP queries every port is the
identifier.) The session's state, timers and counters live in its in2out
entry only; an out2in hit reaches it through the slot index its out2in entry
holds. MAP entries give endpoint-independent mapping (RFC 4787 REQ-1): a new
session of an inside address:port reuses its mapping whatever the
destination; the mapping lives as long as one session uses it, and its port
then goes back to the allocator's 120 s hold. Entries never move, so the
slot index stays valid until both entries of the session are deleted together.

Key packing (two uint64 words, the same formula for every kind)::

    k0 = a << 32 | b          k1 = tag << 48 | proto << 32 | pa << 16 | pb

Clock: ``clock.now()`` (whole seconds, :mod:`hotplane.shared.nat_clock`) stamps
sessions and drives expiry; ``tick(now)`` ignores its argument's value except
as "time passed" so tests control time with a ManualClock.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from hotplane.schema.counters import DROP_REASONS, N_REASONS
from hotplane.schema.session import ELEMENT, USED
from hotplane.shared import nat_tcp
from hotplane.shared.checksum import internet_checksum
from hotplane.shared.nat_clock import Clock, MonotonicClock
from hotplane.shared.nat_config import Filtering, GatewayConfig
from hotplane.shared.nat_expiry import ExpirySweeper
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
    ETHERTYPE_IPV4,
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
from hotplane.shared.session_table import SessionTable

INSIDE, OUTSIDE = 0, 1
TAG_SESSION, TAG_MAP, TAG_ADDR = 0, 1, 2
FLAG_SESSION, FLAG_MAP, FLAG_ADDR, FLAG_STATIC = 0, 1, 2, 4

#: Table capacity per worker and direction when nothing else is said (``[nat]`` has no
#: ``max_sessions`` key yet): 2**18 entries = 16 MiB per table.
DEFAULT_TABLE_CAPACITY = 1 << 18
#: New sessions are refused ("table_full") above this load, leaving probe room.
MAX_LOAD = 0.7
DEFAULT_MACS = {"inside_gw": "02:68:70:00:00:01", "outside_gw": "02:68:70:00:00:02"}

_ICMP_ERRORS = (3, 4, 5, 11, 12)
_QUERY_REQ = np.zeros(256, bool)
_QUERY_REQ[[8, 13]] = True
_QUERY_REP = np.zeros(256, bool)
_QUERY_REP[[0, 14]] = True
_S32 = np.uint64(32)
_S16 = np.uint64(16)
_U64 = np.uint64


def _r(name: str) -> int:
    return DROP_REASONS.index(name) if name in DROP_REASONS else DROP_REASONS.index("other")


R = {n: _r(n) for n in DROP_REASONS}
PACKET_TO_COUNTER = np.array(
    [_r(n) for n in ("other", "runt", "oversized", "not_ipv4", "truncated", "bad_ip_header", "bad_ip_checksum",
                     "fragment", "ttl_expired", "unsupported_protocol", "malformed_l4")], np.intp)


def make_key(a: int, b: int, proto: int, pa: int, pb: int, tag: int = TAG_SESSION) -> tuple[int, int]:
    """The (k0, k1) key words of one entry (see the module docstring)."""
    return (a << 32) | b, (tag << 48) | (proto << 32) | (pa << 16) | pb


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


class NatPipeline:
    """NAT44 for one worker: both directions of the sessions whose outside ports are in its block.

    ``zones``: the worker's buffers from :func:`hotplane.primary.nat_zones.attach_nat_zones`
    (``in2out``, ``out2in`` session tables, ``pool`` header + allocator, ``lpm`` FIB); None
    builds private ones (tests, benchmarks). ``clock``: the session clock
    (:class:`MonotonicClock` by default). ``macs``: the gateway's own MACs
    (``inside_gw``/``outside_gw``) when the config does not name them.
    """

    def __init__(self, config: GatewayConfig, worker: int = 0, zones: dict[str, Any] | None = None,
                 clock: Clock | None = None, *, macs: dict[str, Any] | None = None, capacity: int = 512,
                 table_capacity: int = DEFAULT_TABLE_CAPACITY, expiry_slice: int | None = None) -> None:
        self.config = config
        self.nat = config.nat
        self.worker = worker
        self.clock = clock or MonotonicClock()
        gw = config.gateway
        macs = dict(DEFAULT_MACS, **(macs or {}))
        self.own_mac = (mac_bytes(gw.inside_mac or macs["inside_gw"]), mac_bytes(gw.outside_mac or macs["outside_gw"]))
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

        # Shared state: session tables, allocator, FIB.
        self.zone_header = None
        if zones is None:
            zones = private_zones(config, worker, self.clock, table_capacity)
        self.in2out: SessionTable = zones["in2out"]
        self.out2in: SessionTable = zones["out2in"]
        self.alloc: PortAllocator = zones["pool"]
        self.alloc.clock = self.clock
        self.lpm: Lpm = zones["lpm"]
        self.mirror = NeighbourMirror(zones["neigh"])
        self.zone_header = zones.get("pool_header")
        if zones.get("peer_out2in"):
            self.attach_peers(zones["peer_out2in"])
        self.hops = next_hops_for(config)
        self.hop_port = np.array([0 if h.port == "inside" else 1 for h in self.hops.as_list()], np.uint8)
        self.hop_via = np.array([0 if h.via is None else h.via for h in self.hops.as_list()], np.uint32)
        self.hop_has_via = np.array([h.via is not None for h in self.hops.as_list()], bool)
        self.max_entries = int(self.in2out.capacity * MAX_LOAD)

        self.neigh = (
            NeighbourTable(self.clock, self.own_ip[0]),
            NeighbourTable(self.clock, self.own_ip[1], own=outside_own),
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
                      "echo_replies": 0, "arp_replies": 0, "neigh_drops": 0, "frag_translated": 0}
        self._empty = np.zeros(0, np.intp)
        self._host_sessions: dict[int, int] = {}
        self._rebuild_host_counts()

    # ------------------------------------------------------------------ restart support

    def _rebuild_host_counts(self) -> None:
        """Per-inside-host session counts, derived from the in2out table (so they survive restarts)."""
        e = self.in2out.entries
        live = (e["state"] == USED) & ((e["flags"] == FLAG_SESSION) | (e["flags"] == FLAG_STATIC))
        if live.any():
            hosts = (e["key0"][live] >> _S32).astype(np.uint32)
            u, c = np.unique(hosts, return_counts=True)
            self._host_sessions = dict(zip(u.tolist(), c.tolist()))

    # ------------------------------------------------------------------ the burst

    def process(self, direction: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Translate a burst in place; returns ``(to_other, to_same)`` row indices (contract)."""
        self.forwarded = 0
        self.punted = 0
        pb = self.pb
        n = int(lengths.shape[0])
        if n == 0:
            return self._empty, self._empty
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
            # Hairpin and to-gateway traffic never takes the fast path.
            pos = np.searchsorted(self.local_in, dst)
            pos[pos >= len(self.local_in)] = 0
            elig &= self.local_in[pos] != dst
        rows = np.flatnonzero(elig)
        src = pb.src[:n]
        sp = pb.sport[:n]
        dp = pb.dport[:n]
        k0 = (src[rows].astype(_U64) << _S32) | dst[rows]
        k1 = (proto[rows].astype(_U64) << _S32) | (sp[rows].astype(_U64) << _S16) | dp[rows]
        table = self.in2out if direction == INSIDE else self.out2in
        idx = np.empty(rows.size, np.int64)
        hits = np.empty(rows.size, bool)
        table.lookup_batch(k0, k1, idx, hits)
        ent = table.entries
        hit_rows = rows[hits]
        hslot = idx[hits]
        xaddr = ent["xaddr"][hslot]
        xport = ent["xport"][hslot]
        if direction == INSIDE:
            sess = hslot
        else:
            sess = ent["packets"][hslot].astype(np.int64)
            # Guard against a half-deleted pair (a writer killed between the two deletes).
            live = (sess >= 0) & (sess < self.in2out.capacity)
            live[live] = self.in2out._state[sess[live]] == USED
            if not live.all():
                hit_rows, sess, xaddr, xport = hit_rows[live], sess[live], xaddr[live], xport[live]
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
        if hit_rows.size == 0:
            return self._empty, self._empty
        return self._translate_and_send(direction, frames, hit_rows, sess, xaddr, xport, nfast), self._empty

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
        # Sessions: TCP state machine, then one journaled update per distinct session.
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
        """TCP state advance, last_seen (on refresh), packets and bytes of each distinct session."""
        pb = self.pb
        now = self.clock.now()
        ent = self.in2out.entries
        u, inv = np.unique(sess, return_inverse=True)
        states = ent["tcp_state"][u].copy()
        last = ent["last_seen"][u].copy()
        is_tcp = pb.proto[rows] == IPPROTO_TCP
        refresh = np.ones(rows.size, bool)
        if is_tcp.any():
            t = np.flatnonzero(is_tcp)
            _, _, ref = nat_tcp.advance(states, inv[t], np.full(t.size, d, np.uint8), pb.tcp_flags[rows[t]])
            refresh[t] = ref
        if refresh.any():
            last[np.unique(inv[refresh])] = now
        vals = np.zeros(u.size, dtype=[("tcp_state", "u1"), ("last_seen", "<u4"), ("packets", "<u8"), ("bytes", "<u8")])
        vals["tcp_state"] = states
        vals["last_seen"] = last
        vals["packets"] = ent["packets"][u] + np.bincount(inv, minlength=u.size).astype(np.uint64)
        vals["bytes"] = ent["bytes"][u] + np.bincount(inv, weights=pb.ip_total_len[rows], minlength=u.size).astype(np.uint64)
        self.in2out.update_batch(u, vals)

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
        """Per-row decisions for the misses; returns the rows to translate with their sessions."""
        out_rows: list[int] = []
        out_sess: list[int] = []
        out_x: list[int] = []
        out_p: list[int] = []
        if rows.size == 0:
            return self._empty, self._empty, self._empty, self._empty
        pb = self.pb
        self._pending: dict[tuple[int, int], tuple[int, int, int]] = {}
        cols = [getattr(pb, f)[rows].tolist() for f in ("src", "dst", "proto", "sport", "dport", "ttl", "icmp_type", "tcp_flags")]
        for j, i in enumerate(rows.tolist()):
            src, dst, proto, sp, dp, ttl, itype, flags = (c[j] for c in cols)
            if d == INSIDE:
                r = self._slow_in(frames, i, src, dst, proto, sp, dp, ttl, itype, flags)
            else:
                r = self._slow_out(frames, i, src, dst, proto, sp, dp, ttl, itype, flags)
            if r is not None:
                out_rows.append(i)
                out_sess.append(r[0])
                out_x.append(r[1])
                out_p.append(r[2])
        return (np.array(out_rows, np.intp), np.array(out_sess, np.int64), np.array(out_x, np.int64),
                np.array(out_p, np.int64))

    def _frame(self, frames: np.ndarray, i: int) -> bytearray:
        return bytearray(frames[i, : int(self.pb.l3_off[i]) + int(self.pb.ip_total_len[i])].tobytes())

    def _slow_in(self, frames, i, src, dst, proto, sp, dp, ttl, itype, flags):
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
        r = self._session_in2out(src, dst, proto, sp, dp, flags, frames, i)
        if r is None:
            return None
        return r

    def _slow_out(self, frames, i, src, dst, proto, sp, dp, ttl, itype, flags):
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
        return self._session_out2in(src, dst, proto, sp, dp, flags, frames, i)

    # -- session creation

    def _lookup1(self, table: SessionTable, k: tuple[int, int]) -> int:
        idx = np.empty(1, np.int64)
        hit = np.empty(1, bool)
        table.lookup_batch(np.array([k[0]], _U64), np.array([k[1]], _U64), idx, hit)
        return int(idx[0]) if hit[0] else -1

    def _insert1(self, table: SessionTable, k: tuple[int, int], **vals) -> int:
        v = np.zeros(1, dtype=[(f, ELEMENT.fields[f][0]) for f in vals])
        for f, x in vals.items():
            v[f] = x
        slot = table.insert_batch(np.array([k[0]], _U64), np.array([k[1]], _U64), v)
        return int(slot[0])

    def _ref(self, table: SessionTable, slot: int, delta: int) -> int:
        """Add ``delta`` to the reference count (``packets``) of a MAP/ADDR entry; returns the new count."""
        c = int(table.entries["packets"][slot]) + delta
        v = np.zeros(1, dtype=[("packets", "<u8")])
        v["packets"] = max(c, 0)
        table.update_batch(np.array([slot], np.int64), v)
        return c

    def _full(self) -> bool:
        return max(self.in2out.count, self.out2in.count) + 3 > self.max_entries

    def _limit_drop(self, reason: str, frames, i, side: int) -> None:
        self._count_drop(reason)
        if self.nat.icmp_on_limit:
            self._icmp_to_sender(side, frames, i, 3, 13)

    def _session_in2out(self, src, dst, proto, sp, dp, flags, frames, i):
        rp = sp if proto == IPPROTO_ICMP else dp
        key = make_key(src, dst, proto, sp, rp)
        pend = self._pending.get(key)
        if pend is not None:
            return pend
        slot = self._lookup1(self.in2out, key)
        if slot >= 0:  # e.g. created earlier in this burst through a fragment
            e = self.in2out.entries[slot]
            return slot, int(e["xaddr"]), int(e["xport"])
        # Static first (a port forward's own host, a 1:1 host), then the EIM mapping, then allocate.
        static = False
        mslot = -1
        if (proto, src, sp) in self.fwd_in:
            xa, xp = self.fwd_in[(proto, src, sp)]
            static = True
        elif src in self.one_in:
            xa, xp = self.one_in[src], sp
            static = True
        else:
            mkey = make_key(src, 0, proto, sp, 0, TAG_MAP)
            mslot = self._lookup1(self.in2out, mkey)
            if mslot >= 0:
                xa, xp = int(self.in2out.entries["xaddr"][mslot]), int(self.in2out.entries["xport"][mslot])
        if self.host_session_limit and self._host_sessions.get(src, 0) >= self.host_session_limit:
            return self._limit_drop("quota_exceeded", frames, i, INSIDE)
        if self._full():
            return self._limit_drop("table_full", frames, i, INSIDE)
        hop = self.lpm.lookup(dst)
        if hop == MISS or self.hops[hop].port != "outside":
            return self._count_drop("no_route")
        new_map = False
        if not static and mslot < 0:
            a = self.alloc.allocate(proto, src, sp)
            if not a.ok:
                reason = "quota_exceeded" if a.status in (AllocStatus.HOST_PORT_QUOTA, AllocStatus.HOST_TABLE_FULL) else "ports_exhausted"
                return self._limit_drop(reason, frames, i, INSIDE)
            xa, xp = a.addr, a.port
            new_map = True
        xrp = xp if proto == IPPROTO_ICMP else dp
        state = nat_tcp.CLOSED if (proto == IPPROTO_TCP and flags & 0x02 and not flags & 0x04) else nat_tcp.TRANS
        return self._create(key, (dst, xa, proto, xrp, xp), src, sp, xa, xp, proto, state, static, new_map, mslot)

    def _create(self, key, okey_parts, iaddr, iport, xa, xp, proto, state, static, new_map, mslot,
                outside_first: bool = False):
        now = self.clock.now()
        tcp_state = state if proto == IPPROTO_TCP else 0
        slot = self._insert1(self.in2out, key, protocol=proto, tcp_state=tcp_state, flags=FLAG_STATIC if static else FLAG_SESSION,
                             xaddr=xa, xport=xp, created=now, last_seen=now)
        if slot < 0:
            if new_map:
                self.alloc.release(proto, xa, xp, iaddr)
            return self._count_drop("table_full")
        raddr, _, _, rport, _ = okey_parts
        okey = make_key(raddr, xa, proto, rport, xp)
        oslot = self._insert1(self.out2in, okey, protocol=proto, flags=FLAG_STATIC if static else FLAG_SESSION,
                              xaddr=iaddr, xport=iport, created=now, last_seen=now, packets=slot)
        if oslot < 0:
            self.in2out.delete_batch(np.array([key[0]], _U64), np.array([key[1]], _U64))
            if new_map:
                self.alloc.release(proto, xa, xp, iaddr)
            return self._count_drop("table_full")
        if not static:
            if new_map:
                self._insert1(self.in2out, make_key(iaddr, 0, proto, iport, 0, TAG_MAP), protocol=proto, flags=FLAG_MAP,
                              xaddr=xa, xport=xp, created=now, last_seen=now, packets=1)
                self._insert1(self.out2in, make_key(0, xa, proto, 0, xp, TAG_MAP), protocol=proto, flags=FLAG_MAP,
                              xaddr=iaddr, xport=iport, created=now, last_seen=now)
            else:
                self._ref(self.in2out, mslot, +1)
            if self.filtering == Filtering.ADDRESS_DEPENDENT:
                akey = make_key(raddr, xa, proto, 0, xp, TAG_ADDR)
                aslot = self._lookup1(self.out2in, akey)
                if aslot >= 0:
                    self._ref(self.out2in, aslot, +1)
                else:
                    self._insert1(self.out2in, akey, protocol=proto, flags=FLAG_ADDR, created=now, last_seen=now, packets=1)
        self._host_sessions[iaddr] = self._host_sessions.get(iaddr, 0) + 1
        self.stats["sessions_created"] += 1
        # The row is translated with its direction's view: in2out -> (xa, xp), out2in -> (iaddr, iport).
        r = (slot, iaddr, iport) if outside_first else (slot, xa, xp)
        self._pending[key if not outside_first else okey] = r
        return r

    def _session_out2in(self, src, dst, proto, sp, dp, flags, frames, i):
        """A new flow from outside: only what a static mapping or the filtering mode lets in."""
        xp = dp
        rp = dp if proto == IPPROTO_ICMP else sp
        okey = make_key(src, dst, proto, rp, xp)
        pend = self._pending.get(okey)
        if pend is not None:
            return pend
        static = False
        mslot = -1
        if (proto, dst, dp) in self.fwd_out:
            ia, ip_ = self.fwd_out[(proto, dst, dp)]
            static = True
        elif dst in self.one_out:
            ia, ip_ = self.one_out[dst], dp
            static = True
        else:
            if dst not in self.pool_set:
                return self._count_drop("no_session")
            mslot = self._lookup1(self.out2in, make_key(0, dst, proto, 0, xp, TAG_MAP))
            if mslot < 0:
                return self._count_drop("no_session")
            if self.filtering == Filtering.ADDRESS_AND_PORT_DEPENDENT:
                return self._count_drop("filtered")
            if self.filtering == Filtering.ADDRESS_DEPENDENT and \
                    self._lookup1(self.out2in, make_key(src, dst, proto, 0, xp, TAG_ADDR)) < 0:
                return self._count_drop("filtered")
            ia = int(self.out2in.entries["xaddr"][mslot])
            ip_ = int(self.out2in.entries["xport"][mslot])
            mslot = self._lookup1(self.in2out, make_key(ia, 0, proto, ip_, 0, TAG_MAP))
            if mslot < 0:
                return self._count_drop("no_session")
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
        return self._create(key, (src, dst, proto, rp, xp), ia, ip_, dst, xp, proto, state, static, False, mslot,
                            outside_first=True)

    # -- hairpinning (RFC 4787 REQ-9): inside host to a pool address:port of another inside host

    def _hairpin(self, frames, i, src, dst, proto, sp, dp):
        frame = self._frame(frames, i)
        l3 = int(self.pb.l3_off[i])
        # 1. The sender's own mapping (created as for any outgoing flow; the "remote" is dst:dp).
        r = self._session_in2out(src, dst, proto, sp, dp, int(self.pb.tcp_flags[i]), frames, i)
        if r is None:
            return None
        slot, xa, xp = r
        # 2. The receiver: a session of the worker owning dp, a static mapping, or its EIM mapping.
        target = self._hairpin_target(dst, proto, dp, xa, xp)
        if target is None:
            return self._count_drop("no_session")
        ia, ip_ = target
        self._account(INSIDE, np.array([i], np.intp), np.array([slot], np.int64))
        rewrite_ip(frame, l3, "src", xa, xp)
        rewrite_ip(frame, l3, "dst", ia, ip_)
        self._dec_ttl_bytes(frame, l3)
        self.stats["hairpinned"] += 1
        self._send_via(INSIDE, frame, ia)
        self.punted += 1
        return None

    def _hairpin_target(self, dst, proto, dp, xa, xp):
        if (proto, dst, dp) in self.fwd_out:
            return self.fwd_out[(proto, dst, dp)]
        if dst in self.one_out:
            return self.one_out[dst], dp
        tables = [self.out2in] + [t for t in getattr(self, "peer_out2in", {}).values()]
        owner = self._owner(dp)
        if owner is not None and owner != self.worker and owner in getattr(self, "peer_out2in", {}):
            tables = [self.peer_out2in[owner]]
        mkey = make_key(0, dst, proto, 0, dp, TAG_MAP)
        for t in tables:
            if t is self.out2in:
                s = self._lookup1(t, mkey)
                if s >= 0:
                    return int(t.entries["xaddr"][s]), int(t.entries["xport"][s])
            else:
                idx, recs, hits = t.lookup_consistent(np.array([mkey[0]], _U64), np.array([mkey[1]], _U64))
                if hits[0]:
                    return int(recs[0]["xaddr"]), int(recs[0]["xport"])
        return None

    def _owner(self, port: int) -> int | None:
        if port < self.nat.port_lo:
            return None
        return ((port - self.nat.port_lo) // self.nat.block) % self.nat.workers

    def attach_peers(self, out2in_tables: dict[int, SessionTable]) -> None:
        """Readers of the other workers' out2in tables, for hairpinning to their mappings."""
        self.peer_out2in = {w: t for w, t in out2in_tables.items() if w != self.worker}

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
            slot = self._lookup1(self.out2in, make_key(edst, esrc, eproto, edp, esp))
            if slot < 0:
                return self._count_drop("no_session")
            ia, ip_ = int(self.out2in.entries["xaddr"][slot]), int(self.out2in.entries["xport"][slot])
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
        ports = None
        if offset == 0:
            l4 = l3 + ihl
            if proto == IPPROTO_ICMP and plen >= 8 and b[l4] in (0, 8, 13, 14):
                sp = dp = _g16(b, l4 + 4)
                ports = (sp, dp)
            elif proto != IPPROTO_ICMP and plen >= 8:
                ports = (_g16(b, l4), _g16(b, l4 + 2))
            if ports is not None:
                x = self._frag_translation(d, frames, i, src, dst, proto, ports, b[l4 + 13] if proto == IPPROTO_TCP else 0)
                if x is None:
                    return  # counted by the session code
                ports = x
        if b[l3 + 8] <= 1:
            self._count_drop("ttl_expired")
            return
        pkt = (d, b, l3)
        acts = self.frag.submit(pkt, src, dst, proto, ident, offset, more, plen, ports, len(b))
        if any(a.packet is pkt and a.verdict == Verdict.DROP for a in acts):
            self._count_drop("hostile")  # malformed, duplicate, overlapping or over a bound
        else:
            self.punted += 1  # translated now or held (a later drop of a held one is in frag.counters)
        self._frag_actions([a for a in acts if not (a.packet is pkt and a.verdict == Verdict.DROP)])

    def _frag_translation(self, d, frames, i, src, dst, proto, ports, flags):
        sp, dp = ports
        self._pending = {}
        if d == INSIDE:
            r = self._session_in2out(src, dst, proto, sp, dp, flags, frames, i)
            if r is None:
                return None
            slot, xa, xp = r
            return ("src", xa, xp, self.lpm.lookup(dst), dst)
        okey = make_key(src, dst, proto, dp if proto == IPPROTO_ICMP else sp, dp)
        s = self._lookup1(self.out2in, okey)
        if s >= 0:
            ia, ip_ = int(self.out2in.entries["xaddr"][s]), int(self.out2in.entries["xport"][s])
        else:
            r = self._session_out2in(src, dst, proto, sp, dp, flags, frames, i)
            if r is None:
                return None
            _, ia, ip_ = r
        return ("dst", ia, ip_, self.lpm.lookup(ia), ia)

    def _frag_actions(self, acts) -> None:
        for a in acts:
            if a.verdict == Verdict.TRANSLATE:
                d, b, l3 = a.packet
                which, addr, port, hop, fdst = a.ports
                first = (_g16(b, l3 + 6) & 0x1FFF) == 0
                rewrite_ip(b, l3, which, addr, port if first else None, l4=first)
                self._dec_ttl_bytes(b, l3)
                if hop == MISS:
                    self.stats["neigh_drops"] += 1
                    continue
                h = self.hops[hop]
                self.stats["frag_translated"] += 1
                self._send_via(OUTSIDE if d == INSIDE else INSIDE, b, h.via if h.via is not None else fdst)
            elif a.verdict == Verdict.DROP:
                self.stats["neigh_drops"] += 1  # already counted as punted when it arrived

    # ------------------------------------------------------------------ helpers

    def _count_drop(self, reason: str, k: int = 1):
        self.drops[R.get(reason, R["other"])] += k
        return None

    # ------------------------------------------------------------------ time

    def tick(self, now: float | None = None) -> None:
        """Expiry slice (sessions out of both tables, ports to the allocator's hold), neighbour
        ageing, fragment timeouts, and adoption of neighbours published by the ARP worker."""
        t = self.clock.now()
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
            for s in slots.tolist():
                removed += self._remove_session(s)
        self.stats["sessions_expired"] += removed
        return removed

    def _remove_session(self, slot: int) -> int:
        rec = self.in2out.entries[slot].copy()
        if rec["state"] != USED:
            return 0
        k0, k1 = int(rec["key0"]), int(rec["key1"])
        iaddr, raddr = k0 >> 32, k0 & 0xFFFFFFFF
        proto, iport, rport = (k1 >> 32) & 0xFF, (k1 >> 16) & 0xFFFF, k1 & 0xFFFF
        xa, xp = int(rec["xaddr"]), int(rec["xport"])
        xrp = xp if proto == IPPROTO_ICMP else rport
        okey = make_key(raddr, xa, proto, xrp, xp)
        self.out2in.delete_batch(np.array([okey[0]], _U64), np.array([okey[1]], _U64))
        self.in2out.delete_batch(np.array([k0], _U64), np.array([k1], _U64))
        c = self._host_sessions.get(iaddr, 0) - 1
        if c > 0:
            self._host_sessions[iaddr] = c
        else:
            self._host_sessions.pop(iaddr, None)
        if int(rec["flags"]) == FLAG_STATIC:
            return 1
        if self.filtering == Filtering.ADDRESS_DEPENDENT:
            akey = make_key(raddr, xa, proto, 0, xp, TAG_ADDR)
            a = self._lookup1(self.out2in, akey)
            if a >= 0 and self._ref(self.out2in, a, -1) <= 0:
                self.out2in.delete_batch(np.array([akey[0]], _U64), np.array([akey[1]], _U64))
        mkey = make_key(iaddr, 0, proto, iport, 0, TAG_MAP)
        m = self._lookup1(self.in2out, mkey)
        if m >= 0 and self._ref(self.in2out, m, -1) <= 0:
            self.in2out.delete_batch(np.array([mkey[0]], _U64), np.array([mkey[1]], _U64))
            rk = make_key(0, xa, proto, 0, xp, TAG_MAP)
            self.out2in.delete_batch(np.array([rk[0]], _U64), np.array([rk[1]], _U64))
            self.alloc.release(proto, xa, xp, iaddr)
        return 1

    # ------------------------------------------------------------------ introspection

    def sessions(self) -> list[dict[str, int]]:
        """Every live session of this worker (slow; tests and CLI)."""
        e = self.in2out.entries
        out = []
        for s in np.flatnonzero((e["state"] == USED) & ((e["flags"] == FLAG_SESSION) | (e["flags"] == FLAG_STATIC))).tolist():
            r = e[s]
            k0, k1 = int(r["key0"]), int(r["key1"])
            out.append({"slot": s, "iaddr": k0 >> 32, "raddr": k0 & 0xFFFFFFFF, "proto": (k1 >> 32) & 0xFF,
                        "iport": (k1 >> 16) & 0xFFFF, "rport": k1 & 0xFFFF, "xaddr": int(r["xaddr"]),
                        "xport": int(r["xport"]), "tcp_state": int(r["tcp_state"]), "last_seen": int(r["last_seen"]),
                        "created": int(r["created"]), "packets": int(r["packets"]), "bytes": int(r["bytes"])})
        return out


def private_zones(config: GatewayConfig, worker: int, clock: Clock, table_capacity: int = DEFAULT_TABLE_CAPACITY
                  ) -> dict[str, Any]:
    """Process-private stand-ins for the worker's zones (tests, benchmarks)."""
    from hotplane.schema.nat import NEIGH_ENTRY, NEIGH_SLOTS

    t1 = SessionTable.create(_aligned(SessionTable.zone_size(table_capacity)), table_capacity, seed=worker * 2 + 1)
    t2 = SessionTable.create(_aligned(SessionTable.zone_size(table_capacity)), table_capacity, seed=worker * 2 + 2)
    alloc = PortAllocator.for_worker(config, worker, clock)
    lpm = Lpm(64)
    fill_lpm(lpm, config)
    neigh = np.zeros(NEIGH_SLOTS, NEIGH_ENTRY)
    return {"in2out": t1, "out2in": t2, "pool": alloc, "lpm": lpm, "neigh": neigh}


def build_pipeline(cfg: dict, worker_id: int, inst) -> NatPipeline:
    """The worker's entry point: the NAT pipeline for ``worker_id`` on the instance's zones.

    ``cfg`` is the primary's ``config`` answer (``config_toml``, ``config_path``, ``macs``).
    The gateway's own MACs come from the config, else from the af_packet interfaces, else
    from the primary's defaults.
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
    zones = attach_nat_zones(inst.directory, worker_id, config, clock)
    return NatPipeline(config, worker_id, zones, clock, macs=macs)
