"""Migrations of the session table (schema id 4) between versions 1 and 2.

Two levels, both vectorized (no per-entry Python):

* record converters, :func:`v1_to_v2_records` / :func:`v2_to_v1_records`:
  entries in, entries out. Field ``i`` of both entry dtypes has the same type
  and offset (see ``schema/session.py``), so a conversion is a byte copy plus
  the fields that change meaning: going up, ``qos_class`` (was ``_pad0``) and
  ``bytes_in`` (was ``_reserved``) start at 0 -- version 1 never counted
  directions, so ``bytes_in`` counts from the migration on while ``bytes``
  keeps the whole total; going down they are dropped (zeroed), every
  version-1 field round-trips exactly. ``seq`` and ``state`` are copied
  unchanged: the online migration (``shared/session_migrate.py``) relies on
  the copy carrying its source's seq to find what changed since.
* whole-zone migrations registered with the schema registry
  (``registry.migration(4, 1, 2)`` and ``(4, 2, 1)``): ``fn(src_buf, dst_buf)``
  for a *quiescent* table (no writer running): header (geometry, seed,
  counts, op counters) and every entry. Slots do not move -- same capacity,
  same seed, so same home slots -- which keeps probe chains valid without
  rehashing. A live table is migrated with ``shared/session_migrate.py``,
  which uses the record converters under the seqlock.
"""

from __future__ import annotations

import numpy as np

from hotplane.schema import registry
from hotplane.schema.session import (
    ELEMENT,
    ELEMENT_V2,
    HEADER,
    HEADER_V2,
    LAYOUT,
    LAYOUT_V2,
    SCHEMA_ID,
)

# Header fields copied as they are by a whole-zone migration (both directions).
HEADER_COPY_FIELDS: tuple[str, ...] = (
    "capacity",
    "mask",
    "count",
    "tombstones",
    "seed",
    "max_probe",
    "inserts",
    "updates",
    "deletes",
    "insert_full",
    "recovered",
)

_LAYOUTS = {1: LAYOUT, 2: LAYOUT_V2}
_HEADERS = {1: HEADER, 2: HEADER_V2}
_ELEMENTS = {1: ELEMENT, 2: ELEMENT_V2}


def v1_to_v2_records(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Version-1 entries -> version-2 entries (new fields 0; seq and state kept)."""
    src = np.ascontiguousarray(src, dtype=ELEMENT)
    if out is None:
        out = np.empty(src.shape, ELEMENT_V2)
    out[...] = src.view(ELEMENT_V2)
    out["qos_class"] = 0
    out["bytes_in"] = 0
    return out


def v2_to_v1_records(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Version-2 entries -> version-1 entries (qos_class and bytes_in dropped; seq and state kept)."""
    src = np.ascontiguousarray(src, dtype=ELEMENT_V2)
    if out is None:
        out = np.empty(src.shape, ELEMENT)
    out[...] = src.view(ELEMENT)
    out["_pad0"] = 0
    out["_reserved"] = 0
    return out


CONVERTERS = {(1, 2): v1_to_v2_records, (2, 1): v2_to_v1_records}


def converter(from_version: int, to_version: int):
    """The record converter between two session-table versions (SchemaError if none)."""
    try:
        return CONVERTERS[(from_version, to_version)]
    except KeyError:
        raise registry.SchemaError(f"no session table record conversion from version {from_version} to {to_version}") from None


def zone_views(buf: np.ndarray, version: int) -> tuple[np.ndarray, np.ndarray]:
    """(header 1-element view, entries view) of a session-table zone of ``version`` in ``buf``."""
    hd = _HEADERS[version]
    el = _ELEMENTS[version]
    hdr = buf[: hd.itemsize].view(hd)
    cap = int(hdr["capacity"][0])
    hs = _LAYOUTS[version].header_size
    return hdr, buf[hs : hs + cap * el.itemsize].view(el)


def init_header_from(src_hdr: np.ndarray, dst_buf: np.ndarray, to_version: int, *, writer_pid: int, from_version: int) -> np.ndarray:
    """Zero ``dst_buf``'s zone and write a header with ``src_hdr``'s geometry, stamped ``to_version``.

    Counts start at 0 (the caller fills entries and then sets them); the
    writer is ``writer_pid``. The stamp goes last: a stamped zone is initialised.
    """
    lay = _LAYOUTS[to_version]
    cap = int(src_hdr["capacity"][0])
    need = lay.zone_size(cap)
    if dst_buf.nbytes < need:
        raise ValueError(f"destination buffer too small for a {cap}-entry session table: {dst_buf.nbytes} bytes, need {need}")
    dst_buf[:need] = 0
    hdr = dst_buf[: _HEADERS[to_version].itemsize].view(_HEADERS[to_version])
    for f in ("capacity", "mask", "seed", "max_probe"):
        hdr[f] = src_hdr[f]
    hdr["writer_pid"] = writer_pid
    hdr["writer_epoch"] = 1
    if "migrated_from" in hdr.dtype.names:
        hdr["migrated_from"] = from_version
    registry.stamp(hdr, lay)
    return hdr


def _migrate_zone(src_buf: np.ndarray, dst_buf: np.ndarray, from_version: int, to_version: int, *, writer_pid: int = 0) -> int:
    src_hdr, src = zone_views(src_buf, from_version)
    registry.verify(src_hdr, _LAYOUTS[from_version], what="session table (migration source)")
    if int(src_hdr["jseq"][0]) & 1 or int(src_hdr["jdone"][0]) != int(src_hdr["jseq"][0]):
        raise registry.SchemaError("session table migration source has an unfinished write batch: run SessionTable.recover() (as its writer) first")
    if np.any(src["seq"] & 1):
        raise registry.SchemaError("session table migration source has entries being written (odd seq): not quiescent")
    hdr = init_header_from(src_hdr, dst_buf, to_version, writer_pid=writer_pid, from_version=from_version)
    _, dst = zone_views(dst_buf, to_version)
    converter(from_version, to_version)(src, dst)
    for f in HEADER_COPY_FIELDS:
        hdr[f] = src_hdr[f]
    return int(np.count_nonzero(dst["state"] == 1))


@registry.register_migration(SCHEMA_ID, 1, 2)
def migrate_v1_to_v2(src_buf: np.ndarray, dst_buf: np.ndarray, *, writer_pid: int = 0) -> int:
    """Whole-zone migration of a quiescent version-1 table into ``dst_buf`` (version 2); returns USED entries."""
    return _migrate_zone(src_buf, dst_buf, 1, 2, writer_pid=writer_pid)


@registry.register_migration(SCHEMA_ID, 2, 1)
def migrate_v2_to_v1(src_buf: np.ndarray, dst_buf: np.ndarray, *, writer_pid: int = 0) -> int:
    """Whole-zone migration of a quiescent version-2 table back to version 1 (rollback); returns USED entries."""
    return _migrate_zone(src_buf, dst_buf, 2, 1, writer_pid=writer_pid)
