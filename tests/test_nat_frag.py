"""Virtual reassembly: any arrival order gives the same translations; overlaps, floods and timeouts are bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared.nat_clock import ManualClock
from hotplane.shared.nat_config import FragmentLimits
from hotplane.shared.nat_frag import FragAction, FragmentTracker, Verdict

S, D, UDP = 0x64400002, 0xC6120001, 17
PORTS = (5000, 53)


def frag(t: FragmentTracker, name: str, offset: int, length: int, more: bool, ip_id: int = 1,
         ports=PORTS, nbytes: int | None = None) -> list[FragAction]:
    return t.submit(name, S, D, UDP, ip_id, offset, more, length, ports if offset == 0 else None, nbytes)


def verdicts(actions: list[FragAction]) -> list[tuple]:
    return [(a.verdict, a.packet, a.ports if a.verdict == Verdict.TRANSLATE else a.reason) for a in actions]


def test_in_order_passes_through() -> None:
    t = FragmentTracker(ManualClock())
    assert verdicts(frag(t, "a", 0, 16, True)) == [(Verdict.TRANSLATE, "a", PORTS)]
    assert verdicts(frag(t, "b", 16, 16, True)) == [(Verdict.TRANSLATE, "b", PORTS)]
    assert len(t) == 1
    assert verdicts(frag(t, "c", 32, 5, False)) == [(Verdict.TRANSLATE, "c", PORTS)]
    assert len(t) == 0 and t.counters["completed"] == 1  # all bytes seen: forgotten at once


def test_out_of_order_held_then_released() -> None:
    t = FragmentTracker(ManualClock())
    assert verdicts(frag(t, "c", 32, 5, False)) == [(Verdict.HOLD, "c", None)]
    assert verdicts(frag(t, "b", 16, 16, True)) == [(Verdict.HOLD, "b", None)]
    assert t.held_bytes == 21 and t.held_fragments == 2
    assert verdicts(frag(t, "a", 0, 16, True)) == [(Verdict.TRANSLATE, "a", PORTS), (Verdict.TRANSLATE, "c", PORTS),
                                                   (Verdict.TRANSLATE, "b", PORTS)]
    assert t.held_bytes == 0 and len(t) == 0 and t.counters["released"] == 2


def test_not_a_fragment() -> None:
    t = FragmentTracker(ManualClock())
    assert verdicts(frag(t, "x", 0, 100, False)) == [(Verdict.TRANSLATE, "x", PORTS)]
    assert len(t) == 0


@pytest.mark.parametrize("offset,length,more", [(0, 0, True), (4, 8, True), (0, 12, True), (65512, 16, False),
                                                (-8, 8, True)])
def test_malformed(offset: int, length: int, more: bool) -> None:
    t = FragmentTracker(ManualClock())
    assert verdicts(frag(t, "m", offset, length, more)) == [(Verdict.DROP, "m", "malformed")]
    assert len(t) == 0


def test_overlap_poisons_the_datagram() -> None:
    t = FragmentTracker(ManualClock())
    frag(t, "b", 16, 16, True)
    acts = frag(t, "evil", 24, 16, True)  # overlaps b
    assert verdicts(acts) == [(Verdict.DROP, "b", "overlap"), (Verdict.DROP, "evil", "overlap")]
    assert verdicts(frag(t, "a", 0, 16, True)) == [(Verdict.DROP, "a", "overlap")]  # everything after: dropped
    assert t.held_bytes == 0


def test_rfc1858_header_overwrite_attack() -> None:
    t = FragmentTracker(ManualClock())
    frag(t, "a", 0, 24, True)
    # a later fragment at offset 8 that would rewrite part of the first (ports/flags) is an overlap
    assert verdicts(frag(t, "evil", 8, 16, True))[-1] == (Verdict.DROP, "evil", "overlap")


def test_duplicate_and_conflicting_last() -> None:
    t = FragmentTracker(ManualClock())
    frag(t, "b", 16, 16, True)
    assert verdicts(frag(t, "b2", 16, 16, True)) == [(Verdict.DROP, "b2", "duplicate")]
    frag(t, "c", 32, 8, False)
    acts = frag(t, "c2", 40, 8, False)  # a second, different end
    assert (Verdict.DROP, "c2", "overlap") in verdicts(acts)
    t2 = FragmentTracker(ManualClock())
    frag(t2, "c", 32, 8, False)
    assert verdicts(frag(t2, "x", 40, 8, True))[-1] == (Verdict.DROP, "x", "overlap")  # beyond the end


def test_tiny_first_fragment() -> None:
    t = FragmentTracker(ManualClock())
    frag(t, "b", 8, 8, True)
    acts = frag(t, "a", 0, 8, True, ports=None)
    assert verdicts(acts) == [(Verdict.DROP, "b", "tiny_first"), (Verdict.DROP, "a", "tiny_first")]
    assert verdicts(frag(t, "c", 16, 8, False)) == [(Verdict.DROP, "c", "tiny_first")]


def test_timeout_drops_held() -> None:
    clock = ManualClock()
    t = FragmentTracker(clock, timeout=30)
    frag(t, "b", 16, 16, True)
    clock.advance(29)
    assert t.expire() == []
    clock.advance(1)
    assert verdicts(t.expire()) == [(Verdict.DROP, "b", "timeout")]
    assert len(t) == 0 and t.held_bytes == 0 and t.counters["drop_timeout"] == 1


def test_limits_datagrams_fragments_bytes() -> None:
    t = FragmentTracker(ManualClock(), max_datagrams=2, max_fragments=2, max_datagram_bytes=40, max_total_bytes=60)
    frag(t, "1b", 8, 8, True, ip_id=1)
    frag(t, "2b", 8, 8, True, ip_id=2)
    assert verdicts(frag(t, "3b", 8, 8, True, ip_id=3)) == [(Verdict.DROP, "1b", "evicted"), (Verdict.HOLD, "3b", None)]
    frag(t, "3c", 16, 8, True, ip_id=3)
    assert verdicts(frag(t, "3d", 24, 8, True, ip_id=3))[-1] == (Verdict.DROP, "3d", "too_many_fragments")
    u = FragmentTracker(ManualClock(), max_datagram_bytes=40, max_total_bytes=60)
    frag(u, "a", 8, 8, True, ip_id=1, nbytes=30)
    assert verdicts(frag(u, "b", 16, 8, True, ip_id=1, nbytes=30))[-1] == (Verdict.DROP, "b", "datagram_too_big")
    frag(u, "c", 8, 8, True, ip_id=2, nbytes=40)
    acts = frag(u, "d", 8, 8, True, ip_id=3, nbytes=30)  # over the total: the oldest holder goes
    assert verdicts(acts) == [(Verdict.DROP, "c", "evicted"), (Verdict.HOLD, "d", None)]
    assert u.held_bytes == 30


def test_from_limits_and_bad_limits() -> None:
    t = FragmentTracker.from_limits(FragmentLimits(timeout=5, max_datagrams=7), ManualClock())
    assert t.timeout == 5 and t.max_datagrams == 7
    with pytest.raises(ValueError):
        FragmentTracker(ManualClock(), max_datagram_bytes=100, max_total_bytes=50)


# --------------------------------------------------------------------------- properties

@st.composite
def datagrams(draw, ip_id: int = 1) -> list[tuple]:
    """The fragments of one datagram: (name, offset, length, more)."""
    n = draw(st.integers(2, 8))
    sizes = [8 * draw(st.integers(1, 20)) for _ in range(n - 1)] + [draw(st.integers(1, 160))]
    out, off = [], 0
    for i, size in enumerate(sizes):
        out.append(((ip_id, i), off, size, i < n - 1))
        off += size
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(datagrams(), min_size=1, max_size=1).flatmap(
    lambda ds: st.permutations(ds[0]).map(lambda p: (ds[0], p))))
def test_any_arrival_order_translates_every_fragment_once(case) -> None:
    frags, order = case
    t = FragmentTracker(ManualClock())
    actions = []
    for name, off, length, more in order:
        actions += t.submit(name, S, D, UDP, 1, off, more, length, PORTS if off == 0 else None)
    translated = [(a.packet, a.ports) for a in actions if a.verdict == Verdict.TRANSLATE]
    assert sorted(translated) == sorted((f[0], PORTS) for f in frags)
    assert not any(a.verdict == Verdict.DROP for a in actions)
    # nothing is translated before the first fragment
    first_index = next(i for i, a in enumerate(actions) if a.packet == frags[0][0])
    assert all(a.verdict == Verdict.HOLD for a in actions[:first_index])
    assert len(t) == 0 and t.held_bytes == 0 and t.held_fragments == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4, unique=True).flatmap(
    lambda ids: st.tuples(*[datagrams(ip_id=i) for i in ids])).flatmap(
    lambda ds: st.permutations([f for d in ds for f in d]).map(lambda p: (ds, p))))
def test_interleaved_datagrams(case) -> None:
    ds, order = case
    t = FragmentTracker(ManualClock())
    out = []
    for name, off, length, more in order:
        ip_id = name[0]
        ports = (1000 + ip_id, 53) if off == 0 else None
        out += t.submit(name, S, D, UDP, ip_id, off, more, length, ports)
    translated = sorted((a.packet, a.ports) for a in out if a.verdict == Verdict.TRANSLATE)
    assert translated == sorted((f[0], (1000 + f[0][0], 53)) for d in ds for f in d)
    assert len(t) == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30),            # ip id
                          st.integers(0, 12),            # offset / 8
                          st.integers(1, 6),             # length / 8
                          st.booleans(),                 # more fragments
                          st.booleans(),                 # ports known for a first fragment
                          st.integers(0, 12)),           # clock step
                max_size=200))
def test_floods_stay_bounded_and_every_fragment_is_accounted(flood: list) -> None:
    clock = ManualClock()
    limits = dict(timeout=10, max_datagrams=6, max_fragments=4, max_datagram_bytes=96, max_total_bytes=200)
    t = FragmentTracker(clock, **limits)
    final: dict[int, int] = {}
    holding: set[int] = set()
    for n, (ip_id, off8, len8, more, has_ports, step) in enumerate(flood):
        clock.advance(step % 4)
        acts = t.submit(n, S, D, UDP, ip_id, off8 * 8, more, len8 * 8, (1, 2) if has_ports else None)
        for a in acts:
            if a.verdict == Verdict.HOLD:
                holding.add(a.packet)
            else:
                holding.discard(a.packet)
                final[a.packet] = final.get(a.packet, 0) + 1
        assert len(t) <= limits["max_datagrams"]
        assert t.held_bytes <= limits["max_total_bytes"]
        for e in t._entries.values():
            assert e.held_bytes <= limits["max_datagram_bytes"] and len(e.intervals) <= limits["max_fragments"]
        assert t.held_fragments == len(holding) == sum(len(e.held) for e in t._entries.values())
    clock.advance(11)
    for a in t.expire():
        assert a.verdict == Verdict.DROP and a.reason == "timeout"
        holding.discard(a.packet)
        final[a.packet] = final.get(a.packet, 0) + 1
    assert not holding and len(t) == 0 and t.held_bytes == 0
    assert sorted(final) == list(range(len(flood))) and set(final.values()) <= {1}  # each exactly once
