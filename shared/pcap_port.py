"""``pcap:FILE`` ports: replay a capture into a port's RX rings, capture its TX rings to a file.

Files are classic libpcap files (not pcapng): a 24-byte global header, then
per packet a 16-byte record header (ts_sec, ts_usec, incl_len, orig_len) and
``incl_len`` bytes. The writer produces what tcpdump and Wireshark read by
default: little-endian, version 2.4, microsecond timestamps, snaplen 65535,
LINKTYPE_ETHERNET. The reader also takes big-endian and nanosecond files, and
refuses -- with a message naming what to do -- pcapng files, non-Ethernet link
types and truncated or corrupt files.

Reading walks record headers with ``struct`` (the offsets chain, so that part
is sequential; it is the slow path, done once per batch) and gathers the
packet bytes into a ``uint8[n, width]`` array with one vectorized copy; the
writer builds a whole burst's records in one buffer and writes it at once.

The port side is a *peer* of a :class:`~hotplane.shared.ring_port.RingPort`
(the rings a worker polls): :class:`PcapReplay` feeds the RX rings (at the
recorded rate or as fast as the rings take them), :class:`PcapCapture` drains
the TX rings into a file, and :class:`PcapPort` runs whichever the spec's
``mode`` asks for. :class:`PcapPortRunner` is the thread that does it for a
primary whose ``--inside``/``--outside`` is a ``pcap:`` port -- the "NIC" of
such a port, as DPDK's net_pcap vdev reads ``rx_pcap`` and writes ``tx_pcap``.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import numpy as np

from hotplane.shared.ring_port import PortSpec, RingPort, parse_port_spec

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
MAGIC_PCAPNG = 0x0A0D0D0A
LINKTYPE_ETHERNET = 1
DEFAULT_SNAPLEN = 65535
MAX_RECORD = 262144  # the largest snaplen libpcap itself accepts
GLOBAL_HEADER = 24
RECORD_HEADER = 16

LINKTYPE_NAMES = {
    0: "NULL (BSD loopback)",
    1: "ETHERNET",
    12: "RAW (IP, no link header)",
    101: "RAW (IP, no link header)",
    105: "IEEE802_11 (Wi-Fi)",
    113: "LINUX_SLL (Linux cooked capture, as `tcpdump -i any` writes)",
    127: "IEEE802_11_RADIOTAP",
    228: "IPV4 (no link header)",
    229: "IPV6 (no link header)",
    276: "LINUX_SLL2 (Linux cooked capture v2, as `tcpdump -i any` writes)",
}


class PcapError(ValueError):
    """A pcap file hotplane cannot use; the message says why and what to do."""


@dataclass
class PcapBatch:
    """Packets read from a file: frame ``j`` is ``frames[j, :lengths[j]]``; ``orig_lengths`` as on the wire; ``ts_ns`` since the epoch."""

    frames: np.ndarray
    lengths: np.ndarray
    orig_lengths: np.ndarray
    ts_ns: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


class PcapReader:
    """Read a classic pcap file of Ethernet frames in batches (the file is memory-mapped, not loaded).

    With ``allow_truncated`` a file cut short in its last record yields its
    whole records and stops (``truncated`` is then True); without it the cut is
    a :class:`PcapError`.
    """

    def __init__(self, path: str | os.PathLike, *, allow_truncated: bool = False) -> None:
        self.path = os.fspath(path)
        self.allow_truncated = allow_truncated
        self.truncated = False
        self.records = 0
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise PcapError(f"pcap file {self.path} is empty: nothing to replay (was the capture started and stopped cleanly?)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = size
        self._view = np.frombuffer(self._map, dtype=np.uint8)
        self._parse_header()
        self._pos = GLOBAL_HEADER

    def _parse_header(self) -> None:
        head = self._map[:GLOBAL_HEADER]
        if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == MAGIC_PCAPNG:
            raise PcapError(
                f"{self.path} is a pcapng file; hotplane reads classic pcap: convert it with "
                f"`editcap -F pcap {self.path} out.pcap` (or capture with `tcpdump -w`, which writes pcap)"
            )
        if len(head) < GLOBAL_HEADER:
            raise PcapError(f"pcap file {self.path} is truncated: {len(head)} bytes, shorter than the 24-byte pcap header; re-capture it")
        for order in ("<", ">"):
            magic = struct.unpack(order + "I", head[:4])[0]
            if magic in (MAGIC_US, MAGIC_NS):
                break
        else:
            raise PcapError(
                f"{self.path} is not a pcap file (magic {head[:4].hex()}, expected a1b2c3d4 or a1b23c4d in either byte order); "
                "give a classic libpcap file, e.g. one written by `tcpdump -w`"
            )
        self._order = order
        self.nanosecond = magic == MAGIC_NS
        vmaj, vmin, _zone, _sig, snaplen, network = struct.unpack(order + "HHiIII", head[4:])
        if vmaj != 2:
            raise PcapError(f"pcap file {self.path} has format version {vmaj}.{vmin}; hotplane reads version 2.4 (rewrite it with `editcap -F pcap`)")
        self.snaplen = snaplen
        self.linktype = network & 0xFFFF  # upper bits carry FCS flags in some writers
        if self.linktype != LINKTYPE_ETHERNET:
            name = LINKTYPE_NAMES.get(self.linktype, "not Ethernet")
            raise PcapError(
                f"pcap file {self.path} has link type {self.linktype} ({name}); hotplane ports carry Ethernet frames "
                "(LINKTYPE_ETHERNET, 1): capture on one Ethernet interface (`tcpdump -i IFACE -w FILE`) "
                "or convert the file (e.g. `tcprewrite --dlt=enet --infile=IN --outfile=OUT`)"
            )
        self._rec = struct.Struct(order + "IIII")

    def close(self) -> None:
        if self._map is not None:
            self._view = None
            self._map.close()
            self._map = None

    def __enter__(self) -> "PcapReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rewind(self) -> None:
        """Start again at the first record."""
        self._pos = GLOBAL_HEADER
        self.records = 0
        self.truncated = False

    @property
    def done(self) -> bool:
        return self._pos >= self._size or self.truncated

    def scan(self) -> int:
        """Walk every record header once (no packet data is read) and return the record count.

        Raises :class:`PcapError` for a truncated or corrupt file unless it was
        opened with ``allow_truncated`` (then the count is of the whole
        records and :attr:`truncated` is set). Commands call it before they
        start, so a bad file is refused up front, not half-way through a replay.
        """
        pos, size, rec, m = GLOBAL_HEADER, self._size, self._rec, self._map
        limit = max(self.snaplen, MAX_RECORD)
        count = 0
        while pos < size:
            if pos + RECORD_HEADER > size:
                self._truncated_at(count, pos, RECORD_HEADER, size - pos, "record header")
                break
            incl = rec.unpack_from(m, pos)[2]
            if incl > limit:
                raise PcapError(
                    f"pcap file {self.path} is corrupt: record {count} at byte offset {pos} claims {incl} bytes "
                    f"(more than the file's snaplen {self.snaplen}); the file is damaged: re-capture it or repair it with `pcapfix`"
                )
            if pos + RECORD_HEADER + incl > size:
                self._truncated_at(count, pos, RECORD_HEADER + incl, size - pos, "packet")
                break
            pos += RECORD_HEADER + incl
            count += 1
        self.truncated = False  # scanning reads nothing: read_batch finds the cut again
        return count

    def read_batch(self, max_n: int = 256, width: int | None = None) -> PcapBatch | None:
        """The next up to ``max_n`` packets, or None at the end of the file.

        ``width`` fixes the frames' column count (default: the longest packet
        in the batch); a packet longer than ``width`` is cut to it (its length
        is then ``width``, its original length kept in ``orig_lengths``).
        """
        if self.done:
            return None
        offs, caps, origs, secs, fracs = [], [], [], [], []
        pos, size, rec, m = self._pos, self._size, self._rec, self._map
        limit = max(self.snaplen, MAX_RECORD)
        while len(offs) < max_n and pos < size:
            if pos + RECORD_HEADER > size:
                self._truncated_at(self.records + len(offs), pos, RECORD_HEADER, size - pos, "record header")
                break
            sec, frac, incl, orig = rec.unpack_from(m, pos)
            if incl > limit:
                raise PcapError(
                    f"pcap file {self.path} is corrupt: record {self.records + len(offs)} at byte offset {pos} claims {incl} bytes "
                    f"(more than the file's snaplen {self.snaplen}); the file is damaged: re-capture it or repair it with `pcapfix`"
                )
            if pos + RECORD_HEADER + incl > size:
                self._truncated_at(self.records + len(offs), pos, RECORD_HEADER + incl, size - pos, "packet")
                break
            offs.append(pos + RECORD_HEADER)
            caps.append(incl)
            origs.append(max(orig, incl))
            secs.append(sec)
            fracs.append(frac)
            pos += RECORD_HEADER + incl
        self._pos = pos
        n = len(offs)
        if n == 0:
            return None
        self.records += n
        off = np.array(offs, dtype=np.int64)
        lengths = np.array(caps, dtype=np.int64)
        origs_a = np.array(origs, dtype=np.int64)
        if width is not None:
            lengths = np.minimum(lengths, width)
        cols = int(width if width is not None else (lengths.max() if n else 0))
        frames = np.zeros((n, max(cols, 1)), dtype=np.uint8)
        total = int(lengths.sum())
        if total:
            # One gather: row j takes bytes off[j] .. off[j] + lengths[j] of the file.
            rows = np.repeat(np.arange(n), lengths)
            starts = np.cumsum(lengths) - lengths
            within = np.arange(total) - np.repeat(starts, lengths)
            frames[rows, within] = self._view[np.repeat(off, lengths) + within]
        scale = 1 if self.nanosecond else 1000
        ts = np.array(secs, dtype=np.int64) * 1_000_000_000 + np.array(fracs, dtype=np.int64) * scale
        return PcapBatch(frames, lengths.astype(np.uint32), origs_a.astype(np.uint32), ts)

    def _truncated_at(self, record: int, pos: int, need: int, have: int, what: str) -> None:
        if self.allow_truncated:
            self.truncated = True
            return
        raise PcapError(
            f"pcap file {self.path} is truncated: record {record} at byte offset {pos} needs a {need}-byte {what} "
            f"but only {have} bytes remain (the capture was cut short, e.g. tcpdump killed or a disk full). "
            "Re-capture it, repair it with `pcapfix`, or replay only its whole records (allow_truncated=True)"
        )

    def __iter__(self) -> Iterator[PcapBatch]:
        while True:
            b = self.read_batch()
            if b is None:
                return
            yield b


def read_pcap(path: str | os.PathLike, *, allow_truncated: bool = False) -> PcapBatch:
    """Every packet of a pcap file as one batch (for tests and small files)."""
    with PcapReader(path, allow_truncated=allow_truncated) as r:
        batches = list(r)
    if not batches:
        return PcapBatch(np.zeros((0, 1), np.uint8), np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.int64))
    width = max(b.frames.shape[1] for b in batches)
    frames = np.zeros((sum(len(b) for b in batches), width), dtype=np.uint8)
    row = 0
    for b in batches:
        frames[row : row + len(b), : b.frames.shape[1]] = b.frames
        row += len(b)
    return PcapBatch(
        frames,
        np.concatenate([b.lengths for b in batches]),
        np.concatenate([b.orig_lengths for b in batches]),
        np.concatenate([b.ts_ns for b in batches]),
    )


class PcapWriter:
    """Write Ethernet frames to a classic pcap file (little-endian, v2.4, microseconds, LINKTYPE_ETHERNET)."""

    def __init__(self, path: str | os.PathLike, snaplen: int = DEFAULT_SNAPLEN, *, append: bool = False) -> None:
        """Create (truncate) ``path``; with ``append``, continue a file this writer's format already holds.

        Appending to a file of another format (big-endian, nanoseconds,
        another link type or snaplen) would make it unreadable: refused with a
        :class:`PcapError`. A record cut short at the end (a writer killed
        mid-write) is cut off before appending.
        """
        if not 14 <= snaplen <= MAX_RECORD:
            raise ValueError(f"pcap writer: snaplen {snaplen} must be between 14 and {MAX_RECORD}")
        self.path = os.fspath(path)
        self.snaplen = snaplen
        self.records = 0
        header = struct.pack("<IHHiIII", MAGIC_US, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)
        if append and os.path.exists(self.path) and os.path.getsize(self.path) >= GLOBAL_HEADER:
            with open(self.path, "rb") as f:
                head = f.read(GLOBAL_HEADER)
            if head != header:
                raise PcapError(f"cannot append to {self.path}: it is not a pcap file of this writer's format "
                                f"(little-endian, microseconds, Ethernet, snaplen {snaplen}); move it away or capture to another file")
            with PcapReader(self.path, allow_truncated=True) as r:
                self.records = r.scan()
                end = self._whole_end(r)
            self._f: BinaryIO | None = open(self.path, "r+b")
            self._f.truncate(end)
            self._f.seek(end)
            return
        self._f = open(self.path, "wb")
        self._f.write(header)

    @staticmethod
    def _whole_end(r: "PcapReader") -> int:
        """Byte offset just past the last whole record of ``r``'s file."""
        pos, size, rec, m = GLOBAL_HEADER, r._size, r._rec, r._map
        while pos + RECORD_HEADER <= size:
            incl = rec.unpack_from(m, pos)[2]
            if pos + RECORD_HEADER + incl > size:
                break
            pos += RECORD_HEADER + incl
        return pos

    def write_burst(self, frames: np.ndarray, lengths: np.ndarray, ts_ns: "np.ndarray | int | None" = None, orig_lengths: np.ndarray | None = None) -> int:
        """Append frames ``frames[j, :lengths[j]]`` (cut to the snaplen) in one write; returns how many."""
        if self._f is None:
            raise ValueError(f"pcap writer for {self.path} is closed")
        lengths = np.asarray(lengths, dtype=np.int64)
        n = int(lengths.shape[0])
        if n == 0:
            return 0
        if frames.ndim != 2 or frames.shape[0] < n or int(lengths.max()) > frames.shape[1] or int(lengths.min()) < 0:
            raise ValueError(f"pcap writer: frames {frames.shape} do not hold {n} frames of lengths up to {int(lengths.max())}")
        orig = lengths if orig_lengths is None else np.maximum(np.asarray(orig_lengths, dtype=np.int64), lengths)
        caplen = np.minimum(lengths, self.snaplen)
        if ts_ns is None:
            ts_ns = time.time_ns()
        ts = np.broadcast_to(np.asarray(ts_ns, dtype=np.int64), (n,))
        hdr = np.empty((n, 4), dtype="<u4")
        hdr[:, 0] = ts // 1_000_000_000
        hdr[:, 1] = (ts % 1_000_000_000) // 1000
        hdr[:, 2] = caplen
        hdr[:, 3] = orig
        rec = RECORD_HEADER + caplen
        starts = np.cumsum(rec) - rec
        out = np.empty(int(rec.sum()), dtype=np.uint8)
        out[starts[:, None] + np.arange(RECORD_HEADER)] = hdr.view(np.uint8).reshape(n, RECORD_HEADER)
        total = int(caplen.sum())
        if total:
            w = int(caplen.max())
            mask = np.arange(w)[None, :] < caplen[:, None]
            data = frames[:n, :w][mask]  # row-major: every frame's bytes, one after another
            within = np.arange(total) - np.repeat(np.cumsum(caplen) - caplen, caplen)
            out[np.repeat(starts + RECORD_HEADER, caplen) + within] = data
        self._f.write(out.data)
        self.records += n
        return n

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ReplayStats:
    """What a replay did: frames read from the file, queued on the rings, dropped because a ring was full."""

    read: int = 0
    sent: int = 0
    dropped: int = 0
    loops_done: int = 0
    skipped: int = 0  # replayed before a restart: not sent again


class PcapReplay:
    """Replay a pcap file into a ring port's RX rings, steered to queues by the port's steering.

    ``rate="recorded"`` keeps the file's inter-packet gaps (relative to the
    first packet); ``rate="max"`` sends as fast as the rings take frames.
    ``loop`` replays the file that many times. When an RX ring is full the
    frames that do not fit are dropped and counted (as a NIC does), unless
    ``backpressure`` is set: then the replay waits for room (tests, lossless
    generators). The frames' RX timestamps are the time they are queued.
    """

    def __init__(self, path: str | os.PathLike, *, rate: str = "recorded", loop: int = 1, burst: int = 256, allow_truncated: bool = False,
                 backpressure: bool = False, skip: int = 0) -> None:
        """``skip``: frames already replayed (a restarted primary resumes after them)."""
        if rate not in ("recorded", "max"):
            raise ValueError(f"pcap replay: rate must be 'recorded' or 'max', got {rate!r}")
        if loop < 1:
            raise ValueError(f"pcap replay: loop must be at least 1, got {loop}")
        self.reader = PcapReader(path, allow_truncated=allow_truncated)
        self.rate = rate
        self.loop = loop
        self.burst = burst
        self.backpressure = backpressure
        self.stats = ReplayStats()
        self._pending: PcapBatch | None = None
        self._pending_at = 0
        self._t0_file: int | None = None
        self._t0_wall = 0
        self._loop_offset = 0  # ns added to file timestamps on later loops
        self._last_ts = 0
        self._skip = max(0, int(skip))

    @property
    def done(self) -> bool:
        return self._pending is None and self.stats.loops_done >= self.loop

    def _next_batch(self) -> bool:
        while self._pending is None and self.stats.loops_done < self.loop:
            b = self.reader.read_batch(self.burst)
            if b is None:
                self.stats.loops_done += 1
                if self.stats.loops_done < self.loop:
                    if self.reader.records == 0:
                        self.stats.loops_done = self.loop  # an empty file: nothing to loop over
                        return False
                    self._loop_offset = self._last_ts + 1 - (self._t0_file or 0)
                    self.reader.rewind()
                continue
            b.ts_ns = b.ts_ns + self._loop_offset
            self._last_ts = int(b.ts_ns[-1]) - self._loop_offset
            self.stats.read += len(b)
            at = 0
            if self._skip:
                at = min(self._skip, len(b))
                self._skip -= at
                self.stats.skipped += at
                if at == len(b):
                    continue
            self._pending, self._pending_at = b, at
        return self._pending is not None

    def step(self, port: RingPort, now_ns: int | None = None, limit: int | None = None) -> int:
        """Queue every frame due by ``now_ns`` (monotonic), at most one burst and ``limit`` frames; returns frames handled (sent or dropped)."""
        if not self._next_batch() or (limit is not None and limit <= 0):
            return 0
        b, a = self._pending, self._pending_at
        now = time.monotonic_ns() if now_ns is None else now_ns
        if self._t0_file is None:
            self._t0_file, self._t0_wall = int(b.ts_ns[a]), now
        end = len(b)
        if self.rate == "recorded":
            due = self._t0_wall + (b.ts_ns[a:] - self._t0_file)
            end = a + int(np.searchsorted(due, now, side="right"))
            if end == a:
                return 0
        if limit is not None:
            end = min(end, a + limit)
        frames, lengths = b.frames[a:end], b.lengths[a:end]
        if self.backpressure:
            taken = self._send_lossless(port, frames, lengths)
            sent, dropped = taken, 0
            end = a + taken
        else:
            sent = int(port.peer_send(frames, lengths).sum())
            dropped = (end - a) - sent
        self.stats.sent += sent
        self.stats.dropped += dropped
        if end >= len(b):
            self._pending = None
        else:
            self._pending_at = end
        return end - a

    def _send_lossless(self, port: RingPort, frames: np.ndarray, lengths: np.ndarray) -> int:
        """Queue the longest prefix every target ring has room for (order kept per queue; the rest waits)."""
        queues = port.steering(frames, lengths) if port.nqueues > 1 else np.zeros(len(lengths), np.int64)
        room = np.array([r.peer_space() for r in port.rx_rings])
        # Frame j fits if its queue has room for it and every earlier frame of that queue.
        rank = np.zeros(len(lengths), dtype=np.int64)
        for qi in range(port.nqueues):
            sel = queues == qi
            rank[sel] = np.arange(int(sel.sum()))
        fits = rank < room[queues]
        k = len(lengths) if fits.all() else int(np.argmin(fits))
        if k:
            port.peer_send(frames[:k], lengths[:k], queues[:k])
        return k

    def next_due_ns(self) -> int | None:
        """Monotonic time the next frame is due (None when done; now-ish for rate=max)."""
        if not self._next_batch():
            return None
        if self.rate == "max" or self._t0_file is None:
            return time.monotonic_ns()
        return self._t0_wall + int(self._pending.ts_ns[self._pending_at]) - self._t0_file

    def run(self, port: RingPort, *, stop: Callable[[], bool] | None = None, timeout: float | None = None) -> ReplayStats:
        """Replay to the end (or until ``stop()`` is true or ``timeout`` seconds pass); returns the stats."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if stop is not None and stop():
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            if self.step(port) == 0:
                due = self.next_due_ns()
                if due is None:
                    break
                # Waiting for the recorded time (or for ring room under backpressure).
                wait = (due - time.monotonic_ns()) / 1e9
                time.sleep(min(max(wait, 0.0001), 0.05))
        return self.stats

    def close(self) -> None:
        self.reader.close()


class PcapCapture:
    """Drain a ring port's TX rings into a pcap file (what the worker sends on a ``pcap:FILE,mode=capture`` port)."""

    def __init__(self, path: str | os.PathLike, *, snaplen: int = DEFAULT_SNAPLEN, burst: int = 256, width: int = 65536, append: bool = False) -> None:
        self.writer = PcapWriter(path, snaplen, append=append)
        self.burst = burst
        self._frames: np.ndarray | None = None
        self._lengths = np.zeros(burst, dtype=np.uint32)
        self._width = width
        self.captured = 0

    def drain(self, port: RingPort, max_n: int | None = None) -> int:
        """Take up to ``max_n`` (default one burst) frames off the TX rings and append them; returns how many."""
        if self._frames is None or self._frames.shape[1] < port.frame_size:
            self._frames = np.zeros((self.burst, min(self._width, port.frame_size)), dtype=np.uint8)
        n = port.peer_recv(min(max_n or self.burst, self.burst), self._frames, self._lengths)
        if n:
            self.writer.write_burst(self._frames, self._lengths[:n])
            self.writer.flush()  # whole records on disk per burst: tcpdump can read the file while it grows
            self.captured += n
        return n

    def close(self) -> None:
        self.writer.close()


class PcapPort:
    """The peer of a ``pcap:FILE`` port: a ring port whose RX is fed from the file or whose TX is written to it.

    ``mode=replay``: :meth:`step` queues due frames on the RX rings and
    discards (counting) what the worker sends. ``mode=capture``: :meth:`step`
    appends what the worker sends to the file; the RX rings stay empty.
    """

    def __init__(self, spec: "PortSpec | str", port: RingPort, *, backpressure: bool = False, allow_truncated: bool = False, resume: bool = False) -> None:
        """``resume``: the port's zones outlived a previous peer (a restarted primary): a replay
        continues after the frames the RX rings already took (their peer counters), a capture
        appends to its file."""
        if isinstance(spec, str):
            spec = parse_port_spec(spec)
        if spec.type != "pcap":
            raise ValueError(f"pcap port: spec {spec} is a {spec.type} port")
        self.spec = spec
        self.port = port
        self.mode = spec.options["mode"]
        self.replay: PcapReplay | None = None
        self.capture: PcapCapture | None = None
        self.discarded = 0
        if self.mode == "replay":
            done = sum(r.peer_counters()["frames"] + r.peer_counters()["drops"] for r in port.rx_rings) if resume else 0
            self.replay = PcapReplay(spec.name, rate=spec.options["rate"], loop=spec.options["loop"], allow_truncated=allow_truncated,
                                     backpressure=backpressure, skip=done)
            self.replay.reader.scan()  # a truncated or corrupt file is refused now, not half-way through
            self._sink = np.zeros((256, port.frame_size), dtype=np.uint8)
            self._sink_len = np.zeros(256, dtype=np.uint32)
        else:
            self.capture = PcapCapture(spec.name, append=resume)

    def step(self, limit: int | None = None) -> int:
        """One round of the peer's work (a replay queues at most ``limit`` frames); returns frames moved."""
        if self.replay is not None:
            moved = self.replay.step(self.port, limit=limit)
            got = self.port.peer_recv(256, self._sink, self._sink_len)
            self.discarded += got
            return moved + got
        return self.capture.drain(self.port)

    @property
    def done(self) -> bool:
        return self.replay is not None and self.replay.done

    def close(self) -> None:
        if self.replay is not None:
            self.replay.close()
        if self.capture is not None:
            self.capture.close()


class PcapPortRunner:
    """The thread that is the "NIC" of a primary's ``pcap:`` ports: replays files into RX rings, captures TX rings.

    Replays are lossless (``backpressure``): a frame waits for RX ring room
    instead of being dropped, at its recorded time or as fast as the worker
    polls (``rate=max``), as DPDK's net_pcap reads its file in rx_burst. With
    capture ports in the same runner the replay is also clocked by them: it
    keeps no more frames in flight on queue ``j`` (waiting in its RX ring)
    than capture queue ``j``'s TX ring has free slots, so a worker forwarding
    replay -> capture never finds that TX ring full because the file writer
    lags (net_pcap's TX writes synchronously and never drops either). What a
    worker sends on a replay port is discarded (counted in ``discarded``).
    """

    IDLE_SLEEP = 0.0005

    def __init__(self, ports: list[PcapPort], log=None) -> None:
        self.ports = ports
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pcap-ports", daemon=True)
        self._announced: set[int] = set()

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                moved = 0
                for i, p in enumerate(self.ports):
                    moved += p.step(self._budget(p))
                    if p.done and i not in self._announced:
                        self._announced.add(i)
                        st = p.replay.stats
                        self.log(f"pcap replay of {p.spec.name} done: {st.sent} frames sent"
                                 + (f" ({st.skipped} already replayed before a restart)" if st.skipped else ""))
                if not moved:
                    self._stop.wait(self._idle_wait())
        except BaseException as e:  # reported by stop(); the primary keeps serving
            self.error = e
            self.log(f"pcap ports stopped: {e}")

    def _budget(self, p: PcapPort) -> int | None:
        """How many more frames replay port ``p`` may queue without overrunning a capture port's TX ring."""
        if p.replay is None:
            return None
        budget = None
        for c in self.ports:
            if c.capture is None:
                continue
            for rx, tx in zip(p.port.rx_rings, c.port.tx_rings):
                room = tx.nslots - tx.count_ready() - rx.count_ready()
                budget = room if budget is None else min(budget, room)
        return budget

    def _idle_wait(self) -> float:
        now = time.monotonic_ns()
        wait = 0.01
        for p in self.ports:
            if p.replay is not None and not p.replay.done:
                due = p.replay.next_due_ns()
                if due is not None:
                    wait = min(wait, max(0.0, (due - now) / 1e9))
            elif p.capture is not None:
                wait = min(wait, self.IDLE_SLEEP)
        return max(wait, self.IDLE_SLEEP)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, then drain what the capture ports' TX rings still hold and close every file."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for p in self.ports:
            try:
                if p.capture is not None and self.error is None:
                    while p.capture.drain(p.port):
                        pass
            finally:
                p.close()

    def status(self) -> list[dict]:
        """Per port: file, mode and frames moved (for the primary's ``status``)."""
        out = []
        for p in self.ports:
            d = {"file": p.spec.name, "mode": p.mode}
            if p.replay is not None:
                st = p.replay.stats
                d.update(sent=st.sent, skipped=st.skipped, done=p.done, discarded=p.discarded)
            else:
                d.update(captured=p.capture.captured, records=p.capture.writer.records)
            out.append(d)
        return out
