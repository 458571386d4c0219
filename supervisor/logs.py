"""Per-process log files: capture, size-based rotation, ``tail [-f]``, and a full disk.

How a child's output is captured (and why not through a pipe)
-------------------------------------------------------------
Each program writes straight into ``<logdir>/<name>.log``: the supervisor opens the
file ``O_WRONLY | O_APPEND | O_CREAT`` and the launcher installs that descriptor as
the child's stdout and stderr. There is no pipe between the child and the supervisor.

A pipe would let the supervisor rename-rotate and see every line, but it ties the
children's output to the supervisor's life: when a SIGKILLed supervisor's read end
closes, the next write gets SIGPIPE (a default disposition restored by exec) or
EPIPE (Python raises ``BrokenPipeError`` out of ``print``), and if anything else keeps
the read end open the pipe fills up and the child *blocks*. Either way "the
supervisor's death stops nothing" would be false, and a re-adopting supervisor
cannot get the old pipe back. With a file, a dead supervisor changes nothing for the
children; the next supervisor opens the same path (same inode) and carries on
rotating it.

Rotation is therefore done in place by the supervisor, under an exclusive ``flock``
(taken on the supervisor's own read-only descriptor, never shared with a child):
older backups shift to ``.2`` ... ``.N`` (the oldest dropped), then the live file's
content moves to ``<name>.log.1``:

* *collapse* (ext4, xfs): whole blocks ``[0, K)`` are copied to the backup and cut
  from the front of the live file with ``fallocate(FALLOC_FL_COLLAPSE_RANGE)``, which
  the kernel does atomically with respect to the children's appends. Nothing is lost
  and ``cat name.log.1 name.log`` is exactly the output stream (a line may be split
  between the two files at the block boundary; less than two blocks stay behind).
  Dirty pages are written back first so the collapse holds the inode lock briefly.
* *copytruncate* (tmpfs and other file systems, or tiny files): copy to end-of-file,
  then truncate to zero. Because the children's descriptor is ``O_APPEND`` their next
  write lands at the new end of file, without a hole. What a child writes between the
  last copy pass and the truncate is lost: usually nothing, but a supervisor that is
  descheduled at that instant loses what was written meanwhile (a line caught half
  written ends its backup, cut, with a newline added).

:class:`Follower` takes the same lock shared, so ``tail -f`` never sees a half
rotation and continues seamlessly from the backup.

A full disk
-----------
* The supervisor's own lines (``write_line``) and rotations handle ``ENOSPC`` /
  ``EDQUOT`` / ``EFBIG`` / ``EIO``: the line is dropped and counted, one clear message goes
  to the supervisor's stderr when the trouble starts and one when it ends, and the
  supervisor keeps running. A rotation that cannot write its backup discards the
  live file's content instead (counted in ``dropped_bytes``) so the program's output
  has room again.
* A child writing to a full disk gets the error from its own ``write``. C programs
  usually ignore it; Python raises ``OSError`` out of ``print``. hotplane's own roles
  therefore call :func:`guard_stdio` at start-up, which makes stdout/stderr drop and
  count output the disk refuses instead of raising (and says how much was dropped
  once writing works again).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import io
import os
import stat
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 10

# Write errors that mean "the disk (or quota, or device) refuses data": drop, count, go on.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})

Reporter = Callable[[str], None]


def _stderr_report(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # our own stderr may be on the same full disk: nothing more we can do


def backup_path(path: Path, n: int) -> Path:
    """``<name>.log.<n>``: the n-th newest backup."""
    return path.with_name(f"{path.name}.{n}")


class LogFile:
    """The log file of one program, owned by the supervisor.

    ``child_fd`` is what the launcher gives the child as stdout and stderr.
    Call :meth:`maybe_rotate` periodically (see :func:`rotate_periodically`).
    Counters: ``dropped_lines`` (supervisor lines lost), ``dropped_bytes`` (output
    discarded by a rotation on a full disk), ``rotations``; ``disk_full`` while the
    trouble lasts.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        name: str | None = None,
        report: Reporter | None = None,
        lossless: bool = True,
    ) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError("max_bytes must be > 0 and backups >= 0")
        self.path = Path(path)
        self.name = name or self.path.name.removesuffix(".log")
        self.max_bytes = max_bytes
        self.backups = backups
        self.report: Reporter = report if report is not None else _stderr_report
        # Rotate by collapsing the file's front where the file system supports it
        # (ext4, xfs); set to False after the first refusal (tmpfs, ...).
        self.lossless = lossless
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.rotations = 0
        self.disk_full = False
        self._lines_at_full = 0
        self._bytes_at_full = 0
        self._fd: int | None = None
        self._lockfd: int | None = None
        self._warned_replaced = False
        self.open()

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Open (creating it and the directory if needed) the live file; idempotent."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        # A separate description for flock: children share _fd's description, never this one,
        # so a lock can never outlive the supervisor through them.
        self._lockfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Close the supervisor's descriptors (children keep theirs)."""
        for fd in (self._fd, self._lockfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lockfd = None

    def __enter__(self) -> "LogFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def child_fd(self) -> int:
        """The O_APPEND descriptor to install as a child's stdout and stderr."""
        if self._fd is None:
            raise ValueError(f"log file {self.path} is closed")
        return self._fd

    def size(self) -> int:
        """Current size of the live file."""
        return os.fstat(self.child_fd).st_size

    # ------------------------------------------------------------------ writing

    def write_line(self, text: str) -> bool:
        """Append one supervisor line (timestamped, tagged ``[hotplane]``). False if dropped."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        data = f"{stamp} [hotplane] {text.rstrip()}\n".encode("utf-8", "backslashreplace")
        if self.disk_full and self.dropped_lines + self.dropped_bytes > self._lines_at_full + self._bytes_at_full:
            note = f"{stamp} [hotplane] {self.dropped_lines - self._lines_at_full} line(s) and {self.dropped_bytes - self._bytes_at_full} byte(s) of output were dropped: the log disk was full\n"
            data = note.encode() + data
        try:
            self._write_all(data)
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            self._enter_full(e, "writing")
            self.dropped_lines += 1
            return False
        self._leave_full()
        return True

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.child_fd, view)
            view = view[n:]

    def _enter_full(self, e: OSError, doing: str) -> None:
        if self.disk_full:
            return
        self.disk_full = True
        self._lines_at_full, self._bytes_at_full = self.dropped_lines, self.dropped_bytes
        self.report(
            f"hotplane: log disk problem for {self.name}: {doing} {self.path} failed: {os.strerror(e.errno or 0)}. "
            f"Its log lines are dropped and counted until space returns; the program keeps running."
        )

    def _leave_full(self) -> None:
        if not self.disk_full:
            return
        self.disk_full = False
        self.report(
            f"hotplane: log {self.path} writable again; {self.dropped_lines - self._lines_at_full} line(s) and "
            f"{self.dropped_bytes - self._bytes_at_full} byte(s) were dropped meanwhile"
        )

    # ------------------------------------------------------------------ rotation

    def maybe_rotate(self) -> bool:
        """Rotate if the live file reached ``max_bytes``; True if it was rotated (or discarded)."""
        if self._fd is None:
            return False
        self._check_replaced()
        if self.size() < self.max_bytes:
            if self.disk_full and _has_space(self.path.parent):
                self._leave_full()
            return False
        return self.rotate()

    def _check_replaced(self) -> None:
        try:
            same = os.stat(self.path).st_ino == os.fstat(self.child_fd).st_ino
        except FileNotFoundError:
            same = False
        if not same and not self._warned_replaced:
            self._warned_replaced = True
            self.report(
                f"hotplane: {self.path} was removed or replaced behind the supervisor's back; {self.name} keeps writing to the old file "
                f"until it is restarted (its output still reaches {self.path.name}.1 at each rotation)"
            )

    def rotate(self) -> bool:
        """Move the live file's content to ``.1`` (shifting older backups). See the module doc."""
        assert self._lockfd is not None
        fcntl.flock(self._lockfd, fcntl.LOCK_EX)
        try:
            return self._rotate_locked()
        finally:
            fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    def _rotate_locked(self) -> bool:
        size = self.size()
        if self.backups == 0:
            os.ftruncate(self.child_fd, 0)
            self.rotations += 1
            return True
        # Oldest first: frees its space before we need room for the copy.
        try:
            os.unlink(backup_path(self.path, self.backups))
        except FileNotFoundError:
            pass
        for i in range(self.backups - 1, 0, -1):
            src = backup_path(self.path, i)
            if src.exists():
                os.replace(src, backup_path(self.path, i + 1))
        tmp = self.path.with_name(f".{self.path.name}.rotating")
        try:
            self._move_to(tmp)
        except OSError as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if e.errno not in DISK_ERRNOS:
                raise
            # No room for the backup: discard the live content so the program can write again.
            self._enter_full(e, "rotating")
            self.dropped_bytes += size
            os.ftruncate(self.child_fd, 0)
            return True
        os.replace(tmp, backup_path(self.path, 1))
        self.rotations += 1
        self._leave_full()
        return True

    def _move_to(self, dst: Path) -> None:
        """Move the live content to ``dst``: lossless collapse if the file system can, else copytruncate."""
        # Read through our own descriptor's inode, even if the path was removed or replaced.
        src_fd = os.open(f"/proc/self/fd/{self.child_fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                if not (self.lossless and self._collapse_into(src_fd, out)):
                    self._copy_truncate_into(src_fd, out)
            finally:
                os.close(out)
        finally:
            os.close(src_fd)

    def _collapse_into(self, src_fd: int, out: int) -> bool:
        """Copy whole blocks [0, K) to ``out`` and cut them from the file's front (no byte lost).

        FALLOC_FL_COLLAPSE_RANGE is atomic against the children's appends (both take the
        inode lock) and keeps everything after K, including what arrives meanwhile.
        False (nothing changed in the live file) where the file system cannot do it.
        """
        st = os.fstat(self.child_fd)
        block = os.fstatvfs(self.child_fd).f_bsize
        k = st.st_size // block * block
        if k == st.st_size:
            k -= block  # the range may not reach end-of-file
        if k <= 0:
            return False
        # Write back the dirty pages first, outside the inode lock the collapse takes,
        # so the children's appends are not held up by that writeback.
        os.fdatasync(self.child_fd)
        off = 0
        while off < k:
            n = _copy_range(src_fd, out, off, min(k - off, 1 << 20))
            if n == 0:
                raise OSError(errno.EIO, f"{self.path} shrank during rotation")
            off += n
        try:
            _collapse(self.child_fd, k)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY):
                raise
            self.lossless = False  # this file system cannot: copytruncate from now on
            os.ftruncate(out, 0)
            os.lseek(out, 0, os.SEEK_SET)
            return False
        return True

    def _copy_truncate_into(self, src_fd: int, out: int) -> None:
        """Copy to end-of-file, then truncate at once: what children write in between is lost."""
        off = 0
        while True:
            n = _copy_range(src_fd, out, off, 1 << 20)
            if n == 0:
                break
            off += n
        os.ftruncate(self.child_fd, 0)
        # A write caught half done (it straddled a page) loses its rest to the truncate:
        # end the backup with a newline so the cut line does not run into the next file.
        if off and os.pread(out, 1, off - 1) != b"\n":
            os.write(out, b"\n")


_FALLOC_FL_COLLAPSE_RANGE = 0x08
_libc = None


def _collapse(fd: int, length: int) -> None:
    """fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, length): remove the file's first ``length`` bytes."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _copy_range(src: int, dst: int, off: int, count: int) -> int:
    """Copy up to ``count`` bytes at ``off`` of ``src`` to the end of ``dst`` (in-kernel when possible)."""
    try:
        return os.copy_file_range(src, dst, count, off)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, count, off)
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view):]
    return len(data)


async def rotate_periodically(logs: Callable[[], Iterable[LogFile]], interval: float = 1.0) -> None:
    """Call ``maybe_rotate`` on every log of ``logs()`` every ``interval`` seconds, forever.

    Errors other than a full disk (handled inside) are reported and do not stop the loop.
    """
    while True:
        for lf in list(logs()):
            try:
                lf.maybe_rotate()
            except OSError as e:
                lf.report(f"hotplane: rotating {lf.path} failed: {e}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- reading


def tail_lines(path: str | os.PathLike, n: int = 10, *, include_rotated: bool = True) -> list[str]:
    """The last ``n`` lines of a log (reaching into ``.1`` when the live file has fewer), newest last."""
    path = Path(path)
    if n <= 0:
        return []
    data = _tail_bytes(path, n)
    if include_rotated and data.count(b"\n") < n + 1:
        try:
            # Bytes, not lines: a collapse rotation can split a line between the two files.
            data = _tail_bytes(backup_path(path, 1), n) + data
        except FileNotFoundError:
            pass
    return data.decode("utf-8", "replace").splitlines()[-n:]


def _tail_bytes(path: Path, n: int, block: int = 8192) -> bytes:
    """The end of ``path``, holding at least ``n`` + 1 newlines (or the whole file)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        buf = b""
        while pos > 0 and buf.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
    return buf


class Follower:
    """Reads what is appended to a log, across rotations, without inotify.

    ``poll()`` returns the bytes written since the last call ('' if none). It holds
    the rotation lock shared while it looks, so a rotation is seen either not at all
    or complete; after one it first finishes the rest of the old content from the
    backup, then continues at the start of the live file. If the file is replaced or
    recreated, it starts again at the beginning of the new one.
    """

    def __init__(self, path: str | os.PathLike, *, from_end: bool = True, backups: int = DEFAULT_BACKUPS) -> None:
        self.path = Path(path)
        self.backups = backups
        self._fd: int | None = None
        self._ino: int | None = None
        self._b1: int | None = _ino(backup_path(self.path, 1))
        self.pos = 0
        self._sig = b""
        if self._reopen() and from_end:
            self.pos = os.fstat(self._fd).st_size  # type: ignore[arg-type]
            self._remember()

    def _reopen(self) -> bool:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._ino = None
            return False
        self._ino = os.fstat(self._fd).st_ino
        self.pos = 0
        self._sig = b""
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def poll(self) -> bytes:
        """Everything appended since the last poll (possibly b'')."""
        cur = _ino(self.path)
        if cur is None:
            return b""
        if cur != self._ino:
            self._reopen()
            self._b1 = _ino(backup_path(self.path, 1))
        if self._fd is None:
            return b""
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            out = []
            b1 = _ino(backup_path(self.path, 1))
            if b1 != self._b1:
                # Rotated: our position is in the oldest new backup; read the chain in
                # order, skipping what we had read, and continue in the live file (where,
                # after a collapse, the end of what we had read may still be).
                skip = self.pos
                for chunk_path in self._new_backups(b1):
                    try:
                        with open(chunk_path, "rb") as f:
                            size = f.seek(0, os.SEEK_END)
                            if skip < size:
                                f.seek(skip)
                                out.append(f.read())
                            skip = max(0, skip - size)
                    except FileNotFoundError:
                        continue
                self._b1 = b1
                self.pos = skip
                self._remember()
            size = os.fstat(self._fd).st_size
            if size < self.pos or (self._sig and os.pread(self._fd, len(self._sig), self.pos - len(self._sig)) != self._sig):
                # Truncated or rewritten by someone else (or a rotation on a full disk).
                self.pos = 0
            while self.pos < size:
                data = os.pread(self._fd, min(size - self.pos, 1 << 20), self.pos)
                if not data:
                    break
                out.append(data)
                self.pos += len(data)
            self._remember()
            return b"".join(out)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _remember(self) -> None:
        """Keep the bytes just before our position: if they change, the file was rewritten."""
        n = min(64, self.pos)
        self._sig = os.pread(self._fd, n, self.pos - n) if n and self._fd is not None else b""

    def _new_backups(self, b1: int | None) -> list[Path]:
        """The backups made since the last poll, oldest first."""
        inos = [_ino(backup_path(self.path, k)) for k in range(1, self.backups + 1)]
        if self._b1 is not None and self._b1 in inos:
            r = inos.index(self._b1)  # our old .1 is now .(r+1): r rotations happened
        else:
            r = 0
            while r < len(inos) and inos[r] is not None:
                r += 1
        return [backup_path(self.path, k) for k in range(r, 0, -1)]

    async def follow(self, *, interval: float = 0.2, stop: asyncio.Event | None = None) -> AsyncIterator[bytes]:
        """Yield new output as it appears, polling every ``interval`` s until ``stop`` is set."""
        while stop is None or not stop.is_set():
            data = self.poll()
            if data:
                yield data
                continue
            if stop is None:
                await asyncio.sleep(interval)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass


def _has_space(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail > 0 and (st.f_favail > 0 or st.f_files == 0)


def _ino(path: Path) -> int | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino if stat.S_ISREG(st.st_mode) else None


# --------------------------------------------------------------------------- child side


class _GuardedRaw(io.RawIOBase):
    """A raw writer on an fd that drops (and counts) what a full disk or a closed pipe refuses."""

    def __init__(self, fd: int, label: str) -> None:
        super().__init__()
        self._fdno = fd
        self.label = label
        self.dropped = 0
        self._reported = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fdno

    def write(self, b) -> int:  # type: ignore[override]
        n = len(b)
        if self.dropped > self._reported:
            note = f"[hotplane] {self.dropped - self._reported} byte(s) of {self.label} were dropped: write failed (disk full?)\n".encode()
            if self._try(note):
                self._reported = self.dropped
        if not self._try(bytes(b)):
            self.dropped += n
        return n

    def _try(self, data: bytes) -> bool:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fdno, view):]
        except OSError as e:
            if e.errno in DISK_ERRNOS or e.errno == errno.EPIPE:
                return False
            raise
        return True

    def close(self) -> None:
        # Never close fd 1/2 themselves; just mark this object closed.
        super().close()


def guard_stdio() -> tuple[_GuardedRaw, _GuardedRaw]:
    """In a child: make stdout/stderr drop output a full disk refuses instead of raising.

    Line buffered, UTF-8 with backslash escapes. Returns the two raw writers (their
    ``dropped`` counts bytes lost). Call early in the process's main().
    """
    raws = []
    for fdno, attr in ((1, "stdout"), (2, "stderr")):
        old = getattr(sys, attr)
        try:
            if old is not None:
                old.flush()
        except (OSError, ValueError):
            pass
        raw = _GuardedRaw(fdno, attr)
        stream = io.TextIOWrapper(io.BufferedWriter(raw, 8192), encoding="utf-8", errors="backslashreplace", line_buffering=True, write_through=attr == "stderr")
        setattr(sys, attr, stream)
        raws.append(raw)
    return raws[0], raws[1]
