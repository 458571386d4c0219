"""The burst journal: a write-ahead record that lets a successor finish a dead worker's burst exactly once.

A worker's burst goes: receive from an RX queue; process a private copy
(the RX slots are never written, so a burst can always be processed again
from them); stage the frames into the TX slots of the other port's queue
and of the same queue (hairpins, replies); publish those slots; hand the RX
slots back. A worker SIGKILLed anywhere in there leaves a burst half done.
Without a record its successor must choose between processing the RX frames
again (duplicates, if some were already published) and skipping them (loss,
if none were). The journal removes the choice:

1. after staging (all TX data and lengths written, nothing published) the
   worker writes the record -- the RX cursor, the TX cursors it staged at and
   the counts -- with its state word last: ``WRITTEN``;
2. it publishes the TX slots, then stores ``PUBLISHED``;
3. it rings the doorbells and releases the RX slots, then clears the record.

A successor taking the queue over from a dead owner calls :func:`recover`:

* no record: the owner died before step 1; its RX slots are untouched and
  hold the original frames: the successor simply processes them again.
* ``WRITTEN``: every staged slot holds its final data. Publish each one that
  is not published yet and not already consumed (a ring peer's cursor says
  what it consumed; a kernel TX ring consumes nothing before its doorbell,
  which comes after step 2), then release the RX burst.
* ``PUBLISHED``: every staged slot was published (and maybe sent); release
  the RX burst if its release did not complete.

Releasing RX slots after a release cut short must not clear a slot the
producer already refilled. ``rx_release`` hands the burst's first slot back
last; a producer fills in order, so it cannot refill any slot of the burst
before that one. A ring port's producer cursor says exactly what it wrote; for
a kernel ring the first slot's ``tp_nsec``, recorded in the journal, tells
whether the frame there is still the burst's.

The record lives in the RX queue's ``queue_state`` words (schema/port.py),
written only by the queue's owner (inside its pass, DESIGN invariant 1).
Word ``W_JOURNAL``: bits 0-1 state, 2-11 frames in the burst, 12-21 frames
staged on the other port, 22-31 on the same port, 32-63 the fingerprint.
"""

from __future__ import annotations

import numpy as np

from hotplane.schema.port import PEER_CURSOR, W_JOURNAL, W_JOURNAL_RX, W_JOURNAL_TX, W_RX_CURSOR, W_RX_FRAMES, W_TX_CURSOR, W_TX_FRAMES
from hotplane.shared.frame_ring import TP_STATUS_SEND_REQUEST

NONE, WRITTEN, PUBLISHED = 0, 1, 2
_STATE = 0x3
_M10 = 0x3FF
_M32 = 0xFFFF_FFFF
MAX_BURST = _M10  # the counts are 10-bit fields


def write(rxq, burst, other_start: int, k_other: int, same_start: int, k_same: int) -> None:
    """Step 1: record the burst and what was staged for it (state word last, which makes it valid)."""
    n = burst.n
    if not (0 < n <= MAX_BURST and 0 <= k_other <= n and 0 <= k_same <= n):
        raise ValueError(f"burst journal: {n} frames, {k_other} + {k_same} staged do not fit the record")
    w = rxq.words
    fingerprint = int(rxq.rx.tp_nsec[burst.start]) & _M32
    w[W_JOURNAL_RX] = burst.cursor
    w[W_JOURNAL_TX] = (other_start & _M32) | ((same_start & _M32) << 32)
    w[W_JOURNAL] = WRITTEN | (n << 2) | (k_other << 12) | (k_same << 22) | (fingerprint << 32)


def mark_published(rxq) -> None:
    """Step 2 done: every staged TX slot is published."""
    w = rxq.words
    w[W_JOURNAL] = (int(w[W_JOURNAL]) & ~_STATE) | PUBLISHED


def clear(rxq) -> None:
    """Step 3 done: the RX burst is handed back; nothing is in flight."""
    rxq.words[W_JOURNAL] = 0


def pending(rxq) -> int:
    """The journal's state (NONE, WRITTEN or PUBLISHED)."""
    return int(rxq.words[W_JOURNAL]) & _STATE


def _unpack(word: int) -> tuple[int, int, int, int, int]:
    return word & _STATE, (word >> 2) & _M10, (word >> 12) & _M10, (word >> 22) & _M10, word >> 32


def _full_cursor(current: int, low32: int) -> int:
    """The free-running cursor whose low 32 bits are ``low32``, at or before ``current``."""
    return current - ((current - low32) & _M32)


def _finish_tx(q, start_low: int, k: int, publish: bool) -> int:
    """Publish the staged slots not yet published or consumed (``publish``), and move the TX cursor past them."""
    if k == 0:
        return 0
    w = q.words
    cur = int(w[W_TX_CURSOR])
    start = _full_cursor(cur, start_low)
    published = 0
    if publish:
        t = q.tx
        ns = t.nslots
        consumed_to = int(t._peer[PEER_CURSOR]) if t._peer is not None else start
        first = max(start, consumed_to)
        if first < start + k:
            slots = np.arange(first, start + k) % ns
            todo = slots[t.status[slots] == 0]
            t.status[todo] = TP_STATUS_SEND_REQUEST
            published = int(todo.size)
    if cur < start + k:
        w[W_TX_CURSOR] = start + k
        w[W_TX_FRAMES] += start + k - cur
    return published


def _finish_rx(q, cursor: int, n: int, fingerprint: int) -> int:
    """Complete the RX release of the journaled burst if it did not complete; returns slots handed back."""
    w = q.words
    if int(w[W_RX_CURSOR]) != cursor:
        return 0  # the cursor moved last in rx_release: the release completed
    r = q.rx
    ns = r.nslots
    s = cursor % ns
    status = r.status
    handed = 0
    if r._peer is not None:
        # The producer's cursor says exactly which slots it refilled (one lap later).
        produced = int(r._peer[PEER_CURSOR])
        idx = np.arange(s, s + n)
        stale = idx[(cursor + (idx - s) + ns >= produced) & ((status[idx] & 1) != 0)]
        stale_rest = stale[stale != s]
        status[stale_rest] = 0
        if stale.size and stale[0] == s:
            status[s] = 0
        handed = int(stale.size)
    elif (status[s] & 1) and (int(r.tp_nsec[s]) & _M32) == fingerprint:
        # The first slot, handed back last, still holds the burst's frame: the producer cannot
        # have refilled any slot of the burst; hand back those still marked, first slot last.
        rest = np.arange(s + 1, s + n)
        rest = rest[(status[rest] & 1) != 0]
        status[rest] = 0
        status[s] = 0
        handed = int(rest.size) + 1
    # else: the first slot was handed back (and maybe refilled): so were all the others.
    w[W_RX_CURSOR] = cursor + n
    w[W_RX_FRAMES] += n
    return handed


def recover(rxq, otherq) -> dict[str, int]:
    """Finish the burst a dead owner of ``rxq`` journaled (``otherq``: its other port's queue).

    Call as the queues' new owner (both claimed, inside a pass), before
    polling. Returns what it did: ``state`` found, TX slots it published,
    RX frames of the burst released without being processed again.
    """
    word = int(rxq.words[W_JOURNAL])
    state, n, k_other, k_same, fingerprint = _unpack(word)
    if state == NONE:
        return {"state": NONE, "tx_published": 0, "rx_released": 0}
    tx = int(rxq.words[W_JOURNAL_TX])
    cursor = int(rxq.words[W_JOURNAL_RX])
    publish = state == WRITTEN
    done = _finish_tx(otherq, tx & _M32, k_other, publish) + _finish_tx(rxq, tx >> 32, k_same, publish)
    _finish_rx(rxq, cursor, n, fingerprint)
    clear(rxq)
    return {"state": state, "tx_published": done, "rx_released": n}
