"""The L3 forward pipeline: what a worker does to a burst when it routes without NAT.

Parse, drop what is not forwardable (by reason), decrement TTL with an
incremental checksum update, rewrite the MACs for the next hop. Whole bursts,
numpy only: no per-packet Python.

Two paths, one result. The fast path (:class:`PlainForward`) takes the common
frame -- untagged Ethernet, IPv4 with IHL 5, not a fragment, TTL >= 2, a
valid header checksum, a TCP/UDP/ICMP header that fits, lengths that agree --
with a handful of whole-burst operations on fixed columns, and leaves every
other row untouched. The general path (:func:`~hotplane.shared.packet.parse_burst`
and the rewrite helpers) takes the rest: VLAN tags, options, fragments, TTL
expiry, other ethertypes, bad checksums, each dropped by its reason. For any
burst the frames, the rows sent and the counters are exactly what the general
path alone gives (``tests/test_forward.py``).
"""

from __future__ import annotations

import sys

import numpy as np

from hotplane.schema.counters import DROP_REASONS, N_REASONS
from hotplane.shared.checksum import ttl_decrement_csum
from hotplane.shared.packet import (
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ParsedBurst,
    decrement_ttl,
    mac_bytes,
    parse_burst,
    rewrite_macs,
)


def _reason_index(name: str) -> int:
    return DROP_REASONS.index(name) if name in DROP_REASONS else DROP_REASONS.index("other")


#: packet.DropReason code -> index in the workers' drop counters.
PACKET_TO_COUNTER = np.array(
    [_reason_index(n) for n in (
        "other",  # OK never counts as a drop
        "runt", "oversized", "not_ipv4", "truncated", "bad_ip_header", "bad_ip_checksum",
        "fragment", "ttl_expired", "unsupported_protocol", "malformed_l4",
    )],
    dtype=np.intp,
)
#: burst.RX_REASONS (runt, oversized, truncated, bad_descriptor) -> counter index.
RX_TO_COUNTER = np.array([_reason_index(n) for n in ("runt", "oversized", "truncated", "bad_descriptor")], np.intp)
_TTL_EXPIRED = _reason_index("ttl_expired")


# Fixed columns of an untagged IPv4 frame with IHL 5, read through a native 64-bit view of the
# rows (no byte swap: masks and values are the bytes as the view reads them). Word 1 is bytes
# 8-15 (ethertype, version/IHL; TOS ignored), word 2 bytes 16-23 (MF and the fragment offset,
# and the protocol when the burst has one).
def _native64(raw: bytes) -> int:
    return int.from_bytes(raw, sys.byteorder)


_W1_MASK = _native64(b"\x00\x00\x00\x00\xff\xff\xff\x00")
_W1_VALUE = _native64(b"\x00\x00\x00\x00\x08\x00\x45\x00")
_W2_MASK_ANY = _native64(b"\x00\x00\x00\x00\x3f\xff\x00\x00")
_W2_MASK_PROTO = _native64(b"\x00\x00\x00\x00\x3f\xff\x00\xff")
_W2_VALUE_PROTO = [_native64(bytes(7) + bytes((p,))) for p in range(256)]
# By protocol: 1 TCP, 2 UDP, 3 ICMP, 0 unsupported; and the smallest L4 header each kind needs.
_K_TCP, _K_UDP, _K_ICMP = 1, 2, 3
_KIND = np.zeros(256, np.uint8)
_KIND[[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP]] = (_K_TCP, _K_UDP, _K_ICMP)
_L4_MIN = np.array([0x10000, 20, 8, 8], np.uint32)  # kind 0: above any 16-bit length, never fits
# The fast path's checks: rows of PlainForward._checks.
_N_CHECKS = 9
_C_ETH, _C_FRAG, _C_VALID, _C_TTL, _C_LEN, _C_L4_MIN, _C_L4_FITS, _C_CSUM, _C_WIDTH = range(_N_CHECKS)
#: Row width the fast path needs: its columns reach the TCP data offset (byte 46).
FAST_MIN_WIDTH = 48


class PlainForward:
    """The fast path: forward the plain IPv4 rows of a burst with whole-burst column operations.

    Checks are those of ``parse_burst`` + ``decrement_ttl`` for such a frame
    (or stricter), so a row it takes is one the general path forwards too, and
    its rewrite -- MACs, TTL - 1, RFC 1624 header checksum
    (:func:`~hotplane.shared.checksum.ttl_decrement_csum`) -- is byte for byte
    the general path's. A row it does not take is not written. All scratch
    is allocated here, once.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ok = np.zeros(capacity, bool)
        self._b = np.zeros(capacity, bool)
        self._checks = np.ones((_N_CHECKS, capacity), bool)  # one row per check: True where the frame passes
        self._w64 = np.zeros(capacity, np.uint64)
        self._k8 = np.zeros(capacity, np.uint8)
        self._tcp = np.zeros(capacity, np.uint16)
        self._fields = np.zeros((2, capacity), np.uint32)  # total length, UDP length
        self._need = np.zeros(capacity, np.uint32)
        self._lo = np.zeros(capacity, np.uint32)
        self._hdr = np.zeros((10, capacity), np.uint32)  # the header's ten words, one row each
        self._sum = np.zeros(capacity, np.uint32)
        self._csum = np.zeros(capacity, np.uint32)
        self._mixed = False  # the last burst carried more than one protocol

    @staticmethod
    def usable(frames: np.ndarray) -> bool:
        """Whether ``frames`` has the layout the fast path's word views need (rows of 8-byte multiples)."""
        return (frames.ndim == 2 and frames.dtype == np.uint8 and frames.shape[1] >= FAST_MIN_WIDTH
                and frames.shape[1] % 8 == 0 and frames.strides[1] == 1 and frames.strides[0] % 8 == 0)

    def classify(self, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray, n: int) -> tuple[np.ndarray, int]:
        """The rows of ``frames[:n]`` the fast path forwards: (mask, a view on scratch; how many).

        Most bursts carry one protocol, checked with the fixed columns alone;
        once a burst has shown more than one, bursts take the per-row rule
        until one carries a single protocol again.
        """
        F = frames[:n]
        p0 = int(F[0, 23])
        kind = int(_KIND[p0])
        if kind and not self._mixed:
            ok = self._check(F, lengths, valid, n, p0, kind)
            m = int(np.count_nonzero(ok))
            if m == n:
                return ok, m
            b = self._b[:n]
            np.equal(F[:, 23], p0, out=b)
            if np.count_nonzero(b) == n:
                return ok, m
            self._mixed = True
        elif self._mixed:
            b = self._b[:n]
            np.equal(F[:, 23], p0, out=b)
            if np.count_nonzero(b) == n:
                self._mixed = False
                ok = self._check(F, lengths, valid, n, p0, kind)
                return ok, int(np.count_nonzero(ok))
        ok = self._check(F, lengths, valid, n, None, -1)
        return ok, int(np.count_nonzero(ok))

    def _check(self, F: np.ndarray, lengths: np.ndarray, valid: np.ndarray, n: int, proto: int | None, kind: int) -> np.ndarray:
        """The fast path's checks over ``F``; ``proto``/``kind`` when every row must carry that protocol, else per row."""
        ok = self.ok[:n]
        if kind == 0:
            ok[:] = False
            return ok
        C = self._checks[:, :n]
        # Ethertype IPv4, version 4, IHL 5; not a fragment (and the protocol): two masked words.
        W64, w = F.view("=u8"), self._w64[:n]
        np.bitwise_and(W64[:, 1], _W1_MASK, out=w)
        np.equal(w, _W1_VALUE, out=C[_C_ETH])
        if proto is None:
            np.bitwise_and(W64[:, 2], _W2_MASK_ANY, out=w)
            np.equal(w, 0, out=C[_C_FRAG])
        else:
            np.bitwise_and(W64[:, 2], _W2_MASK_PROTO, out=w)
            np.equal(w, _W2_VALUE_PROTO[proto], out=C[_C_FRAG])
        np.copyto(C[_C_VALID], valid[:n])
        # TTL >= 2 (a TTL-1 packet expires here: the general path counts it).
        np.greater_equal(F[:, 22], 2, out=C[_C_TTL])
        # The datagram fits the frame, the frame its row. Total and UDP length in one copy.
        fields = self._fields[:, :n]
        np.copyto(fields.T, F.view(">u2")[:, 8:20:11])
        tot, need = fields[0], self._need[:n]
        np.add(tot, 14, out=need)
        np.less_equal(need, lengths, out=C[_C_LEN])
        np.less_equal(lengths, F.shape[1], out=C[_C_WIDTH])
        # The L4 header fits the datagram: TCP 20 <= data offset, UDP 8 <= length, ICMP 8 bytes;
        # each + 20 (the IPv4 header) <= total length.
        if kind == _K_UDP:
            np.greater_equal(fields[1], 8, out=C[_C_L4_MIN])
            np.add(fields[1], 20, out=need)
        elif kind == _K_TCP:
            np.right_shift(F[:, 46], 2, out=need)
            np.bitwise_and(need, 0x3C, out=need)
            np.greater_equal(need, 20, out=C[_C_L4_MIN])
            need += 20
        elif kind == _K_ICMP:
            C[_C_L4_MIN] = True
            need[:] = 28
        else:
            k8, tcp, lo = self._k8[:n], self._tcp[:n], self._lo[:n]
            b = self._b[:n]
            np.take(_KIND, F[:, 23], out=k8)
            np.copyto(need, fields[1])  # the UDP length; TCP and ICMP rows replace it
            np.right_shift(F[:, 46], 2, out=tcp)
            np.bitwise_and(tcp, 0x3C, out=tcp)
            np.equal(k8, _K_TCP, out=b)
            np.copyto(need, tcp, where=b)
            np.equal(k8, _K_ICMP, out=b)
            np.copyto(need, 8, where=b)
            np.take(_L4_MIN, k8, out=lo)
            np.greater_equal(need, lo, out=C[_C_L4_MIN])
            need += 20
        np.less_equal(need, tot, out=C[_C_L4_FITS])
        # Header checksum: the ten words (bytes 14..33) sum to a multiple of 0xFFFF (never 0: the
        # version nibble). Summed as read natively: a byte-swapped sum is 256 times the sum mod 0xFFFF.
        hdr, s = self._hdr[:, :n], self._sum[:n]
        np.copyto(hdr, F.view("=u2")[:, 7:17].T)
        np.add.reduce(hdr, axis=0, out=s)
        np.remainder(s, 0xFFFF, out=s)
        np.equal(s, 0, out=C[_C_CSUM])
        np.logical_and.reduce(C, axis=0, out=ok)
        return ok

    def rewrite(self, frames: np.ndarray, n: int, macs: np.ndarray, every: bool) -> None:
        """Rewrite the rows of ``self.ok`` (all of ``frames[:n]`` when ``every``): MACs, TTL - 1, checksum."""
        F = frames[:n]
        W16 = F.view("=u2")
        ttl = F[:, 22]
        csum = ttl_decrement_csum(W16[:, 12], self._csum[:n], "native")
        if every:
            F[:, 0:12] = macs
            np.subtract(ttl, 1, out=ttl)
            np.copyto(W16[:, 12], csum, casting="unsafe")
            return
        ok = self.ok[:n]
        np.copyto(F[:, 0:12], macs, where=ok[:, None])
        np.subtract(ttl, 1, out=ttl, where=ok)
        np.copyto(W16[:, 12], csum, casting="unsafe", where=ok)


#: After this many bursts in a row that the fast path could not finish, bursts skip it ...
PARTIAL_STREAK = 4
#: ... except one in this many, which tries it again (and ends the skipping if it takes the whole burst).
PROBE_EVERY = 16


class ForwardPipeline:
    """Route both directions: inside -> outside next hop and back, MACs from config.

    ``fast_path=False`` sends every burst through the general path alone (the
    reference the fast path is tested against). ``stats`` counts the rows each
    path took: ``fast`` forwarded by the fast path, ``general`` handed to the
    general path (valid rows the fast path left, or every valid row of a
    burst that skipped the fast path).

    The general path costs about the same for one row as for a whole burst
    (its cost is per operation, not per row), so a burst the fast path cannot
    finish costs the fast path's checks on top of it. Traffic where every
    burst carries an exception (say a few tagged frames in each) therefore
    skips the fast path after :data:`PARTIAL_STREAK` such bursts, trying it on
    one burst in :data:`PROBE_EVERY` until it takes a whole burst again.
    """

    def __init__(self, macs: dict[str, bytes], capacity: int = 512, *, fast_path: bool = True) -> None:
        # (src, dst) MACs for frames leaving on each side.
        self.out_macs = (macs["outside_gw"], macs["outside_peer"])
        self.in_macs = (macs["inside_gw"], macs["inside_peer"])
        # The 12 bytes (dst, src) the fast path writes, by direction.
        self._mac_rows = tuple(
            np.frombuffer(mac_bytes(dst) + mac_bytes(src), np.uint8) for src, dst in (self.out_macs, self.in_macs)
        )
        self.pb = ParsedBurst(capacity)
        self.fast = PlainForward(capacity) if fast_path else None
        self.drops = np.zeros(N_REASONS, np.int64)
        self.forwarded = 0
        self.punted = 0
        self.emit: list[tuple[int, bytes]] = []
        self.stats = {"fast": 0, "general": 0}
        self._none = np.zeros(0, np.intp)
        self._rows = np.arange(capacity, dtype=np.intp)
        self._left = np.zeros(capacity, bool)
        self._partial_streak = 0  # bursts in a row the fast path could not finish
        self._skip = 0  # bursts left to send straight to the general path

    def tick(self, now: float) -> None:
        """Nothing ages in a plain forwarder."""

    def process(self, direction: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rewrite a burst in place; returns (to_other, to_same) row indices. Drops go to ``self.drops``.

        ``direction`` 0 = inside -> outside, 1 = outside -> inside.
        """
        n = int(lengths.shape[0])
        fp = self.fast
        if n == 0 or fp is None or n > fp.capacity or not fp.usable(frames) or self._skip:
            if self._skip:
                self._skip -= 1
            idx = self._route(direction, frames, lengths, valid)
            self.forwarded = int(idx.size)
            return idx, self._none
        ok, m = fp.classify(frames, lengths, valid, n)
        if m:
            fp.rewrite(frames, n, self._mac_rows[direction], m == n)
            self.stats["fast"] += m
        if m == n:
            self._partial_streak = 0
            self.forwarded = n
            return self._rows[:n], self._none
        self._partial_streak += 1
        if self._partial_streak >= PARTIAL_STREAK:
            self._skip = PROBE_EVERY - 1
        # The rest through the general path; rows keep their order in the burst.
        left = self._left[:n]
        np.logical_not(ok, out=left)
        left &= valid[:n]
        idx = self._route(direction, frames, lengths, left)
        if m:
            ok[idx] = True
            idx = np.flatnonzero(ok)
        self.forwarded = int(idx.size)
        return idx, self._none

    def _route(self, direction: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The general path over the rows of ``valid``; returns the rows it forwards."""
        pb = self.pb
        parse_burst(frames, lengths, pb)
        n = lengths.shape[0]
        self.stats["general"] += int(np.count_nonzero(valid[:n]))
        ok = pb.valid[:n]
        ok &= valid
        if not ok.all():
            bad = ~ok & valid  # invalid descriptors were counted by the burst engine
            if bad.any():
                np.add.at(self.drops, PACKET_TO_COUNTER[pb.drop_reason[:n][bad]], 1)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return idx
        expired = decrement_ttl(frames, pb, idx)
        if expired.size:
            self.drops[_TTL_EXPIRED] += expired.size
            idx = np.flatnonzero(pb.valid[:n] & valid)
        src, dst = self.out_macs if direction == 0 else self.in_macs
        rewrite_macs(frames, pb, idx, src, dst)
        return idx
