"""Layouts of port queues: the frame ring (schema id 5) and the queue state (schema id 6).

``frame_ring`` (schema id 5): one RX or TX descriptor ring of a ``ring:NAME``
port queue, in the kernel's TPACKET_V2 frame format so that the burst engine
reads an AF_PACKET PACKET_MMAP ring and a memzone ring with the same code::

    line 0   schema_id u4 | version u4 | layout_hash u8
             | nslots u4 | frame_size u4 | rx_data_offset u4 | tx_data_offset u4
             | role u4 (0 any, 1 rx, 2 tx) | pad
    line 1   peer side, written only by the ring's peer (generator, test, sink):
             peer_cursor u8  next slot the peer fills (RX ring) or reads (TX ring),
                             free-running; slot = cursor % nslots
             peer_frames u8  frames the peer put into (RX) / took out of (TX) the ring
             peer_drops  u8  frames the peer had to drop because the RX ring was full
                             ("counts what it had to drop beyond it")
             peer_bad    u8  TX slots the peer refused (tp_len beyond the slot)
    128...   frames area: ``nslots`` slots of ``frame_size`` bytes each

Each slot starts with ``struct tpacket2_hdr`` (the layout's *element* dtype,
:data:`TPACKET2_HDR`, 32 bytes). The element dtype describes that slot header
only: slots are ``frame_size`` bytes apart (stride stored in the header), so the
zone needs ``header_size + nslots * frame_size`` bytes, computed by
``FrameRing.zone_size`` rather than ``Layout.zone_size``. Frame data sits at
``rx_data_offset`` (66, as a TPACKET_V2 Ethernet socket puts ``tp_mac``) in an
RX ring and at ``tx_data_offset`` (32, right after the slot header, where the
kernel reads TX frames) in a TX ring. Status words: see docs/CONTRACTS.md.

The worker-side cursors of a ring are *not* here: they live in the queue
state, next to the ownership word, so they are handed over with ownership.

``queue_state`` (schema id 6): one record per queue of a port, each record
alone on its own two cache lines (128 bytes) so that two workers owning two
queues never write the same line::

    header   schema_id u4 | version u4 | layout_hash u8 | nqueues u4 | pad (64 bytes)
    element  line 0 (hot): owner u8 | rx_cursor u8 | tx_cursor u8 | last_poll_ns u8
                           | kernel_drops u8 | rx_frames u8 | tx_frames u8 | tx_ring_full u8
             line 1 (drop reasons): rx_runt u8 | rx_oversized u8 | rx_truncated u8
                           | rx_bad_descriptor u8 | tx_oversized u8
                           | journal u8 | journal_rx u8 | journal_tx u8

``owner`` is the ownership word ``busy << 63 | owner_pid << 32 | generation``
(0 = unowned; see :func:`pack_owner`). ``busy`` is set by the owner, by
compare-and-swap, for the length of every pass that touches the queue, so a
fence knows atomically whether the owner may still be writing
(``shared/queue_owner.py``). ``journal*`` is the write-ahead record of the
burst in flight from this RX queue, with which a successor finishes a dead
owner's burst exactly once (``shared/burst_journal.py``). Version 2 added
``busy`` and the journal: a version-1 build would read the busy bit as part of
the pid, so it refuses these zones instead. ``rx_cursor`` is the next RX slot to read and
``tx_cursor`` the next TX slot to fill, as free-running counters (slot =
cursor % nslots), so a replacement worker resumes exactly where the previous
one stopped (DESIGN invariant 1). Every field is written by the queue's owner
only; ``kernel_drops`` accumulates PACKET_STATISTICS ``tp_drops`` for AF_PACKET.
"""

from __future__ import annotations

import numpy as np

from hotplane.schema import registry

RX_DATA_OFFSET = 66
TX_DATA_OFFSET = 32
TPACKET2_HDRLEN = 32

ROLE_ANY = 0
ROLE_RX = 1
ROLE_TX = 2

# struct tpacket2_hdr from <linux/if_packet.h>, field for field.
TPACKET2_HDR = np.dtype(
    {
        "names": ["tp_status", "tp_len", "tp_snaplen", "tp_mac", "tp_net", "tp_sec", "tp_nsec", "tp_vlan_tci", "tp_vlan_tpid", "tp_padding"],
        "formats": ["<u4", "<u4", "<u4", "<u2", "<u2", "<u4", "<u4", "<u2", "<u2", "V4"],
        "offsets": [0, 4, 8, 12, 14, 16, 20, 24, 26, 28],
        "itemsize": TPACKET2_HDRLEN,
    }
)

PEER_OFFSET = 64  # the peer's cache line in the frame-ring header

FRAME_RING_HEADER = registry.header_dtype(
    [
        ("nslots", "<u4"),
        ("frame_size", "<u4"),
        ("rx_data_offset", "<u4"),
        ("tx_data_offset", "<u4"),
        ("role", "<u4"),
        ("_pad0", "V28"),
        ("peer_cursor", "<u8"),  # offset 64: written by the peer only
        ("peer_frames", "<u8"),
        ("peer_drops", "<u8"),
        ("peer_bad", "<u8"),
        ("_pad1", "V32"),
    ]
)

FRAME_RING = registry.register(
    registry.Layout(
        name="frame_ring",
        schema_id=5,
        version=1,
        header=FRAME_RING_HEADER,
        element=TPACKET2_HDR,
        doc="TPACKET_V2 frame ring of a port queue: nslots slots of frame_size bytes, each starting with a tpacket2_hdr",
    )
)

assert FRAME_RING_HEADER.fields["peer_cursor"][1] == PEER_OFFSET
assert FRAME_RING_HEADER.itemsize == 128 and FRAME_RING.header_size == 128

# Word indexes of the peer line, viewed as u8 words from PEER_OFFSET.
PEER_CURSOR, PEER_FRAMES, PEER_DROPS, PEER_BAD = 0, 1, 2, 3

QUEUE_STATE_HEADER = registry.header_dtype([("nqueues", "<u4"), ("_pad0", "V44")])

# Word indexes into a queue-state record viewed as 16 u8 words (the burst engine's fast access).
W_OWNER = 0
W_RX_CURSOR = 1
W_TX_CURSOR = 2
W_LAST_POLL_NS = 3
W_KERNEL_DROPS = 4
W_RX_FRAMES = 5
W_TX_FRAMES = 6
W_TX_RING_FULL = 7
W_RX_RUNT = 8
W_RX_OVERSIZED = 9
W_RX_TRUNCATED = 10
W_RX_BAD_DESCRIPTOR = 11
W_TX_OVERSIZED = 12
W_JOURNAL = 13  # burst journal (shared/burst_journal.py): state | n | k_other | k_same | first-slot fingerprint
W_JOURNAL_RX = 14  # ... the burst's RX cursor
W_JOURNAL_TX = 15  # ... the low 32 bits of the TX cursors it staged at: other port | same port << 32
QUEUE_WORDS = 16

QUEUE_STATE_RECORD = np.dtype(
    [
        ("owner", "<u8"),
        ("rx_cursor", "<u8"),
        ("tx_cursor", "<u8"),
        ("last_poll_ns", "<u8"),
        ("kernel_drops", "<u8"),
        ("rx_frames", "<u8"),
        ("tx_frames", "<u8"),
        ("tx_ring_full", "<u8"),
        ("rx_runt", "<u8"),
        ("rx_oversized", "<u8"),
        ("rx_truncated", "<u8"),
        ("rx_bad_descriptor", "<u8"),
        ("tx_oversized", "<u8"),
        ("journal", "<u8"),
        ("journal_rx", "<u8"),
        ("journal_tx", "<u8"),
    ]
)

QUEUE_STATE = registry.register(
    registry.Layout(
        name="queue_state",
        schema_id=6,
        version=2,
        header=QUEUE_STATE_HEADER,
        element=QUEUE_STATE_RECORD,
        doc="per-queue ownership word (busy<<63 | owner_pid<<32 | generation), RX/TX cursors and queue counters, 128 bytes per queue",
    )
)

assert QUEUE_STATE_HEADER.itemsize == 64 and QUEUE_STATE_RECORD.itemsize == QUEUE_WORDS * 8
assert QUEUE_STATE_RECORD.fields["rx_cursor"][1] == W_RX_CURSOR * 8
assert QUEUE_STATE_RECORD.fields["tx_oversized"][1] == W_TX_OVERSIZED * 8
assert QUEUE_STATE_RECORD.fields["journal_tx"][1] == W_JOURNAL_TX * 8


#: The owner is inside a pass (bit 63: Linux pids stay below 2**22, PID_MAX_LIMIT).
OWNER_BUSY = 1 << 63


def pack_owner(pid: int, generation: int) -> int:
    """The ownership word (busy clear) for ``pid`` (31-bit) at ``generation`` (32-bit); 0 means unowned."""
    if not (0 <= pid < 1 << 31 and 0 <= generation < 1 << 32):
        raise ValueError(f"owner pid {pid} must fit 31 bits and generation {generation} 32 bits")
    return (pid << 32) | generation


def unpack_owner(word: int) -> tuple[int, int]:
    """``(owner_pid, generation)`` from an ownership word (the busy bit is not part of either)."""
    word = int(word)
    return (word >> 32) & 0x7FFF_FFFF, word & 0xFFFF_FFFF


def owner_busy(word: int) -> bool:
    """Is the owner inside a pass over the queue?"""
    return bool(int(word) & OWNER_BUSY)
