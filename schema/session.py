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
        ("capacity", "<u8"),  # number of entries
        ("mask", "<u8"),  # capacity - 1 (a power of two), or all ones (any other capacity: homes range-reduced)
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


# --------------------------------------------------------------------------- version 2
#
# Version 2 (same schema id 4) adds per-direction byte accounting and a QoS class,
# in space version 1 kept free, so an entry is still 64 bytes and every version-1
# field keeps its offset, type and meaning:
#
# ====== ===== ======================================================
# offset type  field (changes from version 1)
# ====== ===== ======================================================
# 30     u2    qos_class  QoS class of the session (0 = best effort); was _pad0
# 48     u8    bytes      byte counter, both directions (as in version 1)
# 56     u8    bytes_in   bytes received on the outside port (reply direction),
#                         counted from the time the entry became version 2;
#                         bytes out = bytes - bytes_in; was _reserved
# ====== ===== ======================================================
#
# The header is version 1's with the journal images in the version-2 entry
# format and a ``migrated_from`` word (the version an online migration copied the
# table from, 0 for a table created at version 2). Field i of both entry dtypes
# has the same type and offset, which keeps the migration a column copy.

VERSION_V2 = 2

ELEMENT_V2 = np.dtype(
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
        ("qos_class", "<u2"),
        ("created", "<u4"),
        ("last_seen", "<u4"),
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("bytes_in", "<u8"),
    ]
)
assert ELEMENT_V2.itemsize == 64
assert [ELEMENT.fields[n][1:] for n in ELEMENT.names] == [ELEMENT_V2.fields[n][1:] for n in ELEMENT_V2.names]

VALUE_FIELDS_V2: tuple[str, ...] = VALUE_FIELDS + ("qos_class", "bytes_in")
VALUE_DTYPE_V2 = np.dtype([(n, ELEMENT_V2.fields[n][0]) for n in VALUE_FIELDS_V2])

HEADER_V2 = registry.header_dtype(
    [
        ("capacity", "<u8"),
        ("mask", "<u8"),
        ("count", "<u8"),
        ("tombstones", "<u8"),
        ("seed", "<u8"),
        ("max_probe", "<u4"),
        ("writer_pid", "<u4"),
        ("writer_epoch", "<u4"),
        ("flags", "<u4"),
        ("inserts", "<u8"),
        ("updates", "<u8"),
        ("deletes", "<u8"),
        ("insert_full", "<u8"),
        ("recovered", "<u8"),
        ("jseq", "<u8"),
        ("jdone", "<u8"),
        ("jcount", "<u4"),
        ("jkind", "<u4"),
        ("migrated_from", "<u4"),  # version the table was migrated from online (0: created at v2)
        ("_pad1", "u1", (52,)),
        ("jslot", "<i8", (JOURNAL_CAP,)),
        ("jold_seq", "<u4", (JOURNAL_CAP,)),
        ("jimage", ELEMENT_V2, (JOURNAL_CAP,)),
    ]
)
assert HEADER_V2.itemsize == HEADER.itemsize
assert all(HEADER_V2.fields[n][1] == HEADER.fields[n][1] for n in HEADER.names if n != "_pad1")

LAYOUT_V2 = registry.register(
    registry.Layout(
        NAME,
        SCHEMA_ID,
        VERSION_V2,
        header=HEADER_V2,
        element=ELEMENT_V2,
        doc="session table v2: v1 plus per-session bytes_in (reply direction) and a QoS class, same 64-byte entries",
    )
)
assert LAYOUT_V2.layout_hash != LAYOUT.layout_hash

# The v1 <-> v2 migrations register themselves with the registry on import.
from hotplane.schema import session_migrations as _session_migrations  # noqa: E402,F401
