"""The ARP neighbour table of one port: resolution, ageing, a bounded wait queue, ARP replies.

No I/O here: every call returns *actions* (:class:`ArpRequest`, :class:`ArpReply`,
:class:`Transmit`, :class:`Drop`) that the caller turns into frames.

States and timers (whole seconds on the gateway clock)::

    (none) --send()--> INCOMPLETE --reply/request with a MAC--> REACHABLE
    INCOMPLETE: broadcast request every retrans_time, max_probes times, then the
                entry and its queued packets are dropped ("unresolved")
    REACHABLE --reachable_time without confirmation--> STALE
    STALE: still used for forwarding; the first use starts a probe (unicast
           requests every retrans_time, max_probes times); a reply makes it
           REACHABLE again, no reply deletes it. A STALE entry nobody uses is
           deleted gc_time after its last use or confirmation.

Learning follows RFC 826 with the usual hardening: a reply updates an entry we
have (REACHABLE); a request updates an entry we have and creates one (STALE)
only when it asks for one of our addresses; unsolicited replies for unknown
addresses, senders claiming our own addresses, senders with a multicast or zero
MAC and requests from 0.0.0.0 (RFC 5227 probes) teach nothing, so an ARP flood
cannot fill the table with junk. Requests for our addresses (``own``) are
answered, including RFC 5227 probes (to the prober's MAC).

Memory is bounded: at most ``max_entries`` entries (a new entry evicts the
least recently useful one: STALE, then INCOMPLETE, then REACHABLE, oldest
first; counted), at most ``queue_len`` packets waiting per address and
``max_queued_bytes`` waiting in total (beyond that the new packet is dropped
with reason "queue_full").

The fast path resolves a whole burst with :meth:`NeighbourTable.lookup_batch`
(sorted numpy arrays and ``searchsorted``), rebuilt only after a change.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from hotplane.shared.nat_clock import Clock, elapsed

ARP_REQUEST, ARP_REPLY = 1, 2
BROADCAST_MAC = b"\xff" * 6


class NeighState(enum.IntEnum):
    INCOMPLETE = 1
    REACHABLE = 2
    STALE = 3


def mac_to_int(mac: bytes) -> int:
    """6 bytes -> int (big-endian, so the int orders like the bytes)."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    return int.from_bytes(mac, "big")


def int_to_mac(value: int) -> bytes:
    return int(value).to_bytes(6, "big")


def macs_to_bytes(macs: np.ndarray) -> np.ndarray:
    """``uint64`` MACs (as :meth:`NeighbourTable.lookup_batch` returns them) -> ``uint8[n, 6]`` rows, vectorized."""
    return np.asarray(macs, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)[:, 2:]


@dataclass(frozen=True)
class ArpRequest:
    """Send an ARP request for ``target_ip`` from ``sender_ip``.

    To ``target_mac`` (a unicast probe of a known neighbour), or broadcast when it is None.
    """

    target_ip: int
    sender_ip: int
    target_mac: bytes | None = None


@dataclass(frozen=True)
class ArpReply:
    """Answer ``target_ip``/``target_mac``: ``sender_ip`` (ours) is at our port's MAC."""

    target_ip: int
    target_mac: bytes
    sender_ip: int


@dataclass(frozen=True)
class Transmit:
    """Send ``packet`` (which waited for resolution) to ``mac``."""

    packet: Any
    mac: bytes


@dataclass(frozen=True)
class Drop:
    """``packet`` is dropped; ``reason`` names the counter."""

    packet: Any
    reason: str


Action = ArpRequest | ArpReply | Transmit | Drop


@dataclass
class Neighbour:
    addr: int
    state: NeighState
    mac: int | None = None
    confirmed: int = 0       # last confirmation (or creation)
    last_used: int = 0
    probes: int = 0          # requests sent in the current resolution/probe
    next_probe: int = 0
    probing: bool = False    # a STALE entry is being re-probed
    queue: deque = field(default_factory=deque)  # (packet, nbytes)
    queued_bytes: int = 0


class NeighbourTable:
    """Neighbours reachable through one port; ``source_ip`` is our address on it (ARP sender)."""

    COUNTERS = ("requests_sent", "replies_sent", "learned", "updated", "evicted", "expired",
                "unresolved_drops", "evicted_drops", "queue_full_drops", "ignored")

    def __init__(self, clock: Clock, source_ip: int, own: Iterable[int] = (), *, max_entries: int = 1024,
                 reachable_time: int = 30, gc_time: int = 300, retrans_time: int = 1, max_probes: int = 3,
                 queue_len: int = 8, max_queued_bytes: int = 256 * 1024) -> None:
        if max_entries < 1 or queue_len < 0 or max_probes < 1 or retrans_time < 1:
            raise ValueError("max_entries, max_probes and retrans_time must be >= 1, queue_len >= 0")
        self.clock = clock
        self.source_ip = int(source_ip)
        self.own = frozenset({self.source_ip, *(int(a) for a in own)})
        self.max_entries = max_entries
        self.reachable_time = reachable_time
        self.gc_time = gc_time
        self.retrans_time = retrans_time
        self.max_probes = max_probes
        self.queue_len = queue_len
        self.max_queued_bytes = max_queued_bytes
        self.entries: dict[int, Neighbour] = {}
        self.queued_bytes = 0
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self._dirty = True
        self._keys = np.zeros(0, np.uint32)
        self._macs = np.zeros(0, np.uint64)
        self._stale = np.zeros(0, bool)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, addr: int) -> Neighbour | None:
        return self.entries.get(int(addr))

    def mac_of(self, addr: int) -> bytes | None:
        """The MAC to use for ``addr`` now (REACHABLE or STALE), else None. Does not count as a use."""
        n = self.entries.get(int(addr))
        return None if n is None or n.mac is None else int_to_mac(n.mac)

    # ------------------------------------------------------------------ sending

    def send(self, addr: int, packet: Any, nbytes: int = 0) -> list[Action]:
        """A packet must go to next hop ``addr``: transmit it, or queue it while resolving.

        ``nbytes`` is the packet's size, counted against the queue bounds.
        """
        addr = int(addr)
        now = self.clock.now()
        n = self.entries.get(addr)
        if n is not None and n.mac is not None:
            actions: list[Action] = [Transmit(packet, int_to_mac(n.mac))]
            self._use(n, now, actions)
            return actions
        actions = []
        if n is None:
            n = self._new_entry(addr, NeighState.INCOMPLETE, now, actions)
            n.probes, n.next_probe = 1, now + self.retrans_time
            actions.append(ArpRequest(addr, self.source_ip))
            self.counters["requests_sent"] += 1
        n.last_used = now
        if len(n.queue) >= self.queue_len or self.queued_bytes + nbytes > self.max_queued_bytes:
            actions.append(Drop(packet, "queue_full"))
            self.counters["queue_full_drops"] += 1
        else:
            n.queue.append((packet, nbytes))
            n.queued_bytes += nbytes
            self.queued_bytes += nbytes
        return actions

    def lookup_batch(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Action]]:
        """Resolve a burst of next hops: ``(macs as uint64, found mask, actions)``.

        Unresolved addresses (found False) go through :meth:`send`. A hit on a
        STALE entry counts as a use and may start a probe (the ArpRequest actions).
        """
        if self._dirty:
            self._rebuild()
        a = np.asarray(addrs, dtype=np.uint32)
        if not len(self._keys):
            return np.zeros(len(a), np.uint64), np.zeros(len(a), bool), []
        pos = np.searchsorted(self._keys, a)
        pos[pos >= len(self._keys)] = 0
        found = self._keys[pos] == a
        macs = np.where(found, self._macs[pos], np.uint64(0))
        actions: list[Action] = []
        stale = found & self._stale[pos]
        if stale.any():
            now = self.clock.now()
            for addr in np.unique(a[stale]).tolist():
                self._use(self.entries[addr], now, actions)
        return macs, found, actions

    def _use(self, n: Neighbour, now: int, actions: list[Action]) -> None:
        n.last_used = now
        if n.state == NeighState.STALE and not n.probing:
            n.probing, n.probes, n.next_probe = True, 1, now + self.retrans_time
            actions.append(ArpRequest(n.addr, self.source_ip, int_to_mac(n.mac)))
            self.counters["requests_sent"] += 1
            self._dirty = True  # probing entries no longer trigger probes from lookup_batch

    # ------------------------------------------------------------------ receiving

    def handle_arp(self, op: int, sender_ip: int, sender_mac: bytes, target_ip: int) -> list[Action]:
        """Process a received ARP packet (Ethernet/IPv4 fields already parsed and checked)."""
        sender_ip, target_ip = int(sender_ip), int(target_ip)
        actions: list[Action] = []
        if op == ARP_REQUEST and target_ip in self.own:
            actions.append(ArpReply(sender_ip, bytes(sender_mac), target_ip))
            self.counters["replies_sent"] += 1
        if sender_ip == 0 or sender_ip in self.own or (sender_mac[0] & 1) or sender_mac == b"\0" * 6 \
                or op not in (ARP_REQUEST, ARP_REPLY):
            self.counters["ignored"] += 1
            return actions
        now = self.clock.now()
        mac = mac_to_int(sender_mac)
        n = self.entries.get(sender_ip)
        if n is None:
            if op == ARP_REQUEST and target_ip in self.own:
                n = self._new_entry(sender_ip, NeighState.STALE, now, actions)
                n.mac, n.confirmed, n.last_used = mac, now, now
                self.counters["learned"] += 1
            else:
                self.counters["ignored"] += 1
            return actions
        changed = n.mac != mac
        was_unresolved = n.mac is None
        if op == ARP_REPLY:
            n.state = NeighState.REACHABLE
            n.confirmed = now
            n.probing, n.probes = False, 0
        elif changed:
            n.state = NeighState.STALE  # a request tells us the MAC, not that the path works
            n.confirmed = now
            n.probing, n.probes = False, 0
        n.mac = mac
        self.counters["learned" if was_unresolved else "updated"] += 1
        self._dirty = True
        if n.queue:
            mac_bytes = int_to_mac(mac)
            while n.queue:
                pkt, nbytes = n.queue.popleft()
                self.queued_bytes -= nbytes
                actions.append(Transmit(pkt, mac_bytes))
            n.queued_bytes = 0
        return actions

    # ------------------------------------------------------------------ ageing

    def tick(self) -> list[Action]:
        """Run the timers: age, probe, expire. Call it about once a second (work: O(entries))."""
        now = self.clock.now()
        actions: list[Action] = []
        for n in list(self.entries.values()):
            if n.state == NeighState.REACHABLE:
                if elapsed(now, n.confirmed) >= self.reachable_time:
                    n.state = NeighState.STALE
                    self._dirty = True
                continue
            if n.state == NeighState.INCOMPLETE or n.probing:
                if elapsed(now, n.next_probe) < 0:
                    continue
                if n.probes < self.max_probes:
                    n.probes += 1
                    n.next_probe = now + self.retrans_time
                    target = None if n.mac is None else int_to_mac(n.mac)
                    actions.append(ArpRequest(n.addr, self.source_ip, target))
                    self.counters["requests_sent"] += 1
                else:
                    self._remove(n, actions, "unresolved")
                    self.counters["expired"] += 1
                continue
            # STALE and idle
            if min(elapsed(now, n.last_used), elapsed(now, n.confirmed)) >= self.gc_time:
                self._remove(n, actions, "unresolved")
                self.counters["expired"] += 1
        return actions

    # ------------------------------------------------------------------ internals

    def _new_entry(self, addr: int, state: NeighState, now: int, actions: list[Action]) -> Neighbour:
        if len(self.entries) >= self.max_entries:
            victim = min(self.entries.values(), key=lambda e: self._eviction_rank(e, now))
            self._remove(victim, actions, "evicted")
            self.counters["evicted"] += 1
        n = Neighbour(addr, state, confirmed=now, last_used=now)
        self.entries[addr] = n
        self._dirty = True
        return n

    def _eviction_rank(self, n: Neighbour, now: int) -> tuple[int, int]:
        order = {NeighState.STALE: 0, NeighState.INCOMPLETE: 1, NeighState.REACHABLE: 2}[n.state]
        return order, -elapsed(now, n.last_used)

    def _remove(self, n: Neighbour, actions: list[Action], reason: str) -> None:
        del self.entries[n.addr]
        for pkt, nbytes in n.queue:
            actions.append(Drop(pkt, reason))
            self.queued_bytes -= nbytes
            self.counters[f"{reason}_drops"] += 1
        n.queue.clear()
        self._dirty = True

    def _rebuild(self) -> None:
        usable = sorted((a, n) for a, n in self.entries.items() if n.mac is not None)
        self._keys = np.array([a for a, _ in usable], dtype=np.uint32)
        self._macs = np.array([n.mac for _, n in usable], dtype=np.uint64)
        self._stale = np.array([n.state == NeighState.STALE and not n.probing for _, n in usable], dtype=bool)
        self._dirty = False
