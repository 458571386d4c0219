"""DIR-24-8 longest-prefix match against a brute-force reference; overlapping adds/deletes; group folding."""

from __future__ import annotations

import mmap
import random
from ipaddress import IPv4Address

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared.nat_config import parse_config
from hotplane.shared.nat_lpm import MISS, Lpm, LpmError, LpmFull, NextHop, routes_from_config


def ip(s: str) -> int:
    return int(IPv4Address(s))


def mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


def brute(rules: dict[tuple[int, int], int], addr: int) -> int:
    best, best_len = MISS, -1
    for (p, l), nh in rules.items():
        if addr & mask(l) == p and l > best_len:
            best, best_len = nh, l
    return best


_SHARED: Lpm | None = None


def shared_table() -> Lpm:
    """One table reused by the property tests (they leave it empty again), to avoid 48 MiB per example."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Lpm(tbl8_groups=64)
    return _SHARED


def assert_pristine(t: Lpm) -> None:
    assert t.groups_used == 0 and not t.rules()
    # tbl24 is 16 Mi entries: compare it as uint64 words to keep the check cheap
    assert (t.tbl24.view(np.uint64) == 0x7FFF7FFF7FFF7FFF).all() and not t.depth24.view(np.uint64).any()
    assert (t.tbl8 == MISS).all() and not t.depth8.any()


def test_basic_overlaps() -> None:
    t = Lpm(tbl8_groups=4)
    t.add(0, 0, 1)
    t.add(ip("10.0.0.0"), 8, 2)
    t.add(ip("10.0.1.0"), 24, 3)
    t.add(ip("10.0.1.128"), 25, 4)
    t.add(ip("10.0.1.129"), 32, 5)
    q = ["11.0.0.0", "10.0.0.1", "10.0.1.1", "10.0.1.129", "10.0.1.130", "10.0.1.255", "10.255.255.255"]
    want = [1, 2, 3, 5, 4, 4, 2]
    assert t.lookup_batch(np.array([ip(a) for a in q], np.uint32)).tolist() == want
    assert [t.lookup(ip(a)) for a in q] == want
    assert t.groups_used == 1
    t.add(ip("10.0.1.128"), 25, 9)  # replace a route's next hop
    assert t.lookup(ip("10.0.1.130")) == 9
    t.add(ip("10.0.0.0"), 16, 7)  # a shorter prefix added later does not override longer ones
    assert t.lookup(ip("10.0.1.130")) == 9 and t.lookup(ip("10.0.1.1")) == 3 and t.lookup(ip("10.0.2.1")) == 7
    assert t.delete(ip("10.0.1.129"), 32) and t.lookup(ip("10.0.1.129")) == 9
    assert t.delete(ip("10.0.1.128"), 25)
    assert t.groups_used == 0 and t.lookup(ip("10.0.1.200")) == 3  # folded back into tbl24
    assert not t.delete(ip("10.0.1.128"), 25)
    assert t.delete(ip("10.0.1.0"), 24) and t.lookup(ip("10.0.1.1")) == 7
    assert t.delete(0, 0) and t.lookup(ip("11.0.0.0")) == MISS
    assert t.generation == 11


def test_errors_and_full_table() -> None:
    t = Lpm(tbl8_groups=2)
    with pytest.raises(LpmError, match="host bits"):
        t.add(ip("10.0.0.1"), 8, 1)
    with pytest.raises(LpmError, match="0..32"):
        t.add(0, 33, 1)
    with pytest.raises(LpmError, match="next hop"):
        t.add(0, 0, MISS)
    t.add(ip("10.0.0.0"), 25, 1)
    t.add(ip("10.0.1.0"), 25, 2)
    t.add(ip("10.0.1.128"), 25, 3)  # same /24 as the previous one: no new group
    with pytest.raises(LpmFull):
        t.add(ip("10.0.2.0"), 26, 4)
    assert t.lookup(ip("10.0.2.1")) == MISS and (ip("10.0.2.0"), 26) not in t.rules()
    with pytest.raises(LpmError):
        Lpm(tbl8_groups=0)


def test_shared_buffer_attach_for_lookups() -> None:
    n = Lpm.zone_size(4)
    mm = mmap.mmap(-1, n)
    try:
        buf = np.frombuffer(mm, dtype=np.uint8)
        writer = Lpm.create(buf, 4)
        writer.add(ip("198.18.0.0"), 15, 3)
        writer.add(ip("198.18.0.7"), 32, 4)
        reader = Lpm.attach(buf)
        got = reader.lookup_batch(np.array([ip("198.19.1.1"), ip("198.18.0.7"), 5], np.uint32))
        assert got.tolist() == [3, 4, MISS]
        writer.delete(ip("198.18.0.7"), 32)
        assert reader.lookup(ip("198.18.0.7")) == 3  # the reader sees the writer's change
        with pytest.raises(LpmError, match="attached"):
            reader.add(0, 0, 1)
        with pytest.raises(LpmError):
            Lpm.attach(_zero_aligned(n))  # no table in it
        del writer, reader, buf
    finally:
        mm.close()


def _zero_aligned(n: int) -> np.ndarray:
    raw = np.zeros(n + 64, np.uint8)
    s = (-raw.ctypes.data) % 64
    return raw[s:s + n]


def test_routes_from_config() -> None:
    cfg = parse_config("""
[gateway]
inside_port = "ring:in"
outside_port = "ring:out"
inside_address = "100.64.0.1/24"
outside_address = "198.18.0.1/24"
[nat]
pool = ["198.18.1.0/28"]
[[routes]]
prefix = "0.0.0.0/0"
via = "198.18.0.254"
port = "outside"
[[routes]]
prefix = "10.0.0.0/8"
via = "100.64.0.254"
port = "inside"
""")
    lpm, hops = routes_from_config(cfg, tbl8_groups=1)
    got = lpm.lookup_batch(np.array([ip("100.64.0.9"), ip("198.18.0.9"), ip("8.8.8.8"), ip("10.1.2.3")], np.uint32))
    assert [hops[int(i)] for i in got] == [NextHop("inside"), NextHop("outside"),
                                          NextHop("outside", ip("198.18.0.254")), NextHop("inside", ip("100.64.0.254"))]
    assert len(hops) == 4


LENGTHS = [0, 1, 7, 8, 15, 16, 20, 22, 23, 24, 25, 26, 27, 28, 30, 31, 32]
BASES = [ip("10.0.0.0"), ip("10.0.1.0"), ip("10.0.1.128"), ip("192.168.0.0"), ip("255.255.255.0"), 0]


@st.composite
def rule_sets(draw) -> list[tuple[int, int, int]]:
    rules = draw(st.lists(st.tuples(st.sampled_from(BASES), st.integers(0, 0x3FF), st.sampled_from(LENGTHS),
                                    st.integers(0, 50)), max_size=25))
    out = []
    for base, jitter, plen, nh in rules:
        addr = (base + jitter * 4) & 0xFFFFFFFF
        out.append((addr & mask(plen), plen, nh))
    return out


def probe_addresses(rules: list[tuple[int, int, int]], rng: random.Random) -> np.ndarray:
    addrs = [0, 0xFFFFFFFF] + [rng.getrandbits(32) for _ in range(50)]
    for p, l, _ in rules:
        last = p | (~mask(l) & 0xFFFFFFFF)
        addrs += [p, last, (p + last) // 2, (p - 1) & 0xFFFFFFFF, (last + 1) & 0xFFFFFFFF,
                  p | rng.getrandbits(32 - l) if l < 32 else p]
    return np.array(addrs, dtype=np.uint32)


@settings(max_examples=100, deadline=None)
@given(rule_sets(), st.randoms(use_true_random=False))
def test_against_brute_force(rules: list, rng: random.Random) -> None:
    t = shared_table()
    assert t.groups_used == 0 and not t.rules()
    model: dict[tuple[int, int], int] = {}
    try:
        for p, l, nh in rules:
            t.add(p, l, nh)
            model[(p, l)] = nh
        addrs = probe_addresses(rules, rng)
        got = t.lookup_batch(addrs)
        assert got.tolist() == [brute(model, int(a)) for a in addrs]
        assert t.rules() == model
        # delete in a random order, checking as we go
        keys = list(model)
        rng.shuffle(keys)
        for i, k in enumerate(keys):
            assert t.delete(*k)
            del model[k]
            if i % 3 == 0 or i == len(keys) - 1:
                got = t.lookup_batch(addrs)
                assert got.tolist() == [brute(model, int(a)) for a in addrs]
    finally:
        for k in list(t.rules()):
            t.delete(*k)
    assert_pristine(t)  # no leaked groups, no stale entries
