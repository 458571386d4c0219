"""The NAT's memzones: reserved by the primary at start, attached by each worker.

Per worker ``i``: ``nat.w<i>.in2out`` (session table, schema id 4: the sessions,
what readers in other processes read, with its seqlock), ``nat.w<i>.index``
(session index, schema id 11: 8-byte hints into ``in2out`` for the reply
direction and the mappings), ``nat.w<i>.pool`` (port allocator + expiry
cursor, schema id 8). Their size comes from ``[nat] max_sessions``.
Shared: ``nat.lpm`` (routes + neighbour mirror, schema id 9), written by the
primary (routes) and by the ARP-receiving worker (mirror).

Created on the first start; after a restart they are re-attached as they are
(sessions, mappings and held ports survive, DESIGN invariant 3). Routes are
rewritten from the config at every primary start (the config may have changed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hotplane.schema.nat import LPM_HEADER, NAT_LPM, NAT_PORT_POOL, NEIGH_ENTRY, NEIGH_SLOTS, SESSION_INDEX
from hotplane.schema.registry import stamp, verify
from hotplane.schema.session import LAYOUT as SESSION_LAYOUT
from hotplane.shared.nat_clock import Clock, MonotonicClock
from hotplane.shared.nat_config import GatewayConfig
from hotplane.shared.nat_lpm import Lpm
from hotplane.shared.nat_pool import PortAllocator
from hotplane.shared.session_index import SessionIndex
from hotplane.shared.session_table import SessionTable

#: Entries per session table per worker without ``[nat] max_sessions``.
TABLE_CAPACITY = 1 << 18
HOST_CAPACITY = 4096
TBL8_GROUPS = 64


def _pool_bytes(config: GatewayConfig) -> int:
    nat = config.nat
    return PortAllocator.zone_size(len(nat.pool_addresses()), nat.block, HOST_CAPACITY)


def _lpm_sizes() -> tuple[int, int, int]:
    lpm_off = NAT_LPM.header_size
    lpm_bytes = Lpm.zone_size(TBL8_GROUPS)
    neigh_off = (lpm_off + lpm_bytes + 63) // 64 * 64
    total = neigh_off + NEIGH_SLOTS * NEIGH_ENTRY.itemsize
    return lpm_off, lpm_bytes, total


def reserve_nat_zones(directory, config: GatewayConfig, workers: int, *, table_capacity: int | None = None,
                      clock: Clock | None = None) -> dict[str, Any]:
    """Reserve (or re-attach) every NAT zone; returns ``{name: created}`` plus figures.

    ``table_capacity`` (``in2out`` entries per worker) defaults to what ``[nat]
    max_sessions`` needs (:func:`hotplane.secondary.nat_pipeline.table_capacity_for`).
    """
    from hotplane.secondary.nat_pipeline import KEY_FORMAT, fill_lpm, index_capacity_for, table_capacity_for

    clock = clock or MonotonicClock()
    if table_capacity is None:
        table_capacity = table_capacity_for(config, workers)
    icap = index_capacity_for(table_capacity)
    out: dict[str, Any] = {}
    for w in range(workers):
        name = f"nat.w{w}.in2out"
        z, created = directory.reserve_or_lookup(name, SessionTable.zone_size(table_capacity), SESSION_LAYOUT)
        if created:
            t = SessionTable.create(z.view[: SessionTable.zone_size(table_capacity)], table_capacity,
                                    seed=0x9E37 * (2 * w) + 1)
            t.release()  # the worker becomes the writer
        out[name] = created
        name = f"nat.w{w}.index"
        z, created = directory.reserve_or_lookup(name, SessionIndex.zone_size(icap), SESSION_INDEX)
        if created:
            SessionIndex.create(z.view[: SessionIndex.zone_size(icap)], icap, seed=0x9E37 * (2 * w + 1) + 1,
                                key_format=KEY_FORMAT)
        out[name] = created
        pb = _pool_bytes(config)
        name = f"nat.w{w}.pool"
        z, created = directory.reserve_or_lookup(name, NAT_PORT_POOL.zone_size(pb), NAT_PORT_POOL)
        if created:
            hdr = z.header(NAT_PORT_POOL)
            off = NAT_PORT_POOL.header_size
            PortAllocator.for_worker(config, w, clock, host_capacity=HOST_CAPACITY, buf=z.view[off:off + pb])
            hdr["worker"] = w
            hdr["pool_offset"] = off
            hdr["pool_bytes"] = pb
            stamp(hdr, NAT_PORT_POOL)
        out[name] = created
    lpm_off, lpm_bytes, total = _lpm_sizes()
    z, created = directory.reserve_or_lookup("nat.lpm", NAT_LPM.zone_size(total), NAT_LPM)
    hdr = z.header(NAT_LPM)
    if created:
        hdr["lpm_offset"], hdr["lpm_bytes"] = lpm_off, lpm_bytes
        hdr["neigh_offset"], hdr["neigh_slots"] = total - NEIGH_SLOTS * NEIGH_ENTRY.itemsize, NEIGH_SLOTS
        hdr["tbl8_groups"] = TBL8_GROUPS
    # Routes come from the config at every start, built aside first: a restarted primary
    # must not empty the table live workers are reading. Unchanged routes leave the zone
    # untouched; changed ones are copied in (a short window of mixed old/new entries).
    raw = np.zeros(lpm_bytes + 64, np.uint8)
    skew = -raw.ctypes.data % 64
    scratch = raw[skew:skew + lpm_bytes]  # the LPM wants cache-line alignment, as in the zone
    fill_lpm(Lpm.create(scratch, TBL8_GROUPS), config)
    live = z.view[lpm_off:lpm_off + lpm_bytes]
    if created or not np.array_equal(live, scratch):
        live[:] = scratch
    if created:
        stamp(hdr, NAT_LPM)
    out["nat.lpm"] = created
    return out


def attach_nat_zones(directory, worker: int, config: GatewayConfig | None = None, clock: Clock | None = None,
                     *, in2out: SessionTable | None = None) -> dict[str, Any]:
    """A worker's view: its session tables (as writer, after recovery), allocator, FIB.

    Returns the ``zones`` dict :class:`hotplane.secondary.nat_pipeline.NatPipeline` takes,
    plus ``peers``: read-only (index, in2out) of the other workers, for hairpinning. The
    pipeline rebuilds the index if its last writer died inside a group of changes.
    ``in2out``: the worker's session table object when the caller chose it (a hot upgrade
    moves the sessions between layout versions: ``shared/session_migrate.py``); the
    peers' tables are their live ones.
    """
    from hotplane.shared.session_migrate import attach_live

    clock = clock or MonotonicClock()
    zones: dict[str, Any] = {}
    if in2out is None:
        z = directory.lookup_checked(f"nat.w{worker}.in2out", SESSION_LAYOUT)
        in2out = SessionTable.attach(z.view, writer=True)
    zones["in2out"] = in2out
    z = directory.lookup(f"nat.w{worker}.index")
    if z is None:
        raise RuntimeError(f"memzone nat.w{worker}.index is missing: these zones were made by a NAT version without "
                           "the session index (out2in tables); start the primary with fresh memory")
    z = directory.lookup_checked(f"nat.w{worker}.index", SESSION_INDEX)
    # The index follows the table: an upgrade candidate (table attached read-only) reads it too.
    zones["index"] = SessionIndex.attach(z.view, writer=zones["in2out"].is_writer)
    z = directory.lookup_checked(f"nat.w{worker}.pool", NAT_PORT_POOL)
    hdr = z.header(NAT_PORT_POOL)
    verify(hdr, NAT_PORT_POOL, what=f"memzone nat.w{worker}.pool")
    off, nb = int(hdr["pool_offset"][0]), int(hdr["pool_bytes"][0])
    zones["pool"] = PortAllocator.attach(z.view[off:off + nb], clock)
    zones["pool_header"] = hdr
    z = directory.lookup_checked("nat.lpm", NAT_LPM)
    h = z.header(NAT_LPM)
    verify(h, NAT_LPM, what="memzone nat.lpm")
    lo, lb = int(h["lpm_offset"][0]), int(h["lpm_bytes"][0])
    zones["lpm"] = Lpm.attach(z.view[lo:lo + lb])
    no, ns = int(h["neigh_offset"][0]), int(h["neigh_slots"][0])
    zones["neigh"] = z.view[no:no + ns * NEIGH_ENTRY.itemsize].view(NEIGH_ENTRY)
    peers = {}
    w = 0
    while True:
        tz = directory.lookup(f"nat.w{w}.in2out")
        iz = directory.lookup(f"nat.w{w}.index")
        if tz is None or iz is None:
            break
        if w != worker:
            peers[w] = (SessionIndex.attach(iz.view), attach_live(directory, w))
        w += 1
    zones["peers"] = peers
    return zones


def memory_per_session(table_capacity: int = TABLE_CAPACITY) -> dict[str, float]:
    """Shared bytes per session of one worker's session zones (``in2out`` + index) at the most sessions
    they admit; see :func:`hotplane.secondary.nat_pipeline.memory_per_session`."""
    from hotplane.secondary.nat_pipeline import memory_per_session as mps

    return mps(table_capacity)
