"""The session index (schema id 11): hints (key -> slot) with two-choice bounded linear probing."""

from __future__ import annotations

import numpy as np
import pytest

from hotplane.schema.registry import SchemaError
from hotplane.shared.session_index import EMPTY, TOMBSTONE, SessionIndex


def _buf(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + 64, np.uint8)
    skip = (-raw.ctypes.data) % 64
    return raw[skip:skip + nbytes]


def make(cap: int = 1000, mp: int = 128) -> SessionIndex:
    return SessionIndex.create(_buf(SessionIndex.zone_size(cap, mp)), cap, seed=7, max_probe=mp, key_format=2)


def keys(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)


def test_insert_lookup_candidates_delete() -> None:
    t = make()
    ka, kb = keys(600)
    slots = np.arange(600) * 3 + 1
    assert t.insert_batch(ka, kb, slots).all()
    assert t.count == 600 and t.audit() == []
    assert (t.lookup(ka, kb) == slots).all()
    other_a, other_b = keys(200, seed=1)
    assert (t.lookup(other_a, other_b) == -1).all()  # 32-bit fingerprints: no false hit here
    assert t.candidates(int(ka[5]), int(kb[5])) == [int(slots[5])]
    # A second hint for one key coexists; both are candidates.
    assert t.insert_batch(ka[:1], kb[:1], np.array([99])).all()
    assert sorted(t.candidates(int(ka[0]), int(kb[0]))) == sorted([int(slots[0]), 99])
    assert t.delete(int(ka[0]), int(kb[0]), 99) and not t.delete(int(ka[0]), int(kb[0]), 99)
    for j in range(0, 600, 2):
        assert t.delete(int(ka[j]), int(kb[j]), int(slots[j]))
    assert t.count == 300 and t.audit() == []
    got = t.lookup(ka, kb)
    assert (got[1::2] == slots[1::2]).all() and (got[0::2] == -1).all()


def test_repoint_is_one_store() -> None:
    t = make()
    ka, kb = keys(10)
    t.insert_batch(ka, kb, np.arange(10))
    assert t.repoint(int(ka[3]), int(kb[3]), 3, 77)
    assert t.lookup(ka, kb)[3] == 77 and not t.repoint(int(ka[3]), int(kb[3]), 3, 5)
    assert t.count == 10


def test_tombstones_trimmed_and_reused() -> None:
    t = make(cap=64, mp=16)
    ka, kb = keys(50)
    assert t.insert_batch(ka, kb, np.arange(50)).all()
    for j in range(50):
        t.delete(int(ka[j]), int(kb[j]), j)
    # Every tombstone ends up followed by EMPTY somewhere: all trimmed back to EMPTY.
    assert t.count == 0 and t.tombstones == int(np.count_nonzero(t.entries == TOMBSTONE))
    assert t.audit() == []
    assert t.insert_batch(ka, kb, np.arange(50)).all() and (t.lookup(ka, kb) == np.arange(50)).all()
    assert int(np.count_nonzero(t.entries != EMPTY)) == 50 + t.tombstones


def test_high_load_and_chain_invariant_under_churn() -> None:
    cap = 20000
    t = make(cap=cap)
    ka, kb = keys(int(cap * 0.9))
    ok = t.insert_batch(ka, kb, np.arange(ka.size))
    assert ok.sum() >= ka.size - 2  # ~0 refusals at load 0.9 with max_probe 128
    rng = np.random.default_rng(3)
    live = np.flatnonzero(ok)
    for _ in range(3):  # churn: delete a third, insert as many new keys
        gone = rng.choice(live, live.size // 3, replace=False)
        for j in gone.tolist():
            assert t.delete(int(ka[j]), int(kb[j]), j)
        live = np.setdiff1d(live, gone)
        na, nb = keys(gone.size, seed=int(rng.integers(1 << 30)))
        ka[gone], kb[gone] = na, nb
        ok2 = t.insert_batch(na, nb, gone)
        live = np.union1d(live, gone[ok2])
    assert (t.lookup(ka[live], kb[live]) == live).all()
    assert t.audit() == []


def test_reader_attach_wseq_and_schema() -> None:
    buf = _buf(SessionIndex.zone_size(100))
    w = SessionIndex.create(buf, 100, seed=1, key_format=2)
    ka, kb = keys(20)
    w.insert_batch(ka, kb, np.arange(20))
    r = SessionIndex.attach(buf)
    assert (r.lookup(ka, kb) == np.arange(20)).all() and r.key_format == 2
    with pytest.raises(PermissionError):
        r.insert_batch(ka, kb, np.arange(20))
    assert not r.needs_rebuild
    w.begin()
    assert SessionIndex.attach(buf).needs_rebuild  # a writer dying now leaves wseq odd
    w.end()
    assert not SessionIndex.attach(buf).needs_rebuild
    buf[0:4] = 0  # schema id
    with pytest.raises(SchemaError):
        SessionIndex.attach(buf)


def test_any_capacity_no_wrap() -> None:
    t = make(cap=1001, mp=32)  # not a power of two: homes by multiply-shift, tail of max_probe entries
    ka, kb = keys(700)
    ok = t.insert_batch(ka, kb, np.arange(700))
    assert ok.all() and t.entries.shape[0] == 1001 + 32
    assert (t.lookup(ka, kb) == np.arange(700)).all()
    assert t.entries[1001:].any()  # windows run into the tail instead of wrapping
