"""The NAT's memzones: reserved by the primary at start, attached by each worker.

Per worker ``i``: ``nat.w<i>.in2out`` and ``nat.w<i>.out2in`` (session tables,
schema id 4), ``nat.w<i>.pool`` (port allocator + expiry cursor, schema id 8).
Shared: ``nat.lpm`` (routes + neighbour mirror, schema id 9), written by the
primary (routes) and by the ARP-receiving worker (mirror).

Created on the first start; after a restart they are re-attached as they are
(sessions, mappings and held ports survive, DESIGN invariant 3). Routes are
rewritten from the config at every primary start (the config may have changed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hotplane.schema.nat import LPM_HEADER, NAT_LPM, NAT_PORT_POOL, NEIGH_ENTRY, NEIGH_SLOTS
from hotplane.schema.registry import stamp, verify
from hotplane.schema.session import LAYOUT as SESSION_LAYOUT
from hotplane.shared.nat_clock import Clock, MonotonicClock
from hotplane.shared.nat_config import GatewayConfig
from hotplane.shared.nat_lpm import Lpm
from hotplane.shared.nat_pool import PortAllocator
from hotplane.shared.session_table import SessionTable

#: Entries per session table per worker (the config has no ``[nat] max_sessions`` key yet).
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


def reserve_nat_zones(directory, config: GatewayConfig, workers: int, *, table_capacity: int = TABLE_CAPACITY,
                      clock: Clock | None = None) -> dict[str, Any]:
    """Reserve (or re-attach) every NAT zone; returns ``{name: created}`` plus figures."""
    from hotplane.secondary.nat_pipeline import fill_lpm

    clock = clock or MonotonicClock()
    out: dict[str, Any] = {}
    for w in range(workers):
        for d in ("in2out", "out2in"):
            name = f"nat.w{w}.{d}"
            z, created = directory.reserve_or_lookup(name, SessionTable.zone_size(table_capacity), SESSION_LAYOUT)
            if created:
                t = SessionTable.create(z.view[: SessionTable.zone_size(table_capacity)], table_capacity,
                                        seed=0x9E37 * (2 * w + (d == "out2in")) + 1)
                t.release()  # the worker becomes the writer
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
    # Routes come from the config at every start (fresh table, then the identity).
    lpm = Lpm.create(z.view[lpm_off:lpm_off + lpm_bytes], TBL8_GROUPS)
    fill_lpm(lpm, config)
    if created:
        stamp(hdr, NAT_LPM)
    out["nat.lpm"] = created
    return out


def attach_nat_zones(directory, worker: int, config: GatewayConfig | None = None, clock: Clock | None = None
                     ) -> dict[str, Any]:
    """A worker's view: its session tables (as writer, after recovery), allocator, FIB.

    Returns the ``zones`` dict :class:`hotplane.secondary.nat_pipeline.NatPipeline` takes,
    plus ``peer_out2in`` (readers of the other workers' out2in tables, for hairpinning).
    """
    clock = clock or MonotonicClock()
    zones: dict[str, Any] = {}
    for d in ("in2out", "out2in"):
        z = directory.lookup_checked(f"nat.w{worker}.{d}", SESSION_LAYOUT)
        zones[d] = SessionTable.attach(z.view, writer=True)
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
        pz = directory.lookup(f"nat.w{w}.out2in")
        if pz is None:
            break
        if w != worker:
            peers[w] = SessionTable.attach(pz.view)
        w += 1
    zones["peer_out2in"] = peers
    return zones


def memory_per_session(table_load: float = 0.7) -> dict[str, float]:
    """Bytes of shared memory per session from the layouts (two 64-byte entries, at most ``table_load`` full)."""
    entry = SESSION_LAYOUT.element.itemsize
    per = 2 * entry / table_load
    return {"entry_bytes": entry, "entries_per_session": 2, "bytes_per_session": per,
            "sessions_in_1GiB": int((1 << 30) / per)}
