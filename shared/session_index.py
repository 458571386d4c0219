"""A compact hash index of *hints* into a session table: 8 bytes per entry (schema id 11).

The NAT keeps each session's state in one 64-byte entry of its ``in2out``
:class:`~hotplane.shared.session_table.SessionTable`. Every other way of
finding a session (the reply direction's 5-tuple, the endpoint-independent
mapping in either direction) only needs to lead to that entry, so this index
stores, per key, a 32-bit *fingerprint* of the key and the 32-bit slot of the
session-table entry: no key, no value, no seqlock. A hit is a *candidate*; the
caller confirms it by reading the entry at the slot (which carries the full
key and translation and is protected by the session table's seqlock) and
comparing. A stale or colliding hint is therefore harmless: it fails the
confirmation and reads as a miss.

Layout (``session_index``, schema id 11, zone ``nat.w<i>.index``)::

    header (cache line): schema prefix | capacity u8 | seed u8 | count u8 | tombstones u8
                         | max_probe u4 | key_format u4 | wseq u8 | rebuilds u8 | writer_pid u4 | pad
    entries: uint64[capacity + max_probe]     fingerprint << 32 | slot

An entry is EMPTY (0), a TOMBSTONE (``0x00000000_FFFFFFFF``) or USED
(fingerprint != 0). Probing is the session table's: two-choice bounded linear
probing (each key lives in ``h0 .. h0+max_probe-1`` or ``h1 .. h1+max_probe-1``,
the first free offset of whichever window reaches one first), with the same
chain invariant and tombstone trimming. ``capacity`` need not be a power of
two: homes come from a multiply-shift of the hash, and the array carries
``max_probe`` extra entries so that no window wraps.

Concurrency: one writer (the worker owning the table). Each entry is one
aligned 8-byte word written by a single store, so a reader sees a whole old or
whole new hint, never a torn one; confirmation against the seqlocked session
entry does the rest. ``wseq`` covers a *group* of changes that spans the
session table and this index (insert the session entries, then their hints;
delete the hints, then the entries): the writer makes it odd before and even
after. A writer attaching to an index whose ``wseq`` is odd (its predecessor
died inside a group) must rebuild the index from the session table
(``needs_rebuild``); the NAT pipeline does that at start.
"""

from __future__ import annotations

import os

import numpy as np

from hotplane.schema import registry
from hotplane.schema.nat import INDEX_HEADER, SESSION_INDEX
from hotplane.shared.ordering import require_tso

EMPTY = np.uint64(0)
TOMBSTONE = np.uint64(0xFFFFFFFF)
DEFAULT_MAX_PROBE = 128  # ~0 refusals up to load 0.92 (64: a few in 10**4 at 0.9)
_FIRST = 8  # offsets per window examined by the first lookup block (one cache line of hints)

_U64 = np.uint64
_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xC2B2AE3D27D4EB4F)
_C3 = np.uint64(0x165667B19E3779F9)
_C4 = np.uint64(0xD6E8FEB86659FD93)
_S29 = np.uint64(29)
_S32 = np.uint64(32)
_M32 = np.uint64(0xFFFFFFFF)


def index_hash(ka: np.ndarray, kb: np.ndarray, seed: int | np.uint64) -> np.ndarray:
    """64-bit hash of each (ka, kb) key pair (uint64 arrays)."""
    x = np.bitwise_xor(ka, _U64(seed))
    x *= _C1
    x += kb * _C2
    x ^= x >> _S29
    x *= _C3
    x ^= x >> _S32
    return x


class SessionIndex:
    """An index of (key -> session-table slot) hints in a shared buffer. Build with :meth:`create` or :meth:`attach`."""

    layout = SESSION_INDEX

    @staticmethod
    def zone_size(capacity: int, max_probe: int = DEFAULT_MAX_PROBE) -> int:
        return SESSION_INDEX.zone_size(int(capacity) + int(max_probe))

    @classmethod
    def create(cls, buf: np.ndarray, capacity: int, seed: int = 0, *, max_probe: int = DEFAULT_MAX_PROBE,
               key_format: int = 0) -> "SessionIndex":
        """Initialise an empty index in ``buf`` (this process becomes its writer)."""
        capacity, max_probe = int(capacity), int(max_probe)
        if not 8 <= capacity < 1 << 32:
            raise ValueError(f"capacity must be between 8 and 2**32 - 1, got {capacity}")
        if not 1 <= max_probe <= 256:
            raise ValueError(f"max_probe must be between 1 and 256, got {max_probe}")
        need = cls.zone_size(capacity, max_probe)
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or buf.nbytes < need:
            raise ValueError(f"session index needs a 1-D uint8 buffer of at least {need} bytes")
        if buf.ctypes.data % 64:
            raise ValueError("session index buffer must be 64-byte aligned")
        buf[:need] = 0
        hdr = buf[: INDEX_HEADER.itemsize].view(INDEX_HEADER)
        hdr["capacity"] = capacity
        hdr["seed"] = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        hdr["max_probe"] = max_probe
        hdr["key_format"] = key_format
        hdr["writer_pid"] = os.getpid()
        registry.stamp(hdr, SESSION_INDEX)  # last: a stamped zone is initialised
        t = cls(buf)
        t.writer = True
        return t

    @classmethod
    def attach(cls, buf: np.ndarray, *, writer: bool = False) -> "SessionIndex":
        """Attach to an existing index (verifies the header). A writer checks :attr:`needs_rebuild`."""
        t = cls(buf)
        if writer:
            t.hdr["writer_pid"] = os.getpid()
            t.writer = True
        return t

    def __init__(self, buf: np.ndarray) -> None:
        require_tso()
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or buf.nbytes < INDEX_HEADER.itemsize:
            raise TypeError("session index buffer must be a 1-D uint8 numpy array holding at least the header")
        hdr = buf[: INDEX_HEADER.itemsize].view(INDEX_HEADER)
        registry.verify(hdr, SESSION_INDEX, what="session index")
        cap, mp = int(hdr["capacity"][0]), int(hdr["max_probe"][0])
        if not 8 <= cap < 1 << 32 or not 1 <= mp <= 256:
            raise registry.SchemaError(f"session index: corrupt header: capacity {cap}, max_probe {mp}")
        hs = SESSION_INDEX.header_size
        if buf.nbytes < hs + 8 * (cap + mp):
            raise ValueError(f"session index buffer too small for capacity {cap}")
        self.buf = buf
        self.hdr = hdr
        self.capacity = cap
        self.max_probe = mp
        self.seed = _U64(int(hdr["seed"][0]))
        self.entries = buf[hs : hs + 8 * (cap + mp)].view(np.uint64)
        self.writer = False
        self._capu = _U64(cap)
        W = min(_FIRST, mp)
        self._W = W
        self._offw = np.arange(W, dtype=np.int64)
        self._offs = np.arange(mp, dtype=np.int64)

    # ------------------------------------------------------------------ figures

    @property
    def count(self) -> int:
        return int(self.hdr["count"][0])

    @property
    def tombstones(self) -> int:
        return int(self.hdr["tombstones"][0])

    @property
    def key_format(self) -> int:
        return int(self.hdr["key_format"][0])

    @property
    def needs_rebuild(self) -> bool:
        """True when a writer died inside a group of changes (``wseq`` odd)."""
        return bool(int(self.hdr["wseq"][0]) & 1)

    def _add(self, field: str, d: int) -> None:
        if d:
            self.hdr[field] = int(self.hdr[field][0]) + d

    # ------------------------------------------------------------------ groups

    def begin(self) -> None:
        """Start a group of changes spanning the session table and this index (wseq odd)."""
        w = int(self.hdr["wseq"][0])
        if not w & 1:
            self.hdr["wseq"] = w + 1

    def end(self) -> None:
        """The group is complete (wseq even)."""
        w = int(self.hdr["wseq"][0])
        if w & 1:
            self.hdr["wseq"] = w + 1

    def clear(self) -> None:
        """Empty the index (before a rebuild); leaves ``wseq`` as it is."""
        self.entries[:] = 0
        self.hdr["count"] = 0
        self.hdr["tombstones"] = 0
        self._add("rebuilds", 1)

    # ------------------------------------------------------------------ hashing

    def homes_fp(self, ka: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(homes (n, 2) int64, fingerprints (n,) uint64 already shifted to the high word)``."""
        x = index_hash(ka, kb, self.seed)
        fp = x & ~_M32
        fp[fp == 0] = _U64(1) << _S32  # a used entry's fingerprint is never 0
        home = np.empty((x.shape[0], 2), np.int64)
        # Multiply-shift maps 32 hash bits onto [0, capacity) for any capacity.
        np.right_shift((x & _M32) * self._capu, _S32, out=home[:, 0], casting="unsafe")
        y = (x * _C4) >> _S32
        np.right_shift(y * self._capu, _S32, out=home[:, 1], casting="unsafe")
        return home, fp

    # ------------------------------------------------------------------ lookup

    def lookup(self, ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
        """The first candidate slot of each key (int64, -1: no hint). Confirm it; see :meth:`candidates`.

        Vectorized: the first block reads ``W`` entries of both windows of
        every key (one gather); keys whose block is inconclusive (no
        fingerprint match, and neither window ended) get whole windows.
        """
        n = ka.shape[0]
        out = np.full(n, -1, np.int64)
        if n == 0:
            return out
        home, fp = self.homes_fp(ka, kb)
        W = self._W
        sl = home[:, :, None] + self._offw  # (n, 2, W)
        e = self.entries[sl]
        m = (e & ~_M32) == fp[:, None, None]
        m2 = m.reshape(n, 2 * W)
        f = m2.argmax(axis=1)
        hit = m2[np.arange(n), f]
        out[hit] = (e.reshape(n, 2 * W)[np.arange(n), f][hit] & _M32).astype(np.int64)
        if not hit.all():
            # A window that saw an EMPTY within the block has ended (chain invariant).
            alive = ~(e == EMPTY).any(axis=2)
            rest = np.flatnonzero(~hit & alive.any(axis=1))
            if rest.size and W < self.max_probe:
                sl = home[rest][:, :, None] + self._offs  # (r, 2, mp)
                e = self.entries[sl]
                ended = np.cumsum(e == EMPTY, axis=2) > 0
                m = ((e & ~_M32) == fp[rest, None, None]) & ~ended
                mm = m.reshape(rest.size, -1)
                got = mm.any(axis=1)
                if got.any():
                    f = mm[got].argmax(axis=1)
                    out[rest[got]] = (e.reshape(rest.size, -1)[got][np.arange(f.size), f] & _M32).astype(np.int64)
        return out

    def candidates(self, ka: int, kb: int) -> list[int]:
        """Every slot hinted for one key, in probe order (slow path; confirm each)."""
        home, fp = self.homes_fp(np.array([ka], _U64), np.array([kb], _U64))
        out: list[int] = []
        f = int(fp[0])
        for h in home[0].tolist():
            w = self.entries[h : h + self.max_probe]
            stop = np.flatnonzero(w == EMPTY)
            w = w[: int(stop[0])] if stop.size else w
            hits = w[(w & ~_M32) == _U64(f)]
            out.extend(int(v) & 0xFFFFFFFF for v in hits.tolist())
        return out

    def _find(self, ka: int, kb: int, slot: int) -> int:
        """Entry position of the hint (key -> slot), or -1."""
        home, fp = self.homes_fp(np.array([ka], _U64), np.array([kb], _U64))
        want = int(fp[0]) | (slot & 0xFFFFFFFF)
        for h in home[0].tolist():
            w = self.entries[h : h + self.max_probe]
            stop = np.flatnonzero(w == EMPTY)
            lim = int(stop[0]) if stop.size else self.max_probe
            pos = np.flatnonzero(w[:lim] == _U64(want))
            if pos.size:
                return h + int(pos[0])
        return -1

    # ------------------------------------------------------------------ writes (the writer only)

    def insert_batch(self, ka: np.ndarray, kb: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Add hints (key -> slot); returns the mask of those stored (False: both windows full).

        Duplicates are not detected (the caller adds a hint once); several
        hints of one key may coexist (confirmation tells them apart).
        """
        self._require_writer()
        ka = np.ascontiguousarray(ka, _U64)
        kb = np.ascontiguousarray(kb, _U64)
        n = ka.shape[0]
        ok = np.zeros(n, bool)
        if n == 0:
            return ok
        home, fp = self.homes_fp(ka, kb)
        word = fp | (np.asarray(slots, np.int64).astype(_U64) & _M32)
        pend = np.arange(n)
        mp = self.max_probe
        tomb_reused = 0
        W = self._W
        while pend.size:
            # First free offset of each window: the first W offsets, whole windows only for keys
            # whose both windows start full.
            hp = home[pend]
            e = self.entries[hp[:, :, None] + self._offw]  # (p, 2, W)
            free = (e == EMPTY) | (e == TOMBSTONE)
            fo = np.where(free.any(axis=2), free.argmax(axis=2), mp)  # (p, 2)
            deep = np.flatnonzero((fo >= W).all(axis=1))
            if deep.size and W < mp:
                e = self.entries[hp[deep][:, :, None] + self._offs]
                free = (e == EMPTY) | (e == TOMBSTONE)
                fo[deep] = np.where(free.any(axis=2), free.argmax(axis=2), mp)
            lane = (fo[:, 1] < fo[:, 0]).astype(np.int64)
            r = np.arange(pend.size)
            off = fo[r, lane]
            can = off < mp
            pos = home[pend, lane] + np.minimum(off, mp - 1)
            cr = np.flatnonzero(can)
            if cr.size == 0:
                break
            _, first = np.unique(pos[cr], return_index=True)
            win = cr[first]
            wpos = pos[win]
            tomb_reused += int(np.count_nonzero(self.entries[wpos] == TOMBSTONE))
            self.entries[wpos] = word[pend[win]]
            ok[pend[win]] = True
            done = ~can
            done[win] = True
            pend = pend[~done]
        stored = int(np.count_nonzero(ok))
        self._add("count", stored)
        self._add("tombstones", -tomb_reused)
        return ok

    def delete(self, ka: int, kb: int, slot: int) -> bool:
        """Remove the hint (key -> slot); True if it was there."""
        self._require_writer()
        p = self._find(ka, kb, slot)
        if p < 0:
            return False
        self.entries[p] = TOMBSTONE
        self._add("count", -1)
        self._add("tombstones", 1)
        self._trim(p)
        return True

    def repoint(self, ka: int, kb: int, old: int, new: int) -> bool:
        """Change the hint (key -> old) into (key -> new) with one store; True if it was there."""
        self._require_writer()
        p = self._find(ka, kb, old)
        if p < 0:
            return False
        self.entries[p] = (self.entries[p] & ~_M32) | _U64(new & 0xFFFFFFFF)
        return True

    def _trim(self, p: int) -> None:
        """A tombstone followed by an EMPTY entry becomes EMPTY, walking backwards (safe at every store)."""
        e = self.entries
        last = e.shape[0] - 1
        trimmed = 0
        while p >= 0 and e[p] == TOMBSTONE and (p == last or e[p + 1] == EMPTY):
            e[p] = EMPTY
            trimmed += 1
            p -= 1
        self._add("tombstones", -trimmed)

    def _require_writer(self) -> None:
        if not self.writer:
            raise PermissionError("this SessionIndex object is a reader; attach(buf, writer=True) to write")

    def audit(self) -> list[str]:
        """Header counts against the entries (tests, tools)."""
        probs = []
        e = self.entries
        used = int(np.count_nonzero((e >> _S32) != 0))
        tombs = int(np.count_nonzero(e == TOMBSTONE))
        if used != self.count:
            probs.append(f"header count {self.count} but {used} USED entries")
        if tombs != self.tombstones:
            probs.append(f"header tombstones {self.tombstones} but {tombs} TOMBSTONE entries")
        return probs
