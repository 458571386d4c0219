"""One burst of a worker, from receive to hand-back, done exactly once even across a crash.

The worker runs this for each direction of every pass (``secondary/worker.py``).
The order of its stores is the protocol of ``shared/burst_journal.py``: the
pipeline rewrites a private copy; the frames are staged into TX slots; the
journal is written; the TX slots are published and the journal marked; the
doorbells ring; the RX slots are handed back and the journal cleared. A
successor that takes the queues over from an owner killed anywhere in here
finishes the burst with ``burst_journal.recover``: nothing lost, nothing sent
twice, nothing processed twice.

``step`` is for tests: called with the name of each stage once it is done, it
may raise to simulate the process dying right there.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from hotplane.shared import burst_journal
from hotplane.shared.burst import Burst, Queue, rx_burst, rx_release, tx_publish, tx_stage

STAGES = ("received", "processed", "staged", "journaled", "published", "marked", "rang", "released", "cleared")


class BurstDone(NamedTuple):
    """What one burst did, for the worker's books."""

    burst: Burst
    to_other: np.ndarray  # row indices the pipeline sent to the other port
    to_same: np.ndarray  # ... back on the receiving port
    sent_other: int  # how many of to_other found a TX slot
    sent_same: int


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
    # The pipeline works on a private copy: the RX slots keep the frames as received
    # until they are handed back, so a successor can always process them again.
    frames = scratch[:n]
    width = min(int(lengths.max()), frames.shape[1])
    frames[:, :width] = b.frames[:, :width]
    to_other, to_same = process(frames, lengths, b.valid)
    if step:
        step("processed")
    if to_other.size == n:
        o_start, ko = tx_stage(otherq, frames, lengths)  # everything forwarded: no gather
    elif to_other.size:
        o_start, ko = tx_stage(otherq, frames[to_other], lengths[to_other])
    else:
        o_start, ko = 0, 0
    s_start, ks = tx_stage(rxq, frames[to_same], lengths[to_same]) if to_same.size else (0, 0)
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
    return BurstDone(b, to_other, to_same, ko, ks)
