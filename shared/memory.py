"""The instance's one shared memory: a file on hugetlbfs (or 4 KiB shm) mapped at a fixed address.

The primary creates the file and maps it at the base address with
MAP_FIXED_NOREPLACE; secondaries map the same file at the same address or
refuse with a message naming the address and ``--base-virtaddr``, as DPDK's
EAL does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hotplane.shared.runtime import MemoryDescriptor

PROT_READ, PROT_WRITE = mmap.PROT_READ, mmap.PROT_WRITE
MAP_SHARED = mmap.MAP_SHARED
MAP_FIXED_NOREPLACE = 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class MemoryError_(Exception):
    """The shared memory cannot be created or attached; the message says what to do."""


class AddressInUse(MemoryError_):
    """The base address range is already mapped in this process (the caller says what to do)."""

    def __init__(self, base: int, size: int) -> None:
        super().__init__(f"the address range {base:#x}..{base + size:#x} is already in use in this process")
        self.base = base
        self.size = size


@dataclass
class HugeMount:
    path: str
    page_size: int


def hugetlbfs_mounts() -> list[HugeMount]:
    """Every hugetlbfs mount in /proc/mounts, with its page size."""
    out = []
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return out
    default = default_hugepage_size()
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "hugetlbfs":
            size = default
            for opt in parts[3].split(","):
                if opt.startswith("pagesize="):
                    size = _parse_size(opt.split("=", 1)[1])
            out.append(HugeMount(parts[1], size))
    return out


def _parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B")
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def default_hugepage_size() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 20


def free_hugepages(page_size: int) -> int:
    """Free (unreserved) hugepages of ``page_size`` in the system."""
    d = Path(f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB")
    try:
        free = int((d / "free_hugepages").read_text())
        resv = int((d / "resv_hugepages").read_text())
        return max(0, free - resv)
    except OSError:
        return 0


def find_huge_dir(huge_dir: str | None) -> HugeMount | None:
    """The hugetlbfs mount to use: ``huge_dir`` if given (must be hugetlbfs), else the first mount."""
    mounts = hugetlbfs_mounts()
    if huge_dir is not None:
        want = os.path.realpath(huge_dir)
        for m in mounts:
            if os.path.realpath(m.path) == want:
                return m
        if not os.path.isdir(huge_dir):
            raise MemoryError_(f"--huge-dir {huge_dir}: no such directory; mount hugetlbfs there (deploy/hugepages.sh) or drop --huge-dir")
        raise MemoryError_(f"--huge-dir {huge_dir} is not a hugetlbfs mount; run deploy/hugepages.sh or 'mount -t hugetlbfs nodev {huge_dir}'")
    return mounts[0] if mounts else None


def map_fixed(fd: int, size: int, base: int) -> int:
    """mmap ``fd`` MAP_SHARED at exactly ``base``; raises MemoryError_ if the address is taken."""
    addr = _libc.mmap(base, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        if err == 17:  # EEXIST
            raise AddressInUse(base, size)
        if err == 12:  # ENOMEM
            raise MemoryError_(f"not enough memory to map {size >> 20} MiB at {base:#x} (for hugepages: too few free hugepages; run deploy/hugepages.sh or lower --socket-mem)")
        raise MemoryError_(f"mmap of {size >> 20} MiB at {base:#x} failed: {os.strerror(err)}")
    if addr != base:
        # A kernel older than 4.17 treats MAP_FIXED_NOREPLACE as a hint.
        _libc.munmap(addr, size)
        raise MemoryError_(f"the kernel mapped the shared memory at {addr:#x}, not {base:#x}; use --base-virtaddr with a free address")
    return addr


def unmap(addr: int, size: int) -> None:
    _libc.munmap(addr, size)


@dataclass
class SharedMemory:
    """One mapped instance memory."""

    descriptor: MemoryDescriptor
    addr: int
    view: np.ndarray  # uint8 view over the whole mapping

    @property
    def size(self) -> int:
        return self.descriptor.size

    @property
    def hugepages(self) -> bool:
        return self.descriptor.hugepage_size > 0

    def close(self) -> None:
        """Unmap. Every numpy view derived from ``view`` must be dropped first."""
        self.view = None  # type: ignore[assignment]
        unmap(self.addr, self.descriptor.size)


def _view(addr: int, size: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(addr))


_warned_fallback = False


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        bar = "!" * 78
        print(f"{bar}\n!! WARNING: no hugepages: {reason}\n!! Falling back to 4 KiB shared memory: "
              f"expect more TLB misses and lower throughput.\n!! Run deploy/hugepages.sh (as root) to set hugepages up.\n{bar}", file=sys.stderr)


def shm_name(prefix: str) -> str:
    return f"/hotplane.{prefix}.mem"


def hugefile_path(mount: HugeMount, prefix: str) -> str:
    return os.path.join(mount.path, f"{prefix}map_0")


def existing_memory_file(prefix: str, huge_dir: str | None = None) -> str | None:
    """The memory file a previous primary of ``prefix`` left behind, if any (on any backing).

    ``huge_dir`` does not narrow the search: the instance's state lives wherever
    it was created, and a restart keeps it (see ``backing_note``).
    """
    candidates = [hugefile_path(m, prefix) for m in hugetlbfs_mounts()]
    candidates.append("/dev/shm" + shm_name(prefix))
    for c in candidates:
        if os.path.exists(c):
            return c
    return None


def backing_note(existing: str, prefix: str, *, no_huge: bool, huge_dir: str | None) -> str | None:
    """What to tell an operator whose --no-huge / --huge-dir disagrees with the memory being re-attached.

    A restart keeps the instance's state, so the existing file is used as it is;
    the note names it and how to start fresh instead. None when nothing disagrees.
    """
    on_shm = existing.startswith("/dev/shm/")
    if no_huge and not on_shm:
        asked = "--no-huge (4 KiB pages)"
    elif huge_dir is not None and os.path.realpath(os.path.dirname(existing)) != os.path.realpath(huge_dir):
        asked = f"--huge-dir {huge_dir}"
    else:
        return None
    where = "4 KiB shared memory" if on_shm else "hugepages"
    return (f"note: {asked} asked for, but instance {prefix!r} already has its memory on {where} in {existing}: "
            f"re-attaching it to keep its state (the option applies only to a new instance). To start fresh with {asked}: "
            f"stop the instance, run 'hotplane cleanup --file-prefix {prefix}' (its contents are lost), then start again")


def _fresh_address_in_use(e: AddressInUse) -> MemoryError_:
    return MemoryError_(
        f"cannot map the new shared memory at {e.base:#x}: {e}; start the primary with another "
        f"--base-virtaddr (a 2 MiB aligned address such as {e.base + (64 << 30):#x})"
    )


def create_or_open(prefix: str, size: int, base: int, *, no_huge: bool, huge_dir: str | None) -> tuple[SharedMemory, bool]:
    """The primary's memory: open the file a previous primary left, or create a new one.

    Returns (memory, created). An existing file is mapped whatever its size or
    backing; the caller validates its directory.
    """
    existing = existing_memory_file(prefix)
    if existing is not None:
        fd = os.open(existing, os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            on_huge = not existing.startswith("/dev/shm/")
            page = next((m.page_size for m in hugetlbfs_mounts() if existing.startswith(m.path.rstrip("/") + "/")), 0) if on_huge else 0
            if st.st_size == 0:
                raise MemoryError_(f"{existing} is empty: a primary died while creating it; run 'hotplane cleanup --file-prefix {prefix}' and start again")
            desc = MemoryDescriptor(path=existing, size=st.st_size, base=base, hugepage_size=page, shm_name=None if on_huge else shm_name(prefix))
            try:
                addr = map_fixed(fd, st.st_size, base)
            except AddressInUse:
                # The file is kept: its contents are only valid at the address they were made for.
                raise MemoryError_(
                    f"cannot re-attach instance {prefix!r}'s memory {existing} at {base:#x}: that address range is already in use "
                    f"in this process, and the memory can only be used at the address it was created at. Start the primary again "
                    f"(the range is normally free in a new process), or to start over at another address: "
                    f"'hotplane cleanup --file-prefix {prefix}' (its contents are lost), then --base-virtaddr ADDR"
                ) from None
        finally:
            os.close(fd)
        return SharedMemory(desc, addr, _view(addr, desc.size)), False

    mount = None
    if not no_huge:
        mount = find_huge_dir(huge_dir)
        if mount is None:
            _warn_fallback("no hugetlbfs mount found")
        else:
            need = -(-size // mount.page_size)
            have = free_hugepages(mount.page_size)
            if have < need:
                if huge_dir is not None:
                    raise MemoryError_(f"--huge-dir {huge_dir}: {need} hugepages of {mount.page_size >> 10} KiB needed for --socket-mem {size >> 20}, only {have} free; run deploy/hugepages.sh or lower --socket-mem")
                _warn_fallback(f"{need} hugepages needed, {have} free")
                mount = None
    if mount is not None:
        size = -(-size // mount.page_size) * mount.page_size
        path = hugefile_path(mount, prefix)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        desc = MemoryDescriptor(path=path, size=size, base=base, hugepage_size=mount.page_size)
        try:
            os.ftruncate(fd, size)
            addr = map_fixed(fd, size, base)
        except AddressInUse as e:
            os.close(fd)
            os.unlink(path)
            raise _fresh_address_in_use(e) from None
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return SharedMemory(desc, addr, _view(addr, size)), True

    if no_huge:
        _warn_fallback("--no-huge given")
    import posix_ipc

    size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    name = shm_name(prefix)
    shm = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=size)
    desc = MemoryDescriptor(path="/dev/shm" + name, size=size, base=base, hugepage_size=0, shm_name=name)
    try:
        addr = map_fixed(shm.fd, size, base)
    except AddressInUse as e:
        shm.close_fd()
        shm.unlink()
        raise _fresh_address_in_use(e) from None
    except BaseException:
        shm.close_fd()
        shm.unlink()
        raise
    shm.close_fd()
    return SharedMemory(desc, addr, _view(addr, size)), True


def attach(desc: MemoryDescriptor, prefix: str | None = None) -> SharedMemory:
    """A secondary's mapping of the primary's memory, at the primary's address (``prefix`` names it in errors)."""
    try:
        fd = os.open(desc.path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MemoryError_(f"shared memory file {desc.path} is gone: the primary's memory was cleaned up; start the primary again") from None
    try:
        if os.fstat(fd).st_size < desc.size:
            raise MemoryError_(f"{desc.path} is smaller than the primary said ({desc.size} bytes): corrupt runtime state")
        try:
            addr = map_fixed(fd, desc.size, desc.base)
        except AddressInUse as e:
            where = f" of instance {prefix!r}" if prefix else ""
            fix = f"'hotplane cleanup --file-prefix {prefix}'" if prefix else "'hotplane cleanup'"
            raise MemoryError_(
                f"secondary cannot map the primary's memory{where} at {desc.base:#x}: {e}. Every process maps it at that "
                f"same address; to move it, stop the instance, run {fix} (its contents are lost) and start the primary "
                f"with --base-virtaddr set to an address free in every process"
            ) from None
        except MemoryError_ as e:
            raise MemoryError_(f"secondary cannot map the primary's memory at {desc.base:#x}: {e}") from None
    finally:
        os.close(fd)
    return SharedMemory(desc, addr, _view(addr, desc.size))


def remove_file(desc_path: str) -> None:
    """Remove a memory file (hugetlbfs file or /dev/shm entry)."""
    try:
        os.unlink(desc_path)
    except FileNotFoundError:
        pass
