"""The 8-byte compare-and-swap: semantics, alignment, and atomicity between processes."""

from __future__ import annotations

import mmap
import multiprocessing as mp

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hotplane.shared.atomic import AtomicWord, compare_exchange

pytestmark = pytest.mark.timeout(60)

u64 = st.integers(0, 2**64 - 1)


@given(u64, u64, u64)
def test_cas_stores_only_when_the_word_holds_the_expected_value(start, expected, desired):
    a = np.zeros(2, np.uint64)
    a[1] = start
    w = AtomicWord(a, 1)
    prev = w.compare_exchange(expected, desired)
    assert prev == start
    assert int(a[1]) == (desired if start == expected else start)
    assert int(a[0]) == 0, "the neighbouring word is untouched"


def test_cas_bool_and_load():
    a = np.zeros(1, np.uint64)
    w = AtomicWord(a, 0)
    assert w.cas(0, 2**63 + 5) and w.load() == 2**63 + 5
    assert not w.cas(0, 1) and w.load() == 2**63 + 5


def test_wrong_arrays_are_refused():
    with pytest.raises(ValueError, match="uint64"):
        AtomicWord(np.zeros(24, np.uint8), 0)
    with pytest.raises(IndexError):
        AtomicWord(np.zeros(2, np.uint64), 2)
    ro = np.zeros(2, np.uint64)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        AtomicWord(ro, 0)
    # A word view starting 4 bytes into an array: numpy allows it, a locked CAS on it could split a line.
    raw = np.zeros(32, np.uint8)
    start = (-raw.ctypes.data) % 8 + 4
    skew = raw[start : start + 16].view(np.uint64)
    with pytest.raises(ValueError, match="aligned"):
        AtomicWord(skew, 0)


def _hammer(buf: mmap.mmap, n: int, use_cas: bool, start: mp.Event) -> None:
    a = np.frombuffer(buf, np.uint64)
    addr = a.ctypes.data
    start.wait(10)
    for _ in range(n):
        if use_cas:
            while True:
                old = int(a[0])
                if compare_exchange(addr, old, old + 1) == old:
                    break
        else:
            a[0] = int(a[0]) + 1  # a plain read-modify-write: loses updates under contention


def _run(use_cas: bool, n: int = 20000) -> int:
    buf = mmap.mmap(-1, 4096)
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_hammer, args=(buf, n, use_cas, start)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(50)
        assert p.exitcode == 0
    return int(np.frombuffer(buf, np.uint64)[0])


def test_two_processes_never_lose_an_increment_through_cas():
    assert _run(True) == 40000


def test_the_contention_test_can_fail():
    """Without the CAS the same two processes lose increments: the test above measures something.

    (Lost updates need the two processes to overlap; with two cores and 20000 rounds each
    they always did here, but a single-core machine might serialise them: then this is skipped.)
    """
    got = _run(False)
    if got == 40000:
        pytest.skip("the two processes never overlapped on this machine")
    assert got < 40000
