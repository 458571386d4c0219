"""Tests for hotplane.shared.checksum: RFC 1071 sums, vectorized sums, RFC 1624 updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotplane.shared import checksum as C

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_sum(data: bytes, initial: int = 0) -> int:
    """Textbook RFC 1071: add 16-bit big-endian words, pad odd, fold carries."""
    if len(data) % 2:
        data += b"\x00"
    s = initial
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_csum(data: bytes, initial: int = 0) -> int:
    return ~ref_sum(data, initial) & 0xFFFF


# --- one buffer -------------------------------------------------------------


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert C.ones_sum(data) == 0xDDF2
    assert C.internet_checksum(data) == 0x220D


def test_known_ipv4_header() -> None:
    # A well-known example header (checksum field 0xb861).
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert C.internet_checksum(hdr) == 0xB861
    with_csum = hdr[:10] + bytes.fromhex("b861") + hdr[12:]
    assert C.ones_sum(with_csum) == 0xFFFF
    assert C.internet_checksum(with_csum) == 0


@SETTINGS
@given(st.binary(max_size=300), st.integers(0, 0xFFFFF))
def test_one_buffer_matches_reference(data: bytes, initial: int) -> None:
    assert C.ones_sum(data, initial) == ref_sum(data, initial)
    assert C.internet_checksum(data, initial) == ref_csum(data, initial)
    assert C.internet_checksum(bytearray(data)) == ref_csum(data)
    assert C.internet_checksum(np.frombuffer(data, dtype=np.uint8)) == ref_csum(data)


def test_zero_edge_cases() -> None:
    # All-zero data: the sum is +0 and the checksum -0 (0xFFFF); the only way to get 0xFFFF.
    assert C.ones_sum(b"\x00" * 10) == 0
    assert C.internet_checksum(b"\x00" * 10) == 0xFFFF
    assert C.internet_checksum(b"") == 0xFFFF
    # A sum of -0 (0xFFFF) gives a checksum of +0.
    assert C.ones_sum(b"\xff\xff") == 0xFFFF
    assert C.internet_checksum(b"\x12\x34\xed\xcb") == 0
    # Non-zero data never sums to +0: end-around carry maps 0x10000 to 1, not 0.
    assert C.ones_sum(b"\xff\xff\x00\x01") == 1


@SETTINGS
@given(st.binary(min_size=2, max_size=64).filter(lambda b: any(b)))
def test_both_zero_representations_verify(data: bytes) -> None:
    if len(data) % 2:
        data += b"\x00"
    c = C.internet_checksum(data)
    assert c != 0xFFFF  # non-zero data: a computed checksum is in 0..0xFFFE
    assert C.ones_sum(data + c.to_bytes(2, "big")) == 0xFFFF
    if c == 0:
        # -0 in the field verifies as well as +0
        assert C.ones_sum(data + b"\xff\xff") == 0xFFFF


# --- bursts -------------------------------------------------------------------


@st.composite
def burst_regions(draw):
    n = draw(st.integers(1, 12))
    width = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
    if draw(st.booleans()):
        start = draw(st.integers(0, width + 3))
    else:
        start = rng.integers(0, width + 4, size=n)
    length = rng.integers(-3, width + 10, size=n)
    return rows, start, length


def _ref_rows(rows: np.ndarray, start, length) -> list[int]:
    n, width = rows.shape
    starts = np.broadcast_to(np.asarray(start), (n,))
    out = []
    for i in range(n):
        s = min(max(int(starts[i]), 0), width)
        ln = max(int(length[i]), 0)
        out.append(ref_csum(rows[i, s : min(s + ln, width)].tobytes()))
    return out


@SETTINGS
@given(burst_regions())
def test_vectorized_rows_match_reference(case) -> None:
    rows, start, length = case
    got = C.checksum_rows(rows, start, length)
    assert got.dtype == np.uint16
    assert got.tolist() == _ref_rows(rows, start, length)


@SETTINGS
@given(burst_regions(), st.integers(0, 2**40))
def test_vectorized_rows_with_initial(case, initial: int) -> None:
    rows, start, length = case
    init = np.full(rows.shape[0], initial, dtype=np.uint64)
    got = C.checksum_rows(rows, start, length, initial=init)
    n, width = rows.shape
    starts = np.broadcast_to(np.asarray(start), (n,))
    for i in range(n):
        s = min(max(int(starts[i]), 0), width)
        region = rows[i, s : min(s + max(int(length[i]), 0), width)].tobytes()
        assert got[i] == ref_csum(region, initial)


def test_rows_clip_to_row_width() -> None:
    # A region that runs off the row is clipped, never read from the next row.
    big = np.arange(40, dtype=np.uint8).reshape(2, 20)
    rows = big[:, :8]  # strided view: row 0's "continuation" is big[0, 8:]
    got = C.checksum_rows(rows, 4, np.array([100, 100]))
    assert got.tolist() == [ref_csum(big[0, 4:8].tobytes()), ref_csum(big[1, 4:8].tobytes())]


@SETTINGS
@given(st.integers(1, 20), st.integers(0, 10), st.sampled_from([2, 4, 6, 20, 22, 60]), st.integers(0, 2**32 - 1))
def test_checksum_fixed_matches_rows(n: int, start: int, nbytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n, start + nbytes + 3), dtype=np.uint8)
    assert C.checksum_fixed(rows, start, nbytes).tolist() == C.checksum_rows(rows, start, np.full(n, nbytes)).tolist()
    assert C.checksum_fixed(rows, start, nbytes).tolist() == [ref_csum(r[start : start + nbytes].tobytes()) for r in rows]


def test_checksum_fixed_rejects_bad_region() -> None:
    rows = np.zeros((2, 10), dtype=np.uint8)
    with pytest.raises(ValueError):
        C.checksum_fixed(rows, 0, 3)
    with pytest.raises(ValueError):
        C.checksum_fixed(rows, 4, 8)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 0xFFFF)), min_size=1, max_size=10))
def test_pseudo_header_sum(items) -> None:
    s, d, p, ln = (np.array(x, dtype=np.uint64) for x in zip(*items))
    got = C.pseudo_header_sum(s, d, p, ln)
    want = [C.pseudo_header_sum_scalar(*map(int, t)) for t in items]
    assert got.tolist() == want
    # It is the sum of the 12-byte pseudo-header's words.
    for (src, dst, proto, l4len), g in zip(items, got):
        ph = src.to_bytes(4, "big") + dst.to_bytes(4, "big") + bytes([0, proto]) + l4len.to_bytes(2, "big")
        assert ref_sum(ph) == C.fold16(np.array([g]))[0]


def test_fold16_large_values() -> None:
    vals = np.array([0, 0xFFFF, 0x10000, 0xFFFFFFFF, 2**47 + 12345, 2**48 - 1], dtype=np.uint64)
    want = []
    for v in vals.tolist():
        while v >> 16:
            v = (v & 0xFFFF) + (v >> 16)
        want.append(v)
    assert C.fold16(vals).tolist() == want
    out = np.empty(len(vals), dtype=np.uint16)
    assert C.fold16(vals, out=out) is out


# --- incremental updates (RFC 1624) -------------------------------------------------


def _words_bytes(words: list[int]) -> bytes:
    return b"".join(w.to_bytes(2, "big") for w in words)


@SETTINGS
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=30), st.data())
def test_replace16_equals_recompute(words: list[int], data) -> None:
    i = data.draw(st.integers(0, len(words) - 1))
    new = data.draw(st.integers(0, 0xFFFF))
    hc = ref_csum(_words_bytes(words))
    new_words = words[:i] + [new] + words[i + 1 :]
    full = ref_csum(_words_bytes(new_words))
    got = int(C.csum_replace16(hc, words[i], new))
    if any(new_words):
        assert got == full
    else:
        # The degenerate all-zero case: both zeros are the same value.
        assert {got, full} <= {0, 0xFFFF}


@SETTINGS
@given(st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=30), st.data())
def test_replace32_equals_recompute(words: list[int], data) -> None:
    i = data.draw(st.integers(0, len(words) - 2))
    new = data.draw(st.integers(0, 2**32 - 1))
    old = (words[i] << 16) | words[i + 1]
    hc = ref_csum(_words_bytes(words))
    new_words = words[:i] + [new >> 16, new & 0xFFFF] + words[i + 2 :]
    full = ref_csum(_words_bytes(new_words))
    got = int(C.csum_replace32(hc, old, new))
    if any(new_words):
        assert got == full
    else:
        assert {got, full} <= {0, 0xFFFF}


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), min_size=1, max_size=40))
def test_replace16_vectorized_matches_scalar(triples) -> None:
    hc, old, new = (np.array(x, dtype=np.uint16) for x in zip(*triples))
    got = C.csum_replace16(hc, old, new)
    assert got.dtype == np.uint16
    for g, (h, o, n) in zip(got.tolist(), triples):
        t = (~h & 0xFFFF) + (~o & 0xFFFF) + n
        while t >> 16:
            t = (t & 0xFFFF) + (t >> 16)
        assert g == ~(t or 0xFFFF) & 0xFFFF  # the fold taken in 1..0xFFFF
        assert g != 0xFFFF
    assert len(got) == len(triples)
    out = np.empty(len(triples), dtype=np.uint16)
    assert C.csum_replace16(hc, old, new, out=out) is out and out.tolist() == got.tolist()


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=40))
def test_replace32_is_two_replace16(triples) -> None:
    hc, old, new = (np.array(x, dtype=np.uint32) for x in zip(*triples))
    hc = hc.astype(np.uint16)
    got = C.csum_replace32(hc, old, new)
    two = C.csum_replace16(C.csum_replace16(hc, old >> 16, new >> 16), old & 0xFFFF, new & 0xFFFF)
    # Congruent mod 0xFFFF and both in 0..0xFFFE: equal.
    assert got.tolist() == two.tolist()


def test_replace_documented_edge_case() -> None:
    # HC == 0xFFFF (a -0 field), m == 0xFFFF, m' == 0: a fixed-width eqn. 3 would
    # give 0xFFFF; we give 0x0000 like a full recompute (module docstring).
    words = [0x1234, 0xFFFF]  # checksum of these is ~(0x1234 + 0xFFFF) = ~0x1234
    assert int(C.csum_replace16(0xFFFF, 0xFFFF, 0)) == 0
    hc = ref_csum(_words_bytes(words))
    assert int(C.csum_replace16(hc, 0xFFFF, 0)) == ref_csum(_words_bytes([0x1234, 0]))
    # Unchanged field: the checksum is unchanged; a -0 field becomes +0.
    for hc in (0, 1, 0x1234, 0xFFFE):
        assert int(C.csum_replace16(hc, 0xABCD, 0xABCD)) == hc
    assert int(C.csum_replace16(0xFFFF, 0xABCD, 0xABCD)) == 0
    # Scalars in, 0-d out; arrays broadcast against scalars.
    assert C.csum_replace16(1, 2, 3).shape == ()
    assert C.csum_replace32(np.array([0x1111, 0x2222], np.uint16), 0x01020304, 0x01020304).tolist() == [0x1111, 0x2222]


def test_udp_fixup_rules() -> None:
    old = np.array([0, 0, 0x1234, 0x1234, 0xFFFF], dtype=np.uint16)
    new = np.array([0x5555, 0, 0, 0x4321, 0], dtype=np.uint16)
    assert C.udp_csum_fixup(old, new).tolist() == [0, 0, 0xFFFF, 0x4321, 0xFFFF]
    out = np.empty(5, dtype=np.uint16)
    assert C.udp_csum_fixup(old, new, out=out) is out


@SETTINGS
@given(st.binary(min_size=8, max_size=40), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_udp_address_rewrite_equals_recompute(seg: bytes, src: int, dst: int, new_src: int) -> None:
    """A UDP checksum updated for a new source address equals the transmitted form of a recompute."""
    seg = bytearray(seg)
    seg[6:8] = b"\x00\x00"

    def wire(s: int) -> int:
        c = ref_csum(bytes(seg), C.pseudo_header_sum_scalar(s, dst, 17, len(seg)))
        return c or 0xFFFF  # RFC 768: computed 0 is sent as all ones

    before = wire(src)
    upd = C.udp_csum_fixup(before, C.csum_replace32(before, src, new_src))
    assert int(upd) == wire(new_src)
    # "No checksum" stays none.
    assert int(C.udp_csum_fixup(0, C.csum_replace32(0, src, new_src))) == 0


@SETTINGS
@given(st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=30), st.data())
def test_replace_addr_port_equals_recompute(words: list[int], data) -> None:
    # words[0:2] play the address, words[3] the port (like pseudo-header + header).
    new_addr = data.draw(st.integers(0, 2**32 - 1))
    new_port = data.draw(st.integers(0, 0xFFFF))
    old_addr = (words[0] << 16) | words[1]
    hc = ref_csum(_words_bytes(words))
    new_words = [new_addr >> 16, new_addr & 0xFFFF, words[2], new_port] + words[4:]
    full = ref_csum(_words_bytes(new_words))
    got = int(C.csum_replace_addr_port(hc, old_addr, new_addr, words[3], new_port))
    if any(new_words):
        assert got == full
    else:
        assert {got, full} <= {0, 0xFFFF}
    # Vectorized form agrees with the scalar one.
    arr = C.csum_replace_addr_port(np.array([hc, hc], np.uint16), np.array([old_addr] * 2, np.uint32), new_addr, words[3], new_port)
    assert arr.tolist() == [got, got]


# --- the TTL decrement ----------------------------------------------------------


def test_ttl_decrement_csum_is_csum_replace16_for_every_checksum_and_ttl() -> None:
    every = np.arange(0x10000, dtype=np.uint32).astype(np.uint16)
    big = C.ttl_decrement_csum(every, np.zeros(0x10000, np.uint32)).astype(np.uint16)
    for ttl in (1, 2, 64, 255):  # the result must not depend on the TTL:protocol word
        for proto in (1, 6, 17, 255):
            w = np.uint16(ttl << 8 | proto)
            assert np.array_equal(big, C.csum_replace16(every, w, np.uint16(w - 0x100)))
    # "native": the same map on the field's two bytes as a native uint16 view reads them.
    as_read = every.astype(">u2").view(np.uint16)
    native = C.ttl_decrement_csum(as_read, np.zeros(0x10000, np.uint32), "native").astype(np.uint16)
    assert np.array_equal(native, big.astype(">u2").view(np.uint16))
    with pytest.raises(ValueError):
        C.ttl_decrement_csum(every, np.zeros(0x10000, np.uint32), "little")


@SETTINGS
@given(st.binary(min_size=20, max_size=20), st.integers(1, 255))
def test_ttl_decrement_csum_equals_a_full_recompute(hdr: bytes, ttl: int) -> None:
    h = bytearray(hdr)
    h[0], h[8], h[10:12] = 0x45, ttl, b"\x00\x00"  # a real header's version nibble: never all zero
    h[10:12] = ref_csum(bytes(h)).to_bytes(2, "big")
    after = bytearray(h)
    after[8] = ttl - 1
    after[10:12] = b"\x00\x00"
    before = np.array([int.from_bytes(h[10:12], "big")], np.uint16)
    assert int(C.ttl_decrement_csum(before, np.zeros(1, np.uint32))[0]) == ref_csum(bytes(after))
