"""The memory-ordering assumption every lock-free structure in hotplane relies on.

We target x86-64 only, whose memory model is TSO (Intel SDM vol. 3, 8.2.2):

* stores become visible to other cores in program order (store -> store);
* loads are not reordered with older loads (load -> load);
* stores are not reordered with older loads (load -> store);
* only a load may pass an older store to a *different* address (store -> load),
  which none of our publish/consume patterns depend on.

So a producer that writes the payload and then the word that publishes it (a
ring tail, a status word, a seqlock counter) needs no fence; a consumer that
loads the published word and then the payload sees a payload at least as new;
and a consumer that copies the payload out before storing its release word (a
ring head) cannot have the producer overwrite it under its feet.

Why a numpy scalar store is one store: ``view[i] = v`` (or ``word[...] = v``
on a 0-d view) of one element of a ``uint64`` array that numpy flags as
aligned ends in one typed C store of an ``npy_ulonglong`` (the dtype's
``setitem``, or a one-element aligned cast loop), i.e. one 8-byte ``mov``;
``item()`` is the matching single typed load. An aligned 8-byte access is atomic on x86-64 (SDM 8.1.1),
so a reader sees the old or the new word, never a mix. Each numpy call is an
opaque C call from the interpreter, so the C compiler cannot move memory
accesses across two of them. Bulk copies (numpy copies, memcpy, SIMD, ``rep
movs``) may order their own stores freely (SDM 8.2.4), which is why the
publishing word is always a separate store *after* the bulk copy; and they
never split an 8-byte-aligned word, so a reader copying many counter words
gets each word whole (a torn read *across* words remains possible).
"""

from __future__ import annotations

import platform
import sys

import numpy as np

_X86_64_NAMES = frozenset({"x86_64", "amd64", "x64"})
_U64 = np.dtype("<u8")


class OrderingError(RuntimeError):
    """This machine does not give the memory ordering hotplane's shared structures assume."""


def require_tso(machine: str | None = None) -> None:
    """Refuse to run anywhere but a 64-bit x86-64 process (TSO memory model).

    ``machine`` defaults to ``platform.machine()``; tests pass other names.
    """
    name = platform.machine() if machine is None else machine
    if name.lower() not in _X86_64_NAMES:
        raise OrderingError(
            f"hotplane's shared-memory rings and counters assume the x86-64 (TSO) memory model, "
            f"but this machine is {name!r}: on weaker memory models (ARM, POWER, RISC-V) a consumer "
            "could see a ring tail before the items it publishes. Run on x86-64."
        )
    if machine is None and sys.maxsize < 2**63 - 1:
        raise OrderingError("hotplane needs a 64-bit Python: 8-byte words must be single, atomic stores")


def require_buffer(buf: np.ndarray, need: int, *, what: str) -> None:
    """Check that ``buf`` can hold a shared structure: 1-d writable C-contiguous uint8, 64-byte aligned, ``need`` bytes."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"{what}: buffer must be a 1-d numpy uint8 array, got {type(buf).__name__} {getattr(buf, 'dtype', '')}")
    if not buf.flags.c_contiguous or not buf.flags.writeable:
        raise ValueError(f"{what}: buffer must be C-contiguous and writable")
    addr = buf.ctypes.data
    if addr % 64:
        raise ValueError(f"{what}: buffer address {addr:#x} is not 64-byte (cache line) aligned")
    if buf.nbytes < need:
        raise ValueError(f"{what}: buffer has {buf.nbytes} bytes, needs {need}")


def u64_word(buf: np.ndarray, offset: int) -> np.ndarray:
    """A 0-d ``uint64`` view of the aligned 8-byte word at ``buf[offset]``: ``.item()`` loads, ``[...] = v`` stores."""
    if offset % 8 or (buf.ctypes.data + offset) % 8:
        raise ValueError(f"u64 word at offset {offset} is not 8-byte aligned: it could be torn")
    w = buf[offset : offset + 8].view(_U64).reshape(())
    if not w.flags.aligned:
        raise ValueError("numpy does not consider the u64 word aligned")
    return w


def _check_u64_view(view: np.ndarray) -> None:
    if view.dtype != _U64 or not view.flags.aligned:
        raise ValueError(f"atomic word access needs an aligned little-endian uint64 view, got {view.dtype} (aligned={view.flags.aligned})")


def load_u64(view: np.ndarray, idx: int = 0) -> int:
    """One atomic 8-byte load of ``view[idx]`` (an aligned uint64 array), as a Python int."""
    _check_u64_view(view)
    return view.item(idx)


def store_u64(view: np.ndarray, idx: int, value: int) -> None:
    """One atomic 8-byte store of ``value`` (taken modulo 2**64) into ``view[idx]``."""
    _check_u64_view(view)
    view[idx] = value & 0xFFFF_FFFF_FFFF_FFFF
