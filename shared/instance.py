"""EAL initialisation: a process joins an instance as its primary or as a secondary.

``eal_init`` is what ``rte_eal_init`` is to a DPDK process: it picks the
process type, creates or attaches the shared memory at the fixed base
address, validates the memzone directory and pins the CPU affinity.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from hotplane.shared import memory as memory_mod
from hotplane.shared.eal import EalOptions, apply_affinity
from hotplane.shared.memory import MemoryError_, SharedMemory
from hotplane.shared.memzone import CorruptMemory, Directory
from hotplane.shared.runtime import (
    FileLock,
    MemoryDescriptor,
    attach_lock,
    flock_holders,
    memzone_lock,
    primary_lock,
    running_primary_pid,
    runtime_dir,
)


class InstanceError(Exception):
    """This process cannot join the instance; the message says what to do."""


@dataclass
class Instance:
    """This process's view of one hotplane instance."""

    prefix: str
    proc_type: str  # 'primary' | 'secondary'
    runtime_dir: Path
    memory: SharedMemory
    directory: Directory
    generation: int
    created: bool  # primary only: True if the memory was new
    _locks: list[FileLock]

    def close(self) -> None:
        """Leave the instance: drop locks and unmap (the memory itself stays)."""
        # Views into the mapping must go before munmap.
        self.directory = None  # type: ignore[assignment]
        self.memory.close()
        for lk in self._locks:
            lk.release()
        self._locks = []


class PrimaryRunning(InstanceError):
    """Another primary of the prefix holds the primary lock; ``pid`` is its pid (None if unknown)."""

    def __init__(self, pid: int | None, message: str) -> None:
        super().__init__(message)
        self.pid = pid


def eal_init(opts: EalOptions) -> Instance:
    """Join the instance named by ``opts.file_prefix`` as its primary or a secondary."""
    apply_affinity(opts)
    if opts.proc_type == "auto":
        return _init_auto(opts)
    if opts.proc_type == "primary":
        return _init_primary(opts)
    return _attach_secondary(opts)


def _init_auto(opts: EalOptions) -> Instance:
    """DPDK's --proc-type auto: the primary if no primary of the prefix runs, else a secondary.

    A command that runs in one role only (``opts.role``) is refused, with what
    to do, when auto resolves to the other one.
    """
    prefix = opts.file_prefix
    pid = running_primary_pid(prefix)
    if pid is None:
        if opts.role == "secondary":
            left = (runtime_dir(prefix) / "memory.json").exists()
            raise InstanceError(
                f"--proc-type auto: no primary of --file-prefix {prefix} is running, so this process would be the primary, "
                f"but this command runs only as a secondary: start its primary first (hotplane primary --file-prefix {prefix}, "
                f"or hotplane up)" + (", or give --proc-type secondary to attach to the memory its last primary left" if left else "")
            )
        try:
            return _init_primary(opts)
        except PrimaryRunning as e:
            if opts.role == "primary":
                raise
            pid = e.pid  # another primary won the race: this process joins it
    if opts.role == "primary":
        raise PrimaryRunning(pid, f"a primary for --file-prefix {prefix} is already running ({_pid_text(pid)}): with --proc-type auto "
                                  f"this process would be a secondary, but this command runs only as the primary; stop it first or pick another --file-prefix")
    return _attach_secondary(opts)


def _take_primary_lock(prefix: str) -> FileLock:
    """The primary lock, held with this pid recorded; raises PrimaryRunning naming the holder.

    The holder is read from the kernel's lock table, not from the pid the holder
    writes after locking, so a primary that has just won the lock is named
    correctly even before it has recorded itself.
    """
    plock = primary_lock(prefix)
    pid: int | None = None
    for _ in range(3):
        if plock.acquire(blocking=False):
            plock.write_pid()
            return plock
        holders = flock_holders(plock.path)
        excl = [h for h, exclusive in holders or () if exclusive]
        if holders is None or excl:
            pid = excl[0] if excl and excl[0] > 0 else plock.recorded_pid()
            break
        # The holder let go between our try and our look: try again.
    else:
        pid = plock.recorded_pid()
    plock.release()
    raise PrimaryRunning(pid, f"a primary for --file-prefix {prefix} is already running ({_pid_text(pid)}); stop it first or pick another --file-prefix")


def _pid_text(pid: int | None) -> str:
    return f"pid {pid}" if pid is not None and pid > 0 else "pid unknown: its holder cannot be seen from this process"


def _init_primary(opts: EalOptions) -> Instance:
    prefix = opts.file_prefix
    rdir = runtime_dir(prefix, create=True)
    plock = _take_primary_lock(prefix)
    alock = attach_lock(prefix)
    alock.acquire(exclusive=False)
    locks = [plock, alock]
    try:
        base = opts.base_virtaddr if opts.base_virtaddr is not None else opts.default_base()
        try:
            prev = MemoryDescriptor.load(rdir)
        except (OSError, ValueError, TypeError):
            prev = None
        existing = memory_mod.existing_memory_file(prefix)
        if prev is not None and existing == prev.path:
            if opts.base_virtaddr is not None and opts.base_virtaddr != prev.base:
                raise InstanceError(f"instance {prefix!r} already has memory mapped at {prev.base:#x}; --base-virtaddr {opts.base_virtaddr:#x} contradicts it (drop the option, or 'hotplane cleanup --file-prefix {prefix}' to start over)")
            base = prev.base
        mem, created = memory_mod.create_or_open(prefix, opts.memory_bytes, base, no_huge=opts.no_huge, huge_dir=opts.huge_dir)
        try:
            lock = memzone_lock(prefix)
            if created:
                directory = Directory.format(mem.view, lock, prefix, base=base, hugepage_size=mem.descriptor.hugepage_size)
            else:
                directory = Directory.open(mem.view, lock, prefix, base=base)
                note = memory_mod.backing_note(mem.descriptor.path, prefix, no_huge=opts.no_huge, huge_dir=opts.huge_dir)
                if note:
                    print(f"hotplane: {note}", file=sys.stderr)
                if opts.socket_mem_mb is not None and mem.size < opts.memory_bytes:
                    print(f"hotplane: note: re-attached existing memory of {mem.size >> 20} MiB; --socket-mem {opts.socket_mem_mb} applies only to a new instance", file=sys.stderr)
            generation = directory.start_generation()
        except BaseException:
            mem.close()
            raise
        mem.descriptor.save(rdir)
        return Instance(prefix, "primary", rdir, mem, directory, generation, created, locks)
    except (MemoryError_, CorruptMemory) as e:
        for lk in locks:
            lk.release()
        raise InstanceError(str(e)) from None
    except BaseException:
        for lk in locks:
            lk.release()
        raise


def _attach_secondary(opts: EalOptions) -> Instance:
    prefix = opts.file_prefix
    rdir = runtime_dir(prefix)
    if running_primary_pid(prefix) is None and not (rdir / "memory.json").exists():
        raise InstanceError(f"no hotplane instance with --file-prefix {prefix}: start its primary first (hotplane primary --file-prefix {prefix}, or hotplane up)")
    try:
        desc = MemoryDescriptor.load(rdir)
    except FileNotFoundError:
        raise InstanceError(f"instance {prefix!r} has no memory descriptor yet: its primary has not finished starting") from None
    except (ValueError, TypeError) as e:
        raise InstanceError(f"instance {prefix!r}: unreadable {rdir}/memory.json ({e}); run 'hotplane cleanup --file-prefix {prefix}'") from None
    alock = attach_lock(prefix)
    alock.acquire(exclusive=False)
    try:
        mem = memory_mod.attach(desc, prefix)
        try:
            directory = Directory.open(mem.view, memzone_lock(prefix), prefix, base=desc.base)
        except BaseException:
            mem.close()
            raise
    except (MemoryError_, CorruptMemory) as e:
        alock.release()
        raise InstanceError(str(e)) from None
    except BaseException:
        alock.release()
        raise
    return Instance(prefix, "secondary", rdir, mem, directory, directory.generation, False, [alock])


def memory_holders(path: str) -> list[int]:
    """Pids of processes that have ``path`` mapped."""
    pids = []
    for p in psutil.process_iter(["pid"]):
        try:
            if any(m.path == path for m in p.memory_maps(grouped=True)):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, PermissionError):
            continue
    return pids


def cleanup(prefix: str) -> list[str]:
    """Remove an instance's memory and runtime files; refuses while any of its processes run.

    Returns what was removed.
    """
    rdir = runtime_dir(prefix)
    pid = running_primary_pid(prefix)
    if pid is not None:
        raise InstanceError(f"instance {prefix!r} is running (primary pid {pid}): stop it first (hotplane down -p {prefix} or supervisorctl -p {prefix} shutdown)")
    removed: list[str] = []
    alock = None
    if rdir.exists():
        alock = FileLock(rdir / "attach.lock")
        if not alock.acquire(blocking=False):
            path = memory_mod.existing_memory_file(prefix)
            holders = memory_holders(path) if path else []
            alock.release()
            raise InstanceError(f"instance {prefix!r} still has attached processes (pids {holders or 'unknown'}): stop them first")
    try:
        path = memory_mod.existing_memory_file(prefix)
        if path:
            holders = memory_holders(path)
            if holders:
                raise InstanceError(f"the memory of instance {prefix!r} is still mapped by pids {holders}: stop them first")
            memory_mod.remove_file(path)
            removed.append(path)
        if rdir.exists():
            for f in sorted(rdir.rglob("*"), reverse=True):
                if f.is_dir() and not f.is_symlink():
                    f.rmdir()
                else:
                    f.unlink()
                removed.append(str(f))
            rdir.rmdir()
            removed.append(str(rdir))
    finally:
        if alock is not None:
            alock.release()
    return removed


def describe(inst: Instance) -> dict:
    """A summary for status output."""
    return {
        "prefix": inst.prefix,
        "proc_type": inst.proc_type,
        "pid": os.getpid(),
        "generation": inst.generation,
        "base": hex(inst.memory.addr),
        "size": inst.memory.size,
        "hugepages": inst.memory.hugepages,
        "hugepage_size": inst.memory.descriptor.hugepage_size,
        "memory_file": inst.memory.descriptor.path,
        "zones": [
            {"name": z.name, "offset": z.offset, "length": z.length, "schema_id": z.schema_id, "version": z.version, "layout_hash": f"{z.layout_hash:#018x}"}
            for z in inst.directory.list()
        ],
    }
