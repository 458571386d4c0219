"""Per-worker counter blocks in shared memory: one writer per block, readers sum.

Layout: :mod:`hotplane.schema.counters`. A worker takes the writer view of its
own slot with ``blocks.block(i)`` and adds a whole burst's counts at once::

    blk = CounterBlocks.attach(zone).block(worker_index)
    blk.start(version="0.1.0", generation=gen)
    ...per burst...
    blk.count_rx(n, int(lengths[:n].sum()))
    blk.count_forwarded(n_fwd)
    blk.count_drops(reasons[:n_drop])      # one bincount per burst
    blk.beat()

Counters live in shared memory, so they survive the worker (a restarted
worker re-attaches and keeps counting) and are read without locks by the
stats process. Each counter is one aligned u64 that only grows, so a reader
sees every word whole; a reader may see a burst half-applied across fields,
which is why :meth:`CounterBlocks.accounting_gap` is exact only between bursts.
"""

from __future__ import annotations

import time
from enum import IntEnum

import numpy as np

from hotplane.schema import registry
from hotplane.schema.counters import (
    COUNTER_BLOCK,
    DROP_REASONS,
    N_REASONS,
    SCALAR_COUNTERS,
    VERSION_LEN,
    WORKER_COUNTERS,
)
from hotplane.shared.ordering import require_buffer, require_tso

_M64 = 0xFFFF_FFFF_FFFF_FFFF

DropReason = IntEnum("DropReason", {name.upper(): i for i, name in enumerate(DROP_REASONS)})
DropReason.__doc__ = "Index of each drop reason in a block's ``dropped`` array."

REASON_NAMES: tuple[str, ...] = tuple(DROP_REASONS) + tuple(f"reason_{i}" for i in range(len(DROP_REASONS), N_REASONS))
_OTHER = DropReason.OTHER

# Word index (u64) of each scalar counter in a block.
_RX_PACKETS, _RX_BYTES, _TX_PACKETS, _TX_BYTES, _FORWARDED, _PUNTED = range(len(SCALAR_COUNTERS))
_HEARTBEAT = COUNTER_BLOCK.fields["heartbeat_ns"][1] // 8
_GENERATION = COUNTER_BLOCK.fields["generation"][1] // 8
_RESTARTS = COUNTER_BLOCK.fields["restarts"][1] // 8


def _scalar(name: str, doc: str) -> property:
    def get(self: "CounterBlock") -> np.ndarray:
        return self._fields[name]

    def set(self: "CounterBlock", value) -> None:
        view = self._fields[name]
        if value is not view:  # ``blk.x += n`` already updated the view in place
            view[...] = value

    return property(get, set, doc=doc)


class CounterBlock:
    """One worker's block. Fields are 0-d/1-d numpy views on shared memory.

    Only the block's worker may write it. ``blk.rx_packets += n`` works (in
    place); the ``count_*`` methods are the fast spelling of the same thing.
    """

    __slots__ = ("index", "_words", "_fields", "dropped", "_rec")

    def __init__(self, blocks: np.ndarray, index: int) -> None:
        self.index = index
        rec = blocks[index : index + 1]
        self._rec = rec
        # All u64 words of the block (the version bytes included): plain loads/stores by index.
        self._words = rec.view(np.uint8).view("<u8")
        self._fields = {n: rec[n].reshape(()) for n in (*SCALAR_COUNTERS, "heartbeat_ns", "generation", "restarts")}
        self.dropped: np.ndarray = rec["dropped"][0]  # (N_REASONS,) u64 view

    rx_packets = _scalar("rx_packets", "Packets received (every packet taken from an RX queue).")
    rx_bytes = _scalar("rx_bytes", "Bytes received.")
    tx_packets = _scalar("tx_packets", "Packets handed to a TX queue.")
    tx_bytes = _scalar("tx_bytes", "Bytes handed to a TX queue.")
    forwarded = _scalar("forwarded", "Received packets forwarded by the fast path.")
    punted = _scalar("punted", "Received packets handed to the slow path.")
    heartbeat_ns = _scalar("heartbeat_ns", "CLOCK_MONOTONIC ns of the worker's last beat (0: never started).")
    generation = _scalar("generation", "Generation of the worker now writing this block.")
    restarts = _scalar("restarts", "How many times a worker (re)started in this slot after the first.")

    # ---- hot path: one call per burst ------------------------------------------------

    def _add(self, word: int, n: int) -> None:
        w = self._words
        w[word] = (w.item(word) + n) & _M64  # single writer: a plain load + store is enough

    def count_rx(self, packets: int, nbytes: int) -> None:
        """Add a burst's received packets and bytes."""
        w = self._words
        w[_RX_PACKETS] = (w.item(_RX_PACKETS) + packets) & _M64
        w[_RX_BYTES] = (w.item(_RX_BYTES) + nbytes) & _M64

    def count_tx(self, packets: int, nbytes: int) -> None:
        """Add a burst's transmitted packets and bytes."""
        w = self._words
        w[_TX_PACKETS] = (w.item(_TX_PACKETS) + packets) & _M64
        w[_TX_BYTES] = (w.item(_TX_BYTES) + nbytes) & _M64

    def count_burst(self, delta: np.ndarray) -> None:
        """Add one burst's figures at once: ``delta`` is ``uint64[6]`` in :data:`SCALAR_COUNTERS`
        order (rx packets, rx bytes, tx packets, tx bytes, forwarded, punted); one vectorized
        add (wrapping modulo 2**64) instead of a load and a store per figure."""
        w = self._words[: len(SCALAR_COUNTERS)]
        np.add(w, delta, out=w)

    def count_forwarded(self, n: int) -> None:
        """Add packets forwarded by the fast path."""
        self._add(_FORWARDED, n)

    def count_punted(self, n: int) -> None:
        """Add packets handed to the slow path."""
        self._add(_PUNTED, n)

    def count_drop(self, reason: int, n: int = 1) -> None:
        """Add ``n`` drops of one reason (slow path / single packet)."""
        r = int(reason)
        if not 0 <= r < N_REASONS:
            r = _OTHER
        d = self.dropped
        d[r] = (d.item(r) + n) & _M64

    def count_drops(self, reasons: np.ndarray) -> None:
        """Add one drop per element of ``reasons`` (non-negative integer reason codes), vectorized.

        One ``bincount`` per burst; ``reasons`` is typically a ``uint8`` array
        (any integer type numpy can safely cast to intp). Codes beyond the
        reason table are counted as ``other`` rather than lost.
        """
        if len(reasons) == 0:
            return
        c = np.bincount(reasons, minlength=N_REASONS)
        if len(c) > N_REASONS:
            c[_OTHER] += c[N_REASONS:].sum()
            c = c[:N_REASONS]
        d = self.dropped
        np.add(d, c.view(np.uint64), out=d)  # bincount counts are >= 0: same bits as u64

    def add_drop_counts(self, counts: np.ndarray) -> None:
        """Add a per-reason count vector (length ``N_REASONS``, non-negative) gathered elsewhere."""
        c = np.asarray(counts)
        if c.shape != (N_REASONS,) or c.dtype.kind not in "ui" or (c.dtype.kind == "i" and c.min() < 0):
            raise ValueError(f"drop counts must be {N_REASONS} non-negative integers, got {c.dtype} {c.shape}")
        d = self.dropped
        np.add(d, c.astype(np.uint64, copy=False), out=d)

    def beat(self, now_ns: int | None = None) -> None:
        """Record that the worker is alive (CLOCK_MONOTONIC ns)."""
        self._words[_HEARTBEAT] = time.monotonic_ns() if now_ns is None else now_ns

    # ---- slow path ---------------------------------------------------------------------

    def start(self, version: str, generation: int, *, count_restart: bool = True) -> None:
        """Claim the block as its (new) writer: set version and generation, beat.

        Counters are kept: a restarted worker continues the totals of its slot.
        If the slot was used before (it has a heartbeat) and ``count_restart``
        is true, ``restarts`` grows by one.
        """
        raw = version.encode("utf-8")
        if len(raw) > VERSION_LEN:
            raise ValueError(f"version string {version!r} is longer than {VERSION_LEN} bytes")
        if count_restart and self._words.item(_HEARTBEAT) != 0:
            self._add(_RESTARTS, 1)
        self._rec["version"] = raw
        self._words[_GENERATION] = generation
        self.beat()

    @property
    def version(self) -> str:
        """The version string of the worker that last started in this slot ('' if none)."""
        return bytes(self._rec["version"][0]).decode("utf-8", "replace")

    def accounting_gap(self) -> int:
        """rx_packets - (forwarded + punted + dropped): 0 whenever the writer is between bursts."""
        return _gap(self._rec.copy()[0])

    def as_dict(self) -> dict:
        """This block's counters as plain Python values."""
        return _record_dict(self._rec.copy())


class CounterBlocks:
    """A worker_counters zone: ``n_workers`` blocks, one per worker slot."""

    __slots__ = ("buf", "n_workers", "blocks")

    def __init__(self, buf: np.ndarray, n_workers: int) -> None:
        self.buf = buf
        self.n_workers = n_workers
        start = WORKER_COUNTERS.header_size
        self.blocks = buf[start : start + n_workers * COUNTER_BLOCK.itemsize].view(COUNTER_BLOCK)

    @staticmethod
    def zone_size(n_workers: int) -> int:
        """Bytes a zone of ``n_workers`` blocks needs."""
        return WORKER_COUNTERS.zone_size(_check_n(n_workers))

    @classmethod
    def create(cls, buf: np.ndarray, n_workers: int) -> "CounterBlocks":
        """Zero ``n_workers`` blocks in ``buf`` and stamp the header."""
        require_tso()
        n = _check_n(n_workers)
        require_buffer(buf, WORKER_COUNTERS.zone_size(n), what="worker_counters create")
        buf[: WORKER_COUNTERS.zone_size(n)] = 0
        h = buf[: WORKER_COUNTERS.header_size].view(WORKER_COUNTERS.header)
        h["n_workers"] = n
        h["n_reasons"] = N_REASONS
        h["block_size"] = COUNTER_BLOCK.itemsize
        registry.stamp(h, WORKER_COUNTERS)  # identity last
        return cls(buf, n)

    @classmethod
    def attach(cls, buf: np.ndarray) -> "CounterBlocks":
        """Open an existing zone (no writes); SchemaError if it is not one this build understands."""
        require_tso()
        require_buffer(buf, WORKER_COUNTERS.header_size, what="worker_counters attach")
        h = buf[: WORKER_COUNTERS.header_size].view(WORKER_COUNTERS.header)[0]
        registry.verify(h, WORKER_COUNTERS, what="worker_counters")
        n, r, bs = int(h["n_workers"]), int(h["n_reasons"]), int(h["block_size"])
        if r != N_REASONS or bs != COUNTER_BLOCK.itemsize or n < 1:
            raise registry.SchemaError(f"worker_counters: corrupt header: n_workers {n}, n_reasons {r}, block_size {bs}")
        require_buffer(buf, WORKER_COUNTERS.zone_size(n), what="worker_counters attach")
        return cls(buf, n)

    def block(self, i: int) -> CounterBlock:
        """The view on worker slot ``i`` (its writer's handle; readers may use it too)."""
        if not 0 <= i < self.n_workers:
            raise IndexError(f"worker slot {i} out of range 0..{self.n_workers - 1}")
        return CounterBlock(self.blocks, i)

    def snapshot(self) -> np.ndarray:
        """A private copy of every block (a structured array of ``n_workers`` records)."""
        return self.blocks.copy()

    def heartbeats(self) -> np.ndarray:
        """Each slot's last heartbeat (CLOCK_MONOTONIC ns, 0 = never started), as a copy."""
        return self.blocks["heartbeat_ns"].copy()

    def totals(self, snapshot: np.ndarray | None = None) -> dict:
        """Counters summed over all blocks, as plain Python ints (from one snapshot)."""
        return _record_dict(self.snapshot() if snapshot is None else snapshot)

    def accounting_gap(self, i: int | None = None) -> int:
        """rx - (forwarded + punted + dropped) of block ``i``, or over all blocks when ``i`` is None."""
        snap = self.snapshot()
        if i is not None:
            return _gap(snap[i])
        return sum(_gap(rec) for rec in snap)


def _check_n(n_workers: int) -> int:
    n = int(n_workers)
    if not 1 <= n <= 65535:
        raise ValueError(f"n_workers must be between 1 and 65535, got {n_workers}")
    return n


def _gap(rec: np.void) -> int:
    return int(rec["rx_packets"]) - (int(rec["forwarded"]) + int(rec["punted"]) + sum(int(x) for x in rec["dropped"]))


def _record_dict(recs: np.ndarray) -> dict:
    """Sum a (copied) array of blocks into a dict: counters, per-reason drops, restarts, gap."""
    out: dict = {name: int(recs[name].sum(dtype=np.uint64)) for name in SCALAR_COUNTERS}
    per_reason = recs["dropped"].sum(axis=0, dtype=np.uint64)
    dropped = {}
    for i, name in enumerate(REASON_NAMES):
        v = int(per_reason[i])
        if i < len(DROP_REASONS) or v:  # reserved slots only when something used them
            dropped[name] = v
    out["dropped"] = dropped
    out["dropped_total"] = sum(int(v) for v in per_reason)
    out["restarts"] = int(recs["restarts"].sum(dtype=np.uint64))
    out["accounting_gap"] = sum(_gap(rec) for rec in recs)
    if len(recs) == 1:
        out["heartbeat_ns"] = int(recs["heartbeat_ns"][0])
        out["generation"] = int(recs["generation"][0])
        out["version"] = bytes(recs["version"][0]).decode("utf-8", "replace")
    return out
