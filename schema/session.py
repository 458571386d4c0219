"""Layout of the shared session table (schema id 4, ``session_table``, version 1).

A zone is one header followed by ``capacity`` 64-byte entries::

    header (cache-line aligned)                       entries[capacity]
    +------------------------------------------+     +-----------------------+
    | schema_id version layout_hash (prefix)   |     | seq state proto ...   |
    | capacity mask count tombstones seed ...  |     | key0 key1 value ...   |
    | writer pid / epoch, op counters          |     +-----------------------+
    | redo journal: jseq jdone jcount          |     | ...                   |
    |   jslot[512] jold_seq[512] jimage[512]   |
    +------------------------------------------+

Entry (64 bytes, one cache line once the array is 64-byte aligned):

====== ===== ======================================================
offset type  field
====== ===== ======================================================
0      u4    seq        seqlock: odd while the writer is changing the entry
4      u1    state      EMPTY (0) / USED (1) / TOMBSTONE (2)
5      u1    protocol   IP protocol of the session (value field)
6      u1    tcp_state  TCP tracking state (value field)
7      u1    flags      caller-defined flags (value field)
8      u8    key0       first key word (caller packs protocol/addresses/ports)
16     u8    key1       second key word
24     u4    xaddr      translated address
28     u2    xport      translated port
30     u2    _pad0      zero
32     u4    created    seconds on the gateway clock
36     u4    last_seen  seconds on the gateway clock
40     u8    packets    packet counter
48     u8    bytes      byte counter
56     u8    _reserved  zero (room for a later version)
====== ===== ======================================================

EMPTY is 0 so that a zero-filled zone is an empty table. The redo journal in
the header holds the final image of every entry the current write batch
changes; it lets :meth:`SessionTable.recover` complete a batch whose writer was
SIGKILLed half-way (see ``shared/session_table.py`` for the protocol).
"""

from __future__ import annotations

import numpy as np

from hotplane.schema import registry

SCHEMA_ID = 4
VERSION = 1
NAME = "session_table"

# Entry states. EMPTY must be 0: a freshly zeroed zone is an empty table.
EMPTY = 0
USED = 1
TOMBSTONE = 2

# Largest number of entries one write batch may change: the journal's size.
JOURNAL_CAP = 512
DEFAULT_MAX_PROBE = 32
MAX_MAX_PROBE = 256

ELEMENT = np.dtype(
    [
        ("seq", "<u4"),
        ("state", "u1"),
        ("protocol", "u1"),
        ("tcp_state", "u1"),
        ("flags", "u1"),
        ("key0", "<u8"),
        ("key1", "<u8"),
        ("xaddr", "<u4"),
        ("xport", "<u2"),
        ("_pad0", "<u2"),
        ("created", "<u4"),
        ("last_seen", "<u4"),
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("_reserved", "<u8"),
    ]
)
assert ELEMENT.itemsize == 64, ELEMENT.itemsize

# The fields a caller writes through insert/update; everything else is table-owned.
VALUE_FIELDS: tuple[str, ...] = ("protocol", "tcp_state", "flags", "xaddr", "xport", "created", "last_seen", "packets", "bytes")
# A packed record of just the value fields, the natural type for ``values`` arguments.
VALUE_DTYPE = np.dtype([(n, ELEMENT.fields[n][0]) for n in VALUE_FIELDS])

HEADER = registry.header_dtype(
    [
        ("capacity", "<u8"),  # number of entries, a power of two
        ("mask", "<u8"),  # capacity - 1
        ("count", "<u8"),  # USED entries
        ("tombstones", "<u8"),  # TOMBSTONE entries
        ("seed", "<u8"),  # hash seed
        ("max_probe", "<u4"),  # probe window per home slot
        ("writer_pid", "<u4"),  # pid of the process allowed to write (0: none)
        ("writer_epoch", "<u4"),  # bumped each time a writer takes over
        ("flags", "<u4"),
        ("inserts", "<u8"),  # entries created
        ("updates", "<u8"),  # entries whose value was rewritten in place
        ("deletes", "<u8"),  # entries removed
        ("insert_full", "<u8"),  # inserts refused: no free slot in either window
        ("recovered", "<u8"),  # entries repaired by recovery scans, all time
        # Redo journal of the batch being written (see shared/session_table.py).
        ("jseq", "<u8"),  # odd while the journal is being filled, even when it is valid
        ("jdone", "<u8"),  # == jseq once every journaled entry is written
        ("jcount", "<u4"),  # records in the journal
        ("jkind", "<u4"),  # what the batch was (insert/update/delete/recovery), for diagnostics
        ("_pad1", "u1", (56,)),  # keeps the arrays below cache-line aligned
        ("jslot", "<i8", (JOURNAL_CAP,)),
        ("jold_seq", "<u4", (JOURNAL_CAP,)),
        ("jimage", ELEMENT, (JOURNAL_CAP,)),
    ]
)
assert HEADER.fields["jslot"][1] % 64 == 0 and HEADER.fields["jimage"][1] % 64 == 0

LAYOUT = registry.register(
    registry.Layout(
        NAME,
        SCHEMA_ID,
        VERSION,
        header=HEADER,
        element=ELEMENT,
        doc="fixed-capacity open-addressing session table: two-choice bounded linear probing, per-entry seqlock, redo journal",
    )
)
