"""Layouts of the NAT's own shared state: the port allocator (schema id 8) and the FIB (schema id 9).

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
