"""The shared session table: a fixed-capacity hash table in a memzone.

One writer process per table (DESIGN invariant 2) inserts, updates and deletes
sessions in bursts held as numpy arrays; any number of reader processes look
entries up concurrently and never see a torn entry, also after the writer was
SIGKILLed half-way through a write.

Hashing and probing
-------------------
Open addressing with *two-choice* bounded linear probing. Each 128-bit key
(``key0``, ``key1``) is mixed with the table seed (multiply/xorshift, all
uint64 numpy ops) into two home slots ``h0`` and ``h1``; a key lives in one of
the windows ``h0 .. h0+max_probe-1`` or ``h1 .. h1+max_probe-1``.

Two geometries, told apart by the capacity (:func:`geometry`):

* a power-of-two capacity (every table this code made before, and still the
  default): homes are the low bits of each 32-bit half of the hash
  (``h & (capacity - 1)``) and windows wrap around the end (header ``mask`` =
  capacity - 1);
* any other capacity (sizing a table to what a configuration needs instead of
  the next power of two, which can double the memory): homes are a
  multiply-shift range reduction of each 32-bit half, ``(h32 * nhome) >> 32``
  with ``nhome = capacity - max_probe + 1``, so that no window runs past the
  last entry and none wraps (header ``mask`` = all ones, which makes the
  slot arithmetic's ``& mask`` the identity).

Slot-for-slot copies between tables of equal capacity, seed and max_probe
(the v1 <-> v2 migrations) keep every key at a valid place in both.

An insert takes the first free slot (EMPTY or TOMBSTONE) of the window where
that slot comes earlier (ties go to ``h0``). With one home slot, linear
probing bounded by 32 refuses ~0.5% of inserts at load 0.75; with two,
the longest displacement at load 0.75 stays in the twenties, so load 0.75
works with ``max_probe`` 32 (at 0.85 a few inserts in 10^4 are refused). Entries never move once written, which is
what lets readers in other processes probe without locks.

Chain invariant: a key stored at offset ``d`` of its window has no EMPTY slot
at offsets ``0 .. d-1``. Deletes write TOMBSTONEs; a tombstone whose successor
is EMPTY is turned back into EMPTY (and so on backwards), which never breaks the
invariant, so probe chains stay short under churn.

Lookups are vectorized over the burst and loop only over probe *blocks*: the
first block checks offsets 0..3 of both windows for every key at once (one
gather of the ``key0`` words), which resolves almost every hit; a key whose
block is inconclusive gets its whole windows gathered.

Seqlock and the redo journal
----------------------------
Every entry carries ``seq``: odd while the writer changes the entry. Readers
copy (seq, entry, seq) and retry when seq was odd or changed
(:meth:`SessionTable.read_consistent`), with x86-64 TSO supplying the ordering
(stores become visible in program order, loads are not reordered with older
loads; see ``shared/ordering.py``). Each numpy call below completes all
its stores before the next one starts, so the stages are ordered.

A write batch (insert, update, touch, delete) changes up to ``JOURNAL_CAP``
distinct entries:

1. ``jseq`` += 1 (odd): the journal in the header is being filled;
2. journal := for each slot: slot, its current seq, the entry's final image;
3. ``jseq`` += 1 (even): the journal is valid;
4. ``seq`` := old + 1 (odd) for every slot;
5. key and value fields written (state still the old one);
6. ``state`` := final state (USED for a claim, TOMBSTONE for a delete);
7. ``seq`` := old + 2 (even);
8. header counters, then ``jdone`` := ``jseq``: the batch is finished.

A restarted writer runs :meth:`SessionTable.recover` first. A valid journal
that is not done is redone: every journaled slot whose seq is still ``old`` or
``old + 1`` gets the journaled final image and seq ``old + 2``, so a batch is
all-or-nothing once step 3 happened and nothing before. Any other entry with an
odd seq (impossible under the protocol; possible after foreign damage) cannot be
vouched for: a USED one becomes a TOMBSTONE (keeps probe chains intact), seq
becomes even. Then counts are recomputed from the entries.

Tests set ``table._pause_hook`` to a callable receiving the stage name
("journal_open", "journal", "seq_odd", "field:<name>", "state", "seq_even",
"done") between write stages; with a hook set, step 5 is done field by field.
Without one the hot path pays a single ``is None`` test per stage.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import numpy as np

from hotplane.schema import registry
from hotplane.shared.ordering import require_tso
from hotplane.schema.session import (
    DEFAULT_MAX_PROBE,
    ELEMENT,
    EMPTY,
    HEADER,
    JOURNAL_CAP,
    LAYOUT,
    MAX_MAX_PROBE,
    TOMBSTONE,
    USED,
    VALUE_DTYPE,
    VALUE_FIELDS,
)

__all__ = ["SessionTable", "WriterBusyError", "EMPTY", "USED", "TOMBSTONE", "VALUE_DTYPE", "VALUE_FIELDS", "BURST_MAX"]

# Largest burst handled in one pass (longer inputs are processed in chunks).
BURST_MAX = JOURNAL_CAP

# Offsets per window examined in the first lookup block.
_FIRST_BLOCK = 4

# Journal kinds (diagnostics only).
J_INSERT, J_UPDATE, J_DELETE, J_TOUCH, J_RECOVER = 1, 2, 3, 4, 5

_U64 = np.dtype(np.uint64)
_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xC2B2AE3D27D4EB4F)
_C3 = np.uint64(0x165667B19E3779F9)
_S29 = np.uint64(29)
_S32 = np.uint64(32)
_M32 = np.uint64(0xFFFFFFFF)


class WriterBusyError(RuntimeError):
    """Another live process is the table's writer."""


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    try:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    except ImportError:  # pragma: no cover - psutil is a dependency
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _as_keys(k0, k1) -> tuple[np.ndarray, np.ndarray]:
    k0 = np.ascontiguousarray(k0, dtype=_U64).reshape(-1)
    k1 = np.ascontiguousarray(k1, dtype=_U64).reshape(-1)
    if k0.shape != k1.shape:
        raise ValueError(f"key arrays differ in length: {k0.shape[0]} and {k1.shape[0]}")
    return k0, k1


def _check_buf(buf: np.ndarray, need: int) -> None:
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise TypeError("session table buffer must be a 1-D uint8 numpy array (a memzone view)")
    if not buf.flags.c_contiguous:
        raise ValueError("session table buffer must be C-contiguous")
    if buf.ctypes.data % 64:
        raise ValueError(f"session table buffer must be 64-byte aligned (address {buf.ctypes.data:#x})")
    if buf.nbytes < need:
        raise ValueError(f"session table buffer too small: {buf.nbytes} bytes, need {need}")


def mix_hash(k0: np.ndarray, k1: np.ndarray, seed: int) -> np.ndarray:
    """The table's 64-bit hash of each key (uint64 array); allocation-free variant used inside the table."""
    k0, k1 = _as_keys(k0, k1)
    x = np.empty_like(k0)
    y = np.empty_like(k0)
    _mix(k0, k1, np.uint64(seed), x, y)
    return x


def _mix(k0: np.ndarray, k1: np.ndarray, seed: np.uint64, x: np.ndarray, y: np.ndarray) -> None:
    """x := hash(k0, k1, seed); y is scratch. Multiply-xorshift over both words."""
    np.bitwise_xor(k0, seed, out=x)
    np.multiply(x, _C1, out=x)
    np.multiply(k1, _C2, out=y)
    np.add(x, y, out=x)
    np.right_shift(x, _S29, out=y)
    np.bitwise_xor(x, y, out=x)
    np.multiply(x, _C3, out=x)
    np.right_shift(x, _S32, out=y)
    np.bitwise_xor(x, y, out=x)


#: Header ``mask`` of a table whose capacity is not a power of two (windows do not wrap).
RANGE_MASK = 0xFFFF_FFFF_FFFF_FFFF


def check_capacity(capacity: int, max_probe: int) -> None:
    """Raise ValueError unless ``capacity`` entries with windows of ``max_probe`` make a table."""
    if not 8 <= capacity <= 1 << 32:
        raise ValueError(f"capacity must be between 8 and 2**32, got {capacity}")
    if not 1 <= max_probe <= min(MAX_MAX_PROBE, capacity):
        raise ValueError(f"max_probe must be between 1 and {min(MAX_MAX_PROBE, capacity)}, got {max_probe}")
    if capacity & (capacity - 1) and capacity < 2 * max_probe:
        raise ValueError(f"a capacity that is not a power of two must be at least 2 x max_probe ({2 * max_probe}), got {capacity}")


def header_mask(capacity: int) -> int:
    """The header ``mask`` of a table of ``capacity`` entries (see :func:`geometry`)."""
    return capacity - 1 if capacity & (capacity - 1) == 0 else RANGE_MASK


def geometry(capacity: int, mask: int, max_probe: int, what: str = "session table") -> tuple[bool, int]:
    """``(wraps, nhome)`` of a table header: windows wrap (power-of-two capacity, homes masked) or not
    (homes range-reduced over ``nhome`` slots). SchemaError for a header that is neither."""
    if not 1 <= max_probe <= min(MAX_MAX_PROBE, capacity):
        raise registry.SchemaError(f"{what}: corrupt header: max_probe {max_probe}")
    if capacity >= 8 and capacity & (capacity - 1) == 0 and mask == capacity - 1:
        return True, capacity
    if 2 * max_probe <= capacity <= 1 << 32 and capacity & (capacity - 1) and mask == RANGE_MASK:
        return False, capacity - max_probe + 1
    raise registry.SchemaError(f"{what}: corrupt header: capacity {capacity}, mask {mask:#x} (a power-of-two capacity "
                               f"needs mask capacity - 1, any other capacity mask {RANGE_MASK:#x})")


def back_slots(slots: np.ndarray, back: np.ndarray, capacity: int) -> np.ndarray:
    """Slots ``slots[i] - back[j]`` as a probe walk backwards sees them (wrapping only where windows wrap)."""
    s = (np.asarray(slots, np.int64)[:, None] - np.asarray(back, np.int64)).reshape(-1)
    if capacity & (capacity - 1) == 0:
        return s & (capacity - 1)
    return s[s >= 0]


class SessionTable:
    """A session table living in a shared buffer. Build with :meth:`create` or :meth:`attach`.

    Batch methods take ``k0``/``k1`` uint64 arrays of any length (processed in
    chunks of :data:`BURST_MAX`). Only the writer object (from :meth:`create` or
    ``attach(writer=True)``) may change the table; readers use
    :meth:`lookup_consistent`, :meth:`read_consistent`, :meth:`get`, :meth:`items`.
    Not thread-safe: one object per process (or thread).
    """

    layout = LAYOUT

    # ------------------------------------------------------------------ construction

    @staticmethod
    def zone_size(capacity: int) -> int:
        """Bytes a zone for ``capacity`` entries needs (header + entries, cache-line rounded)."""
        return LAYOUT.zone_size(int(capacity))

    @classmethod
    def create(cls, buf: np.ndarray, capacity: int, seed: int = 0, *, max_probe: int = DEFAULT_MAX_PROBE) -> "SessionTable":
        """Initialise an empty table in ``buf`` and return it with the writer role (this process).

        ``capacity``: 8 .. 2**32 entries; a power of two gives the wrapping
        geometry, any other count (at least ``2 * max_probe``) the range-reduced
        one (module docstring). ``max_probe`` is the probe window per home slot
        (1 .. 256, at most ``capacity``).
        """
        capacity = int(capacity)
        max_probe = int(max_probe)
        check_capacity(capacity, max_probe)
        need = cls.zone_size(capacity)
        _check_buf(buf, need)
        buf[:need] = 0  # EMPTY is 0: a zeroed zone is an empty table
        hdr = buf[: HEADER.itemsize].view(HEADER)
        h = hdr[0]
        h["capacity"] = capacity
        h["mask"] = header_mask(capacity)
        h["seed"] = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        h["max_probe"] = max_probe
        h["writer_pid"] = os.getpid()
        h["writer_epoch"] = 1
        # The identity goes last: a zone with a valid stamp is fully initialised.
        registry.stamp(hdr, LAYOUT)
        t = cls(buf)
        t._writer = True
        return t

    @classmethod
    def attach(cls, buf: np.ndarray, *, writer: bool = False, force: bool = False, recover: bool = True) -> "SessionTable":
        """Attach to an existing table (verifies the header; a reader makes no writes).

        With ``writer=True`` this process becomes the table's writer: refused
        with :class:`WriterBusyError` while the recorded writer pid is alive
        (unless ``force``); then, unless ``recover=False``, :meth:`recover` runs
        and its result is kept in ``self.recovered``.
        """
        t = cls(buf)
        if writer:
            t._take_writer(force)
            if recover:
                t.recovered = t.recover()
        return t

    def __init__(self, buf: np.ndarray) -> None:
        """Use :meth:`create` or :meth:`attach`; this only maps and validates."""
        require_tso()  # the seqlock and journal protocols rely on x86-64 store order
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or buf.nbytes < HEADER.itemsize:
            raise TypeError("session table buffer must be a 1-D uint8 numpy array holding at least the header")
        hdr = buf[: HEADER.itemsize].view(HEADER)
        registry.verify(hdr, LAYOUT, what="session table")
        cap = int(hdr["capacity"][0])
        mp = int(hdr["max_probe"][0])
        self._set_geometry(cap, int(hdr["mask"][0]), mp)
        _check_buf(buf, self.zone_size(cap))

        self._buf = buf
        self._hdr = hdr
        self.capacity = cap
        self.max_probe = mp
        self.seed = int(hdr["seed"][0])
        self._writer = False
        self.recovered = 0
        # Test hook called between write stages (None in production: one `is None` test per stage).
        self._pause_hook: Callable[[str], None] | None = None

        self._seed_u = np.uint64(self.seed)

        # Header fields as 1-element views (plain loads/stores).
        self._h_count = hdr["count"]
        self._h_tomb = hdr["tombstones"]
        self._h_jseq = hdr["jseq"]
        self._h_jdone = hdr["jdone"]
        self._h_jcount = hdr["jcount"]
        self._h_jkind = hdr["jkind"]
        self._jslot = hdr["jslot"][0]
        self._jold = hdr["jold_seq"][0]
        self._jimage = hdr["jimage"][0]

        hs = LAYOUT.header_size
        region = buf[hs : hs + cap * ELEMENT.itemsize]
        self._region = region
        self.entries = region.view(ELEMENT)  # structured view, shape (capacity,)
        self._state = self.entries["state"]
        self._seq = self.entries["seq"]
        # Flat contiguous views for np.take: word w of slot s is at s*8 + w,
        # seq of slot s at s*16 (u4), state of slot s at s*64 (bytes from offset 4).
        words = region.view(np.uint64)
        self._k0f = words[1:]
        self._k1f = words[2:]
        self._seqf = region.view(np.uint32)
        self._stf = region[4:]

        # Scratch for bursts up to BURST_MAX: the hot path allocates nothing.
        B = BURST_MAX
        W = min(_FIRST_BLOCK, mp)
        self._W = W
        self._x = np.empty(B, _U64)
        self._y = np.empty(B, _U64)
        self._home = np.empty((B, 2), np.int64)
        self._offw = np.arange(W, dtype=np.int64)
        self._offs = np.arange(mp, dtype=np.int64)
        self._sl = np.empty((B, 2, W), np.int64)
        self._i8 = np.empty((B, 2, W), np.int64)
        self._kw = np.empty((B, 2, W), _U64)
        self._eq = np.empty((B, 2, W), np.bool_)
        self._f = np.empty(B, np.int64)
        self._flat = np.empty(B, np.int64)
        self._rowbase = np.arange(B, dtype=np.int64) * (2 * W)
        self._c8 = np.empty(B, np.int64)
        self._tu = np.empty(B, _U64)
        self._tb = np.empty(B, np.uint8)
        self._b1 = np.empty(B, np.bool_)
        self._hits = np.empty(B, np.bool_)
        self._idx = np.empty(B, np.int64)
        self._img = np.empty(B, ELEMENT)
        self._fstate = np.empty(B, np.uint8)
        self._oldseq = np.empty(B, np.uint32)
        self._s16 = np.empty(B, np.int64)

    def _set_geometry(self, cap: int, mask: int, max_probe: int, what: str = "session table") -> None:
        """Validate the header's geometry and set the hashing and slot-arithmetic constants from it."""
        self.wraps, self.nhome = geometry(cap, mask, max_probe, what)
        # Slot arithmetic is ``& _mask_i``: capacity - 1 where windows wrap, all ones (identity) where not.
        self._mask_i = np.int64(cap - 1) if self.wraps else np.int64(-1)
        self._mask_u = np.uint64(cap - 1)
        self._nhome_u = np.uint64(self.nhome)

    # ------------------------------------------------------------------ properties

    @property
    def count(self) -> int:
        """Number of USED entries (as last published by the writer)."""
        return int(self._h_count[0])

    @property
    def tombstones(self) -> int:
        return int(self._h_tomb[0])

    @property
    def is_writer(self) -> bool:
        return self._writer

    def __len__(self) -> int:
        return self.count

    def stats(self) -> dict[str, int | float]:
        """Header figures for the CLI / stats exporter."""
        h = self._hdr[0]
        out = {k: int(h[k]) for k in ("capacity", "count", "tombstones", "max_probe", "writer_pid", "writer_epoch", "inserts", "updates", "deletes", "insert_full", "recovered")}
        out["load"] = out["count"] / out["capacity"]
        return out

    # ------------------------------------------------------------------ writer role

    def _take_writer(self, force: bool) -> None:
        h = self._hdr[0]
        pid = int(h["writer_pid"])
        me = os.getpid()
        if pid and pid != me and not force and _pid_alive(pid):
            raise WriterBusyError(f"session table already has a live writer (pid {pid}); one writer per table (DESIGN invariant 2)")
        h["writer_pid"] = me
        h["writer_epoch"] = int(h["writer_epoch"]) + 1
        self._writer = True

    def release(self) -> None:
        """Give up the writer role (clean hand-over: the next writer need not wait for this pid to die)."""
        if self._writer:
            h = self._hdr[0]
            if int(h["writer_pid"]) == os.getpid():
                h["writer_pid"] = 0
            self._writer = False

    def _require_writer(self) -> None:
        if not self._writer:
            raise PermissionError("this SessionTable object is a reader; attach(buf, writer=True) to write")

    # ------------------------------------------------------------------ hashing

    def _hash(self, k0: np.ndarray, k1: np.ndarray, n: int) -> np.ndarray:
        """Fill and return self._home[:n] with the two home slots of each key."""
        x = self._x[:n]
        y = self._y[:n]
        _mix(k0, k1, self._seed_u, x, y)
        home = self._home[:n]
        self._homes_of(x, y, home)
        return home

    def _homes_of(self, x: np.ndarray, y: np.ndarray, home: np.ndarray) -> None:
        """home[:, 0], home[:, 1] := the home slots of hashes ``x`` (one per 32-bit half); ``y`` scratch."""
        if self.wraps:
            np.bitwise_and(x, self._mask_u, out=home[:, 0], casting="unsafe")
            np.right_shift(x, _S32, out=y)
            np.bitwise_and(y, self._mask_u, out=home[:, 1], casting="unsafe")
            return
        # Multiply-shift range reduction: (h32 * nhome) >> 32 lies in [0, nhome) and fits in 64 bits.
        np.bitwise_and(x, _M32, out=y)
        np.multiply(y, self._nhome_u, out=y)
        np.right_shift(y, _S32, out=home[:, 0], casting="unsafe")
        np.right_shift(x, _S32, out=y)
        np.multiply(y, self._nhome_u, out=y)
        np.right_shift(y, _S32, out=home[:, 1], casting="unsafe")

    def homes(self, k0, k1) -> np.ndarray:
        """Home slots (n, 2) of each key (allocating; for tests, audits and tools)."""
        k0, k1 = _as_keys(k0, k1)
        x = np.empty_like(k0)
        y = np.empty_like(k0)
        _mix(k0, k1, self._seed_u, x, y)
        out = np.empty((k0.shape[0], 2), np.int64)
        self._homes_of(x, y, out)
        return out

    # ------------------------------------------------------------------ lookup

    def lookup_batch(self, k0, k1, out_idx: np.ndarray | None = None, out_hits: np.ndarray | None = None) -> np.ndarray:
        """Look up a burst of keys; returns the hits mask and fills ``out_idx`` (slot, or -1).

        ``out_idx`` (int64, len n) and ``out_hits`` (bool) may be given to avoid
        allocation; without them, views of per-object scratch are used, valid
        until the next call on this object (bursts up to BURST_MAX only). The
        writer's own lookups are exact. In another process use
        :meth:`lookup_consistent`, which also validates the entry with its seqlock.
        """
        if k0.dtype != _U64 or k1.dtype != _U64:
            k0, k1 = _as_keys(k0, k1)
        n = k0.shape[0]
        if out_idx is None:
            if n > BURST_MAX:
                out_idx = np.empty(n, np.int64)
            else:
                out_idx = self._idx[:n]
        if out_hits is None:
            out_hits = self._hits[:n] if n <= BURST_MAX else np.empty(n, np.bool_)
        if n <= BURST_MAX:
            self._lookup_chunk(k0, k1, n, out_idx, out_hits)
        else:
            for a in range(0, n, BURST_MAX):
                b = min(n, a + BURST_MAX)
                self._lookup_chunk(k0[a:b], k1[a:b], b - a, out_idx[a:b], out_hits[a:b])
        return out_hits

    def _lookup_chunk(self, k0: np.ndarray, k1: np.ndarray, n: int, out: np.ndarray, hits: np.ndarray) -> None:
        if n == 0:
            return
        home = self._hash(k0, k1, n)
        # Block 0: offsets 0..W-1 of both windows, key0 words only.
        sl = self._sl[:n]
        np.add(home[:, :, None], self._offw, out=sl)
        np.bitwise_and(sl, self._mask_i, out=sl)
        i8 = self._i8[:n]
        np.left_shift(sl, 3, out=i8)
        kw = self._kw[:n]
        np.take(self._k0f, i8, out=kw, mode="clip")
        eq = self._eq[:n]
        np.equal(kw, k0[:, None, None], out=eq)
        e2 = eq.reshape(n, 2 * self._W)
        f = self._f[:n]
        np.argmax(e2, axis=1, out=f)
        flat = self._flat[:n]
        np.add(self._rowbase[:n], f, out=flat)
        # Candidate = first key0 match; confirm key1 and state there.
        np.take(sl.reshape(-1), flat, out=out, mode="clip")
        np.take(e2.reshape(-1), flat, out=hits, mode="clip")
        c8 = self._c8[:n]
        np.left_shift(out, 3, out=c8)
        tu = self._tu[:n]
        np.take(self._k1f, c8, out=tu, mode="clip")
        b1 = self._b1[:n]
        np.equal(tu, k1, out=b1)
        np.logical_and(hits, b1, out=hits)
        np.left_shift(c8, 3, out=c8)
        tb = self._tb[:n]
        np.take(self._stf, c8, out=tb, mode="clip")
        np.equal(tb, USED, out=b1)
        np.logical_and(hits, b1, out=hits)
        if not hits.all():
            self._resolve_rest(k0, k1, n, out, hits)
            np.logical_not(hits, out=b1)
            np.copyto(out, -1, where=b1)

    def _resolve_rest(self, k0: np.ndarray, k1: np.ndarray, n: int, out: np.ndarray, hits: np.ndarray) -> None:
        """Keys block 0 did not find: a careful check of block 0, then growing blocks.

        A window ends at its first EMPTY (chain invariant: the key cannot lie
        beyond it); a key with both windows ended, or probed to ``max_probe``,
        is absent. Any USED slot holding the key is its slot (keys are unique).
        """
        r = np.flatnonzero(~hits[:n])
        i8r = self._i8[r]  # (m, 2, W)
        st = self._stf[i8r << 3]
        eqr = self._eq[r]
        home = self._home
        # A key0 match that failed confirmation (a stale key0, or the key further on).
        chk = np.flatnonzero(eqr.any(axis=(1, 2)))
        found = np.zeros(r.size, np.bool_)
        if chk.size:
            rc = r[chk]
            match = eqr[chk] & (self._k1f[i8r[chk]] == k1[rc, None, None]) & (st[chk] == USED)
            mm = match.reshape(chk.size, -1)
            fnd = mm.any(axis=1)
            if fnd.any():
                g = chk[fnd]
                slot = self._sl[r[g]].reshape(g.size, -1)[np.arange(g.size), mm[fnd].argmax(axis=1)]
                out[r[g]] = slot
                hits[r[g]] = True
                found[g] = True
        alive = ~(st == EMPTY).any(axis=2)  # (m, 2): window continues past block 0
        keep = ~found & alive.any(axis=1)
        rows = r[keep]
        alive = alive[keep]
        lo = self._W
        mp = self.max_probe
        while rows.size and lo < mp:
            width = min(lo, mp - lo)  # blocks double: 4, 4, 8, 16 ...
            ws = (home[rows][:, :, None] + self._offs[lo : lo + width]) & self._mask_i
            w8 = ws << 3
            stw = self._stf[w8 << 3]
            m0 = (self._k0f[w8] == k0[rows, None, None]) & (stw == USED) & alive[:, :, None]
            cand = np.flatnonzero(m0.any(axis=(1, 2)))
            done = np.zeros(rows.size, np.bool_)
            if cand.size:
                rc = rows[cand]
                match = m0[cand] & (self._k1f[w8[cand]] == k1[rc, None, None])
                mm = match.reshape(cand.size, -1)
                fnd = mm.any(axis=1)
                if fnd.any():
                    g = cand[fnd]
                    slot = ws[g].reshape(g.size, -1)[np.arange(g.size), mm[fnd].argmax(axis=1)]
                    out[rows[g]] = slot
                    hits[rows[g]] = True
                    done[g] = True
            alive &= ~(stw == EMPTY).any(axis=2)
            keep = ~done & alive.any(axis=1)
            rows = rows[keep]
            alive = alive[keep]
            lo += width

    # ------------------------------------------------------------------ readers

    def read_consistent(self, idx, out: np.ndarray | None = None, *, retries: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Seqlock-consistent copies of the entries at slots ``idx``.

        Returns ``(records, ok)``: ``records`` (ELEMENT array) holds, where
        ``ok``, an untorn snapshot of the entry (check ``state == USED``). An
        entry whose seq stays odd or keeps changing for ``retries`` rounds
        (e.g. left half-written by a killed writer, awaiting recovery) is
        reported ``ok=False``: "not available yet", never a torn copy.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = idx.shape[0]
        if np.any((idx < 0) | (idx >= self.capacity)):
            raise IndexError("slot index out of range")
        rec = np.zeros(n, ELEMENT) if out is None else out
        ok = np.zeros(n, np.bool_)
        pend = np.arange(n)
        s = idx
        for attempt in range(max(1, retries)):
            s16 = s << 4
            a = self._seqf[s16]
            r = self.entries[s]
            b = self._seqf[s16]
            good = (a == b) & ((a & 1) == 0)
            if good.all():
                rec[pend] = r
                ok[pend] = True
                break
            gi = pend[good]
            rec[gi] = r[good]
            ok[gi] = True
            pend = pend[~good]
            s = idx[pend]
            if attempt >= 4:
                # The writer is mid-write (or dead): let it run before trying again.
                time.sleep(0 if attempt < 16 else 0.0001)
        return rec, ok

    def get(self, idx: int) -> np.void | None:
        """A consistent copy of the USED entry at slot ``idx``, or None (free, or not available)."""
        rec, ok = self.read_consistent(np.array([idx], np.int64))
        if ok[0] and rec[0]["state"] == USED:
            return rec[0]
        return None

    def lookup_consistent(self, k0, k1, *, retries: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lookup from any process: ``(idx, records, hits)`` with seqlock-validated records.

        A key is a hit only if a consistent copy of its entry was read and that
        copy is USED with the same key; a key whose entry is being changed is
        looked up again, up to ``retries`` times, then reported as a miss.
        """
        k0, k1 = _as_keys(k0, k1)
        n = k0.shape[0]
        idx = np.full(n, -1, np.int64)
        recs = np.zeros(n, ELEMENT)
        hits = np.zeros(n, np.bool_)
        pend = np.arange(n)
        for _ in range(max(1, retries)):
            pk0, pk1 = k0[pend], k1[pend]
            cidx = np.empty(pend.size, np.int64)
            found = self.lookup_batch(pk0, pk1, cidx, np.empty(pend.size, np.bool_))
            again = np.zeros(pend.size, np.bool_)
            f = np.flatnonzero(found)
            if f.size:
                r, ok = self.read_consistent(cidx[f], retries=4)
                good = ok & (r["state"] == USED) & (r["key0"] == pk0[f]) & (r["key1"] == pk1[f])
                g = f[good]
                idx[pend[g]] = cidx[g]
                recs[pend[g]] = r[good]
                hits[pend[g]] = True
                again[f[~good]] = True  # changed under us, or mid-write: look again
            pend = pend[again]
            if pend.size == 0:
                break
        return idx, recs, hits

    def items(self, chunk: int = 1 << 16) -> Iterator[tuple[int, int, np.void]]:
        """Yield ``(key0, key1, record)`` for every USED entry (consistent copies; slow path / CLI).

        Entries changing during the scan may be seen before or after the change;
        an entry left half-written by a dead writer is skipped until recovery.
        """
        for a in range(0, self.capacity, chunk):
            b = min(self.capacity, a + chunk)
            used = np.flatnonzero(self._state[a:b] == USED) + a
            if used.size == 0:
                continue
            rec, ok = self.read_consistent(used, retries=8)
            for r in rec[ok & (rec["state"] == USED)]:
                yield int(r["key0"]), int(r["key1"]), r

    # ------------------------------------------------------------------ writes

    def _values_for(self, values) -> np.ndarray | None:
        if values is None:
            return None
        values = np.asarray(values)
        names = values.dtype.names
        if not names:
            raise TypeError("values must be a structured array with session value fields (see VALUE_DTYPE)")
        bad = [n for n in names if n not in VALUE_FIELDS]
        if bad:
            raise ValueError(f"not session value fields: {bad}; allowed: {list(VALUE_FIELDS)}")
        return values.reshape(-1)

    def _commit(self, slots: np.ndarray, img: np.ndarray, kind: int) -> None:
        """Journal then write ``img`` (final images, incl. final state) to distinct ``slots``.

        The caller updates header counters afterwards and then calls
        :meth:`_finish` to mark the journal done.
        """
        m = slots.shape[0]
        hook = self._pause_hook
        s16 = self._s16[:m]
        np.left_shift(slots, 4, out=s16)
        old = self._oldseq[:m]
        np.take(self._seqf, s16, out=old, mode="clip")
        # 1-3: fill the journal while jseq is odd, then publish it (even).
        self._h_jseq[0] += 1
        if hook is not None:
            hook("journal_open")
        self._jslot[:m] = slots
        self._jold[:m] = old
        self._jimage[:m] = img
        self._h_jcount[0] = m
        self._h_jkind[0] = kind
        self._h_jseq[0] += 1
        if hook is not None:
            hook("journal")
        # 4: entries become "being written".
        old += 1
        self._seq[slots] = old
        if hook is not None:
            hook("seq_odd")
        # 5: key and value fields, state still the old one, seq (odd) rewritten unchanged.
        fstate = self._fstate[:m]
        fstate[:] = img["state"]
        img["state"] = self._state[slots]
        img["seq"] = old
        if hook is None:
            self.entries[slots] = img
        else:
            # Debug variant: field by field, pausing between them, so that a
            # SIGKILL in a test leaves genuinely half-written entries.
            for name in ELEMENT.names:
                self.entries[name][slots] = img[name]
                hook("field:" + name)
        # 6: state, then 7: seq even.
        self._state[slots] = fstate
        if hook is not None:
            hook("state")
        old += 1
        self._seq[slots] = old
        if hook is not None:
            hook("seq_even")

    def _finish(self) -> None:
        self._h_jdone[0] = self._h_jseq[0]
        if self._pause_hook is not None:
            self._pause_hook("done")

    def _add_header(self, field: str, delta: int) -> None:
        if delta:
            v = self._hdr[field]
            v[0] = int(v[0]) + delta

    def insert_batch(self, k0, k1, values=None, *, update: bool = True, out: np.ndarray | None = None, out_new: np.ndarray | None = None) -> np.ndarray:
        """Insert (or update) a burst of keys; returns each key's slot, or -1 when no slot was free.

        Semantics are those of ``dict[key] = value`` applied in order:

        - an absent key gets a slot: its value fields come from ``values``
          (fields not present in ``values`` are 0);
        - a present key keeps its slot; with ``update=True`` (default) the
          fields present in ``values`` are overwritten, others kept; with
          ``update=False`` the entry is left untouched;
        - a key repeated inside the burst is stored once; its *last* occurrence's
          value wins and every occurrence gets the same slot;
        - -1: the key was absent and both of its probe windows are full (the
          key is not stored; ``insert_full`` counts it).

        ``values`` is a structured array (e.g. of VALUE_DTYPE) with one row per
        key. ``out_new`` (bool, optional) is set where the key was absent and has
        been created. The whole burst is journaled: after a crash and
        :meth:`recover`, each chunk of up to BURST_MAX keys happened entirely or
        not at all.
        """
        self._require_writer()
        k0, k1 = _as_keys(k0, k1)
        n = k0.shape[0]
        vals = self._values_for(values)
        if vals is not None and vals.shape[0] != n:
            raise ValueError(f"values has {vals.shape[0]} rows for {n} keys")
        if out is None:
            out = np.empty(n, np.int64)
        for a in range(0, n, BURST_MAX):
            b = min(n, a + BURST_MAX)
            new = self._insert_chunk(k0[a:b], k1[a:b], None if vals is None else vals[a:b], update, out[a:b])
            if out_new is not None:
                out_new[a:b] = new
        return out

    def _dedupe(self, k0: np.ndarray, k1: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(uniq, pos): original indices of each distinct key's last occurrence, and
        for each input row the position of its key in ``uniq`` (None when all distinct)."""
        n = k0.shape[0]
        order = np.lexsort((k1, k0))  # stable: equal keys keep their input order
        sk0 = k0[order]
        sk1 = k1[order]
        same = (sk0[1:] == sk0[:-1]) & (sk1[1:] == sk1[:-1])
        if not same.any():
            return np.arange(n), None
        is_last = np.ones(n, np.bool_)
        is_last[:-1] = ~same
        grp = np.zeros(n, np.int64)
        grp[1:] = np.cumsum(~same)
        uniq = order[is_last]
        pos = np.empty(n, np.int64)
        pos[order] = grp
        return uniq, pos

    def _insert_chunk(self, k0: np.ndarray, k1: np.ndarray, vals: np.ndarray | None, update: bool, out: np.ndarray) -> np.ndarray:
        n = k0.shape[0]
        if n == 0:
            return np.zeros(0, np.bool_)
        uniq, pos = self._dedupe(k0, k1)
        m = uniq.shape[0]
        uk0 = k0[uniq]
        uk1 = k1[uniq]
        slots = np.empty(m, np.int64)
        found = self.lookup_batch(uk0, uk1, slots, np.empty(m, np.bool_))
        absent = np.flatnonzero(~found)
        if absent.size:
            slots[absent] = self._plan_claims(self._home[:m][absent].copy())
        is_new = ~found & (slots >= 0)
        write = is_new | found if update and vals is not None else is_new
        w = np.flatnonzero(write)
        n_new = int(np.count_nonzero(is_new))
        if w.size:
            ws = slots[w]
            img = self._img[: w.size]
            img[:] = self.entries[ws]
            new_w = is_new[w]
            old_state = img["state"].copy()
            if n_new:
                nw = np.flatnonzero(new_w)
                blank = np.zeros(nw.size, ELEMENT)
                blank["seq"] = img["seq"][nw]
                img[nw] = blank
                img["key0"][nw] = uk0[w[nw]]
                img["key1"][nw] = uk1[w[nw]]
            if vals is not None:
                src = uniq[w]
                for name in vals.dtype.names:
                    img[name] = vals[name][src]
            img["state"] = USED
            self._commit(ws, img, J_INSERT)
            reused = int(np.count_nonzero(old_state[new_w] == TOMBSTONE))
            self._add_header("count", n_new)
            self._add_header("tombstones", -reused)
            self._add_header("inserts", n_new)
            self._add_header("updates", int(w.size) - n_new)
            self._finish()
        self._add_header("insert_full", int(absent.size) - n_new)
        if pos is None:
            out[:] = slots
            return is_new
        out[:] = slots[pos]
        return is_new[pos]

    def _plan_claims(self, homes: np.ndarray) -> np.ndarray:
        """Choose a free slot for each absent key (rows of ``homes``), or -1 if both windows are full.

        Each key takes the first free slot (EMPTY or TOMBSTONE) of whichever
        window reaches one sooner; two keys wanting one slot: the earlier key
        wins and the other looks again with that slot counted as taken.
        """
        a = homes.shape[0]
        res = np.full(a, -1, np.int64)
        mp = self.max_probe
        short = min(_FIRST_BLOCK, mp)
        pend = np.arange(a)
        claimed: list[np.ndarray] = []
        while pend.size:
            p = pend.size
            taken = np.concatenate(claimed) if claimed else None
            # First free offset per window, looking at the first few offsets first
            # and at whole windows only for keys whose both windows start crowded.
            ws = (homes[pend][:, :, None] + self._offs[:short]) & self._mask_i  # (p, 2, short)
            f = self._first_free(ws, taken)
            deep = np.flatnonzero((f >= short).all(axis=1))
            if deep.size and short < mp:
                wd = (homes[pend[deep]][:, :, None] + self._offs) & self._mask_i  # (d, 2, mp)
                f[deep] = self._first_free(wd, taken)
            lane = (f[:, 1] < f[:, 0]).astype(np.int64)
            rows = np.arange(p)
            fo = f[rows, lane]
            ok = fo < mp
            slot = (homes[pend, lane] + fo) & self._mask_i
            okr = np.flatnonzero(ok)
            if okr.size == 0:
                break
            _, first = np.unique(slot[okr], return_index=True)
            win = okr[first]
            res[pend[win]] = slot[win]
            claimed.append(slot[win])
            done = ~ok
            done[win] = True
            pend = pend[~done]
        return res

    def _first_free(self, ws: np.ndarray, taken: np.ndarray | None) -> np.ndarray:
        """For window slots ``ws`` (p, 2, w): offset of the first slot not USED and not
        in ``taken``, per window; ``max_probe`` where there is none."""
        free = self._stf[ws << 6] != USED
        if taken is not None:
            free &= ~np.isin(ws, taken)
        return np.where(free.any(axis=2), free.argmax(axis=2), self.max_probe)

    def update_batch(self, idx, values) -> np.ndarray:
        """Overwrite the value fields present in ``values`` of the USED entries at slots ``idx``.

        For the fast path after a lookup (slots from :meth:`lookup_batch`).
        -1 or non-USED slots are skipped; a slot repeated in the burst takes its
        last row. Returns the mask of rows applied.
        """
        self._require_writer()
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        vals = self._values_for(values)
        if vals.shape[0] != idx.shape[0]:
            raise ValueError(f"values has {vals.shape[0]} rows for {idx.shape[0]} slots")
        applied = np.zeros(idx.shape[0], np.bool_)
        valid = (idx >= 0) & (idx < self.capacity)
        valid[valid] = self._state[idx[valid]] == USED
        rows = np.flatnonzero(valid)
        if rows.size == 0:
            return applied
        # Last occurrence of each slot: unique over the reversed rows.
        u, first_rev = np.unique(idx[rows][::-1], return_index=True)
        last_rows = rows[::-1][first_rev]
        for a in range(0, u.size, BURST_MAX):
            b = min(u.size, a + BURST_MAX)
            s = u[a:b]
            img = self._img[: b - a]
            img[:] = self.entries[s]
            for name in vals.dtype.names:
                img[name] = vals[name][last_rows[a:b]]
            self._commit(s, img, J_UPDATE)
            self._add_header("updates", b - a)
            self._finish()
        applied[rows] = True
        return applied

    def touch_batch(self, idx, now: int, nbytes) -> int:
        """Account a burst of packets to sessions: ``packets += 1``, ``bytes += nbytes``, ``last_seen = now``.

        ``idx`` are slots (from a lookup; -1 and non-USED skipped), one per
        packet; a slot appearing k times gets k packets and the sum of their
        bytes. Returns the number of entries changed.
        """
        self._require_writer()
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        nbytes = np.broadcast_to(np.asarray(nbytes, dtype=np.uint64), idx.shape)
        valid = (idx >= 0) & (idx < self.capacity)
        valid[valid] = self._state[idx[valid]] == USED
        if not valid.any():
            return 0
        u, inv = np.unique(idx[valid], return_inverse=True)
        pk = np.bincount(inv, minlength=u.size).astype(np.uint64)
        by = np.zeros(u.size, np.uint64)
        np.add.at(by, inv, nbytes[valid])
        for a in range(0, u.size, BURST_MAX):
            b = min(u.size, a + BURST_MAX)
            s = u[a:b]
            img = self._img[: b - a]
            img[:] = self.entries[s]
            img["packets"] += pk[a:b]
            img["bytes"] += by[a:b]
            img["last_seen"] = now
            self._commit(s, img, J_TOUCH)
            self._add_header("updates", b - a)
            self._finish()
        return int(u.size)

    def delete_batch(self, k0, k1) -> np.ndarray:
        """Delete a burst of keys; returns the mask of keys found and deleted (now TOMBSTONEs).

        In order, like ``dict.pop(key, None) is not None``: a key repeated in
        the burst is reported at its first occurrence only. Tombstones are cleared (keys and values zeroed) and a
        tombstone at the end of a probe chain becomes EMPTY again.
        """
        self._require_writer()
        k0, k1 = _as_keys(k0, k1)
        n = k0.shape[0]
        res = np.zeros(n, np.bool_)
        for a in range(0, n, BURST_MAX):
            b = min(n, a + BURST_MAX)
            idx = np.empty(b - a, np.int64)
            hits = self.lookup_batch(k0[a:b], k1[a:b], idx, res[a:b])
            hit_rows = np.flatnonzero(hits)
            if hit_rows.size == 0:
                continue
            s, first = np.unique(idx[hit_rows], return_index=True)
            if s.size != hit_rows.size:  # a key repeated: only its first occurrence deleted it
                hits[hit_rows] = False
                hits[hit_rows[first]] = True
            img = self._img[: s.size]
            seqs = self._seq[s]
            img[:] = np.zeros(s.size, ELEMENT)
            img["seq"] = seqs
            img["state"] = TOMBSTONE
            self._commit(s, img, J_DELETE)
            self._add_header("count", -int(s.size))
            self._add_header("tombstones", int(s.size))
            self._add_header("deletes", int(s.size))
            self._finish()
            self._trim_tombstones(s, limit=2 * self.max_probe)
        return res

    def _trim_tombstones(self, cand: np.ndarray, limit: int) -> int:
        """Turn TOMBSTONEs followed by an EMPTY slot back into EMPTY, walking backwards.

        Safe at every single store (chain invariant), so it needs neither
        seqlock nor journal; an interrupted walk just leaves tombstones.
        """
        trimmed = 0
        s = cand
        last = self.capacity - 1
        for _ in range(limit):
            nxt = (s + 1) & self._mask_i
            if self.wraps:
                after_empty = self._state[nxt] == EMPTY
            else:
                # No window runs past the last entry: beyond it counts as EMPTY.
                after_empty = (nxt > last) | (self._state[np.minimum(nxt, last)] == EMPTY)
            c = s[(self._state[s] == TOMBSTONE) & after_empty]
            if c.size == 0:
                break
            c = np.unique(c)
            self._state[c] = EMPTY
            trimmed += int(c.size)
            s = (c - 1) & self._mask_i
            if not self.wraps:
                s = s[s >= 0]
        if trimmed:
            self._add_header("tombstones", -trimmed)
        return trimmed

    # ------------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Repair what a killed writer left half-done; run by a (re)started writer before writing.

        Completes the journaled batch (every journaled entry gets its final
        image), makes any other odd-seq entry safe (USED -> TOMBSTONE, seq even),
        trims tombstones at chain ends and recomputes ``count`` and
        ``tombstones``. Returns the number of entries that were half-written
        (odd seq) and have been repaired. Details of the last run are in
        ``self.last_recovery``.
        """
        self._require_writer()
        info = {"journal": "clean", "completed": 0, "redone": 0, "reset": 0, "trimmed": 0}
        repaired = 0
        jseq = int(self._h_jseq[0])
        if jseq & 1:
            # Killed while filling the journal: no entry of that batch was touched.
            self._h_jseq[0] = jseq + 1
            self._h_jdone[0] = jseq + 1
            info["journal"] = "discarded (incomplete)"
        elif int(self._h_jdone[0]) != jseq:
            m = int(self._h_jcount[0])
            if not 0 <= m <= JOURNAL_CAP:
                raise RuntimeError(f"session table journal corrupt: {m} records")
            slots = self._jslot[:m].copy()
            old = self._jold[:m].copy()
            inrange = (slots >= 0) & (slots < self.capacity)
            if not inrange.all():
                raise RuntimeError("session table journal corrupt: slot out of range")
            cur = self._seq[slots]
            mid = cur == old + np.uint32(1)
            todo = (cur == old) | mid
            if todo.any():
                t = np.flatnonzero(todo)
                s = slots[t]
                img = self._jimage[:m][t].copy()
                odd = old[t] + np.uint32(1)
                self._seq[s] = odd  # (re)mark as being written
                fstate = img["state"].copy()
                img["seq"] = odd
                img["state"] = self._state[s]
                self.entries[s] = img
                self._state[s] = fstate
                self._seq[s] = odd + np.uint32(1)
            info["journal"] = "redone"
            info["completed"] = int(np.count_nonzero(mid))
            info["redone"] = int(np.count_nonzero(todo & ~mid))
            repaired += info["completed"]
            self._h_jdone[0] = jseq
        # Any other odd entry: not covered by a valid journal, cannot be vouched for.
        odd = np.flatnonzero(self._seq & 1)
        if odd.size:
            used = odd[self._state[odd] == USED]
            blank = np.zeros(odd.size, ELEMENT)
            blank["seq"] = self._seq[odd]
            blank["state"] = self._state[odd]
            blank["state"][blank["state"] == USED] = TOMBSTONE
            self.entries[odd] = blank  # seq unchanged (odd) while the rest is rewritten
            self._seq[odd] = blank["seq"] + np.uint32(1)
            info["reset"] = int(used.size)
            repaired += int(odd.size)
        # Tidy chain ends, then recount from the entries themselves.
        tombs = np.flatnonzero(self._state == TOMBSTONE)
        self._h_tomb[0] = tombs.size  # the header may be stale: trimming counts down from here
        info["trimmed"] = self._trim_tombstones(tombs, limit=self.capacity) if tombs.size else 0
        self._h_count[0] = int(np.count_nonzero(self._state == USED))
        self._h_tomb[0] = int(np.count_nonzero(self._state == TOMBSTONE))
        self._add_header("recovered", repaired)
        self.last_recovery = info
        return repaired

    # ------------------------------------------------------------------ checks

    def audit(self) -> list[str]:
        """Check the table's invariants (vectorized over all entries); returns problems found.

        Meant for tests, recovery tools and the CLI, on a quiescent table.
        """
        problems: list[str] = []
        cap, mp = self.capacity, self.max_probe
        odd = int(np.count_nonzero(self._seq & 1))
        if odd:
            problems.append(f"{odd} entries with odd seq (being written or torn)")
        st = self._state.copy()
        bad_state = int(np.count_nonzero(st > TOMBSTONE))
        if bad_state:
            problems.append(f"{bad_state} entries with an unknown state")
        used = np.flatnonzero(st == USED)
        if used.size != self.count:
            problems.append(f"header count {self.count} but {used.size} USED entries")
        nt = int(np.count_nonzero(st == TOMBSTONE))
        if nt != self.tombstones:
            problems.append(f"header tombstones {self.tombstones} but {nt} TOMBSTONE entries")
        if used.size == 0:
            return problems
        k0 = self.entries["key0"][used]
        k1 = self.entries["key1"][used]
        keys = np.stack([k0, k1], axis=1)
        nuniq = np.unique(keys, axis=0).shape[0]
        if nuniq != used.size:
            problems.append(f"{used.size - nuniq} duplicate keys")
        homes = self.homes(k0, k1)
        d = (used[:, None] - homes) & self._mask_i  # displacement in each window (negative: not in it)
        # EMPTY slots in [home, home + d) via prefix sums over the doubled ring.
        emp = np.concatenate([[0], np.cumsum(np.concatenate([st == EMPTY, st == EMPTY]))])
        dd = np.maximum(d, 0)
        gaps = emp[homes + dd] - emp[homes]
        ok = ((d >= 0) & (d < mp) & (gaps == 0)).any(axis=1)
        if not ok.all():
            problems.append(f"{int(np.count_nonzero(~ok))} entries not reachable from either home window")
        return problems
