"""``af_packet:IFACE[,queues=N]`` ports: AF_PACKET sockets with PACKET_MMAP rings.

Each queue of a port is one AF_PACKET ``SOCK_RAW`` socket bound to the
interface (``ETH_P_ALL``) with a TPACKET_V2 RX ring and TX ring in one
mapping (RX first, then TX). With more than one queue the sockets join one
``PACKET_FANOUT`` group of type ``PACKET_FANOUT_CBPF`` whose classic-BPF
program (:mod:`hotplane.shared.bpf`) computes the steering function of
``docs/CONTRACTS.md``, so both directions of a session reach one queue.

Split between processes (DESIGN "Ports and the fast path"):

* primary: :func:`open_af_packet_queues` creates the sockets and rings and
  keeps them open for the life of the port, so a queue keeps buffering (and
  counting its drops) while no worker polls it;
* worker: receives a queue's fd over the IPC channel (SCM_RIGHTS) and calls
  :func:`map_af_packet_queue`, which maps the rings as the 2-D ``frames``
  arrays of the CONTRACTS frame-ring format and returns the TX doorbell.

Ring facts the burst engine relies on (measured by ``tests/test_af_packet.py``):
RX frame data starts at ``tp_mac == RX_DATA_OFFSET`` (66) and TX frame data
at ``TX_DATA_OFFSET`` (32). The kernel keeps its own RX and TX positions in
the socket: both advance one slot at a time from slot 0, so a consumer's
cursor must continue from where the previous owner stopped (the queue-state
zone keeps it) -- in particular the kernel only transmits the slot at *its*
TX head, so TX slots must be filled in ring order.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import math
import mmap
import os
import socket
import struct
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from hotplane.shared import bpf

# --- constants (linux/if_packet.h, linux/if_ether.h, asm-generic/socket.h) ---
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_LOSS = 14
PACKET_TX_RING = 13
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20
PACKET_FANOUT_DATA = 22
PACKET_IGNORE_OUTGOING = 23
TPACKET_V2 = 1

PACKET_FANOUT_HASH = 0
PACKET_FANOUT_CBPF = 6
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
ETH_P_ALL = 0x0003

SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
SIOCGIFINDEX = 0x8933
IFF_UP = 0x1
IFF_RUNNING = 0x40
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
CLONE_NEWNET = 0x40000000

# TPACKET_V2 frame geometry (see CONTRACTS "Ports"): the header is 32 bytes;
# RX data sits after TPACKET_ALIGN(32 + sizeof(sockaddr_ll) + 16 - 14) -> 66
# for a 14-byte Ethernet header; TX data right after the 32-byte header.
TPACKET_ALIGNMENT = 16
TPACKET2_HDR_SIZE = 32
SOCKADDR_LL_SIZE = 20
ETH_HLEN = 14


def _tpacket_align(n: int) -> int:
    return (n + TPACKET_ALIGNMENT - 1) & ~(TPACKET_ALIGNMENT - 1)


RX_NET_OFFSET = _tpacket_align(TPACKET2_HDR_SIZE + SOCKADDR_LL_SIZE + 16)  # tp_net == 80
RX_DATA_OFFSET = RX_NET_OFFSET - ETH_HLEN  # tp_mac == 66
TX_DATA_OFFSET = TPACKET2_HDR_SIZE  # 32 (TPACKET2_HDRLEN - sizeof(sockaddr_ll))

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_COPY = 2
TP_STATUS_LOSING = 4
TP_STATUS_CSUMNOTREADY = 8
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4

STEER_MODES = ("inside", "outside", "rss")
"""inside/outside: the CONTRACTS steering program (PACKET_FANOUT_CBPF); rss: the kernel's own
symmetric flow hash (PACKET_FANOUT_HASH) -- spreads load but is not steering.py's Toeplitz RSS
and keeps no NAT port blocks, so only inside/outside give DESIGN invariant 2."""

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_MAX_BLOCK = 1 << 16  # 64 KiB blocks: few allocations, still cheap to find


class AfPacketError(RuntimeError):
    """An af_packet port cannot be opened; the message says what to do."""


class InterfaceMissing(AfPacketError):
    """The interface does not exist (in the network namespace we looked in)."""


class InterfaceDown(AfPacketError):
    """The interface exists but is administratively down."""


class NeedsCapNetRaw(AfPacketError):
    """AF_PACKET sockets need root or CAP_NET_RAW."""


# --- ring geometry ----------------------------------------------------------------


@dataclass(frozen=True)
class RingParams:
    """Geometry of one queue's rings; the worker needs the same values to map them.

    ``frame_size`` is a multiple of 16; ``frame_nr``/``tx_frame_nr`` are the RX
    and TX slot counts; ``block_size`` (0: chosen) is a multiple of the page
    size and of ``frame_size`` so slots tile the mapping with no gaps.
    """

    frame_size: int = 2048
    frame_nr: int = 1024
    tx_frame_nr: int = 0  # 0: same as frame_nr
    block_size: int = 0  # 0: derived, see resolved()
    qdisc_bypass: bool = True

    def resolved(self) -> "RingParams":
        """Validate and fill the derived fields (what the primary actually asks the kernel for)."""
        fs = self.frame_size
        if fs < RX_DATA_OFFSET + ETH_HLEN + 64 or fs % TPACKET_ALIGNMENT:
            raise AfPacketError(f"frame_size {fs} must be a multiple of 16 and at least {RX_DATA_OFFSET + ETH_HLEN + 64}")
        tx_nr = self.tx_frame_nr or self.frame_nr
        unit = fs * PAGE_SIZE // math.gcd(fs, PAGE_SIZE)  # lcm: smallest legal block
        per_unit = unit // fs
        for nr, what in ((self.frame_nr, "frame_nr"), (tx_nr, "tx_frame_nr")):
            if nr < per_unit or nr % per_unit:
                raise AfPacketError(
                    f"{what} {nr} must be a positive multiple of {per_unit} "
                    f"(frames per {unit}-byte block with frame_size {fs})"
                )
        block = self.block_size
        if block:
            if block % unit:
                raise AfPacketError(f"block_size {block} must be a multiple of the page size and of frame_size ({unit})")
            for nr, what in ((self.frame_nr, "frame_nr"), (tx_nr, "tx_frame_nr")):
                if nr % (block // fs):
                    raise AfPacketError(f"{what} {nr} must be a multiple of {block // fs} (frames per block)")
        else:
            # the largest multiple of `unit` up to 64 KiB whose frame count divides both rings
            block = unit
            k = max(1, DEFAULT_MAX_BLOCK // unit)
            while k > 1:
                per = k * per_unit
                if self.frame_nr % per == 0 and tx_nr % per == 0:
                    block = k * unit
                    break
                k -= 1
        return RingParams(fs, self.frame_nr, tx_nr, block, self.qdisc_bypass)

    @property
    def rx_bytes(self) -> int:
        return self.frame_size * self.frame_nr

    @property
    def tx_bytes(self) -> int:
        return self.frame_size * (self.tx_frame_nr or self.frame_nr)

    @property
    def mmap_size(self) -> int:
        """Bytes of the single mapping: the RX ring then the TX ring."""
        return self.rx_bytes + self.tx_bytes

    def tpacket_req(self, tx: bool) -> bytes:
        """``struct tpacket_req {block_size, block_nr, frame_size, frame_nr}``."""
        r = self.resolved()
        nr = r.tx_frame_nr if tx else r.frame_nr
        return struct.pack("=IIII", r.block_size, nr * r.frame_size // r.block_size, r.frame_size, nr)

    def to_dict(self) -> dict:
        """Plain dict for the IPC channel (msgpack)."""
        return asdict(self.resolved())

    @classmethod
    def from_dict(cls, d: dict) -> "RingParams":
        return cls(**{k: d[k] for k in ("frame_size", "frame_nr", "tx_frame_nr", "block_size", "qdisc_bypass") if k in d})


# --- network namespaces --------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextlib.contextmanager
def netns_scope(name: str | None) -> Iterator[None]:
    """Run the body in network namespace ``name`` (``/run/netns/NAME`` or a path); None: stay.

    Only the calling thread switches; sockets created inside stay bound to
    that namespace after the body returns to the original one.
    """
    if name is None:
        yield
        return
    path = name if name.startswith("/") else f"/run/netns/{name}"
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AfPacketError(f"network namespace {name!r} does not exist: check `ip netns list`") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except PermissionError:
            raise NeedsCapNetRaw(f"entering network namespace {name!r} needs root (CAP_SYS_ADMIN)") from None
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


# --- interface facts -------------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceInfo:
    name: str
    ifindex: int
    flags: int
    mtu: int
    mac: bytes
    arptype: int

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def carrier(self) -> bool:
        return bool(self.flags & IFF_RUNNING)


def _ifreq(sock: socket.socket, req: int, name: str) -> bytes:
    buf = struct.pack("16s24s", name.encode(), b"")
    return fcntl.ioctl(sock.fileno(), req, buf)


def interface_info(sock: socket.socket, iface: str, where: str = "") -> InterfaceInfo:
    """Look ``iface`` up from ``sock``'s network namespace; raise :class:`InterfaceMissing` if absent."""
    if not iface or len(iface.encode()) >= 16:
        raise InterfaceMissing(f"bad interface name {iface!r}: names are 1..15 bytes")
    try:
        ifindex = struct.unpack_from("i", _ifreq(sock, SIOCGIFINDEX, iface), 16)[0]
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            raise InterfaceMissing(f"interface {iface} does not exist{where}: check `ip link`") from None
        raise
    flags = struct.unpack_from("H", _ifreq(sock, SIOCGIFFLAGS, iface), 16)[0]
    mtu = struct.unpack_from("i", _ifreq(sock, SIOCGIFMTU, iface), 16)[0]
    hw = _ifreq(sock, SIOCGIFHWADDR, iface)
    arptype = struct.unpack_from("H", hw, 16)[0]
    return InterfaceInfo(iface, ifindex, flags, mtu, bytes(hw[18:24]), arptype)


# --- kernel statistics -----------------------------------------------------------------


def read_packet_statistics(sock: socket.socket) -> tuple[int, int]:
    """``(packets, drops)`` since the last read: PACKET_STATISTICS *resets* the kernel's counters.

    ``packets`` counts every frame the socket was offered, including the
    ``drops`` the full RX ring had to refuse. Exactly one process should read
    a queue's statistics and accumulate them (:func:`collect_kernel_drops`).
    """
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    packets, drops = struct.unpack("=II", raw)
    return packets, drops


def collect_kernel_drops(*queues) -> int:
    """Add each af_packet queue's kernel drops since the last read to its ``kernel_drops`` word.

    Called by the queue's *owner* only (the worker, inside its pass, on its
    ~10 ms tick): PACKET_STATISTICS resets the kernel's counters on every
    read, so a second reader would steal counts. Nobody reads while no worker
    owns the queue; the kernel keeps counting meanwhile, and the next owner's
    first read collects everything. ``queues`` are burst-engine queues; those
    that are not af_packet (no :class:`Doorbell`) are skipped. Returns the
    drops added. Never raises: a statistics read must not kill a worker.
    """
    from hotplane.schema.port import W_KERNEL_DROPS

    added = 0
    for q in queues:
        bell = q.doorbell
        if not isinstance(bell, Doorbell):
            continue
        try:
            _packets, drops = read_packet_statistics(bell.sock)
        except OSError:
            continue
        if drops:
            q.words[W_KERNEL_DROPS] += drops
            added += drops
    return added


@dataclass
class KernelStats:
    """Accumulated kernel counters of one queue (the kernel's own reset on every read)."""

    packets: int = 0  # offered to the socket (delivered + drops)
    drops: int = 0  # refused because the RX ring was full

    @property
    def delivered(self) -> int:
        return self.packets - self.drops


# --- primary side -----------------------------------------------------------------------


@dataclass
class AfPacketQueue:
    """One queue of an af_packet port, as the primary holds it.

    ``fd`` is what goes to a worker over SCM_RIGHTS (with ``params.to_dict()``).
    The primary keeps the socket open: the ring keeps filling (and the kernel
    counting drops) while no worker polls it.
    """

    iface: str
    index: int
    nq: int
    mode: str
    params: RingParams
    sock: socket.socket
    ifindex: int
    mac: bytes
    fanout_id: int | None
    netns: str | None = None
    stats: KernelStats = field(default_factory=KernelStats)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_kernel_stats(self) -> KernelStats:
        """Add the kernel's counters since the last read to :attr:`stats` and return it.

        For a socket this process alone reads (the sink's, a test's). The
        primary never calls it on a port's queues: their owner (the worker)
        collects into the queue state (:func:`collect_kernel_drops`).
        """
        packets, drops = read_packet_statistics(self.sock)
        self.stats.packets += packets
        self.stats.drops += drops
        return self.stats

    def map(self) -> tuple[np.ndarray, np.ndarray, "Doorbell"]:
        """Map this queue's rings in this process (what a worker does with the passed fd)."""
        return map_af_packet_queue(self.fd, self.params)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "AfPacketQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attach_filter(sock: socket.socket, prog: bpf.Asm) -> None:
    bpf.setsockopt_program(sock, socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def _new_socket(iface: str, where: str) -> socket.socket:
    try:
        # protocol 0: the socket receives nothing until bind() names ETH_P_ALL
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError:
        raise NeedsCapNetRaw(
            f"AF_PACKET needs root or CAP_NET_RAW to open {iface}{where}: run as root, "
            "or grant the capability (e.g. systemd AmbientCapabilities=CAP_NET_RAW CAP_NET_ADMIN)"
        ) from None


def _check_interface(info: InterfaceInfo, params: RingParams, where: str) -> None:
    if not info.up:
        raise InterfaceDown(f"interface {info.name} is down{where}: `ip link set {info.name} up`")
    if info.arptype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        raise AfPacketError(
            f"interface {info.name}{where} is not Ethernet (ARPHRD {info.arptype}): af_packet ports need "
            "a 14-byte Ethernet header (frame data at tp_mac 66)"
        )
    biggest = info.mtu + ETH_HLEN
    if RX_DATA_OFFSET + biggest > params.frame_size:
        raise AfPacketError(
            f"interface {info.name}{where} has MTU {info.mtu}: frames of {biggest} bytes do not fit "
            f"frame_size {params.frame_size} (data at offset {RX_DATA_OFFSET}); use frame_size >= "
            f"{_tpacket_align(RX_DATA_OFFSET + biggest)} or lower the MTU, and turn GRO/GSO/TSO off "
            "(`ethtool -K IFACE gro off gso off tso off`)"
        )


def _join_fanout(sock: socket.socket, group: int, flags: int, ftype: int) -> None:
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | ((ftype | flags) << 16))


def open_af_packet_queues(
    iface: str,
    nq: int = 1,
    mode: str = "inside",
    ring_params: RingParams | None = None,
    *,
    port_lo: int = bpf.DEFAULT_PORT_LO,
    block: int | None = None,
    netns: str | None = None,
    fanout_group: int | None = None,
) -> list[AfPacketQueue]:
    """Create the ``nq`` queue sockets of ``af_packet:iface`` (primary side).

    Each socket gets TPACKET_V2 RX and TX rings (``ring_params``), PACKET_LOSS
    (a malformed TX slot is skipped instead of stalling the ring),
    PACKET_QDISC_BYPASS (unless disabled) and ignores the frames it sends
    itself. With ``nq > 1`` they join one PACKET_FANOUT_CBPF group running the
    ``mode`` ("inside"/"outside") steering program (``"rss"``: a
    PACKET_FANOUT_HASH group, see :data:`STEER_MODES`); queue ``i`` is the
    ``i``-th member, which is the index the kernel picks from the program's
    result. The sockets must all stay open for the life of the port: when a
    member leaves, the kernel moves the last member into its place and the
    queue numbering changes.
    ``netns`` opens the interface in that named network namespace.
    ``fanout_group`` picks the group id (default: a unique one from the kernel).

    Raises :class:`InterfaceMissing`, :class:`InterfaceDown`,
    :class:`NeedsCapNetRaw` or :class:`AfPacketError` with what to do.
    """
    params = (ring_params or RingParams()).resolved()
    if not 1 <= nq <= 256:
        raise AfPacketError(f"queues must be 1..256, got {nq}")
    if mode not in STEER_MODES:
        raise AfPacketError(f"steering mode must be one of {', '.join(STEER_MODES)}, got {mode!r}")
    steer = bpf.steering_program(mode, nq, port_lo, block) if nq > 1 and mode != "rss" else None
    where = f" in network namespace {netns}" if netns else ""
    socks: list[socket.socket] = []
    queues: list[AfPacketQueue] = []
    try:
        with netns_scope(netns):
            info = None
            for _ in range(nq):
                s = _new_socket(iface, where)
                socks.append(s)
                if info is None:
                    info = interface_info(s, iface, where)
                    _check_interface(info, params, where)
                s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
                s.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
                # Silent until the whole fanout group exists, so no frame lands on a
                # socket the steering program would not have chosen.
                _attach_filter(s, bpf.drop_all_program())
                try:
                    s.setsockopt(SOL_PACKET, PACKET_RX_RING, params.tpacket_req(tx=False))
                    s.setsockopt(SOL_PACKET, PACKET_TX_RING, params.tpacket_req(tx=True))
                except OSError as e:
                    raise AfPacketError(
                        f"the kernel refused {2 * nq} rings of {params.frame_nr}/{params.tx_frame_nr} x "
                        f"{params.frame_size}-byte frames on {iface}{where} ({os.strerror(e.errno or 0)}): "
                        "use fewer or smaller frames"
                    ) from None
                if params.qdisc_bypass:
                    s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
                s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                s.bind((iface, ETH_P_ALL))
            assert info is not None
            fanout_id, drop_outgoing = (_form_group(socks, steer, fanout_group) if nq > 1 else (None, False))
            for s in socks:
                if drop_outgoing:
                    _attach_filter(s, bpf.drop_outgoing_program())
                else:
                    s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        for i, s in enumerate(socks):
            queues.append(AfPacketQueue(iface, i, nq, mode, params, s, info.ifindex, info.mac, fanout_id, netns))
        return queues
    except BaseException:
        for s in socks:
            s.close()
        raise


def _form_group(socks: list[socket.socket], steer: bpf.Asm | None, group: int | None) -> tuple[int, bool]:
    """Join every socket to one fanout group, in queue order: CBPF running ``steer``,
    or the kernel's flow hash (PACKET_FANOUT_HASH) when ``steer`` is None.

    Returns the group id, and whether frames the host sends must be filtered
    per socket because the kernel predates PACKET_FANOUT_FLAG_IGNORE_OUTGOING
    (a fanout member's own PACKET_IGNORE_OUTGOING is not consulted).
    """
    first, rest = socks[0], socks[1:]
    ftype = PACKET_FANOUT_HASH if steer is None else PACKET_FANOUT_CBPF
    ignore = PACKET_FANOUT_FLAG_IGNORE_OUTGOING
    unique = PACKET_FANOUT_FLAG_UNIQUEID if group is None else 0
    try:
        _join_fanout(first, group or 0, ignore | unique, ftype)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise _fanout_error(e, group) from None
        ignore = 0  # older kernel: no IGNORE_OUTGOING flag
        try:
            _join_fanout(first, group or 0, unique, ftype)
        except OSError as e2:
            raise _fanout_error(e2, group) from None
    gid = struct.unpack("=I", first.getsockopt(SOL_PACKET, PACKET_FANOUT, 4))[0] & 0xFFFF
    if steer is not None:
        bpf.setsockopt_program(first, SOL_PACKET, PACKET_FANOUT_DATA, steer)
    for s in rest:
        try:
            _join_fanout(s, gid, ignore, ftype)
        except OSError as e:
            raise _fanout_error(e, gid) from None
    return gid, not ignore


def _fanout_error(e: OSError, group: int | None) -> AfPacketError:
    if e.errno in (errno.EADDRINUSE, errno.EINVAL, errno.EALREADY) and group is not None:
        return AfPacketError(
            f"PACKET_FANOUT group {group} is taken by another socket set in this network namespace "
            f"({os.strerror(e.errno)}): pick another group id or let the kernel choose (fanout_group=None)"
        )
    return AfPacketError(f"joining the PACKET_FANOUT group failed: {os.strerror(e.errno)}")


# --- worker side ---------------------------------------------------------------------------


class Doorbell:
    """Tells the kernel to transmit the TX slots marked SEND_REQUEST: one ``send()`` per burst.

    ``send(b"", MSG_DONTWAIT)`` never blocks; EAGAIN and ENOBUFS (queue full)
    and ENETDOWN/ENXIO (link went away) are counted, not raised, so a busy or
    vanished link cannot kill a worker -- the slots stay SEND_REQUEST and the
    next doorbell retries them.
    """

    __slots__ = ("sock", "_send", "rings", "bytes_sent", "eagain", "enobufs", "link_errors", "last_errno")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send = sock.send
        self.rings = 0
        self.bytes_sent = 0
        self.eagain = 0
        self.enobufs = 0
        self.link_errors = 0
        self.last_errno = 0

    def __call__(self) -> int:
        """Ring once; return the bytes the kernel accepted for transmission (0 on a tolerated error)."""
        try:
            n = self._send(b"", socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.eagain += 1
            return 0
        except OSError as e:
            self.last_errno = e.errno or 0
            if e.errno == errno.ENOBUFS:
                self.enobufs += 1
            elif e.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                self.link_errors += 1
            else:
                raise
            return 0
        self.rings += 1
        self.bytes_sent += n
        return n

    def counters(self) -> dict[str, int]:
        return {"rings": self.rings, "bytes_sent": self.bytes_sent, "eagain": self.eagain, "enobufs": self.enobufs, "link_errors": self.link_errors}

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def map_af_packet_queue(fd: int, ring_params: RingParams | dict) -> tuple[np.ndarray, np.ndarray, Doorbell]:
    """Map a queue's rings from its socket fd (worker side): ``(rx_frames, tx_frames, doorbell)``.

    ``rx_frames`` and ``tx_frames`` are ``uint8`` arrays of shape ``(nslots,
    frame_size)`` over one shared mapping (RX then TX), in the CONTRACTS
    frame-ring format. ``ring_params`` must be the geometry the primary used.
    Does not take ownership of ``fd``: the mapping and the doorbell hold their
    own references to the socket, so the caller may close ``fd``.
    """
    params = (RingParams.from_dict(ring_params) if isinstance(ring_params, dict) else ring_params).resolved()
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        raise
    try:
        if sock.family != socket.AF_PACKET:
            raise AfPacketError(f"fd {fd} is not an AF_PACKET socket (family {sock.family})")
        try:
            mm = mmap.mmap(sock.fileno(), params.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise AfPacketError(
                f"mapping the rings of fd {fd} failed ({os.strerror(e.errno or 0)}): the ring geometry "
                f"{params.to_dict()} must be exactly what the primary set up"
            ) from None
        whole = np.frombuffer(mm, dtype=np.uint8)  # keeps `mm` alive
        rx = whole[: params.rx_bytes].reshape(params.frame_nr, params.frame_size)
        tx = whole[params.rx_bytes :].reshape(params.tx_frame_nr, params.frame_size)
        return rx, tx, Doorbell(sock)
    except BaseException:
        sock.close()
        raise
