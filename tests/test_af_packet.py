"""af_packet ports against the real kernel, inside throwaway network namespaces.

Every test that needs the kernel makes its own namespace (``hpt-<random>``)
holding veth pairs; nothing touches the machine's own interfaces, and only
test ethertypes or 100.64.0.0/10 / 198.18.0.0/15 addresses are sent.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import pathlib
import random
import select
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from hotplane.shared import af_packet as ap
from hotplane.shared import bpf


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fx = _load("_af_packet_util")
UTIL_PATH = pathlib.Path(__file__).with_name("_af_packet_util.py")

SMALL = ap.RingParams(frame_size=2048, frame_nr=64)

def netns_only(test):
    """Needs root and network namespaces (skipped, with the reason, otherwise)."""
    return pytest.mark.netns(pytest.mark.skipif(fx.need_root() is not None, reason=str(fx.need_root()))(test))


@pytest.fixture(autouse=True)
def _single_cpu_sender():
    with fx.one_cpu():
        yield


@pytest.fixture
def closing(request):
    """Register things to close at teardown (queues, sockets), whatever the outcome."""
    things: list = []

    def fin():
        for t in reversed(things):
            try:
                t.close()
            except Exception:
                pass

    request.addfinalizer(fin)
    return things


@pytest.fixture
def veth(request, closing):
    """A fresh netns with a veth pair va <-> vb, both up; removed at teardown."""
    why = fx.need_root()
    if why:
        print(f"skipping: {why}")
        pytest.skip(why)
    ns = fx.new_netns()
    request.addfinalizer(lambda: fx.del_netns(ns))
    fx.add_veth(ns, "va", "vb")
    return ns, fx.link_mac(ns, "va"), fx.link_mac(ns, "vb")


def open_queues(closing, *args, **kw):
    qs = ap.open_af_packet_queues(*args, **kw)
    closing.extend(qs)
    return qs


# --- no kernel needed --------------------------------------------------------------------


def test_ring_geometry():
    r = ap.RingParams().resolved()
    assert r.frame_size == 2048 and r.frame_nr == r.tx_frame_nr == 1024
    assert r.block_size % ap.PAGE_SIZE == 0 and r.block_size % r.frame_size == 0
    assert r.mmap_size == 2 * 1024 * 2048
    # small rings get smaller blocks so that frames still tile whole blocks
    r2 = ap.RingParams(frame_size=2048, frame_nr=6, tx_frame_nr=4).resolved()
    assert r2.block_size == 4096 and r2.frame_nr == 6 and r2.tx_frame_nr == 4
    r3 = ap.RingParams(frame_size=1536, frame_nr=24).resolved()  # lcm(1536, 4096) = 12288
    assert r3.block_size % 12288 == 0 and 24 % (r3.block_size // 1536) == 0
    bs, bn, fs, fn = np.frombuffer(r.tpacket_req(tx=False), "=u4")
    assert (bs * bn, fs, fn) == (fs * fn, 2048, 1024)
    assert ap.RingParams.from_dict(r.to_dict()) == r
    for bad in (dict(frame_size=2056), dict(frame_size=2048, frame_nr=3), dict(frame_size=64), dict(block_size=6144)):
        with pytest.raises(ap.AfPacketError):
            ap.RingParams(**bad).resolved()


def test_data_offsets_match_contract():
    assert ap.RX_DATA_OFFSET == 66 and ap.RX_NET_OFFSET == 80 and ap.TX_DATA_OFFSET == 32


# --- errors naming what to do ---------------------------------------------------------------


@netns_only
def test_missing_and_down_interfaces(veth):
    ns, _, _ = veth
    with pytest.raises(ap.InterfaceMissing, match=r"interface eth9 does not exist.*check `ip link`"):
        ap.open_af_packet_queues("eth9", netns=ns)
    fx.sh("ip", "-n", ns, "link", "set", "vb", "down")
    fx.sh("ip", "-n", ns, "link", "set", "va", "down")
    with pytest.raises(ap.InterfaceDown, match=r"interface va is down.*`ip link set va up`"):
        ap.open_af_packet_queues("va", 2, "inside", SMALL, netns=ns)
    with pytest.raises(ap.AfPacketError, match=r"ip netns list"):
        ap.open_af_packet_queues("va", netns="hpt-does-not-exist-0")


@netns_only
def test_mtu_too_big_for_frame_size(veth):
    ns, _, _ = veth
    fx.sh("ip", "-n", ns, "link", "set", "va", "mtu", "4000")
    with pytest.raises(ap.AfPacketError, match=r"MTU 4000.*frame_size"):
        ap.open_af_packet_queues("va", 1, "inside", SMALL, netns=ns)


def _open_as_nobody(ns: str, q) -> None:
    try:
        ap._setns(os.open(f"/run/netns/{ns}", os.O_RDONLY))  # for good: this process ends here
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)  # drops every capability
        ap.open_af_packet_queues("va", 1, "inside", SMALL)
        q.put("opened?!")
    except ap.NeedsCapNetRaw as e:
        q.put(f"ok: {e}")
    except BaseException as e:  # report anything else to the parent
        q.put(f"{type(e).__name__}: {e}")


@netns_only
def test_no_permission_message(veth):
    ns, _, _ = veth
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_open_as_nobody, args=(ns, q))
    p.start()
    try:
        msg = q.get(timeout=20)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert msg.startswith("ok:"), msg
    assert "root or CAP_NET_RAW" in msg


# --- RX and TX through the rings --------------------------------------------------------------


@netns_only
def test_rx_ring_frames_in_order_with_content(veth, closing):
    ns, ma, mb = veth
    (q,) = open_queues(closing, "va", 1, "inside", SMALL, netns=ns)
    rx, tx, doorbell = q.map()
    closing.append(doorbell)
    assert rx.shape == (64, 2048) and tx.shape == (64, 2048) and rx.dtype == np.uint8
    snd = fx.raw_socket(ns, "vb")
    closing.append(snd)
    reader = fx.RxReader(rx)
    sent = []
    for i in range(150):  # more than the ring: wraps around twice
        f = fx.test_frame(ma, mb, i, size=60 + (i * 37) % 1400)
        snd.send(f)
        sent.append(f)
        if i % 40 == 39:
            assert reader.wait(q.fd, 40) == sent[i - 39 : i + 1]
    assert reader.wait(q.fd, 150 - 120, timeout=5) == sent[120:]
    assert reader.macs == {ap.RX_DATA_OFFSET} and reader.nets == {ap.RX_NET_OFFSET}
    assert reader.cursor == 150
    st = q.read_kernel_stats()
    assert (st.packets, st.drops) == (150, 0)


@netns_only
def test_tx_ring_frames_leave_through_the_veth(veth, closing):
    ns, ma, mb = veth
    (q,) = open_queues(closing, "va", 1, "inside", SMALL, netns=ns)
    rx, tx, doorbell = q.map()
    closing.append(doorbell)
    rcv = fx.raw_socket(ns, "vb", receive=True)
    closing.append(rcv)
    writer = fx.TxWriter(tx)
    reader = fx.RxReader(rx)
    sent = []
    for burst in range(4):  # 4 bursts of 30 through a 64-slot ring: wraps
        for i in range(30):
            f = fx.test_frame(mb, ma, burst * 100 + i, size=64 + i * 40)
            assert writer.put(f), "TX slot still owned by the kernel"
            sent.append(f)
        assert doorbell() == sum(len(f) for f in sent[-30:])
        got = fx.recv_frames(rcv, 30, timeout=5)
        assert got == sent[-30:]
        assert writer.all_free()  # the kernel handed every slot back
    other = fx.raw_socket(ns, "va")  # nor are other senders' frames out of va
    closing.append(other)
    for i in range(5):
        other.send(fx.test_frame(mb, ma, 900 + i))
    assert len(fx.recv_frames(rcv, 5, timeout=5)) == 5
    assert reader.take() == []  # our own transmissions (and others' outgoing) are not read back
    assert doorbell.rings == 4 and doorbell.eagain == doorbell.enobufs == 0


@netns_only
def test_malformed_tx_slot_is_skipped_not_stalling(veth, closing):
    ns, ma, mb = veth
    (q,) = open_queues(closing, "va", 1, "inside", SMALL, netns=ns)
    _, tx, doorbell = q.map()
    closing.append(doorbell)
    rcv = fx.raw_socket(ns, "vb", receive=True)
    closing.append(rcv)
    w = fx.TxWriter(tx)
    good1, good2 = fx.test_frame(mb, ma, 1), fx.test_frame(mb, ma, 2)
    w.put(good1)
    words = tx.view(np.uint32)
    words[w.cursor, 1] = 5000  # tp_len larger than the slot: the kernel must skip it (PACKET_LOSS)
    words[w.cursor, 0] = 1
    w.cursor += 1
    w.put(good2)
    doorbell()
    assert fx.recv_frames(rcv, 3, timeout=2) == [good1, good2]
    assert w.all_free()


@netns_only
def test_fd_passed_to_child_maps_and_reads(veth, closing):
    """The primary keeps the socket; a worker process gets the fd, maps, reads RX and fills TX;
    the next owner resumes at the cursors the worker reports (nothing read twice or skipped)."""
    ns, ma, mb = veth
    (q,) = open_queues(closing, "va", 1, "inside", SMALL, netns=ns)
    snd = fx.raw_socket(ns, "vb")
    rcv = fx.raw_socket(ns, "vb", receive=True)
    closing.extend([snd, rcv])
    first = [fx.test_frame(ma, mb, i, 100 + i) for i in range(40)]
    for f in first:  # sent before any worker exists: the queue buffers them
        snd.send(f)
    to_send = [fx.test_frame(mb, ma, 500 + i) for i in range(12)]

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    closing.extend([parent, child])
    proc = subprocess.Popen([sys.executable, str(UTIL_PATH), "child", str(child.fileno())], pass_fds=[child.fileno()])
    try:
        child.close()
        req = {"ring": q.params.to_dict(), "expect": 40, "send": [f.hex() for f in to_send]}
        socket.send_fds(parent, [json.dumps(req).encode()], [q.fd])
        parent.settimeout(30)
        reply = json.loads(parent.recv(1 << 22))
        got_tx = fx.recv_frames(rcv, 12, timeout=5)
        parent.send(b"k")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert reply["pid"] != os.getpid()
    assert [bytes.fromhex(h) for h in reply["frames"]] == first
    assert reply["macs"] == [66] and reply["shape"] == [[64, 2048], [64, 2048]]
    assert reply["sent"] == 12 and reply["doorbell"]["rings"] == 1
    assert got_tx == to_send
    # handover: the primary maps the same rings and continues at the worker's cursors
    rx, tx, doorbell = q.map()
    closing.append(doorbell)
    assert reply["rx_cursor"] == 40
    later = [fx.test_frame(ma, mb, 1000 + i) for i in range(30)]
    for f in later:
        snd.send(f)
    assert fx.RxReader(rx, reply["rx_cursor"]).wait(q.fd, 30) == later
    w = fx.TxWriter(tx, reply["tx_cursor"])
    more = [fx.test_frame(mb, ma, 2000 + i) for i in range(5)]
    for f in more:
        assert w.put(f)
    doorbell()
    assert fx.recv_frames(rcv, 5, timeout=5) == more


# --- buffering while unpolled, and drops beyond the ring ------------------------------------


@netns_only
def test_unpolled_queue_buffers_then_drains_and_counts_drops(veth, closing):
    ns, ma, mb = veth
    (q,) = open_queues(closing, "va", 1, "inside", SMALL, netns=ns)
    snd = fx.raw_socket(ns, "vb")
    closing.append(snd)
    sent = [fx.test_frame(ma, mb, i) for i in range(64 + 25)]
    for f in sent:
        snd.send(f)
    rx, _, doorbell = q.map()  # a worker arrives late
    closing.append(doorbell)
    reader = fx.RxReader(rx)
    assert reader.wait(q.fd, 64) == sent[:64]  # nothing lost up to the ring size, in order
    assert reader.take() == []
    assert not any(s & ap.TP_STATUS_LOSING for s in reader.statuses)
    # the ring works again; the kernel flags frames that arrive while drops are unread
    again = [fx.test_frame(ma, mb, 100 + i) for i in range(10)]
    for f in again:
        snd.send(f)
    assert reader.wait(q.fd, 10) == again
    assert all(s & ap.TP_STATUS_LOSING for s in reader.statuses[64:])
    st = q.read_kernel_stats()
    assert (st.packets, st.drops, st.delivered) == (99, 25, 74)
    # reading reset the kernel's counters; the queue accumulates
    for f in again[:5]:
        snd.send(f)
    assert reader.wait(q.fd, 5) == again[:5]
    assert not any(s & ap.TP_STATUS_LOSING for s in reader.statuses[74:])
    st = q.read_kernel_stats()
    assert (st.packets, st.drops, st.delivered) == (104, 25, 79)


# --- fanout steering ------------------------------------------------------------------------------


def _steering_frames(ma, mb, mode, rng, n):
    """IPv4 frames whose queue depends on the fields the mode steers by, plus fragments/ICMP/ARP."""
    frames = []
    for i in range(n):
        payload = i.to_bytes(4, "big")
        kind = i % 8
        if mode == "inside":
            src = f"100.{64 + rng.randrange(64)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            dst = "198.18.0.2"
        else:
            src, dst = "198.18.0.2", f"198.18.1.{rng.randrange(16)}"
        sport, dport = rng.randrange(65536), rng.randrange(65536)
        if kind < 3:
            ip = fx.ipv4(src, dst, 17, fx.udp(sport, dport, payload))
        elif kind < 5:
            ip = fx.ipv4(src, dst, 6, fx.tcp(sport, dport, payload))
        elif kind == 5:
            ip = fx.ipv4(src, dst, 1, fx.icmp(8 if mode == "inside" else 0, sport, 1, payload))
        elif kind == 6:
            ip = fx.ipv4(src, dst, 17, fx.udp(sport, dport, payload), frag=0x2000 | rng.randrange(2))
        else:
            frames.append(fx.eth(ma, mb, 0x0806, b"\x00\x01\x08\x00\x06\x04\x00\x01" + payload + bytes(24)))
            continue
        frames.append(fx.eth(ma, mb, 0x0800, ip))
    return frames


def _drain_queues(queues, maps, want_total, timeout=5.0, readers=None):
    """Poll every queue until ``want_total`` frames arrived; ``readers`` keep cursors between calls."""
    readers = readers if readers is not None else [fx.RxReader(rx) for rx, _, _ in maps]
    got = [[] for _ in queues]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < want_total and time.monotonic() < deadline:
        progress = False
        for i, r in enumerate(readers):
            new = r.take()
            got[i].extend(new)
            progress |= bool(new)
        if not progress:
            select.select([q.sock for q in queues], [], [], 0.05)
    return got


@netns_only
@pytest.mark.parametrize("mode, nq", [("inside", 2), ("outside", 2), ("inside", 3), ("outside", 4)])
def test_fanout_steers_like_the_reference(veth, closing, mode, nq):
    ns, ma, mb = veth
    queues = open_queues(closing, "va", nq, mode, SMALL, netns=ns)
    assert len({q.fanout_id for q in queues}) == 1 and queues[0].fanout_id is not None
    maps = [q.map() for q in queues]
    closing.extend(m[2] for m in maps)
    snd = fx.raw_socket(ns, "vb")
    closing.append(snd)
    rng = random.Random(f"{mode}{nq}")
    frames = _steering_frames(ma, mb, mode, rng, 48)  # < 64 per queue: no ring can overflow
    for f in frames:
        snd.send(f)
    got = _drain_queues(queues, maps, len(frames))
    want = [[f for f in frames if bpf.steering_queue(f, mode, nq) == i] for i in range(nq)]
    assert got == want  # every frame on its queue, in order
    assert all(want), "the frames should exercise every queue"
    # a queue's own transmissions are read back by no queue of the group
    rcv = fx.raw_socket(ns, "vb", receive=True)
    closing.append(rcv)
    w = fx.TxWriter(maps[0][1])
    out = [fx.test_frame(mb, ma, 9000 + i) for i in range(5)]
    for f in out:
        w.put(f)
    maps[0][2]()
    assert fx.recv_frames(rcv, 5) == out
    # nor what others send out of va (the hp-gw kernel's ARP, a tcpdump -w replay...)
    other = fx.raw_socket(ns, "va")
    closing.append(other)
    for i in range(5):
        other.send(fx.test_frame(mb, ma, 9100 + i))
    assert len(fx.recv_frames(rcv, 5)) == 5
    assert all(fx.RxReader(rx).take() == [] for rx, _, _ in maps)


@netns_only
def test_both_directions_of_a_flow_reach_the_same_queue(request, closing):
    """Inside port steers by source, outside port by the translated port's block: a NAT that
    picks the translated port from the inside queue's block sees both directions on one queue."""
    why = fx.need_root()
    if why:
        pytest.skip(why)
    ns = fx.new_netns()
    request.addfinalizer(lambda: fx.del_netns(ns))
    fx.add_veth(ns, "ia", "ib")
    fx.add_veth(ns, "oa", "ob")
    nq, port_lo = 2, 1024
    block = bpf.default_block(nq, port_lo)
    inside = open_queues(closing, "ia", nq, "inside", SMALL, netns=ns)
    outside = open_queues(closing, "oa", nq, "outside", SMALL, netns=ns, port_lo=port_lo, block=block)
    imaps, omaps = [q.map() for q in inside], [q.map() for q in outside]
    closing.extend(m[2] for m in imaps + omaps)
    isnd, osnd = fx.raw_socket(ns, "ib"), fx.raw_socket(ns, "ob")
    closing.extend([isnd, osnd])
    mi, mib, mo, mob = (fx.link_mac(ns, n) for n in ("ia", "ib", "oa", "ob"))
    ireaders, oreaders = [fx.RxReader(m[0]) for m in imaps], [fx.RxReader(m[0]) for m in omaps]
    rng = random.Random(7)
    seen = set()
    for flow in range(24):
        host = f"100.64.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        sport = rng.randrange(1024, 65536)
        proto = rng.choice(["udp", "tcp", "icmp"])
        if proto == "icmp":
            out_l4 = fx.icmp(8, sport)
        else:
            out_l4 = (fx.udp if proto == "udp" else fx.tcp)(sport, 443)
        fwd = fx.eth(mi, mib, 0x0800, fx.ipv4(host, "198.18.0.2", {"udp": 17, "tcp": 6, "icmp": 1}[proto], out_l4))
        isnd.send(fwd)
        (qin,) = [i for i, g in enumerate(_drain_queues(inside, imaps, 1, readers=ireaders)) if g == [fwd]]
        # the NAT maps (host, sport) to a public port inside the block of queue qin
        pub = port_lo + qin * block + rng.randrange(block)
        if proto == "icmp":
            back_l4 = fx.icmp(0, pub)
        else:
            back_l4 = (fx.udp if proto == "udp" else fx.tcp)(443, pub)
        back = fx.eth(mo, mob, 0x0800, fx.ipv4("198.18.0.2", "198.18.1.5", {"udp": 17, "tcp": 6, "icmp": 1}[proto], back_l4))
        osnd.send(back)
        got = _drain_queues(outside, omaps, 1, readers=oreaders)
        assert got[qin] == [back], f"flow {flow} ({proto} {host}:{sport}) went to inside queue {qin} but its reply elsewhere"
        seen.add(qin)
    assert seen == {0, 1}


@netns_only
def test_polled_queue_flows_while_sibling_overflows(veth, closing):
    """One queue of a group unpolled: it fills and counts drops; its sibling is unaffected."""
    ns, ma, mb = veth
    nq = 2
    queues = open_queues(closing, "va", nq, "outside", SMALL, netns=ns, port_lo=1024, block=100)
    maps = [q.map() for q in queues]
    closing.extend(m[2] for m in maps)
    snd = fx.raw_socket(ns, "vb")
    closing.append(snd)
    to_q = {0: 1024, 1: 1124}  # dports in block 0 and block 1
    r0 = fx.RxReader(maps[0][0])
    q0_sent, q1_sent = [], []
    for i in range(100):
        for qi in (0, 1):
            f = fx.eth(ma, mb, 0x0800, fx.ipv4("198.18.0.2", "198.18.1.1", 17, fx.udp(53, to_q[qi], i.to_bytes(4, "big"))))
            assert bpf.steering_queue(f, "outside", nq, 1024, 100) == qi
            snd.send(f)
            (q0_sent if qi == 0 else q1_sent).append(f)
        if i % 20 == 19:
            assert r0.wait(queues[0].fd, 20, ethertype=None) == q0_sent[i - 19 : i + 1]  # queue 0 keeps flowing
    s0, s1 = queues[0].read_kernel_stats(), queues[1].read_kernel_stats()
    assert (s0.packets, s0.drops) == (100, 0)
    assert (s1.packets, s1.drops) == (100, 100 - 64)
    assert fx.RxReader(maps[1][0]).take() == q1_sent[:64]


@netns_only
def test_rss_mode_uses_the_kernel_flow_hash(veth, closing):
    """steer=rss: a PACKET_FANOUT_HASH group; every frame lands on exactly one queue and the
    kernel's hash is symmetric, so both directions of a flow share a queue."""
    ns, ma, mb = veth
    queues = open_queues(closing, "va", 2, "rss", SMALL, netns=ns)
    assert queues[0].fanout_id is not None
    maps = [q.map() for q in queues]
    closing.extend(m[2] for m in maps)
    snd = fx.raw_socket(ns, "vb")
    closing.append(snd)
    readers = [fx.RxReader(m[0]) for m in maps]
    for flow in range(12):
        a, b = f"100.64.0.{flow + 2}", "198.18.0.2"
        fwd = fx.eth(ma, mb, 0x0800, fx.ipv4(a, b, 17, fx.udp(30000 + flow, 53)))
        rev = fx.eth(ma, mb, 0x0800, fx.ipv4(b, a, 17, fx.udp(53, 30000 + flow)))
        snd.send(fwd)
        snd.send(rev)
        got = _drain_queues(queues, maps, 2, readers=readers)
        assert sorted(map(len, got)) == [0, 2] and sum(got, []) == [fwd, rev]
    with pytest.raises(ap.AfPacketError, match="steering mode"):
        ap.open_af_packet_queues("va", 2, "sideways", SMALL, netns=ns)


@netns_only
def test_burst_engine_on_the_mapped_rings(veth, closing):
    """The mapping is the CONTRACTS frame-ring format: the burst engine (FrameRing.from_frames)
    receives from it and transmits through it (an echo of every frame back out of va)."""
    burst = pytest.importorskip("hotplane.shared.burst")
    frame_ring = pytest.importorskip("hotplane.shared.frame_ring")
    import mmap as _mmap

    ns, ma, mb = veth
    (q,) = open_queues(closing, "va", 1, "inside", SMALL, netns=ns)
    rx, tx, doorbell = q.map()
    closing.append(doorbell)
    zone = _mmap.mmap(-1, burst.QueueState.zone_size(1))
    state = burst.QueueState.create(np.frombuffer(zone, np.uint8), 1)
    bq = burst.Queue(frame_ring.FrameRing.from_frames(rx), frame_ring.FrameRing.from_frames(tx), state.words[0], doorbell)
    snd = fx.raw_socket(ns, "vb")
    rcv = fx.raw_socket(ns, "vb", receive=True)
    closing.extend([snd, rcv])
    sent = [fx.test_frame(ma, mb, i, size=60 + 13 * i) for i in range(100)]
    echoed = 0
    for chunk in range(4):  # 4 x 25 through 64 slots: the cursors wrap
        part = sent[chunk * 25 : (chunk + 1) * 25]
        for f in part:
            snd.send(f)
        deadline = time.monotonic() + 5
        while echoed < (chunk + 1) * 25 and time.monotonic() < deadline:
            b = burst.rx_burst(bq, 256)
            if len(b) == 0:
                select.select([q.sock], [], [], 0.05)
                continue
            assert b.all_valid
            echoed += burst.tx_burst(bq, b.frames, b.lengths)
            burst.rx_release(bq, b)
        assert fx.recv_frames(rcv, 25) == part  # content and order, out through the TX ring
    assert bq.rx_cursor == bq.tx_cursor == 100 and doorbell.rings >= 4


# --- the gateway's processes: fds over the IPC channel, kernel drops in the queue state ------------


def _wait_json_line(p: subprocess.Popen, timeout: float) -> dict:
    """The first JSON line ``p`` prints on stdout within ``timeout`` s (an event, not a timer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            return json.loads(line)
    p.kill()
    raise AssertionError(f"no ready line (rc={p.wait(10)}): {p.stderr.read()[-2000:]}")


def _ip_frames(ma: bytes, mb: bytes, n: int, first: int = 0) -> list[bytes]:
    return [fx.eth(ma, mb, 0x0800, fx.ipv4(f"100.64.0.{2 + i % 200}", "198.18.0.2", 17, fx.udp(10000 + first + i, 53, (first + i).to_bytes(4, "big")), ident=first + i))
            for i in range(n)]


@netns_only
@pytest.mark.timeout(120)
def test_worker_gets_fds_over_ipc_and_counts_kernel_drops(request, closing, instance):
    """A primary with af_packet ports in a netns; frames arrive while no worker polls (the ring
    buffers 64, the kernel drops the rest); a worker started later -- outside the netns, so its
    rings can only come from the fds the primary passes over the IPC channel -- forwards the 64
    out of the other port and counts the kernel's drops into the queue-state word, where the
    stats secondary's reading finds them."""
    ns = fx.new_netns()
    request.addfinalizer(lambda: fx.del_netns(ns))
    fx.add_veth(ns, "ia", "ib")
    fx.add_veth(ns, "oa", "ob")
    mia, mib = fx.link_mac(ns, "ia"), fx.link_mac(ns, "ib")
    env = instance.env
    cli = [sys.executable, "-m", "hotplane.supervisor.cli"]
    prim = subprocess.Popen(["ip", "netns", "exec", ns, *cli, "primary", *instance.eal("--no-huge", "--socket-mem", "32"), "--",
                             "--workers", "1", "--inside", "af_packet:ia,slots=64", "--outside", "af_packet:oa,slots=64", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    instance.procs.append(prim)
    _wait_json_line(prim, 30)
    snd, rcv = fx.raw_socket(ns, "ib"), fx.raw_socket(ns, "ob", receive=True)
    closing.extend([snd, rcv])
    flood = _ip_frames(mib, mia, 64 + 36)
    for f in flood:
        snd.send(f)
    wk = subprocess.Popen([*cli, "worker", *instance.eal(), "--", "--id", "0", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    instance.procs.append(wk)
    _wait_json_line(wk, 30)
    out = fx.recv_frames(rcv, 64, timeout=10, ethertype=0x0800)
    # The 64 the ring buffered, in order, forwarded (TTL 63) out of the outside port's TX ring.
    assert [f[14 + 4 : 14 + 6] for f in out] == [f[14 + 4 : 14 + 6] for f in flood[:64]]
    assert all(f[14 + 8] == 63 for f in out)
    from hotplane.schema.port import QUEUE_STATE, W_KERNEL_DROPS, W_RX_FRAMES
    from hotplane.secondary.stats import snapshot
    from hotplane.shared.burst import QueueState
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init

    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    try:
        st = QueueState.attach(inst.directory.lookup_checked("afp.ia.state", QUEUE_STATE).view)
        deadline = time.monotonic() + 10
        while int(st.words[0][W_KERNEL_DROPS]) < 36 and time.monotonic() < deadline:
            time.sleep(0.02)  # the worker collects on its ~10 ms tick
        assert int(st.words[0][W_KERNEL_DROPS]) == 36 and int(st.words[0][W_RX_FRAMES]) == 64
        # Later frames flow and are not counted as drops; the count is not read twice.
        more = _ip_frames(mib, mia, 10, first=500)
        for f in more:
            snd.send(f)
        assert len(fx.recv_frames(rcv, 10, timeout=10, ethertype=0x0800)) == 10
        rows = {(q["port"], q["queue"]): q for q in snapshot(inst.directory)["queues"]}
        assert rows[("ia", 0)]["kernel_drops"] == 36 and rows[("oa", 0)]["kernel_drops"] == 0
        assert rows[("ia", 0)]["owner_pid"] == wk.pid
        del st
    finally:
        inst.close()
    wk.send_signal(2)
    assert wk.wait(timeout=20) == 0


def _qdisc_bypass(sock: socket.socket) -> int:
    return struct.unpack("=i", sock.getsockopt(ap.SOL_PACKET, ap.PACKET_QDISC_BYPASS, 4))[0]


@netns_only
def test_tx_sockets_bypass_the_qdisc_unless_disabled(veth, closing):
    """PACKET_QDISC_BYPASS is on for every queue socket and the generator's TX socket; off on request."""
    ns, _, _ = veth
    qs = open_queues(closing, "va", 2, "inside", SMALL, netns=ns)
    assert [_qdisc_bypass(q.sock) for q in qs] == [1, 1]
    (plain,) = open_queues(closing, "vb", 1, "inside", ap.RingParams(frame_size=2048, frame_nr=64, qdisc_bypass=False), netns=ns)
    assert _qdisc_bypass(plain.sock) == 0
    from hotplane.secondary.gen import open_tx_ring

    with ap.netns_scope(ns):
        sock, _tx, bell, _info = open_tx_ring("va", SMALL)
    closing.append(sock)
    assert _qdisc_bypass(sock) == 1
