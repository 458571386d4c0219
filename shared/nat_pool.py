"""The outside address/port allocator of one worker (the NAT slow path).

Each worker owns a block ``[port_lo, port_hi)`` of outside ports on every pool
address (CONTRACTS.md "Steering"), so replies reach the worker that created the
mapping; this allocator only ever hands out ports from its own block.

What it does (the session table keeps the mapping itself, and with it
endpoint-independent mapping, RFC 4787 REQ-1: it asks this allocator only when
an inside address:port has no mapping yet):

* **Paired pooling** (RFC 4787 REQ-2): an inside host is given one outside
  address and keeps it while it holds any port. A new host starts at a
  deterministic hash of its address over the pool and probes forward to the
  first address with a port available; a known host is only ever given ports
  on its address (when that address has none left in this block, allocation
  fails with PORTS_EXHAUSTED rather than breaking the pairing).
  Caveat: each worker pairs independently. The first choice is the same hash in
  every worker, so a host normally sees one address gateway-wide; only when that
  address is exhausted in one worker's block can the probe make that worker pick
  another.
* **Port preservation**: the inside port is kept when it lies in this worker's
  block and is available, and only then.
* **Port class and parity** (RFC 4787 REQ-3a, REQ-4, both RECOMMENDED): otherwise
  the next available port (from a rotating per-address cursor) is chosen with,
  in order of preference: the same class and parity; the same class. Classes are
  0-1023 and 1024-65535. A source port >= 1024 is never given a well-known port
  (< 1024). A source port < 1024 gets a port < 1024 when this block has one
  available, else any available port (same parity first): with the default
  ``port_lo = 1024`` no block holds well-known ports, and refusing such flows
  outright would break them.
* **ICMP identifiers** are a separate space (tcp, udp and icmp each have their
  own map) with preservation and the rotating cursor, but no class or parity.
* **Per-host port quota** (RFC 6888 per-subscriber limits): a host holding ``port_quota`` ports
  is refused (HOST_PORT_QUOTA); 0 = unlimited.
* **Reuse hold** (RFC 6888): a released port is not handed out again for
  ``hold`` seconds (default 120) of the clock.
* **Deterministic**: the same sequence of calls at the same clock readings gives
  the same results (no randomness, no Python ``hash``).

State lives in one flat ``uint8`` buffer (header, pool addresses, cursors, the
host table and the port maps), so it can sit in a shared-memory zone:
:meth:`PortAllocator.create` / :meth:`PortAllocator.attach` on a caller's buffer,
or :meth:`PortAllocator.to_array` / :meth:`PortAllocator.from_array`.

Port map encoding, one ``uint32`` per (space, pool address, block port):
``0`` available, ``0xFFFFFFFF`` in use, anything else "held until" that clock
reading (a hold ending on 0 or 0xFFFFFFFF is nudged to 1, at most 2 s longer).
A word (not a bit) per port is what keeps the hold exact without a side queue:
with the defaults (2 workers, 16 addresses) a worker's maps take 6.2 MB.

Host table: open addressing with linear probing and backward-shift deletion
(no tombstones), ``host_capacity`` hosts in a power-of-two number of slots at
most half full.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from hotplane.shared.nat_clock import Clock

if TYPE_CHECKING:
    from hotplane.shared.nat_config import GatewayConfig, NatSection

SPACE_TCP, SPACE_UDP, SPACE_ICMP = 0, 1, 2
N_SPACES = 3
_SPACE_OF_PROTO = {6: SPACE_TCP, 17: SPACE_UDP, 1: SPACE_ICMP}

PORT_FREE = 0
PORT_IN_USE = 0xFFFFFFFF

MAGIC = 0x4C4F4F5054414E48  # "HNATPOOL" little-endian
LAYOUT_VERSION = 1
_ALIGN = 64

HEADER = np.dtype([
    ("magic", "<u8"), ("version", "<u4"), ("n_addr", "<u4"),
    ("port_lo", "<u4"), ("port_hi", "<u4"), ("host_slots", "<u4"), ("host_capacity", "<u4"),
    ("hold", "<u4"), ("port_quota", "<u4"), ("hosts", "<u4"), ("_pad", "<u4"),
    ("allocated", "<u8"), ("failed", "<u8"),
])
HOST = np.dtype([("key", "<u4"), ("used", "<u4"), ("addr_idx", "<u4"), ("nports", "<u4")])


class AllocStatus(enum.IntEnum):
    OK = 0
    PORTS_EXHAUSTED = 1   # no port available on the host's (or any) address in this block
    HOST_PORT_QUOTA = 2   # the host already holds port_quota ports
    HOST_TABLE_FULL = 3   # host_capacity distinct hosts already hold ports


class Allocation(NamedTuple):
    """Result of :meth:`PortAllocator.allocate`; ``addr``/``port`` are 0 unless ``status`` is OK."""

    status: AllocStatus
    addr: int = 0
    port: int = 0
    preserved: bool = False

    @property
    def ok(self) -> bool:
        return self.status == AllocStatus.OK


class PoolError(ValueError):
    """A buffer or argument the allocator cannot use."""


def space_of(proto: int) -> int:
    """The port space of an IP protocol number (6 tcp, 17 udp, 1 icmp)."""
    try:
        return _SPACE_OF_PROTO[int(proto)]
    except KeyError:
        raise PoolError(f"protocol {proto} has no port space; only tcp (6), udp (17) and icmp (1) do") from None


def _fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finaliser: a fixed, well-mixing hash (deterministic across processes)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _host_slots(capacity: int) -> int:
    slots = 8
    while slots < 2 * capacity:
        slots *= 2
    return slots


def _layout(n_addr: int, nblock: int, host_capacity: int) -> dict[str, tuple[int, int]]:
    """Byte offset and size of each part of the buffer."""
    parts = [
        ("header", HEADER.itemsize),
        ("addrs", 4 * n_addr),
        ("hints", 4 * N_SPACES * n_addr),
        ("inuse", 4 * N_SPACES * n_addr),
        ("hosts", HOST.itemsize * _host_slots(host_capacity)),
        ("ports", 4 * N_SPACES * n_addr * nblock),
    ]
    out, off = {}, 0
    for name, size in parts:
        out[name] = (off, size)
        off = _align(off + size)
    out["total"] = (off, 0)
    return out


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zeroed, 64-byte-aligned, writable uint8 array of ``nbytes`` (a private stand-in for a memzone)."""
    raw = np.zeros(nbytes + _ALIGN, dtype=np.uint8)
    skip = (-raw.ctypes.data) % _ALIGN
    return raw[skip:skip + nbytes]


class PortAllocator:
    """Outside address/port allocation for one worker's port block. See the module docstring."""

    # ------------------------------------------------------------------ construction

    @staticmethod
    def zone_size(n_addr: int, nblock: int, host_capacity: int) -> int:
        """Bytes of buffer needed for ``n_addr`` pool addresses, ``nblock`` ports and ``host_capacity`` hosts."""
        return _layout(n_addr, nblock, host_capacity)["total"][0]

    @classmethod
    def new(cls, pool: Sequence[int] | np.ndarray, port_lo: int, port_hi: int, clock: Clock, *,
            hold: int = 120, port_quota: int = 0, host_capacity: int = 4096) -> "PortAllocator":
        """An allocator on a private buffer (see :meth:`create` for the arguments)."""
        n_addr = len(np.asarray(pool))
        buf = aligned_buffer(cls.zone_size(n_addr, port_hi - port_lo, host_capacity))
        return cls.create(buf, pool, port_lo, port_hi, clock, hold=hold, port_quota=port_quota,
                          host_capacity=host_capacity)

    @classmethod
    def create(cls, buf: np.ndarray, pool: Sequence[int] | np.ndarray, port_lo: int, port_hi: int,
               clock: Clock, *, hold: int = 120, port_quota: int = 0,
               host_capacity: int = 4096) -> "PortAllocator":
        """Initialise ``buf`` (zeroed here) for the block ``[port_lo, port_hi)`` on the ``pool`` addresses.

        ``pool``: distinct IPv4 addresses as ints (kept sorted); ``hold``: seconds a
        released port stays unavailable; ``port_quota``: ports per inside host, 0 =
        unlimited; ``host_capacity``: distinct inside hosts holding ports at once.
        """
        addrs = np.unique(np.asarray(pool, dtype=np.int64))
        if len(addrs) != len(np.asarray(pool)):
            raise PoolError("the pool lists an address twice")
        if len(addrs) == 0:
            raise PoolError("the pool is empty")
        if addrs[0] < 0 or addrs[-1] > 0xFFFFFFFF:
            raise PoolError("pool addresses must be IPv4 addresses as unsigned 32-bit ints")
        if not 0 <= port_lo < port_hi <= 65536:
            raise PoolError(f"bad port block [{port_lo}, {port_hi}); need 0 <= port_lo < port_hi <= 65536")
        if not 0 <= hold < 1 << 31 or port_quota < 0 or host_capacity < 1:
            raise PoolError("hold must be 0..2**31-1 s, port_quota >= 0 and host_capacity >= 1")
        lay = _layout(len(addrs), port_hi - port_lo, host_capacity)
        cls._check_buffer(buf, lay["total"][0])
        buf[: lay["total"][0]] = 0
        hdr = buf[: HEADER.itemsize].view(HEADER)
        hdr["n_addr"] = len(addrs)
        hdr["port_lo"], hdr["port_hi"] = port_lo, port_hi
        hdr["host_slots"], hdr["host_capacity"] = _host_slots(host_capacity), host_capacity
        hdr["hold"], hdr["port_quota"] = hold, port_quota
        off, size = lay["addrs"]
        buf[off:off + size].view("<u4")[:] = addrs.astype(np.uint32)
        hdr["version"] = LAYOUT_VERSION
        hdr["magic"] = MAGIC  # last: the buffer is valid from here on
        return cls(buf, clock)

    @classmethod
    def attach(cls, buf: np.ndarray, clock: Clock) -> "PortAllocator":
        """Use the allocator state already in ``buf`` (verified, not modified)."""
        return cls(buf, clock)

    def to_array(self) -> np.ndarray:
        """A copy of the whole state as a flat ``uint8`` array (see :meth:`from_array`)."""
        out = aligned_buffer(self._size)
        out[:] = self._buf[: self._size]
        return out

    @classmethod
    def from_array(cls, arr: np.ndarray, clock: Clock) -> "PortAllocator":
        """An allocator working on ``arr`` in place (a :meth:`to_array` result or a shared buffer)."""
        if arr.ctypes.data % _ALIGN:
            copy = aligned_buffer(arr.nbytes)
            copy[:] = arr
            arr = copy
        return cls(arr, clock)

    @staticmethod
    def _check_buffer(buf: np.ndarray, need: int) -> None:
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
            raise PoolError("the allocator buffer must be a 1-D numpy uint8 array")
        if not buf.flags.c_contiguous or not buf.flags.writeable:
            raise PoolError("the allocator buffer must be C-contiguous and writable")
        if buf.ctypes.data % _ALIGN:
            raise PoolError(f"the allocator buffer must be {_ALIGN}-byte aligned")
        if buf.nbytes < need:
            raise PoolError(f"the allocator buffer has {buf.nbytes} bytes; it needs {need}")

    def __init__(self, buf: np.ndarray, clock: Clock) -> None:
        """Attach to an initialised buffer; prefer :meth:`new`, :meth:`create` or :meth:`attach`."""
        if buf.nbytes < HEADER.itemsize:
            raise PoolError("the allocator buffer is smaller than its header")
        self._check_buffer(buf, HEADER.itemsize)
        hdr = buf[: HEADER.itemsize].view(HEADER)
        if int(hdr["magic"][0]) != MAGIC:
            raise PoolError("the buffer does not hold port allocator state (bad magic); create() it first")
        if int(hdr["version"][0]) != LAYOUT_VERSION:
            raise PoolError(f"port allocator layout version {int(hdr['version'][0])} is not the supported "
                            f"version {LAYOUT_VERSION}")
        self.clock = clock
        self._buf = buf
        self._hdr = hdr
        n_addr = int(hdr["n_addr"][0])
        self.port_lo = int(hdr["port_lo"][0])
        self.port_hi = int(hdr["port_hi"][0])
        self.nblock = self.port_hi - self.port_lo
        self.host_capacity = int(hdr["host_capacity"][0])
        lay = _layout(n_addr, self.nblock, self.host_capacity)
        self._size = lay["total"][0]
        self._check_buffer(buf, self._size)

        def part(name: str, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.ndarray:
            off, size = lay[name]
            return buf[off:off + size].view(dtype).reshape(shape)

        self.addrs = part("addrs", "<u4", (n_addr,))
        self._hints = part("hints", "<u4", (N_SPACES, n_addr))
        self._inuse = part("inuse", "<u4", (N_SPACES, n_addr))
        self._hosts = part("hosts", HOST, (int(hdr["host_slots"][0]),))
        self.ports = part("ports", "<u4", (N_SPACES, n_addr, self.nblock))
        self._host_mask = len(self._hosts) - 1
        self._addr_index = {int(a): i for i, a in enumerate(self.addrs)}
        # Per block position: port number, class (well-known?) and parity, for the searches.
        port_numbers = np.arange(self.port_lo, self.port_hi, dtype=np.int64)
        self._wellknown = port_numbers < 1024
        self._odd = (port_numbers & 1).astype(bool)
        self._has_wellknown = bool(self._wellknown.any())

    @classmethod
    def for_worker(cls, config: "GatewayConfig | NatSection", worker: int, clock: Clock, *,
                   host_capacity: int = 4096, buf: np.ndarray | None = None) -> "PortAllocator":
        """The allocator of worker ``worker`` per the NAT config: its block, the pool, the hold,
        its share of ``per_host_ports``, and the static port forwards in its block reserved."""
        nat = getattr(config, "nat", config)
        lo, hi = nat.worker_port_range(worker)
        pool = nat.pool_addresses()
        quota = nat.per_worker_limit(nat.per_host_ports, nat.workers)
        kw = dict(hold=nat.timeouts.port_reuse_hold, port_quota=quota, host_capacity=host_capacity)
        alloc = cls.new(pool, lo, hi, clock, **kw) if buf is None else cls.create(buf, pool, lo, hi, clock, **kw)
        for m in nat.static:
            if not m.one_to_one:
                alloc.reserve(m.proto_number, int(m.outside_addr), m.outside_port)
        return alloc

    # ------------------------------------------------------------------ properties

    @property
    def hold(self) -> int:
        return int(self._hdr["hold"][0])

    @property
    def port_quota(self) -> int:
        return int(self._hdr["port_quota"][0])

    @property
    def hosts(self) -> int:
        """Distinct inside hosts currently holding ports."""
        return int(self._hdr["hosts"][0])

    @property
    def allocated_total(self) -> int:
        """Successful allocations since creation."""
        return int(self._hdr["allocated"][0])

    @property
    def failed_total(self) -> int:
        """Refused allocations since creation."""
        return int(self._hdr["failed"][0])

    def in_use(self, proto: int | None = None) -> int:
        """Ports in use (allocated or reserved), in one protocol's space or all."""
        return int(self._inuse.sum() if proto is None else self._inuse[space_of(proto)].sum())

    def held(self, proto: int | None = None) -> int:
        """Ports released less than ``hold`` seconds ago (unavailable until then)."""
        maps = self.ports if proto is None else self.ports[space_of(proto)]
        return int(self._held_mask(maps, self.clock.now()).sum())

    def __len__(self) -> int:
        return len(self.addrs)

    # ------------------------------------------------------------------ queries

    def port_state(self, proto: int, addr: int, port: int) -> str:
        """``"free"``, ``"in_use"``, ``"held"`` or ``"foreign"`` (not this worker's block or pool)."""
        loc = self._locate(proto, addr, port)
        if loc is None:
            return "foreign"
        w = int(self.ports[loc])
        if w == PORT_IN_USE:
            return "in_use"
        if w == PORT_FREE or self._hold_over(w, self.clock.now()):
            return "free"
        return "held"

    def address_of(self, inside_addr: int) -> int | None:
        """The outside address paired with ``inside_addr``, or None when it holds no ports here."""
        slot = self._find_host(inside_addr)
        return None if slot < 0 else int(self.addrs[self._hosts["addr_idx"][slot]])

    def ports_of(self, inside_addr: int) -> int:
        """How many ports ``inside_addr`` holds in this worker."""
        slot = self._find_host(inside_addr)
        return 0 if slot < 0 else int(self._hosts["nports"][slot])

    def preferred_address(self, inside_addr: int) -> int:
        """The pool address a new host is tried on first (a fixed hash over the pool)."""
        return int(self.addrs[_fmix32(inside_addr) % len(self.addrs)])

    # ------------------------------------------------------------------ allocation

    def allocate(self, proto: int, inside_addr: int, inside_port: int) -> Allocation:
        """Pick an outside address and port for a new mapping of ``inside_addr:inside_port``.

        ``proto``: 6, 17 or 1 (for ICMP, ``inside_port`` is the echo identifier).
        Never fails with an exception on exhaustion: the status says why.
        """
        space = space_of(proto)
        inside_addr = int(inside_addr) & 0xFFFFFFFF
        inside_port = int(inside_port) & 0xFFFF
        now = self.clock.now()
        slot = self._find_host(inside_addr)
        if slot >= 0:
            quota = self.port_quota
            if quota and int(self._hosts["nports"][slot]) >= quota:
                return self._fail(AllocStatus.HOST_PORT_QUOTA)
            a = int(self._hosts["addr_idx"][slot])
            pos, preserved = self._pick_port(space, a, inside_port, now)
            if pos < 0:
                return self._fail(AllocStatus.PORTS_EXHAUSTED)
            self._hosts["nports"][slot] += 1
            return self._take(space, a, pos, preserved)
        if self.hosts >= self.host_capacity:
            return self._fail(AllocStatus.HOST_TABLE_FULL)
        n = len(self.addrs)
        start = _fmix32(inside_addr) % n
        for k in range(n):
            a = (start + k) % n
            pos, preserved = self._pick_port(space, a, inside_port, now)
            if pos >= 0:
                self._insert_host(inside_addr, a)
                return self._take(space, a, pos, preserved)
        return self._fail(AllocStatus.PORTS_EXHAUSTED)

    def release(self, proto: int, outside_addr: int, outside_port: int, inside_addr: int) -> bool:
        """Return a port allocated to ``inside_addr``; it is held for ``hold`` seconds.

        Returns False (and changes nothing) when the port is not in use here: a
        release that does not match an allocation must not corrupt the counts.
        """
        loc = self._locate(proto, outside_addr, outside_port)
        if loc is None or int(self.ports[loc]) != PORT_IN_USE:
            return False
        slot = self._find_host(int(inside_addr) & 0xFFFFFFFF)
        if slot < 0 or int(self._hosts["addr_idx"][slot]) != loc[1]:
            return False
        self._free_port(loc)
        self._hosts["nports"][slot] -= 1
        if int(self._hosts["nports"][slot]) == 0:
            self._delete_host(slot)
        return True

    def reserve(self, proto: int, outside_addr: int, outside_port: int) -> bool:
        """Mark a port in use for a static mapping; False when it is not in this block/pool.

        Raises :class:`PoolError` when the port is already in use.
        """
        loc = self._locate(proto, outside_addr, outside_port)
        if loc is None:
            return False
        if int(self.ports[loc]) == PORT_IN_USE:
            raise PoolError(f"port {outside_port} on {_fmt(outside_addr)} is already in use")
        self.ports[loc] = PORT_IN_USE
        self._inuse[loc[0], loc[1]] += 1
        return True

    def unreserve(self, proto: int, outside_addr: int, outside_port: int) -> bool:
        """Undo :meth:`reserve` (the port is held like any released port)."""
        loc = self._locate(proto, outside_addr, outside_port)
        if loc is None or int(self.ports[loc]) != PORT_IN_USE:
            return False
        self._free_port(loc)
        return True

    # ------------------------------------------------------------------ internals: ports

    def _locate(self, proto: int, addr: int, port: int) -> tuple[int, int, int] | None:
        a = self._addr_index.get(int(addr))
        port = int(port)
        if a is None or not self.port_lo <= port < self.port_hi:
            return None
        return space_of(proto), a, port - self.port_lo

    @staticmethod
    def _hold_over(word: int, now: int) -> bool:
        """A held word's release time has come (wrap-safe signed comparison)."""
        d = (now - word) & 0xFFFFFFFF
        return d < 0x80000000

    @staticmethod
    def _held_mask(maps: np.ndarray, now: int) -> np.ndarray:
        held = (maps != PORT_FREE) & (maps != PORT_IN_USE)
        return held & ((np.uint32(now) - maps).view(np.int32) < 0)

    def _available_mask(self, space: int, a: int, now: int) -> np.ndarray:
        w = self.ports[space, a]
        return (w == PORT_FREE) | ((w != PORT_IN_USE) & ((np.uint32(now) - w).view(np.int32) >= 0))

    def _pick_port(self, space: int, a: int, inside_port: int, now: int) -> tuple[int, bool]:
        """Block position of the port to use on address ``a`` (-1 if none) and whether it is preserved."""
        if int(self._inuse[space, a]) >= self.nblock:
            return -1, False
        pos = inside_port - self.port_lo
        if 0 <= pos < self.nblock:
            w = int(self.ports[space, a, pos])
            if w == PORT_FREE or (w != PORT_IN_USE and self._hold_over(w, now)):
                return pos, True
        avail = self._available_mask(space, a, now)
        hint = int(self._hints[space, a])
        if space == SPACE_ICMP:
            prefs = [avail]
        else:
            same_class = self._wellknown if inside_port < 1024 else ~self._wellknown
            in_class = avail & same_class
            parity = self._odd if inside_port & 1 else ~self._odd
            prefs = [in_class & parity, in_class]
            if inside_port < 1024:
                # REQ-3a is a recommendation: rather than refuse a low source port, leave its class.
                prefs += [avail & parity, avail]
        for mask in prefs:
            found = self._first_from(mask, hint)
            if found >= 0:
                self._hints[space, a] = (found + 1) % self.nblock
                return found, False
        return -1, False

    @staticmethod
    def _first_from(mask: np.ndarray, start: int) -> int:
        """First True index at or after ``start``, wrapping around; -1 if none."""
        idx = np.flatnonzero(mask[start:])
        if len(idx):
            return start + int(idx[0])
        idx = np.flatnonzero(mask[:start])
        return int(idx[0]) if len(idx) else -1

    def _take(self, space: int, a: int, pos: int, preserved: bool) -> Allocation:
        self.ports[space, a, pos] = PORT_IN_USE
        self._inuse[space, a] += 1
        self._hdr["allocated"] += 1
        return Allocation(AllocStatus.OK, int(self.addrs[a]), self.port_lo + pos, preserved)

    def _free_port(self, loc: tuple[int, int, int]) -> None:
        hold = self.hold
        if hold == 0:
            self.ports[loc] = PORT_FREE
        else:
            until = (self.clock.now() + hold) & 0xFFFFFFFF
            if until in (PORT_FREE, PORT_IN_USE):
                until = 1  # the two reserved words: end the hold 1-2 s later instead
            self.ports[loc] = until
        self._inuse[loc[0], loc[1]] -= 1

    def _fail(self, status: AllocStatus) -> Allocation:
        self._hdr["failed"] += 1
        return Allocation(status)

    # ------------------------------------------------------------------ internals: host table

    def _home(self, key: int) -> int:
        return _fmix32(key ^ 0x5BD1E995) & self._host_mask

    def _find_host(self, key: int) -> int:
        hosts, mask = self._hosts, self._host_mask
        i = self._home(key)
        for _ in range(len(hosts)):
            if not hosts["used"][i]:
                return -1
            if int(hosts["key"][i]) == key:
                return i
            i = (i + 1) & mask
        return -1

    def _insert_host(self, key: int, addr_idx: int) -> None:
        hosts, mask = self._hosts, self._host_mask
        i = self._home(key)
        while hosts["used"][i]:  # terminates: the table is at most half full
            i = (i + 1) & mask
        hosts[i] = (key, 1, addr_idx, 1)
        self._hdr["hosts"] += 1

    def _delete_host(self, i: int) -> None:
        """Backward-shift deletion: later entries of the probe run move up, so no tombstones are needed."""
        hosts, mask = self._hosts, self._host_mask
        j = i
        while True:
            j = (j + 1) & mask
            if not hosts["used"][j]:
                break
            k = self._home(int(hosts["key"][j]))
            # Entry j may move to i only if its home is not cyclically within (i, j].
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            hosts[i] = hosts[j]
            i = j
        hosts[i] = (0, 0, 0, 0)
        self._hdr["hosts"] -= 1

    def check_consistency(self) -> None:
        """Raise AssertionError if the counters disagree with the maps (for tests and recovery checks)."""
        counted = (self.ports == PORT_IN_USE).sum(axis=2)
        assert np.array_equal(counted, self._inuse), "in-use counters disagree with the port maps"
        used = self._hosts["used"] != 0
        assert int(used.sum()) == self.hosts, "host count disagrees with the host table"
        for i in np.flatnonzero(used):
            assert self._find_host(int(self._hosts["key"][i])) == i, "host table probe chain broken"
            assert self._hosts["nports"][i] > 0, "a host without ports was kept"


def _fmt(addr: int) -> str:
    a = int(addr)
    return f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"
