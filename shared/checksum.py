"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

Three flavours live here:

* one buffer, for the slow path, the builders and the tests
  (:func:`ones_sum`, :func:`internet_checksum`);
* a burst of regions held as rows of a 2-D ``uint8`` array, one region per row
  (:func:`sum16_rows`, :func:`checksum_rows`, :func:`checksum_fixed`,
  :func:`pseudo_header_sum`), vectorized with numpy;
* the incremental update of a checksum when one 16- or 32-bit field changes,
  vectorized over arrays of old and new values (:func:`csum_replace16`,
  :func:`csum_replace32`), plus :func:`udp_csum_fixup` for UDP's special zero,
  and :func:`ttl_decrement_csum`, that update for a TTL decrement in two operations.

One's-complement edge cases (the reason this module has docstrings this long)
---------------------------------------------------------------------------
16-bit one's-complement arithmetic has two zeros: ``0x0000`` (+0) and
``0xFFFF`` (-0). Folding a sum with end-around carry maps any sum of at least
one non-zero word into ``1..0xFFFF`` (never +0) and only an all-zero input to
``0x0000``. Hence:

* a checksum computed from scratch, ``~fold(sum)``, is in ``0..0xFFFE`` for any
  non-zero data and is ``0xFFFF`` only when every covered word is zero (an IPv4
  header never is: its version nibble is 4; a UDP/TCP pseudo-header never is:
  its protocol byte is not 0);
* verification sums everything *including* the checksum field; the data is
  intact iff the folded sum is ``0xFFFF``. Both representations of zero verify:
  a field holding ``0xFFFF`` where ``0x0000`` was computed adds -0 to a sum
  that already folds to ``0xFFFF``;
* RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')``, is congruent (mod 0xFFFF) to a
  full recompute; only the representation of zero can differ. We take the
  inner sum's fold in ``1..0xFFFF``, as end-around carry does for non-zero
  data, so :func:`csum_replace16` & co. always return ``0..0xFFFE`` -- exactly
  the range of a full recompute -- and therefore *equal* a full recompute
  whenever the covered data is not all zero (always, for real headers). A
  literal fixed-width fold would differ in one input: ``HC == 0xFFFF``
  (a -0 field), ``m == 0xFFFF``, ``m' == 0`` gives ``0xFFFF`` there, ``0x0000`` here
  and in a recompute. Both verify on the wire;
* UDP (RFC 768): a transmitted checksum of 0 means "no checksum"; it must stay
  0 through any rewrite, and a computed checksum of 0 is transmitted as
  ``0xFFFF``. (TCP, ICMP and IPv4 have no such rule: 0 is an ordinary value.)

All vectorized functions accept numpy arrays (or scalars that broadcast) and
return ``uint16`` arrays (checksums) or ``uint64`` arrays (unfolded sums); they
never read outside the row they are given.
"""

from __future__ import annotations

import sys
from typing import Union

import numpy as np

BufferLike = Union[bytes, bytearray, memoryview, np.ndarray]
ArrayLike = Union[int, np.ndarray]

_U16 = np.uint16
_U32 = np.uint32
_U64 = np.uint64


# ---------------------------------------------------------------------------
# One buffer
# ---------------------------------------------------------------------------


def ones_sum(data: BufferLike, initial: int = 0) -> int:
    """The 16-bit one's-complement sum of ``data`` (big-endian words), folded.

    An odd trailing byte is padded with a zero byte on the right (RFC 1071).
    ``initial`` is added first (e.g. a pseudo-header sum). The result is *not*
    complemented; it is in ``0..0xFFFF`` and is 0 only if everything was 0.
    """
    b = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if len(b) & 1:
        b += b"\x00"
    # Since 2**16 == 1 (mod 0xFFFF), the buffer read as one big-endian integer
    # is congruent to the sum of its 16-bit words: one C-level conversion and
    # one modulo instead of a loop. The folded sum is that residue, with 0xFFFF
    # standing for a non-zero multiple of 0xFFFF (end-around carry never
    # yields +0 from non-zero data) and 0 only for an all-zero sum.
    v = int.from_bytes(b, "big") + int(initial)
    if v == 0:
        return 0
    return v % 0xFFFF or 0xFFFF


def internet_checksum(data: BufferLike, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data``: the complement of :func:`ones_sum`.

    To compute a checksum, zero the checksum field first; to verify one, sum
    over the field too and compare :func:`ones_sum` with ``0xFFFF`` (or this
    function with 0).
    """
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum_scalar(src: int, dst: int, proto: int, l4_len: int) -> int:
    """Unfolded sum of the IPv4 TCP/UDP pseudo-header (addresses as host-order ints)."""
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + l4_len


# ---------------------------------------------------------------------------
# Bursts: one region per row of a 2-D uint8 array
# ---------------------------------------------------------------------------


def fold16(s: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Fold unsigned sums (< 2**48) to 16 bits with end-around carry.

    Returns ``uint16`` values in ``0..0xFFFF`` (0 only for a zero sum). ``out``
    (a ``uint16`` array of the same shape) avoids allocating the result.
    """
    s = np.asarray(s).astype(_U64, copy=False)
    # Three folds take any value below 2**48 to at most 0xFFFF:
    # < 2**48 -> < 2**32 + 2**16 -> < 2**17 + 1 -> <= 0xFFFF.
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    if out is None:
        return s.astype(_U16)
    np.copyto(out, s, casting="unsafe")
    return out


def sum16_rows(
    rows: np.ndarray,
    start: ArrayLike,
    length: ArrayLike,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Unfolded sums of the big-endian 16-bit words of ``rows[i, start_i:start_i+length_i]``.

    ``rows`` is a 2-D ``uint8`` array (one frame per row, e.g. a burst view of
    a ring). ``start`` and ``length`` are scalars or per-row arrays. Regions
    are clipped to the row: nothing past ``rows.shape[1]`` is read and
    negative lengths count as 0. An odd final byte is padded with zero, as in
    RFC 1071. Returns ``uint64`` sums (fold with :func:`fold16`).

    Equal offsets take a slice of the 2-D view (no gather); varying offsets
    gather with clamped indices. Varying lengths are handled by masking.
    """
    n, width = rows.shape
    length = np.clip(np.asarray(length, dtype=np.int64), 0, None)
    start_arr = np.asarray(start, dtype=np.int64)
    if start_arr.ndim == 0:
        s0 = int(min(max(int(start_arr), 0), width))
        length = np.minimum(length, width - s0)
        maxlen = int(length.max()) if length.size else 0
        region = rows[:, s0 : s0 + maxlen]
    else:
        start_arr = np.clip(start_arr, 0, width)
        length = np.minimum(length, width - start_arr)
        maxlen = int(length.max()) if length.size else 0
        if maxlen == 0:
            region = rows[:, :0]
        else:
            cols = start_arr[:, None] + np.arange(maxlen, dtype=np.int64)[None, :]
            np.minimum(cols, width - 1, out=cols)
            region = np.take_along_axis(rows, cols, axis=1)
    length = np.broadcast_to(length, (n,))
    if out is None:
        out = np.empty(n, dtype=_U64)
    if maxlen == 0:
        out[:] = 0
        return out
    hi = region[:, 0::2]
    lo = region[:, 1::2]
    k = np.arange(hi.shape[1], dtype=np.int64)
    hi_mask = (2 * k)[None, :] < length[:, None]
    lo_mask = (2 * k[: lo.shape[1]] + 1)[None, :] < length[:, None]
    hi_sum = np.where(hi_mask, hi, 0).sum(axis=1, dtype=_U64)
    lo_sum = np.where(lo_mask, lo, 0).sum(axis=1, dtype=_U64)
    np.multiply(hi_sum, 256, out=out)
    out += lo_sum
    return out


def checksum_rows(
    rows: np.ndarray,
    start: ArrayLike,
    length: ArrayLike,
    initial: ArrayLike | None = None,
) -> np.ndarray:
    """RFC 1071 checksum of each row's region, plus an optional per-row ``initial`` sum.

    ``initial`` is typically :func:`pseudo_header_sum` for TCP/UDP. Returns
    ``uint16``. The region must have its checksum field zeroed to compute a
    checksum; summed over an intact region (checksum included) the result is 0.
    """
    s = sum16_rows(rows, start, length)
    if initial is not None:
        s += np.asarray(initial, dtype=_U64)
    return ~fold16(s)


def checksum_fixed(rows: np.ndarray, start: int, nbytes: int) -> np.ndarray:
    """Checksum of the same ``nbytes``-byte region (``nbytes`` even) of every row.

    The fast equal-offset, equal-length case, e.g. 20-byte IPv4 headers. Words
    are summed four bytes at a time: since 2**16 == 1 (mod 0xFFFF), folding the
    sum of 32-bit big-endian words gives the same one's-complement sum as
    adding the 16-bit words, with half the numpy calls.
    """
    if nbytes & 1 or start < 0 or start + nbytes > rows.shape[1]:
        raise ValueError("checksum_fixed needs an even region inside the row")
    acc = np.zeros(rows.shape[0], dtype=_U64)
    region = rows[:, start : start + nbytes]
    q = nbytes // 4
    if q:
        words = region[:, : 4 * q].view(">u4")
        for j in range(q):
            acc += words[:, j]
    if nbytes & 2:
        acc += region[:, 4 * q :].view(">u2")[:, 0]
    return ~fold16(acc)


def pseudo_header_sum(src: ArrayLike, dst: ArrayLike, proto: ArrayLike, l4_len: ArrayLike) -> np.ndarray:
    """Unfolded ``uint64`` sums of IPv4 pseudo-headers (RFC 793/768).

    ``src``/``dst`` are host-order 32-bit addresses, ``proto`` the IP protocol
    and ``l4_len`` the TCP/UDP length (header + data), all broadcastable.
    """
    s = np.asarray(src, dtype=_U64)
    d = np.asarray(dst, dtype=_U64)
    return (
        (s >> 16)
        + (s & 0xFFFF)
        + (d >> 16)
        + (d & 0xFFFF)
        + np.asarray(proto, dtype=_U64)
        + np.asarray(l4_len, dtype=_U64)
    )


# ---------------------------------------------------------------------------
# Incremental update (RFC 1624, eqn. 3)
# ---------------------------------------------------------------------------


def _as_u16(x: ArrayLike) -> np.ndarray:
    a = np.asarray(x)
    return a if a.dtype == _U16 else (a & 0xFFFF).astype(_U16)


def _as_u32(x: ArrayLike) -> np.ndarray:
    a = np.asarray(x)
    return a if a.dtype == _U32 else (a & 0xFFFFFFFF).astype(_U32)


def _finish(t: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``~fold(t)`` as uint16, for a non-negative int64 sum ``t`` (modified in place).

    The fold is taken in ``1..0xFFFF`` -- ``((t - 1) mod 0xFFFF) + 1``, which is
    what end-around-carry addition gives for any non-zero data -- so the
    result is ``0xFFFE - ((t - 1) mod 0xFFFF)``, always in ``0..0xFFFE``: the
    same representation a full recompute gives (see the module docstring).
    For ``t == 0`` (numpy's remainder follows the divisor's sign) this yields
    0, the value a recompute gives too.
    """
    t -= 1
    np.remainder(t, 0xFFFF, out=t)
    np.subtract(0xFFFE, t, out=t)
    if out is None:
        out = np.empty(t.shape, dtype=_U16)
    np.copyto(out, t, casting="unsafe")
    return out


def _done(t: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if t.ndim:
        return _finish(t, out)
    return _finish(t.reshape(1), None).reshape(())  # scalar inputs: a 0-d result


def csum_replace16(csum: ArrayLike, old: ArrayLike, new: ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """New checksum after one 16-bit word changes from ``old`` to ``new``.

    ``HC' = ~(~HC + ~m + m')`` (RFC 1624 eqn. 3) over arrays (or broadcast
    scalars; the low 16 bits of each value are used). Returns ``uint16`` in
    ``0..0xFFFE``, equal to a full recompute (module docstring). Does *not*
    apply the UDP zero rule (use :func:`udp_csum_fixup`).
    """
    t = np.add(np.invert(_as_u16(csum)), np.invert(_as_u16(old)), dtype=np.int64)
    t = t + _as_u16(new)
    return _done(np.asarray(t), out)


def csum_replace32(csum: ArrayLike, old: ArrayLike, new: ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """New checksum after a 32-bit field (e.g. an IPv4 address) changes from ``old`` to ``new``.

    The field is two 16-bit words, both replaced in one eqn. 3 step: since
    2**16 == 1 (mod 0xFFFF) the complemented 32-bit value can be added whole.
    Addresses are host-order integers (``uint32``).
    """
    t = np.add(np.invert(_as_u16(csum)), np.invert(_as_u32(old)), dtype=np.int64)
    t = t + _as_u32(new)
    return _done(np.asarray(t), out)


def csum_replace_addr_port(
    csum: ArrayLike, old32: ArrayLike, new32: ArrayLike, old16: ArrayLike, new16: ArrayLike, out: np.ndarray | None = None
) -> np.ndarray:
    """New checksum after a 32-bit field and a 16-bit field both change (one eqn. 3 step).

    The NAT case: a TCP/UDP checksum covers the address (through the
    pseudo-header) and the port; updating both at once costs one step instead
    of two. Passing ``old == new`` for either field leaves it out.
    """
    t = np.add(np.invert(_as_u16(csum)), np.invert(_as_u32(old32)), dtype=np.int64)
    t = t + _as_u32(new32) + np.invert(_as_u16(old16)) + _as_u16(new16)
    return _done(np.asarray(t), out)


def ttl_decrement_csum(csum: np.ndarray, out: np.ndarray, byte_order: str = "big") -> np.ndarray:
    """IPv4 header checksums after the TTL drops by one, from the checksums before; into ``out``.

    The TTL shares a 16-bit word with the protocol; TTL - 1 changes that word
    ``m`` to ``m - 0x100``, and in RFC 1624 eqn. 3 ``~m + (m - 0x100)`` is
    0xFEFF whatever ``m`` is (TTL >= 1): the new checksum is the old one plus
    0x100 in one's complement, and with :func:`csum_replace16`'s
    representation of zero (never 0xFFFF) that is ``(HC + 0x100) mod 0xFFFF``.

    ``csum``: ``uint16`` checksum fields; ``out``: ``uint32`` scratch of the
    same shape (the sum needs 17 bits). ``byte_order="native"``: the fields
    are the two bytes read as a native ``uint16`` (a native view of the frames,
    no byte swap); one's-complement sums commute with a byte swap, so on a
    little-endian machine the increment is 1 instead of 0x100. Equal to
    :func:`csum_replace16` for every checksum (``tests/test_checksum.py``).
    """
    if byte_order not in ("big", "native"):
        raise ValueError(f"byte_order must be 'big' or 'native', not {byte_order!r}")
    inc = 1 if byte_order == "native" and sys.byteorder == "little" else 0x100
    np.add(csum, inc, out=out, dtype=np.uint32)
    np.remainder(out, 0xFFFF, out=out)
    return out


def udp_csum_fixup(old_csum: ArrayLike, new_csum: ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """Apply UDP's zero rule to an incrementally updated checksum.

    Where the packet carried 0 ("no checksum", ``old_csum == 0``) the result
    stays 0; where the update produced 0 the result is ``0xFFFF`` (the same
    value in one's complement, but 0 on the wire would mean "none").
    """
    old = np.asarray(old_csum, dtype=_U16)
    new = np.asarray(new_csum, dtype=_U16)
    res = np.where(old == 0, _U16(0), np.where(new == 0, _U16(0xFFFF), new)).astype(_U16, copy=False)
    if out is None:
        return res
    np.copyto(out, res)
    return out
