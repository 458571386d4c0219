"""ring:NAME ports and the port-spec parser."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import pathlib
import time

import numpy as np
import pytest

from hotplane.schema.registry import SchemaError
from hotplane.shared.burst import forward_burst, rx_burst, rx_release, tx_space
from hotplane.shared.ring_port import PortSpec, RingPort, alloc_buffers, buffers_size, parse_port_spec
from hotplane.shared.steering import Steering


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_ports_util")


# -- port specs ------------------------------------------------------------------


def test_parse_ring_spec_with_defaults_and_options():
    s = parse_port_spec("ring:in,queues=2")
    assert s == PortSpec("ring", "in", {"queues": 2, "slots": 1024, "frame": 2048, "steer": "rss"})
    s = parse_port_spec("ring:out-1, queues=4, slots=256, frame=1024, steer=outside, port_lo=2048, block=1000")
    assert (s.type, s.name, s.queues) == ("ring", "out-1", 4)
    assert s.options["steer"] == "outside" and s.options["block"] == 1000
    st = s.steering()
    assert (st.mode, st.nqueues, st.port_lo, st.block) == ("outside", 4, 2048, 1000)


def test_parse_af_packet_and_pcap_specs():
    assert parse_port_spec("af_packet:veth0,queues=3") == PortSpec("af_packet", "veth0", {"queues": 3, "slots": 1024, "frame": 2048, "steer": "rss"})
    p = parse_port_spec("pcap:/tmp/a,b.pcap,mode=capture")
    assert (p.name, p.options["mode"], p.options["rate"]) == ("/tmp/a,b.pcap", "capture", "recorded")
    p = parse_port_spec("pcap:x.pcap,rate=max,loop=3")
    assert (p.options["mode"], p.options["rate"], p.options["loop"]) == ("replay", "max", 3)
    assert str(parse_port_spec(str(p))) == str(p)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("in", "no 'type:' prefix"),
        ("tap:x", "unknown port type 'tap'"),
        ("ring:", "needs a name"),
        ("ring:a b", "letters, digits"),
        ("ring:in,queues=two", "not an integer"),
        ("ring:in,queues=0", "between 1 and"),
        ("ring:in,slots=1000", "power of two"),
        ("ring:in,frame=100", "multiple of 16"),
        ("ring:in,colour=red", "unknown option 'colour'"),
        ("ring:in,queues=2,queues=3", "given twice"),
        ("ring:in,,queues=2", "empty option"),
        ("ring:in,queues", "not key=value"),
        ("ring:in,steer=random", "not one of inside, outside, rss"),
        ("af_packet:this-name-is-too-long", "not an interface name"),
        ("pcap:f.pcap,mode=both", "not one of replay, capture"),
        ("pcap:f.pcap,loop=0", "at least 1"),
        ("af_packet:eth0,mode=replay", "unknown option 'mode'"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_port_spec(spec)


# -- ring ports --------------------------------------------------------------------


def test_layout_names_every_zone():
    lay = RingPort.layout("in", 2, 64, 256)
    names = [n for n, _ in lay]
    assert names == ["ring.in.state", "ring.in.q0.rx", "ring.in.q0.tx", "ring.in.q1.rx", "ring.in.q1.tx"]
    assert dict(lay)["ring.in.q1.tx"] == 128 + 64 * 256


def test_create_then_attach_sees_the_same_rings():
    lay = RingPort.layout("p", 2, 32, 256)
    bufs = alloc_buffers(lay)
    port = RingPort.create("p", bufs, 2, 32, 256)
    other = RingPort.attach("p", bufs)
    assert (other.nqueues, other.nslots, other.frame_size) == (2, 32, 256)
    frames, lengths = u.random_frames(np.random.default_rng(1), 5, 100)
    port.peer_send(frames, lengths, queues=np.array([1, 1, 1, 1, 1]))
    b = rx_burst(other.queues[1], 32)
    assert u.as_bytes(b.frames, b.lengths) == u.as_bytes(frames, lengths)


def test_attach_refuses_missing_or_uninitialised_zones():
    lay = RingPort.layout("p", 1, 32, 256)
    bufs = alloc_buffers(lay)
    with pytest.raises(SchemaError):
        RingPort.attach("p", bufs)
    RingPort.create("p", bufs, 1, 32, 256)
    del bufs["ring.p.q0.tx"]
    with pytest.raises(ValueError, match="no buffer"):
        RingPort.attach("p", bufs)


def test_from_spec_checks_geometry_on_attach():
    spec = parse_port_spec("ring:g,queues=2,slots=32,frame=256")
    bufs = alloc_buffers(RingPort.layout_for(spec))
    RingPort.from_spec(spec, bufs, create=True)
    assert RingPort.from_spec("ring:g,queues=2,slots=32,frame=256,steer=inside", bufs, create=False).steering.mode == "inside"
    with pytest.raises(ValueError, match="the spec says"):
        RingPort.from_spec("ring:g,queues=2,slots=64,frame=256", bufs, create=False)


def test_peer_send_steers_and_keeps_order_per_queue():
    port = RingPort.create("s", alloc_buffers(RingPort.layout("s", 4, 256, 256)), 4, 256, 256, Steering("inside", 4))
    frames_l = [u.ipv4_frame(0x64400000 + (i % 7), 0xC6120001, 17, u.udp(1000 + i % 13, 53)) for i in range(300)]
    frames, lengths = u.to_array(frames_l)
    queues = port.steering(frames, lengths)
    sent = port.peer_send(frames, lengths)
    assert sent.sum() == 300 and sent.tolist() == np.bincount(queues, minlength=4).tolist()
    for qi, q in enumerate(port.queues):
        got = []
        while True:
            b = rx_burst(q, 64)
            if b.n == 0:
                break
            got.extend(u.as_bytes(b.frames, b.lengths))
            rx_release(q, b)
        assert got == [f for f, qq in zip(frames_l, queues) if qq == qi]


def test_peer_send_rejects_bad_queue_indexes():
    port = RingPort.create("s", alloc_buffers(RingPort.layout("s", 2, 32, 256)), 2, 32, 256)
    with pytest.raises(ValueError, match="queue indexes"):
        port.peer_send(np.zeros((2, 60), np.uint8), np.array([60, 60]), queues=np.array([0, 2]))


def _peer(mm_and_buf, layout_names, n, seed, deadline):
    """Child: a generator and a sink on the shared port: feeds n frames, collects what comes back."""
    _, mem = mm_and_buf
    bufs = alloc_buffers(layout_names, mem)
    port = RingPort.attach("x", bufs, Steering("rss", 2))
    frames, lengths = u.random_frames(np.random.default_rng(seed), n, 190)
    out = np.zeros((256, 256), np.uint8)
    out_len = np.zeros(256, np.uint32)
    sent = 0
    back: list[bytes] = []
    while (sent < n or len(back) < n) and time.monotonic() < deadline:
        k = 0
        if sent < n:
            k = min(port.rx_rings[0].peer_space(64), n - sent)
            if k:
                port.peer_send(frames[sent : sent + k], lengths[sent : sent + k], queues=np.zeros(k, np.int64))
                sent += k
        got = port.peer_recv(256, out, out_len)
        back.extend(u.as_bytes(out, out_len[:got]))
        if not k and not got:
            time.sleep(0.0001)
    os._exit(0 if back == u.as_bytes(frames, lengths) else 1)


@pytest.mark.timeout(60)
def test_cross_process_generator_worker_sink():
    lay = RingPort.layout("x", 2, 64, 256)
    mm, mem = u.shared(buffers_size(lay))
    port = RingPort.create("x", alloc_buffers(lay, mem), 2, 64, 256)
    n = 5000
    p = multiprocessing.get_context("fork").Process(target=_peer, args=((mm, mem), lay, n, 3, time.monotonic() + 40))
    p.start()
    try:
        fwd = 0
        deadline = time.monotonic() + 40
        while p.is_alive() and time.monotonic() < deadline:
            room = tx_space(port.queues[0], 32)  # lossless: poll only what TX can take
            r = forward_burst(port.queues[0], port.queues[0], room) if room else None
            fwd += r.sent if r else 0
            if not r or r.received == 0:
                time.sleep(0.0001)
        p.join(10)
        assert p.exitcode == 0, "the peer did not get back exactly what it sent, in order"
        assert fwd == n and port.state.counters(0)["tx_frames"] == n
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
