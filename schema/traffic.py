"""Live figures of the traffic generator and the verifying sink (schema id 7).

One zone per instance holds a slot per generator or sink; each slot has one
writer (its process), and readers (the supervisor's live line, supervisorctl
stats) copy it whole. Counters only grow, so a read that straddles an update
is at worst one update old per field.
"""

import numpy as np

from hotplane.schema.registry import Layout, header_dtype, register

MAX_SLOTS = 16

TRAFFIC_HEADER = header_dtype([("nslots", "<u4"), ("_pad", "<u4")])

TRAFFIC_SLOT = np.dtype(
    [
        ("name", "S24"),
        ("kind", "<u4"),  # 1 generator, 2 sink
        ("pid", "<u4"),
        ("running", "<u4"),
        ("_pad", "<u4"),
        ("started_ns", "<u8"),
        ("updated_ns", "<u8"),
        ("packets", "<u8"),  # sent (generator) or received (sink)
        ("bytes", "<u8"),
        ("ring_drops", "<u8"),  # generator: frames the port's RX ring had no room for
        ("lost", "<u8"),
        ("duplicated", "<u8"),
        ("reordered", "<u8"),
        ("corrupted", "<u8"),
        ("flows", "<u8"),
        ("_pad2", "<u8", (1,)),
    ],
    align=True,
)
assert TRAFFIC_SLOT.itemsize == 128

KIND_GEN, KIND_SINK = 1, 2

TRAFFIC_STATS = register(Layout("traffic_stats", 7, 1, header=TRAFFIC_HEADER, element=TRAFFIC_SLOT, doc="live generator/sink figures"))
