"""The gateway configuration: a TOML file read into frozen dataclasses, validated with clear errors.

Every problem is reported with the key path it concerns and what to do, and all
problems found are reported together (one :class:`ConfigError`), e.g.::

    gateway.toml: 2 configuration errors
      nat.pool[1]: "198.18.1.0/33" is not an IPv4 prefix or range; write "a.b.c.d/len", "a.b.c.d-e.f.g.h" or "a.b.c.d"
      nat.timouts: unknown key; did you mean "timeouts"?

The file, key by key (every key is optional except where noted; see
:data:`DEFAULT_CONFIG_TOML` and ``deploy/gateway.toml`` for complete examples)::

    [gateway]
    inside_port = "ring:in"             # ring:NAME | af_packet:IFACE | pcap:FILE
    outside_port = "ring:out"
    inside_address = "100.64.0.1/24"    # the gateway's address and on-link prefix (a bare address is /32)
    outside_address = "198.18.0.1/24"
    inside_mac = "02:00:00:00:00:01"    # optional: by default the port's own MAC
    outside_mac = "02:00:00:00:00:02"

    [nat]
    pool = ["198.18.1.0/28", "198.18.2.5-198.18.2.9", "198.18.3.1"]   # required
    port_lo = 1024                      # dynamic ports are [port_lo, 65536), split in one block per worker
    workers = 2                         # (see "Port ranges" below)
    filtering = "address-and-port-dependent"   # | "address-dependent" | "endpoint-independent"
    per_host_sessions = 10000           # 0 = unlimited; gateway-wide, see NatSection.per_worker_limit
    per_host_ports = 4096               # 0 = unlimited
    icmp_on_limit = false               # send ICMP 3/13 when a limit drops a new flow
    max_sessions = 0                    # sessions the gateway holds (sizes the session zones); 0 = 2**18 entries per worker

    [nat.timeouts]                      # seconds
    udp = 300
    tcp_established = 7440
    tcp_transitory = 240
    icmp = 60
    port_reuse_hold = 120

    [nat.fragments]                     # virtual reassembly limits
    timeout = 30
    max_datagrams = 1024
    max_fragments = 64                  # per datagram
    max_datagram_bytes = 65535
    max_total_bytes = 4194304

    [[nat.static]]                      # a port forward ...
    proto = "tcp"
    inside = "100.64.0.10:22"
    outside = "198.18.0.1:2222"
    [[nat.static]]                      # ... or a 1:1 address mapping (no ports, no proto)
    inside = "100.64.0.20"
    outside = "198.18.1.100"

    [[routes]]
    prefix = "0.0.0.0/0"
    via = "198.18.0.254"                # optional: without it the prefix is on-link
    port = "outside"                    # inside | outside

    [stats]
    listen = "127.0.0.1:9108"

    [supervisor]
    restart = "always"                  # always | on-failure | never
    backoff_initial = 0.1
    backoff_max = 10.0
    max_restarts = 5                    # within restart_window seconds, then give up
    restart_window = 60.0
    ready_timeout = 30.0
    hot_standby = false                 # a parked, attached standby per worker, promoted when it dies

Port ranges: the outside ports ``[port_lo, 65536)`` are split into ``workers``
blocks of ``(65536 - port_lo) // workers`` ports (worker ``w`` gets
``[port_lo + w * block, port_lo + (w + 1) * block)``, :meth:`NatSection.worker_port_range`);
replies are steered to a worker by the block their destination port falls in
(docs/CONTRACTS.md "Steering"), so a worker only hands out ports of its own
block. Consequence for port preservation (RFC 4787 REQ-3): an inside source
port is kept only when it lies in the block of the worker that receives the
flow (inside traffic is steered by a hash of source address and port, not by
port range) and is free on the host's outside address; otherwise a port of
that worker's block is chosen with the same parity and, where the block has
one, the same class (0-1023 / 1024-65535). With one worker every port from
``port_lo`` up can be preserved; with ``workers = 2`` and the default
``port_lo`` a flow from port 40000 keeps it only if it reaches worker 1.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Upper bound on the dynamic pool: each pool address costs the port allocators
# 3 spaces x 64512 ports x 4 bytes = ~774 KB across all workers (nat_pool.py).
MAX_POOL_ADDRESSES = 1024
MAX_WORKERS = 64
MIN_PORTS_PER_WORKER = 64
#: Bounds of ``[nat] max_sessions`` (a session table holds at most 0.8 x 2**32 entries per worker; 2**30 total is ~115 GiB).
MIN_SESSIONS = 1024
MAX_SESSIONS = 1 << 30

PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17}


class ConfigError(ValueError):
    """The configuration is invalid; ``errors`` lists one message per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = list(errors)
        n = len(self.errors)
        head = f"{source}: {n} configuration error{'s' if n != 1 else ''}"
        super().__init__(head + "".join(f"\n  {e}" for e in self.errors))


class Filtering(str, enum.Enum):
    """Inbound filtering behaviour (RFC 4787 section 5)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


@dataclass(frozen=True)
class PortSpec:
    """A port: ``kind`` is ``ring``, ``af_packet`` or ``pcap``; ``name`` the ring, interface or file."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class GatewaySection:
    inside_port: PortSpec
    outside_port: PortSpec
    inside_address: IPv4Interface
    outside_address: IPv4Interface
    inside_mac: bytes | None = None
    outside_mac: bytes | None = None

    def network_of(self, port: str) -> IPv4Network:
        """The on-link network of ``"inside"`` or ``"outside"``."""
        return (self.inside_address if port == "inside" else self.outside_address).network


@dataclass(frozen=True)
class PoolRange:
    """An inclusive range of pool addresses, as written in the file (``source``)."""

    first: IPv4Address
    last: IPv4Address
    source: str

    def __len__(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, IPv4Address) and self.first <= addr <= self.last


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``port_reuse_hold``: a freed outside port is not handed out again before it (RFC 6888)."""

    udp: int = 300
    tcp_established: int = 7440
    tcp_transitory: int = 240
    icmp: int = 60
    port_reuse_hold: int = 120


@dataclass(frozen=True)
class FragmentLimits:
    """Bounds of the virtual reassembly (``nat_frag.FragmentTracker``)."""

    timeout: int = 30
    max_datagrams: int = 1024
    max_fragments: int = 64
    max_datagram_bytes: int = 65535
    max_total_bytes: int = 4 << 20


@dataclass(frozen=True)
class StaticMapping:
    """A port forward (``proto``, both ports set) or a 1:1 address mapping (``proto`` and ports None)."""

    inside_addr: IPv4Address
    outside_addr: IPv4Address
    proto: str | None = None
    inside_port: int | None = None
    outside_port: int | None = None

    @property
    def one_to_one(self) -> bool:
        return self.proto is None

    @property
    def proto_number(self) -> int | None:
        return None if self.proto is None else PROTO_NUMBERS[self.proto]


@dataclass(frozen=True)
class NatSection:
    pool: tuple[PoolRange, ...]
    port_lo: int = 1024
    workers: int = 2
    filtering: Filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    per_host_sessions: int = 10000
    per_host_ports: int = 4096
    icmp_on_limit: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    fragments: FragmentLimits = field(default_factory=FragmentLimits)
    static: tuple[StaticMapping, ...] = ()
    #: Sessions the gateway must hold, over all workers (sizes each worker's session
    #: table and index; see secondary/nat_pipeline.table_capacity_for); 0 = the default size.
    max_sessions: int = 0

    def pool_addresses(self) -> np.ndarray:
        """Every pool address as a sorted ``uint32`` array (host byte order values)."""
        parts = [np.arange(int(r.first), int(r.last) + 1, dtype=np.uint64) for r in self.pool]
        return np.sort(np.concatenate(parts)).astype(np.uint32) if parts else np.zeros(0, np.uint32)

    @property
    def block(self) -> int:
        """Ports per worker block (CONTRACTS.md "Steering": ``(65536 - port_lo) // workers``)."""
        return (65536 - self.port_lo) // self.workers

    def worker_port_range(self, worker: int) -> tuple[int, int]:
        """``(lo, hi)``, hi exclusive: the outside ports worker ``worker`` allocates from (its block).

        Only an inside port inside this range can be preserved by that worker (module docstring, "Port ranges").
        """
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} out of range 0..{self.workers - 1}")
        lo = self.port_lo + worker * self.block
        return lo, lo + self.block

    @staticmethod
    def per_worker_limit(limit: int, workers: int) -> int:
        """A gateway-wide per-host limit split over workers (each enforces its share; 0 = unlimited).

        Inside traffic is steered by (source address, source port), so one host's
        flows spread over workers; each worker enforces ``ceil(limit / workers)``.
        """
        return 0 if limit == 0 else -(-limit // workers)


@dataclass(frozen=True)
class Route:
    """A static route; ``via`` None means the prefix is on-link (ARP for the destination itself)."""

    prefix: IPv4Network
    port: str
    via: IPv4Address | None = None


@dataclass(frozen=True)
class StatsSection:
    host: str = "127.0.0.1"
    port: int = 9108

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SupervisorSection:
    workers: int = 2
    restart: str = "always"
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    max_restarts: int = 5
    restart_window: float = 60.0
    ready_timeout: float = 30.0
    hot_standby: bool = False  # one parked standby worker per slot (supervisor/main.py)


@dataclass(frozen=True)
class GatewayConfig:
    gateway: GatewaySection
    nat: NatSection
    routes: tuple[Route, ...] = ()
    stats: StatsSection = field(default_factory=StatsSection)
    supervisor: SupervisorSection = field(default_factory=SupervisorSection)
    source: str = "<config>"


# --------------------------------------------------------------------------- defaults

DEFAULT_CONFIG_TOML = """\
# hotplane default configuration: two ring ports, two workers, a /28 pool.
[gateway]
inside_port = "ring:in"
outside_port = "ring:out"
inside_address = "100.64.0.1/24"
outside_address = "198.18.0.1/24"

[nat]
pool = ["198.18.1.0/28"]
workers = 2
"""


def default_config() -> GatewayConfig:
    """The embedded default configuration (ring ports ``ring:in``/``ring:out``, 2 workers)."""
    return parse_config(DEFAULT_CONFIG_TOML, source="<default config>")


# --------------------------------------------------------------------------- loading

def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the TOML file at ``path``; raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read the file: {e.strerror or e}"]) from None
    return parse_config(text, source=str(p))


def parse_config(text: str, source: str = "<string>") -> GatewayConfig:
    """Parse and validate TOML ``text``; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"not valid TOML: {e}"]) from None
    return config_from_dict(data, source=source)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> GatewayConfig:
    """Validate an already-parsed TOML document; raises :class:`ConfigError` listing every problem."""
    v = _Validator(source)
    cfg = v.build(data)
    if v.errors or cfg is None:
        raise ConfigError(source, v.errors or ["invalid configuration"])
    return cfg


# --------------------------------------------------------------------------- parsing helpers

_PORT_KINDS = ("ring", "af_packet", "pcap")
_RING_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_IFACE_NAME = re.compile(r"^[^\s/:]{1,15}$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


def parse_port_spec(text: str) -> PortSpec:
    """``"ring:NAME"`` / ``"af_packet:IFACE"`` / ``"pcap:FILE"`` -> :class:`PortSpec`; ValueError says why."""
    kind, sep, name = text.partition(":")
    if not sep or kind not in _PORT_KINDS:
        raise ValueError(f'"{text}" is not a port; write one of ring:NAME, af_packet:IFACE, pcap:FILE')
    if kind == "ring" and not _RING_NAME.match(name):
        raise ValueError(f'"{text}": a ring name is 1-64 characters of letters, digits, "_", "." or "-"')
    if kind == "af_packet" and not _IFACE_NAME.match(name):
        raise ValueError(f'"{text}": an interface name is 1-15 characters without spaces, "/" or ":"')
    if kind == "pcap" and not name:
        raise ValueError(f'"{text}": name the pcap file after "pcap:"')
    return PortSpec(kind, name)


def parse_mac(text: str) -> bytes:
    """``"02:00:00:00:00:01"`` -> 6 bytes; ValueError otherwise."""
    if not _MAC.match(text):
        raise ValueError(f'"{text}" is not a MAC address; write six hex pairs such as "02:00:00:00:00:01"')
    return bytes(int(x, 16) for x in text.split(":"))


def parse_pool_entry(text: str) -> PoolRange:
    """``"a.b.c.d/len"``, ``"a.b.c.d-e.f.g.h"`` (inclusive) or ``"a.b.c.d"`` -> :class:`PoolRange`."""
    hint = 'write "a.b.c.d/len", "a.b.c.d-e.f.g.h" or "a.b.c.d"'
    if "-" in text:
        a, _, b = text.partition("-")
        try:
            first, last = IPv4Address(a.strip()), IPv4Address(b.strip())
        except ValueError:
            raise ValueError(f'"{text}" is not an IPv4 address range; {hint}') from None
        if last < first:
            raise ValueError(f'"{text}": the range ends before it starts; write the lower address first')
        return PoolRange(first, last, text)
    if "/" in text:
        try:
            net = IPv4Network(text, strict=False)
        except ValueError:
            raise ValueError(f'"{text}" is not an IPv4 prefix; {hint}') from None
        if net.network_address != IPv4Interface(text).ip:
            raise ValueError(f'"{text}" has host bits set; did you mean "{net}"?')
        return PoolRange(net.network_address, net.broadcast_address, text)
    try:
        a = IPv4Address(text)
    except ValueError:
        raise ValueError(f'"{text}" is not an IPv4 address, prefix or range; {hint}') from None
    return PoolRange(a, a, text)


def _parse_addr_port(text: str) -> tuple[IPv4Address, int | None]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return IPv4Address(text), None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f'"{text}": the port must be a number from 1 to 65535')
    return IPv4Address(host), int(port)


# --------------------------------------------------------------------------- the validator

class _Validator:
    """Walks the document, collecting every error with its key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    # -- generic checks

    def table(self, data: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """``data`` as a table; unknown keys are errors with a did-you-mean suggestion."""
        if not isinstance(data, dict):
            self.err(path, f"expected a table, got {_kind(data)}; write [{path}] or {path} = {{ ... }}")
            return {}
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                where = f"{path}.{key}" if path else key
                if close:
                    self.err(where, f'unknown key; did you mean "{close[0]}"?')
                else:
                    self.err(where, f"unknown key; the keys here are: {', '.join(allowed)}")
        return data

    def get(self, tbl: dict, key: str, path: str, typ: type | tuple, default: Any, *,
            check: Callable[[Any], str | None] | None = None, required: bool = False) -> Any:
        """``tbl[key]`` checked for type (bool is not an int) and by ``check`` (returns an error or None)."""
        where = f"{path}.{key}" if path else key
        if key not in tbl:
            if required:
                self.err(where, "missing; this key is required")
            return default
        val = tbl[key]
        types = typ if isinstance(typ, tuple) else (typ,)
        ok = isinstance(val, types) and not (isinstance(val, bool) and bool not in types)
        if float in types and isinstance(val, int) and not isinstance(val, bool):
            val, ok = float(val), True
        if not ok:
            names = " or ".join(_type_name(t) for t in types)
            self.err(where, f"expected {names}, got {_kind(val)} {val!r}")
            return default
        if check is not None:
            problem = check(val)
            if problem:
                self.err(where, problem)
                return default
        return val

    # -- sections

    def build(self, data: dict[str, Any]) -> GatewayConfig | None:
        top = self.table(data, "", ("gateway", "nat", "routes", "stats", "supervisor"))
        if "gateway" not in top:
            self.err("gateway", "missing; the [gateway] table (ports and addresses) is required")
        if "nat" not in top:
            self.err("nat", "missing; the [nat] table (at least nat.pool) is required")
        gw = self.gateway(top.get("gateway", {}))
        nat = self.nat(top.get("nat", {}), gw)
        routes = self.routes(top.get("routes", []), gw)
        stats = self.stats(top.get("stats", {}))
        sup = self.supervisor(top.get("supervisor", {}), nat)
        if self.errors or gw is None or nat is None:
            return None
        return GatewayConfig(gw, nat, routes, stats, sup, self.source)

    def gateway(self, raw: Any) -> GatewaySection | None:
        p = "gateway"
        t = self.table(raw, p, ("inside_port", "outside_port", "inside_address", "outside_address",
                                "inside_mac", "outside_mac"))
        ports = {}
        for side in ("inside", "outside"):
            ports[side] = self.get(t, f"{side}_port", p, str, None, required=True)
            if ports[side] is not None:
                try:
                    ports[side] = parse_port_spec(ports[side])
                except ValueError as e:
                    self.err(f"{p}.{side}_port", str(e))
                    ports[side] = None
        addrs = {}
        for side in ("inside", "outside"):
            text = self.get(t, f"{side}_address", p, str, None, required=True)
            addrs[side] = None
            if text is not None:
                try:
                    iface = IPv4Interface(text)
                except ValueError:
                    self.err(f"{p}.{side}_address", f'"{text}" is not an IPv4 address; write "a.b.c.d/len" '
                             '(the gateway address and its on-link prefix, e.g. "100.64.0.1/24")')
                    continue
                if iface.ip == iface.network.network_address and iface.network.prefixlen < 31:
                    self.err(f"{p}.{side}_address", f'"{text}" is the network address of {iface.network}; '
                             "give the gateway a host address in it")
                    continue
                addrs[side] = iface
        macs = {}
        for side in ("inside", "outside"):
            text = self.get(t, f"{side}_mac", p, str, None)
            macs[side] = None
            if text is not None:
                try:
                    macs[side] = parse_mac(text)
                except ValueError as e:
                    self.err(f"{p}.{side}_mac", str(e))
        if addrs["inside"] and addrs["outside"] and addrs["inside"].network.overlaps(addrs["outside"].network):
            self.err(f"{p}.outside_address", f"{addrs['outside'].network} overlaps the inside network "
                     f"{addrs['inside'].network}; the two sides need separate subnets")
        if (ports["inside"] and ports["outside"] and ports["inside"] == ports["outside"]):
            self.err(f"{p}.outside_port", f'"{ports["outside"]}" is also the inside port; use two ports')
        if None in ports.values() or None in addrs.values():
            return None
        return GatewaySection(ports["inside"], ports["outside"], addrs["inside"], addrs["outside"],
                              macs["inside"], macs["outside"])

    def nat(self, raw: Any, gw: GatewaySection | None) -> NatSection | None:
        p = "nat"
        t = self.table(raw, p, ("pool", "port_lo", "workers", "filtering", "per_host_sessions",
                                "per_host_ports", "icmp_on_limit", "max_sessions", "timeouts", "fragments", "static"))
        pool = self.pool(t, p, gw)
        port_lo = self.get(t, "port_lo", p, int, 1024,
                           check=lambda v: None if 1 <= v <= 65535 - MIN_PORTS_PER_WORKER
                           else f"must be from 1 to {65535 - MIN_PORTS_PER_WORKER}")
        workers = self.get(t, "workers", p, int, 2,
                           check=lambda v: None if 1 <= v <= MAX_WORKERS else f"must be from 1 to {MAX_WORKERS}")
        if (65536 - port_lo) // workers < MIN_PORTS_PER_WORKER:
            self.err(f"{p}.workers", f"{workers} workers leave {(65536 - port_lo) // workers} ports each above "
                     f"port_lo={port_lo}; each needs at least {MIN_PORTS_PER_WORKER}: lower port_lo or workers")
        filt_text = self.get(t, "filtering", p, str, Filtering.ADDRESS_AND_PORT_DEPENDENT.value)
        try:
            filtering = Filtering(filt_text)
        except ValueError:
            names = [f.value for f in Filtering]
            close = difflib.get_close_matches(filt_text, names, n=1, cutoff=0.5)
            hint = f'did you mean "{close[0]}"?' if close else "write one of " + ", ".join(f'"{n}"' for n in names)
            self.err(f"{p}.filtering", f'"{filt_text}" is not a filtering mode; {hint}')
            filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
        nonneg = lambda v: None if v >= 0 else "must be 0 (unlimited) or more"  # noqa: E731
        per_host_sessions = self.get(t, "per_host_sessions", p, int, 10000, check=nonneg)
        per_host_ports = self.get(t, "per_host_ports", p, int, 4096, check=nonneg)
        icmp_on_limit = self.get(t, "icmp_on_limit", p, bool, False)
        max_sessions = self.get(t, "max_sessions", p, int, 0,
                                check=lambda v: None if v == 0 or MIN_SESSIONS <= v <= MAX_SESSIONS
                                else f"must be 0 (the default size) or from {MIN_SESSIONS} to {MAX_SESSIONS:_}")
        timeouts = self.timeouts(t.get("timeouts", {}), f"{p}.timeouts")
        fragments = self.fragments(t.get("fragments", {}), f"{p}.fragments")
        static = self.static(t.get("static", []), f"{p}.static", gw, pool)
        if pool is None:
            return None
        return NatSection(pool, port_lo, workers, filtering, per_host_sessions, per_host_ports,
                          icmp_on_limit, timeouts, fragments, static, max_sessions)

    def pool(self, t: dict, p: str, gw: GatewaySection | None) -> tuple[PoolRange, ...] | None:
        raw = self.get(t, "pool", p, (list, str), None, required=True)
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            self.err(f"{p}.pool", "is empty; give at least one address, prefix or range")
            return None
        ranges: list[tuple[int, PoolRange]] = []
        for i, entry in enumerate(raw):
            where = f"{p}.pool[{i}]"
            if not isinstance(entry, str):
                self.err(where, f"expected a string, got {_kind(entry)} {entry!r}")
                continue
            try:
                r = parse_pool_entry(entry.strip())
            except ValueError as e:
                self.err(where, str(e))
                continue
            inside_net = gw.inside_address.network if gw is not None else None
            if inside_net is not None and r.first <= inside_net.broadcast_address and \
                    r.last >= inside_net.network_address:
                self.err(where, f'"{entry}" overlaps the inside network {gw.inside_address.network}; '
                         "pool addresses must be outside addresses")
                continue
            ranges.append((i, r))
        ok = True
        order = sorted(ranges, key=lambda ir: int(ir[1].first))
        for (i, a), (j, b) in zip(order, order[1:]):
            if int(b.first) <= int(a.last):
                first, second = sorted((i, j))
                self.err(f"{p}.pool[{second}]", f'"{raw[second]}" overlaps nat.pool[{first}] "{raw[first]}"; '
                         "list every address once")
                ok = False
        total = sum(len(r) for _, r in ranges)
        if total > MAX_POOL_ADDRESSES:
            self.err(f"{p}.pool", f"has {total} addresses; at most {MAX_POOL_ADDRESSES} are supported "
                     "(each costs ~774 KB of port-allocator state)")
            ok = False
        if not ok or len(ranges) != len(raw):
            return None
        return tuple(r for _, r in ranges)

    def timeouts(self, raw: Any, p: str) -> Timeouts:
        t = self.table(raw, p, ("udp", "tcp_established", "tcp_transitory", "icmp", "port_reuse_hold"))
        d = Timeouts()
        pos = lambda v: None if 1 <= v <= 0x7FFFFFFF else "must be a whole number of seconds, at least 1"  # noqa
        vals = {k: self.get(t, k, p, int, getattr(d, k), check=pos)
                for k in ("udp", "tcp_established", "tcp_transitory", "icmp")}
        vals["port_reuse_hold"] = self.get(t, "port_reuse_hold", p, int, d.port_reuse_hold,
                                           check=lambda v: None if 0 <= v <= 86400 else "must be 0 to 86400 s")
        if vals["tcp_transitory"] > vals["tcp_established"]:
            self.err(f"{p}.tcp_transitory", f"{vals['tcp_transitory']} s is longer than tcp_established "
                     f"({vals['tcp_established']} s); the transitory timeout must be the shorter one")
        return Timeouts(**vals)

    def fragments(self, raw: Any, p: str) -> FragmentLimits:
        keys = ("timeout", "max_datagrams", "max_fragments", "max_datagram_bytes", "max_total_bytes")
        t = self.table(raw, p, keys)
        d = FragmentLimits()
        pos = lambda v: None if v >= 1 else "must be at least 1"  # noqa: E731
        vals = {k: self.get(t, k, p, int, getattr(d, k), check=pos) for k in keys}
        if vals["max_total_bytes"] < vals["max_datagram_bytes"]:
            self.err(f"{p}.max_total_bytes", "is smaller than max_datagram_bytes; raise it")
        return FragmentLimits(**vals)

    def static(self, raw: Any, p: str, gw: GatewaySection | None,
               pool: tuple[PoolRange, ...] | None) -> tuple[StaticMapping, ...]:
        if not isinstance(raw, list):
            self.err(p, f"expected an array of tables ([[{p}]]), got {_kind(raw)}")
            return ()
        out: list[StaticMapping] = []
        seen_out: dict[tuple, int] = {}
        seen_in: dict[tuple, int] = {}
        for i, item in enumerate(raw):
            where = f"{p}[{i}]"
            t = self.table(item, where, ("proto", "inside", "outside"))
            if not t:
                continue
            proto = self.get(t, "proto", where, str, None,
                             check=lambda v: None if v in ("tcp", "udp") else f'"{v}" must be "tcp" or "udp" '
                             "(omit proto and the ports for a 1:1 address mapping)")
            ends = {}
            for side in ("inside", "outside"):
                text = self.get(t, side, where, str, None, required=True)
                ends[side] = None
                if text is not None:
                    try:
                        ends[side] = _parse_addr_port(text)
                    except ValueError as e:
                        msg = str(e) if "port must" in str(e) else f'"{text}" is not "a.b.c.d" or "a.b.c.d:port"'
                        self.err(f"{where}.{side}", msg)
            if ends["inside"] is None or ends["outside"] is None:
                continue
            (ia, ip), (oa, op) = ends["inside"], ends["outside"]
            has_ports = (ip is not None, op is not None)
            if has_ports == (True, True) and "proto" not in t:
                self.err(f"{where}.proto", 'missing; a port forward needs proto = "tcp" or "udp"')
                continue
            if has_ports == (False, False) and "proto" in t:
                self.err(f"{where}.proto", "a 1:1 mapping (no ports) covers every protocol; remove proto "
                         "or give both ports")
                continue
            if has_ports[0] != has_ports[1]:
                self.err(where, "give a port on both inside and outside (port forward) or on neither (1:1)")
                continue
            if proto is None and has_ports[0]:
                continue  # proto itself was invalid; already reported
            m = StaticMapping(ia, oa, proto, ip, op)
            in_pool = pool is not None and any(oa in r for r in pool)
            if m.one_to_one:
                if in_pool:
                    self.err(f"{where}.outside", f"{oa} is in nat.pool; a 1:1 address must not be shared "
                             "with dynamic mappings: remove it from the pool")
                    continue
                if gw is not None and oa == gw.outside_address.ip:
                    self.err(f"{where}.outside", f"{oa} is the gateway's own outside address; "
                             "a 1:1 mapping needs an address of its own")
                    continue
            elif gw is not None and oa != gw.outside_address.ip and not in_pool:
                self.err(f"{where}.outside", f"{oa} is neither gateway.outside_address nor in nat.pool; "
                         "a port forward must use an address the gateway owns")
                continue
            # A 1:1 outside address is never the gateway's nor a pool address (checked above) and a
            # forward's always is, so the two kinds cannot collide; check each kind for duplicates.
            kout = (m.proto, oa, op)
            kin = (m.proto, ia, ip)
            if kout in seen_out:
                self.err(f"{where}.outside", f'"{t["outside"]}" is already mapped by {p}[{seen_out[kout]}]')
                continue
            if kin in seen_in:
                self.err(f"{where}.inside", f'"{t["inside"]}" is already mapped by {p}[{seen_in[kin]}]')
                continue
            seen_out[kout] = i
            seen_in[kin] = i
            out.append(m)
        return tuple(out)

    def routes(self, raw: Any, gw: GatewaySection | None) -> tuple[Route, ...]:
        p = "routes"
        if not isinstance(raw, list):
            self.err(p, f"expected an array of tables ([[routes]]), got {_kind(raw)}")
            return ()
        out: list[Route] = []
        seen: set[IPv4Network] = set()
        for i, item in enumerate(raw):
            where = f"{p}[{i}]"
            t = self.table(item, where, ("prefix", "via", "port"))
            if not t:
                continue
            prefix_text = self.get(t, "prefix", where, str, None, required=True)
            port = self.get(t, "port", where, str, None, required=True,
                            check=lambda v: None if v in ("inside", "outside") else
                            f'"{v}" is not a port; write "inside" or "outside"')
            via_text = self.get(t, "via", where, str, None)
            prefix = via = None
            if prefix_text is not None:
                try:
                    prefix = IPv4Network(prefix_text)
                except ValueError:
                    try:
                        fixed = IPv4Network(prefix_text, strict=False)
                        self.err(f"{where}.prefix", f'"{prefix_text}" has host bits set; did you mean "{fixed}"?')
                    except ValueError:
                        self.err(f"{where}.prefix", f'"{prefix_text}" is not an IPv4 prefix; write "a.b.c.d/len"')
            if via_text is not None:
                try:
                    via = IPv4Address(via_text)
                except ValueError:
                    self.err(f"{where}.via", f'"{via_text}" is not an IPv4 address')
            if prefix is None or port is None or (via_text is not None and via is None):
                continue
            if via is not None and gw is not None:
                net = gw.network_of(port)
                if via not in net:
                    self.err(f"{where}.via", f"{via} is not on the {port} network {net}; a next hop must be "
                             "directly reachable on the route's port")
                    continue
                if via in (gw.inside_address.ip, gw.outside_address.ip):
                    self.err(f"{where}.via", f"{via} is the gateway itself; name the next router")
                    continue
            if prefix in seen:
                self.err(f"{where}.prefix", f"{prefix} is already routed by an earlier [[routes]] entry")
                continue
            seen.add(prefix)
            out.append(Route(prefix, port, via))
        return tuple(out)

    def stats(self, raw: Any) -> StatsSection:
        p = "stats"
        t = self.table(raw, p, ("listen",))
        text = self.get(t, "listen", p, str, "127.0.0.1:9108")
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            self.err(f"{p}.listen", f'"{text}" is not "address:port" (e.g. "127.0.0.1:9108")')
            return StatsSection()
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            self.err(f"{p}.listen", f'"{host}" is not an IP address; the stats endpoint listens on an address')
            return StatsSection()
        return StatsSection(host, int(port))

    def supervisor(self, raw: Any, nat: NatSection | None) -> SupervisorSection:
        p = "supervisor"
        t = self.table(raw, p, ("workers", "restart", "backoff_initial", "backoff_max", "max_restarts",
                                "restart_window", "ready_timeout", "hot_standby"))
        d = SupervisorSection()
        nat_workers = nat.workers if nat is not None else d.workers
        workers = self.get(t, "workers", p, int, nat_workers)
        if nat is not None and "workers" in t and workers != nat.workers:
            self.err(f"{p}.workers", f"is {workers} but nat.workers is {nat.workers}; each worker owns one port "
                     "block, so set the count in one place (nat.workers)")
            workers = nat.workers
        restart = self.get(t, "restart", p, str, d.restart,
                           check=lambda v: None if v in ("always", "on-failure", "never") else
                           f'"{v}" is not a restart policy; write "always", "on-failure" or "never"')
        pos = lambda v: None if v > 0 else "must be greater than 0"  # noqa: E731
        b0 = self.get(t, "backoff_initial", p, float, d.backoff_initial, check=pos)
        b1 = self.get(t, "backoff_max", p, float, d.backoff_max, check=pos)
        if b1 < b0:
            self.err(f"{p}.backoff_max", f"{b1} is below backoff_initial ({b0}); raise it")
        mr = self.get(t, "max_restarts", p, int, d.max_restarts,
                      check=lambda v: None if v >= 0 else "must be 0 or more")
        rw = self.get(t, "restart_window", p, float, d.restart_window, check=pos)
        rt = self.get(t, "ready_timeout", p, float, d.ready_timeout, check=pos)
        hs = self.get(t, "hot_standby", p, bool, d.hot_standby)
        return SupervisorSection(workers, restart, b0, b1, mr, rw, rt, hs)


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "an array", dict: "a table"}.get(t, t.__name__)


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    return type(v).__name__
