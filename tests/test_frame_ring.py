"""FrameRing: the TPACKET_V2 slot format, zone header, peer-side send/recv."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import pathlib
import time

import numpy as np
import pytest

from hotplane.schema import registry
from hotplane.schema.port import FRAME_RING, QUEUE_STATE, TPACKET2_HDR, pack_owner, unpack_owner
from hotplane.shared.burst import rx_burst, rx_release
from hotplane.shared.frame_ring import TP_STATUS_USER, FrameRing


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_ports_util")


def new_ring(nslots=16, frame_size=256, **kw) -> FrameRing:
    return FrameRing.create(u.aligned(FrameRing.zone_size(nslots, frame_size)), nslots, frame_size, **kw)


def test_layouts_registered_with_their_ids():
    assert registry.get(5, 1) is FRAME_RING and registry.get(6, 2) is QUEUE_STATE
    assert TPACKET2_HDR.itemsize == 32
    offs = {n: TPACKET2_HDR.fields[n][1] for n in TPACKET2_HDR.names}
    assert offs == {"tp_status": 0, "tp_len": 4, "tp_snaplen": 8, "tp_mac": 12, "tp_net": 14, "tp_sec": 16, "tp_nsec": 20, "tp_vlan_tci": 24, "tp_vlan_tpid": 26, "tp_padding": 28}
    assert QUEUE_STATE.element.itemsize == 128  # own cache lines per queue


def test_owner_word_packs_pid_and_generation():
    w = pack_owner(4242, 7)
    assert w == (4242 << 32) | 7 and unpack_owner(w) == (4242, 7)
    with pytest.raises(ValueError):
        pack_owner(1 << 32, 0)


def test_create_attach_geometry_and_views():
    r = new_ring(16, 256)
    assert (r.nslots, r.frame_size, r.rx_capacity, r.tx_capacity) == (16, 256, 190, 224)
    assert r.frames.shape == (16, 256) and r.rx_data.shape == (16, 190)
    a = FrameRing.attach(r.buf)
    a.status[3] = 1
    assert r.status[3] == 1 and r.frames[3, 0] == 1  # the status word is the slot's first 4 bytes
    assert FrameRing.zone_size(16, 256) == 128 + 16 * 256


def test_attach_refuses_uninitialised_and_foreign_zones():
    buf = u.aligned(FrameRing.zone_size(8, 128))
    with pytest.raises(registry.SchemaError, match="never initialised"):
        FrameRing.attach(buf)
    r = FrameRing.create(buf, 8, 128)
    r.header["layout_hash"] = 12345
    with pytest.raises(registry.SchemaError, match="layout hash"):
        FrameRing.attach(buf)


@pytest.mark.parametrize(
    "nslots,frame_size,match",
    [(12, 256, "power of two"), (16, 250, "multiple of 16"), (16, 64, "at least 128"), (1, 256, "power of two")],
)
def test_create_refuses_bad_geometry(nslots, frame_size, match):
    with pytest.raises(ValueError, match=match):
        FrameRing.create(u.aligned(1 << 16), nslots, frame_size)


def test_create_refuses_small_or_misaligned_buffer():
    with pytest.raises(ValueError, match="needs"):
        FrameRing.create(u.aligned(1000), 16, 256)
    with pytest.raises(ValueError, match="aligned"):
        FrameRing.create(u.aligned(1 << 16)[8:], 16, 256)


def test_attach_checks_role():
    r = new_ring(8, 128, role=1)
    with pytest.raises(ValueError, match="created as a rx ring"):
        FrameRing.attach(r.buf, role=2)
    assert FrameRing.attach(r.buf, role=1).role == 1


def test_from_frames_wraps_a_mapping_without_peer_ops():
    mem = u.aligned(6 * 2048).reshape(6, 2048)  # 6 slots: not a power of two, as a kernel ring may be
    r = FrameRing.from_frames(mem)
    assert r.nslots == 6 and r.header is None
    with pytest.raises(ValueError, match="kernel mapping"):
        r.peer_send(np.zeros((1, 60), np.uint8), np.array([60]))


def test_peer_send_writes_descriptors_then_status():
    r = new_ring(8, 256)
    rng = np.random.default_rng(1)
    frames, lengths = u.random_frames(rng, 3, 100, 60, 100)
    assert r.peer_send(frames, lengths, ts_ns=1_700_000_000_123_456_789) == 3
    for i in range(3):
        assert r.status[i] == TP_STATUS_USER
        assert r.tp_len[i] == r.snaplen[i] == lengths[i]
        assert (r.tp_mac[i], r.tp_net[i]) == (66, 80)
        assert (r.tp_sec[i], r.tp_nsec[i]) == (1_700_000_000, 123_456_789)
        assert bytes(r.frames[i, 66 : 66 + lengths[i]]) == bytes(frames[i, : lengths[i]])
    assert r.status[3] == 0
    assert r.peer_counters() == {"cursor": 3, "frames": 3, "drops": 0, "bad": 0}


def test_peer_send_truncates_long_frames_like_the_kernel():
    r = new_ring(4, 128)  # rx capacity 62
    frames = np.arange(100, dtype=np.uint8)[None, :]
    assert r.peer_send(frames, np.array([100])) == 1
    assert (r.tp_len[0], r.snaplen[0]) == (100, 62)
    assert bytes(r.rx_data[0, :62]) == bytes(range(62))


def test_peer_send_rejects_lengths_beyond_the_rows():
    r = new_ring(4, 128)
    with pytest.raises(ValueError, match="width"):
        r.peer_send(np.zeros((1, 20), np.uint8), np.array([21]))


def test_peer_send_counts_drops_when_full_and_space_follows_the_consumer():
    r = new_ring(8, 128)
    f = np.zeros((20, 60), np.uint8)
    assert r.peer_space() == 8
    assert r.peer_send(f[:5], np.full(5, 60)) == 5
    assert r.peer_space() == 3
    assert r.peer_send(f[:6], np.full(6, 60)) == 3
    assert r.peer_counters()["drops"] == 3
    assert r.peer_space() == 0
    r.status[0:2] = 0  # the consumer hands back two slots
    assert r.peer_space() == 2
    assert r.peer_send(f[:4], np.full(4, 60)) == 2  # wraps to slots 0, 1
    assert r.peer_counters() == {"cursor": 10, "frames": 10, "drops": 5, "bad": 0}


def test_peer_recv_reads_send_requests_in_order_across_the_wrap():
    r = new_ring(8, 256)
    out = np.zeros((16, 256), np.uint8)
    out_len = np.zeros(16, np.uint32)
    # Advance the peer cursor to slot 6 first.
    r._peer[0] = 6
    for k, slot in enumerate([6, 7, 0, 1]):
        r.tx_data[slot, :10] = k + 1
        r.tp_len[slot] = 10 + k
        r.status[slot] = 1
    assert r.peer_recv(16, out, out_len) == 4
    assert out_len[:4].tolist() == [10, 11, 12, 13]
    assert [out[j, 0] for j in range(4)] == [1, 2, 3, 4]
    assert r.status.tolist() == [0] * 8
    assert r.peer_counters()["cursor"] == 10


def test_peer_recv_refuses_slots_with_impossible_lengths():
    r = new_ring(8, 256)
    out = np.zeros((8, 256), np.uint8)
    out_len = np.zeros(8, np.uint32)
    for slot, ln in enumerate([60, 5000, 61]):
        r.tx_data[slot, 0] = slot
        r.tp_len[slot] = ln
        r.status[slot] = 1
    assert r.peer_recv(8, out, out_len) == 2
    assert out_len[:2].tolist() == [60, 61] and out[1, 0] == 2
    assert r.peer_counters()["bad"] == 1 and r.status[:3].tolist() == [0, 0, 0]


def _producer(buf_holder, n, width, seed, deadline):
    """Child: attach the shared ring and feed n frames, waiting (bounded) for room."""
    ring = FrameRing.attach(buf_holder[1])
    rng = np.random.default_rng(seed)
    frames, lengths = u.random_frames(rng, n, width, 14, width)
    sent = 0
    while sent < n and time.monotonic() < deadline:
        room = ring.peer_space(n - sent)
        if room == 0:
            time.sleep(0.0002)
            continue
        sent += ring.peer_send(frames[sent : sent + room], lengths[sent : sent + room])
    os._exit(0 if sent == n else 1)


@pytest.mark.timeout(60)
def test_cross_process_producer_and_consumer_share_a_ring():
    n, width, nslots = 3000, 190, 64
    size = FrameRing.zone_size(nslots, 256)
    mm, buf = u.shared(size)
    FrameRing.create(buf, nslots, 256)
    qmm, qbuf = u.shared(4096)
    from hotplane.shared.burst import Queue, QueueState

    qs = QueueState.create(qbuf[: QueueState.zone_size(1)], 1)
    ring = FrameRing.attach(buf)
    q = Queue(ring, ring, qs.words[0])
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_producer, args=((mm, buf), n, width, 7, time.monotonic() + 30))
    p.start()
    try:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            b = rx_burst(q, 32)
            if b.n == 0:
                time.sleep(0.0001)
                continue
            assert b.all_valid
            got.extend(u.as_bytes(b.frames, b.lengths))
            rx_release(q, b)
        p.join(30)
        assert p.exitcode == 0
        frames, lengths = u.random_frames(np.random.default_rng(7), n, width, 14, width)
        assert got == u.as_bytes(frames, lengths)
        assert ring.peer_counters()["drops"] == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
