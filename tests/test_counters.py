"""Per-worker counter blocks: layout, burst counting, totals, accounting, restarts, concurrent readers."""

from __future__ import annotations

import collections
import contextlib
import mmap
import multiprocessing as mp
import time

import numpy as np
import pytest

from hotplane.schema import registry
from hotplane.schema.counters import COUNTER_BLOCK, DROP_REASONS, N_REASONS, WORKER_COUNTERS
from hotplane.schema.registry import SchemaError
from hotplane.shared.counters import REASON_NAMES, CounterBlocks, DropReason
from hotplane.shared.ring import SpscRing


def aligned(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + nbytes]


def make(n: int) -> tuple[CounterBlocks, np.ndarray]:
    buf = aligned(CounterBlocks.zone_size(n))
    return CounterBlocks.create(buf, n), buf


def test_layout():
    assert WORKER_COUNTERS.schema_id == 3 and WORKER_COUNTERS.name == "worker_counters"
    assert registry.get(3, 1) is WORKER_COUNTERS
    assert COUNTER_BLOCK.itemsize % 64 == 0
    assert COUNTER_BLOCK.fields["dropped"][0].shape == (N_REASONS,) and N_REASONS == 32
    assert DROP_REASONS[:4] == ("runt", "truncated", "bad_ip_header", "bad_ip_checksum")
    assert DropReason.TTL_EXPIRED == DROP_REASONS.index("ttl_expired") and DropReason.OTHER == len(DROP_REASONS) - 1
    assert CounterBlocks.zone_size(3) == 64 + 3 * COUNTER_BLOCK.itemsize


def test_blocks_are_cache_line_aligned_and_independent():
    cb, buf = make(4)
    addrs = [cb.block(i).dropped.ctypes.data - 48 for i in range(4)]
    assert all(a % 64 == 0 for a in addrs)
    assert [b - a for a, b in zip(addrs, addrs[1:])] == [COUNTER_BLOCK.itemsize] * 3
    b2 = cb.block(2)
    b2.count_rx(5, 500)
    b2.count_drops(np.array([0, 0, 31], np.uint8))
    snap = cb.snapshot()
    assert snap["rx_packets"].tolist() == [0, 0, 5, 0]
    assert snap["dropped"][2, 0] == 2 and snap["dropped"][2, 31] == 1
    assert snap["dropped"][[0, 1, 3]].sum() == 0
    with pytest.raises(IndexError):
        cb.block(4)


def test_attach_roundtrip_and_refusals():
    cb, buf = make(3)
    cb.block(0).count_rx(1, 64)
    again = CounterBlocks.attach(buf)
    assert again.n_workers == 3 and again.totals()["rx_bytes"] == 64
    with pytest.raises(SchemaError, match="never initialised"):
        CounterBlocks.attach(aligned(4096))
    rbuf = aligned(SpscRing.zone_size(8, np.uint64))
    SpscRing.create(rbuf, 8, np.uint64)
    with pytest.raises(SchemaError, match="expected worker_counters"):
        CounterBlocks.attach(rbuf)
    h = buf[:64].view(WORKER_COUNTERS.header)[0]
    h["n_reasons"] = 16
    with pytest.raises(SchemaError, match="corrupt"):
        CounterBlocks.attach(buf)
    h["n_reasons"] = N_REASONS
    with pytest.raises(ValueError, match="needs"):
        CounterBlocks.attach(buf[: CounterBlocks.zone_size(2)])
    with pytest.raises(ValueError):
        CounterBlocks.create(aligned(4096), 0)


def test_burst_counting_matches_a_python_model():
    cb, _ = make(2)
    blk = cb.block(1)
    rng = np.random.default_rng(1)
    model: collections.Counter = collections.Counter()
    rx = fwd = punt = 0
    for _ in range(200):
        n = int(rng.integers(0, 257))
        outcome = rng.integers(0, 3, size=n)  # 0 forward, 1 punt, 2 drop
        reasons = rng.integers(0, len(DROP_REASONS), size=int((outcome == 2).sum())).astype(np.uint8)
        blk.count_rx(n, 64 * n)
        blk.count_forwarded(int((outcome == 0).sum()))
        blk.count_punted(int((outcome == 1).sum()))
        blk.count_drops(reasons)
        model.update(REASON_NAMES[r] for r in reasons.tolist())
        rx += n
        fwd += int((outcome == 0).sum())
        punt += int((outcome == 1).sum())
        assert blk.accounting_gap() == 0
    t = cb.totals()
    assert (t["rx_packets"], t["rx_bytes"], t["forwarded"], t["punted"]) == (rx, 64 * rx, fwd, punt)
    assert {k: v for k, v in t["dropped"].items() if v} == dict(model)
    assert t["dropped_total"] == sum(model.values()) and t["accounting_gap"] == 0
    assert cb.accounting_gap() == 0 and cb.accounting_gap(1) == 0 and cb.accounting_gap(0) == 0


def test_field_views_and_single_drops():
    cb, _ = make(1)
    blk = cb.block(0)
    blk.rx_packets += 10
    blk.forwarded += 4
    blk.punted = 1
    blk.count_drop(DropReason.NO_ROUTE, 3)
    blk.count_drop(200)  # an out-of-range code is counted, as "other"
    blk.add_drop_counts(np.eye(N_REASONS, dtype=np.int64)[DropReason.HOSTILE] * 2)
    assert isinstance(blk.rx_packets, np.ndarray) and blk.rx_packets.dtype == np.uint64
    assert int(blk.rx_packets) == 10 and int(blk.punted) == 1
    d = blk.as_dict()
    assert d["dropped"]["no_route"] == 3 and d["dropped"]["other"] == 1 and d["dropped"]["hostile"] == 2
    assert blk.accounting_gap() == 10 - (4 + 1 + 6) == -1  # more outcomes than receipts: a bug shows
    assert cb.accounting_gap() == -1
    with pytest.raises(ValueError):
        blk.add_drop_counts(np.full(N_REASONS, -1))


def test_unknown_reason_codes_fold_into_other():
    cb, _ = make(1)
    blk = cb.block(0)
    blk.count_drops(np.array([0, 40, 255, 255, DropReason.FRAGMENT], np.uint8))
    blk.count_drops(np.array([], np.uint8))
    d = cb.totals()["dropped"]
    assert d["runt"] == 1 and d["fragment"] == 1 and d["other"] == 3
    assert sum(d.values()) == 5


def test_reserved_reason_slots_show_only_when_used():
    cb, _ = make(1)
    assert "reason_25" not in cb.totals()["dropped"]
    cb.block(0).count_drops(np.array([25], np.uint8))
    assert cb.totals()["dropped"]["reason_25"] == 1


def test_snapshot_is_a_copy():
    cb, _ = make(2)
    cb.block(0).count_tx(3, 300)
    snap = cb.snapshot()
    cb.block(0).count_tx(1, 100)
    assert int(snap["tx_packets"][0]) == 3 and cb.totals(snap)["tx_bytes"] == 300
    assert cb.totals()["tx_bytes"] == 400


def test_counters_survive_a_restart_and_count_it():
    cb, buf = make(2)
    blk = cb.block(1)
    blk.start("0.1.0", generation=1)
    assert int(blk.restarts) == 0 and blk.version == "0.1.0" and int(blk.heartbeat_ns) > 0
    blk.count_rx(7, 700)
    blk.count_forwarded(7)
    # The worker dies; its successor attaches to the same memory.
    succ = CounterBlocks.attach(buf).block(1)
    before = int(succ.heartbeat_ns)
    succ.start("0.2.0-candidate", generation=2)
    assert int(succ.restarts) == 1 and int(succ.generation) == 2 and succ.version == "0.2.0-candidate"
    assert int(succ.heartbeat_ns) >= before
    assert succ.as_dict()["rx_packets"] == 7
    succ.start("0.2.0", generation=3, count_restart=False)  # a planned handover, not a crash
    assert int(succ.restarts) == 1
    with pytest.raises(ValueError, match="longer"):
        succ.start("x" * 40, generation=4)
    assert cb.totals()["restarts"] == 1
    beats = cb.heartbeats()
    assert beats[0] == 0 and 0 < beats[1] <= time.monotonic_ns()


# ---- concurrent reader --------------------------------------------------------------

PATTERN = 0x0000_0001_0000_0001  # both 32-bit halves grow together: a torn word shows hi != lo


def _writer(buf, slot, bursts, conn):
    try:
        blk = CounterBlocks.attach(buf).block(slot)
        blk.start("writer", 1)
        reasons = np.arange(len(DROP_REASONS), dtype=np.uint8)
        for _ in range(bursts):
            blk.count_rx(len(reasons) + 2, 0)
            blk.count_forwarded(1)
            blk.count_punted(1)
            blk.count_drops(reasons)
            blk.count_tx(0, PATTERN)  # tx_bytes: the tearing probe
            blk.beat()
        conn.send(("ok", bursts))
    except BaseException as e:
        conn.send(("error", repr(e)))


@pytest.mark.timeout(120)
def test_readers_see_monotonic_untorn_counters_while_workers_write(request):
    n_workers, bursts = 2, 20_000
    m = mmap.mmap(-1, CounterBlocks.zone_size(n_workers))
    buf = np.frombuffer(m, np.uint8)
    cb = CounterBlocks.create(buf, n_workers)
    ctx = mp.get_context("fork")
    procs, conns = [], []

    def cleanup():
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        with contextlib.suppress(BufferError):
            m.close()

    request.addfinalizer(cleanup)
    for slot in range(n_workers):
        r, w = ctx.Pipe(False)
        p = ctx.Process(target=_writer, args=(buf, slot, bursts, w), daemon=True)
        procs.append(p)
        conns.append(r)
        p.start()
    last = np.zeros(n_workers, np.uint64)
    reads, deadline = 0, time.monotonic() + 100
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        snap = cb.snapshot()
        tb = snap["tx_bytes"]
        assert ((tb >> np.uint64(32)) == (tb & np.uint64(0xFFFF_FFFF))).all(), f"torn word {tb}"
        rx = snap["rx_packets"]
        assert (rx >= last).all(), "a counter went backwards"
        last = rx
        reads += 1
    results = [c.recv() for c in conns if c.poll(10)]
    assert results == [("ok", bursts)] * n_workers, results
    for p in procs:
        p.join(10)
    t = cb.totals()
    per_burst = len(DROP_REASONS) + 2
    assert t["rx_packets"] == n_workers * bursts * per_burst
    assert t["dropped_total"] == n_workers * bursts * len(DROP_REASONS)
    assert all(v == n_workers * bursts for v in t["dropped"].values())
    assert t["tx_bytes"] == (n_workers * bursts * PATTERN) % 2**64
    assert t["accounting_gap"] == 0
    assert reads > 10
