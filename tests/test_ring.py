"""SpscRing: geometry, wrap-around, full/empty, schema refusal, a model test and a real two-process run."""

from __future__ import annotations

import collections
import contextlib
import json
import mmap
import multiprocessing as mp
from multiprocessing.connection import wait as wait_for_any
import os
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.schema import registry
from hotplane.schema.registry import SchemaError
from hotplane.schema.ring import HEAD_OFFSET, SPSC_RING, TAIL_OFFSET
from hotplane.shared.counters import CounterBlocks
from hotplane.shared.ring import RingError, SpscRing

U64 = np.dtype(np.uint64)
RECORD = np.dtype([("seq", "<u8"), ("port", "<u2"), ("flags", "u1"), ("pad", "u1"), ("len", "<u4")])


def aligned(nbytes: int) -> np.ndarray:
    """A private 64-byte-aligned uint8 buffer (single-process tests)."""
    raw = np.zeros(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + nbytes]


def make_ring(capacity: int, dt=U64) -> tuple[SpscRing, np.ndarray]:
    buf = aligned(SpscRing.zone_size(capacity, dt))
    return SpscRing.create(buf, capacity, dt), buf


@pytest.fixture
def shared_buf(request):
    """Factory of anonymous MAP_SHARED buffers, visible to forked children; unmapped at teardown."""
    maps: list[mmap.mmap] = []

    def make(nbytes: int) -> np.ndarray:
        m = mmap.mmap(-1, nbytes)
        maps.append(m)
        return np.frombuffer(m, np.uint8)

    def cleanup() -> None:
        for m in maps:
            with contextlib.suppress(BufferError):  # views still alive: the GC unmaps it later
                m.close()

    request.addfinalizer(cleanup)
    return make


@pytest.fixture
def procs(request):
    """Children started by a test; killed and reaped at teardown whatever happened."""
    started: list[mp.process.BaseProcess] = []

    def cleanup() -> None:
        for p in started:
            if p.is_alive():
                p.kill()
            p.join(5)

    request.addfinalizer(cleanup)
    return started


# ---- geometry and construction ------------------------------------------------------


def test_layout_puts_head_and_tail_on_their_own_cache_lines():
    assert SPSC_RING.schema_id == 2 and SPSC_RING.name == "spsc_ring" and SPSC_RING.version == 1
    assert registry.get(2, 1) is SPSC_RING
    assert HEAD_OFFSET // 64 != TAIL_OFFSET // 64
    hdr = SPSC_RING.header
    for name, (_, off) in hdr.fields.items():
        if name not in ("head", "tail") and not name.startswith("_pad"):
            assert off // 64 not in (HEAD_OFFSET // 64, TAIL_OFFSET // 64), name
    assert SPSC_RING.header_size % 64 == 0


def test_zone_size_and_create_attach_roundtrip():
    assert SpscRing.zone_size(8, U64) == 192 + 64
    assert SpscRing.zone_size(4, RECORD) == 192 + 64
    assert SpscRing.zone_size(1024, RECORD) == 192 + 1024 * 16
    ring, buf = make_ring(16)
    h = buf[:192].view(SPSC_RING.header)[0]
    assert int(h["capacity"]) == 16 and int(h["item_size"]) == 8 and int(h["mask"]) == 15
    other = SpscRing.attach(buf, np.uint64)
    assert other.capacity == 16 and other.item_dtype == U64
    assert ring.enqueue_burst(np.arange(5, dtype=U64)) == 5
    assert other.count() == 5 and other.free_count() == 11


@pytest.mark.parametrize("cap", [0, 3, 6, 100, -8])
def test_capacity_must_be_power_of_two(cap):
    with pytest.raises(RingError, match="power of two"):
        SpscRing.create(aligned(4096), cap, U64)


def test_bad_buffers_refused():
    need = SpscRing.zone_size(64, U64)
    with pytest.raises(ValueError, match="needs"):
        SpscRing.create(aligned(need - 8), 64, U64)
    raw = aligned(need + 64)
    with pytest.raises(ValueError, match="aligned"):
        SpscRing.create(raw[8 : 8 + need], 64, U64)
    with pytest.raises(ValueError, match="uint8"):
        SpscRing.create(np.zeros(need // 8, np.uint64), 64, U64)
    ro = aligned(need)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        SpscRing.create(ro, 64, U64)
    with pytest.raises(RingError, match="Python objects"):
        SpscRing.create(aligned(need), 64, object)


def test_attach_refuses_wrong_schema():
    with pytest.raises(SchemaError, match="never initialised"):
        SpscRing.attach(aligned(4096), U64)
    # A counters zone is a valid zone, but not a ring.
    cbuf = aligned(CounterBlocks.zone_size(2))
    CounterBlocks.create(cbuf, 2)
    with pytest.raises(SchemaError, match="expected spsc_ring"):
        SpscRing.attach(cbuf, U64)
    ring, buf = make_ring(8)
    h = buf[:192].view(SPSC_RING.header)[0]
    h["version"] = 99
    with pytest.raises(SchemaError, match="version 99"):
        SpscRing.attach(buf, U64)
    h["version"] = 1
    h["layout_hash"] = 12345
    with pytest.raises(SchemaError, match="layout hash mismatch"):
        SpscRing.attach(buf, U64)
    registry.stamp(buf[:192].view(SPSC_RING.header), SPSC_RING)
    h["capacity"] = 12
    with pytest.raises(SchemaError, match="corrupt"):
        SpscRing.attach(buf, U64)


def test_attach_refuses_item_dtype_mismatch():
    _, buf = make_ring(8, U64)
    with pytest.raises(SchemaError, match="8-byte records"):
        SpscRing.attach(buf, np.uint32)
    with pytest.raises(SchemaError, match="record dtype mismatch"):
        SpscRing.attach(buf, np.int64)  # same size, different meaning
    with pytest.raises(SchemaError, match="record dtype mismatch"):
        SpscRing.attach(buf, np.dtype([("a", "<u4"), ("b", "<u4")]))
    _, rbuf = make_ring(8, RECORD)
    swapped = np.dtype([("seq", "<u8"), ("flags", "u1"), ("port", "<u2"), ("pad", "u1"), ("len", "<u4")])
    with pytest.raises(SchemaError, match="record dtype mismatch"):
        SpscRing.attach(rbuf, swapped)
    assert SpscRing.attach(rbuf, RECORD.descr).item_dtype == RECORD  # an equal dtype spelled differently is fine


def test_burst_dtype_mismatch_refused():
    ring, _ = make_ring(8)
    with pytest.raises(RingError, match="ring carries uint64"):
        ring.enqueue_burst(np.arange(3, dtype=np.int64))
    with pytest.raises(RingError, match="ring carries uint64"):
        ring.dequeue_burst(np.empty(3, np.float64))
    assert ring.count() == 0


# ---- behaviour ----------------------------------------------------------------------


def test_empty_and_full():
    ring, _ = make_ring(8)
    out = np.zeros(8, U64)
    assert ring.dequeue_burst(out) == 0 and ring.count() == 0 and ring.free_count() == 8
    assert ring.enqueue_burst(np.arange(8, dtype=U64)) == 8
    assert ring.count() == 8 and ring.free_count() == 0
    assert ring.enqueue_burst(np.array([99], U64)) == 0
    assert ring.enqueue_burst(np.zeros(0, U64)) == 0
    assert ring.dequeue_burst(out) == 8
    assert out.tolist() == list(range(8))
    assert ring.dequeue_burst(out) == 0 and ring.count() == 0


def test_burst_larger_than_free_space_is_truncated():
    ring, _ = make_ring(16)
    assert ring.enqueue_burst(np.arange(10, dtype=U64)) == 10
    assert ring.enqueue_burst(np.arange(100, 120, dtype=U64)) == 6  # only 6 free
    out = np.full(32, 7777, U64)
    assert ring.dequeue_burst(out) == 16
    assert out[:16].tolist() == list(range(10)) + list(range(100, 106))
    assert (out[16:] == 7777).all()  # untouched beyond what was returned


def test_wrap_around_splits_the_copy():
    ring, buf = make_ring(8)
    out = np.zeros(8, U64)
    assert ring.enqueue_burst(np.arange(5, dtype=U64)) == 5
    assert ring.dequeue_burst(out[:5]) == 5
    # tail is at slot 5: 7 items go to slots 5,6,7,0,1,2,3
    assert ring.enqueue_burst(np.arange(10, 17, dtype=U64)) == 7
    slots = buf[192 : 192 + 64].view(U64)
    assert slots[5:].tolist() == [10, 11, 12] and slots[:4].tolist() == [13, 14, 15, 16]
    assert ring.dequeue_burst(out) == 7
    assert out[:7].tolist() == list(range(10, 17))
    h = buf[:192].view(SPSC_RING.header)[0]
    assert int(h["head"]) == int(h["tail"]) == 12  # free-running, not masked


def test_structured_records():
    ring, _ = make_ring(4, RECORD)
    items = np.zeros(6, RECORD)
    items["seq"] = np.arange(6)
    items["port"] = np.arange(6) * 1000
    items["len"] = 60 + np.arange(6)
    assert ring.enqueue_burst(items) == 4
    out = np.zeros(3, RECORD)
    assert ring.dequeue_burst(out) == 3
    assert ring.enqueue_burst(items[4:]) == 2  # wraps
    out2 = np.zeros(8, RECORD)
    assert ring.dequeue_burst(out2) == 3
    got = np.concatenate([out, out2[:3]])
    assert (got == items).all()


def test_free_running_counters_cross_2_pow_64():
    ring, buf = make_ring(8)
    h = buf[:192].view(SPSC_RING.header)[0]
    start = 2**64 - 3
    h["head"] = start
    h["tail"] = start
    prod, cons = SpscRing.attach(buf, U64), SpscRing.attach(buf, U64)
    out = np.zeros(8, U64)
    seq = 0
    for _ in range(5):
        assert prod.enqueue_burst(np.arange(seq, seq + 6, dtype=U64)) == 6
        assert prod.count() == 6
        assert cons.dequeue_burst(out) == 6
        assert out[:6].tolist() == list(range(seq, seq + 6))
        seq += 6
    assert int(h["tail"]) == (start + 30) % 2**64 == 27


def test_cached_cursors_are_refreshed_when_short():
    ring, buf = make_ring(8)
    prod, cons = SpscRing.attach(buf, U64), SpscRing.attach(buf, U64)
    out = np.zeros(8, U64)
    assert prod.enqueue_burst(np.arange(8, dtype=U64)) == 8
    assert prod.enqueue_burst(np.arange(1, dtype=U64)) == 0  # full: cache and shared agree
    assert cons.dequeue_burst(out[:3]) == 3
    # The producer's cached head is stale (0) but it must re-read and find 3 free slots.
    assert prod.enqueue_burst(np.arange(8, 20, dtype=U64)) == 3
    assert cons.dequeue_burst(out) == 8
    assert out.tolist() == list(range(3, 11))
    # The consumer's cached tail is stale after more enqueues.
    assert prod.enqueue_burst(np.arange(11, 13, dtype=U64)) == 2
    assert cons.dequeue_burst(out) == 2 and out[:2].tolist() == [11, 12]


def test_resync_after_role_handover():
    ring, buf = make_ring(8)
    old = SpscRing.attach(buf, U64)
    old.enqueue_burst(np.arange(3, dtype=U64))
    new = SpscRing.attach(buf, U64)  # attach reads the cursors left behind
    assert new.enqueue_burst(np.arange(3, 5, dtype=U64)) == 2
    out = np.zeros(8, U64)
    assert ring.dequeue_burst(out) == 5 and out[:5].tolist() == [0, 1, 2, 3, 4]


def test_hot_path_does_not_allocate_buffers():
    cap, burst = 1 << 14, 4096
    ring, _ = make_ring(cap)
    items = np.arange(burst, dtype=U64)
    out = np.empty(burst, U64)
    for _ in range(8):  # warm up, and wrap around several times
        ring.enqueue_burst(items)
        ring.dequeue_burst(out)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(200):
            assert ring.enqueue_burst(items) == burst
            assert ring.dequeue_burst(out) == burst
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # One temporary copy of a burst would be 32 KiB; views and ints are a few hundred bytes.
    assert peak < burst * 8 // 4, f"hot path allocated {peak} bytes"
    assert (out == items).all()


# ---- model test ---------------------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["enq", "deq", "count"]), st.integers(0, 70)), max_size=60)


@settings(max_examples=250, deadline=None, database=None)
@given(cap_log2=st.integers(0, 5), near_wrap=st.booleans(), program=ops)
def test_ring_matches_a_deque(cap_log2, near_wrap, program):
    cap = 1 << cap_log2
    _, buf = make_ring(cap)
    if near_wrap:
        h = buf[:192].view(SPSC_RING.header)[0]
        h["head"] = h["tail"] = 2**64 - cap - 1
    prod, cons, observer = (SpscRing.attach(buf, U64) for _ in range(3))
    model: collections.deque[int] = collections.deque()
    seq = 0
    out = np.zeros(70, U64)
    for op, n in program:
        if op == "enq":
            items = np.arange(seq, seq + n, dtype=U64)
            k = prod.enqueue_burst(items)
            assert k == min(n, cap - len(model))
            model.extend(range(seq, seq + k))
            seq += n  # items that did not fit are abandoned, as a real producer might
        elif op == "deq":
            k = cons.dequeue_burst(out[:n])
            assert k == min(n, len(model))
            assert out[:k].tolist() == [model.popleft() for _ in range(k)]
        assert observer.count() == len(model)
        assert observer.free_count() == cap - len(model)


# ---- two processes ------------------------------------------------------------------

N_ITEMS = 2_500_000


def _producer(buf, n_items, seed, conn, deadline):
    try:
        ring = SpscRing.attach(buf, U64)
        seq = np.arange(n_items, dtype=U64)
        rng = np.random.default_rng(seed)
        sizes = rng.integers(1, 513, size=n_items // 64 + 1024)
        sent, i, idle = 0, 0, 0
        while sent < n_items:
            k = ring.enqueue_burst(seq[sent : min(n_items, sent + int(sizes[i % len(sizes)]))])
            i += 1
            if k:
                sent += k
                idle = 0
            else:
                idle += 1
                if idle & 63 == 0:
                    os.sched_yield()
                    if time.monotonic() > deadline:
                        conn.send(("timeout", sent))
                        return
        conn.send(("ok", sent))
    except BaseException as e:  # report, do not hang the parent
        conn.send(("error", repr(e)))


def _consumer(buf, n_items, seed, conn, deadline):
    try:
        ring = SpscRing.attach(buf, U64)
        expected = np.arange(n_items, dtype=U64)
        out = np.empty(512, U64)
        rng = np.random.default_rng(seed + 1)
        sizes = rng.integers(1, 513, size=4096)
        got, i, idle, bursts = 0, 0, 0, 0
        while got < n_items:
            k = ring.dequeue_burst(out[: int(sizes[i & 4095])])
            i += 1
            if k:
                if not np.array_equal(out[:k], expected[got : got + k]):
                    bad = int(np.flatnonzero(out[:k] != expected[got : got + k])[0])
                    conn.send(("mismatch", got + bad, int(out[bad]), got + bad))
                    return
                got += k
                bursts += 1
                idle = 0
            else:
                idle += 1
                if idle & 63 == 0:
                    os.sched_yield()
                    if time.monotonic() > deadline:
                        conn.send(("timeout", got))
                        return
        # Nothing beyond the last item: the ring is empty afterwards.
        conn.send(("ok", got, ring.count(), bursts))
    except BaseException as e:
        conn.send(("error", repr(e)))


def _run_pair(shared_buf, procs, n_items, capacity, seed, budget):
    ctx = mp.get_context("fork")
    buf = shared_buf(SpscRing.zone_size(capacity, U64))
    SpscRing.create(buf, capacity, U64)
    deadline = time.monotonic() + budget
    (c_recv, c_send), (p_recv, p_send) = ctx.Pipe(False), ctx.Pipe(False)
    consumer = ctx.Process(target=_consumer, args=(buf, n_items, seed, c_send, deadline), daemon=True)
    producer = ctx.Process(target=_producer, args=(buf, n_items, seed, p_send, deadline), daemon=True)
    procs.extend([consumer, producer])
    consumer.start()
    producer.start()
    results: dict = {}
    pending = {p_recv: "producer", c_recv: "consumer"}
    while pending:
        ready = wait_for_any(list(pending), timeout=budget + 10)
        assert ready, f"{sorted(pending.values())} never reported"
        for conn in ready:
            results[pending.pop(conn)] = conn.recv()
        if results.get("consumer", ("ok",))[0] != "ok":
            break  # the consumer found a fault: do not wait for a producer stuck on a full ring
    for p in (producer, consumer):
        if "consumer" in results and results["consumer"][0] != "ok":
            p.kill()
        p.join(10)
    return results.get("producer"), results["consumer"]


@pytest.mark.timeout(180)
def test_two_processes_pass_millions_in_order(shared_buf, procs):
    p_res, c_res = _run_pair(shared_buf, procs, N_ITEMS, 4096, seed=20240601, budget=150)
    assert c_res[0] == "ok", c_res  # ("mismatch", index, found, expected) on loss/dup/reorder
    assert p_res == ("ok", N_ITEMS), p_res
    _, got, left, bursts = c_res
    assert got == N_ITEMS and left == 0 and bursts > 1000


@pytest.mark.timeout(120)
def test_two_processes_tiny_ring_forces_constant_wrap(shared_buf, procs):
    # A ring smaller than most bursts: nearly every call is truncated or wraps.
    p_res, c_res = _run_pair(shared_buf, procs, 200_000, 64, seed=7, budget=90)
    assert c_res[0] == "ok" and c_res[1] == 200_000, c_res
    assert p_res == ("ok", 200_000), p_res


@pytest.mark.timeout(120)
def test_bench_runs_and_every_transport_delivers_the_stream(capsys):
    from hotplane.bench import ring as bench

    assert bench.main(["--json", "--duration", "0.2", "--bursts", "1,64", "--capacity", "256"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench"] == "ring" and [r["burst"] for r in doc["rows"]] == [1, 64]
    for row in doc["rows"]:
        assert not [k for k in row if k.endswith("_error")], row
        assert row["ring_items_s"] > 0 and row["pipe_items_s"] > 0 and row["queue_items_s"] > 0
        assert row["ring_vs_pipe"] == pytest.approx(row["ring_items_s"] / row["pipe_items_s"])
    assert doc["summary"]["errors"] == 0 and "ring_vs_queue_at_best" in doc["summary"]
