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
        """Record the holder's pid in the lock file (for messages naming it)."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def read_pid(self) -> int | None:
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


def running_primary_pid(prefix: str) -> int | None:
    """The pid of the running primary of ``prefix``, or None if none holds the lock."""
    d = runtime_dir(prefix)
    if not (d / "primary.lock").exists():
        return None
    lock = FileLock(d / "primary.lock")
    try:
        if lock.acquire(blocking=False):
            return None
        return lock.read_pid() or -1
    finally:
        lock.release()
