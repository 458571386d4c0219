"""The memzone directory: named, typed, cache-line aligned zones in the instance memory.

Lookups are by name, like ``rte_memzone_lookup``. Reservations take an flock
(released by the kernel if the reserving process dies) and publish an entry
by bumping ``zone_count`` only after the entry is complete, so a process
killed half-way through a reservation leaves nothing visible and nothing
locked.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from hotplane.schema import registry
from hotplane.schema.memzone import DIRECTORY, DIRECTORY_LAYOUT_VERSION, MAGIC, MAX_ZONES, NAME_LEN, ZONE_VALID
from hotplane.schema.registry import CACHE_LINE, Layout, SchemaError, align_up
from hotplane.shared.runtime import FileLock


class MemzoneError(Exception):
    """A zone cannot be reserved or found; the message says why."""


class CorruptMemory(Exception):
    """The memory file's directory is unreadable; names the cleanup command."""


@dataclass(frozen=True)
class Memzone:
    """One reserved zone: its identity and a uint8 view over its bytes."""

    name: str
    offset: int
    length: int
    schema_id: int
    version: int
    layout_hash: int
    generation: int
    view: np.ndarray

    @property
    def layout(self) -> Layout:
        return registry.check(self.schema_id, self.version, self.layout_hash, what=f"memzone {self.name!r}")

    def header(self, layout: Layout) -> np.ndarray:
        """The zone's header as a 1-element structured view."""
        assert layout.header is not None
        return self.view[: layout.header.itemsize].view(layout.header)

    def elements(self, layout: Layout, count: int | None = None) -> np.ndarray:
        """The zone's element array (after the cache-line aligned header)."""
        assert layout.element is not None
        start = layout.header_size
        n = (self.length - start) // layout.element.itemsize if count is None else count
        return self.view[start : start + n * layout.element.itemsize].view(layout.element)


class Directory:
    """The directory at offset 0 of a mapped memory."""

    def __init__(self, mem_view: np.ndarray, lock: FileLock, prefix: str) -> None:
        self.mem = mem_view
        self.lock = lock
        self.prefix = prefix
        self.hdr = mem_view[: DIRECTORY.header.itemsize].view(DIRECTORY.header)
        start = DIRECTORY.header_size
        self.entries = mem_view[start : start + MAX_ZONES * DIRECTORY.element.itemsize].view(DIRECTORY.element)

    # -- creation and validation ------------------------------------------------------------
    @staticmethod
    def data_start() -> int:
        """First byte after the directory (page aligned)."""
        return align_up(DIRECTORY.zone_size(MAX_ZONES), 4096)

    @classmethod
    def format(cls, mem_view: np.ndarray, lock: FileLock, prefix: str, *, base: int, hugepage_size: int) -> "Directory":
        """Write a fresh, empty directory (the primary, on a new memory file)."""
        d = cls(mem_view, lock, prefix)
        h = d.hdr[0]
        d.entries[:] = np.zeros(1, DIRECTORY.element)
        h["magic"] = MAGIC
        h["layout_version"] = DIRECTORY_LAYOUT_VERSION
        h["max_zones"] = MAX_ZONES
        h["generation"] = 0
        h["base"] = base
        h["size"] = mem_view.size
        h["zone_count"] = 0
        h["hugepage_size"] = hugepage_size
        h["next_free"] = cls.data_start()
        h["created_ns"] = time.time_ns()
        # The identity goes in last: a file whose header is stamped is a formatted one.
        registry.stamp(d.hdr, DIRECTORY)
        return d

    @classmethod
    def open(cls, mem_view: np.ndarray, lock: FileLock, prefix: str, *, base: int | None = None) -> "Directory":
        """Validate the directory of an existing memory; raises CorruptMemory naming the cleanup command."""
        d = cls(mem_view, lock, prefix)
        h = d.hdr[0]
        fix = f"run 'hotplane cleanup --file-prefix {prefix}' to remove it (its contents are lost), then start again"
        if int(h["magic"]) != MAGIC:
            raise CorruptMemory(f"memory of instance {prefix!r} has no hotplane directory (bad magic {int(h['magic']):#x}): stale or corrupt file; {fix}")
        try:
            registry.verify(d.hdr, DIRECTORY, what="memzone directory")
        except SchemaError as e:
            raise CorruptMemory(f"memory of instance {prefix!r}: {e}; {fix}") from None
        if int(h["layout_version"]) != DIRECTORY_LAYOUT_VERSION or int(h["max_zones"]) != MAX_ZONES:
            raise CorruptMemory(f"memory of instance {prefix!r} has directory layout {int(h['layout_version'])}/{int(h['max_zones'])}, this build reads {DIRECTORY_LAYOUT_VERSION}/{MAX_ZONES}; {fix}")
        if int(h["size"]) != mem_view.size:
            raise CorruptMemory(f"memory of instance {prefix!r}: directory says {int(h['size'])} bytes, file has {mem_view.size}; {fix}")
        if base is not None and int(h["base"]) != base:
            # Not corrupt, only mapped at the wrong address (e.g. memory.json was lost): the
            # address it was made for re-attaches it with its contents.
            made = int(h["base"])
            raise CorruptMemory(
                f"memory of instance {prefix!r} was created at base {made:#x} but was mapped at {base:#x} "
                f"(its runtime record {prefix}/memory.json is missing or disagrees): start the primary with "
                f"--base-virtaddr {made:#x} to re-attach it and keep its contents, or {fix}"
            )
        n = int(h["zone_count"])
        if n > MAX_ZONES or int(h["next_free"]) > mem_view.size:
            raise CorruptMemory(f"memory of instance {prefix!r}: directory counters out of range; {fix}")
        for e in d.entries[:n]:
            if int(e["offset"]) + int(e["length"]) > mem_view.size or int(e["offset"]) % CACHE_LINE:
                raise CorruptMemory(f"memory of instance {prefix!r}: zone {e['name'].decode(errors='replace')!r} lies outside the file; {fix}")
        return d

    def start_generation(self) -> int:
        """Called by a starting primary: bump and return the generation."""
        h = self.hdr[0]
        h["generation"] = int(h["generation"]) + 1
        h["primary_pid"] = os.getpid()
        h["started_ns"] = time.time_ns()
        return int(h["generation"])

    @property
    def generation(self) -> int:
        return int(self.hdr[0]["generation"])

    # -- zones ------------------------------------------------------------------------------
    def _zone(self, e: np.void) -> Memzone:
        off, length = int(e["offset"]), int(e["length"])
        return Memzone(
            name=e["name"].decode(),
            offset=off,
            length=length,
            schema_id=int(e["schema_id"]),
            version=int(e["version"]),
            layout_hash=int(e["layout_hash"]),
            generation=int(e["generation"]),
            view=self.mem[off : off + length],
        )

    def list(self) -> list[Memzone]:
        """Every published zone, in reservation order."""
        n = int(self.hdr[0]["zone_count"])
        return [self._zone(e) for e in self.entries[:n] if int(e["flags"]) & ZONE_VALID]

    def lookup(self, name: str) -> Memzone | None:
        """The zone called ``name``, or None."""
        key = name.encode()
        n = int(self.hdr[0]["zone_count"])
        hits = np.nonzero(self.entries["name"][:n] == key)[0]
        if hits.size == 0:
            return None
        return self._zone(self.entries[int(hits[0])])

    def lookup_checked(self, name: str, layout: Layout | str) -> Memzone:
        """The zone ``name``, refusing a missing zone or a layout this build does not expect."""
        z = self.lookup(name)
        if z is None:
            raise MemzoneError(f"memzone {name!r} does not exist in instance {self.prefix!r}")
        lay = z.layout
        want = layout if isinstance(layout, Layout) else registry.latest(layout)
        if isinstance(layout, Layout) and (lay.schema_id, lay.version) != (want.schema_id, want.version):
            raise SchemaError(f"memzone {name!r}: found {lay.describe()}, expected {want.describe()}")
        if not isinstance(layout, Layout) and lay.name != layout:
            raise SchemaError(f"memzone {name!r}: found {lay.describe()}, expected a {layout!r} layout")
        return z

    def reserve(self, name: str, length: int, layout: Layout, *, align: int = CACHE_LINE) -> Memzone:
        """Reserve a new zone (error if the name exists). Safe between processes."""
        if not name or len(name.encode()) >= NAME_LEN:
            raise MemzoneError(f"memzone name {name!r} must be 1..{NAME_LEN - 1} bytes")
        if align < CACHE_LINE or align & (align - 1):
            raise MemzoneError(f"memzone {name!r}: alignment {align} must be a power of two >= {CACHE_LINE}")
        with self.lock:
            return self._reserve_locked(name, length, layout, align)

    def reserve_or_lookup(self, name: str, length: int, layout: Layout, *, align: int = CACHE_LINE) -> tuple[Memzone, bool]:
        """The existing zone ``name`` (validated, same length) or a new one: (zone, created)."""
        with self.lock:
            z = self.lookup(name)
            if z is not None:
                if (z.schema_id, z.version, z.layout_hash) != (layout.schema_id, layout.version, layout.layout_hash):
                    registry.check(z.schema_id, z.version, z.layout_hash, what=f"memzone {name!r}")
                    raise SchemaError(f"memzone {name!r}: found {z.layout.describe()}, expected {layout.describe()}")
                if z.length < length:
                    raise MemzoneError(f"memzone {name!r} exists with {z.length} bytes, {length} wanted: run 'hotplane cleanup --file-prefix {self.prefix}' to start over with a bigger one")
                return z, False
            return self._reserve_locked(name, length, layout, align), True

    def _reserve_locked(self, name: str, length: int, layout: Layout, align: int) -> Memzone:
        h = self.hdr[0]
        if self.lookup(name) is not None:
            raise MemzoneError(f"memzone {name!r} already exists")
        n = int(h["zone_count"])
        if n >= MAX_ZONES:
            raise MemzoneError(f"memzone directory full ({MAX_ZONES} zones)")
        length = align_up(max(length, CACHE_LINE), CACHE_LINE)
        off = align_up(int(h["next_free"]), align)
        if off + length > int(h["size"]):
            free = int(h["size"]) - int(h["next_free"])
            raise MemzoneError(f"no room for memzone {name!r}: {length} bytes wanted, {max(free, 0)} free; raise --socket-mem")
        # Fill the entry slot, then publish with the count. A reserver killed before the
        # count moves leaves an unpublished slot the next reservation simply overwrites.
        e = self.entries[n]
        e["flags"] = 0
        e["name"] = name.encode()
        e["offset"] = off
        e["length"] = length
        e["schema_id"] = layout.schema_id
        e["version"] = layout.version
        e["layout_hash"] = layout.layout_hash
        e["align"] = align
        e["generation"] = int(h["generation"])
        e["flags"] = ZONE_VALID
        h["next_free"] = off + length
        h["zone_count"] = n + 1
        return self._zone(self.entries[n])

    def retag(self, name: str, layout: Layout) -> Memzone:
        """Change a zone's recorded layout (after a migration rewrote its contents in place)."""
        with self.lock:
            n = int(self.hdr[0]["zone_count"])
            hits = np.nonzero(self.entries["name"][:n] == name.encode())[0]
            if hits.size == 0:
                raise MemzoneError(f"memzone {name!r} does not exist")
            e = self.entries[int(hits[0])]
            e["schema_id"], e["version"], e["layout_hash"] = layout.schema_id, layout.version, layout.layout_hash
            return self._zone(e)

    def used_bytes(self) -> int:
        return int(self.hdr[0]["next_free"])
