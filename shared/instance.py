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


def eal_init(opts: EalOptions) -> Instance:
    """Join the instance named by ``opts.file_prefix`` as its primary or a secondary."""
    apply_affinity(opts)
    proc_type = opts.proc_type
    if proc_type == "auto":
        proc_type = "secondary" if running_primary_pid(opts.file_prefix) else "primary"
    if proc_type == "primary":
        return _init_primary(opts)
    return _attach_secondary(opts)


def _init_primary(opts: EalOptions) -> Instance:
    prefix = opts.file_prefix
    rdir = runtime_dir(prefix, create=True)
    plock = primary_lock(prefix)
    if not plock.acquire(blocking=False):
        pid = plock.read_pid()
        plock.release()
        raise InstanceError(f"a primary for --file-prefix {prefix} is already running (pid {pid}); stop it first or pick another --file-prefix")
    plock.write_pid()
    alock = attach_lock(prefix)
    alock.acquire(exclusive=False)
    locks = [plock, alock]
    try:
        base = opts.base_virtaddr if opts.base_virtaddr is not None else opts.default_base()
        try:
            prev = MemoryDescriptor.load(rdir)
        except (OSError, ValueError, TypeError):
            prev = None
        if prev is not None and memory_mod.existing_memory_file(prefix) == prev.path:
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
        mem = memory_mod.attach(desc)
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
