"""A TPACKET_V2 frame ring: fixed frame slots with a status word each.

One class serves every port type (docs/CONTRACTS.md, "Ports"):

* :meth:`FrameRing.create` / :meth:`FrameRing.attach` put a ring in a buffer
  (a memzone view) with a ``frame_ring`` header (schema id 5): ``ring:NAME``
  ports, whose peer is another process on the same machine;
* :meth:`FrameRing.from_frames` wraps memory that is not a zone, such as the
  kernel's PACKET_MMAP mapping of an AF_PACKET socket (no header, no peer ops).

The worker side (reading an RX ring, filling a TX ring) is the burst engine in
:mod:`hotplane.shared.burst`. This module holds the ring itself and the *peer*
side of ring ports, i.e. what the kernel does for AF_PACKET: :meth:`peer_send`
fills an RX ring, :meth:`peer_recv` drains a TX ring. There is one producer and
one consumer per ring; the peer's cursor lives in the ring header.

Ordering (x86-64 TSO, see :mod:`hotplane.shared.ordering`): a producer writes
the frame data and descriptor fields, then stores the status words in a later,
separate numpy call; a consumer loads the status words, then the data, and
hands slots back with a status store after it has copied what it needs.
"""

from __future__ import annotations

import time

import numpy as np

from hotplane.schema import registry
from hotplane.schema.port import (
    FRAME_RING,
    PEER_BAD,
    PEER_CURSOR,
    PEER_DROPS,
    PEER_FRAMES,
    PEER_OFFSET,
    ROLE_ANY,
    ROLE_RX,
    ROLE_TX,
    RX_DATA_OFFSET,
    TPACKET2_HDR,
    TPACKET2_HDRLEN,
    TX_DATA_OFFSET,
)
from hotplane.shared.ordering import require_buffer

TP_STATUS_KERNEL = 0  # RX: slot belongs to the producer
TP_STATUS_USER = 1  # RX: slot holds a frame for the consumer
TP_STATUS_AVAILABLE = 0  # TX: slot is free
TP_STATUS_SEND_REQUEST = 1  # TX: slot holds a frame to send
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4

ETH_HLEN = 14
MIN_FRAME_SIZE = 128  # room for the RX offset (66) and a 62-byte frame


class FrameRing:
    """``nslots`` slots of ``frame_size`` bytes, each starting with a ``tpacket2_hdr``.

    Attributes (all views on the ring memory, never copies):

    * ``frames``: ``uint8[nslots, frame_size]``, whole slots;
    * ``status``, ``tp_len``, ``snaplen``, ``tp_mac``, ``tp_net``, ``tp_sec``,
      ``tp_nsec``: strided views of those descriptor fields, one per slot;
    * ``rx_data`` = ``frames[:, rx_data_offset:]`` and ``tx_data`` =
      ``frames[:, tx_data_offset:]``: frame bytes as the RX and the TX side see them;
    * ``rx_capacity`` / ``tx_capacity``: the longest frame a slot holds in each role.
    """

    __slots__ = (
        "buf",
        "header",
        "frames",
        "nslots",
        "frame_size",
        "rx_data_offset",
        "tx_data_offset",
        "rx_capacity",
        "tx_capacity",
        "role",
        "slots",
        "status",
        "tp_len",
        "snaplen",
        "tp_mac",
        "tp_net",
        "tp_sec",
        "tp_nsec",
        "rx_data",
        "tx_data",
        "_peer",
    )

    def __init__(
        self,
        frames: np.ndarray,
        *,
        rx_data_offset: int = RX_DATA_OFFSET,
        tx_data_offset: int = TX_DATA_OFFSET,
        header: np.ndarray | None = None,
        buf: np.ndarray | None = None,
        role: int = ROLE_ANY,
    ) -> None:
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 2:
            raise ValueError("frame ring: frames must be a 2-d uint8 array [nslots, frame_size]")
        nslots, frame_size = frames.shape
        if frames.strides != (frame_size, 1):
            raise ValueError(f"frame ring: slots must tile memory (strides {frames.strides}, expected ({frame_size}, 1))")
        _check_geometry(nslots, frame_size, rx_data_offset, tx_data_offset, power_of_two=False)
        self.buf = buf
        self.header = header
        self.frames = frames
        self.nslots = int(nslots)
        self.frame_size = int(frame_size)
        self.rx_data_offset = int(rx_data_offset)
        self.tx_data_offset = int(tx_data_offset)
        self.rx_capacity = self.frame_size - self.rx_data_offset
        self.tx_capacity = self.frame_size - self.tx_data_offset
        self.role = role
        # One structured record per slot whose itemsize is the slot stride: field
        # views are then strided arrays over every slot's descriptor.
        slot_dt = np.dtype(
            {
                "names": list(TPACKET2_HDR.names),
                "formats": [TPACKET2_HDR.fields[n][0] for n in TPACKET2_HDR.names],
                "offsets": [TPACKET2_HDR.fields[n][1] for n in TPACKET2_HDR.names],
                "itemsize": self.frame_size,
            }
        )
        self.slots = frames.view(slot_dt).reshape(self.nslots)
        self.status = self.slots["tp_status"]
        self.tp_len = self.slots["tp_len"]
        self.snaplen = self.slots["tp_snaplen"]
        self.tp_mac = self.slots["tp_mac"]
        self.tp_net = self.slots["tp_net"]
        self.tp_sec = self.slots["tp_sec"]
        self.tp_nsec = self.slots["tp_nsec"]
        self.rx_data = frames[:, self.rx_data_offset :]
        self.tx_data = frames[:, self.tx_data_offset :]
        self._peer = None
        if buf is not None:
            self._peer = buf[PEER_OFFSET : PEER_OFFSET + 32].view("<u8")

    # -- construction -------------------------------------------------------

    @staticmethod
    def zone_size(nslots: int, frame_size: int) -> int:
        """Bytes a ``frame_ring`` zone of ``nslots`` slots of ``frame_size`` bytes needs."""
        return registry.align_up(FRAME_RING.header_size + int(nslots) * int(frame_size), registry.CACHE_LINE)

    @classmethod
    def create(cls, buf: np.ndarray, nslots: int, frame_size: int, *, role: int = ROLE_ANY) -> "FrameRing":
        """Initialise an empty ring in ``buf`` (every slot status 0) and stamp its header.

        ``nslots`` must be a power of two, ``frame_size`` a multiple of 16 of at
        least 128 bytes. The schema stamp is written last, so a peer attaching
        early is refused rather than seeing a half-made ring.
        """
        _check_geometry(nslots, frame_size, RX_DATA_OFFSET, TX_DATA_OFFSET, power_of_two=True)
        need = cls.zone_size(nslots, frame_size)
        require_buffer(buf, need, what="frame ring")
        if role not in (ROLE_ANY, ROLE_RX, ROLE_TX):
            raise ValueError(f"frame ring: role {role} is not one of 0 (any), 1 (rx), 2 (tx)")
        buf[:need] = 0
        hdr = buf[: FRAME_RING.header.itemsize].view(FRAME_RING.header).reshape(())
        hdr["nslots"] = nslots
        hdr["frame_size"] = frame_size
        hdr["rx_data_offset"] = RX_DATA_OFFSET
        hdr["tx_data_offset"] = TX_DATA_OFFSET
        hdr["role"] = role
        registry.stamp(hdr, FRAME_RING)
        return cls._from_zone(buf, hdr)

    @classmethod
    def attach(cls, buf: np.ndarray, *, role: int | None = None) -> "FrameRing":
        """Attach to a ring made by :meth:`create` (checks the schema and geometry, writes nothing)."""
        require_buffer(buf, FRAME_RING.header_size, what="frame ring")
        hdr = buf[: FRAME_RING.header.itemsize].view(FRAME_RING.header).reshape(())
        registry.verify(hdr, FRAME_RING, what="frame ring")
        nslots, frame_size = int(hdr["nslots"]), int(hdr["frame_size"])
        _check_geometry(nslots, frame_size, int(hdr["rx_data_offset"]), int(hdr["tx_data_offset"]), power_of_two=True)
        need = cls.zone_size(nslots, frame_size)
        if buf.nbytes < need:
            raise ValueError(f"frame ring: header says {nslots} slots of {frame_size} bytes ({need} bytes) but the buffer has {buf.nbytes}")
        found = int(hdr["role"])
        if role is not None and found not in (ROLE_ANY, role):
            names = {ROLE_RX: "rx", ROLE_TX: "tx", ROLE_ANY: "any"}
            raise ValueError(f"frame ring: attached as {names.get(role, role)} but the ring was created as a {names.get(found, found)} ring")
        return cls._from_zone(buf, hdr)

    @classmethod
    def _from_zone(cls, buf: np.ndarray, hdr: np.ndarray) -> "FrameRing":
        nslots, frame_size = int(hdr["nslots"]), int(hdr["frame_size"])
        start = FRAME_RING.header_size
        frames = buf[start : start + nslots * frame_size].reshape(nslots, frame_size)
        return cls(
            frames,
            rx_data_offset=int(hdr["rx_data_offset"]),
            tx_data_offset=int(hdr["tx_data_offset"]),
            header=hdr,
            buf=buf,
            role=int(hdr["role"]),
        )

    @classmethod
    def from_frames(cls, frames2d: np.ndarray, rx_data_offset: int = RX_DATA_OFFSET, tx_data_offset: int = TX_DATA_OFFSET) -> "FrameRing":
        """Wrap slots that are not in a zone (an AF_PACKET PACKET_MMAP ring): no header, no peer side.

        ``frames2d`` is ``uint8[nslots, frame_size]`` over the mapping (slots
        must tile it: block_size a multiple of frame_size); ``nslots`` need not
        be a power of two.
        """
        return cls(frames2d, rx_data_offset=rx_data_offset, tx_data_offset=tx_data_offset)

    def __repr__(self) -> str:
        kind = "zone" if self.header is not None else "mapping"
        return f"FrameRing({self.nslots} x {self.frame_size} B, {kind})"

    # -- inspection (slow path) ---------------------------------------------

    def count_ready(self) -> int:
        """Slots whose status has bit 0 set (RX: frames waiting; TX: frames to send)."""
        return int(np.count_nonzero(self.status & 1))

    def peer_counters(self) -> dict[str, int]:
        """The peer line of the header: cursor, frames, drops (RX ring full), bad (refused TX slots)."""
        p = self._need_peer()
        return {"cursor": int(p[PEER_CURSOR]), "frames": int(p[PEER_FRAMES]), "drops": int(p[PEER_DROPS]), "bad": int(p[PEER_BAD])}

    def _need_peer(self) -> np.ndarray:
        if self._peer is None:
            raise ValueError("frame ring: peer operations need a ring zone (FrameRing.create/attach), not a kernel mapping")
        return self._peer

    # -- peer side: what the kernel does for AF_PACKET -----------------------

    def peer_space(self, max_n: int | None = None) -> int:
        """Free slots (status 0) that follow the peer cursor, at most ``max_n``: what peer_send would take now."""
        p = self._need_peer()
        n = self.nslots if max_n is None else min(int(max_n), self.nslots)
        return _run(self.status, int(p[PEER_CURSOR]) % self.nslots, n, self.nslots, ready=False)

    def peer_send(self, frames: np.ndarray, lengths: np.ndarray, ts_ns: "np.ndarray | int | None" = None) -> int:
        """Put frames into this RX ring as a NIC would; returns how many were queued.

        ``frames`` is ``uint8[n, width]`` with frame ``i`` in ``frames[i, :lengths[i]]``.
        Frames are written in order into the free slots (status 0) that follow
        the peer cursor; when the ring is full the rest is dropped and counted
        in the header's ``peer_drops``. A frame longer than the slot holds is
        truncated like the kernel does (``tp_snaplen`` = what fits, ``tp_len``
        = the original length), which the burst engine then counts as
        truncated. ``ts_ns`` (scalar or per frame, ns since the epoch) fills
        ``tp_sec``/``tp_nsec``; default now. Vectorized per contiguous run of
        slots (at most two: before and after the wrap).
        """
        p = self._need_peer()
        lengths = np.asarray(lengths)
        n = int(lengths.shape[0])
        if n == 0:
            return 0
        if frames.ndim != 2 or frames.shape[0] < n:
            raise ValueError(f"peer_send: frames must be 2-d with at least {n} rows, got shape {frames.shape}")
        width = frames.shape[1]
        if int(lengths.max()) > width:
            raise ValueError(f"peer_send: a length of {int(lengths.max())} exceeds the frames' width {width}")
        if ts_ns is None:
            ts_ns = time.time_ns()
        cur = int(p[PEER_CURSOR])
        i = cur % self.nslots
        k = _run(self.status, i, min(n, self.nslots), self.nslots, ready=False)
        done = 0
        while done < k:
            s = (i + done) % self.nslots
            m = min(k - done, self.nslots - s)
            self._fill_rx(s, m, frames[done : done + m], lengths[done : done + m], ts_ns if np.ndim(ts_ns) == 0 else ts_ns[done : done + m])
            done += m
        p[PEER_CURSOR] = cur + k
        p[PEER_FRAMES] += k
        if k < n:
            p[PEER_DROPS] += n - k
        return k

    def _fill_rx(self, s: int, m: int, src: np.ndarray, lens: np.ndarray, ts) -> None:
        cap = self.rx_capacity
        w = min(int(lens.max()), cap)
        self.rx_data[s : s + m, :w] = src[:, :w]
        self.tp_len[s : s + m] = lens
        self.snaplen[s : s + m] = np.minimum(lens, cap)
        self.tp_mac[s : s + m] = self.rx_data_offset
        self.tp_net[s : s + m] = self.rx_data_offset + ETH_HLEN
        if np.ndim(ts) == 0:
            self.tp_sec[s : s + m] = int(ts) // 1_000_000_000
            self.tp_nsec[s : s + m] = int(ts) % 1_000_000_000
        else:
            ts = np.asarray(ts, dtype=np.int64)
            self.tp_sec[s : s + m] = ts // 1_000_000_000
            self.tp_nsec[s : s + m] = ts % 1_000_000_000
        # Publish last, in a separate store (TSO keeps it after the data).
        self.status[s : s + m] = TP_STATUS_USER

    def peer_recv(self, max_n: int, out_frames: np.ndarray, out_lengths: np.ndarray) -> int:
        """Take up to ``max_n`` frames out of this TX ring, as the kernel's send does.

        Copies the frames waiting in SEND_REQUEST slots (in order from the peer
        cursor) into ``out_frames[j, :len]`` and ``out_lengths[j]``, then hands
        the slots back (status 0). Returns the number of frames copied out. A
        slot whose ``tp_len`` exceeds the slot (or ``out_frames``' width) is
        released without being copied and counted in ``peer_bad``.
        """
        p = self._need_peer()
        n = min(int(max_n), out_frames.shape[0], out_lengths.shape[0], self.nslots)
        if n <= 0:
            return 0
        cur = int(p[PEER_CURSOR])
        i = cur % self.nslots
        k = _run(self.status, i, n, self.nslots, ready=True)
        limit = min(self.tx_capacity, out_frames.shape[1])
        got = done = bad_total = 0
        while done < k:
            s = (i + done) % self.nslots
            m = min(k - done, self.nslots - s)
            lens = self.tp_len[s : s + m].copy()
            bad = lens > limit
            w = min(int(lens.max()), limit)
            if bad.any():
                keep = np.flatnonzero(~bad)
                out_frames[got : got + keep.size, :w] = self.tx_data[s + keep, :w]
                out_lengths[got : got + keep.size] = lens[keep]
                bad_total += m - keep.size
                got += keep.size
            else:
                out_frames[got : got + m, :w] = self.tx_data[s : s + m, :w]
                out_lengths[got : got + m] = lens
                got += m
            # Hand the slots back only after the copy.
            self.status[s : s + m] = TP_STATUS_AVAILABLE
            done += m
        p[PEER_CURSOR] = cur + k
        p[PEER_FRAMES] += got
        if bad_total:
            p[PEER_BAD] += bad_total
        return got


def _run(status: np.ndarray, i: int, n: int, nslots: int, *, ready: bool) -> int:
    """How many consecutive slots from ``i`` (wrapping once) are ready (bit 0 set) or free (status 0), at most ``n``."""
    done = 0
    while done < n:
        s = (i + done) % nslots
        m = min(n - done, nslots - s)
        st = status[s : s + m]
        if ready:
            stop = np.flatnonzero((st & 1) == 0)
        else:
            stop = np.flatnonzero(st)
        if stop.size:
            return done + int(stop[0])
        done += m
    return done


def _check_geometry(nslots: int, frame_size: int, rx_off: int, tx_off: int, *, power_of_two: bool) -> None:
    if nslots < 1:
        raise ValueError(f"frame ring: nslots must be at least 1, got {nslots}")
    if power_of_two and (nslots < 2 or nslots & (nslots - 1)):
        raise ValueError(f"frame ring: nslots must be a power of two >= 2 for ring ports, got {nslots}")
    if frame_size % 16:
        raise ValueError(f"frame ring: frame_size must be a multiple of 16 (TPACKET_ALIGNMENT), got {frame_size}")
    if frame_size < MIN_FRAME_SIZE:
        raise ValueError(f"frame ring: frame_size must be at least {MIN_FRAME_SIZE} bytes, got {frame_size}")
    if not (TPACKET2_HDRLEN <= tx_off < frame_size and TPACKET2_HDRLEN <= rx_off <= frame_size - ETH_HLEN):
        raise ValueError(f"frame ring: data offsets rx {rx_off} / tx {tx_off} do not fit a {frame_size}-byte slot after its 32-byte header")
