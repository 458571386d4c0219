"""The registry of every layout that lives in shared memory.

A layout is declared once, as numpy structured dtypes, with a schema id and a
version. Its layout hash is derived from the dtypes themselves (field names,
types, offsets, item sizes), so two builds that disagree about a layout can
never agree about its hash. Attaching code calls :func:`check` and refuses,
with a message saying what it found and what it expected, anything it does
not understand (DESIGN invariant 4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

CACHE_LINE = 64


class SchemaError(Exception):
    """A zone's schema id, version or layout hash is not one this build understands."""


@dataclass(frozen=True)
class Layout:
    """One versioned shared-memory layout.

    ``header`` is the fixed struct at the start of a zone (or None); ``element``
    is the dtype of the array that follows it (or None). The element array
    starts at ``header_size`` (the header rounded up to a cache line).
    """

    name: str
    schema_id: int
    version: int
    header: np.dtype | None = None
    element: np.dtype | None = None
    doc: str = ""
    layout_hash: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout_hash", _hash_dtypes(self.name, self.header, self.element))

    @property
    def header_size(self) -> int:
        """Bytes taken by the header, rounded up to a cache line (0 without a header)."""
        if self.header is None:
            return 0
        return align_up(self.header.itemsize, CACHE_LINE)

    def zone_size(self, count: int = 0) -> int:
        """Bytes a zone needs for the header plus ``count`` elements."""
        n = self.header_size
        if self.element is not None:
            n += self.element.itemsize * count
        return align_up(max(n, CACHE_LINE), CACHE_LINE)

    def describe(self) -> str:
        return f"{self.name} (schema id {self.schema_id}, version {self.version}, layout hash {self.layout_hash:#018x})"


def align_up(n: int, a: int) -> int:
    """Round ``n`` up to a multiple of ``a`` (a power of two)."""
    return (n + a - 1) & ~(a - 1)


def _dtype_signature(dt: np.dtype | None) -> str:
    if dt is None:
        return "none"
    # descr lists names, types and padding; itemsize and offsets pin the exact placement.
    parts = [repr(dt.descr), str(dt.itemsize)]
    if dt.names:
        parts.extend(f"{n}@{dt.fields[n][1]}" for n in dt.names)
    return ";".join(parts)


def _hash_dtypes(name: str, header: np.dtype | None, element: np.dtype | None) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(name.encode())
    h.update(b"|")
    h.update(_dtype_signature(header).encode())
    h.update(b"|")
    h.update(_dtype_signature(element).encode())
    # Top bit cleared so the hash always fits a signed int64 field too.
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


_LAYOUTS: dict[tuple[int, int], Layout] = {}
_BY_NAME: dict[str, dict[int, Layout]] = {}
_MIGRATIONS: dict[tuple[int, int, int], Callable[..., object]] = {}


def register(layout: Layout) -> Layout:
    """Add a layout to the registry; registering the same layout twice is harmless."""
    key = (layout.schema_id, layout.version)
    old = _LAYOUTS.get(key)
    if old is not None and old.layout_hash != layout.layout_hash:
        raise SchemaError(f"schema id {layout.schema_id} version {layout.version} registered twice with different layouts: {old.name} and {layout.name}")
    other = _BY_NAME.get(layout.name, {})
    if other and next(iter(other.values())).schema_id != layout.schema_id:
        raise SchemaError(f"layout name {layout.name!r} used by two schema ids")
    _LAYOUTS[key] = layout
    _BY_NAME.setdefault(layout.name, {})[layout.version] = layout
    return layout


def get(schema_id: int, version: int) -> Layout:
    """The registered layout for (schema id, version), or SchemaError."""
    try:
        return _LAYOUTS[(schema_id, version)]
    except KeyError:
        known = sorted(v for (i, v) in _LAYOUTS if i == schema_id)
        if not known:
            raise SchemaError(f"unknown schema id {schema_id}: this build knows ids {sorted({i for i, _ in _LAYOUTS})}") from None
        raise SchemaError(f"schema id {schema_id} ({_name_of(schema_id)}) version {version} is not known to this build, which understands versions {known}") from None


def latest(name: str) -> Layout:
    """The newest registered version of the named layout."""
    versions = _BY_NAME.get(name)
    if not versions:
        raise SchemaError(f"no layout named {name!r}")
    return versions[max(versions)]


def by_name(name: str, version: int) -> Layout:
    try:
        return _BY_NAME[name][version]
    except KeyError:
        raise SchemaError(f"no layout named {name!r} at version {version}") from None


def all_layouts() -> list[Layout]:
    return sorted(_LAYOUTS.values(), key=lambda l: (l.schema_id, l.version))


def _name_of(schema_id: int) -> str:
    for (i, _), lay in _LAYOUTS.items():
        if i == schema_id:
            return lay.name
    return "?"


def check(schema_id: int, version: int, layout_hash: int, *, what: str = "zone") -> Layout:
    """Validate what a zone says about itself against this build's registry.

    Returns the layout, or raises SchemaError naming what was found and what
    was expected: code never guesses at a layout it does not understand.
    """
    lay = get(schema_id, version)
    if lay.layout_hash != layout_hash:
        raise SchemaError(
            f"{what}: layout hash mismatch for {lay.name} version {version}: "
            f"found {layout_hash:#018x}, this build expects {lay.layout_hash:#018x}; "
            "the zone was written by a build with a different layout for the same version"
        )
    return lay


def register_migration(schema_id: int, from_version: int, to_version: int):
    """Decorator: register ``fn(src_zone_view, dst_zone_view, ...)`` migrating one version to another."""

    def deco(fn: Callable[..., object]) -> Callable[..., object]:
        _MIGRATIONS[(schema_id, from_version, to_version)] = fn
        return fn

    return deco


def migration(schema_id: int, from_version: int, to_version: int) -> Callable[..., object]:
    """The registered migration, or SchemaError saying none exists."""
    try:
        return _MIGRATIONS[(schema_id, from_version, to_version)]
    except KeyError:
        raise SchemaError(f"no migration registered for {_name_of(schema_id)} (schema id {schema_id}) from version {from_version} to {to_version}") from None


def compatibility(schema_id: int, version: int, layout_hash: int, target_version: int | None = None) -> str:
    """'compatible', 'needs migration' or 'refused: <why>' for a zone as this build sees it."""
    try:
        lay = check(schema_id, version, layout_hash)
    except SchemaError as e:
        return f"refused: {e}"
    want = target_version if target_version is not None else latest(lay.name).version
    if want == version:
        return "compatible"
    if (schema_id, version, want) in _MIGRATIONS:
        return "needs migration"
    return f"refused: no migration from version {version} to {want}"


# Every zone header starts with these fields, so a zone describes itself even
# when it is reached without the directory (a ring handed to a peer, say).
HEADER_PREFIX: list[tuple[str, str]] = [("schema_id", "<u4"), ("version", "<u4"), ("layout_hash", "<u8")]


def header_dtype(fields: list[tuple], align: bool = False) -> np.dtype:
    """A header dtype: the common prefix followed by ``fields``."""
    return np.dtype(HEADER_PREFIX + list(fields), align=align)


def stamp(header: np.ndarray, layout: Layout) -> None:
    """Write the layout's identity into a zone header (a 0-d or 1-element structured view)."""
    h = header.reshape(-1)[0] if header.ndim else header
    h["schema_id"] = layout.schema_id
    h["version"] = layout.version
    h["layout_hash"] = layout.layout_hash


def verify(header: np.ndarray, expected: "Layout | str", *, what: str = "zone") -> Layout:
    """Check a zone header's identity; returns the layout it has.

    ``expected`` is a Layout (exact match required) or a layout name (any
    registered version of that name is accepted, so a caller can then migrate).
    """
    h = header.reshape(-1)[0] if header.ndim else header
    sid, ver, lh = int(h["schema_id"]), int(h["version"]), int(h["layout_hash"])
    if sid == 0 and ver == 0 and lh == 0:
        raise SchemaError(f"{what}: header is all zero: the zone was never initialised (or was wiped)")
    lay = check(sid, ver, lh, what=what)
    if isinstance(expected, Layout):
        if lay.schema_id != expected.schema_id or lay.version != expected.version:
            raise SchemaError(f"{what}: found {lay.describe()}, expected {expected.describe()}")
    elif lay.name != expected:
        raise SchemaError(f"{what}: found {lay.describe()}, expected a {expected!r} layout")
    return lay
