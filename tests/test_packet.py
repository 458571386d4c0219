"""Tests for hotplane.shared.packet: vectorized parse, incremental rewrites, builders.

scapy is the judge of what a packet says and of whether its checksums are right.
"""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1Q, Ether, IPerror, IPOption_NOP, Raw

from hotplane.shared import packet as P
from hotplane.shared.checksum import internet_checksum
from hotplane.shared.packet import DropReason as R

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
SLOT = 2048


def ip_str(x: int) -> str:
    return str(ipaddress.IPv4Address(x))


def to_burst(raws: list[bytes], slot: int = SLOT, fill: int = 0xA5) -> tuple[np.ndarray, np.ndarray]:
    """Frames in fixed slots, garbage (``fill``) after each frame, like a ring."""
    frames = np.full((len(raws), slot), fill, dtype=np.uint8)
    lengths = np.zeros(len(raws), dtype=np.uint32)
    for i, r in enumerate(raws):
        k = min(len(r), slot)
        frames[i, :k] = np.frombuffer(r[:k], dtype=np.uint8)
        lengths[i] = len(r)
    return frames, lengths


def parse(raws: list[bytes], slot: int = SLOT, **kw) -> tuple[np.ndarray, np.ndarray, P.ParsedBurst]:
    frames, lengths = to_burst(raws, slot)
    pb = P.ParsedBurst(max(len(raws), 1))
    P.parse_burst(frames, lengths, pb, **kw)
    return frames, lengths, pb


def row_bytes(frames: np.ndarray, lengths: np.ndarray, i: int) -> bytes:
    return frames[i, : lengths[i]].tobytes()


# --- strategies -----------------------------------------------------------------------

addr = st.integers(1, 2**32 - 1)
port = st.integers(0, 0xFFFF)
TCP_OPTS = [[], [("MSS", 1460)], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))], [("WScale", 7), ("SAckOK", b"")]]


@st.composite
def l4_layers(draw):
    kind = draw(st.sampled_from(["tcp", "udp", "udp0", "icmp_query", "icmp_other"]))
    payload = draw(st.binary(max_size=48))
    if kind == "tcp":
        layer = TCP(
            sport=draw(port),
            dport=draw(port),
            seq=draw(st.integers(0, 2**32 - 1)),
            flags=draw(st.integers(0, 255)),
            options=draw(st.sampled_from(TCP_OPTS)),
        )
    elif kind in ("udp", "udp0"):
        layer = UDP(sport=draw(port), dport=draw(port), chksum=0 if kind == "udp0" else None)
    elif kind == "icmp_query":
        layer = ICMP(type=draw(st.sampled_from([0, 8, 13, 14])), id=draw(port), seq=draw(port))
    else:
        layer = ICMP(type=draw(st.sampled_from([3, 5, 11, 12])), code=draw(st.integers(0, 15)))
    return layer / Raw(payload) if payload else layer


@st.composite
def ipv4_frames(draw, l4=None, **ip_overrides):
    """A valid Ethernet[/802.1Q]/IPv4[options]/L4 frame built by scapy, maybe padded."""
    ip_kw = dict(
        src=ip_str(draw(addr)),
        dst=ip_str(draw(addr)),
        ttl=draw(st.integers(1, 255)),
        id=draw(port),
        tos=draw(st.integers(0, 255)),
        flags=draw(st.sampled_from([0, 2])),  # DF or nothing: not a fragment
        options=[IPOption_NOP()] * draw(st.sampled_from([0, 0, 0, 1, 4, 7, 40])),
    )
    ip_kw.update(ip_overrides)
    pkt = IP(**ip_kw) / (draw(l4_layers()) if l4 is None else l4)
    eth = Ether(src=MAC_A, dst=MAC_B)
    if draw(st.booleans()):
        eth = eth / Dot1Q(vlan=draw(st.integers(0, 4095)), prio=draw(st.integers(0, 7)))
    raw = bytes(eth / pkt)
    return raw + draw(st.sampled_from([b"", b"", b"\x00" * 6, b"\xee" * 3]))  # Ethernet padding / trailer


# --- parse vs scapy --------------------------------------------------------------------


def check_row_against_scapy(pb: P.ParsedBurst, i: int, raw: bytes) -> None:
    p = Ether(raw)
    ip = p[IP]
    tagged = Dot1Q in p
    l3 = 18 if tagged else 14
    assert pb.valid[i], R(pb.drop_reason[i])
    assert pb.drop_reason[i] == R.OK
    assert pb.ethertype[i] == 0x0800
    assert bool(pb.has_vlan[i]) == tagged
    if tagged:
        d = p[Dot1Q]
        assert pb.vlan_tci[i] == (d.prio << 13) | (d.dei << 12) | d.vlan
    assert pb.l3_off[i] == l3
    assert pb.ihl[i] == ip.ihl
    assert pb.l4_off[i] == l3 + ip.ihl * 4
    assert pb.ip_total_len[i] == ip.len
    assert pb.l4_len[i] == ip.len - ip.ihl * 4
    assert pb.proto[i] == ip.proto
    assert pb.ttl[i] == ip.ttl
    assert pb.src[i] == int(ipaddress.IPv4Address(ip.src))
    assert pb.dst[i] == int(ipaddress.IPv4Address(ip.dst))
    assert not pb.frag[i]
    l4 = l3 + ip.ihl * 4
    if TCP in p:
        t = p[TCP]
        assert (pb.sport[i], pb.dport[i], pb.tcp_flags[i]) == (t.sport, t.dport, int(t.flags))
        assert pb.l4_csum_off[i] == l4 + 16
    elif UDP in p:
        u = p[UDP]
        assert (pb.sport[i], pb.dport[i], pb.tcp_flags[i]) == (u.sport, u.dport, 0)
        assert pb.l4_csum_off[i] == l4 + 6
    else:
        c = p[ICMP]
        assert (pb.icmp_type[i], pb.icmp_code[i]) == (c.type, c.code)
        assert pb.l4_csum_off[i] == l4 + 2
        if c.type in P.ICMP_QUERY_TYPES:
            assert pb.sport[i] == pb.dport[i] == c.id
        else:
            assert pb.sport[i] == pb.dport[i] == 0


@SETTINGS
@given(st.lists(ipv4_frames(), min_size=1, max_size=12))
def test_parse_agrees_with_scapy(raws: list[bytes]) -> None:
    _, _, pb = parse(raws)
    assert pb.n == len(raws)
    assert pb.valid[: pb.n].all()
    for i, raw in enumerate(raws):
        check_row_against_scapy(pb, i, raw)


@FEW
@given(st.lists(ipv4_frames(), min_size=1, max_size=8))
def test_parse_agrees_with_scalar_parser(raws: list[bytes]) -> None:
    _, _, pb = parse(raws)
    for i, raw in enumerate(raws):
        assert pb.row(i) == P.parse_frame(raw)


def test_parse_reuses_scratch_and_capacity() -> None:
    raws = [P.build_ipv4_udp(MAC_A, MAC_B, "100.64.0.1", "198.18.0.1", 1000 + i, 53) for i in range(5)]
    frames, lengths = to_burst(raws)
    pb = P.ParsedBurst(8)
    assert P.parse_burst(frames, lengths, pb) == 5
    assert P.parse_burst(frames[:2], lengths[:2], pb) == 2 and pb.n == 2
    assert P.parse_burst(frames[:0], lengths[:0], pb) == 0 and pb.n == 0
    with pytest.raises(ValueError):
        P.parse_burst(np.zeros((9, 64), np.uint8), np.zeros(9, np.uint32), pb)
    with pytest.raises(TypeError):
        P.parse_burst(np.zeros((2, 64), np.uint16), np.zeros(2, np.uint32), pb)
    assert pb.reason_counts()[R.OK] == 0


# --- drop reasons ------------------------------------------------------------------------


def _udp(**kw) -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="100.64.0.1", dst="198.18.0.1", **kw) / UDP(sport=1, dport=2) / b"payload!")


def _set(raw: bytes, off: int, val: bytes) -> bytes:
    return raw[:off] + val + raw[off + len(val) :]


def _fix_ip_csum(raw: bytes, l3: int = 14) -> bytes:
    ihl = (raw[l3] & 0x0F) * 4
    hdr = _set(raw[l3 : l3 + max(ihl, 20)], 10, b"\x00\x00")
    return _set(raw, l3 + 10, internet_checksum(hdr).to_bytes(2, "big"))


def test_drop_reasons_table() -> None:
    good = _udp()
    cases: list[tuple[bytes, R]] = [
        (good, R.OK),
        (b"", R.RUNT),
        (good[:13], R.RUNT),
        (bytes(Ether() / Dot1Q(vlan=3))[:16], R.RUNT),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / ARP()), R.NOT_IPV4),
        (bytes(Ether(type=0x86DD) / (b"\x60" + b"\x00" * 60)), R.NOT_IPV4),
        (bytes(Ether() / Dot1Q(vlan=3) / Dot1Q(vlan=4) / IP() / UDP()), R.NOT_IPV4),  # stacked tags
        (good[:30], R.TRUNCATED),  # inside the IPv4 header
        (_fix_ip_csum(_set(good, 14, b"\x65")), R.BAD_IP_HEADER),  # version 6
        (_fix_ip_csum(_set(good, 14, b"\x44")), R.BAD_IP_HEADER),  # IHL 4
        (_fix_ip_csum(_set(good, 14, b"\x40")), R.BAD_IP_HEADER),  # IHL 0
        (_fix_ip_csum(_set(good, 14, b"\x4f")), R.TRUNCATED),  # IHL 15: header runs past the frame
        (_fix_ip_csum(_set(good, 16, b"\x00\x10")), R.BAD_IP_HEADER),  # total length 16 < 20
        (_fix_ip_csum(_set(good, 16, b"\x05\xdc")), R.TRUNCATED),  # total length 1500 > frame
        (good[:-1], R.TRUNCATED),
        (_set(good, 24, b"\x12\x34"), R.BAD_IP_CHECKSUM),
        (_udp(flags="MF"), R.FRAGMENT),
        (_udp(frag=100), R.FRAGMENT),
        (_udp(ttl=0), R.TTL_EXPIRED),
        (bytes(Ether() / IP(proto=47) / (b"\x00" * 20)), R.UNSUPPORTED_PROTOCOL),
        (bytes(Ether() / IP(proto=6) / (b"\x00" * 19)), R.MALFORMED_L4),  # short TCP
        (bytes(Ether() / IP() / TCP(dataofs=4)), R.MALFORMED_L4),
        (bytes(Ether() / IP() / TCP(dataofs=15)), R.MALFORMED_L4),  # options beyond the segment
        (bytes(Ether() / IP(proto=17) / (b"\x00" * 7)), R.MALFORMED_L4),  # short UDP
        (bytes(Ether() / IP() / UDP(len=7)), R.MALFORMED_L4),
        (bytes(Ether() / IP() / UDP(len=100) / b"x"), R.MALFORMED_L4),
        (bytes(Ether() / IP(proto=1) / (b"\x08\x00" + b"\x00" * 5)), R.MALFORMED_L4),  # short ICMP
        (good + b"\x00" * 20, R.OK),  # Ethernet padding is fine
        (bytes(Ether() / IP(ttl=1) / ICMP()), R.OK),  # TTL 1 is fine at parse time
    ]
    raws = [c[0] for c in cases]
    frames, lengths, pb = parse(raws)
    got = [R(x) for x in pb.drop_reason[: pb.n]]
    assert got == [c[1] for c in cases]
    assert (pb.valid[: pb.n] == (pb.drop_reason[: pb.n] == 0)).all()
    for i, raw in enumerate(raws):
        assert pb.drop_reason[i] == P.parse_frame(raw)["drop_reason"], i
    assert pb.ethertype[4] == P.ETHERTYPE_ARP
    assert pb.reason_counts()[R.MALFORMED_L4] == 7


def test_min_ttl_and_oversize() -> None:
    raw = _udp(ttl=1)
    frames, lengths = to_burst([raw, raw])
    lengths[1] = SLOT + 1
    pb = P.ParsedBurst(4)
    P.parse_burst(frames, lengths, pb, min_ttl=2)
    assert [R(x) for x in pb.drop_reason[:2]] == [R.TTL_EXPIRED, R.OVERSIZE]


# --- hostile input ------------------------------------------------------------------------


@st.composite
def hostile_frames(draw):
    """Valid frames with bytes flipped and lengths cut or inflated, or plain noise."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=120))
    raw = bytearray(draw(ipv4_frames()))
    for _ in range(draw(st.integers(0, 4))):
        # bias mutations toward the headers, where the parser looks
        pos = draw(st.integers(0, min(len(raw), 80) - 1))
        raw[pos] = draw(st.integers(0, 255))
    l3 = 18 if raw[12:14] == b"\x81\x00" else 14
    hl = (raw[l3] & 0x0F) * 4
    if hl >= 20 and len(raw) >= l3 + hl and draw(st.booleans()):
        raw = bytearray(_fix_ip_csum(bytes(raw), l3))  # get past the checksum to the deeper checks
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return bytes(raw)


@SETTINGS
@given(st.lists(hostile_frames(), min_size=1, max_size=16), st.sampled_from([40, 64, 98, 128, 512]))
def test_hostile_input_never_raises_and_matches_scalar(raws: list[bytes], slot: int) -> None:
    frames, lengths = to_burst(raws, slot)
    pb = P.ParsedBurst(16)
    nvalid = P.parse_burst(frames, lengths, pb)
    assert nvalid == int(pb.valid[: pb.n].sum())
    for i, raw in enumerate(raws):
        ref = P.parse_frame(raw, slot=slot)
        assert pb.drop_reason[i] == ref["drop_reason"], (i, raw.hex())
        if ref["valid"]:
            assert pb.row(i) == ref
            # What the parser vouches for is inside the frame.
            assert pb.l3_off[i] + pb.ip_total_len[i] <= lengths[i]
            assert pb.l4_csum_off[i] + 2 <= lengths[i]
            assert internet_checksum(raw[pb.l3_off[i] : pb.l4_off[i]]) == 0


@SETTINGS
@given(st.lists(hostile_frames(), min_size=1, max_size=8), st.sampled_from([20, 40, 64, 100]))
def test_never_reads_past_the_row(raws: list[bytes], slot: int) -> None:
    # Rows are narrow views into a wider buffer whose extra columns hold a valid
    # packet: a parser that looked past the row would see it and disagree.
    bait = np.frombuffer(_udp().ljust(200, b"\x00"), dtype=np.uint8)
    wide = np.empty((len(raws), slot + 200), dtype=np.uint8)
    wide[:, slot:] = bait
    narrow_ref, lengths = to_burst(raws, slot)
    wide[:, :slot] = narrow_ref
    pb_view, pb_copy = P.ParsedBurst(8), P.ParsedBurst(8)
    P.parse_burst(wide[:, :slot], lengths, pb_view)
    P.parse_burst(narrow_ref.copy(), lengths, pb_copy)
    for i in range(len(raws)):
        assert pb_view.drop_reason[i] == pb_copy.drop_reason[i]
        if pb_view.valid[i]:
            assert pb_view.row(i) == pb_copy.row(i)


@FEW
@given(ipv4_frames())
def test_every_truncation_is_rejected(raw: bytes) -> None:
    p = Ether(raw)
    l3 = 18 if Dot1Q in p else 14
    need = l3 + p[IP].len
    cuts = list(range(0, need))
    frames, lengths = to_burst([raw] * len(cuts))
    lengths[:] = cuts
    pb = P.ParsedBurst(len(cuts))
    assert P.parse_burst(frames, lengths, pb) == 0
    reasons = pb.drop_reason[: pb.n]
    assert set(reasons[: min(l3, len(cuts))].tolist()) <= {R.RUNT}
    assert set(reasons[l3:].tolist()) <= {R.TRUNCATED}


# --- rewriting --------------------------------------------------------------------------


def assert_checksums_correct(raw: bytes) -> Ether:
    """Every checksum in ``raw`` equals what scapy recomputes; UDP 0 is accepted as "none"."""
    p = Ether(raw)
    q = Ether(raw)
    del q[IP].chksum
    for layer in (TCP, UDP, ICMP):
        if layer in q and not (layer is UDP and p[UDP].chksum == 0):
            del q[layer].chksum
    r = Ether(bytes(q))
    assert r[IP].chksum == p[IP].chksum, "IPv4 header checksum"
    for layer in (TCP, UDP, ICMP):
        if layer in p:
            assert r[layer].chksum == p[layer].chksum, f"{layer.__name__} checksum"
    return p


def l4_data(p: Ether) -> bytes:
    seg = bytes(p[IP].payload)
    return seg[p[TCP].dataofs * 4 :] if TCP in p else seg[8:]


@SETTINGS
@given(st.lists(ipv4_frames(), min_size=1, max_size=10), st.data())
def test_rewrites_keep_checksums_correct(raws: list[bytes], data) -> None:
    n = len(raws)
    frames, lengths, pb = parse(raws)
    before = frames.copy()
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    k = int(mask.sum())
    new_src = np.array(data.draw(st.lists(addr, min_size=k, max_size=k)), dtype=np.uint32)
    new_dst = data.draw(addr)  # scalar broadcast
    new_sport = np.array(data.draw(st.lists(port, min_size=n, max_size=n)), dtype=np.uint16)  # per burst row
    new_dport = np.array(data.draw(st.lists(port, min_size=k, max_size=k)), dtype=np.uint16)
    ttl_before = pb.ttl[:n].copy()

    expired = P.decrement_ttl(frames, pb, mask)
    live = mask & (ttl_before > 1)
    assert sorted(expired.tolist()) == np.flatnonzero(mask & (ttl_before <= 1)).tolist()
    assert (pb.drop_reason[expired] == R.TTL_EXPIRED).all()
    # values per selected row follow the selection order, skipping rows that became invalid
    sel_rows = np.flatnonzero(mask)
    P.set_ipv4_src(frames, pb, mask, new_src)
    P.set_ipv4_dst(frames, pb, mask, new_dst)
    P.set_l4_sport(frames, pb, mask, new_sport)
    P.set_l4_dport(frames, pb, mask, new_dport)
    P.rewrite_macs(frames, pb, mask, "02:00:00:00:00:01", b"\x02\x00\x00\x00\x00\x02")

    for i in range(n):
        raw = row_bytes(frames, lengths, i)
        if not live[i]:
            assert raw == row_bytes(before, lengths, i)
            continue
        j = int(np.searchsorted(sel_rows, i))
        p = assert_checksums_correct(raw)
        orig = Ether(raws[i])
        assert p.src == "02:00:00:00:00:01" and p.dst == "02:00:00:00:00:02"
        assert p[IP].ttl == orig[IP].ttl - 1
        assert p[IP].src == ip_str(int(new_src[j]))
        assert p[IP].dst == ip_str(new_dst)
        if UDP in orig and orig[UDP].chksum == 0:
            assert p[UDP].chksum == 0  # "no checksum" stays none
        for layer in (TCP, UDP):
            if layer in orig:
                assert (p[layer].sport, p[layer].dport) == (new_sport[i], new_dport[j])
        if ICMP in orig:
            if orig[ICMP].type in P.ICMP_QUERY_TYPES:
                assert p[ICMP].id == new_dport[j]  # the identifier is both "ports"; dport was set last
            else:
                assert bytes(p[ICMP])[4:] == bytes(orig[ICMP])[4:]  # nothing to translate
        # Nothing after the L4 header moved.
        assert len(raw) == len(raws[i])
        assert l4_data(p) == l4_data(orig)

    # The ParsedBurst followed the rewrites: a fresh parse agrees with it.
    pb2 = P.ParsedBurst(n)
    P.parse_burst(frames, lengths, pb2)
    for i in range(n):
        if pb.valid[i]:
            assert pb2.row(i) == pb.row(i)


@SETTINGS
@given(st.lists(ipv4_frames(), min_size=1, max_size=10), st.data(), st.sampled_from(["snat", "dnat"]))
def test_nat_translate_equals_separate_rewrites(raws: list[bytes], data, which: str) -> None:
    """snat/dnat (one checksum step for address + port) == set address then set port, byte for byte."""
    n = len(raws)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    addrs = np.array(data.draw(st.lists(addr, min_size=n, max_size=n)), dtype=np.uint32)
    ports = np.array(data.draw(st.lists(port, min_size=n, max_size=n)), dtype=np.uint16)
    f1, lengths, pb1 = parse(raws)
    f2, _, pb2 = parse(raws)
    if which == "snat":
        P.snat(f1, pb1, mask, addrs, ports)
        P.set_ipv4_src(f2, pb2, mask, addrs)
        P.set_l4_sport(f2, pb2, mask, ports)
    else:
        P.dnat(f1, pb1, mask, addrs, ports)
        P.set_ipv4_dst(f2, pb2, mask, addrs)
        P.set_l4_dport(f2, pb2, mask, ports)
    for i in range(n):
        r1, r2 = row_bytes(f1, lengths, i), row_bytes(f2, lengths, i)
        p = assert_checksums_correct(r1)
        # Both are eqn. 3 results from a checksum that is never -0 here, so they are equal.
        assert r1 == r2
        assert pb1.row(i) == pb2.row(i)
        if mask[i]:
            ip = p[IP]
            assert (ip.src if which == "snat" else ip.dst) == ip_str(int(addrs[i]))
            for layer in (TCP, UDP):
                if layer in p:
                    assert (p[layer].sport if which == "snat" else p[layer].dport) == ports[i]


@SETTINGS
@given(st.lists(ipv4_frames(), min_size=1, max_size=6), addr, port)
def test_byte_path_matches_word_path(raws: list[bytes], a: int, pt: int) -> None:
    """Odd slot widths cannot be viewed as 16-bit words; the byte-wise path must agree."""
    f_even, lengths, pb_even = parse(raws, slot=1600)
    f_odd, _, pb_odd = parse(raws, slot=1601)
    for f, pb in ((f_even, pb_even), (f_odd, pb_odd)):
        P.snat(f, pb, None, a, pt)
        P.set_ipv4_dst(f, pb, None, a ^ 0x5A5A)
        P.set_l4_dport(f, pb, None, pt ^ 0x0F0F)
        P.decrement_ttl(f, pb, None)
    for i in range(len(raws)):
        assert row_bytes(f_even, lengths, i) == row_bytes(f_odd, lengths, i)
        assert_checksums_correct(row_bytes(f_odd, lengths, i))


@SETTINGS
@given(ipv4_frames(l4=UDP(sport=7, dport=9) / b"zz"), addr, port)
def test_udp_zero_checksum_stays_zero(raw: bytes, new_src: int, new_port: int) -> None:
    p = Ether(raw)
    p[UDP].chksum = 0
    raw = bytes(p)
    frames, lengths, pb = parse([raw])
    P.set_ipv4_src(frames, pb, None, new_src)
    P.set_l4_dport(frames, pb, None, new_port)
    q = assert_checksums_correct(row_bytes(frames, lengths, 0))
    assert q[UDP].chksum == 0 and q[UDP].dport == new_port


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff() -> None:
    def frame(sport: int) -> bytes:
        return bytes(Ether() / IP(src="100.64.0.1", dst="198.18.0.1") / UDP(sport=sport, dport=2) / b"data")

    raw = frame(1)
    c = int(Ether(raw)[UDP].chksum)
    # The folded sum is ~c; moving sport from 1 to x adds x - 1. Pick x so that
    # the new sum is -0 (0xFFFF), i.e. the computed checksum is 0.
    x = (1 - (~c & 0xFFFF)) % 0xFFFF
    assert Ether(frame(x))[UDP].chksum == 0xFFFF  # scapy sends a computed 0 as 0xFFFF too
    frames, lengths, pb = parse([raw])
    P.set_l4_sport(frames, pb, None, x)
    q = assert_checksums_correct(row_bytes(frames, lengths, 0))
    assert q[UDP].chksum == 0xFFFF and row_bytes(frames, lengths, 0) == frame(x)


def test_selection_forms_and_invalid_rows() -> None:
    good = [P.build_ipv4_udp(MAC_A, MAC_B, "100.64.0.1", "198.18.0.1", 1000 + i, 53, b"q") for i in range(4)]
    raws = good[:2] + [b"\x00" * 10] + good[2:]
    frames, lengths, pb = parse(raws)
    before = frames.copy()
    # index selection with one value per index; the invalid row 2 is skipped, never written
    P.set_ipv4_src(frames, pb, np.array([3, 2, 0]), np.array([0x64400003, 0x64400002, 0x64400000]))
    assert pb.src[0] == 0x64400000 and pb.src[3] == 0x64400003
    assert (frames[2] == before[2]).all()
    assert (frames[1] == before[1]).all()
    for i in (0, 3):
        assert_checksums_correct(row_bytes(frames, lengths, i))
    # per-burst-row values with a mask
    ports = np.arange(100, 105, dtype=np.uint16)
    P.set_l4_dport(frames, pb, np.array([True, True, True, False, True]), ports)
    assert pb.dport[:5].tolist() == [100, 101, 0, 53, 104]
    with pytest.raises(ValueError):
        P.set_l4_dport(frames, pb, np.array([True, True, False, False, False]), np.arange(3))
    with pytest.raises(IndexError):
        P.set_l4_dport(frames, pb, np.array([7]), 1)
    # per-row MACs for an index selection
    macs = np.array([[2, 0, 0, 0, 0, k] for k in range(2)], dtype=np.uint8)
    P.rewrite_macs(frames, pb, np.array([4, 1]), macs, MAC_A)
    assert frames[4, 6:12].tolist() == [2, 0, 0, 0, 0, 0] and frames[1, 6:12].tolist() == [2, 0, 0, 0, 0, 1]
    assert frames[4, :6].tobytes() == frames[1, :6].tobytes() == P.mac_bytes(MAC_A)
    P.rewrite_macs(frames, pb, None, MAC_B, MAC_A)
    assert (frames[2] == before[2]).all()


def test_decrement_ttl_edge() -> None:
    raws = [bytes(Ether() / IP(ttl=t) / ICMP()) for t in (1, 2, 255)]
    frames, lengths, pb = parse(raws)
    expired = P.decrement_ttl(frames, pb)
    assert expired.tolist() == [0]
    assert not pb.valid[0] and pb.drop_reason[0] == R.TTL_EXPIRED
    assert Ether(row_bytes(frames, lengths, 0))[IP].ttl == 1
    for i, want in ((1, 1), (2, 254)):
        p = assert_checksums_correct(row_bytes(frames, lengths, i))
        assert p[IP].ttl == want == pb.ttl[i]


# --- builders -------------------------------------------------------------------------------


@FEW
@given(addr, addr, port, port, st.binary(max_size=64), st.integers(1, 255), st.booleans(), st.sampled_from([None, 0, 100]))
def test_build_udp(src, dst, sp, dp, payload, ttl, csum, vlan) -> None:
    raw = P.build_ipv4_udp(MAC_A, MAC_B, src, ip_str(dst), sp, dp, payload, ttl=ttl, checksum=csum, vlan=vlan)
    p = assert_checksums_correct(raw)
    assert (p.src, p.dst) == (MAC_A, MAC_B)
    assert (Dot1Q in p) == (vlan is not None)
    assert (p[IP].src, p[IP].dst, p[IP].ttl) == (ip_str(src), ip_str(dst), ttl)
    assert (p[UDP].sport, p[UDP].dport, p[UDP].len, bytes(p[UDP].payload)) == (sp, dp, 8 + len(payload), payload)
    assert (p[UDP].chksum != 0) == csum
    _, _, pb = parse([raw])
    check_row_against_scapy(pb, 0, raw)


@FEW
@given(addr, addr, port, port, st.integers(0, 255), st.binary(max_size=64), st.sampled_from([b"", b"\x02\x04\x05\xb4"]))
def test_build_tcp(src, dst, sp, dp, flags, payload, opts) -> None:
    raw = P.build_ipv4_tcp(MAC_A, MAC_B, src, dst, sp, dp, seq=12345, ack=678, flags=flags, payload=payload, tcp_options=opts, ip_options=b"\x01" * 4)
    p = assert_checksums_correct(raw)
    t = p[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, int(t.flags), bytes(t.payload)) == (sp, dp, 12345, 678, flags, payload)
    assert p[IP].ihl == 6
    _, _, pb = parse([raw])
    check_row_against_scapy(pb, 0, raw)


@FEW
@given(addr, addr, port, port, st.binary(max_size=64), st.booleans())
def test_build_icmp_echo(src, dst, ident, seq, payload, reply) -> None:
    raw = P.build_icmp_echo(MAC_A, MAC_B, src, dst, ident, seq, payload, reply=reply)
    p = assert_checksums_correct(raw)
    c = p[ICMP]
    assert (c.type, c.code, c.id, c.seq, bytes(c.payload)) == (0 if reply else 8, 0, ident, seq, payload)
    _, _, pb = parse([raw])
    check_row_against_scapy(pb, 0, raw)


@pytest.mark.parametrize("payload_len", [0, 8, 100, 1400])
def test_build_icmp_error(payload_len: int) -> None:
    orig_frame = P.build_ipv4_udp(MAC_A, MAC_B, "100.64.0.5", "198.18.0.9", 4000, 53, (bytes(range(256)) * 6)[:payload_len]) + b"\x00" * 6
    frames, lengths, pb = parse([orig_frame])
    original = P.ip_packet(frames, pb, 0)
    assert len(original) == 28 + payload_len  # padding excluded
    assert P.icmp_error_allowed(original)
    raw = P.build_icmp_error(11, 0, original, "100.64.0.1", src_mac=MAC_B, dst_mac=MAC_A)
    p = assert_checksums_correct(raw)
    assert (p[IP].src, p[IP].dst, p[IP].proto) == ("100.64.0.1", "100.64.0.5", 1)
    assert (p[ICMP].type, p[ICMP].code) == (11, 0)
    assert p[IP].len == min(20 + 8 + len(original), P.ICMP_ERROR_MAX)
    quoted = bytes(p[ICMP])[8:]
    assert quoted == original[: len(quoted)] and len(quoted) >= 28
    assert p[IPerror].src == "100.64.0.5"
    _, _, pb2 = parse([raw])
    check_row_against_scapy(pb2, 0, raw)


def test_build_icmp_error_fields() -> None:
    original = P.build_ipv4_tcp(MAC_A, MAC_B, "100.64.0.5", "198.18.0.9", 4000, 80)[14:]
    frag_needed = Ether(P.build_icmp_error(3, 4, original, "100.64.0.1", src_mac=MAC_B, dst_mac=MAC_A, next_hop_mtu=1400))
    assert (frag_needed[ICMP].type, frag_needed[ICMP].code, frag_needed[ICMP].nexthopmtu) == (3, 4, 1400)
    pp = Ether(P.build_icmp_error(12, 0, original, "100.64.0.1", src_mac=MAC_B, dst_mac=MAC_A, pointer=9, dst="198.18.0.7"))
    assert pp[ICMP].ptr == 9 and pp[IP].dst == "198.18.0.7"
    for p in (frag_needed, pp):
        assert_checksums_correct(bytes(p))


def test_icmp_error_allowed() -> None:
    def ip(l4=None, **kw) -> bytes:
        base = dict(src="100.64.0.5", dst="198.18.0.9")
        base.update(kw)
        return bytes(IP(**base) / (UDP() if l4 is None else l4))

    assert P.icmp_error_allowed(ip())
    assert P.icmp_error_allowed(ip(l4=ICMP(type=8)))
    assert not P.icmp_error_allowed(ip(l4=ICMP(type=3)))  # never an error about an error
    assert not P.icmp_error_allowed(ip(l4=ICMP(type=11)))
    assert not P.icmp_error_allowed(ip(frag=10))  # non-first fragment
    assert P.icmp_error_allowed(ip(flags="MF"))  # the first fragment is fine
    assert not P.icmp_error_allowed(ip(dst="224.0.0.1"))
    assert not P.icmp_error_allowed(ip(dst="255.255.255.255"))
    assert not P.icmp_error_allowed(ip(src="0.0.0.0"))
    assert not P.icmp_error_allowed(ip(src="127.0.0.1"))
    assert not P.icmp_error_allowed(ip(src="240.0.0.1"))
    assert not P.icmp_error_allowed(b"\x45\x00")


def test_arp_builders() -> None:
    req = P.build_arp_request(MAC_A, "100.64.0.1", "100.64.0.2")
    assert len(req) == 60
    p = Ether(req)
    assert p.dst == "ff:ff:ff:ff:ff:ff" and p.src == MAC_A
    a = p[ARP]
    assert (a.op, a.hwsrc, a.psrc, a.pdst, a.hwtype, a.ptype) == (1, MAC_A, "100.64.0.1", "100.64.0.2", 1, 0x0800)
    rep = P.build_arp_reply(MAC_B, "100.64.0.2", MAC_A, "100.64.0.1", vlan=7)
    p = Ether(rep)
    a = p[ARP]
    assert p[Dot1Q].vlan == 7 and p.dst == MAC_A
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, MAC_B, "100.64.0.2", MAC_A, "100.64.0.1")
    parsed = P.parse_arp(rep)
    assert parsed == P.ArpPacket(2, P.mac_bytes(MAC_B), P.ip_int("100.64.0.2"), P.mac_bytes(MAC_A), P.ip_int("100.64.0.1"), 7)
    assert P.parse_arp(bytes(Ether() / ARP(op=1, psrc="1.2.3.4"))).spa == P.ip_int("1.2.3.4")
    assert P.parse_arp(_udp()) is None
    assert P.parse_arp(req[:30]) is None
    _, _, pb = parse([req, rep])
    assert pb.drop_reason[:2].tolist() == [R.NOT_IPV4] * 2
    assert pb.ethertype[:2].tolist() == [P.ETHERTYPE_ARP] * 2


def test_address_helpers() -> None:
    assert P.mac_bytes("02-00-00-00-00-0A") == bytes([2, 0, 0, 0, 0, 10])
    assert P.ip_int("1.2.3.4") == 0x01020304 == P.ip_int(0x01020304)
    for bad in ("02:00", "zz:00:00:00:00:00", b"\x00" * 5):
        with pytest.raises(ValueError):
            P.mac_bytes(bad)
    with pytest.raises(ValueError):
        P.ip_int(2**32)
