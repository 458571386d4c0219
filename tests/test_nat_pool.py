"""The per-worker outside port allocator: pairing, preservation, class/parity, quota, reuse hold, state in a buffer."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared.nat_clock import ManualClock
from hotplane.shared.nat_config import default_config, parse_config
from hotplane.shared.nat_pool import (
    AllocStatus,
    PoolError,
    PortAllocator,
    aligned_buffer,
    space_of,
)

TCP, UDP, ICMP = 6, 17, 1
POOL = [0xC6120100 + i for i in range(4)]  # 198.18.1.0-3
H1, H2, H3 = 0x64400002, 0x64400003, 0x64400004


def make(clock: ManualClock | None = None, lo: int = 2000, hi: int = 3000, **kw) -> PortAllocator:
    return PortAllocator.new(POOL, lo, hi, clock or ManualClock(), **kw)


def test_preservation_and_pairing() -> None:
    p = make()
    a = p.allocate(UDP, H1, 2500)
    assert a.ok and a.port == 2500 and a.preserved
    assert a.addr == p.preferred_address(H1) and p.address_of(H1) == a.addr
    b = p.allocate(TCP, H1, 2500)  # tcp is its own space: preserved again, same address
    assert (b.addr, b.port, b.preserved) == (a.addr, 2500, True)
    c = p.allocate(UDP, H1, 2500)  # taken in udp: next free of the same parity
    assert c.ok and not c.preserved and c.addr == a.addr and c.port != 2500 and c.port % 2 == 0
    d = p.allocate(UDP, H1, 50000)  # outside this worker's block: never "preserved"
    assert d.ok and not d.preserved and 2000 <= d.port < 3000
    assert p.ports_of(H1) == 4 and p.in_use() == 4 and p.hosts == 1
    p.check_consistency()


def test_parity_then_class_fallback() -> None:
    p = make(lo=2000, hi=2004)  # ports 2000..2003
    odd = [p.allocate(UDP, H1, 5001).port for _ in range(2)]
    assert sorted(odd) == [2001, 2003]
    # no odd port left: same class, other parity
    assert p.allocate(UDP, H1, 5001).port in (2000, 2002)


def test_class_kept_when_block_straddles_1024() -> None:
    p = make(lo=1020, hi=1030)
    high = [p.allocate(TCP, H1, 40000 + i) for i in range(6)]
    assert all(a.ok and a.port >= 1024 for a in high)
    assert p.allocate(TCP, H1, 40000).status == AllocStatus.PORTS_EXHAUSTED  # never a well-known port
    low = p.allocate(TCP, H1, 22)
    assert low.ok and 1020 <= low.port < 1024 and low.port % 2 == 0  # class and parity kept
    lows = [p.allocate(TCP, H1, 22).port for _ in range(3)]
    assert all(1020 <= x < 1024 for x in lows)
    assert p.allocate(TCP, H1, 22).status == AllocStatus.PORTS_EXHAUSTED


def test_low_source_port_falls_back_when_block_has_no_well_known_ports() -> None:
    p = make(lo=1024, hi=1100)
    a = p.allocate(TCP, H1, 22)
    assert a.ok and a.port >= 1024 and a.port % 2 == 0
    i = p.allocate(ICMP, H1, 7)  # identifiers: any free id, no class/parity
    assert i.ok and i.port == 1024 and space_of(ICMP) != space_of(TCP)


def test_reuse_hold() -> None:
    clock = ManualClock(1000)
    p = make(clock, lo=2000, hi=2002)
    a = p.allocate(UDP, H1, 2000)
    b = p.allocate(UDP, H1, 2001)
    assert a.ok and b.ok
    assert p.release(UDP, a.addr, a.port, H1)
    assert p.port_state(UDP, a.addr, a.port) == "held" and p.held(UDP) == 1
    clock.advance(119)
    c = p.allocate(UDP, H1, 2000)
    assert c.status == AllocStatus.PORTS_EXHAUSTED  # the only other port is in use, 2000 is held
    clock.advance(1)
    assert p.port_state(UDP, a.addr, a.port) == "free" and p.held() == 0
    c = p.allocate(UDP, H1, 2000)
    assert c.ok and c.port == 2000 and c.preserved


def test_hold_across_clock_wrap_and_zero_hold() -> None:
    clock = ManualClock(0xFFFFFFFF - 50)
    p = make(clock, lo=2000, hi=2001)
    a = p.allocate(UDP, H1, 2000)
    p.release(UDP, a.addr, a.port, H1)
    clock.advance(100)  # wrapped past 0
    assert p.port_state(UDP, a.addr, 2000) == "held"
    clock.advance(20)
    assert p.port_state(UDP, a.addr, 2000) == "free"
    q = make(ManualClock(), lo=2000, hi=2001, hold=0)
    a = q.allocate(UDP, H1, 2000)
    q.release(UDP, a.addr, a.port, H1)
    assert q.allocate(UDP, H1, 2000).preserved


def test_paired_pooling_strict_for_known_host() -> None:
    p = make(lo=2000, hi=2002)
    a = p.allocate(UDP, H1, 2000)
    p.allocate(UDP, H1, 2000)
    # H1's address is full in udp; it is not moved to another address
    assert p.allocate(UDP, H1, 2000).status == AllocStatus.PORTS_EXHAUSTED
    assert p.allocate(TCP, H1, 2000).addr == a.addr
    # a new host whose preferred address is full probes on
    other = next(h for h in range(0x64400100, 0x64410000) if p.preferred_address(h) == a.addr)
    n = p.allocate(UDP, other, 2000)
    assert n.ok and n.addr != a.addr and p.address_of(other) == n.addr
    # once H1 holds no ports any more, its pairing ends
    for port in (2000, 2001):
        assert p.release(UDP, a.addr, port, H1)
    assert p.release(TCP, a.addr, 2000, H1)
    assert p.address_of(H1) is None and p.ports_of(H1) == 0
    p.check_consistency()


def test_quota_and_host_table_full() -> None:
    p = make(port_quota=2, host_capacity=2)
    assert p.allocate(UDP, H1, 1).ok and p.allocate(TCP, H1, 1).ok
    assert p.allocate(ICMP, H1, 1).status == AllocStatus.HOST_PORT_QUOTA
    assert p.allocate(UDP, H2, 1).ok
    assert p.allocate(UDP, H3, 1).status == AllocStatus.HOST_TABLE_FULL
    assert p.failed_total == 2 and p.allocated_total == 3


def test_release_mismatches_change_nothing() -> None:
    p = make()
    a = p.allocate(UDP, H1, 2500)
    assert not p.release(UDP, a.addr, a.port, H2)   # wrong host
    assert not p.release(TCP, a.addr, a.port, H1)   # wrong space
    assert not p.release(UDP, a.addr, 9999, H1)     # not this block
    assert not p.release(UDP, 0x01020304, a.port, H1)  # not the pool
    assert p.release(UDP, a.addr, a.port, H1)
    assert not p.release(UDP, a.addr, a.port, H1)   # double release
    p.check_consistency()


def test_reserve_and_static_forwards() -> None:
    p = make()
    assert p.reserve(TCP, POOL[0], 2222)
    assert not p.reserve(TCP, POOL[0], 80)  # not in this block
    with pytest.raises(PoolError):
        p.reserve(TCP, POOL[0], 2222)
    assert p.port_state(TCP, POOL[0], 2222) == "in_use"
    h = next(h for h in range(0x64400100, 0x64410000) if p.preferred_address(h) == POOL[0])
    a = p.allocate(TCP, h, 2222)
    assert a.addr == POOL[0] and a.port != 2222
    assert p.unreserve(TCP, POOL[0], 2222) and p.port_state(TCP, POOL[0], 2222) == "held"

    cfg = parse_config("""
[gateway]
inside_port = "ring:in"
outside_port = "ring:out"
inside_address = "100.64.0.1/24"
outside_address = "198.18.0.1/24"
[nat]
pool = ["198.18.1.0/30"]
workers = 2
per_host_ports = 9
[[nat.static]]
proto = "udp"
inside = "100.64.0.9:53"
outside = "198.18.1.2:40000"
""")
    w0 = PortAllocator.for_worker(cfg, 0, ManualClock())
    w1 = PortAllocator.for_worker(cfg, 1, ManualClock())
    assert (w0.port_lo, w0.port_hi) == cfg.nat.worker_port_range(0)
    assert w0.port_quota == 5 and w0.hold == 120
    assert w0.in_use() == 0 and w1.in_use(UDP) == 1
    assert w1.port_state(UDP, 0xC6120102, 40000) == "in_use"


def test_default_config_worker_allocator_and_buffer_roundtrip() -> None:
    clock = ManualClock()
    p = PortAllocator.for_worker(default_config(), 1, clock, host_capacity=64)
    a = p.allocate(TCP, H1, 40000)
    assert a.preserved and a.port == 40000  # 40000 lies in worker 1's block
    assert p.allocate(TCP, H1, 2000).port >= p.port_lo  # 2000 is worker 0's: not preserved here
    arr = p.to_array()
    q = PortAllocator.from_array(arr, clock)
    assert q.address_of(H1) == a.addr and q.in_use() == 2
    assert q.allocate(UDP, H2, 40001) == p.allocate(UDP, H2, 40001)  # the copy continues identically
    q.check_consistency()


def test_shared_buffer_create_attach() -> None:
    n = PortAllocator.zone_size(len(POOL), 1000, 16)
    mm = mmap.mmap(-1, n)
    try:
        buf = np.frombuffer(mm, dtype=np.uint8)
        clock = ManualClock()
        p = PortAllocator.create(buf, POOL, 2000, 3000, clock, host_capacity=16)
        a = p.allocate(UDP, H1, 2100)
        other = PortAllocator.attach(buf, clock)
        assert other.port_state(UDP, a.addr, 2100) == "in_use" and other.address_of(H1) == a.addr
        del p, other, buf
    finally:
        mm.close()


def test_bad_buffers_and_arguments() -> None:
    with pytest.raises(PoolError, match="bad magic"):
        PortAllocator.attach(aligned_buffer(4096), ManualClock())
    with pytest.raises(PoolError, match="needs"):
        PortAllocator.create(aligned_buffer(128), POOL, 2000, 3000, ManualClock())
    with pytest.raises(PoolError, match="aligned"):
        PortAllocator.create(aligned_buffer(10 ** 6 + 64)[1:], POOL, 2000, 3000, ManualClock())
    with pytest.raises(PoolError, match="twice"):
        make_pool = [POOL[0], POOL[0]]
        PortAllocator.new(make_pool, 2000, 3000, ManualClock())
    with pytest.raises(PoolError, match="port block"):
        PortAllocator.new(POOL, 3000, 2000, ManualClock())
    with pytest.raises(PoolError, match="no port space"):
        make().allocate(47, H1, 0)


# --------------------------------------------------------------------------- model-based property test

LO, HI = 1018, 1030  # straddles 1024, so class rules are exercised; 12 ports, quickly exhausted
HOSTS = [0x64400000 + i for i in range(1, 7)]
HOLD = 120
QUOTA = 5

ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.sampled_from([TCP, UDP, ICMP]), st.sampled_from(HOSTS),
              st.sampled_from([0, 7, 22, 1019, 1020, 1021, 1024, 1025, 1029, 1030, 5000, 5001])),
    st.tuples(st.just("release"), st.integers(0, 1000)),
    st.tuples(st.just("advance"), st.sampled_from([0, 1, 30, 119, 120, 200])),
), max_size=120)


def eligible(proto: int, sport: int, port: int) -> bool:
    """The ports the allocator may give ``sport`` under the class rule."""
    return proto == ICMP or sport < 1024 or port >= 1024


def run(seq: list, p: PortAllocator, clock: ManualClock, check: bool) -> list:
    pool = [int(a) for a in p.addrs]
    in_use: dict[tuple[int, int, int], int] = {}  # (proto, addr, port) -> host
    held: dict[tuple[int, int, int], int] = {}    # -> release time
    pair: dict[int, int] = {}
    live: list[tuple[int, int, int, int]] = []
    results = []

    def available(proto: int, addr: int, port: int) -> bool:
        k = (proto, addr, port)
        return k not in in_use and (k not in held or clock.now() >= held[k])

    for op in seq:
        if op[0] == "advance":
            clock.advance(op[1])
            continue
        if op[0] == "release":
            if not live:
                continue
            proto, addr, port, host = live.pop(op[1] % len(live))
            assert p.release(proto, addr, port, host)
            del in_use[(proto, addr, port)]
            held[(proto, addr, port)] = clock.now() + HOLD
            if not any(h == host for h in in_use.values()):
                del pair[host]
            results.append(("released", proto, addr, port))
            continue
        _, proto, host, sport = op
        a = p.allocate(proto, host, sport)
        results.append(tuple(a))
        if not check:
            if a.ok:
                live.append((proto, a.addr, a.port, host))
                in_use[(proto, a.addr, a.port)] = host
                pair[host] = a.addr
            continue
        nports = sum(1 for h in in_use.values() if h == host)
        if a.ok:
            k = (proto, a.addr, a.port)
            assert LO <= a.port < HI and a.addr in pool
            assert available(proto, a.addr, a.port), "handed out a port in use or still held"
            assert eligible(proto, sport, a.port), "port class broken"
            assert nports < QUOTA
            if host in pair:
                assert a.addr == pair[host], "paired pooling broken"
            if LO <= sport < HI and available(proto, a.addr, sport):
                assert a.port == sport and a.preserved, "free inside port not preserved"
            else:
                assert not a.preserved
            in_use[k] = host
            held.pop(k, None)
            pair[host] = a.addr
            live.append((proto, a.addr, a.port, host))
        elif a.status == AllocStatus.HOST_PORT_QUOTA:
            assert nports >= QUOTA
        elif a.status == AllocStatus.PORTS_EXHAUSTED:
            addrs = [pair[host]] if host in pair else pool
            assert not any(available(proto, ad, port) and eligible(proto, sport, port)
                           for ad in addrs for port in range(LO, HI)), "refused although a port was free"
        else:
            pytest.fail(f"unexpected status {a.status}")
        assert p.ports_of(host) == sum(1 for h in in_use.values() if h == host)
        assert p.address_of(host) == pair.get(host)
    if check:
        p.check_consistency()
        assert p.in_use() == len(in_use)
    return results


@settings(max_examples=150, deadline=None)
@given(ops)
def test_allocator_against_model(seq: list) -> None:
    clock = ManualClock(5)
    p = PortAllocator.new(POOL[:2], LO, HI, clock, hold=HOLD, port_quota=QUOTA, host_capacity=len(HOSTS))
    run(seq, p, clock, check=True)


@settings(max_examples=60, deadline=None)
@given(ops, st.integers(0, 120))
def test_deterministic_and_state_survives_copy(seq: list, cut: int) -> None:
    def fresh() -> tuple[PortAllocator, ManualClock]:
        c = ManualClock(5)
        return PortAllocator.new(POOL[:2], LO, HI, c, hold=HOLD, port_quota=QUOTA, host_capacity=len(HOSTS)), c

    p1, c1 = fresh()
    r1 = run(seq, p1, c1, check=False)
    p2, c2 = fresh()
    r2 = run(seq, p2, c2, check=False)
    assert r1 == r2
    # Stop part-way, copy the state out and back in: the copy continues exactly like the original.
    p3, c3 = fresh()
    head = run(seq[:cut], p3, c3, check=False)
    assert head == r1[: len(head)]
    c4 = ManualClock(c3.now())
    p4 = PortAllocator.from_array(p3.to_array(), c4)
    assert run(seq[cut:], p3, c3, check=False) == run(seq[cut:], p4, c4, check=False)
    p3.check_consistency()
    p4.check_consistency()
