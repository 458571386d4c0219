"""Layout of the per-worker counter blocks (schema id 3, ``worker_counters``).

One zone holds a small header and then one block per worker slot. Each block
is a whole number of 64-byte cache lines (so two workers never write the same
line) and has exactly one writer: the worker running in that slot. Every
counter is an aligned little-endian u64 that only grows; readers (stats,
supervisor, tests) sum blocks without locks, and see each word whole
(see :mod:`hotplane.shared.ordering`).

Accounting invariant (DESIGN invariant 5), true for every block between bursts::

    rx_packets == forwarded + punted + sum(dropped)
"""

from __future__ import annotations

import numpy as np

from hotplane.schema import registry

N_REASONS = 32

# Drop reasons: the index is the slot in ``dropped``. Append only: a reason's
# index is part of the layout's meaning, so never reorder or reuse one.
DROP_REASONS: tuple[str, ...] = (
    "runt",
    "truncated",
    "bad_ip_header",
    "bad_ip_checksum",
    "not_ipv4",
    "unsupported_protocol",
    "fragment",
    "ttl_expired",
    "no_route",
    "no_session",
    "filtered",
    "table_full",
    "ports_exhausted",
    "quota_exceeded",
    "tx_ring_full",
    "rx_kernel_drop",
    "malformed_l4",
    "hostile",
    "other",
)
assert len(DROP_REASONS) <= N_REASONS and len(set(DROP_REASONS)) == len(DROP_REASONS)

# Monotonic u64 counters, in block order; their words come first in the block.
SCALAR_COUNTERS: tuple[str, ...] = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "forwarded", "punted")

VERSION_LEN = 32
BLOCK_SIZE = 384  # 6 cache lines

COUNTER_BLOCK = np.dtype(
    {
        "names": [*SCALAR_COUNTERS, "dropped", "heartbeat_ns", "generation", "restarts", "version"],
        "formats": ["<u8"] * len(SCALAR_COUNTERS) + [("<u8", (N_REASONS,)), "<u8", "<u8", "<u8", f"S{VERSION_LEN}"],
        "offsets": [8 * i for i in range(len(SCALAR_COUNTERS))] + [48, 48 + 8 * N_REASONS, 312, 320, 328],
        "itemsize": BLOCK_SIZE,
    }
)
# Byte map: six counters 0..48, dropped 48..304, heartbeat_ns 304, generation 312, restarts 320,
# version 328..360 (NUL-padded ASCII), spare to 384.

COUNTERS_HEADER = registry.header_dtype(
    [("n_workers", "<u4"), ("n_reasons", "<u4"), ("block_size", "<u4"), ("_pad0", "V36")]
)

WORKER_COUNTERS = registry.register(
    registry.Layout(
        name="worker_counters",
        schema_id=3,
        version=1,
        header=COUNTERS_HEADER,
        element=COUNTER_BLOCK,
        doc="per-worker counter blocks: single writer each, readers sum; rx = forwarded + punted + dropped",
    )
)

assert COUNTER_BLOCK.itemsize % 64 == 0 and COUNTERS_HEADER.itemsize == 64
assert all(COUNTER_BLOCK.fields[n][1] % 8 == 0 for n in COUNTER_BLOCK.names)
