"""The cBPF assembler and the steering programs.

The programs are checked three ways: a small interpreter (``_bpf_util``) runs
them on crafted and random frames and must agree with
``bpf.steering_queue`` (the plain-Python reference); that reference must
agree with the CONTRACTS formula applied to the fields the frames were built
from; and the kernel must accept every program. ``test_af_packet.py`` then
runs them in the kernel's fanout and checks which socket receives each frame.
"""

from __future__ import annotations

import importlib.util
import pathlib
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared import bpf


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


interp = _load("_bpf_util")
fx = _load("_af_packet_util")

DST = fx.mac("02:00:00:00:00:01")
SRC = fx.mac("02:00:00:00:00:02")


# --- the assembler ---------------------------------------------------------------------


def test_encoding_of_known_instructions():
    a = bpf.Asm()
    a.ld_abs(12, bpf.H)  # ldh [12]
    a.jeq(0x0800, jt="yes", jf="no")
    a.label("yes")
    a.ret(0xFFFF)
    a.label("no")
    a.ret(0)
    assert a.resolve() == [(0x28, 0, 0, 12), (0x15, 0, 1, 0x0800), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
    blob = a.assemble()
    assert len(blob) == 32
    assert struct.unpack_from("=HBBI", blob, 8) == (0x15, 0, 1, 0x0800)


def test_negative_offsets_stored_as_u32_and_ja_offsets():
    a = bpf.Asm().ld_net(9, bpf.B).jmp("end").ret(1).ret(2).label("end").ret_a()
    ins = a.resolve()
    assert ins[0] == (0x30, 0, 0, (bpf.SKF_NET_OFF + 9) & 0xFFFFFFFF)
    assert ins[1] == (0x05, 0, 0, 2)  # skips the two rets


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda a: a.jmp("nowhere").ret(0), "undefined label"),
        (lambda a: a.label("top").ret(0).jmp("top").ret(0), "backwards"),
        (lambda a: a.label("x").label("x"), "defined twice"),
        (lambda a: a.ld_imm(1), "must end with a ret"),
        (lambda a: a, "empty program"),
        (lambda a: a.ld_imm(1).div(0), "division by constant zero"),
    ],
)
def test_assembler_rejects_bad_programs(build, message):
    with pytest.raises(bpf.BpfError, match=message):
        build(bpf.Asm()).resolve()


def test_conditional_jump_limit():
    a = bpf.Asm().ld_imm(0).jeq(0, jt="far")
    for _ in range(256):
        a.ld_imm(1)
    a.label("far").ret(0)
    with pytest.raises(bpf.BpfError, match="limit 255"):
        a.resolve()


def test_sock_fprog_layout():
    blob = bpf.inside_program(4).assemble()
    fp = bpf.SockFprog(blob)
    raw = bytes(fp)
    assert len(raw) == 16  # u16 len, padding, 8-byte pointer
    count, ptr = struct.unpack("@HP", raw)
    assert count == len(blob) // 8 and ptr != 0


@pytest.mark.parametrize("mode", ["inside", "outside"])
@pytest.mark.parametrize("nq", [1, 2, 3, 4, 7, 16, 256])
def test_kernel_accepts_steering_programs(mode, nq):
    # SO_ATTACH_FILTER runs the kernel's classic-BPF checker; a UDP socket needs no privileges.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        bpf.setsockopt_program(s, socket.SOL_SOCKET, 26, bpf.steering_program(mode, nq, 1024 if mode == "outside" else 0))
        bpf.setsockopt_program(s, socket.SOL_SOCKET, 26, bpf.drop_outgoing_program())
    finally:
        s.close()


def test_steering_argument_checks():
    with pytest.raises(bpf.BpfError):
        bpf.steering_program("sideways", 2)
    with pytest.raises(bpf.BpfError):
        bpf.inside_program(0)
    with pytest.raises(bpf.BpfError):
        bpf.outside_program(2, port_lo=1024, block=0)
    assert bpf.default_block(4) == (65536 - 1024) // 4


# --- the programs against the reference ------------------------------------------------


def icmp_error(type_: int, quote: bytes, code: int = 3) -> bytes:
    """An ICMP error message quoting ``quote`` (an IPv4 packet, possibly cut)."""
    body = struct.pack("!BBHI", type_, code, 0, 0) + quote
    return body[:2] + struct.pack("!H", fx.csum(body)) + body[4:]


def contracts_queue(mode, nq, *, src_ip="0.0.0.0", port=0, ipv4=True, port_lo=1024, block=None):
    """The CONTRACTS formula from the fields (not from a frame)."""
    block = block or (65536 - port_lo) // nq
    if not ipv4:
        return 0
    if mode == "inside":
        ip = struct.unpack("!I", socket.inet_aton(src_ip))[0]
        return ((ip & 0xFFFF) ^ (ip >> 16) ^ port) % nq
    return ((port - port_lo) // block) % nq if port >= port_lo else port % nq


def crafted_cases():
    """(frame, fields) with the fields the CONTRACTS formula needs, per mode."""
    inside_ip, out_ip = "100.64.3.7", "198.18.0.2"
    cases = []
    for sport, dport in [(0, 0), (1, 1023), (1023, 1024), (40000, 1024 + 16127), (65535, 65535), (5353, 33)]:
        for proto, l4 in ((17, fx.udp(sport, dport, b"x")), (6, fx.tcp(sport, dport))):
            f = fx.eth(DST, SRC, 0x0800, fx.ipv4(inside_ip, out_ip, proto, l4))
            cases.append((f, dict(src_ip=inside_ip, port=sport), dict(port=dport)))
    # ICMP: echo request id counts inside, echo reply id counts outside, others are 0
    for t in (0, 8, 3, 11):
        f = fx.eth(DST, SRC, 0x0800, fx.ipv4(inside_ip, out_ip, 1, fx.icmp(t, 4321)))
        cases.append((f, dict(src_ip=inside_ip, port=4321 if t == 8 else 0), dict(port=4321 if t == 0 else 0)))
    # ICMP errors: steered by the quote (after the 8-byte ICMP header); outside by its source
    # port (the NAT's), inside by its destination port; a quoted echo/echo reply by its id
    for t in bpf.ICMP_ERRORS:
        for quote_l4, qproto, (qs, qd) in ((fx.udp(40001, 53), 17, (40001, 53)), (fx.tcp(2000, 443), 6, (2000, 443)),
                                           (fx.icmp(8, 777), 1, (777, 777)), (fx.icmp(0, 778), 1, (778, 778))):
            for opts in (b"", b"\x01" * 40):
                quote = fx.ipv4(out_ip, "198.51.100.7", qproto, quote_l4, options=opts)
                for keep in (len(quote), len(quote) - len(quote_l4) + 8):  # RFC 792: 8 bytes of L4 at least
                    f = fx.eth(DST, SRC, 0x0800, fx.ipv4(inside_ip, out_ip, 1, icmp_error(t, quote[:keep])))
                    cases.append((f, dict(src_ip=inside_ip, port=qd), dict(port=qs)))
    # ... but only a quote that is whole enough: else port 0 (not queue 0: the address still counts inside)
    good = fx.ipv4(out_ip, "198.51.100.7", 17, fx.udp(40001, 53))
    echo = fx.ipv4(out_ip, "198.51.100.7", 1, fx.icmp(8, 777))
    for quote in (b"", good[:19], good[:23], echo[:25], echo[:20] + b"\x0d" + echo[21:], good[:9] + b"\x2f" + good[10:],
                  b"\x65" + good[1:], b"\x44" + good[1:], b"\x60" + good[1:]):
        f = fx.eth(DST, SRC, 0x0800, fx.ipv4(inside_ip, out_ip, 1, icmp_error(3, quote)))
        cases.append((f, dict(src_ip=inside_ip, port=0), dict(port=0)))
    # a fragmented ICMP error is a fragment first
    f = fx.eth(DST, SRC, 0x0800, fx.ipv4(inside_ip, out_ip, 1, icmp_error(3, good), frag=0x2000))
    cases.append((f, dict(src_ip=inside_ip, port=0), dict(port=0)))
    # fragments: first (MF), middle/last (offset): ports count as 0
    for frag in (0x2000, 0x2000 | 185, 185, 0x4000):  # 0x4000 = DF only: not a fragment
        f = fx.eth(DST, SRC, 0x0800, fx.ipv4(inside_ip, out_ip, 17, fx.udp(5000, 7000, b"y" * 8), frag=frag))
        p = (5000, 7000) if frag == 0x4000 else (0, 0)
        cases.append((f, dict(src_ip=inside_ip, port=p[0]), dict(port=p[1])))
    # IP options move the ports
    f = fx.eth(DST, SRC, 0x0800, fx.ipv4("100.127.255.254", out_ip, 17, fx.udp(2222, 3333), options=b"\x01\x01\x01\x00"))
    cases.append((f, dict(src_ip="100.127.255.254", port=2222), dict(port=3333)))
    # other protocol (GRE)
    f = fx.eth(DST, SRC, 0x0800, fx.ipv4(inside_ip, out_ip, 47, b"\0" * 8))
    cases.append((f, dict(src_ip=inside_ip, port=0), dict(port=0)))
    # not IPv4: ARP, IPv6, the test ethertype
    for et in (0x0806, 0x86DD, fx.ETH_TEST):
        f = fx.eth(DST, SRC, et, b"\x45" + b"\0" * 40)
        cases.append((f, dict(ipv4=False), dict(ipv4=False)))
    return cases


@pytest.mark.parametrize("nq", [1, 2, 3, 4, 8])
def test_crafted_frames_all_three_agree(nq):
    for frame, inside_fields, outside_fields in crafted_cases():
        for mode, fields in (("inside", inside_fields), ("outside", outside_fields)):
            want = contracts_queue(mode, nq, **fields)
            ref = bpf.steering_queue(frame, mode, nq)
            got = interp.run(bpf.steering_program(mode, nq), frame)
            assert ref == want, (mode, nq, frame.hex())
            assert got == want, (mode, nq, frame.hex())


def test_malformed_frames_go_to_queue_0():
    good = fx.eth(DST, SRC, 0x0800, fx.ipv4("100.64.0.9", "198.18.0.2", 17, fx.udp(40001, 40002)))
    malformed = [
        good[:14],  # no IP header at all
        good[:14 + 19],  # IP header cut short
        good[:14 + 20 + 1],  # UDP ports cut short
        good[:14] + b"\x44" + good[15:],  # IHL 4 (< 5)
        good[:14] + b"\x65" + good[15:],  # version 6 in an IPv4 ethertype
        good[:10],  # runt
    ]
    for nq in (2, 3, 5):
        for frame in malformed:
            for mode in ("inside", "outside"):
                assert bpf.steering_queue(frame, mode, nq) == 0
                assert interp.run(bpf.steering_program(mode, nq), frame) == 0
    # and the intact frame does not go to 0 for every nq (the test above could not fail otherwise)
    assert {bpf.steering_queue(good, "inside", nq) for nq in range(2, 12)} != {0}


def test_outside_port_blocks():
    nq, lo, block = 4, 1024, 100
    prog = bpf.outside_program(nq, lo, block)
    for dport in (0, 3, 1023, 1024, 1123, 1124, 1223, 1224, 1424, 1523, 65535):
        f = fx.eth(DST, SRC, 0x0800, fx.ipv4("198.18.0.2", "198.18.1.1", 17, fx.udp(53, dport)))
        want = ((dport - lo) // block) % nq if dport >= lo else dport % nq
        assert interp.run(prog, f) == want == bpf.steering_queue(f, "outside", nq, lo, block)


def test_drop_outgoing_program():
    f = fx.test_frame(DST, SRC, 1)
    prog = bpf.drop_outgoing_program()
    assert interp.run(prog, f, pkttype=bpf.PACKET_OUTGOING) == 0
    for pkttype in (0, 1, 2, 3):  # host, broadcast, multicast, otherhost
        assert interp.run(prog, f, pkttype=pkttype) == 0xFFFFFFFF
    assert interp.run(bpf.drop_all_program(), f) == 0


_ipv4_addr = st.integers(0, 0xFFFFFFFF).map(lambda n: socket.inet_ntoa(struct.pack("!I", n)))


@st.composite
def quotes(draw):
    """What an ICMP error quotes: a random IPv4 packet (any first byte sometimes), cut anywhere, or junk."""
    kind = draw(st.sampled_from(["udp", "tcp", "echo", "icmp", "other", "junk"]))
    if kind == "junk":
        return draw(st.binary(max_size=48))
    src, dst = draw(_ipv4_addr), draw(_ipv4_addr)
    p1, p2 = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    if kind == "udp":
        l4, proto = fx.udp(p1, p2), 17
    elif kind == "tcp":
        l4, proto = fx.tcp(p1, p2), 6
    elif kind == "echo":
        l4, proto = fx.icmp(draw(st.sampled_from([0, 8])), p1), 1
    elif kind == "icmp":
        l4, proto = fx.icmp(draw(st.integers(0, 255)), p1), 1
    else:
        l4, proto = draw(st.binary(max_size=8)), draw(st.integers(0, 255))
    opts = b"\x01" * 4 * draw(st.sampled_from([0, 0, 1, 10]))
    q = fx.ipv4(src, dst, proto, l4, frag=draw(st.sampled_from([0, 0x2000, 5])), options=opts)
    if draw(st.integers(0, 4)) == 0:
        q = bytes([draw(st.integers(0, 255))]) + q[1:]
    cut = draw(st.one_of(st.none(), st.integers(0, len(q))))
    return q if cut is None else q[:cut]


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "other", "nonip", "junk", "icmp_error", "icmp_error"]))
    if kind == "junk":
        return draw(st.binary(min_size=0, max_size=80))
    if kind == "nonip":
        return fx.eth(DST, SRC, draw(st.integers(0, 0xFFFF).filter(lambda e: e != 0x0800)), draw(st.binary(max_size=60)))
    src, dst = draw(_ipv4_addr), draw(_ipv4_addr)
    frag = draw(st.sampled_from([0, 0x4000, 0x2000, 1, 0x1FFF, 0x2000 | 7]))
    opts = b"\x01" * 4 * draw(st.integers(0, 10))
    if kind == "udp":
        l4, proto = fx.udp(draw(st.integers(0, 65535)), draw(st.integers(0, 65535))), 17
    elif kind == "tcp":
        l4, proto = fx.tcp(draw(st.integers(0, 65535)), draw(st.integers(0, 65535))), 6
    elif kind == "icmp":
        l4, proto = fx.icmp(draw(st.sampled_from([0, 8, 3, 5, 11, 13])), draw(st.integers(0, 65535))), 1
    elif kind == "icmp_error":
        l4, proto = icmp_error(draw(st.sampled_from([3, 4, 5, 11, 12, 0, 8, 2, 6, 13])), draw(quotes())), 1
    else:
        l4, proto = draw(st.binary(max_size=16)), draw(st.integers(0, 255))
    frame = fx.eth(DST, SRC, 0x0800, fx.ipv4(src, dst, proto, l4, frag=frag, options=opts))
    cut = draw(st.one_of(st.none(), st.integers(0, len(frame))))
    return frame if cut is None else frame[:cut]


@settings(max_examples=400, deadline=None)
@given(frame=frames(), nq=st.integers(1, 16), port_lo=st.integers(0, 65535), block=st.integers(1, 70000))
def test_programs_match_reference_on_random_frames(frame, nq, port_lo, block):
    assert interp.run(bpf.inside_program(nq), frame) == bpf.steering_queue(frame, "inside", nq)
    assert interp.run(bpf.outside_program(nq, port_lo, block), frame) == bpf.steering_queue(frame, "outside", nq, port_lo, block)



try:
    from hotplane.shared import steering as np_steering
except ImportError:  # written by another module set; the check runs once it exists
    np_steering = None


@pytest.mark.skipif(np_steering is None, reason="hotplane.shared.steering is not there yet")
@settings(max_examples=60, deadline=None)
@given(batch=st.lists(frames(), min_size=0, max_size=40), nq=st.integers(1, 16), port_lo=st.integers(0, 65535), block=st.integers(1, 70000))
def test_numpy_steering_agrees_with_the_programs(batch, nq, port_lo, block):
    """DESIGN invariant 2 needs the numpy steering (hotplane.shared.steering) and the fanout
    programs to agree frame for frame, including malformed and truncated frames."""
    import numpy as np

    batch = batch + [c[0] for c in crafted_cases()]
    width = max(len(f) for f in batch) + 8
    buf = np.full((len(batch), width), 0xA5, np.uint8)  # garbage past each frame's end must not matter
    for i, f in enumerate(batch):
        buf[i, : len(f)] = np.frombuffer(f, np.uint8)
    lengths = np.array([len(f) for f in batch])
    got_in = np_steering.steer_inside(buf, lengths, nq)
    got_out = np_steering.steer_outside(buf, lengths, nq, port_lo, block)
    for i, f in enumerate(batch):
        assert got_in[i] == interp.run(bpf.inside_program(nq), f), f.hex()
        assert got_out[i] == interp.run(bpf.outside_program(nq, port_lo, block), f), f.hex()


# --- the programs in the kernel's fanout ----------------------------------------------------


def _icmp_error_frames(mac_dst: bytes, mac_src: bytes, rng) -> list[bytes]:
    """ICMP errors whose quotes exercise every branch: TCP/UDP/echo with and without options,
    cut to 8 bytes of L4 or anywhere, other protocols and versions; and the crafted ICMP cases."""
    out = []
    for _ in range(40):
        pick = rng.randrange(5)
        a, b = rng.randrange(65536), rng.randrange(65536)
        l4, proto = [(fx.udp(a, b), 17), (fx.tcp(a, b), 6), (fx.icmp(rng.choice([0, 8]), a), 1),
                     (fx.icmp(rng.choice([0, 8]), a), 1), (b"\0" * 8, rng.choice([47, 50, 132]))][pick]
        quote = fx.ipv4("198.18.1.%d" % rng.randrange(16), "203.0.113.%d" % rng.randrange(1, 255), proto, l4,
                        options=b"\x01" * 4 * rng.choice([0, 0, 1, 10]))
        if rng.randrange(4) == 0:
            quote = quote[: rng.randrange(len(quote) + 1)]
        elif rng.randrange(8) == 0:
            quote = bytes([rng.choice([0x44, 0x46, 0x60, 0x4F])]) + quote[1:]
        t = rng.choice(bpf.ICMP_ERRORS)
        ip = fx.ipv4("100.64.%d.%d" % (rng.randrange(256), rng.randrange(1, 255)), "198.18.1.1", 1, icmp_error(t, quote))
        out.append(fx.eth(mac_dst, mac_src, 0x0800, ip))
    for f, _, _ in crafted_cases():
        if f[12:14] == b"\x08\x00" and f[23] == 1:
            out.append(mac_dst + mac_src + f[12:])
    return out


@pytest.mark.netns
@pytest.mark.parametrize("mode, nq, port_lo, block", [("inside", 2, 0, 1), ("inside", 3, 0, 1), ("outside", 2, 1024, None),
                                                      ("outside", 4, 1024, 3000)])
def test_kernel_fanout_steers_icmp_errors_like_the_reference(request, mode, nq, port_lo, block):
    """Raw AF_PACKET sockets in a PACKET_FANOUT_CBPF group running the steering program: each
    ICMP error reaches the socket ``steering_queue`` names, in order (the kernel's ``skb->len``
    is what the programs check a quote's length against)."""
    import random
    import select
    import time

    why = fx.need_root()
    if why:
        pytest.skip(why)
    from hotplane.shared import af_packet as ap

    ns = fx.new_netns()
    request.addfinalizer(lambda: fx.del_netns(ns))
    fx.add_veth(ns, "va", "vb")
    ma, mb = fx.link_mac(ns, "va"), fx.link_mac(ns, "vb")
    socks: list[socket.socket] = []
    request.addfinalizer(lambda: [s.close() for s in socks])
    group = random.Random().randrange(1, 0xFFFF)
    with ap.netns_scope(ns):
        for _ in range(nq):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("va", 0x0003))
            s.setsockopt(ap.SOL_PACKET, ap.PACKET_FANOUT, group | (ap.PACKET_FANOUT_CBPF << 16))
        bpf.setsockopt_program(socks[0], ap.SOL_PACKET, ap.PACKET_FANOUT_DATA, bpf.steering_program(mode, nq, port_lo, block))
    snd = fx.raw_socket(ns, "vb")
    socks.append(snd)
    frames = _icmp_error_frames(ma, mb, random.Random(f"{mode}{nq}"))
    with fx.one_cpu():
        for f in frames:
            snd.send(f)
    got: list[list[bytes]] = [[] for _ in range(nq)]
    deadline = time.monotonic() + 5
    while sum(map(len, got)) < len(frames) and time.monotonic() < deadline:
        ready, _, _ = select.select(socks[:nq], [], [], 0.1)
        for s in ready:
            data, addr = s.recvfrom(65536)
            if addr[2] != 4:  # not PACKET_OUTGOING
                got[socks.index(s)].append(data)
    want = [[f for f in frames if bpf.steering_queue(f, mode, nq, port_lo, block) == i] for i in range(nq)]
    assert got == want
    assert all(want), "the frames should exercise every queue"
    # the programs did steer by the quotes: queue 0 alone would not pass for these frames
    assert any(bpf.steering_queue(f, mode, nq, port_lo, block) != 0 for f in frames[-20:])
