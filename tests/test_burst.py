"""The burst engine: rx_burst / rx_release / tx_burst / forward_burst over frame rings."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.schema.port import W_RX_CURSOR
from hotplane.shared.burst import (
    RX_REASONS,
    TX_OVERSIZED,
    TX_RING_FULL,
    Queue,
    forward_burst,
    rx_burst,
    rx_release,
    tx_burst,
)


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_ports_util")


def drain_tx(q: Queue, max_n: int = 10_000) -> list[bytes]:
    out = np.zeros((q.tx.nslots, q.tx.frame_size), np.uint8)
    out_len = np.zeros(q.tx.nslots, np.uint32)
    got: list[bytes] = []
    while len(got) < max_n:
        n = q.tx.peer_recv(q.tx.nslots, out, out_len)
        if n == 0:
            break
        got.extend(u.as_bytes(out, out_len[:n]))
    return got


def receive_all(q: Queue, max_n: int = 32) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(10_000):
        b = rx_burst(q, max_n)
        if b.n == 0:
            break
        got.extend(u.as_bytes(b.frames[b.valid], b.lengths[b.valid]))
        rx_release(q, b)
    return got


def test_frames_in_equal_frames_out_with_wraparound():
    q, qs = u.make_queue(64, 256)
    rng = np.random.default_rng(3)
    frames, lengths = u.random_frames(rng, 1000, 190)
    sent_all: list[bytes] = []
    got: list[bytes] = []
    for start in range(0, 1000, 50):
        n = q.rx.peer_send(frames[start : start + 50], lengths[start : start + 50])
        assert n == 50
        sent_all.extend(u.as_bytes(frames[start : start + 50], lengths[start : start + 50]))
        got.extend(receive_all(q, 24))
    assert got == sent_all
    assert qs.counters(0)["rx_frames"] == 1000 and qs.counters(0)["rx_cursor"] == 1000


def test_burst_is_a_view_that_stops_at_the_wrap():
    q, _ = u.make_queue(16, 256)
    q.words[W_RX_CURSOR] = 12
    q.rx._peer[0] = 12
    frames, lengths = u.random_frames(np.random.default_rng(0), 8, 100, 60, 100)
    assert q.rx.peer_send(frames, lengths) == 8
    b = rx_burst(q, 256)
    assert (b.n, b.start) == (4, 12)
    assert np.shares_memory(b.frames, q.rx.frames)  # a view on the slots, not a copy
    b.frames[0, 0] = 0xEE
    assert q.rx.frames[12, 66] == 0xEE
    rx_release(q, b)
    b2 = rx_burst(q, 256)
    assert (b2.n, b2.start, b2.cursor) == (4, 0, 16)
    assert u.as_bytes(b2.frames, b2.lengths) == u.as_bytes(frames[4:], lengths[4:])


def test_unpolled_queue_buffers_up_to_its_ring_then_counts_drops():
    q, qs = u.make_queue(32, 256)
    frames, lengths = u.random_frames(np.random.default_rng(5), 32 + 37, 150)
    assert q.rx.peer_send(frames[:20], lengths[:20]) == 20
    assert q.rx.peer_send(frames[20:], lengths[20:]) == 12  # ring full beyond 32
    assert q.rx.peer_counters()["drops"] == 37
    assert receive_all(q, 7) == u.as_bytes(frames[:32], lengths[:32])  # nothing lost up to the ring size
    assert rx_burst(q, 32).n == 0
    # Room again: the next frames flow.
    assert q.rx.peer_send(frames[:5], lengths[:5]) == 5
    assert receive_all(q) == u.as_bytes(frames[:5], lengths[:5])


def test_kernel_style_out_of_order_publication_stops_the_burst():
    q, _ = u.make_queue(16, 256)
    for s in (0, 1, 2):
        q.rx.tp_len[s] = q.rx.snaplen[s] = 60
        q.rx.tp_mac[s] = 66
    q.rx.status[1] = 1 | 0x80  # slot 1 ready (with a flag bit) before slot 0
    assert rx_burst(q, 16).n == 0
    q.rx.status[0] = 1
    assert rx_burst(q, 16).n == 2  # stops at slot 2, not yet ready


def test_bad_frames_are_masked_and_counted_by_reason():
    q, qs = u.make_queue(16, 256)  # rx capacity 190
    good = np.zeros((1, 190), np.uint8)
    assert q.rx.peer_send(np.repeat(good, 6, axis=0), np.array([60, 10, 60, 60, 60, 60])) == 6
    q.rx.snaplen[2] = 1000  # oversized (beyond the slot)
    q.rx.tp_len[2] = 1000
    q.rx.snaplen[3] = 40  # truncated: snaplen < len
    q.rx.tp_mac[4] = 70  # data not where the ring says
    b = rx_burst(q, 16)
    assert b.n == 6 and not b.all_valid
    assert b.valid.tolist() == [True, False, False, False, False, True]
    assert dict(zip(RX_REASONS, b.drops.tolist())) == {"runt": 1, "oversized": 1, "truncated": 1, "bad_descriptor": 1}
    rx_release(q, b)  # bad frames are released with the rest
    c = qs.counters(0)
    assert (c["rx_runt"], c["rx_oversized"], c["rx_truncated"], c["rx_bad_descriptor"]) == (1, 1, 1, 1)
    assert c["rx_frames"] == 6 and q.rx.count_ready() == 0


def test_truncation_by_the_producer_is_counted():
    q, qs = u.make_queue(8, 128)  # capacity 62
    assert q.rx.peer_send(np.zeros((2, 100), np.uint8), np.array([100, 50])) == 2
    b = rx_burst(q)
    assert b.valid.tolist() == [False, True] and b.drops[RX_REASONS.index("truncated")] == 1


def test_release_twice_is_refused():
    q, _ = u.make_queue(8, 128)
    q.rx.peer_send(np.zeros((2, 60), np.uint8), np.array([60, 60]))
    b = rx_burst(q)
    rx_release(q, b)
    with pytest.raises(RuntimeError, match="already released"):
        rx_release(q, b)


def test_a_new_queue_object_resumes_at_the_shared_cursor():
    q, qs = u.make_queue(16, 256)
    frames, lengths = u.random_frames(np.random.default_rng(9), 12, 100)
    q.rx.peer_send(frames, lengths)
    b = rx_burst(q, 5)
    first = u.as_bytes(b.frames, b.lengths)
    rx_release(q, b)
    # A replacement worker builds its own Queue on the same rings and state record.
    q2 = Queue(q.rx, q.tx, qs.record(0))
    rest = receive_all(q2)
    assert first + rest == u.as_bytes(frames, lengths)


def test_tx_burst_fills_slots_rings_one_doorbell_and_counts_ring_full():
    rings = []
    q, qs = u.make_queue(16, 256, doorbell=lambda: rings.append(1))
    frames, lengths = u.random_frames(np.random.default_rng(11), 20, 224)
    drops = np.zeros(2, np.int64)
    assert tx_burst(q, frames[:10], lengths[:10], drops) == 10
    assert len(rings) == 1
    assert q.tx.status[:10].tolist() == [1] * 10 and q.tx.tp_len[:10].tolist() == lengths[:10].tolist()
    assert tx_burst(q, frames[10:], lengths[10:], drops) == 6  # only 6 free slots left
    assert len(rings) == 2 and drops[TX_RING_FULL] == 4
    assert qs.counters(0)["tx_ring_full"] == 4 and qs.counters(0)["tx_cursor"] == 16
    assert drain_tx(q) == u.as_bytes(frames[:16], lengths[:16])
    # The ring is free again and the cursor wrapped: the next frames go to slot 0 on.
    assert tx_burst(q, frames[16:], lengths[16:]) == 4
    assert drain_tx(q) == u.as_bytes(frames[16:], lengths[16:])


def test_tx_burst_wraps_in_two_runs():
    q, _ = u.make_queue(8, 256)
    q.words[2] = 6  # TX cursor at slot 6
    q.tx._peer[0] = 6
    frames, lengths = u.random_frames(np.random.default_rng(12), 5, 200)
    assert tx_burst(q, frames, lengths) == 5
    assert q.tx.status.tolist() == [1, 1, 1, 0, 0, 0, 1, 1]
    assert drain_tx(q) == u.as_bytes(frames, lengths)


def test_tx_burst_stops_at_a_busy_slot_and_drops_oversized():
    q, qs = u.make_queue(8, 128)  # tx capacity 96
    q.tx.status[3] = 1  # still being sent
    frames = np.zeros((5, 200), np.uint8)
    drops = np.zeros(2, np.int64)
    assert tx_burst(q, frames, np.array([60, 150, 60, 60, 60]), drops) == 3
    assert drops.tolist() == [1, 1]  # one oversized, then one that found slot 3 busy
    assert drops[TX_OVERSIZED] == 1 and qs.counters(0)["tx_oversized"] == 1


def test_forward_burst_rewrites_in_place_and_filters():
    rxq, _ = u.make_queue(32, 256)
    txq, _ = u.make_queue(32, 256)
    frames, lengths = u.random_frames(np.random.default_rng(13), 10, 150, 20, 150)
    lengths[4] = 5  # a runt
    rxq.rx.peer_send(frames, lengths)

    def fn(b):
        b.frames[:, 4] = 0xAB
        keep = np.ones(b.n, bool)
        keep[7] = False
        return keep

    r = forward_burst(rxq, txq, 32, fn)
    assert (r.received, r.invalid, r.filtered, r.sent, r.tx_dropped) == (10, 1, 1, 8, 0)
    want = [f[:4] + b"\xab" + f[5:] for i, f in enumerate(u.as_bytes(frames, lengths)) if i not in (4, 7)]
    assert drain_tx(txq) == want
    assert rxq.rx.count_ready() == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=30))
def test_random_schedules_keep_order_and_account_for_every_frame(ops):
    """Model check: any interleaving of sends, polls and TX drains keeps order; sent = received + drops."""
    q, qs = u.make_queue(16, 128)
    rng = np.random.default_rng(0)
    frames, lengths = u.random_frames(rng, 2000, 62)
    expect = u.as_bytes(frames, lengths)
    pos = 0
    accepted: list[bytes] = []
    forwarded: list[bytes] = []
    for nsend, npoll, drain in ops:
        k = q.rx.peer_send(frames[pos : pos + nsend], lengths[pos : pos + nsend])
        accepted.extend(expect[pos : pos + k])
        pos += nsend
        b = rx_burst(q, npoll)
        sent = tx_burst(q, b.frames, b.lengths)
        rx_release(q, b)
        if sent < b.n:  # only a full TX ring refuses frames
            assert q.tx.count_ready() == q.tx.nslots
        if drain % 3:  # sometimes leave the TX ring undrained so it fills up
            forwarded.extend(drain_tx(q))
    # Drain what is left.
    forwarded.extend(drain_tx(q))
    for _ in range(100):
        b = rx_burst(q, 16)
        if b.n == 0:
            break
        assert tx_burst(q, b.frames, b.lengths) == b.n
        rx_release(q, b)
        forwarded.extend(drain_tx(q))
    assert q.rx.peer_counters()["drops"] + len(accepted) == pos
    assert qs.counters(0)["tx_ring_full"] + len(forwarded) == len(accepted)
    # What was forwarded is the accepted sequence with some frames missing (TX ring full), order kept.
    it = iter(accepted)
    assert all(any(f == a for a in it) for f in forwarded)
