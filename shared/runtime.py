"""The runtime directory of one instance, and the locks that live in it.

Like DPDK's ``/var/run/dpdk/<prefix>``, each ``--file-prefix`` gets its own
directory holding the memory descriptor, the IPC socket, pid files and lock
files. Locks are ``flock`` locks: the kernel drops them when their holder
dies, so a SIGKILLed process can never wedge the others.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Wide enough for any pid_max (2**22), so every write_pid overwrites the whole record.
_PID_WIDTH = 10


def runtime_root() -> Path:
    """Where instance directories live: $HOTPLANE_RUNTIME_DIR, /run/hotplane (root) or a per-user dir."""
    env = os.environ.get("HOTPLANE_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/hotplane")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "hotplane"
    return Path(f"/tmp/hotplane-{os.geteuid()}")


def runtime_dir(prefix: str, *, create: bool = False) -> Path:
    """The runtime directory of instance ``prefix`` (made 0700 when ``create``)."""
    d = runtime_root() / prefix
    if create:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
    return d


@dataclass
class MemoryDescriptor:
    """What a secondary needs to map the primary's memory: written by the primary."""

    path: str
    size: int
    base: int
    hugepage_size: int  # 0 for the 4 KiB fallback
    shm_name: str | None = None  # POSIX shm name of the fallback file

    def save(self, directory: Path) -> None:
        tmp = directory / "memory.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, directory / "memory.json")

    @classmethod
    def load(cls, directory: Path) -> "MemoryDescriptor":
        return cls(**json.loads((directory / "memory.json").read_text()))


class FileLock:
    """An flock on a file in the runtime directory; released by the kernel if the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, *, exclusive: bool = True, blocking: bool = True) -> bool:
        """Take the lock; returns False if ``blocking`` is False and it is held elsewhere."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not blocking:
            op |= fcntl.LOCK_NB
        try:
            fcntl.flock(self.fd, op)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def write_pid(self) -> None:
        """Record the holder's pid in the lock file (for messages naming it, and for humans).

        One fixed-width ``pwrite`` and no truncation: a reader never sees an empty
        file half-way through the update.
        """
        assert self.fd is not None
        os.pwrite(self.fd, f"{os.getpid():<{_PID_WIDTH}}\n".encode(), 0)

    def read_pid(self) -> int | None:
        """The pid holding this lock exclusively, read from the kernel's lock table.

        Falls back to the pid written in the file when the kernel cannot tell (no
        /proc/locks, or a holder in another pid namespace): that record can lag
        behind the lock by the instant between a new holder's ``flock`` and its
        ``write_pid``.
        """
        excl = [pid for pid, exclusive in flock_holders(self.path) or () if exclusive]
        if excl and excl[0] > 0:
            return excl[0]
        return self.recorded_pid()

    def recorded_pid(self) -> int | None:
        """The pid the last holder wrote into the file (may be stale)."""
        try:
            txt = self.path.read_text().strip()
            return int(txt) if txt else None
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def primary_lock(prefix: str) -> FileLock:
    """Held (exclusive) by the running primary for its whole life."""
    return FileLock(runtime_dir(prefix, create=True) / "primary.lock")


def attach_lock(prefix: str) -> FileLock:
    """Held shared by every process attached to the memory; cleanup takes it exclusive."""
    return FileLock(runtime_dir(prefix, create=True) / "attach.lock")


def memzone_lock(prefix: str) -> FileLock:
    """Serialises memzone reservations between processes."""
    return FileLock(runtime_dir(prefix, create=True) / "memzone.lock")


def _lock_table(path: Path) -> list[tuple[int, bool]] | None:
    """The flock entries of ``path`` in /proc/locks: [(pid, exclusive)]; None if unreadable."""
    try:
        st = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    for line in table.splitlines():
        parts = line.split()
        # "N: FLOCK ADVISORY WRITE pid maj:min:ino 0 EOF"; waiters ("N: -> FLOCK ...") are not holders.
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
            try:
                out.append((int(parts[4]), parts[3] == "WRITE"))
            except ValueError:
                continue
    return out


_table_names_holders: dict[int, bool] = {}


def _lock_table_usable(directory: Path) -> bool:
    """Whether /proc/locks names the holders of locks on files in ``directory``.

    Not on every filesystem (overlayfs and btrfs subvolumes report other device
    numbers than stat) nor with a /proc from another pid namespace: checked once
    per filesystem by finding a probe lock of this process's own.
    """
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return False
    if dev not in _table_names_holders:
        probe = FileLock(directory / "probe.lock")
        try:
            probe.acquire(exclusive=False)
            found = _lock_table(probe.path)
            _table_names_holders[dev] = found is not None and any(pid == os.getpid() for pid, _ in found)
        except OSError:
            _table_names_holders[dev] = False
        finally:
            probe.release()
    return _table_names_holders[dev]


def flock_holders(path: Path) -> list[tuple[int, bool]] | None:
    """Who holds an flock on ``path``: [(pid, exclusive)], read without touching the lock.

    None when the kernel's lock table cannot tell for this file. A pid of 0 is
    a holder outside this pid namespace.
    """
    if not _lock_table_usable(path.parent):
        return None
    return _lock_table(path)


def running_primary_pid(prefix: str) -> int | None:
    """The pid of the running primary of ``prefix``, or None if none holds the lock.

    Reads the kernel's lock table instead of trying the lock, so asking never
    makes a primary that starts at that instant find its lock taken. Returns -1
    for a holder whose pid cannot be known.
    """
    path = runtime_dir(prefix) / "primary.lock"
    if not path.exists():
        return None
    holders = flock_holders(path)
    if holders is not None:
        excl = [pid for pid, exclusive in holders if exclusive]
        if not excl:
            return None
        return excl[0] if excl[0] > 0 else (FileLock(path).recorded_pid() or -1)
    lock = FileLock(path)
    try:
        if lock.acquire(blocking=False):
            return None
        return lock.recorded_pid() or -1
    finally:
        lock.release()
