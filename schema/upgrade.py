"""Layout of the hot-upgrade handover record (schema id 10, ``upgrade_control``, version 1).

One zone per instance, written during a drain-and-swap so that the swap gap
is measured where it happens (in the two data-path processes, with
``time.monotonic_ns()``, CLOCK_MONOTONIC, comparable across processes) and
survives a supervisor restart::

    header   schema_id u4 | version u4 | layout_hash u8
             | upgrade_seq u8 (bumped when an upgrade starts) | nqueues u4 | phase u4 | pad
    element  one 64-byte record per queue (index = the queue-state index the
             shell assigns, e.g. port * nq + queue):

====== ===== ==================================================================
offset type  field (writer)
====== ===== ==================================================================
0      u8    requested_ns    supervisor's swap order left (supervisor)
8      u8    old_last_burst_ns  old owner finished its last burst (old owner)
16     u8    released_ns     old owner released the ownership word (old owner)
24     u8    claimed_ns      new owner's claim landed (new owner)
32     u8    new_first_burst_ns  new owner finished its first burst (new owner)
40     u8    old_token       ownership word the old owner released
48     u8    new_token       ownership word the new owner wrote
56     u4    delta_entries   session entries copied in the swap pause (new owner)
60     u4    delta_us        the swap-pause delta copy, microseconds (new owner)
====== ===== ==================================================================

Each field has exactly one writer (named above), so no locking: a reader
(stats, ``supervisorctl upgrade status``, the bench) sees each word old or new.
The swap gap of a queue is ``new_first_burst_ns - old_last_burst_ns``.
"""

from __future__ import annotations

import numpy as np

from hotplane.schema import registry

SCHEMA_ID = 10
VERSION = 1
NAME = "upgrade_control"

# header.phase (mirrors supervisor/upgrade_protocol.Phase for readers without the supervisor)
PHASE_IDLE, PHASE_PREPARING, PHASE_SWAPPING, PHASE_CANARY, PHASE_SWAPPED, PHASE_COMMITTED, PHASE_REVERTING, PHASE_DONE = range(8)

HEADER = registry.header_dtype([("upgrade_seq", "<u8"), ("nqueues", "<u4"), ("phase", "<u4"), ("_pad", "V32")])

ELEMENT = np.dtype(
    [
        ("requested_ns", "<u8"),
        ("old_last_burst_ns", "<u8"),
        ("released_ns", "<u8"),
        ("claimed_ns", "<u8"),
        ("new_first_burst_ns", "<u8"),
        ("old_token", "<u8"),
        ("new_token", "<u8"),
        ("delta_entries", "<u4"),
        ("delta_us", "<u4"),
    ]
)
assert HEADER.itemsize == 64 and ELEMENT.itemsize == 64

LAYOUT = registry.register(
    registry.Layout(
        NAME,
        SCHEMA_ID,
        VERSION,
        header=HEADER,
        element=ELEMENT,
        doc="per-queue drain-and-swap timestamps (requested, last burst, released, claimed, first burst) for the swap-gap measurement",
    )
)


def create(buf: np.ndarray, nqueues: int) -> tuple[np.ndarray, np.ndarray]:
    """Initialise an upgrade_control zone in ``buf``; returns (header view, records view)."""
    need = LAYOUT.zone_size(nqueues)
    if buf.nbytes < need:
        raise ValueError(f"upgrade_control zone needs {need} bytes, buffer has {buf.nbytes}")
    buf[:need] = 0
    hdr = buf[: HEADER.itemsize].view(HEADER)
    hdr["nqueues"] = nqueues
    registry.stamp(hdr, LAYOUT)
    return hdr, buf[LAYOUT.header_size : LAYOUT.header_size + nqueues * ELEMENT.itemsize].view(ELEMENT)


def attach(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Verify and view an existing upgrade_control zone: (header view, records view)."""
    hdr = buf[: HEADER.itemsize].view(HEADER)
    registry.verify(hdr, LAYOUT, what="upgrade_control")
    n = int(hdr["nqueues"][0])
    return hdr, buf[LAYOUT.header_size : LAYOUT.header_size + n * ELEMENT.itemsize].view(ELEMENT)
