"""8-byte compare-and-swap on shared memory, for the few words more than one process writes.

Most shared words in hotplane have one writer and need nothing but the store
ordering stated in :mod:`hotplane.shared.ordering`. A queue's ownership word
is different: its owner, a successor and the supervisor's fence all write it,
and the fence must know, atomically with changing the word, whether the owner
is inside a pass (DESIGN invariant 1). That takes a compare-and-swap, which
numpy does not have.

Why not the ``atomics`` package from PyPI: it does the job, but one
``cmpxchg_strong`` costs about 23 us through its layers (measured here, against
about 1 us for this module under the same load), and a worker does four per
pass. So this module holds the one instruction sequence we need, as machine
code, and calls it through ctypes::

    mov  rax, rsi              ; 48 89 f0      expected -> rax
    lock cmpxchg [rdi], rdx    ; f0 48 0f b1 17  if [rdi] == rax: [rdi] = rdx; else rax = [rdi]
    ret                        ; c3            returns the value the word held

(System V AMD64 calling convention: rdi = address, rsi = expected, rdx =
desired.) The page is written while only readable and writable and then made
read+execute with ``mprotect``: it is never writable and executable at once.
A LOCK-prefixed instruction is also a full memory barrier (Intel SDM vol. 3,
8.2.2: locked instructions are not reordered with loads or stores), so code
that publishes with a CAS needs no other fence.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from hotplane.shared.ordering import require_tso

_CMPXCHG_CODE = bytes.fromhex("4889f0" "f0480fb117" "c3")

_cas_fn = None  # built on first use: importing this module maps nothing


class AtomicUnavailable(RuntimeError):
    """The machine code page could not be made executable (a W^X policy forbids it)."""


def _build():
    global _cas_fn
    require_tso()
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(_CMPXCHG_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.restype = ctypes.c_int
    if libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        err = ctypes.get_errno()
        raise AtomicUnavailable(
            f"cannot make a code page executable (mprotect: errno {err}): hotplane needs one for its "
            "compare-and-swap on queue ownership words; allow executable anonymous memory for this process "
            "(SELinux: the execmem permission)"
        )
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)(addr)
    fn._page = page  # the mapping lives as long as the function
    _cas_fn = fn
    return fn


def compare_exchange(address: int, expected: int, desired: int) -> int:
    """Atomically: if the u64 at ``address`` equals ``expected``, store ``desired``.

    Returns the value the word held before (equal to ``expected`` exactly when
    the store happened). ``address`` must be 8-byte aligned.
    """
    fn = _cas_fn or _build()
    return fn(address, expected, desired)


class AtomicWord:
    """One aligned u64 of a numpy array, loaded plainly and changed only by compare-and-swap.

    Keeps a reference to the array so the address stays mapped, and computes
    the address once (``ndarray.ctypes`` is slow enough to matter per pass).
    """

    __slots__ = ("array", "index", "address")

    def __init__(self, array: np.ndarray, index: int) -> None:
        if array.dtype != np.uint64 or array.ndim != 1 or not array.flags.writeable:
            raise ValueError("an atomic word lives in a writable 1-d uint64 array")
        if not 0 <= index < array.shape[0]:
            raise IndexError(f"word {index} is outside an array of {array.shape[0]}")
        self.array = array
        self.index = index
        self.address = array.ctypes.data + index * array.strides[0]
        if self.address % 8:
            raise ValueError(f"word at {self.address:#x} is not 8-byte aligned: a CAS on it could split a cache line")

    def load(self) -> int:
        """A plain aligned 8-byte load (atomic on x86-64)."""
        return int(self.array[self.index])

    def compare_exchange(self, expected: int, desired: int) -> int:
        """CAS; returns the previous value (``== expected`` on success)."""
        return compare_exchange(self.address, expected, desired)

    def cas(self, expected: int, desired: int) -> bool:
        """CAS; True when the word held ``expected`` and now holds ``desired``."""
        return compare_exchange(self.address, expected, desired) == expected
