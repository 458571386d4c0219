"""Tests for hotplane.secondary.forward: the fast path gives exactly what the general path gives.

The general path (parse_burst + decrement_ttl + rewrite_macs, tested against
scapy in test_packet.py) is the reference: for any burst -- plain frames and
every kind of exception the fast path must leave alone -- the frames, the rows
sent and every counter must be identical with the fast path on and off.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotplane.schema.counters import DROP_REASONS
from hotplane.secondary.forward import ForwardPipeline
from hotplane.shared import packet as P
from hotplane.shared.checksum import internet_checksum

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MACS = {
    "inside_gw": bytes.fromhex("020000000a01"),
    "inside_peer": bytes.fromhex("020000000a02"),
    "outside_gw": bytes.fromhex("020000000b01"),
    "outside_peer": bytes.fromhex("020000000b02"),
}
IN_HOST, OUT_HOST = 0x64400002, 0xC6120002  # 100.64.0.2, 198.18.0.2
ETH = 14


def _fix_ip_csum(raw: bytearray, l3: int = ETH) -> None:
    hl = (raw[l3] & 0x0F) * 4
    raw[l3 + 10 : l3 + 12] = b"\x00\x00"
    raw[l3 + 10 : l3 + 12] = internet_checksum(bytes(raw[l3 : l3 + hl])).to_bytes(2, "big")


@st.composite
def plain_frames(draw, proto: str | None = None) -> bytes:
    """An untagged IPv4 frame with IHL 5 that a router forwards: the fast path's own case."""
    kind = proto or draw(st.sampled_from(["udp", "udp0", "tcp", "icmp_echo", "icmp_other"]))
    payload = bytes(draw(st.integers(0, 64)))
    src, dst = (IN_HOST, OUT_HOST) if draw(st.booleans()) else (OUT_HOST, IN_HOST)
    kw = dict(ttl=draw(st.integers(2, 255)), ident=draw(st.integers(0, 0xFFFF)))
    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    sp, dp = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    if kind in ("udp", "udp0"):
        raw = P.build_ipv4_udp(a, b, src, dst, sp, dp, payload, checksum=kind == "udp", tos=draw(st.integers(0, 255)),
                               df=draw(st.booleans()), **kw)
    elif kind == "tcp":
        opts = draw(st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x01" * 12]))
        raw = P.build_ipv4_tcp(a, b, src, dst, sp, dp, flags=draw(st.integers(0, 255)), tcp_options=opts, payload=payload, **kw)
    elif kind == "icmp_echo":
        raw = P.build_icmp_echo(a, b, src, dst, sp, dp, payload, reply=draw(st.booleans()), ttl=kw["ttl"], ip_ident=kw["ident"])
    else:
        quote = P.build_ipv4_udp(b, a, dst, src, dp, sp, b"q")[ETH:]
        raw = P.build_icmp_error(draw(st.sampled_from([3, 11, 12])), draw(st.integers(0, 15)), quote, src, src_mac=a, dst_mac=b, dst=dst)
    pad = draw(st.sampled_from([0, 0, 0, 6, 60 - len(raw) if len(raw) < 60 else 0]))
    return raw + bytes(pad)  # Ethernet padding: the frame is longer than its datagram


def _set(raw: bytearray, off: int, value: bytes, fix: bool = True) -> bytearray:
    raw[off : off + len(value)] = value
    if fix:
        _fix_ip_csum(raw)
    return raw


#: Every kind of frame the fast path must leave to the general path, with the protocol of the
#: plain frame each is made from (None: made from scratch).
EXCEPTIONS = {
    "vlan": None, "options": None, "arp": None, "runt": None, "noise": None,
    "mf": "udp", "offset": "udp", "ttl0": "udp", "ttl1": "tcp", "ipv6": "udp", "ethertype": "udp",
    "bad_csum": "udp", "truncated": "udp", "udp_len_short": "udp", "udp_len_long": "udp",
    "tcp_doff_short": "tcp", "tcp_doff_long": "tcp", "icmp_short": "icmp_echo", "proto": "udp",
    "tot_short": "udp", "tot_long": "tcp", "version": "udp", "ihl": "udp", "flip": None,
}


@st.composite
def exception_frames(draw, what: str | None = None) -> bytes:
    """A frame the fast path must not take (or, for "flip", may take only if the general path forwards it).

    Values are drawn as an offset from the boundary the check sits on, so the
    boundary itself -- the value one past what passes -- comes up often.
    """
    what = what or draw(st.sampled_from(sorted(EXCEPTIONS)))
    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    k = draw(st.integers(0, 0xFFFF))  # distance from the boundary
    if what == "vlan":
        return P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1, 2, b"x", vlan=k & 0xFFF)
    if what == "options":
        return P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1, 2, b"x", ip_options=b"\x01" * draw(st.sampled_from([4, 8, 40])))
    if what == "arp":
        return P.build_arp_request(a, IN_HOST, OUT_HOST)
    if what == "runt":
        return bytes(13 - k % 14)
    if what == "noise":
        return draw(st.binary(min_size=14, max_size=80))
    base = EXCEPTIONS[what] or draw(st.sampled_from(["udp", "tcp", "icmp_echo", "icmp_other"]))
    raw = bytearray(draw(plain_frames(proto=base)))
    tot = int.from_bytes(raw[16:18], "big")
    if what == "mf":
        _set(raw, 20, bytes((raw[20] | 0x20,)))
    elif what == "offset":
        _set(raw, 20, (1 + k % 0x1FFF | (raw[20] & 0x40) << 8).to_bytes(2, "big"))
    elif what in ("ttl0", "ttl1"):
        _set(raw, 22, bytes((int(what[-1]),)))
    elif what == "ipv6":
        _set(raw, 12, b"\x86\xdd", fix=False)
    elif what == "ethertype":
        _set(raw, 12, (0x0801 + k % 0xFFFF).to_bytes(3, "big")[1:], fix=False)  # anything but 0x0800
    elif what == "bad_csum":
        _set(raw, 24, ((int.from_bytes(raw[24:26], "big") + 1 + k % 0xFFFE) % 0x10000).to_bytes(2, "big"), fix=False)
    elif what == "truncated":
        raw = raw[: max(14, tot + 13 - k % tot)]
    elif what == "udp_len_short":
        _set(raw, 38, (7 - k % 8).to_bytes(2, "big"), fix=False)
    elif what == "udp_len_long":
        _set(raw, 38, min(0xFFFF, tot - 19 + k).to_bytes(2, "big"), fix=False)
    elif what == "tcp_doff_short":
        _set(raw, 46, bytes(((4 - k % 5) << 4 | (raw[46] & 0x0F),)), fix=False)
    elif what == "tcp_doff_long":  # data offset * 4 > the TCP segment: a larger offset, or a shorter datagram
        if draw(st.booleans()):
            doff = min(15, (tot - 20) // 4 + 1 + k % 4)
            _set(raw, 46, bytes((doff << 4 | (raw[46] & 0x0F),)), fix=False)
        else:
            _set(raw, 16, (20 + (raw[46] >> 4) * 4 - 1 - k % 4).to_bytes(2, "big"))
    elif what == "icmp_short":
        _set(raw, 16, (27 - k % 8).to_bytes(2, "big"))
    elif what == "proto":
        _set(raw, 23, bytes((draw(st.sampled_from([0, 2, 4, 41, 47, 50, 58, 132, 255])),)))
    elif what == "tot_short":
        _set(raw, 16, (27 - k % 28).to_bytes(2, "big"))
    elif what == "tot_long":
        _set(raw, 16, min(0xFFFF, len(raw) - 13 + k).to_bytes(2, "big"))
    elif what == "version":
        _set(raw, 14, bytes((draw(st.sampled_from([0, 1, 5, 6, 15])) << 4 | 5,)))
    elif what == "ihl":
        _set(raw, 14, bytes((0x40 | k % 5,)), fix=False)  # no checksum covers < 20 bytes
    elif what == "flip":
        for _ in range(draw(st.integers(1, 3))):
            raw[draw(st.integers(0, min(len(raw), 56) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            _fix_ip_csum(raw)
    return bytes(raw)


@st.composite
def bursts(draw):
    """(raw frames, row width, rows the burst engine marked invalid, a length that exceeds the row)."""
    mix = draw(st.sampled_from(["plain", "udp", "mostly", "any"]))
    if mix == "plain":
        frames = plain_frames()
    elif mix == "udp":
        frames = plain_frames(proto="udp")
    elif mix == "mostly":
        frames = st.one_of(plain_frames(), plain_frames(), plain_frames(), exception_frames())
    else:
        frames = st.one_of(plain_frames(), exception_frames())
    raws = draw(st.lists(frames, min_size=1, max_size=24))
    width = draw(st.sampled_from([48, 64, 128, 1984]))
    invalid = draw(st.lists(st.integers(0, len(raws) - 1), max_size=3))
    return raws, width, invalid


def to_rows(raws: list[bytes], width: int, garbage: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames in rows of ``width`` bytes with stale bytes after each frame, as a worker's private copy."""
    rng = np.random.default_rng(garbage)
    frames = rng.integers(0, 256, (len(raws), width), dtype=np.uint8)
    lengths = np.zeros(len(raws), np.uint32)
    for i, r in enumerate(raws):
        k = min(len(r), width)
        frames[i, :k] = np.frombuffer(r[:k], np.uint8)
        lengths[i] = len(r)
    return frames, lengths


def run_both(fast: ForwardPipeline, ref: ForwardPipeline, raws, width, invalid, direction, garbage=0):
    frames, lengths = to_rows(raws, width, garbage)
    valid = np.ones(len(raws), bool)
    valid[invalid] = False
    f_frames, r_frames = frames.copy(), frames.copy()
    f_out = fast.process(direction, f_frames, lengths.copy(), valid.copy())
    r_out = ref.process(direction, r_frames, lengths.copy(), valid.copy())
    return (f_frames, f_out), (r_frames, r_out), valid


@SETTINGS
@given(st.lists(bursts(), min_size=1, max_size=3), st.integers(0, 1), st.integers(0, 2**16))
def test_fast_path_is_the_general_path(seq, direction: int, garbage: int) -> None:
    fast, ref = ForwardPipeline(MACS), ForwardPipeline(MACS, fast_path=False)
    for raws, width, invalid in seq:  # one pipeline pair through several bursts: its state carries over
        (f_frames, (f_other, f_same)), (r_frames, (r_other, r_same)), valid = run_both(fast, ref, raws, width, invalid, direction, garbage)
        assert np.array_equal(f_frames, r_frames), [i for i in range(len(raws)) if not np.array_equal(f_frames[i], r_frames[i])]
        assert f_other.tolist() == r_other.tolist()
        assert f_same.size == r_same.size == 0
        assert (fast.forwarded, fast.punted) == (ref.forwarded, ref.punted)
        assert fast.drops.tolist() == ref.drops.tolist()
        # The contract: every valid row ends forwarded or dropped (a forwarder punts nothing).
        assert fast.forwarded + fast.punted + int(fast.drops.sum()) == int(valid.sum())
        fast.drops[:] = 0
        ref.drops[:] = 0
    assert ref.stats["fast"] == 0


@pytest.mark.parametrize("what", sorted(EXCEPTIONS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_each_exception_is_left_to_the_general_path(what: str, data) -> None:
    base = EXCEPTIONS[what]
    # Plain frames of the exception's own protocol (one protocol: the fixed-column checks) or of any.
    plain = data.draw(st.sampled_from([plain_frames(proto=base), plain_frames()] if base else [plain_frames()]))
    raws = data.draw(st.lists(st.one_of(plain, exception_frames(what)), min_size=1, max_size=8))
    width = data.draw(st.sampled_from([64, 128, 1984, 1984]))
    invalid = data.draw(st.lists(st.integers(0, len(raws) - 1), max_size=2))
    fast, ref = ForwardPipeline(MACS), ForwardPipeline(MACS, fast_path=False)
    (f_frames, (f_other, _)), (r_frames, (r_other, _)), valid = run_both(fast, ref, raws, width, invalid, data.draw(st.integers(0, 1)))
    assert np.array_equal(f_frames, r_frames)
    assert f_other.tolist() == r_other.tolist()
    assert fast.forwarded == ref.forwarded and fast.drops.tolist() == ref.drops.tolist()
    assert fast.forwarded + int(fast.drops.sum()) == int(valid.sum())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(plain_frames(), min_size=1, max_size=64), st.integers(0, 1))
def test_plain_frames_take_the_fast_path(raws: list[bytes], direction: int) -> None:
    fast, ref = ForwardPipeline(MACS), ForwardPipeline(MACS, fast_path=False)
    (f_frames, (f_other, _)), (r_frames, (r_other, _)), _ = run_both(fast, ref, raws, 1984, [], direction)
    n = len(raws)
    assert fast.stats == {"fast": n, "general": 0}
    assert ref.stats == {"fast": 0, "general": n}
    assert fast.forwarded == n and f_other.tolist() == list(range(n))
    assert np.array_equal(f_frames, r_frames)
    # What went out: the next hop's MACs, TTL - 1, an intact header checksum.
    src, dst = (MACS["outside_gw"], MACS["outside_peer"]) if direction == 0 else (MACS["inside_gw"], MACS["inside_peer"])
    for i, raw in enumerate(raws):
        out = f_frames[i, : len(raw)].tobytes()
        assert out[0:6] == dst and out[6:12] == src
        assert out[22] == raw[22] - 1
        assert internet_checksum(out[14:34]) == 0
        assert out[12:22] == raw[12:22] and out[23] == raw[23] and out[26:] == raw[26:]


def test_exceptions_take_the_general_path_and_the_rest_stays_fast() -> None:
    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    udp = P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1000, 53, b"hello")
    tcp = P.build_ipv4_tcp(a, b, IN_HOST, OUT_HOST, 1000, 80)
    tagged = P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1000, 53, b"hello", vlan=7)
    expiring = P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1000, 53, b"hello", ttl=1)
    bad = bytearray(udp)
    bad[24] ^= 0xFF
    raws = [udp, tcp, tagged, udp, expiring, bytes(bad), P.build_arp_request(a, IN_HOST, OUT_HOST), tcp]
    fast, ref = ForwardPipeline(MACS), ForwardPipeline(MACS, fast_path=False)
    (f_frames, (f_other, _)), (r_frames, (r_other, _)), _ = run_both(fast, ref, raws, 1984, [], 0)
    assert fast.stats == {"fast": 4, "general": 4}
    assert f_other.tolist() == r_other.tolist() == [0, 1, 2, 3, 7]  # in burst order
    assert np.array_equal(f_frames, r_frames)
    drops = {DROP_REASONS[i]: int(c) for i, c in enumerate(fast.drops) if c}
    assert drops == {"ttl_expired": 1, "bad_ip_checksum": 1, "not_ipv4": 1}
    assert fast.drops.tolist() == ref.drops.tolist()


def test_a_mixed_burst_after_single_protocol_ones_is_still_fast() -> None:
    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    udp = P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1000, 53, b"hello")
    tcp = P.build_ipv4_tcp(a, b, IN_HOST, OUT_HOST, 1000, 80)
    echo = P.build_icmp_echo(a, b, IN_HOST, OUT_HOST, 7, 1, b"ping")
    fast = ForwardPipeline(MACS)
    for raws in ([udp] * 4, [udp, tcp, echo, udp], [tcp, echo] * 3, [tcp] * 5, [echo, udp]):
        frames, lengths = to_rows(raws, 1984, 0)
        before = fast.stats["fast"]
        other, _ = fast.process(1, frames, lengths, np.ones(len(raws), bool))
        assert other.tolist() == list(range(len(raws)))
        assert fast.stats["fast"] - before == len(raws)
    assert fast.stats["general"] == 0


def test_unusable_layouts_fall_back_to_the_general_path() -> None:
    udp = P.build_ipv4_udp("02:00:00:00:00:01", "02:00:00:00:00:02", IN_HOST, OUT_HOST, 1, 2, b"")
    for width in (44, 60, 66):  # too narrow for the fast path's columns, or rows not 8-byte multiples
        fast = ForwardPipeline(MACS)
        frames, lengths = to_rows([udp] * 3, width, 0)
        other, _ = fast.process(0, frames, lengths, np.ones(3, bool))
        assert fast.stats["fast"] == 0
        if width >= len(udp):
            assert other.tolist() == [0, 1, 2]


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_bursts(n: int) -> None:
    fast = ForwardPipeline(MACS)
    frames, lengths = to_rows([P.build_ipv4_tcp("02:00:00:00:00:01", "02:00:00:00:00:02", IN_HOST, OUT_HOST, 1, 2)] * n, 64, 0)
    other, same = fast.process(0, frames, lengths, np.ones(n, bool))
    assert other.tolist() == list(range(n)) and same.size == 0 and fast.forwarded == n


@pytest.mark.parametrize("width", [64, 128])
def test_a_frame_longer_than_its_row_is_dropped_as_the_general_path_drops_it(width: int) -> None:
    udp = P.build_ipv4_udp("02:00:00:00:00:01", "02:00:00:00:00:02", IN_HOST, OUT_HOST, 1, 2, b"x")
    raws = [udp + bytes(width - len(udp)), udp + bytes(width + 1 - len(udp)), udp]  # fits; one byte over; short
    fast, ref = ForwardPipeline(MACS), ForwardPipeline(MACS, fast_path=False)
    (f_frames, (f_other, _)), (r_frames, (r_other, _)), _ = run_both(fast, ref, raws, width, [], 0)
    assert f_other.tolist() == r_other.tolist() == [0, 2]
    assert np.array_equal(f_frames, r_frames) and fast.drops.tolist() == ref.drops.tolist()
    assert fast.stats == {"fast": 2, "general": 1}


def test_traffic_with_an_exception_in_every_burst_skips_the_fast_path_and_probes_it() -> None:
    from hotplane.secondary.forward import PARTIAL_STREAK, PROBE_EVERY

    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    udp = P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1000, 53, b"hello")
    tagged = P.build_ipv4_udp(a, b, IN_HOST, OUT_HOST, 1000, 53, b"hello", vlan=7)
    partial, plain = [udp] * 7 + [tagged], [udp] * 8
    fast, ref = ForwardPipeline(MACS), ForwardPipeline(MACS, fast_path=False)
    took = []
    for raws in [partial] * (PARTIAL_STREAK + PROBE_EVERY) + [plain] * (PROBE_EVERY + 1):
        before = fast.stats["fast"]
        (f_frames, (f_other, _)), (r_frames, (r_other, _)), _ = run_both(fast, ref, raws, 1984, [], 0)
        assert np.array_equal(f_frames, r_frames) and f_other.tolist() == r_other.tolist()
        assert fast.drops.tolist() == ref.drops.tolist()
        took.append(fast.stats["fast"] - before)
    # The first PARTIAL_STREAK partial bursts try the fast path; then one in PROBE_EVERY does.
    assert took[:PARTIAL_STREAK] == [7] * PARTIAL_STREAK
    assert took[PARTIAL_STREAK : PARTIAL_STREAK + PROBE_EVERY - 1] == [0] * (PROBE_EVERY - 1)
    assert took[PARTIAL_STREAK + PROBE_EVERY - 1] == 7  # the probe, on a partial burst: skipping goes on
    plain_took = took[PARTIAL_STREAK + PROBE_EVERY :]
    # Plain traffic again: the next probe takes a whole burst, and every burst after it is fast.
    probe = plain_took.index(8)
    assert plain_took[:probe] == [0] * probe and plain_took[probe:] == [8] * (len(plain_took) - probe)
