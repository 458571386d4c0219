"""Steering: the inside/outside functions of CONTRACTS.md, and software RSS."""

from __future__ import annotations

import importlib.util
import pathlib
import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared.steering import (
    DEFAULT_RSS_KEY,
    Steering,
    default_block,
    rss_hash,
    steer_inside,
    steer_outside,
    steer_rss,
    toeplitz_hash,
)


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_ports_util")
interp = _load("_bpf_util")


# -- a per-packet reference written straight from the contract's words --------------

ICMP_ERRORS = (3, 4, 5, 11, 12)


def ref_quoted(frame: bytes, l4: int, which: str) -> int:
    """The port an ICMP error at ``frame[l4:]`` is steered by: the quoted packet (after the
    8-byte ICMP header) must be IPv4 with IHL >= 5 and hold the L4 bytes read; else 0."""
    q = frame[l4 + 8 :]
    if len(q) < 20 or q[0] >> 4 != 4 or q[0] & 0xF < 5:
        return 0
    el4 = 4 * (q[0] & 0xF)
    if q[9] in (6, 17) and len(q) >= el4 + 4:
        return struct.unpack_from("!HH", q, el4)[0 if which == "src" else 1]
    if q[9] == 1 and len(q) >= el4 + 6 and q[el4] in (0, 8):
        return struct.unpack_from("!H", q, el4 + 4)[0]
    return 0


def ref_inside(frame: bytes, nq: int) -> int:
    L = len(frame)
    if L < 14:
        return 0
    if struct.unpack_from("!H", frame, 12)[0] != 0x0800 or L < 15 or not 0x45 <= frame[14] <= 0x4F:
        return 0  # not IPv4
    if L < 30:
        return 0
    src = struct.unpack_from("!I", frame, 26)[0]
    proto = frame[23]
    fragment = (frame[20] & 0x20) or (struct.unpack_from("!H", frame, 20)[0] & 0x1FFF)
    l4 = 14 + 4 * (frame[14] & 0xF)
    sport = 0
    if not fragment and proto in (6, 17):
        if L < l4 + 2:
            return 0
        sport = struct.unpack_from("!H", frame, l4)[0]
    elif not fragment and proto == 1:
        if L < l4 + 1:
            return 0
        if frame[l4] == 8:
            if L < l4 + 6:
                return 0
            sport = struct.unpack_from("!H", frame, l4 + 4)[0]
        elif frame[l4] in ICMP_ERRORS:
            sport = ref_quoted(frame, l4, "dst")
    h = (src & 0xFFFF) ^ (src >> 16) ^ sport
    return h % nq


def ref_outside(frame: bytes, nq: int, port_lo: int, block: int) -> int:
    L = len(frame)
    if L < 15 or struct.unpack_from("!H", frame, 12)[0] != 0x0800 or not 0x45 <= frame[14] <= 0x4F:
        return 0
    if L < 24:
        return 0
    proto = frame[23]
    fragment = (frame[20] & 0x20) or (struct.unpack_from("!H", frame, 20)[0] & 0x1FFF)
    l4 = 14 + 4 * (frame[14] & 0xF)
    dport = 0
    if not fragment and proto in (6, 17):
        if L < l4 + 4:
            return 0
        dport = struct.unpack_from("!H", frame, l4 + 2)[0]
    elif not fragment and proto == 1:
        if L < l4 + 1:
            return 0
        if frame[l4] == 0:
            if L < l4 + 6:
                return 0
            dport = struct.unpack_from("!H", frame, l4 + 4)[0]
        elif frame[l4] in ICMP_ERRORS:
            dport = ref_quoted(frame, l4, "src")
    return ((dport - port_lo) // block) % nq if dport >= port_lo else dport % nq


# -- strategies -------------------------------------------------------------------------

ips = st.integers(0, 2**32 - 1)
ports = st.integers(0, 65535)


def icmp_error(icmp_type: int, quote: bytes, code: int = 3) -> bytes:
    return struct.pack("!BBHI", icmp_type, code, 0, 0) + quote


@st.composite
def quotes_st(draw):
    """The packet an ICMP error quotes: any protocol, any IHL byte, cut anywhere (or garbage)."""
    kind = draw(st.sampled_from(["udp", "tcp", "echo", "icmp", "other", "junk"]))
    if kind == "junk":
        return draw(st.binary(max_size=40))
    src, dst = draw(ips), draw(ips)
    ihl = draw(st.sampled_from([5, 5, 5, 6, 15, 4]))
    if kind == "udp":
        q = u.ipv4_frame(src, dst, 17, u.udp(draw(ports), draw(ports)), ihl=ihl)
    elif kind == "tcp":
        q = u.ipv4_frame(src, dst, 6, u.tcp(draw(ports), draw(ports)), ihl=ihl)
    elif kind in ("echo", "icmp"):
        t = draw(st.sampled_from([0, 8])) if kind == "echo" else draw(st.integers(0, 255))
        q = u.ipv4_frame(src, dst, 1, u.icmp_echo(t, draw(ports)), ihl=ihl)
    else:
        q = u.ipv4_frame(src, dst, draw(st.integers(0, 255)), b"\x00" * 8, ihl=ihl)
    q = q[14:]
    if draw(st.booleans()):
        q = bytes([draw(st.integers(0, 255))]) + q[1:]  # any version/IHL byte
    return q[: draw(st.integers(0, len(q)))] if draw(st.booleans()) else q


@st.composite
def frames_st(draw):
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "other", "arp", "frag", "icmp_error", "icmp_error"]))
    src, dst = draw(ips), draw(ips)
    ihl = draw(st.sampled_from([5, 5, 5, 6, 15, 4]))
    if kind == "udp":
        f = u.ipv4_frame(src, dst, 17, u.udp(draw(ports), draw(ports)), ihl=ihl)
    elif kind == "tcp":
        f = u.ipv4_frame(src, dst, 6, u.tcp(draw(ports), draw(ports)), ihl=ihl)
    elif kind == "icmp":
        f = u.ipv4_frame(src, dst, 1, u.icmp_echo(draw(st.sampled_from([0, 8, 3, 11])), draw(ports)), ihl=ihl)
    elif kind == "other":
        f = u.ipv4_frame(src, dst, 47, b"\x00" * 8, ihl=ihl)
    elif kind == "icmp_error":
        t = draw(st.sampled_from([*ICMP_ERRORS, 0, 8, 13, 2, 6]))
        frag = draw(st.sampled_from([0, 0, 0, 0x4000, 0x2000, 1]))
        f = u.ipv4_frame(src, dst, 1, icmp_error(t, draw(quotes_st())), ihl=ihl, frag=frag)
    elif kind == "frag":
        f = u.ipv4_frame(src, dst, 17, u.udp(draw(ports), draw(ports)), frag=draw(st.sampled_from([0x2000, 0x0001, 0x2010, 0x4000])), ihl=ihl)
    else:
        f = u.ipv4_frame(src, dst, 17, u.udp(1, 2), ethertype=0x0806)
    cut = draw(st.one_of(st.just(len(f)), st.integers(0, len(f))))
    return f[:cut]


@settings(max_examples=300, deadline=None)
@given(st.lists(frames_st(), min_size=1, max_size=20), st.integers(1, 16), st.integers(0, 4000), st.integers(1, 5000))
def test_vectorized_functions_match_the_contract(frames, nq, port_lo, block):
    arr, lengths = u.to_array([f if f else b"" for f in frames], width=max(1, max(len(f) for f in frames)))
    assert steer_inside(arr, lengths, nq).tolist() == [ref_inside(f, nq) for f in frames]
    assert steer_outside(arr, lengths, nq, port_lo, block).tolist() == [ref_outside(f, nq, port_lo, block) for f in frames]


@settings(max_examples=200, deadline=None)
@given(st.lists(frames_st(), min_size=1, max_size=10), st.integers(1, 16), st.integers(0, 4000), st.integers(1, 5000))
def test_vectorized_functions_match_the_cbpf_reference(frames, nq, port_lo, block):
    """The numpy functions and the fanout program's reference (shared/bpf.py) agree frame for frame."""
    bpf = pytest.importorskip("hotplane.shared.bpf")
    arr, lengths = u.to_array([f if f else b"" for f in frames], width=max(1, max(len(f) for f in frames)))
    got_in, got_out = steer_inside(arr, lengths, nq).tolist(), steer_outside(arr, lengths, nq, port_lo, block).tolist()
    assert got_in == [bpf.steering_queue(f, "inside", nq) for f in frames]
    assert got_out == [bpf.steering_queue(f, "outside", nq, port_lo, block) for f in frames]
    # and the fanout programs themselves, run by the cBPF interpreter
    assert got_in == [interp.run(bpf.inside_program(nq), f) for f in frames]
    assert got_out == [interp.run(bpf.outside_program(nq, port_lo, block), f) for f in frames]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), ips, ports, ips, ports, st.data(), st.sampled_from(["udp", "tcp", "icmp"]))
def test_both_directions_of_a_session_land_on_one_queue(nq, inside_ip, sport, remote_ip, rport, data, proto):
    """Inside packet -> queue q; NAT allocates the outside port from q's block; the reply steers to q."""
    steer = Steering("outside", nq)  # default port_lo and block
    if proto == "icmp":
        out = u.ipv4_frame(inside_ip, remote_ip, 1, u.icmp_echo(8, sport))
    else:
        l4 = u.udp(sport, rport) if proto == "udp" else u.tcp(sport, rport)
        out = u.ipv4_frame(inside_ip, remote_ip, 17 if proto == "udp" else 6, l4)
    arr, ln = u.to_array([out])
    q = int(steer_inside(arr, ln, nq)[0])
    block = steer.port_block(q)
    nat_port = data.draw(st.integers(block.start, block.stop - 1))
    if proto == "icmp":
        back = u.ipv4_frame(remote_ip, 0xC6120001, 1, u.icmp_echo(0, nat_port))
    else:
        l4 = u.udp(rport, nat_port) if proto == "udp" else u.tcp(rport, nat_port)
        back = u.ipv4_frame(remote_ip, 0xC6120001, 17 if proto == "udp" else 6, l4)
    arr, ln = u.to_array([back])
    assert int(steer(arr, ln)[0]) == q


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 64), ips, ports, ips, ports, st.data(), st.sampled_from(["udp", "tcp", "icmp"]),
       st.sampled_from(ICMP_ERRORS), st.sampled_from([5, 6, 15]), st.sampled_from([8, 28, 500]))
def test_icmp_errors_reach_the_queue_of_their_session(nq, inside_ip, sport, remote_ip, rport, data, proto, etype, eihl, keep):
    """An ICMP error about a translated packet, from either side, steers to the session's queue
    (the quote keeps ``keep`` bytes of L4 at least: RFC 792 guarantees 8)."""
    pool = 0xC6120001
    steer = Steering("outside", nq)
    pnum = {"udp": 17, "tcp": 6, "icmp": 1}[proto]

    def l4(a: int, b: int, echo_type: int) -> bytes:
        return u.icmp_echo(echo_type, a) if proto == "icmp" else (u.udp(a, b) if proto == "udp" else u.tcp(a, b))

    out = u.ipv4_frame(inside_ip, remote_ip, pnum, l4(sport, rport, 8))
    q = int(steer_inside(*u.to_array([out]), nq)[0])
    nat_port = data.draw(st.integers(steer.port_block(q).start, steer.port_block(q).stop - 1))
    # outside: the remote (or a router on the way) quotes what the NAT sent: pool:nat_port -> remote
    sent = u.ipv4_frame(pool, remote_ip, pnum, l4(nat_port, rport, 8), ihl=eihl)[14:]
    sent = sent[: 4 * eihl + keep]
    reporter = data.draw(ips)
    err_out = u.ipv4_frame(reporter, pool, 1, icmp_error(etype, sent))
    # inside: the inside host quotes what it received: remote -> inside_ip:sport
    got = u.ipv4_frame(remote_ip, inside_ip, pnum, l4(sport, rport, 0) if proto == "icmp" else l4(rport, sport, 0), ihl=eihl)[14:]
    got = got[: 4 * eihl + keep]
    err_in = u.ipv4_frame(inside_ip, remote_ip, 1, icmp_error(etype, got))
    assert int(steer(*u.to_array([err_out]))[0]) == q
    assert int(steer_inside(*u.to_array([err_in]), nq)[0]) == q
    bpf = pytest.importorskip("hotplane.shared.bpf")
    assert bpf.steering_queue(err_out, "outside", nq) == interp.run(bpf.outside_program(nq), err_out) == q
    assert bpf.steering_queue(err_in, "inside", nq) == interp.run(bpf.inside_program(nq), err_in) == q


def test_icmp_error_quotes_that_fall_back_to_port_zero():
    """Truncated or unsupported quotes steer as port 0: queue 0 outside, the address hash inside."""
    nq, src = 7, 0x0A000106
    addr = (0x0A00 ^ 0x0106) % nq
    assert addr != 0
    udp = u.ipv4_frame(0xC6120001, 0x05060708, 17, u.udp(40000, 53))[14:]  # 28 bytes
    echo = u.ipv4_frame(0xC6120001, 0x05060708, 1, u.icmp_echo(8, 40000))[14:]
    opts = u.ipv4_frame(0xC6120001, 0x05060708, 17, u.udp(40000, 53), ihl=15)[14:]
    cases = {
        "no quote": b"",
        "quote header cut": udp[:19],
        "ports cut": udp[:23],
        "options eat the ports": opts[:60 + 3],
        "echo id cut": echo[:25],
        "timestamp": echo[:20] + bytes([13]) + echo[21:],
        "gre": udp[:9] + bytes([47]) + udp[10:],
        "ipv6 quote": bytes([0x60]) + udp[1:],
        "IHL 4": bytes([0x44]) + udp[1:],
    }
    for what, quote in cases.items():
        f = u.ipv4_frame(src, 0x05060708, 1, icmp_error(3, quote))
        arr, ln = u.to_array([f])
        assert steer_outside(arr, ln, nq).tolist() == [0], what
        assert steer_inside(arr, ln, nq).tolist() == [addr], what
    # the whole quote, for contrast: steered by the ports (no wider array than the frame needed)
    f = u.ipv4_frame(src, 0x05060708, 1, icmp_error(3, udp))
    arr, ln = u.to_array([f])
    assert steer_inside(arr, ln, nq).tolist() == [(0x0A00 ^ 0x0106 ^ 53) % nq]
    assert steer_outside(arr, ln, nq, 0, 1).tolist() == [40000 % nq]
    assert steer_outside(arr, ln, nq, 1024, 100).tolist() == [((40000 - 1024) // 100) % nq]
    # a fragment of an ICMP error, or a too-short ICMP header, is steered as before
    frag = u.ipv4_frame(src, 0x05060708, 1, icmp_error(3, udp), frag=0x2000)
    arr, ln = u.to_array([frag, f[:34]])
    assert steer_outside(arr, ln, nq).tolist() == [0, 0]
    assert steer_inside(arr, ln, nq).tolist() == [addr, 0]


def test_default_block_and_port_blocks_tile_the_range():
    assert default_block(4) == (65536 - 1024) // 4
    s = Steering("outside", 3)
    blocks = [s.port_block(q) for q in range(3)]
    assert blocks[0].start == 1024 and blocks[1].start == blocks[0].stop and blocks[2].stop <= 65536


def test_non_ipv4_and_short_frames_go_to_queue_zero():
    arp = u.ipv4_frame(0x01020304, 0x05060708, 17, u.udp(4000, 5000), ethertype=0x0806)
    udp = u.ipv4_frame(0x01020304, 0x05060708, 17, u.udp(4000, 5000))
    arr, ln = u.to_array([arp, udp[:10], udp[:35], udp])
    assert steer_inside(arr, ln, 7).tolist()[:3] == [0, 0, 0]
    assert steer_outside(arr, ln, 7).tolist()[:3] == [0, 0, 0]
    assert steer_inside(arr, ln, 7)[3] == ((0x0102 ^ 0x0304 ^ 4000) % 7)


# -- Toeplitz / RSS ------------------------------------------------------------------------

# Microsoft's RSS verification suite (IPv4): (src, sport, dst, dport, hash of 2-tuple, hash of 4-tuple).
MS_VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]


@pytest.mark.parametrize("src,sport,dst,dport,h2,h4", MS_VECTORS)
def test_toeplitz_matches_the_published_vectors(src, sport, dst, dport, h2, h4):
    two = np.frombuffer(socket.inet_aton(src) + socket.inet_aton(dst), np.uint8)
    four = np.frombuffer(socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport), np.uint8)
    assert int(toeplitz_hash(DEFAULT_RSS_KEY, two)[0]) == h2
    assert int(toeplitz_hash(DEFAULT_RSS_KEY, four)[0]) == h4
    ip = lambda a: struct.unpack("!I", socket.inet_aton(a))[0]  # noqa: E731
    arr, ln = u.to_array(
        [u.ipv4_frame(ip(src), ip(dst), 6, u.tcp(sport, dport)), u.ipv4_frame(ip(src), ip(dst), 47, b"\x00" * 8)]
    )
    assert rss_hash(arr, ln).tolist() == [h4, h2]


def test_rss_uses_the_indirection_table():
    frames = [u.ipv4_frame(0x64400000 + i, 0xC6120001, 17, u.udp(1000 + i, 53)) for i in range(200)]
    arr, ln = u.to_array(frames)
    h = rss_hash(arr, ln)
    q = steer_rss(arr, ln, 4)
    assert q.tolist() == ((h & 127) % 4).tolist()
    table = np.full(128, 2)
    assert set(steer_rss(arr, ln, 4, indirection=table).tolist()) == {2}
    assert set(Steering("rss", 4)(arr, ln).tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="indirection"):
        steer_rss(arr, ln, 4, indirection=np.full(128, 4))


def test_bad_steering_parameters_are_refused():
    with pytest.raises(ValueError, match="mode"):
        Steering("random", 2)
    with pytest.raises(ValueError, match="nqueues"):
        Steering("inside", 0)
    with pytest.raises(ValueError, match="40 bytes"):
        Steering("rss", 2, key=b"short")
