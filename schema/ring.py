"""Layout of a single-producer/single-consumer ring (schema id 2, ``spsc_ring``).

The header carries the ring's geometry and its two cursors, each alone on its
own 64-byte cache line so the producer (which writes ``tail``) and the
consumer (which writes ``head``) never write the same line::

    line 0  schema_id u4 | version u4 | layout_hash u8 | capacity u8 | mask u8
            | item_size u8 | item_dtype_hash u8 | pad
    line 1  head u8 (consumer cursor: items taken)    | pad
    line 2  tail u8 (producer cursor: items published) | pad
    192...  element area: ``capacity`` records of ``item_size`` bytes

``head`` and ``tail`` are free-running 64-bit counters; the slot of a counter
``c`` is ``c & mask``. The ring is empty when ``head == tail`` and full when
``tail - head == capacity``. The element dtype is the user's (any fixed-size
numpy dtype): its size and a hash of its description are stored so that an
attacher with a different idea of the records is refused. The layout's
``element`` is therefore raw bytes: the area is ``capacity * item_size`` of them.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hotplane.schema import registry

HEAD_OFFSET = 64
TAIL_OFFSET = 128

RING_HEADER = registry.header_dtype(
    [
        ("capacity", "<u8"),
        ("mask", "<u8"),
        ("item_size", "<u8"),
        ("item_dtype_hash", "<u8"),
        ("_pad0", "V16"),
        ("head", "<u8"),  # offset 64: written by the consumer only
        ("_pad1", "V56"),
        ("tail", "<u8"),  # offset 128: written by the producer only
        ("_pad2", "V56"),
    ]
)

SPSC_RING = registry.register(
    registry.Layout(
        name="spsc_ring",
        schema_id=2,
        version=1,
        header=RING_HEADER,
        element=np.dtype("u1"),
        doc="single-producer/single-consumer ring of fixed-size records; head and tail on separate cache lines",
    )
)

assert RING_HEADER.fields["head"][1] == HEAD_OFFSET and RING_HEADER.fields["tail"][1] == TAIL_OFFSET
assert RING_HEADER.itemsize == 192 and SPSC_RING.header_size == 192


def item_dtype_hash(dt: np.dtype) -> int:
    """A stable 63-bit hash of a record dtype's description (names, types, offsets, size)."""
    dt = np.dtype(dt)
    sig = [repr(dt.descr), str(dt.itemsize)]
    if dt.names:
        sig.extend(f"{n}@{dt.fields[n][1]}" for n in dt.names)
    digest = hashlib.blake2b(";".join(sig).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
