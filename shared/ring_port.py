"""Port specs, and ``ring:NAME`` ports: frame rings in memzones, fed by a peer on the same machine.

A port spec names a port type, its name and options::

    ring:NAME[,queues=N][,slots=S][,frame=F][,steer=inside|outside|rss][,port_lo=P][,block=B]
    af_packet:IFACE[,queues=N][,slots=S][,frame=F][,steer=...][,port_lo=P][,block=B]
    pcap:FILE[,mode=replay|capture][,rate=recorded|max][,loop=N][,queues=N][,slots=S][,frame=F]

A ring port is N queues; queue ``i`` is an RX :class:`FrameRing` (zone
``ring.<NAME>.q<i>.rx``) and a TX FrameRing (``ring.<NAME>.q<i>.tx``), plus one
``queue_state`` zone for the port (``ring.<NAME>.state``) that holds every
queue's ownership word and cursors. The worker side uses the burst engine on
:attr:`RingPort.queues`; the peer side (a generator, a sink, a test) uses
:meth:`RingPort.peer_send` / :meth:`RingPort.peer_recv`, which steer frames to
queues with the port's :class:`~hotplane.shared.steering.Steering` the way a
NIC's RSS or the AF_PACKET fanout program would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hotplane.schema.port import ROLE_RX, ROLE_TX
from hotplane.shared.burst import Queue, QueueState
from hotplane.shared.frame_ring import MIN_FRAME_SIZE, FrameRing
from hotplane.shared.steering import DEFAULT_PORT_LO, MODES, Steering

PORT_TYPES = ("ring", "af_packet", "pcap")
DEFAULT_QUEUES = 1
DEFAULT_SLOTS = 1024
DEFAULT_FRAME = 2048
MAX_QUEUES = 256
MAX_SLOTS = 1 << 20
MAX_FRAME = 65536 + 128

_INT_OPTS = {"queues", "slots", "frame", "port_lo", "block", "loop"}
_ALLOWED = {
    "ring": {"queues", "slots", "frame", "steer", "port_lo", "block"},
    "af_packet": {"queues", "slots", "frame", "steer", "port_lo", "block"},
    "pcap": {"mode", "rate", "loop", "queues", "slots", "frame", "steer", "port_lo", "block"},
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ring": {"queues": DEFAULT_QUEUES, "slots": DEFAULT_SLOTS, "frame": DEFAULT_FRAME, "steer": "rss"},
    "af_packet": {"queues": DEFAULT_QUEUES, "slots": DEFAULT_SLOTS, "frame": DEFAULT_FRAME, "steer": "rss"},
    "pcap": {"mode": "replay", "rate": "recorded", "loop": 1, "queues": DEFAULT_QUEUES, "slots": DEFAULT_SLOTS, "frame": DEFAULT_FRAME, "steer": "rss"},
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")
_IFACE_RE = re.compile(r"^[^\s/:,]{1,15}$")  # IFNAMSIZ - 1, no slash, colon or comma

SPEC_HELP = (
    "expected ring:NAME[,queues=N][,slots=S][,frame=F][,steer=inside|outside|rss], "
    "af_packet:IFACE[,queues=N] or pcap:FILE[,mode=replay|capture][,rate=recorded|max][,loop=N]"
)


@dataclass(frozen=True)
class PortSpec:
    """A parsed port spec: ``type`` (ring, af_packet, pcap), ``name`` (NAME, IFACE or FILE), typed ``options`` with defaults filled in."""

    type: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def queues(self) -> int:
        return int(self.options.get("queues", DEFAULT_QUEUES))

    def steering(self) -> Steering:
        """The port's steering function (mode, port_lo and block from the options)."""
        o = self.options
        return Steering(o.get("steer", "rss"), self.queues, port_lo=o.get("port_lo", DEFAULT_PORT_LO), block=o.get("block"))

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.type}:{self.name}" + (f",{opts}" if opts else "")


def parse_port_spec(spec: str) -> PortSpec:
    """Parse ``type:name[,key=value...]``; raises ValueError saying what is wrong and what is expected."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"bad port spec {spec!r}: no 'type:' prefix; {SPEC_HELP}")
    ptype, _, rest = spec.partition(":")
    ptype = ptype.strip().lower()
    if ptype not in PORT_TYPES:
        raise ValueError(f"bad port spec {spec!r}: unknown port type {ptype!r} (known: {', '.join(PORT_TYPES)}); {SPEC_HELP}")
    if ptype == "pcap":
        # A file name may contain commas: options are only the trailing key=value parts.
        parts = rest.split(",")
        cut = len(parts)
        while cut > 1 and "=" in parts[cut - 1] and parts[cut - 1].split("=", 1)[0].strip() in _ALLOWED["pcap"]:
            cut -= 1
        name, raw_opts = ",".join(parts[:cut]).strip(), parts[cut:]
    else:
        name, *raw_opts = (p.strip() for p in rest.split(","))
    if not name:
        raise ValueError(f"bad port spec {spec!r}: the {ptype} port needs a name after '{ptype}:'; {SPEC_HELP}")
    if ptype == "ring" and not _NAME_RE.match(name):
        raise ValueError(f"bad port spec {spec!r}: ring name {name!r} must be 1-32 letters, digits, '_' or '-' (it names memzones)")
    if ptype == "af_packet" and not _IFACE_RE.match(name):
        raise ValueError(f"bad port spec {spec!r}: {name!r} is not an interface name (at most 15 characters, no '/', ':' or ',')")
    options: dict[str, Any] = dict(_DEFAULTS[ptype])
    seen: set[str] = set()
    for raw in raw_opts:
        if not raw:
            raise ValueError(f"bad port spec {spec!r}: empty option (a stray comma?)")
        if "=" not in raw:
            raise ValueError(f"bad port spec {spec!r}: option {raw!r} is not key=value")
        key, _, value = (s.strip() for s in raw.partition("="))
        key = key.lower()
        if key not in _ALLOWED[ptype]:
            raise ValueError(f"bad port spec {spec!r}: unknown option {key!r} for a {ptype} port (allowed: {', '.join(sorted(_ALLOWED[ptype]))})")
        if key in seen:
            raise ValueError(f"bad port spec {spec!r}: option {key!r} given twice")
        seen.add(key)
        options[key] = _option_value(spec, key, value)
    _check_options(spec, ptype, options)
    return PortSpec(ptype, name, options)


def _option_value(spec: str, key: str, value: str) -> Any:
    if key in _INT_OPTS:
        try:
            return int(value, 0)
        except ValueError:
            raise ValueError(f"bad port spec {spec!r}: {key}={value!r} is not an integer") from None
    choices = {"steer": MODES, "mode": ("replay", "capture"), "rate": ("recorded", "max")}[key]
    value = value.lower()
    if value not in choices:
        raise ValueError(f"bad port spec {spec!r}: {key}={value!r} is not one of {', '.join(choices)}")
    return value


def _check_options(spec: str, ptype: str, o: dict[str, Any]) -> None:
    q, slots, frame = o.get("queues"), o.get("slots"), o.get("frame")
    if q is not None and not 1 <= q <= MAX_QUEUES:
        raise ValueError(f"bad port spec {spec!r}: queues={q} must be between 1 and {MAX_QUEUES}")
    if slots is not None and (slots < 2 or slots > MAX_SLOTS or slots & (slots - 1)):
        raise ValueError(f"bad port spec {spec!r}: slots={slots} must be a power of two between 2 and {MAX_SLOTS}")
    if frame is not None and (frame % 16 or not MIN_FRAME_SIZE <= frame <= MAX_FRAME):
        raise ValueError(f"bad port spec {spec!r}: frame={frame} must be a multiple of 16 between {MIN_FRAME_SIZE} and {MAX_FRAME}")
    if "port_lo" in o and not 0 <= o["port_lo"] < 65536:
        raise ValueError(f"bad port spec {spec!r}: port_lo={o['port_lo']} is not a port number")
    if o.get("block") is not None and not 1 <= o["block"] <= 65536:
        raise ValueError(f"bad port spec {spec!r}: block={o['block']} must be between 1 and 65536")
    if "loop" in o and o["loop"] < 1:
        raise ValueError(f"bad port spec {spec!r}: loop={o['loop']} must be at least 1")


def zone_names(name: str, nqueues: int) -> dict[str, str]:
    """The memzone names of a ring port: ``state`` and ``q<i>.rx`` / ``q<i>.tx`` keys."""
    names = {"state": f"ring.{name}.state"}
    for i in range(nqueues):
        names[f"q{i}.rx"] = f"ring.{name}.q{i}.rx"
        names[f"q{i}.tx"] = f"ring.{name}.q{i}.tx"
    return names


class RingPort:
    """A ``ring:NAME`` port: ``nqueues`` queues of RX + TX frame rings and one queue-state zone.

    Build with :meth:`create` (initialises every zone) or :meth:`attach` (a
    secondary or a peer: verifies every zone). Both take ``buffers``: a dict
    from zone name (see :meth:`layout`) to a buffer (a memzone's uint8 view).
    """

    def __init__(self, name: str, state: QueueState, rx: list[FrameRing], tx: list[FrameRing], steering: Steering | None = None) -> None:
        self.name = name
        self.state = state
        self.rx_rings = rx
        self.tx_rings = tx
        self.nqueues = len(rx)
        self.nslots = rx[0].nslots
        self.frame_size = rx[0].frame_size
        self.steering = steering or Steering("rss", self.nqueues)
        if self.steering.nqueues != self.nqueues:
            raise ValueError(f"ring port {name}: steering is for {self.steering.nqueues} queues, the port has {self.nqueues}")
        self.queues = [Queue(rx[i], tx[i], state.words[i], None, qid=i) for i in range(self.nqueues)]

    # -- layout and construction --------------------------------------------

    @staticmethod
    def layout(name: str, nq: int = DEFAULT_QUEUES, slots: int = DEFAULT_SLOTS, frame: int = DEFAULT_FRAME) -> list[tuple[str, int]]:
        """``(zone_name, size)`` of every zone the port needs: its queue state, then each queue's rx and tx rings."""
        if not _NAME_RE.match(name):
            raise ValueError(f"ring port: name {name!r} must be 1-32 letters, digits, '_' or '-'")
        if not 1 <= nq <= MAX_QUEUES:
            raise ValueError(f"ring port {name}: queues={nq} must be between 1 and {MAX_QUEUES}")
        names = zone_names(name, nq)
        ring = FrameRing.zone_size(slots, frame)
        out = [(names["state"], QueueState.zone_size(nq))]
        for i in range(nq):
            out.append((names[f"q{i}.rx"], ring))
            out.append((names[f"q{i}.tx"], ring))
        return out

    @classmethod
    def layout_for(cls, spec: PortSpec) -> list[tuple[str, int]]:
        """:meth:`layout` for a parsed ``ring:`` spec."""
        o = spec.options
        return cls.layout(spec.name, o["queues"], o["slots"], o["frame"])

    @classmethod
    def create(
        cls, name: str, buffers: dict[str, np.ndarray], nq: int = DEFAULT_QUEUES, slots: int = DEFAULT_SLOTS, frame: int = DEFAULT_FRAME, steering: Steering | None = None
    ) -> "RingPort":
        """Initialise every zone of a new port in ``buffers`` (zone name -> buffer)."""
        layout = cls.layout(name, nq, slots, frame)
        _check_buffers(name, buffers, layout)
        names = zone_names(name, nq)
        state = QueueState.create(buffers[names["state"]], nq)
        rx = [FrameRing.create(buffers[names[f"q{i}.rx"]], slots, frame, role=ROLE_RX) for i in range(nq)]
        tx = [FrameRing.create(buffers[names[f"q{i}.tx"]], slots, frame, role=ROLE_TX) for i in range(nq)]
        return cls(name, state, rx, tx, steering)

    @classmethod
    def attach(cls, name: str, buffers: dict[str, np.ndarray], steering: Steering | None = None) -> "RingPort":
        """Attach to an existing port's zones (schema-checked, nothing written)."""
        names = zone_names(name, 1)
        if names["state"] not in buffers:
            raise ValueError(f"ring port {name}: no buffer for zone {names['state']!r}")
        state = QueueState.attach(buffers[names["state"]])
        names = zone_names(name, state.nqueues)
        missing = [z for z in names.values() if z not in buffers]
        if missing:
            raise ValueError(f"ring port {name}: no buffer for zones {missing}")
        rx = [FrameRing.attach(buffers[names[f"q{i}.rx"]], role=ROLE_RX) for i in range(state.nqueues)]
        tx = [FrameRing.attach(buffers[names[f"q{i}.tx"]], role=ROLE_TX) for i in range(state.nqueues)]
        geo = {(r.nslots, r.frame_size) for r in rx + tx}
        if len(geo) != 1:
            raise ValueError(f"ring port {name}: queues disagree on ring geometry {sorted(geo)}")
        return cls(name, state, rx, tx, steering)

    @classmethod
    def from_spec(cls, spec: "PortSpec | str", buffers: dict[str, np.ndarray], *, create: bool) -> "RingPort":
        """Create or attach the port a ``ring:`` spec describes, with the spec's steering."""
        if isinstance(spec, str):
            spec = parse_port_spec(spec)
        if spec.type != "ring":
            raise ValueError(f"ring port: spec {spec} is a {spec.type} port, not a ring port")
        o = spec.options
        if create:
            return cls.create(spec.name, buffers, o["queues"], o["slots"], o["frame"], spec.steering())
        port = cls.attach(spec.name, buffers)
        if port.nqueues != spec.queues or port.nslots != o["slots"] or port.frame_size != o["frame"]:
            raise ValueError(
                f"ring port {spec.name}: the zones hold {port.nqueues} queues of {port.nslots} slots x {port.frame_size} B, "
                f"the spec says {spec.queues} x {o['slots']} x {o['frame']}"
            )
        port.steering = spec.steering()
        return port

    def __repr__(self) -> str:
        return f"RingPort({self.name!r}, queues={self.nqueues}, slots={self.nslots}, frame={self.frame_size}, steer={self.steering.mode})"

    # -- peer side -----------------------------------------------------------

    def peer_send(self, frames: np.ndarray, lengths: np.ndarray, queues: np.ndarray | None = None, ts_ns=None) -> np.ndarray:
        """Feed frames to the port's RX rings as a NIC would; returns frames queued per queue (int64[nq]).

        ``queues`` (a queue index per frame) defaults to the port's steering.
        Order is kept per queue; what a full RX ring cannot take is dropped
        and counted in that ring's ``peer_drops``.
        """
        lengths = np.asarray(lengths)
        n = lengths.shape[0]
        sent = np.zeros(self.nqueues, dtype=np.int64)
        if n == 0:
            return sent
        if self.nqueues == 1:
            sent[0] = self.rx_rings[0].peer_send(frames[:n], lengths, ts_ns)
            return sent
        if queues is None:
            queues = self.steering(frames[:n], lengths)
        queues = np.asarray(queues)
        if queues.shape[0] != n or queues.min() < 0 or queues.max() >= self.nqueues:
            raise ValueError(f"ring port {self.name}: queue indexes must be one per frame in [0, {self.nqueues})")
        # A stable sort groups each queue's frames and keeps their order.
        order = np.argsort(queues, kind="stable")
        bounds = np.searchsorted(queues[order], np.arange(self.nqueues + 1))
        per_ts = ts_ns is not None and np.ndim(ts_ns) > 0
        for qi in range(self.nqueues):
            a, b = bounds[qi], bounds[qi + 1]
            if a == b:
                continue
            idx = order[a:b]
            ts = np.asarray(ts_ns)[idx] if per_ts else ts_ns
            sent[qi] = self.rx_rings[qi].peer_send(frames[idx], lengths[idx], ts)
        return sent

    def peer_recv(self, max_n: int, out_frames: np.ndarray, out_lengths: np.ndarray, queue: int | None = None) -> int:
        """Drain up to ``max_n`` frames from the TX rings (one queue, or every queue in turn) into ``out_*``."""
        qs = range(self.nqueues) if queue is None else (queue,)
        got = 0
        for qi in qs:
            if got >= max_n:
                break
            got += self.tx_rings[qi].peer_recv(max_n - got, out_frames[got:], out_lengths[got:])
        return got

    def peer_drops(self) -> int:
        """Frames the peer dropped because an RX ring was full, over all queues."""
        return sum(r.peer_counters()["drops"] for r in self.rx_rings)


def _check_buffers(name: str, buffers: dict[str, np.ndarray], layout: list[tuple[str, int]]) -> None:
    for zone, size in layout:
        b = buffers.get(zone)
        if b is None:
            raise ValueError(f"ring port {name}: no buffer for zone {zone!r}")
        if b.nbytes < size:
            raise ValueError(f"ring port {name}: zone {zone!r} has {b.nbytes} bytes, needs {size}")


def alloc_buffers(layout: list[tuple[str, int]], mem: "np.ndarray | None" = None) -> dict[str, np.ndarray]:
    """Carve 64-byte aligned buffers for ``layout`` out of ``mem`` (default: a new private array).

    For tests, benches and tools without a memzone directory; pass an
    ``mmap``-backed array for buffers shared with a forked peer.
    """
    total = sum((size + 63) & ~63 for _, size in layout) + 64
    if mem is None:
        mem = np.zeros(total, dtype=np.uint8)
    if mem.nbytes < total:
        raise ValueError(f"alloc_buffers: the layout needs {total} bytes, the memory has {mem.nbytes}")
    off = (-mem.ctypes.data) % 64
    out = {}
    for zone, size in layout:
        out[zone] = mem[off : off + size]
        off += (size + 63) & ~63
    return out


def buffers_size(layout: list[tuple[str, int]]) -> int:
    """Bytes :func:`alloc_buffers` needs for ``layout``."""
    return sum((size + 63) & ~63 for _, size in layout) + 64
