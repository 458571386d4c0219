"""Virtual reassembly of IPv4 fragments for the NAT: find each fragment's session without reassembling.

Only the first fragment (offset 0) carries the L4 header, i.e. the ports (or
ICMP identifier) that name the session. The tracker remembers them per datagram,
keyed on ``(src, dst, proto, ip_id)``, so every other fragment of the datagram
is translated with the same ports, in whatever order fragments arrive:

* first fragment: translated with its ports; any fragments of the datagram that
  arrived before it are released (translated) right after it, in arrival order;
* later fragment, first already seen: translated at once;
* later fragment, first not seen yet: held (buffered) until the first arrives.

Fragments are never merged or rewritten here: the caller translates each one
(address, and for the first fragment the L4 header and checksum). A datagram's
entry is forgotten as soon as all its bytes have been seen (the last fragment
gives the total length), or ``timeout`` seconds after its first fragment arrived.

Bounds, so hostile floods (many ids, overlapping fragments, datagrams that never
complete) cannot exhaust memory; every drop is counted by reason:

* ``max_datagrams`` entries: a new datagram evicts the oldest entry ("evicted");
* ``max_fragments`` fragments per datagram ("too_many_fragments");
* ``max_datagram_bytes`` held per datagram ("datagram_too_big");
* ``max_total_bytes`` held in all: the oldest datagrams holding bytes are
  evicted until the new fragment fits ("evicted");
* ``timeout``: held fragments of an entry that times out are dropped ("timeout").

Hostile shapes: a fragment overlapping an earlier one of its datagram (not an
exact duplicate), a second "last" fragment, or bytes beyond the end poison the
datagram (RFC 1858 / RFC 3128 overlap attacks): its held fragments and any later
fragments are dropped ("overlap") until the entry times out. An exact duplicate
is dropped ("duplicate"): the first copy already went through. A first fragment
too short to hold the ports (``ports=None``, RFC 1858 tiny fragment) poisons the
datagram ("tiny_first"). Offsets and lengths that are not valid fragment
geometry are dropped ("malformed").

Work per call is bounded: expiry pops only expired entries from the front of an
insertion-ordered dict (entries are created in clock order), and overlap
checks scan at most ``max_fragments`` intervals.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hotplane.shared.nat_clock import Clock, elapsed

if TYPE_CHECKING:
    from hotplane.shared.nat_config import FragmentLimits

MAX_IP_PAYLOAD = 65535 - 20  # an IPv4 datagram's payload cannot extend beyond this


class Verdict(enum.IntEnum):
    TRANSLATE = 0  # translate and forward ``packet`` using ``ports``
    HOLD = 1       # buffered here; it comes back later as TRANSLATE or DROP
    DROP = 2       # dropped; ``reason`` names the counter


@dataclass(frozen=True, slots=True)
class FragAction:
    verdict: Verdict
    packet: Any
    ports: Any = None
    reason: str | None = None


FragKey = tuple[int, int, int, int]


@dataclass
class _Datagram:
    created: int
    ports: Any = None
    intervals: list[tuple[int, int]] = field(default_factory=list)
    held: list[tuple[Any, int]] = field(default_factory=list)  # (packet, nbytes)
    held_bytes: int = 0
    total_len: int | None = None
    received: int = 0
    poisoned: str | None = None  # the reason, once the datagram is condemned


class FragmentTracker:
    """Per-worker fragment state. See the module docstring for the rules."""

    REASONS = ("malformed", "duplicate", "overlap", "too_many_fragments", "datagram_too_big", "evicted",
               "timeout", "tiny_first")

    def __init__(self, clock: Clock, *, timeout: int = 30, max_datagrams: int = 1024, max_fragments: int = 64,
                 max_datagram_bytes: int = 65535, max_total_bytes: int = 4 << 20) -> None:
        if min(timeout, max_datagrams, max_fragments, max_datagram_bytes) < 1:
            raise ValueError("fragment limits must be at least 1")
        if max_total_bytes < max_datagram_bytes:
            raise ValueError("max_total_bytes must be at least max_datagram_bytes")
        self.clock = clock
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_fragments = max_fragments
        self.max_datagram_bytes = max_datagram_bytes
        self.max_total_bytes = max_total_bytes
        self._entries: OrderedDict[FragKey, _Datagram] = OrderedDict()
        self.held_bytes = 0
        self.held_fragments = 0
        self.counters = {"translated": 0, "held": 0, "released": 0, "completed": 0,
                         **{f"drop_{r}": 0 for r in self.REASONS}}

    @classmethod
    def from_limits(cls, limits: "FragmentLimits", clock: Clock) -> "FragmentTracker":
        """A tracker with the bounds of the ``[nat.fragments]`` config table."""
        return cls(clock, timeout=limits.timeout, max_datagrams=limits.max_datagrams,
                   max_fragments=limits.max_fragments, max_datagram_bytes=limits.max_datagram_bytes,
                   max_total_bytes=limits.max_total_bytes)

    def __len__(self) -> int:
        """Datagrams currently tracked."""
        return len(self._entries)

    def __contains__(self, key: FragKey) -> bool:
        return key in self._entries

    def ports_of(self, key: FragKey) -> Any:
        """The ports learned for a datagram, or None."""
        e = self._entries.get(key)
        return None if e is None else e.ports

    # ------------------------------------------------------------------ the main entry point

    def submit(self, packet: Any, src: int, dst: int, proto: int, ip_id: int, offset: int, more: bool,
               length: int, ports: Any = None, nbytes: int | None = None) -> list[FragAction]:
        """Process one fragment; returns the actions for it and for any fragments it releases.

        ``offset``: byte offset of this fragment's payload (the IP fragment offset
        field times 8); ``more``: the MF flag; ``length``: payload bytes;
        ``ports``: for the first fragment, the L4 identifiers parsed from it (None
        when it is too short to hold them); ``nbytes``: the memory a held copy
        costs (default ``length``).
        """
        nbytes = length if nbytes is None else nbytes
        actions: list[FragAction] = []
        self._expire(actions)
        end = offset + length
        if length <= 0 or offset < 0 or offset % 8 or (more and length % 8) or end > MAX_IP_PAYLOAD:
            return self._drop(actions, packet, "malformed")
        if offset == 0 and not more:
            # Not a fragment at all: nothing to remember.
            if ports is None:
                return self._drop(actions, packet, "tiny_first")
            self.counters["translated"] += 1
            actions.append(FragAction(Verdict.TRANSLATE, packet, ports))
            return actions

        key = (int(src), int(dst), int(proto), int(ip_id))
        e = self._entries.get(key)
        if e is None:
            e = self._create(key, actions)
        if e.poisoned:
            return self._drop(actions, packet, e.poisoned)

        # Geometry checks against what this datagram has shown so far.
        for s, t in e.intervals:
            if offset < t and s < end:
                if (s, t) == (offset, end):
                    return self._drop(actions, packet, "duplicate")
                return self._poison(e, actions, packet, "overlap")
        if not more:
            if e.total_len is not None or any(t > end for _, t in e.intervals):
                return self._poison(e, actions, packet, "overlap")
        elif e.total_len is not None and end > e.total_len:
            return self._poison(e, actions, packet, "overlap")
        if len(e.intervals) >= self.max_fragments:
            return self._poison(e, actions, packet, "too_many_fragments")
        if offset == 0 and ports is None:
            return self._poison(e, actions, packet, "tiny_first")

        if offset == 0:
            e.ports = ports
            self._account(e, offset, end, more)
            self.counters["translated"] += 1
            actions.append(FragAction(Verdict.TRANSLATE, packet, ports))
            for held, hbytes in e.held:
                actions.append(FragAction(Verdict.TRANSLATE, held, ports))
                self.counters["translated"] += 1
                self.counters["released"] += 1
            self._unhold(e)
        elif e.ports is not None:
            self._account(e, offset, end, more)
            self.counters["translated"] += 1
            actions.append(FragAction(Verdict.TRANSLATE, packet, e.ports))
        else:
            if e.held_bytes + nbytes > self.max_datagram_bytes:
                return self._poison(e, actions, packet, "datagram_too_big")
            self._make_room(key, nbytes, actions)
            self._account(e, offset, end, more)
            e.held.append((packet, nbytes))
            e.held_bytes += nbytes
            self.held_bytes += nbytes
            self.held_fragments += 1
            self.counters["held"] += 1
            actions.append(FragAction(Verdict.HOLD, packet))

        if e.total_len is not None and e.received == e.total_len and e.ports is not None:
            del self._entries[key]  # every byte seen: the datagram is done
            self.counters["completed"] += 1
        return actions

    def expire(self) -> list[FragAction]:
        """Drop the datagrams older than ``timeout`` (their held fragments become DROP "timeout")."""
        actions: list[FragAction] = []
        self._expire(actions)
        return actions

    # ------------------------------------------------------------------ internals

    def _account(self, e: _Datagram, offset: int, end: int, more: bool) -> None:
        e.intervals.append((offset, end))
        e.received += end - offset
        if not more:
            e.total_len = end

    def _create(self, key: FragKey, actions: list[FragAction]) -> _Datagram:
        while len(self._entries) >= self.max_datagrams:
            _, old = self._entries.popitem(last=False)
            self._drop_held(old, actions, "evicted")
        e = _Datagram(created=self.clock.now())
        self._entries[key] = e
        return e

    def _make_room(self, key: FragKey, nbytes: int, actions: list[FragAction]) -> None:
        """Evict the oldest datagrams holding bytes (not ``key``'s) until ``nbytes`` more fit."""
        if self.held_bytes + nbytes <= self.max_total_bytes:
            return
        for k in list(self._entries):
            if self.held_bytes + nbytes <= self.max_total_bytes:
                break
            old = self._entries[k]
            if k == key or not old.held:
                continue
            del self._entries[k]
            self._drop_held(old, actions, "evicted")

    def _expire(self, actions: list[FragAction]) -> None:
        now = self.clock.now()
        while self._entries:
            key, e = next(iter(self._entries.items()))
            if elapsed(now, e.created) < self.timeout:
                break
            del self._entries[key]
            self._drop_held(e, actions, "timeout")

    def _drop_held(self, e: _Datagram, actions: list[FragAction], reason: str) -> None:
        for pkt, _ in e.held:
            actions.append(FragAction(Verdict.DROP, pkt, reason=reason))
            self.counters[f"drop_{reason}"] += 1
        self._unhold(e)

    def _unhold(self, e: _Datagram) -> None:
        self.held_bytes -= e.held_bytes
        self.held_fragments -= len(e.held)
        e.held = []
        e.held_bytes = 0

    def _poison(self, e: _Datagram, actions: list[FragAction], packet: Any, reason: str) -> list[FragAction]:
        e.poisoned = reason
        e.intervals = []  # no longer needed: everything that follows is dropped
        self._drop_held(e, actions, reason)
        return self._drop(actions, packet, reason)

    def _drop(self, actions: list[FragAction], packet: Any, reason: str) -> list[FragAction]:
        actions.append(FragAction(Verdict.DROP, packet, reason=reason))
        self.counters[f"drop_{reason}"] += 1
        return actions
