"""Online migration of a live session table between layout versions (v1 <-> v2).

The candidate of a hot upgrade copies the old worker's table into a new zone
of the new layout *ahead of the swap*, while the old worker keeps forwarding
and writing its table; at the swap (old worker stopped) it copies only what
changed since, so the swap pause does not grow with the number of sessions.
Rollback runs the same thing in the other direction.

Who writes what (two versions never write the same zone at once)
-----------------------------------------------------------------
* The destination zone is written only by the process running the
  :class:`OnlineMigration`, which is (or becomes) that zone's writer: a new
  destination is created with ``writer_pid`` = this process (forward: the
  candidate); an existing one (rollback: the old v1 zone) is taken with the
  table's writer rule (refused while another live pid holds it), so the
  reverse copy runs in the parked old worker itself.
* The source zone is only *read* (seqlock reads) while its writer runs.
  :meth:`OnlineMigration.finish` refuses to run until the source writer has
  stopped: ``writer_pid`` released to 0 by a clean stop, or dead (then, with
  ``recover=True``, this process becomes the source's writer just long enough
  to complete the dead writer's journaled batch, and releases it again).
* After ``finish`` the destination is complete; the caller attaches it as
  writer (``table()``) and only then claims the queues. The source is left
  untouched for a rollback.

How "what changed" is found
---------------------------
Copies keep the source's per-entry ``seq`` (and ``state``), so after a copy an
entry is unchanged exactly while ``(seq, state)`` is equal on both sides
(``state`` too, because trimming a tombstone back to EMPTY changes state
without seq). A pass compares those two columns (vectorized, chunked) and
copies the entries that differ; an entry whose seq is odd or moves during the
copy (being written) is left for a later pass.

That compare reads one cache line per slot, so a full pass is O(capacity).
To keep the pause flat, :meth:`track` -- called by the candidate while it
spins waiting for the swap -- polls the source's redo journal (the header
holds the slots of the batch being written; its ``jseq`` advances by 2 per
batch) and collects the slots of every batch. If it never missed a batch
since the last full pass began, the swap-time delta compares only the
collected slots (plus, for delete batches, the slots a tombstone trim may
have walked back over); if it missed one (the writer ran several batches
between two polls), the delta falls back to a full pass and says so
(``MigrationResult.mode``). Version 1 writers give no other change log; a
later layout could keep a dirty-slot ring instead.

Limits: seq is 32 bits, so an entry rewritten exactly 2**31 times between two
passes would look unchanged (at one write per packet, days of line rate on
one session during one upgrade).

A worker's zones (:class:`TableHandover`, :func:`live_table_zone`)
------------------------------------------------------------------
One zone per layout version and worker (``nat.w<i>.in2out``, ``...in2out.v2``);
the *live* one carries the highest activation number in its header's ``flags``
word. A hand-over fills the destination (copy ahead, delta) and activates it
with one store once its process holds the worker's queues; readers follow the
live zone. See the section "a worker's table zones" below.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from hotplane.schema import registry
from hotplane.schema.session import (
    DEFAULT_MAX_PROBE,
    ELEMENT,
    ELEMENT_V2,
    HEADER,
    HEADER_V2,
    LAYOUT,
    LAYOUT_V2,
    MAX_MAX_PROBE,
    TOMBSTONE,
    USED,
    VALUE_FIELDS_V2,
)
from hotplane.schema.session_migrations import HEADER_COPY_FIELDS, converter, init_header_from, zone_views
from hotplane.shared.ordering import require_tso
from hotplane.shared.session_table import BURST_MAX, SessionTable, _check_buf, _pid_alive, back_slots, check_capacity, header_mask

__all__ = ["SessionTableV2", "OnlineMigration", "MigrationResult", "NotQuiescent", "TableHandover", "table_class", "table_version",
           "table_zone_name", "live_table_zone", "attach_live", "table_verdicts", "worker_table", "activation"]

_LAYOUTS = {1: LAYOUT, 2: LAYOUT_V2}
_HEADERS = {1: HEADER, 2: HEADER_V2}
_ELEMENTS = {1: ELEMENT, 2: ELEMENT_V2}
J_DELETE = 3  # shared/session_table.py journal kind of a delete batch (trims may follow it)
J_RECOVER = 5


class NotQuiescent(RuntimeError):
    """The source table's writer has not stopped: the swap-time delta cannot run yet."""


# --------------------------------------------------------------------------- v2 table


class SessionTableV2(SessionTable):
    """The session table at layout version 2 (same algorithms, v2 entries).

    ``SessionTable`` binds the version-1 dtypes at module level; until it takes
    its layout from class attributes (see the patch in the issue-6 report),
    this subclass re-does the binding in ``__init__`` and overrides the few
    methods that name the v1 entry dtype. Entry dtypes v1 and v2 have the same
    type at every position, so the inherited code's v1-typed scratch arrays
    hold v2 entries byte for byte; results handed out are viewed as v2.
    """

    layout = LAYOUT_V2

    @staticmethod
    def zone_size(capacity: int) -> int:
        return LAYOUT_V2.zone_size(int(capacity))

    @classmethod
    def create(cls, buf: np.ndarray, capacity: int, seed: int = 0, *, max_probe: int = DEFAULT_MAX_PROBE) -> "SessionTableV2":
        """Initialise an empty v2 table in ``buf`` with the writer role (this process)."""
        capacity = int(capacity)
        check_capacity(capacity, int(max_probe))  # the geometries of shared/session_table.py
        need = cls.zone_size(capacity)
        _check_buf(buf, need)
        buf[:need] = 0
        hdr = buf[: HEADER_V2.itemsize].view(HEADER_V2)
        hdr["capacity"] = capacity
        hdr["mask"] = header_mask(capacity)
        hdr["seed"] = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        hdr["max_probe"] = int(max_probe)
        hdr["writer_pid"] = os.getpid()
        hdr["writer_epoch"] = 1
        registry.stamp(hdr, LAYOUT_V2)
        t = cls(buf)
        t._writer = True
        return t

    def __init__(self, buf: np.ndarray) -> None:  # noqa: D401 - mirrors SessionTable.__init__ with v2 dtypes
        require_tso()
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or buf.nbytes < HEADER_V2.itemsize:
            raise TypeError("session table buffer must be a 1-D uint8 numpy array holding at least the header")
        hdr = buf[: HEADER_V2.itemsize].view(HEADER_V2)
        registry.verify(hdr, LAYOUT_V2, what="session table v2")
        cap = int(hdr["capacity"][0])
        _check_buf(buf, self.zone_size(cap))
        self._init_views(buf, hdr, cap)

    def _init_views(self, buf: np.ndarray, hdr: np.ndarray, cap: int) -> None:
        # The same views and scratch as SessionTable.__init__, typed v2 (that
        # method verifies the v1 stamp, so it cannot be called for a v2 zone).
        mp = int(hdr["max_probe"][0])
        self._set_geometry(cap, int(hdr["mask"][0]), mp, "session table v2")
        from hotplane.shared import session_table as st

        self._buf = buf
        self._hdr = hdr
        self.capacity = cap
        self.max_probe = mp
        self.seed = int(hdr["seed"][0])
        self._writer = False
        self.recovered = 0
        self._pause_hook = None
        self._seed_u = np.uint64(self.seed)
        self._h_count = hdr["count"]
        self._h_tomb = hdr["tombstones"]
        self._h_jseq = hdr["jseq"]
        self._h_jdone = hdr["jdone"]
        self._h_jcount = hdr["jcount"]
        self._h_jkind = hdr["jkind"]
        self._jslot = hdr["jslot"][0]
        self._jold = hdr["jold_seq"][0]
        self._jimage = hdr["jimage"][0]
        hs = LAYOUT_V2.header_size
        region = buf[hs : hs + cap * ELEMENT_V2.itemsize]
        self._region = region
        self.entries = region.view(ELEMENT_V2)
        self._state = self.entries["state"]
        self._seq = self.entries["seq"]
        words = region.view(np.uint64)
        self._k0f = words[1:]
        self._k1f = words[2:]
        self._seqf = region.view(np.uint32)
        self._stf = region[4:]
        B = BURST_MAX
        W = min(st._FIRST_BLOCK, mp)
        self._W = W
        U64 = np.dtype(np.uint64)
        self._x = np.empty(B, U64)
        self._y = np.empty(B, U64)
        self._home = np.empty((B, 2), np.int64)
        self._offw = np.arange(W, dtype=np.int64)
        self._offs = np.arange(mp, dtype=np.int64)
        self._sl = np.empty((B, 2, W), np.int64)
        self._i8 = np.empty((B, 2, W), np.int64)
        self._kw = np.empty((B, 2, W), U64)
        self._eq = np.empty((B, 2, W), np.bool_)
        self._f = np.empty(B, np.int64)
        self._flat = np.empty(B, np.int64)
        self._rowbase = np.arange(B, dtype=np.int64) * (2 * W)
        self._c8 = np.empty(B, np.int64)
        self._tu = np.empty(B, U64)
        self._tb = np.empty(B, np.uint8)
        self._b1 = np.empty(B, np.bool_)
        self._hits = np.empty(B, np.bool_)
        self._idx = np.empty(B, np.int64)
        self._img = np.empty(B, ELEMENT_V2)
        self._fstate = np.empty(B, np.uint8)
        self._oldseq = np.empty(B, np.uint32)
        self._s16 = np.empty(B, np.int64)

    def _values_for(self, values):
        if values is None:
            return None
        values = np.asarray(values)
        names = values.dtype.names
        if not names:
            raise TypeError("values must be a structured array with session value fields (see VALUE_DTYPE_V2)")
        bad = [n for n in names if n not in VALUE_FIELDS_V2]
        if bad:
            raise ValueError(f"not session v2 value fields: {bad}; allowed: {list(VALUE_FIELDS_V2)}")
        return values.reshape(-1)

    def read_consistent(self, idx, out=None, *, retries: int = 64):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        rec = np.zeros(idx.shape[0], ELEMENT_V2) if out is None else out
        return super().read_consistent(idx, rec, retries=retries)

    def lookup_consistent(self, k0, k1, *, retries: int = 16):
        idx, recs, hits = super().lookup_consistent(k0, k1, retries=retries)
        return idx, recs.view(ELEMENT_V2), hits

    def touch_batch(self, idx, now: int, nbytes, inbound=None) -> int:
        """As :meth:`SessionTable.touch_batch`; rows where ``inbound`` is true also add to ``bytes_in``."""
        self._require_writer()
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        nbytes = np.broadcast_to(np.asarray(nbytes, dtype=np.uint64), idx.shape)
        inb = np.zeros(idx.shape, np.bool_) if inbound is None else np.broadcast_to(np.asarray(inbound, np.bool_), idx.shape)
        valid = (idx >= 0) & (idx < self.capacity)
        valid[valid] = self._state[idx[valid]] == USED
        if not valid.any():
            return 0
        u, inv = np.unique(idx[valid], return_inverse=True)
        pk = np.bincount(inv, minlength=u.size).astype(np.uint64)
        by = np.zeros(u.size, np.uint64)
        np.add.at(by, inv, nbytes[valid])
        bi = np.zeros(u.size, np.uint64)
        np.add.at(bi, inv, np.where(inb[valid], nbytes[valid], 0).astype(np.uint64))
        for a in range(0, u.size, BURST_MAX):
            b = min(u.size, a + BURST_MAX)
            s = u[a:b]
            img = self._img[: b - a]
            img[:] = self.entries[s]
            img["packets"] += pk[a:b]
            img["bytes"] += by[a:b]
            img["bytes_in"] += bi[a:b]
            img["last_seen"] = now
            self._commit(s, img, 4)
            self._add_header("updates", b - a)
            self._finish()
        return int(u.size)


def table_version(buf: np.ndarray) -> int:
    """Layout version of the session-table zone in ``buf`` (verified against the registry)."""
    hdr = buf[: HEADER.itemsize].view(HEADER)
    return registry.verify(hdr, "session_table", what="session table").version


def table_class(version: int) -> type[SessionTable]:
    """The table class for a layout version (1: SessionTable, 2: SessionTableV2)."""
    try:
        return {1: SessionTable, 2: SessionTableV2}[version]
    except KeyError:
        raise registry.SchemaError(f"no session table implementation for layout version {version}") from None


def attach_any(buf: np.ndarray, **kw) -> SessionTable:
    """Attach a session table of whatever registered version the zone holds."""
    return table_class(table_version(buf)).attach(buf, **kw)


# --------------------------------------------------------------------------- migration


@dataclass
class MigrationResult:
    """What the swap-time delta did (``finish``)."""

    mode: str  # "tracked" (journal-collected slots only) or "full" (whole-table compare)
    pause_ns: int  # wall time of finish(), the part of the swap pause the migration adds
    compared: int  # slots whose (seq, state) were compared
    copied: int  # entries copied in the delta
    count: int  # USED entries in the destination (== source count, verified)
    recovered: int = 0  # half-written entries a dead source writer left, repaired first
    passes: int = 0  # copy-ahead passes before the swap
    ahead_copied: int = 0  # entries copied ahead of the swap
    notes: list[str] = field(default_factory=list)


class OnlineMigration:
    """Copy a live session table into a zone of another layout version, ahead of a swap.

    ``src_buf`` holds the live table (its writer keeps running until the
    swap). ``dst_buf``: a new zone (``create=True``: initialised here, this
    process its writer) or the previous version's zone of a rollback
    (``create=False``: must be a table of ``to_version`` with the same
    geometry; this process takes its writer role). Usage (the candidate)::

        mig = OnlineMigration(v1_buf, v2_buf, to_version=2, create=True)
        mig.copy_ahead()                   # old worker still forwarding
        while not released: mig.track()    # in the spin loop on the ownership word
        res = mig.finish()                 # old worker stopped: the delta
        table = mig.table()                # v2 writer; then claim the queues
    """

    def __init__(self, src_buf: np.ndarray, dst_buf: np.ndarray, *, to_version: int, create: bool, chunk: int = 1 << 11, force: bool = False) -> None:
        self.src_version = table_version(src_buf)
        self.dst_version = int(to_version)
        if self.src_version == self.dst_version:
            raise registry.SchemaError(f"session table is already at version {to_version}: nothing to migrate")
        self.convert = converter(self.src_version, self.dst_version)
        self.src_buf, self.dst_buf = src_buf, dst_buf
        self.src_hdr, self.src = zone_views(src_buf, self.src_version)
        self.capacity = int(self.src_hdr["capacity"][0])
        self.max_probe = int(self.src_hdr["max_probe"][0])
        self.chunk = max(1024, int(chunk))
        me = os.getpid()
        if create:
            _refuse_live_writer(dst_buf, self.dst_version, me, force)
            init_header_from(self.src_hdr, dst_buf, self.dst_version, writer_pid=me, from_version=self.src_version)
            self.dst_hdr, self.dst = zone_views(dst_buf, self.dst_version)
            self._count = 0
            self._tombs = 0
        else:
            hdr = dst_buf[: _HEADERS[self.dst_version].itemsize].view(_HEADERS[self.dst_version])
            registry.verify(hdr, _LAYOUTS[self.dst_version], what="session table (migration destination)")
            for f in ("capacity", "seed", "max_probe"):
                if int(hdr[f][0]) != int(self.src_hdr[f][0]):
                    raise registry.SchemaError(f"migration destination differs from the source in {f}: {int(hdr[f][0])} != {int(self.src_hdr[f][0])}")
            pid = int(hdr["writer_pid"][0])
            if pid and pid != me and not force and _pid_alive(pid):
                raise NotQuiescent(f"migration destination has a live writer (pid {pid}); two versions never write one zone")
            hdr["writer_pid"] = me
            hdr["writer_epoch"] = int(hdr["writer_epoch"][0]) + 1
            self.dst_hdr, self.dst = zone_views(dst_buf, self.dst_version)
            st = self.dst["state"]
            self._count = int(np.count_nonzero(st == USED))
            self._tombs = int(np.count_nonzero(st == TOMBSTONE))
        # Column views (strided) of both sides.
        self._sseq, self._sst = self.src["seq"], self.src["state"]
        self._dseq, self._dst_state = self.dst["seq"], self.dst["state"]
        # Journal tracking (see the module docstring).
        self._jslot = self.src_hdr["jslot"][0]
        self._jkind_v = self.src_hdr["jkind"]
        self._jseq_v = self.src_hdr["jseq"]
        self._jcount_v = self.src_hdr["jcount"]
        self._epoch0 = int(self.src_hdr["writer_epoch"][0])
        self._recovered0 = int(self.src_hdr["recovered"][0])
        self._last_j: int | None = None
        self._dirty: list[tuple[int, np.ndarray]] = []  # (journal seq of the batch, slots)
        self._covered = False  # a full pass ran with no missed batch since it began
        self.missed = 0  # batches tracking missed (each forces a full pass)
        self.passes = 0
        # An incremental full pass (pass_step), resumable between calls: next slot, missed at its start.
        self._step_lo: int | None = None
        self._step_missed = 0
        # Called with (old destination records, new records) for every entry a copy changes, so a
        # caller can keep figures derived from the table (per-host session counts) exact.
        self.on_copy = None
        self.ahead_copied = 0
        self.finished: MigrationResult | None = None

    @property
    def covered(self) -> bool:
        """True while tracking has seen every source batch since the last full pass began
        (the swap-time delta will then compare tracked slots only)."""
        return self._covered

    # ------------------------------------------------------------------ journal tracking

    def track(self) -> int:
        """Poll the source journal once; returns the number of new batches seen (cheap: call it in a spin loop)."""
        for _ in range(4):
            j1 = int(self._jseq_v[0])
            if j1 & 1:
                continue  # the writer is filling the journal: look again
            if self._last_j is not None and j1 == self._last_j:
                return 0
            m = int(self._jcount_v[0])
            kind = int(self._jkind_v[0])
            slots = self._jslot[: max(0, min(m, self._jslot.shape[0]))].copy()
            if int(self._jseq_v[0]) != j1:
                continue  # the journal moved while copied: again
            seen = 1 if self._last_j is None else (j1 - self._last_j) // 2
            if seen != 1:
                self._gap()
            # The first poll records the batch in flight too: its entries may be mid-write now.
            if kind == J_DELETE:
                # Trimming after a delete walks back over tombstones before each deleted slot.
                back = np.arange(2 * self.max_probe + 1, dtype=np.int64)
                slots = back_slots(slots, back, self.capacity)
            self._dirty.append((j1, slots))
            self._last_j = j1
            return max(seen, 0)
        return 0

    def _dirty_slots(self) -> np.ndarray:
        if not self._dirty:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([s for _, s in self._dirty]))

    def _prune(self) -> None:
        """Forget dirty slots that a sync made equal, except the latest batch's.

        A delete batch's tombstone trim runs after the batch is marked done and
        changes state without seq, so its slots stay suspect until a later
        batch has started (the single writer finished the trim by then).
        """
        self._dirty = [(j, s) for (j, s) in self._dirty if j == self._last_j]

    def _gap(self) -> None:
        self.missed += 1
        self._covered = False
        self._dirty.clear()

    # ------------------------------------------------------------------ copying

    def _sync_slots(self, slots: np.ndarray, strict: bool) -> tuple[int, int]:
        """Copy the entries at ``slots`` whose (seq, state) differ and are stable; (copied, unstable).

        Unstable entries (being written) are remembered as dirty, so the swap-time
        delta looks at them again even when it compares tracked slots only.
        """
        if slots.size == 0:
            return 0, 0
        diff = slots[(self._sseq[slots] != self._dseq[slots]) | (self._sst[slots] != self._dst_state[slots])]
        if diff.size == 0:
            return 0, 0
        a = self._sseq[diff]  # seqlock read: seq, entries, seq again
        recs = self.src[diff]
        b = self._sseq[diff]
        ok = (a == b) & ((a & 1) == 0)
        unstable = int(diff.size - np.count_nonzero(ok))
        if unstable and strict:
            raise NotQuiescent(f"{unstable} source entries are being written although the writer has stopped")
        if unstable:
            self._dirty.append((self._last_j if self._last_j is not None else -1, diff[~ok]))
            diff, a, recs = diff[ok], a[ok], recs[ok]
        if diff.size == 0:
            return 0, unstable
        img = self.convert(recs)
        before = self.dst[diff] if self.on_copy is not None else None
        old_st = self._dst_state[diff]
        img["seq"] = a - np.uint32(1)  # odd while written (a is even; 0 wraps to an odd value)
        self._dseq[diff] = img["seq"]
        self.dst[diff] = img
        self._dseq[diff] = a
        new_st = img["state"]
        self._count += int(np.count_nonzero(new_st == USED)) - int(np.count_nonzero(old_st == USED))
        self._tombs += int(np.count_nonzero(new_st == TOMBSTONE)) - int(np.count_nonzero(old_st == TOMBSTONE))
        if before is not None:
            self.on_copy(before, img)
        return int(diff.size), unstable

    def _full_pass(self, strict: bool, track: bool) -> tuple[int, int]:
        copied = unstable = 0
        cap, ch = self.capacity, self.chunk
        for lo in range(0, cap, ch):
            hi = min(cap, lo + ch)
            d = np.flatnonzero((self._sseq[lo:hi] != self._dseq[lo:hi]) | (self._sst[lo:hi] != self._dst_state[lo:hi]))
            if d.size:
                c, u = self._sync_slots(d + lo, strict)
                copied += c
                unstable += u
            if track:
                self.track()
        return copied, unstable

    def copy_ahead(self, *, max_passes: int = 3, settle: int = 0) -> dict:
        """Full passes while the source writer runs, until a pass leaves at most ``settle`` unstable entries.

        Starts journal tracking first, so every batch from here on is either
        collected or noticed as missed. Returns figures for progress lines.
        """
        self.track()
        copied = unstable = 0
        for _ in range(max(1, max_passes)):
            start_missed = self.missed
            self._prune()
            c, unstable = self._full_pass(strict=False, track=True)
            copied += c
            self.passes += 1
            self._covered = self.missed == start_missed and self._last_j is not None
            if unstable <= settle and self._covered:
                break
        self.ahead_copied += copied
        return {"passes": self.passes, "copied": copied, "unstable": unstable, "covered": self._covered, "count": self._count}

    def pass_step(self, budget: int = 1 << 14) -> bool:
        """Advance an incremental full pass by up to ``budget`` slots (writer still running).

        For a caller that must stay responsive (a candidate's poll loop): a full
        pass spread over many calls. Returns True when a pass completed with this
        call; coverage is re-established when no batch was missed since it began.
        """
        if self._step_lo is None:
            self.track()
            self._prune()
            self._step_lo = 0
            self._step_missed = self.missed
        lo = self._step_lo
        hi = min(self.capacity, lo + max(self.chunk, int(budget)))
        for a in range(lo, hi, self.chunk):
            b = min(hi, a + self.chunk)
            d = np.flatnonzero((self._sseq[a:b] != self._dseq[a:b]) | (self._sst[a:b] != self._dst_state[a:b]))
            if d.size:
                self.ahead_copied += self._sync_slots(d + a, False)[0]
            self.track()
        if hi < self.capacity:
            self._step_lo = hi
            return False
        self._step_lo = None
        self.passes += 1
        self._covered = self.missed == self._step_missed and self._last_j is not None
        return True

    def catch_up(self) -> int:
        """Copy the tracked dirty slots now (writer still running) so the swap-time delta stays small."""
        self.track()
        if not self._covered or not self._dirty:
            return 0
        slots = self._dirty_slots()
        self._prune()  # entries left unstable by the sync below are re-added by it
        c, _ = self._sync_slots(slots, strict=False)
        self.ahead_copied += c
        return c

    def _source_stopped(self, recover: bool) -> int:
        """Check the source writer has stopped; complete a dead writer's batch. Returns entries repaired."""
        pid = int(self.src_hdr["writer_pid"][0])
        me = os.getpid()
        repaired = 0
        if pid and pid != me and _pid_alive(pid):
            raise NotQuiescent(f"source session table writer pid {pid} is still running: it must stop and release the table (SessionTable.release()) before the swap-time copy")
        jseq = int(self.src_hdr["jseq"][0])
        dirty_journal = bool(jseq & 1) or int(self.src_hdr["jdone"][0]) != jseq
        if dirty_journal or (pid and pid != me):  # unfinished batch, or a writer that died holding the table
            if not recover:
                raise NotQuiescent("source session table has an unfinished write batch (its writer died mid-burst): finish(recover=True) repairs it")
            t = table_class(self.src_version).attach(self.src_buf, writer=True, recover=True)
            repaired = t.recovered
            t.release()
            self._gap()  # recovery writes outside the journal: compare everything
        return repaired

    def finish(self, *, recover: bool = True, full: bool = False) -> MigrationResult:
        """The swap-time delta: the source writer has stopped; make the destination equal to it.

        Compares only tracked slots when tracking saw every batch since the
        last full pass, else the whole table; copies what differs; sets the
        destination's counts and op counters; verifies the count. Raises
        :class:`NotQuiescent` while the source writer still runs.
        """
        t0 = time.monotonic_ns()
        repaired = self._source_stopped(recover)
        self.track()  # the last batches before the writer stopped
        if int(self.src_hdr["writer_epoch"][0]) != self._epoch0 or int(self.src_hdr["recovered"][0]) != self._recovered0:
            self._gap()  # another writer (or a recovery) ran: its changes may be outside what was tracked
        if full:
            self._covered = False
        notes: list[str] = []
        if self._covered:
            slots = self._dirty_slots()
            copied, _ = self._sync_slots(slots, strict=True)
            mode, compared = "tracked", int(slots.size)
        else:
            copied, _ = self._full_pass(strict=True, track=False)
            mode, compared = "full", self.capacity
            if self.missed:
                notes.append(f"journal tracking missed {self.missed} batch(es): full compare")
        src_count = int(self.src_hdr["count"][0])
        if self._count != src_count:
            raise RuntimeError(f"session table migration: destination holds {self._count} sessions, source header says {src_count}")
        h = self.dst_hdr
        for f in HEADER_COPY_FIELDS:
            if f not in ("capacity", "mask", "seed", "max_probe", "count", "tombstones"):
                h[f] = self.src_hdr[f]
        h["tombstones"] = self._tombs
        h["count"] = self._count
        self._covered = False  # a later finish (after more source writes) must compare again
        self._dirty.clear()
        self.finished = MigrationResult(mode, time.monotonic_ns() - t0, compared, copied, self._count, repaired, self.passes, self.ahead_copied, notes)
        return self.finished

    def table(self) -> SessionTable:
        """The destination as a writer table object (after :meth:`finish`)."""
        if self.finished is None:
            raise RuntimeError("finish() the migration before using the destination table")
        return table_class(self.dst_version).attach(self.dst_buf, writer=True, recover=False)

    def differences(self) -> list[str]:
        """Full comparison (tests, tools): source converted vs destination, entry by entry, and counts."""
        probs: list[str] = []
        conv = self.convert(np.ascontiguousarray(self.src))
        same = conv.view(np.uint8).reshape(-1, 64) == np.ascontiguousarray(self.dst).view(np.uint8).reshape(-1, 64)
        bad = np.flatnonzero(~same.all(axis=1))
        if bad.size:
            probs.append(f"{bad.size} entries differ (first slots {bad[:8].tolist()})")
        nu_s = int(np.count_nonzero(self.src["state"] == USED))
        nu_d = int(np.count_nonzero(self.dst["state"] == USED))
        if nu_s != nu_d or nu_d != int(self.dst_hdr["count"][0]) or nu_s != int(self.src_hdr["count"][0]):
            probs.append(f"counts: source {nu_s} used / header {int(self.src_hdr['count'][0])}, destination {nu_d} used / header {int(self.dst_hdr['count'][0])}")
        return probs


def _refuse_live_writer(buf: np.ndarray, version: int, me: int, force: bool) -> None:
    """A destination about to be re-initialised must not have another live writer (two versions never write one zone)."""
    hdr = buf[: _HEADERS[version].itemsize].view(_HEADERS[version])
    if (int(hdr["schema_id"][0]), int(hdr["version"][0]), int(hdr["layout_hash"][0])) != (
            _LAYOUTS[version].schema_id, _LAYOUTS[version].version, _LAYOUTS[version].layout_hash):
        return  # not (yet) a table: nobody writes it
    pid = int(hdr["writer_pid"][0])
    if pid and pid != me and not force and _pid_alive(pid):
        raise NotQuiescent(f"migration destination has a live writer (pid {pid}); two versions never write one zone")


# --------------------------------------------------------------------------- a worker's table zones
#
# Each worker's sessions live in one zone per layout version: ``nat.w<i>.in2out``
# (version 1, reserved by the primary) and ``nat.w<i>.in2out.v<n>`` (version n,
# reserved by the first process of a build writing version n). Exactly one of them
# is *live*: the one with the highest activation number, a u4 kept in the table
# header's ``flags`` word (same offset in every version; 0 in a zone that was never
# activated). A migration that completes makes its destination live with one store
# (``activation(source) + 1``), by the process that is the destination's writer and
# holds the worker's queues; the source is left as it was, for a rollback. Readers
# (stats, hairpinning peers, the candidates' validation) use the live zone only.


def table_zone_name(worker: int, version: int) -> str:
    """The zone holding worker ``worker``'s session table at layout ``version``."""
    base = f"nat.w{int(worker)}.in2out"
    return base if int(version) == 1 else f"{base}.v{int(version)}"


def table_zones(directory, worker: int) -> dict[int, object]:
    """``{version: memzone}`` of every session-table zone of ``worker`` that exists."""
    out = {}
    for v, lay in _LAYOUTS.items():
        z = directory.lookup(table_zone_name(worker, v))
        if z is not None and (z.schema_id, z.version) == (lay.schema_id, lay.version):
            out[v] = z
    return out


def activation(buf: np.ndarray) -> int:
    """The activation number of the table in ``buf`` (0: never made live by a migration)."""
    return int(buf[: HEADER.itemsize].view(HEADER)["flags"][0])


def live_table_zone(directory, worker: int) -> tuple[object, int] | None:
    """``(memzone, version)`` of worker ``worker``'s live session table, or None (no NAT tables)."""
    zones = table_zones(directory, worker)
    if not zones:
        return None
    # Ties (two zones never activated): the primary's version-1 zone is the original.
    v = max(zones, key=lambda v: (activation(zones[v].view), v == 1))
    return zones[v], v


def attach_live(directory, worker: int) -> SessionTable | None:
    """A reader of worker ``worker``'s live table, whatever its version (None without NAT tables)."""
    live = live_table_zone(directory, worker)
    return None if live is None else table_class(live[1]).attach(live[0].view)


def table_verdicts(directory, want_version: int, *, migrates: bool = True) -> dict[str, str]:
    """Zone by zone, what a build writing session tables of ``want_version`` makes of them.

    The live table: compatible / needs migration / refused (``migrates=False``,
    a process that only reads tables: compatible if this build reads its
    version). A superseded zone is not in use: it says so.
    """
    import re

    pat = re.compile(r"^nat\.w(\d+)\.in2out(\.v\d+)?$")
    out: dict[str, str] = {}
    for z in directory.list():
        m = pat.match(z.name)
        if m is None or z.schema_id != LAYOUT.schema_id:
            continue
        live = live_table_zone(directory, int(m.group(1)))
        if live is not None and live[0].name != z.name:
            out[z.name] = f"superseded: not in use (the live table is {live[0].name}; a later migration rewrites this one)"
        else:
            out[z.name] = registry.compatibility(z.schema_id, z.version, z.layout_hash, want_version if migrates else z.version)
    return out


def reserve_table_zone(directory, worker: int, version: int, capacity: int):
    """Worker ``worker``'s zone for layout ``version`` (reserved on first use)."""
    lay = _LAYOUTS[int(version)]
    z, _ = directory.reserve_or_lookup(table_zone_name(worker, version), lay.zone_size(int(capacity)), lay)
    return z


class TableHandover:
    """This process takes worker ``worker``'s sessions over from a live table of another layout version.

    * forward (the candidate of a build writing ``version``): the destination is
      that version's zone, initialised afresh (``reuse=False``) and filled ahead of
      the swap while the old worker keeps forwarding (:meth:`copy_ahead`, then
      :meth:`poll` from the candidate's loop);
    * reverse (the parked old worker of a rollback) and start-up (a worker started
      while another version's table is live): the destination is the process's own
      zone; ``reuse=True`` keeps its content (a past image of the same sessions: only
      what changed since moves).

    :meth:`finish` runs once the live table's writer has stopped (released the
    writer role, or died); :meth:`activate`, once this process holds the worker's
    queues, makes the destination the live table. Until then nothing anyone reads
    has changed, so an abort at any point leaves the old table in charge.
    """

    def __init__(self, directory, worker: int, version: int, *, reuse: bool = False) -> None:
        live = live_table_zone(directory, worker)
        if live is None:
            raise registry.SchemaError(f"worker {worker} has no session table to migrate")
        self.worker = int(worker)
        self.src_zone, self.src_version = live
        self.dst_version = int(version)
        if self.src_version == self.dst_version:
            raise ValueError(f"worker {worker}'s live table is already at version {version}")
        cap = int(zone_views(self.src_zone.view, self.src_version)[0]["capacity"][0])
        self.dst_zone = reserve_table_zone(directory, worker, version, cap)
        create = not (reuse and self._same_lineage(cap))
        self.mig = OnlineMigration(self.src_zone.view, self.dst_zone.view, to_version=version, create=create)
        self.created = create
        self.ahead: dict = {}
        self.result: MigrationResult | None = None
        self.activated = False

    def _same_lineage(self, cap: int) -> bool:
        try:
            hdr, _ = zone_views(self.dst_zone.view, self.dst_version)
            registry.verify(hdr, _LAYOUTS[self.dst_version], what="session table")
        except (registry.SchemaError, ValueError):
            return False
        src = zone_views(self.src_zone.view, self.src_version)[0]
        return all(int(hdr[f][0]) == int(src[f][0]) for f in ("capacity", "seed", "max_probe")) and int(hdr["capacity"][0]) == cap

    @property
    def describe(self) -> str:
        return f"{self.src_zone.name} (v{self.src_version}) -> {self.dst_zone.name} (v{self.dst_version})"

    def copy_ahead(self) -> dict:
        """Full copy passes while the live table's writer runs (see :meth:`OnlineMigration.copy_ahead`)."""
        self.ahead = self.mig.copy_ahead()
        return self.ahead

    def poll(self, *, armed: bool = False) -> None:
        """From a poll loop until the swap: follow the writer's journal and keep the copy current.

        ``armed`` (the swap may come any moment): only follow the journal, so the
        claim is never late behind a copy step.
        """
        if self.result is not None:
            return
        m = self.mig
        seen = m.track()
        if armed:
            return
        if not m.covered:
            m.pass_step()
        elif seen:
            m.catch_up()  # only after new batches: a parked candidate costs next to nothing

    def finish(self, *, recover: bool = True) -> MigrationResult:
        """The swap-time delta (idempotent); NotQuiescent while the live table's writer still runs."""
        if self.result is None:
            self.result = self.mig.finish(recover=recover)
        return self.result

    def activate(self) -> None:
        """Make the destination the live table (after :meth:`finish`, holding the worker's queues)."""
        if self.result is None:
            raise RuntimeError("finish() the handover before activating its table")
        hdr = self.dst_zone.view[: HEADER.itemsize].view(HEADER)
        hdr["flags"] = activation(self.src_zone.view) + 1
        self.activated = True

    def reader(self) -> SessionTable:
        """A reader object of the destination (the pipeline's table; it takes the writer role at the swap)."""
        return table_class(self.dst_version).attach(self.dst_zone.view)

    def summary(self) -> dict:
        """Figures for progress lines and the upgrade_control record."""
        d = {"from": self.src_zone.name, "to": self.dst_zone.name, "from_version": self.src_version, "to_version": self.dst_version,
             "copied_ahead": self.mig.ahead_copied, "passes": self.mig.passes, "missed_batches": self.mig.missed}
        if self.result is not None:
            r = self.result
            d.update(mode=r.mode, delta_copied=r.copied, delta_compared=r.compared, pause_us=round(r.pause_ns / 1e3, 1),
                     sessions=r.count, recovered=r.recovered)
        return d


def worker_table(directory, worker: int, version: int, *, writer: bool) -> SessionTable | None:
    """Worker ``worker``'s session table as a process of a build writing ``version`` needs it.

    ``writer=False`` (a candidate or standby): a reader of the live table, which must
    be of ``version`` (a candidate of another version uses a :class:`TableHandover`).
    ``writer=True`` (a worker starting): the live table as writer (recovered); if the
    live table is of another version, its writer must be gone (released or dead), and
    its sessions are migrated into this version's zone first, which becomes live.
    None when the instance has no NAT tables.
    """
    live = live_table_zone(directory, worker)
    if live is None:
        return None
    zone, v = live
    if v == version:
        return table_class(v).attach(zone.view, writer=writer)
    if not writer:
        raise registry.SchemaError(f"worker {worker}'s live session table {zone.name} is version {v}, this build writes "
                                   f"version {version}: it must be migrated (a candidate does that ahead of its swap)")
    h = TableHandover(directory, worker, version, reuse=True)
    h.finish(recover=True)
    h.activate()
    return table_class(version).attach(h.dst_zone.view, writer=True, recover=False)
