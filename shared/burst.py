"""The burst engine: one RX/TX path for every port type (AF_PACKET, ring, pcap).

A :class:`Queue` is an RX :class:`~hotplane.shared.frame_ring.FrameRing`, a TX
FrameRing, its record in the ``queue_state`` zone (ownership word, cursors,
queue counters) and a doorbell. The fast path is three calls per burst, with no
per-packet Python::

    b = rx_burst(q, 256)            # frames: uint8[n, frame_size-66] views on the RX slots
    ... parse / rewrite b.frames in place, pick b.valid rows ...
    tx_burst(q_out, b.frames, b.lengths)   # one 2-d slice copy into TX slots, one doorbell
    rx_release(q, b)                # status 0 on the burst's slots, then advance the cursor

Bursts never straddle the ring's wrap: ``b.frames`` is always one slice of the
ring (a view, not a copy); the next ``rx_burst`` continues at slot 0. Frames
the ring holds but that are unusable are masked out of ``b.valid`` and counted
by reason (:data:`RX_REASONS`), both in ``b.drops`` (for the caller's worker
counters) and in the queue-state record (per-queue totals that survive the
worker). TX shortfalls are counted the same way (:data:`TX_REASONS`).

``tx_space(q)`` says how many frames the TX ring takes now, for callers that
must not drop (lossless tests, capture); a worker normally just lets
``tx_burst`` count ``tx_ring_full`` as a NIC would.

Cursors are read from and written to the shared queue-state record on every
call (never cached in the process), so a worker that takes over a queue --
or takes it back after a rollback -- resumes exactly at the shared cursor.
A burst must be released by the process that received it, before the next
``rx_burst`` on that queue, or the next call returns the same frames again.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np

from hotplane.schema import registry
from hotplane.schema.port import (
    QUEUE_STATE,
    QUEUE_WORDS,
    W_LAST_POLL_NS,
    W_RX_BAD_DESCRIPTOR,
    W_RX_CURSOR,
    W_RX_FRAMES,
    W_RX_OVERSIZED,
    W_RX_RUNT,
    W_RX_TRUNCATED,
    W_TX_CURSOR,
    W_TX_FRAMES,
    W_TX_OVERSIZED,
    W_TX_RING_FULL,
)
from hotplane.shared.frame_ring import ETH_HLEN, TP_STATUS_SEND_REQUEST, FrameRing
from hotplane.shared.frame_ring import _run as _slot_run
from hotplane.shared.ordering import require_buffer

RX_REASONS = ("runt", "oversized", "truncated", "bad_descriptor")
"""Why rx_burst masks a frame out: snaplen < 14; snaplen > the slot's capacity;
snaplen < tp_len (the producer cut it); tp_mac not the ring's data offset or
snaplen > tp_len (a descriptor no sane producer writes)."""
RX_RUNT, RX_OVERSIZED, RX_TRUNCATED, RX_BAD_DESCRIPTOR = range(4)

TX_REASONS = ("tx_ring_full", "tx_oversized")
"""Why tx_burst did not queue a frame: no free TX slot; longer than a TX slot (or than the source rows)."""
TX_RING_FULL, TX_OVERSIZED = range(2)

_RX_REASON_WORDS = (W_RX_RUNT, W_RX_OVERSIZED, W_RX_TRUNCATED, W_RX_BAD_DESCRIPTOR)

_NO_DROPS = np.zeros(len(RX_REASONS), dtype=np.int64)
_NO_DROPS.flags.writeable = False
_now_ns = time.monotonic_ns


class QueueState:
    """The ``queue_state`` zone (schema id 6) of a port: one 128-byte record per queue."""

    __slots__ = ("buf", "header", "records", "words", "nqueues")

    def __init__(self, buf: np.ndarray, header: np.ndarray) -> None:
        self.buf = buf
        self.header = header
        self.nqueues = int(header["nqueues"])
        start = QUEUE_STATE.header_size
        size = QUEUE_STATE.element.itemsize * self.nqueues
        self.records = buf[start : start + size].view(QUEUE_STATE.element)
        self.words = buf[start : start + size].view("<u8").reshape(self.nqueues, QUEUE_WORDS)

    @staticmethod
    def zone_size(nqueues: int) -> int:
        """Bytes a queue-state zone for ``nqueues`` queues needs."""
        return QUEUE_STATE.zone_size(nqueues)

    @classmethod
    def create(cls, buf: np.ndarray, nqueues: int) -> "QueueState":
        """Zero ``nqueues`` records (unowned, cursors 0) and stamp the header last."""
        if nqueues < 1:
            raise ValueError(f"queue state: nqueues must be at least 1, got {nqueues}")
        need = cls.zone_size(nqueues)
        require_buffer(buf, need, what="queue state")
        buf[:need] = 0
        hdr = buf[: QUEUE_STATE.header.itemsize].view(QUEUE_STATE.header).reshape(())
        hdr["nqueues"] = nqueues
        registry.stamp(hdr, QUEUE_STATE)
        return cls(buf, hdr)

    @classmethod
    def attach(cls, buf: np.ndarray) -> "QueueState":
        """Attach to an existing queue-state zone (verifies the schema, writes nothing)."""
        require_buffer(buf, QUEUE_STATE.header_size, what="queue state")
        hdr = buf[: QUEUE_STATE.header.itemsize].view(QUEUE_STATE.header).reshape(())
        registry.verify(hdr, QUEUE_STATE, what="queue state")
        need = cls.zone_size(int(hdr["nqueues"]))
        if buf.nbytes < need:
            raise ValueError(f"queue state: header says {int(hdr['nqueues'])} queues ({need} bytes) but the buffer has {buf.nbytes}")
        return cls(buf, hdr)

    def record(self, i: int) -> np.ndarray:
        """Queue ``i``'s record as a 0-d structured view (named fields, slow path)."""
        return self.records[i : i + 1].reshape(())

    def counters(self, i: int) -> dict[str, int]:
        """Queue ``i``'s fields as a dict (for stats and tests)."""
        r = self.record(i)
        return {n: int(r[n]) for n in QUEUE_STATE.element.names if not n.startswith("_")}


class Queue:
    """One port queue as the burst engine sees it.

    ``state`` is the queue's record in a :class:`QueueState` zone: either the
    ``uint64[16]`` word view (``QueueState.words[i]``) or a structured record.
    ``doorbell`` is called once per non-empty ``tx_burst`` (AF_PACKET:
    ``send()`` with MSG_DONTWAIT); ring ports need none.
    """

    __slots__ = ("rx", "tx", "words", "doorbell", "qid", "rx_off", "_ones")

    def __init__(self, rx: FrameRing, tx: FrameRing, state: np.ndarray, doorbell: Callable[[], object] | None = None, qid: int = 0) -> None:
        if state.dtype == QUEUE_STATE.element:
            state = state.reshape(1).view("<u8")
        if state.dtype != np.dtype("<u8") or state.shape != (QUEUE_WORDS,):
            raise ValueError(f"queue: state must be a queue_state record or its {QUEUE_WORDS} u64 words, got {state.dtype} {state.shape}")
        self.rx = rx
        self.tx = tx
        self.words = state
        self.doorbell = doorbell
        self.qid = qid
        self.rx_off = rx.rx_data_offset
        # Read-only all-true mask: the `valid` of every clean burst is a slice of it.
        self._ones = np.ones(rx.nslots, dtype=bool)
        self._ones.flags.writeable = False

    @property
    def rx_cursor(self) -> int:
        return int(self.words[W_RX_CURSOR])

    @property
    def tx_cursor(self) -> int:
        return int(self.words[W_TX_CURSOR])

    def __repr__(self) -> str:
        return f"Queue({self.qid}, rx={self.rx!r}, tx={self.tx!r}, rx_cursor={self.rx_cursor}, tx_cursor={self.tx_cursor})"


class Burst:
    """Frames received in one ``rx_burst``: views on the RX slots until released.

    * ``frames``: ``uint8[n, frame_size - rx_off]`` view of the slots (one slice);
      frame ``j`` is ``frames[j, :lengths[j]]``. Writable, but a worker leaves
      them as received and rewrites a private copy (``secondary/burst_pass.py``),
      so a successor can process a dead owner's unreleased burst again.
    * ``lengths``: ``uint32[n]`` copy of ``tp_snaplen`` (a copy so a misbehaving
      producer cannot change a length after it was checked).
    * ``valid``: ``bool[n]``, False for frames masked out (see :data:`RX_REASONS`);
      ``all_valid`` says whether every frame is valid (then ``valid`` is read-only).
    * ``drops``: ``int64[4]`` counts per :data:`RX_REASONS` (read-only zeros when clean).
    * ``start``: first slot index; ``cursor``: the free-running RX cursor of ``start``.
    """

    __slots__ = ("frames", "lengths", "valid", "all_valid", "drops", "n", "start", "cursor")

    def __init__(self, frames, lengths, valid, all_valid, drops, n, start, cursor) -> None:
        self.frames = frames
        self.lengths = lengths
        self.valid = valid
        self.all_valid = all_valid
        self.drops = drops
        self.n = n
        self.start = start
        self.cursor = cursor

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Burst(n={self.n}, start={self.start}, cursor={self.cursor}, all_valid={self.all_valid})"


_NO_LENGTHS = np.zeros(0, np.uint32)
_NO_LENGTHS.flags.writeable = False


def _empty_burst(q: Queue, i: int, cur: int) -> Burst:
    # An idle poll (most polls of a quiet queue) allocates nothing.
    return Burst(q.rx.rx_data[i:i], _NO_LENGTHS, q._ones[:0], True, _NO_DROPS, 0, i, cur)


def rx_burst(q: Queue, max_n: int = 256) -> Burst:
    """Receive up to ``max_n`` frames from ``q``'s RX ring, stopping at the ring's wrap.

    Returns the ready frames that follow the shared RX cursor, as views. The
    frames are checked (runt, oversized, truncated, bad descriptor): unusable
    ones are cleared in ``valid``, counted in ``drops`` and in the queue-state
    counters, and still released by :func:`rx_release` with the rest.
    """
    r = q.rx
    w = q.words
    cur = int(w[W_RX_CURSOR])
    ns = r.nslots
    i = cur % ns
    w[W_LAST_POLL_NS] = _now_ns()
    status = r.status
    if max_n <= 0 or not (status[i] & 1):
        return _empty_burst(q, i, cur)
    end = i + max_n
    if end > ns:
        end = ns
    # First slot without bit 0 ends the burst (a kernel may publish out of order).
    ready = status[i:end] & 1
    p = int(ready.argmin())
    n = (end - i) if ready[p] else p
    j = i + n
    lengths = r.snaplen[i:j].copy()
    tplen = r.tp_len[i:j]
    cap = r.rx_capacity
    # One unsigned subtraction checks runt and oversized together (a runt wraps around).
    bad = (lengths - ETH_HLEN) > (cap - ETH_HLEN)
    bad |= lengths != tplen
    bad |= r.tp_mac[i:j] != q.rx_off
    if not bad.any():
        return Burst(r.rx_data[i:j], lengths, q._ones[:n], True, _NO_DROPS, n, i, cur)
    return _classify(q, r.rx_data[i:j], lengths, tplen, r.tp_mac[i:j], n, i, cur)


def _classify(q: Queue, frames, lengths, tplen, mac, n, i, cur) -> Burst:
    """Slow part of rx_burst: some frame is bad; say which and why."""
    cap = q.rx.rx_capacity
    runt = lengths < ETH_HLEN
    over = ~runt & (lengths > cap)
    trunc = ~runt & ~over & (lengths < tplen)
    bad_desc = ~(runt | over | trunc) & ((mac != q.rx_off) | (lengths > tplen))
    valid = ~(runt | over | trunc | bad_desc)
    drops = np.array([runt.sum(), over.sum(), trunc.sum(), bad_desc.sum()], dtype=np.int64)
    w = q.words
    for word, c in zip(_RX_REASON_WORDS, drops.tolist()):
        if c:
            w[word] += c
    return Burst(frames, lengths, valid, False, drops, n, i, cur)


def rx_release(q: Queue, burst: Burst) -> None:
    """Hand a burst's slots back to the producer (status 0, one vectorized store), then advance the cursor.

    Raises RuntimeError if the queue's cursor is no longer at the burst (a
    double release, or another process polled the queue meanwhile).
    """
    n = burst.n
    if n == 0:
        return
    w = q.words
    if int(w[W_RX_CURSOR]) != burst.cursor:
        raise RuntimeError(
            f"rx_release: queue {q.qid} RX cursor is {int(w[W_RX_CURSOR])}, not the burst's {burst.cursor}: "
            "the burst was already released or another process polls this queue"
        )
    status = q.rx.status
    s = burst.start
    # The burst's first slot is handed back last: a producer fills in order, so it cannot
    # refill any of the burst's slots before that one, and a successor repairing a release
    # cut short (shared/burst_journal.py) can tell from that slot alone what was refilled.
    status[s + 1 : s + n] = 0
    status[s] = 0
    w[W_RX_CURSOR] = burst.cursor + n
    w[W_RX_FRAMES] += n


def tx_burst(q: Queue, frames2d: np.ndarray, lengths: np.ndarray, drops: np.ndarray | None = None) -> int:
    """Queue frames on ``q``'s TX ring with one doorbell; returns how many were queued.

    Frame ``j`` is ``frames2d[j, :lengths[j]]``. Frames go, in order, into the
    free slots that follow the shared TX cursor (one 2-d slice copy of
    ``max(lengths)`` columns per contiguous run of slots, then ``tp_len``, then
    status SEND_REQUEST). What does not fit is dropped from the tail and
    counted as ``tx_ring_full``; frames longer than a TX slot as
    ``tx_oversized`` -- in the queue-state record and, if given, added to
    ``drops[TX_RING_FULL]`` / ``drops[TX_OVERSIZED]``. The doorbell rings once
    whenever there was something to send (also when the ring was full, so a
    kernel TX ring keeps draining).

    This is :func:`tx_stage` then :func:`tx_publish`; a worker calls the two
    itself, with its burst journal written between them.
    """
    start, k = tx_stage(q, frames2d, lengths, drops)
    tx_publish(q, start, k)
    if q.doorbell is not None and lengths.shape[0]:
        q.doorbell()
    return k


def tx_stage(q: Queue, frames2d: np.ndarray, lengths: np.ndarray, drops: np.ndarray | None = None) -> tuple[int, int]:
    """Write frames into the free TX slots that follow the cursor, without publishing them.

    Returns ``(start, k)``: the TX cursor of the first slot and how many frames
    were written (data and ``tp_len``; status and cursor untouched). Shortfalls
    are counted as :func:`tx_burst` describes. Nothing a consumer can see
    changes until :func:`tx_publish`.
    """
    n = int(lengths.shape[0])
    w = q.words
    cur = int(w[W_TX_CURSOR])
    if n == 0:
        return cur, 0
    t = q.tx
    maxlen = int(lengths.max())
    limit = t.tx_capacity if t.tx_capacity < frames2d.shape[1] else frames2d.shape[1]
    if maxlen > limit:
        keep = np.flatnonzero(lengths <= limit)
        over = n - keep.size
        w[W_TX_OVERSIZED] += over
        if drops is not None:
            drops[TX_OVERSIZED] += over
        frames2d = frames2d[keep]
        lengths = lengths[keep]
        n = keep.size
        if n == 0:
            return cur, 0
        maxlen = int(lengths.max())
    ns = t.nslots
    i = cur % ns
    status = t.status
    # Free run from the cursor, at most n slots, across the wrap at most once.
    k1 = ns - i if ns - i < n else n
    stop = np.flatnonzero(status[i : i + k1])
    if stop.size:
        k = k1 = int(stop[0])
    elif k1 < n:
        k2 = n - k1 if n - k1 < i else i
        stop = np.flatnonzero(status[:k2])
        k = k1 + (k2 if stop.size == 0 else int(stop[0]))
    else:
        k = k1
    if k1:
        t.tx_data[i : i + k1, :maxlen] = frames2d[:k1, :maxlen]
        t.tp_len[i : i + k1] = lengths[:k1]
    if k > k1:
        k2 = k - k1
        t.tx_data[:k2, :maxlen] = frames2d[k1:k, :maxlen]
        t.tp_len[:k2] = lengths[k1:k]
    if k < n:
        w[W_TX_RING_FULL] += n - k
        if drops is not None:
            drops[TX_RING_FULL] += n - k
    return cur, k


def tx_publish(q: Queue, start: int, k: int) -> None:
    """Publish ``k`` staged TX slots from cursor ``start`` (status SEND_REQUEST), then move the cursor."""
    if k <= 0:
        return
    t = q.tx
    ns = t.nslots
    i = start % ns
    status = t.status
    k1 = ns - i if ns - i < k else k
    status[i : i + k1] = TP_STATUS_SEND_REQUEST
    if k > k1:
        status[: k - k1] = TP_STATUS_SEND_REQUEST
    w = q.words
    w[W_TX_CURSOR] = start + k
    w[W_TX_FRAMES] += k


def tx_space(q: Queue, max_n: int | None = None) -> int:
    """Free TX slots that follow the TX cursor (at most ``max_n``): what ``tx_burst`` would take now.

    A worker that must not drop (a lossless test, a pcap capture) polls at most this many frames.
    """
    t = q.tx
    n = t.nslots if max_n is None else min(int(max_n), t.nslots)
    return _slot_run(t.status, int(q.words[W_TX_CURSOR]) % t.nslots, n, t.nslots, ready=False)


class Forwarded(NamedTuple):
    """What one :func:`forward_burst` did: received = invalid + filtered + sent + tx_dropped."""

    received: int
    invalid: int
    filtered: int
    sent: int

    @property
    def tx_dropped(self) -> int:
        return self.received - self.invalid - self.filtered - self.sent


_NOTHING = Forwarded(0, 0, 0, 0)


def forward_burst(
    rxq: Queue,
    txq: Queue,
    max_n: int = 256,
    fn: Callable[[Burst], "np.ndarray | None"] | None = None,
    tx_drops: np.ndarray | None = None,
) -> Forwarded:
    """Run one burst to completion: receive from ``rxq``, optionally transform, send on ``txq``, release.

    ``fn(burst)`` may rewrite ``burst.frames`` in place (the worker owns the RX
    slots until the release) and returns None (send every valid frame) or a
    boolean mask of frames to send. RX ring to TX ring is the one copy (zero
    copy is impossible between two rings); with a partial mask the selected
    rows are gathered first (a second copy, only then).
    """
    b = rx_burst(rxq, max_n)
    if b.n == 0:
        return _NOTHING
    mask = fn(b) if fn is not None else None
    invalid = int(b.n - np.count_nonzero(b.valid)) if not b.all_valid else 0
    if mask is None and b.all_valid:
        sent = tx_burst(txq, b.frames, b.lengths, tx_drops)
        filtered = 0
    else:
        sel = b.valid if mask is None else (b.valid & mask)
        idx = np.flatnonzero(sel)
        filtered = b.n - invalid - idx.size
        sent = tx_burst(txq, b.frames[idx], b.lengths[idx], tx_drops) if idx.size else 0
    rx_release(rxq, b)
    return Forwarded(b.n, invalid, filtered, sent)


#: How far takeover repair looks past a cursor: one burst is the most a dead
#: owner can have published without moving its cursor.
RECONCILE_WINDOW = 512


def reconcile(q: Queue) -> dict[str, int]:
    """Repair a queue's cursors after its previous owner died without releasing it.

    Each burst publishes slot statuses first and the cursor second, so an owner
    SIGKILLed between the two leaves the cursor behind what the ring shows:
    RX slots it already handed back (status 0) while later slots hold new
    frames (ring ports only: see below), or TX slots it filled (SEND_REQUEST)
    beyond its cursor. A
    successor starting at the stale cursor would wait a whole lap for the
    producer (reordering) or overwrite the peer's view (loss). Returns how
    far each cursor moved.
    """
    from hotplane.schema.port import PEER_CURSOR

    moved = {"rx": 0, "tx": 0}
    w = q.words
    r = q.rx
    ns = r.nslots
    cur = int(w[W_RX_CURSOR])
    status = r.status
    if r._peer is not None:
        # Ring port: the producer's cursor says exactly what should be waiting, so empty
        # slots at the cursor below it were handed back by a release the owner did not finish.
        # (A worker's releases are journaled and finished by burst_journal.recover first; this
        # covers any other consumer.) A kernel ring gives no such bound -- an empty slot at the
        # cursor is where the kernel writes next -- so it is left alone.
        limit = min(int(r._peer[PEER_CURSOR]) - cur, ns)
        k = 0
        while k < limit and status[(cur + k) % ns] == 0:
            k += 1
        if 0 < k < limit:
            w[W_RX_CURSOR] = cur + k
            moved["rx"] = k
    t = q.tx
    if t._peer is not None:
        tcur = int(w[W_TX_CURSOR])
        pending = tcur - int(t._peer[PEER_CURSOR])
        k = 0
        while pending + k < t.nslots and k < RECONCILE_WINDOW and t.status[(tcur + k) % t.nslots] != 0:
            k += 1
        if k:
            w[W_TX_CURSOR] = tcur + k
            moved["tx"] = k
    # A kernel TX ring is left as it is: the kernel sends those slots and clears
    # them; the window for this is a few stores wide and documented in CONTRACTS.
    return moved
