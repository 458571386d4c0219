"""A single-producer/single-consumer ring of fixed-size records in shared memory.

One process enqueues, one process dequeues; no locks, no atomics beyond plain
aligned 8-byte stores (see :mod:`hotplane.shared.ordering`). Layout:
:mod:`hotplane.schema.ring`.

Protocol (x86-64 TSO):

* producer: copy the items into the free slots (at most two slice
  assignments when the burst wraps), then publish them with one store of
  ``tail``;
* consumer: load ``tail``, copy the items out, then release the slots with
  one store of ``head``.

Each side keeps its own cursor in a local Python int (it is the only writer
of it) and a cached copy of the other side's cursor, re-reading the other
cache line only when the cache says there is not enough room / not enough
items, as DPDK's rte_ring does. A producer and a consumer should therefore
each use their own ``SpscRing`` object (``attach`` in each process); the same
object may play both roles in one thread. If a role is handed over to another
object, the new owner calls :meth:`SpscRing.resync` (``attach`` does it).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hotplane.schema import registry
from hotplane.schema.registry import SchemaError
from hotplane.schema.ring import HEAD_OFFSET, SPSC_RING, TAIL_OFFSET, item_dtype_hash
from hotplane.shared.ordering import require_buffer, require_tso, u64_word

_M64 = 0xFFFF_FFFF_FFFF_FFFF
MAX_CAPACITY = 1 << 40


class RingError(ValueError):
    """Bad ring arguments (capacity, dtype, burst array)."""


def _check_dtype(item_dtype: npt.DTypeLike) -> np.dtype:
    dt = np.dtype(item_dtype)
    if dt.hasobject:
        raise RingError(f"ring items must be plain fixed-size data, not {dt} (holds Python objects)")
    if dt.itemsize == 0:
        raise RingError(f"ring item dtype {dt} has size 0")
    if dt.subdtype is not None:
        raise RingError(f"ring item dtype {dt} is a sub-array: wrap it in a structured record")
    return dt


def _check_capacity(capacity: int) -> int:
    capacity = int(capacity)
    if capacity < 1 or capacity & (capacity - 1) or capacity > MAX_CAPACITY:
        raise RingError(f"ring capacity must be a power of two between 1 and 2**40, got {capacity}")
    return capacity


class SpscRing:
    """A view on a ring zone. Build with :meth:`create` or :meth:`attach`, never directly."""

    __slots__ = (
        "buf", "header", "item_dtype", "capacity", "mask", "_slots", "_head", "_tail",
        "_prod_tail", "_prod_head_cache", "_cons_head", "_cons_tail_cache",
    )

    def __init__(self, buf: np.ndarray, capacity: int, item_dtype: np.dtype) -> None:
        self.buf = buf
        self.header = buf[: SPSC_RING.header_size].view(SPSC_RING.header)[:1]
        self.item_dtype = item_dtype
        self.capacity = capacity
        self.mask = capacity - 1
        start = SPSC_RING.header_size
        self._slots = buf[start : start + capacity * item_dtype.itemsize].view(item_dtype)
        self._head = u64_word(buf, HEAD_OFFSET)
        self._tail = u64_word(buf, TAIL_OFFSET)
        self.resync()

    # ---- construction -------------------------------------------------------------

    @staticmethod
    def zone_size(capacity: int, item_dtype: npt.DTypeLike) -> int:
        """Bytes a ring of ``capacity`` records of ``item_dtype`` needs (cache-line rounded)."""
        return SPSC_RING.zone_size(_check_capacity(capacity) * _check_dtype(item_dtype).itemsize)

    @classmethod
    def create(cls, buf: np.ndarray, capacity: int, item_dtype: npt.DTypeLike) -> "SpscRing":
        """Initialise an empty ring in ``buf`` and stamp its header (nobody may use the zone meanwhile)."""
        require_tso()
        dt = _check_dtype(item_dtype)
        capacity = _check_capacity(capacity)
        require_buffer(buf, SPSC_RING.zone_size(capacity * dt.itemsize), what="spsc_ring create")
        hdr = buf[: SPSC_RING.header_size].view(SPSC_RING.header)
        hdr[:] = np.zeros(1, SPSC_RING.header)  # wipes any old identity first
        h = hdr[0]
        h["capacity"] = capacity
        h["mask"] = capacity - 1
        h["item_size"] = dt.itemsize
        h["item_dtype_hash"] = item_dtype_hash(dt)
        # Identity last: an attacher that sees a valid stamp sees the fields above.
        registry.stamp(hdr, SPSC_RING)
        return cls(buf, capacity, dt)

    @classmethod
    def attach(cls, buf: np.ndarray, item_dtype: npt.DTypeLike) -> "SpscRing":
        """Open an existing ring; refuses (SchemaError) a wrong layout or a different record dtype."""
        require_tso()
        dt = _check_dtype(item_dtype)
        require_buffer(buf, SPSC_RING.header_size, what="spsc_ring attach")
        h = buf[: SPSC_RING.header_size].view(SPSC_RING.header)[0]
        registry.verify(h, SPSC_RING, what="spsc_ring")
        capacity, mask = int(h["capacity"]), int(h["mask"])
        if capacity < 1 or capacity & (capacity - 1) or mask != capacity - 1 or capacity > MAX_CAPACITY:
            raise SchemaError(f"spsc_ring: corrupt header: capacity {capacity}, mask {mask:#x}")
        size, dhash = int(h["item_size"]), int(h["item_dtype_hash"])
        if size != dt.itemsize:
            raise SchemaError(f"spsc_ring: the ring holds {size}-byte records, the caller asked for {dt} ({dt.itemsize} bytes)")
        if dhash != item_dtype_hash(dt):
            raise SchemaError(
                f"spsc_ring: record dtype mismatch: the ring was created for a different {size}-byte record than {dt} "
                f"(dtype hash {dhash:#x} != {item_dtype_hash(dt):#x})"
            )
        require_buffer(buf, SPSC_RING.zone_size(capacity * size), what="spsc_ring attach")
        return cls(buf, capacity, dt)

    def resync(self) -> None:
        """Reload this object's local cursors from shared memory (after taking over a role)."""
        head = self._head.item()
        tail = self._tail.item()
        self._prod_tail = tail
        self._prod_head_cache = head
        self._cons_head = head
        self._cons_tail_cache = tail

    # ---- hot path -----------------------------------------------------------------

    def enqueue_burst(self, items: np.ndarray) -> int:
        """Producer: append as many of ``items`` (1-d, the ring's dtype) as fit; returns how many."""
        dt = items.dtype
        if dt is not self.item_dtype and dt != self.item_dtype:
            raise RingError(f"enqueue_burst: items are {dt}, the ring carries {self.item_dtype}")
        n = want = len(items)
        tail = self._prod_tail
        cap = self.capacity
        free = cap - ((tail - self._prod_head_cache) & _M64)
        if free < n:
            # Only now look at the consumer's cache line.
            self._prod_head_cache = self._head.item()
            free = cap - ((tail - self._prod_head_cache) & _M64)
            if free < n:
                n = free
                if n <= 0:
                    return 0
        idx = tail & self.mask
        first = cap - idx
        slots = self._slots
        if n <= first:
            slots[idx : idx + n] = items if n == want else items[:n]
        else:
            slots[idx:] = items[:first]
            slots[: n - first] = items[first:n]
        tail = (tail + n) & _M64
        self._tail[...] = tail  # publish: one 8-byte store after the element stores (TSO)
        self._prod_tail = tail
        return n

    def dequeue_burst(self, out: np.ndarray) -> int:
        """Consumer: move up to ``len(out)`` items into ``out`` (preallocated, 1-d); returns how many."""
        dt = out.dtype
        if dt is not self.item_dtype and dt != self.item_dtype:
            raise RingError(f"dequeue_burst: out is {dt}, the ring carries {self.item_dtype}")
        n = want = len(out)
        head = self._cons_head
        avail = (self._cons_tail_cache - head) & _M64
        if avail < n:
            # Load tail before the elements: loads are not reordered with older loads (TSO).
            self._cons_tail_cache = self._tail.item()
            avail = (self._cons_tail_cache - head) & _M64
            if avail < n:
                n = avail
                if n == 0:
                    return 0
        idx = head & self.mask
        first = self.capacity - idx
        slots = self._slots
        if n <= first:
            if n == want:
                out[...] = slots[idx : idx + n]
            else:
                out[:n] = slots[idx : idx + n]
        else:
            out[:first] = slots[idx:]
            out[first:n] = slots[: n - first]
        head = (head + n) & _M64
        self._head[...] = head  # release: a store is not reordered with the older loads of the copy
        self._cons_head = head
        return n

    # ---- observers (either side, or a third party) ----------------------------------

    def count(self) -> int:
        """Items in the ring now (exact for the producer or consumer; a snapshot for anyone else)."""
        head = self._head.item()  # head first: tail read later is >= it
        tail = self._tail.item()
        return min((tail - head) & _M64, self.capacity)

    def free_count(self) -> int:
        """Free slots now."""
        return self.capacity - self.count()

    def __len__(self) -> int:
        return self.count()

    def __repr__(self) -> str:
        return f"SpscRing(capacity={self.capacity}, item_dtype={self.item_dtype}, count={self.count()})"
