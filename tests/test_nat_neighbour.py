"""ARP neighbour table: resolution with a bounded queue, ageing, probing, learning rules, replies, bounds."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared.nat_clock import ManualClock
from hotplane.shared.nat_neighbour import (
    ARP_REPLY, ARP_REQUEST, ArpReply, ArpRequest, Drop, NeighbourTable, NeighState, Transmit,
    int_to_mac, mac_to_int, macs_to_bytes,
)

GW = 0x64400001      # 100.64.0.1
POOL_ADDR = 0xC6120105
H1, H2, H3 = 0x64400002, 0x64400003, 0x64400004
M1, M2 = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def table(clock: ManualClock | None = None, **kw) -> NeighbourTable:
    return NeighbourTable(clock or ManualClock(), GW, own=[POOL_ADDR], **kw)


def test_resolution_queues_then_releases() -> None:
    t = table()
    acts = t.send(H1, "p1", 100)
    assert acts == [ArpRequest(H1, GW)]  # broadcast request
    assert t.send(H1, "p2", 100) == []   # queued, no second request
    assert t.get(H1).state == NeighState.INCOMPLETE and t.queued_bytes == 200
    acts = t.handle_arp(ARP_REPLY, H1, M1, GW)
    assert acts == [Transmit("p1", M1), Transmit("p2", M1)]
    assert t.get(H1).state == NeighState.REACHABLE and t.queued_bytes == 0
    assert t.send(H1, "p3", 100) == [Transmit("p3", M1)]
    assert t.mac_of(H1) == M1


def test_queue_bounds() -> None:
    t = table(queue_len=2, max_queued_bytes=250)
    t.send(H1, "a", 100)
    t.send(H1, "b", 100)
    assert t.send(H1, "c", 10) == [Drop("c", "queue_full")]     # per-address count
    t.send(H2, "d", 40)
    assert t.send(H2, "e", 100) == [Drop("e", "queue_full")]    # total bytes
    assert t.counters["queue_full_drops"] == 2 and t.queued_bytes == 240


def test_unresolved_after_max_probes() -> None:
    clock = ManualClock()
    t = table(clock, max_probes=3, retrans_time=1)
    t.send(H1, "p", 60)
    clock.advance(1)
    assert t.tick() == [ArpRequest(H1, GW)]
    clock.advance(1)
    assert t.tick() == [ArpRequest(H1, GW)]
    clock.advance(1)
    assert t.tick() == [Drop("p", "unresolved")]
    assert t.get(H1) is None and t.counters["unresolved_drops"] == 1 and t.counters["requests_sent"] == 3
    assert t.queued_bytes == 0


def test_ageing_and_unicast_probe() -> None:
    clock = ManualClock()
    t = table(clock, reachable_time=30, retrans_time=1, max_probes=2, gc_time=300)
    t.send(H1, "p", 1)
    t.handle_arp(ARP_REPLY, H1, M1, GW)
    clock.advance(29)
    assert t.tick() == [] and t.get(H1).state == NeighState.REACHABLE
    clock.advance(1)
    t.tick()
    assert t.get(H1).state == NeighState.STALE
    # a STALE entry still forwards, and its first use starts a unicast probe
    macs, found, acts = t.lookup_batch(np.array([H1, H1, H2], np.uint32))
    assert found.tolist() == [True, True, False] and int(macs[0]) == mac_to_int(M1)
    assert acts == [ArpRequest(H1, GW, M1)]
    assert t.lookup_batch(np.array([H1], np.uint32))[2] == []  # already probing: no second probe
    t.handle_arp(ARP_REPLY, H1, M1, GW)
    assert t.get(H1).state == NeighState.REACHABLE
    # STALE again, probe unanswered: the entry is deleted
    clock.advance(30)
    t.tick()
    assert t.send(H1, "q", 1) == [Transmit("q", M1), ArpRequest(H1, GW, M1)]
    clock.advance(1)
    assert t.tick() == [ArpRequest(H1, GW, M1)]
    clock.advance(1)
    assert t.tick() == []
    assert t.get(H1) is None and t.lookup_batch(np.array([H1], np.uint32))[1].tolist() == [False]


def test_idle_stale_entries_are_collected() -> None:
    clock = ManualClock()
    t = table(clock, reachable_time=30, gc_time=300)
    t.handle_arp(ARP_REQUEST, H1, M1, GW)  # creates a STALE entry
    assert t.get(H1).state == NeighState.STALE
    clock.advance(299)
    t.tick()
    assert t.get(H1) is not None
    clock.advance(1)
    t.tick()
    assert t.get(H1) is None and t.counters["expired"] == 1


def test_arp_replies_for_own_addresses() -> None:
    t = table()
    assert t.handle_arp(ARP_REQUEST, H1, M1, GW) == [ArpReply(H1, M1, GW)]
    assert t.handle_arp(ARP_REQUEST, H1, M1, POOL_ADDR) == [ArpReply(H1, M1, POOL_ADDR)]
    assert t.handle_arp(ARP_REQUEST, H1, M1, H2) == []   # not ours: no reply
    # RFC 5227 probe for our address: answered, nothing learnt
    assert t.handle_arp(ARP_REQUEST, 0, M2, GW) == [ArpReply(0, M2, GW)]
    assert t.get(0) is None and t.counters["replies_sent"] == 3


def test_learning_rules() -> None:
    t = table()
    assert t.handle_arp(ARP_REPLY, H1, M1, GW) == [] and t.get(H1) is None  # unsolicited: ignored
    t.handle_arp(ARP_REQUEST, H2, M1, H3)  # not for us: nothing learnt
    assert t.get(H2) is None
    t.handle_arp(ARP_REQUEST, GW, M1, GW)  # someone claims our address
    t.handle_arp(ARP_REQUEST, H1, b"\xff" * 6, GW)  # broadcast sender MAC
    t.handle_arp(ARP_REQUEST, H1, b"\x01\x00\x5e\x00\x00\x01", GW)  # multicast sender MAC
    t.handle_arp(ARP_REQUEST, H1, b"\0" * 6, GW)
    assert len(t) == 0 and t.counters["ignored"] >= 5
    # a known neighbour changing MAC (e.g. failover) is updated
    t.send(H1, "x", 1)
    t.handle_arp(ARP_REPLY, H1, M1, GW)
    t.handle_arp(ARP_REQUEST, H1, M2, H3)  # gratuitous-style update from a known host
    assert t.mac_of(H1) == M2 and t.get(H1).state == NeighState.STALE
    assert t.lookup_batch(np.array([H1], np.uint32))[0].tolist() == [mac_to_int(M2)]


def test_table_bound_evicts_least_useful() -> None:
    clock = ManualClock()
    t = table(clock, max_entries=2)
    t.send(H1, "a", 1)
    t.handle_arp(ARP_REPLY, H1, M1, GW)  # REACHABLE
    t.send(H2, "b", 1)                   # INCOMPLETE
    acts = t.send(H3, "c", 1)            # full: the INCOMPLETE one goes before the REACHABLE one
    assert Drop("b", "evicted") in acts and ArpRequest(H3, GW) in acts
    assert t.get(H1) is not None and t.get(H2) is None and len(t) == 2
    assert t.counters["evicted"] == 1 and t.counters["evicted_drops"] == 1


def test_mac_helpers() -> None:
    assert int_to_mac(mac_to_int(M1)) == M1 and mac_to_int(M2) == 0x020000000002
    rows = macs_to_bytes(np.array([mac_to_int(M1), mac_to_int(M2)], np.uint64))
    assert rows.shape == (2, 6) and rows.tobytes() == M1 + M2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 40), st.integers(1, 1500)),
    st.tuples(st.just("arp"), st.sampled_from([ARP_REQUEST, ARP_REPLY]), st.integers(0, 40), st.integers(0, 3),
              st.booleans()),
    st.tuples(st.just("tick"), st.integers(0, 40)),
), max_size=150))
def test_bounds_hold_and_packets_are_accounted(ops: list) -> None:
    clock = ManualClock()
    t = NeighbourTable(clock, GW, max_entries=8, queue_len=3, max_queued_bytes=3000)
    sent = 0
    dest: dict[int, int] = {}
    done: list = []
    for op in ops:
        if op[0] == "send":
            sent += 1
            dest[sent] = 0x64400100 + op[1]
            acts = t.send(dest[sent], sent, op[2])
        elif op[0] == "arp":
            _, code, host, mac, to_us = op
            acts = t.handle_arp(code, 0x64400100 + host, bytes([2, 0, 0, 0, 0, mac + 1]), GW if to_us else H3)
        else:
            clock.advance(op[1] % 3)
            acts = t.tick()
        done += [a.packet for a in acts if isinstance(a, (Transmit, Drop))]
        assert len(t) <= 8
        assert t.queued_bytes <= 3000
        assert t.queued_bytes == sum(n.queued_bytes for n in t.entries.values())
        assert all(len(n.queue) <= 3 for n in t.entries.values())
        for a in acts:
            if isinstance(a, Transmit):  # sent to the MAC the table holds for its next hop
                assert a.mac == t.mac_of(dest[a.packet])
    queued = [p for n in t.entries.values() for p, _ in n.queue]
    # every packet handed in was transmitted, dropped, or is still queued: exactly once
    assert sorted(done + queued) == list(range(1, sent + 1))
