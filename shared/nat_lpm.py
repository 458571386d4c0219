"""IPv4 longest-prefix match, DIR-24-8 style, with a vectorized batch lookup.

Tables (all ``uint16`` next-hop words, ``MISS`` = 0x7FFF when no route matches)::

    tbl24[2**24]              indexed by the top 24 bits of the address
      bit 15 clear: bits 0-14 are the next hop of the longest prefix of length <= 24
      bit 15 set:   bits 0-14 are a tbl8 group number; the answer is
                    tbl8[group * 256 + (addr & 0xFF)]
    tbl8[groups * 256]        next hops for /24s that have some prefix longer than /24

A lookup is one gather, plus a second gather for the addresses that hit an
extended entry: :meth:`Lpm.lookup_batch` does both over a whole burst.

For updates each entry also records the depth of the rule that wrote it
(``depth24`` / ``depth8``: prefix length + 1, 0 = no rule), so overlapping
prefixes are handled exactly: adding a prefix overwrites only the entries held
by rules no longer than it; deleting one rewrites only its own entries with the
longest remaining rule that covers it (found in the rule dictionary, the
control-plane copy of the routes). A tbl8 group whose longer-than-/24 rules are
all gone is folded back into its tbl24 entry and freed.

Update order keeps concurrent readers (other processes doing lookups on a
shared buffer) correct: a new tbl8 group is filled before the tbl24 entry that
points to it is stored, a group is folded back by storing the tbl24 entry
before the group is freed, and every entry is one aligned 2-byte store. A
reader can see a half-applied *update* (some entries of a prefix new, some
old), never a torn entry.

Memory: 48 MiB for tbl24 + depth24, plus 768 bytes per tbl8 group.
Next-hop indices are 0..0x7FFE; :class:`NextHops` assigns them to
(port, via) pairs and :func:`routes_from_config` builds the gateway's table.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hotplane.shared.nat_config import GatewayConfig

MISS = 0x7FFF
MAX_NEXT_HOP = 0x7FFE
_EXT = 0x8000
_IDX = 0x7FFF
TBL24_SIZE = 1 << 24
MAX_TBL8_GROUPS = 0x7FFF

MAGIC = 0x4D504C3834325248  # "HR248LPM" little-endian
LAYOUT_VERSION = 1
_ALIGN = 64
HEADER = np.dtype([("magic", "<u8"), ("version", "<u4"), ("groups", "<u4"), ("groups_used", "<u4"),
                   ("_pad", "<u4"), ("generation", "<u8")])


class LpmError(ValueError):
    """A bad route, or the table cannot hold it."""


class LpmFull(LpmError):
    """No free tbl8 group for a prefix longer than /24."""


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(groups: int) -> dict[str, tuple[int, int]]:
    parts = [("header", HEADER.itemsize), ("tbl24", 2 * TBL24_SIZE), ("depth24", TBL24_SIZE),
             ("tbl8", 2 * 256 * groups), ("depth8", 256 * groups), ("gused", groups)]
    out, off = {}, 0
    for name, size in parts:
        out[name] = (off, size)
        off = _align(off + size)
    out["total"] = (off, 0)
    return out


def _mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


class Lpm:
    """A DIR-24-8 route table. Create with ``Lpm(tbl8_groups)`` (private memory) or on a buffer."""

    @staticmethod
    def zone_size(tbl8_groups: int = 256) -> int:
        """Bytes of buffer :meth:`create` needs."""
        return _layout(tbl8_groups)["total"][0]

    def __init__(self, tbl8_groups: int = 256, buf: np.ndarray | None = None) -> None:
        """A new, empty table with ``tbl8_groups`` groups, on ``buf`` if given (it is initialised)."""
        if not 1 <= tbl8_groups <= MAX_TBL8_GROUPS:
            raise LpmError(f"tbl8_groups must be 1..{MAX_TBL8_GROUPS}")
        lay = _layout(tbl8_groups)
        if buf is None:
            raw = np.empty(lay["total"][0] + _ALIGN, dtype=np.uint8)
            skip = (-raw.ctypes.data) % _ALIGN
            buf = raw[skip:skip + lay["total"][0]]
        self._map(buf, lay)
        self.tbl24.fill(MISS)
        self.depth24.fill(0)
        self.tbl8.fill(MISS)
        self.depth8.fill(0)
        self._gused.fill(0)
        self._hdr["groups"] = tbl8_groups
        self._hdr["groups_used"] = 0
        self._hdr["generation"] = 0
        self._hdr["version"] = LAYOUT_VERSION
        self._hdr["magic"] = MAGIC
        self._rules: dict[tuple[int, int], int] | None = {}

    @classmethod
    def create(cls, buf: np.ndarray, tbl8_groups: int = 256) -> "Lpm":
        """Initialise a table on a caller's buffer (``zone_size`` bytes, 64-byte aligned uint8)."""
        return cls(tbl8_groups, buf)

    @classmethod
    def attach(cls, buf: np.ndarray) -> "Lpm":
        """A lookup-only view of a table another process maintains (its rules are not known here)."""
        hdr = buf[: HEADER.itemsize].view(HEADER)
        if int(hdr["magic"][0]) != MAGIC or int(hdr["version"][0]) != LAYOUT_VERSION:
            raise LpmError("the buffer does not hold a version-1 LPM table")
        self = cls.__new__(cls)
        self._map(buf, _layout(int(hdr["groups"][0])))
        self._rules = None
        return self

    def _map(self, buf: np.ndarray, lay: dict[str, tuple[int, int]]) -> None:
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            raise LpmError("the LPM buffer must be a C-contiguous 1-D uint8 array")
        if buf.ctypes.data % _ALIGN:
            raise LpmError(f"the LPM buffer must be {_ALIGN}-byte aligned")
        if buf.nbytes < lay["total"][0]:
            raise LpmError(f"the LPM buffer has {buf.nbytes} bytes; it needs {lay['total'][0]}")

        def part(name: str, dtype: str) -> np.ndarray:
            off, size = lay[name]
            return buf[off:off + size].view(dtype)

        self._buf = buf
        self._hdr = buf[: HEADER.itemsize].view(HEADER)
        self.tbl24 = part("tbl24", "<u2")
        self.depth24 = part("depth24", "u1")
        self.tbl8 = part("tbl8", "<u2")
        self.depth8 = part("depth8", "u1")
        self._gused = part("gused", "u1")
        self.groups = len(self._gused)

    # ------------------------------------------------------------------ lookups

    def lookup(self, addr: int) -> int:
        """Next hop for one address (``MISS`` if no route)."""
        e = int(self.tbl24[(int(addr) & 0xFFFFFFFF) >> 8])
        if e & _EXT:
            e = int(self.tbl8[(e & _IDX) * 256 + (int(addr) & 0xFF)])
        return e

    def lookup_batch(self, addrs: np.ndarray) -> np.ndarray:
        """Next hops (``uint16``, ``MISS`` for no route) for a ``uint32`` array of addresses."""
        a = np.asarray(addrs, dtype=np.uint32)
        e = self.tbl24[a >> 8]
        ext = np.flatnonzero(e & _EXT)
        if len(ext):
            g = (e[ext] & _IDX).astype(np.intp)
            e[ext] = self.tbl8[g * 256 + (a[ext] & 0xFF)]
        return e

    # ------------------------------------------------------------------ updates

    @property
    def groups_used(self) -> int:
        return int(self._hdr["groups_used"][0])

    @property
    def generation(self) -> int:
        """Incremented after every completed add/delete (readers can notice changes)."""
        return int(self._hdr["generation"][0])

    def rules(self) -> dict[tuple[int, int], int]:
        """``{(prefix, length): next_hop}`` of the routes added (a copy)."""
        return dict(self._writable_rules())

    def _writable_rules(self) -> dict[tuple[int, int], int]:
        if self._rules is None:
            raise LpmError("this table was attached for lookups; only its creator changes routes")
        return self._rules

    @staticmethod
    def _check(prefix: int, plen: int) -> int:
        if not 0 <= plen <= 32:
            raise LpmError(f"prefix length {plen} is not 0..32")
        prefix = int(prefix)
        if not 0 <= prefix <= 0xFFFFFFFF:
            raise LpmError(f"{prefix} is not an IPv4 address")
        if prefix & ~_mask(plen) & 0xFFFFFFFF:
            raise LpmError(f"{ipaddress.IPv4Address(prefix)}/{plen} has host bits set")
        return prefix

    def add(self, prefix: int, plen: int, next_hop: int) -> None:
        """Route ``prefix/plen`` to ``next_hop`` (0..0x7FFE), replacing that exact prefix's route if any.

        Raises :class:`LpmFull` (table unchanged) when a prefix longer than /24
        needs a tbl8 group and none is free.
        """
        rules = self._writable_rules()
        prefix = self._check(prefix, plen)
        if not 0 <= next_hop <= MAX_NEXT_HOP:
            raise LpmError(f"next hop {next_hop} is not 0..{MAX_NEXT_HOP}")
        d = plen + 1
        if plen <= 24:
            start, n = prefix >> 8, 1 << (24 - plen)
            t = self.tbl24[start:start + n]
            dd = self.depth24[start:start + n]
            ext = (t & _EXT) != 0
            plain = ~ext & (dd <= d)
            t[plain] = next_hop
            dd[plain] = d
            self._update_groups(t[ext], lambda depth: depth <= d, next_hop, d)
        else:
            i = prefix >> 8
            e = int(self.tbl24[i])
            if e & _EXT:
                g = e & _IDX
            else:
                g = self._alloc_group()
                sl = slice(g * 256, (g + 1) * 256)
                self.tbl8[sl] = e
                self.depth8[sl] = self.depth24[i]
                self.tbl24[i] = _EXT | g  # publish after the group is filled
            lo = g * 256 + (prefix & 0xFF)
            sl = slice(lo, lo + (1 << (32 - plen)))
            t, dd = self.tbl8[sl], self.depth8[sl]
            m = dd <= d
            t[m] = next_hop
            dd[m] = d
        rules[(prefix, plen)] = next_hop
        self._hdr["generation"] += 1

    def delete(self, prefix: int, plen: int) -> bool:
        """Remove the route for exactly ``prefix/plen``; False if there was none.

        Addresses it covered fall back to the longest remaining covering route.
        """
        rules = self._writable_rules()
        prefix = self._check(prefix, plen)
        if (prefix, plen) not in rules:
            return False
        del rules[(prefix, plen)]
        nh, nd = MISS, 0
        for l in range(plen - 1, -1, -1):
            r = rules.get((prefix & _mask(l), l))
            if r is not None:
                nh, nd = r, l + 1
                break
        d = plen + 1
        if plen <= 24:
            start, n = prefix >> 8, 1 << (24 - plen)
            t = self.tbl24[start:start + n]
            dd = self.depth24[start:start + n]
            ext = (t & _EXT) != 0
            mine = ~ext & (dd == d)
            t[mine] = nh
            dd[mine] = nd
            self._update_groups(t[ext], lambda depth: depth == d, nh, nd)
        else:
            i = prefix >> 8
            g = int(self.tbl24[i]) & _IDX
            lo = g * 256 + (prefix & 0xFF)
            sl = slice(lo, lo + (1 << (32 - plen)))
            t, dd = self.tbl8[sl], self.depth8[sl]
            mine = dd == d
            t[mine] = nh
            dd[mine] = nd
            self._maybe_fold(i, g)
        self._hdr["generation"] += 1
        return True

    def _update_groups(self, entries: np.ndarray, which, nh: int, d: int) -> None:
        """In every tbl8 group named by ``entries`` (extended tbl24 words), set the entries ``which`` selects."""
        if not len(entries):
            return
        groups = (entries & _IDX).astype(np.intp)
        idx = (groups[:, None] * 256 + np.arange(256)).ravel()
        sel = idx[which(self.depth8[idx])]
        self.tbl8[sel] = nh
        self.depth8[sel] = d

    def _maybe_fold(self, i: int, g: int) -> None:
        """Fold group ``g`` back into ``tbl24[i]`` when no rule longer than /24 is left in it."""
        sl = slice(g * 256, (g + 1) * 256)
        if int(self.depth8[sl].max()) > 25:
            return
        # With only /0../24 rules left, one rule covers the whole /24: all entries are alike.
        self.depth24[i] = self.depth8[g * 256]
        self.tbl24[i] = self.tbl8[g * 256]  # readers stop using the group here
        self.tbl8[sl] = MISS
        self.depth8[sl] = 0
        self._gused[g] = 0
        self._hdr["groups_used"] -= 1

    def _alloc_group(self) -> int:
        free = np.flatnonzero(self._gused == 0)
        if not len(free):
            raise LpmFull(f"all {self.groups} tbl8 groups are in use; no room for another /24 with "
                          "longer prefixes (create the table with more tbl8_groups)")
        g = int(free[0])
        self._gused[g] = 1
        self._hdr["groups_used"] += 1
        return g


# --------------------------------------------------------------------------- next hops and config

@dataclass(frozen=True)
class NextHop:
    """Where a route sends packets: out of ``port`` ("inside"/"outside"), to ``via`` or (None) on-link."""

    port: str
    via: int | None = None


class NextHops:
    """Assigns small indices to distinct next hops (the values stored in the LPM)."""

    def __init__(self) -> None:
        self._list: list[NextHop] = []
        self._index: dict[NextHop, int] = {}

    def index(self, hop: NextHop) -> int:
        """The index of ``hop``, assigning the next free one the first time."""
        i = self._index.get(hop)
        if i is None:
            if len(self._list) > MAX_NEXT_HOP:
                raise LpmError(f"more than {MAX_NEXT_HOP + 1} distinct next hops")
            i = len(self._list)
            self._list.append(hop)
            self._index[hop] = i
        return i

    def __getitem__(self, i: int) -> NextHop:
        return self._list[i]

    def __len__(self) -> int:
        return len(self._list)

    def as_list(self) -> list[NextHop]:
        return list(self._list)


def routes_from_config(config: "GatewayConfig", tbl8_groups: int = 256) -> tuple[Lpm, NextHops]:
    """The gateway's route table: the two on-link networks plus every ``[[routes]]`` entry."""
    lpm, hops = Lpm(tbl8_groups), NextHops()
    gw = config.gateway
    for port in ("inside", "outside"):
        net = gw.network_of(port)
        lpm.add(int(net.network_address), net.prefixlen, hops.index(NextHop(port)))
    for r in config.routes:
        via = None if r.via is None else int(r.via)
        lpm.add(int(r.prefix.network_address), r.prefix.prefixlen, hops.index(NextHop(r.port, via)))
    return lpm, hops
