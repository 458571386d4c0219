"""Incremental expiry: bounded slices, exact timeouts per protocol/TCP state, full coverage with bounded lag."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared import nat_tcp
from hotplane.shared.nat_config import Timeouts
from hotplane.shared.nat_expiry import ExpirySweeper, expired_mask, timeout_table

T = Timeouts()
SESSION = np.dtype([("state", "u1"), ("protocol", "u1"), ("tcp_state", "u1"), ("last_seen", "<u4")])


def table_of(n: int) -> np.ndarray:
    return np.zeros(n, dtype=SESSION)


def poll(sw: ExpirySweeper, tbl: np.ndarray, now: int) -> np.ndarray:
    return sw.poll(now, tbl["last_seen"], tbl["protocol"], tbl["tcp_state"], tbl["state"])


def test_timeout_table() -> None:
    tt = timeout_table(T)
    assert tt[17, 0] == 300 and tt[1, 0] == 60 and tt[47, 3] == 300
    assert tt[6, nat_tcp.ESTABLISHED] == 7440 and tt[6, nat_tcp.OUT_FIN_RCV] == 7440
    for s in (nat_tcp.IN_INIT, nat_tcp.OUT_INIT, nat_tcp.BOTH_FIN_RCV, nat_tcp.TRANS, 200):
        assert tt[6, s] == 240
    assert not tt.flags.writeable


@pytest.mark.parametrize("proto,tcp_state,timeout", [
    (17, 0, 300), (1, 0, 60), (6, nat_tcp.ESTABLISHED, 7440), (6, nat_tcp.TRANS, 240), (6, nat_tcp.IN_INIT, 240),
])
def test_exact_timeout_boundaries(proto: int, tcp_state: int, timeout: int) -> None:
    tbl = table_of(1)
    tbl[0] = (1, proto, tcp_state, 1000)
    sw = ExpirySweeper(1, 1, T)
    assert len(poll(sw, tbl, 1000 + timeout)) == 0          # idle exactly the timeout: kept
    assert poll(sw, tbl, 1000 + timeout + 1).tolist() == [0]
    tbl["state"] = 2                                          # tombstones / empty slots are never reported
    assert len(poll(sw, tbl, 1000 + 10 * timeout)) == 0


def test_wraparound_and_future_last_seen() -> None:
    tbl = table_of(3)
    tbl[0] = (1, 17, 0, 0xFFFFFF00)   # last seen just before the clock wrapped
    tbl[1] = (1, 17, 0, 50)           # "in the future" relative to now: never expired
    tbl[2] = (1, 17, 0, 0xFFFFFFF0)
    sw = ExpirySweeper(3, 3, T)
    now = 0xFFFFFF00 + 301 - (1 << 32)  # 45 after the wrap
    assert poll(sw, tbl, now).tolist() == [0]


def test_slice_bounds_and_wrapping_cursor() -> None:
    n = 10
    tbl = table_of(n)
    tbl["state"] = 1
    tbl["protocol"] = 17
    sw = ExpirySweeper(n, 4, T, cursor=8)
    assert sw.polls_per_round() == 3 and sw.worst_case_lag(0.001) == pytest.approx(0.003)
    assert poll(sw, tbl, 10_000).tolist() == [8, 9, 0, 1] and sw.cursor == 2
    assert poll(sw, tbl, 10_000).tolist() == [2, 3, 4, 5] and sw.cursor == 6
    assert sw.examined == 8 and sw.expired == 8
    big = ExpirySweeper(3, 100, T)
    assert big.slice_size == 3
    with pytest.raises(ValueError):
        poll(ExpirySweeper(5, 2, T), tbl, 1)
    with pytest.raises(ValueError):
        ExpirySweeper(0, 1, T)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 64), st.integers(0, 1000),
       st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.sampled_from([1, 6, 17, 47]), st.integers(0, 9),
                          st.integers(0, 20000)), min_size=1, max_size=300))
def test_every_expired_session_reported_within_one_round(n: int, slice_size: int, cursor: int, rows: list) -> None:
    tbl = table_of(n)
    for i in range(n):
        tbl[i] = rows[i % len(rows)]
    now = 20000
    sw = ExpirySweeper(n, slice_size, T, cursor=cursor)
    reported: list[int] = []
    for _ in range(sw.polls_per_round()):
        got = poll(sw, tbl, now)
        assert len(got) <= sw.slice_size
        reported += got.tolist()
        tbl["state"][got] = 0  # the caller deletes what was reported
    tbl["state"][reported] = 1
    tt = timeout_table(T)
    expected = [i for i in range(n) if tbl["state"][i] == 1
                and now - int(tbl["last_seen"][i]) > int(tt[tbl["protocol"][i], tbl["tcp_state"][i]])]
    assert sorted(reported) == expected  # each exactly once, nothing else
    assert np.array_equal(np.flatnonzero(expired_mask(now, tbl["last_seen"], tbl["protocol"], tbl["tcp_state"],
                                                       tbl["state"], tt)), expected)


# --------------------------------------------------------------------------- the clock the timeouts run on

def test_manual_clock() -> None:
    from hotplane.shared.nat_clock import ManualClock

    c = ManualClock(10)
    assert c.now() == 10 and c.advance(5) == 15
    with pytest.raises(ValueError):
        c.advance(-1)
    c.set(0xFFFFFFFF)
    assert c.advance(2) == 1  # wraps like the uint32 last_seen column


def test_monotonic_clock_shares_an_epoch() -> None:
    import time

    from hotplane.shared.nat_clock import Clock, MonotonicClock

    a = MonotonicClock()
    assert isinstance(a, Clock) and a.now() >= 1
    b = MonotonicClock(epoch=a.epoch)  # e.g. a restarted worker reading the epoch from shared memory
    assert abs(a.now() - b.now()) <= 1
    old = MonotonicClock(epoch=time.monotonic() - 100)
    assert 99 <= old.now() <= 101


def test_elapsed_is_signed_and_wrap_safe() -> None:
    from hotplane.shared.nat_clock import elapsed, elapsed_array

    assert elapsed(5, 3) == 2 and elapsed(3, 5) == -2 and elapsed(1, 0xFFFFFFFF) == 2
    got = elapsed_array(1, np.array([0, 2, 0xFFFFFFFF], np.uint32))
    assert got.dtype == np.int32 and got.tolist() == [1, -1, 2]
