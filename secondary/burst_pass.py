"""One burst of a worker, from receive to hand-back, done exactly once even across a crash.

The worker runs this for each direction of every pass (``secondary/worker.py``).
The order of its stores is the protocol of ``shared/burst_journal.py``: the
pipeline rewrites a copy of the burst, never the RX slots; the frames are
staged into TX slots; the journal is written; the TX slots are published and
the journal marked; the doorbells ring; the RX slots are handed back and the
journal cleared. A successor that takes the queues over from an owner killed
anywhere in here finishes the burst with ``burst_journal.recover``: nothing
lost, nothing sent twice, nothing processed twice.

Where the copy is made: a burst is normally forwarded whole to the other port,
so when the other port's TX ring has a free run for all of it (no wrap), the
frames are copied straight into those TX slots -- unpublished, so invisible to
the consumer -- and the pipeline rewrites them there: one copy per burst, as a
forwarder without the journal would make. If the pipeline then keeps some frames
back (drops, punts, hairpins, replies), the rewritten frames move to the private
copy and are staged from it (the rare case pays three copies).

``step`` is for tests: called with the name of each stage once it is done, it
may raise to simulate the process dying right there.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from hotplane.schema.port import W_TX_CURSOR
from hotplane.shared import burst_journal
from hotplane.shared.burst import Burst, Queue, rx_burst, rx_release, tx_publish, tx_stage

# The reductions themselves, without ndarray.max/any's Python-level wrappers (per burst, they show).
_max = np.maximum.reduce
_any = np.logical_or.reduce
_sum = np.add.reduce

STAGES = ("received", "processed", "staged", "journaled", "published", "marked", "rang", "released", "cleared")


class BurstDone(NamedTuple):
    """What one burst did, for the worker's books."""

    burst: Burst
    to_other: np.ndarray  # row indices the pipeline sent to the other port
    to_same: np.ndarray  # ... back on the receiving port
    sent_other: int  # how many of to_other found a TX slot
    sent_same: int
    rx_bytes: int  # bytes received, before the pipeline rewrote anything


def run_burst(
    rxq: Queue,
    otherq: Queue,
    process: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    scratch: np.ndarray,
    max_burst: int,
    step: Callable[[str], None] | None = None,
) -> BurstDone | None:
    """Receive up to ``max_burst`` frames on ``rxq``, process them, send, hand back; None when idle.

    ``process(frames, lengths, valid)`` rewrites ``frames`` (the private copy
    in ``scratch``) and returns ``(to_other, to_same)``.
    """
    b = rx_burst(rxq, max_burst)
    n = b.n
    if n == 0:
        return None
    if step:
        step("received")
    lengths = b.lengths
    rx_bytes = int(_sum(lengths))
    width = min(int(_max(lengths)), scratch.shape[1])
    # The pipeline works on a copy: the RX slots keep the frames as received until they
    # are handed back, so a successor can always process them again.
    t = otherq.tx
    o_start = int(otherq.words[W_TX_CURSOR])
    i = o_start % t.nslots
    direct = i + n <= t.nslots and width <= t.tx_capacity and not _any(t.status[i : i + n])
    frames = t.tx_data[i : i + n] if direct else scratch[:n]
    frames[:, :width] = b.frames[:, :width]
    to_other, to_same = process(frames, lengths, b.valid)
    if step:
        step("processed")
    ko = ks = s_start = 0
    if direct and to_other.size == n and int(_max(lengths)) <= t.tx_capacity:
        t.tp_len[i : i + n] = lengths  # staged where the pipeline rewrote them
        ko = n
    else:
        if direct:
            # Some frames stay back: the TX slots hold the rewritten burst out of order.
            done = min(int(_max(lengths)), scratch.shape[1], frames.shape[1])
            scratch[:n, :done] = frames[:, :done]
            frames = scratch[:n]
        if to_other.size == n:
            o_start, ko = tx_stage(otherq, frames, lengths)  # everything forwarded: no gather
        elif to_other.size:
            o_start, ko = tx_stage(otherq, frames[to_other], lengths[to_other])
        if to_same.size:
            s_start, ks = tx_stage(rxq, frames[to_same], lengths[to_same])
    if step:
        step("staged")
    burst_journal.write(rxq, b, o_start, ko, s_start, ks)
    if step:
        step("journaled")
    tx_publish(otherq, o_start, ko)
    tx_publish(rxq, s_start, ks)
    if step:
        step("published")
    burst_journal.mark_published(rxq)
    if step:
        step("marked")
    if ko and otherq.doorbell is not None:
        otherq.doorbell()
    if ks and rxq.doorbell is not None:
        rxq.doorbell()
    if step:
        step("rang")
    rx_release(rxq, b)
    if step:
        step("released")
    burst_journal.clear(rxq)
    if step:
        step("cleared")
    return BurstDone(b, to_other, to_same, ko, ks, rx_bytes)
