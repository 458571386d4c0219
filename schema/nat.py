"""Layouts of the NAT's own shared state: the port allocator (id 8), the FIB (id 9), the session index (id 11).

``nat_port_pool`` (id 8, zone ``nat.w<i>.pool``): one worker's outside port
allocator (:class:`hotplane.shared.nat_pool.PortAllocator`, whose buffer has
its own magic/version header) plus the worker's expiry cursor, so that a
replacement worker resumes the sweep where the last one stopped::

    header (64 B): schema prefix | worker u4 | pool_offset u4 | pool_bytes u8
                   | expiry_cursor u8 | sweeps u8 | pad
    body:          PortAllocator buffer (pool_bytes, at pool_offset = header_size)

``nat_lpm`` (id 9, zone ``nat.lpm``, shared by every worker): the route table
(:class:`hotplane.shared.nat_lpm.Lpm` DIR-24-8 buffer, written by the primary
from the config, read by workers) and the *neighbour mirror*: the ARP answers
seen by the worker that receives ARP (steering sends every non-IPv4 frame to
queue 0), published so the other workers can resolve next hops they asked for::

    header (64 B): schema prefix | lpm_offset u8 | lpm_bytes u8 | neigh_offset u8
                   | neigh_slots u4 | tbl8_groups u4 | routes_hash u8
    body:          Lpm buffer, then neigh_slots x NEIGH_ENTRY (direct-mapped by
                   (side, ip); single writer, per-entry seqlock)

Both zones carry ``uint8`` elements: ``Layout.zone_size(nbytes)`` sizes them.

``session_index`` (id 11, zone ``nat.w<i>.index``, one per worker): 8-byte
hints (32-bit key fingerprint | 32-bit slot) into the worker's ``in2out``
session table, for the reply direction and the endpoint-independent mappings
(see :mod:`hotplane.shared.session_index`, which also documents the header)::

    header (64 B): schema prefix | capacity u8 | seed u8 | count u8 | tombstones u8
                   | max_probe u4 | key_format u4 | wseq u8 | rebuilds u8 | writer_pid u4 | pad
    body:          uint64[capacity + max_probe]
"""

from __future__ import annotations

import numpy as np

from hotplane.schema.registry import Layout, header_dtype, register

POOL_HEADER = header_dtype(
    [
        ("worker", "<u4"),
        ("pool_offset", "<u4"),
        ("pool_bytes", "<u8"),
        ("expiry_cursor", "<u8"),
        ("sweeps", "<u8"),
        ("_pad", "u1", (16,)),
    ]
)
assert POOL_HEADER.itemsize == 64

NAT_PORT_POOL = register(
    Layout("nat_port_pool", 8, 1, header=POOL_HEADER, element=np.dtype(np.uint8),
           doc="one worker's NAT port allocator state (PortAllocator buffer) and expiry cursor")
)

LPM_HEADER = header_dtype(
    [
        ("lpm_offset", "<u8"),
        ("lpm_bytes", "<u8"),
        ("neigh_offset", "<u8"),
        ("neigh_slots", "<u4"),
        ("tbl8_groups", "<u4"),
        ("routes_hash", "<u8"),
        ("_pad", "u1", (8,)),
    ]
)
assert LPM_HEADER.itemsize == 64

#: One published neighbour: ``seq`` odd while written; ``side`` 0 inside, 1 outside;
#: ``mac`` the 48-bit MAC as an int; ``updated`` the gateway clock when learned.
NEIGH_ENTRY = np.dtype(
    [("seq", "<u4"), ("side", "u1"), ("valid", "u1"), ("_p", "u1", (2,)), ("ip", "<u4"), ("updated", "<u4"), ("mac", "<u8")]
)
assert NEIGH_ENTRY.itemsize == 24
NEIGH_SLOTS = 4096

NAT_LPM = register(
    Layout("nat_lpm", 9, 1, header=LPM_HEADER, element=np.dtype(np.uint8),
           doc="NAT FIB: DIR-24-8 route table (Lpm buffer) and the neighbour mirror")
)

INDEX_HEADER = header_dtype(
    [
        ("capacity", "<u8"),  # home positions (any count); the body has capacity + max_probe entries
        ("seed", "<u8"),
        ("count", "<u8"),  # USED entries
        ("tombstones", "<u8"),
        ("max_probe", "<u4"),
        ("key_format", "<u4"),  # version of the NAT's key packing (secondary/nat_pipeline.KEY_FORMAT)
        ("wseq", "<u8"),  # odd while a group of changes spanning in2out and this index is in progress
        ("rebuilds", "<u8"),  # times the index was rebuilt from the session table
        ("writer_pid", "<u4"),
        ("_pad", "u1", (4,)),
    ]
)
assert INDEX_HEADER.itemsize == 80

SESSION_INDEX = register(
    Layout("session_index", 11, 1, header=INDEX_HEADER, element=np.dtype("<u8"),
           doc="NAT session index: 8-byte (fingerprint, in2out slot) hints, two-choice bounded linear probing")
)
