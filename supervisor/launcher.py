"""Starting, watching, signalling and re-adopting the supervised processes.

Starting
--------
:func:`spawn` starts a program with :class:`subprocess.Popen`, i.e. fork+exec done in
C by ``_posixsubprocess`` (vfork where it can): no Python code runs in the child
between fork and exec, so it is safe while an event loop and threads are running
(a bare ``os.fork()`` there is not). The child gets:

* stdin from ``/dev/null``; stdout and stderr on the program's log file descriptor
  (``O_APPEND``; see :mod:`hotplane.supervisor.logs` for why a file and not a pipe);
* ``close_fds=True``: no descriptor leaks in except ``pass_fds`` (e.g. an IPC socket);
* signal dispositions reset by exec and SIGPIPE/SIGXFSZ restored to default
  (``restore_signals``). The signal *mask* is inherited: do not spawn from a thread that
  blocks signals;
* its own session (``start_new_session=True``, i.e. ``setsid``). A Ctrl-C or a
  SIGHUP from the terminal that started ``hotplane up`` then reaches only the
  supervisor, which stops the tree in order (secondaries, then the primary) instead
  of every process dying at once, and a closed terminal kills nothing. systemd
  works on the unit's cgroup, not on sessions or process groups; deploy/hotplane.service
  uses ``KillMode=process`` so that it signals the supervisor alone and a crashed
  supervisor's children live on to be re-adopted;
* the supervisor's environment minus ``NOTIFY_SOCKET``/``WATCHDOG_*``/``LISTEN_*``
  (those belong to the supervisor; systemd would reject or misread a child's
  messages).

Watching
--------
Each process is watched through a pidfd (``os.pidfd_open``): it becomes readable when
the process exits, so ``loop.add_reader(pidfd, ...)`` wakes an asyncio (or uvloop)
loop without SIGCHLD handlers or a waiter thread. For our own child the exit status
is then reaped with ``os.waitid(P_PIDFD, pidfd, WEXITED)``. A process *adopted* by a
restarted supervisor is not our child: the pidfd still says when it exits, but only
its real parent (init, or a subreaper) can reap it, so its exit status is unknown
(``Exited(code=None, signal=None)``; the state machine treats that as unexpected).
Signals go through ``signal.pidfd_send_signal`` so they can never hit another
process that reused the pid.

Re-adoption
-----------
A running process is described by a :class:`ProcessRecord` saved atomically as JSON in
``<runtime>/procs/<name>.json``. :func:`adopt` trusts a record only if the pid is
alive, was started at the recorded time, in the same boot, with the same command
line and identity token (:func:`check_identity`), so a recycled pid is never adopted.
The record also carries what the supervisor must not forget across its own restart:
whether the process had reported READY and how many times the program was restarted.

A process that reports READY while no supervisor is listening (it died, a new one
is not up yet) leaves a *READY marker* beside its record, ``<runtime>/procs/<name>.ready``
(:func:`hotplane.shared.ready.report_ready` writes it; :func:`ready_marker` reads it).
The marker names the pid and identity token, so a marker left by an earlier process
of the same program never makes a new one count as READY.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import select
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psutil

from hotplane import __version__
from hotplane.shared.ready import TOKEN_ENV
from hotplane.shared.ready import ready_marker_path as _marker_path
from hotplane.supervisor.logs import LogFile
from hotplane.supervisor.process_state import Exited

# Variables describing the supervisor's own relation to systemd: not for children.
CHILD_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}$")

# create_time has a resolution of one clock tick (10 ms); this only absorbs float rounding.
START_TIME_TOLERANCE = 0.002

# A random token put in each child's environment and in its record: two processes that
# got the same pid within one clock tick (possible when the pid allocator is steered)
# have the same create_time, but never the same token.
TOKEN_VAR = TOKEN_ENV


class SpawnError(Exception):
    """The program could not be started; the message says why."""


class RecordError(Exception):
    """A process record is unreadable or malformed."""


# --------------------------------------------------------------------------- spawning


@dataclass(frozen=True)
class LaunchSpec:
    """What to run for one program."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # None: the supervisor's environment (minus CHILD_ENV_DROP)
    cwd: str | None = None
    pass_fds: Sequence[int] = ()
    new_session: bool = True
    umask: int = -1  # -1: inherit
    version: str = __version__  # recorded for upgrades: which hotplane version this process runs

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad program name {self.name!r}: letters, digits and _ . @ - only")
        if not self.argv:
            raise ValueError(f"{self.name}: empty command line")


def child_environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a child gets: ``env`` (default ours) without the systemd variables."""
    base = dict(os.environ if env is None else env)
    for k in CHILD_ENV_DROP:
        base.pop(k, None)
    return base


def spawn(spec: LaunchSpec, log: LogFile | int | None = None) -> "Child":
    """Start ``spec`` (fork+exec), output to ``log`` (a LogFile, an fd, or None for /dev/null).

    The child's environment gets ``HOTPLANE_PROCESS_TOKEN``, a random identity token
    kept in its record. Returns the :class:`Child` (pidfd open, identity read).
    Raises :class:`SpawnError`.
    """
    out: int | None
    if isinstance(log, LogFile):
        out = log.child_fd
    elif log is None:
        out = subprocess.DEVNULL
    else:
        out = log
    token = secrets.token_hex(16)
    env = child_environ(spec.env)
    env[TOKEN_VAR] = token
    try:
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            cwd=spec.cwd,
            close_fds=True,
            pass_fds=tuple(spec.pass_fds),
            start_new_session=spec.new_session,
            restore_signals=True,
            umask=spec.umask,
        )
    except OSError as e:
        raise SpawnError(f"{spec.name}: cannot run {spec.argv[0]!r}: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:
        raise SpawnError(f"{spec.name}: bad launch spec: {e}") from e
    # We are the parent and have not reaped it: the pid cannot be reused yet, so this
    # pidfd is certainly this process's.
    pidfd = os.pidfd_open(popen.pid)
    start_time, cmdline = _identity(popen.pid, spec.argv)
    return Child(spec.name, popen.pid, pidfd, start_time, cmdline, is_child=True, popen=popen, version=spec.version, token=token)


def _identity(pid: int, fallback_argv: Sequence[str]) -> tuple[float, list[str]]:
    """(create_time, cmdline) of a process we just started (it may already be a zombie)."""
    try:
        p = psutil.Process(pid)
        start = p.create_time()
    except psutil.Error:
        return time.time(), list(fallback_argv)
    return start, _cmdline(p) or list(fallback_argv)


def _cmdline(p: psutil.Process, settle: float = 0.5) -> list[str]:
    """The command line, waiting out the end of an exec.

    Popen returns when exec has closed the close-on-exec descriptors, a moment before
    the kernel publishes the new argv: /proc/PID/cmdline reads empty in between. A real
    program always has an argv[0], so an empty one is retried for up to ``settle`` s.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            return []
        if cmd or time.monotonic() >= deadline:
            return cmd
        time.sleep(0.001)


# --------------------------------------------------------------------------- the child


@dataclass(eq=False)
class Child:
    """A supervised process: spawned by us (``is_child``) or adopted from a previous supervisor."""

    name: str
    pid: int
    pidfd: int  # -1 once closed
    start_time: float
    cmdline: list[str]
    is_child: bool
    popen: subprocess.Popen | None = None
    version: str = __version__
    token: str = ""  # identity token in its environment ('' if unknown)
    exit: Exited | None = None
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """True until the exit has been observed (by poll, wait or the watch callback)."""
        return self.exit is None and self.poll() is None

    def record(self, *, ready: bool = False, restarts: int = 0) -> "ProcessRecord":
        """The identity record to save for re-adoption (``restarts``: the program's restart count so far)."""
        return ProcessRecord.for_process(self.name, self.pid, self.start_time, self.cmdline, self.version, ready=ready, token=self.token,
                                         restarts=restarts)

    # ------------------------------------------------------------------ exit

    def poll(self) -> Exited | None:
        """The exit status if the process has exited (reaping it if it is our child), else None."""
        if self.exit is not None:
            return self.exit
        if self.pidfd < 0:
            return None
        if self.is_child:
            ex = self._reap()
        else:
            ex = Exited(None, None, self.pid) if _readable(self.pidfd, 0) else None
        if ex is not None:
            self._finish(ex)
        return ex

    def _reap(self) -> Exited | None:
        try:
            res = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (e.g. Popen.poll()); use what Popen saw if anything.
            rc = self.popen.returncode if self.popen is not None else None
            if rc is None:
                return Exited(None, None, self.pid)
            return Exited(rc, None, self.pid) if rc >= 0 else Exited(None, -rc, self.pid)
        if res is None:
            return None
        if res.si_code == os.CLD_EXITED:
            ex = Exited(res.si_status, None, self.pid)
        else:  # CLD_KILLED, CLD_DUMPED
            ex = Exited(None, res.si_status, self.pid)
        if self.popen is not None:
            # Tell Popen, so it never waits on a pid that may belong to someone else later.
            self.popen.returncode = ex.code if ex.code is not None else -(ex.signal or 0)
        return ex

    def _finish(self, ex: Exited) -> None:
        self.exit = ex
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self.pidfd)
                except (RuntimeError, ValueError):
                    pass  # loop closed
                self._loop = None
            os.close(self.pidfd)
            self.pidfd = -1

    def close(self) -> None:
        """Stop watching and close the pidfd (the process itself is left alone)."""
        self._close_pidfd()

    def wait(self, timeout: float | None = None) -> Exited | None:
        """Block until the process exits or ``timeout`` seconds pass; the exit status or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ex = self.poll()
            if ex is not None or self.pidfd < 0:
                return ex
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            _readable(self.pidfd, left)

    def watch(self, loop: asyncio.AbstractEventLoop, callback: Callable[["Child", Exited], None]) -> None:
        """Call ``callback(child, exited)`` from ``loop`` when the process exits (uses add_reader only)."""
        if self.exit is not None:
            loop.call_soon(callback, self, self.exit)
            return
        if self.pidfd < 0:
            raise ValueError(f"{self.name}: pidfd closed, cannot watch")
        self._loop = loop

        def on_readable() -> None:
            ex = self.poll()  # removes the reader and closes the pidfd when it has exited
            if ex is not None:
                callback(self, ex)

        loop.add_reader(self.pidfd, on_readable)

    def unwatch(self) -> None:
        """Stop watching (the pidfd stays open)."""
        if self._loop is not None and self.pidfd >= 0:
            try:
                self._loop.remove_reader(self.pidfd)
            except (RuntimeError, ValueError):
                pass
        self._loop = None

    async def wait_async(self) -> Exited:
        """Await the exit (on the running loop, through the pidfd)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Exited] = loop.create_future()
        self.watch(loop, lambda _c, ex: fut.done() or fut.set_result(ex))
        try:
            return await fut
        finally:
            if not fut.done():
                self.unwatch()

    # ------------------------------------------------------------------ signals

    def send_signal(self, sig: int) -> bool:
        """Signal the process through its pidfd; False if it has already exited."""
        if self.exit is not None or self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM, kill_wait: float = 5.0) -> Exited | None:
        """Blocking stop for tools and tests: ``sig``, wait ``timeout``, SIGKILL, wait ``kill_wait``.

        The supervisor itself uses the state machine's timers instead.
        """
        self.send_signal(sig)
        ex = self.wait(timeout)
        if ex is None:
            self.send_signal(signal.SIGKILL)
            ex = self.wait(kill_wait)
        return ex


def _readable(fd: int, timeout: float | None) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    try:
        return bool(p.poll(ms))
    except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
        return False


# --------------------------------------------------------------------------- identity records


def boot_id() -> str:
    """This boot's random id (a record from another boot never matches)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class ProcessRecord:
    """Who a running program's process is, saved so a restarted supervisor can re-adopt it.

    ``start_time`` is psutil's ``create_time()`` (seconds since the epoch). It is derived
    from the boot time, which moves when the wall clock is stepped, so the check compares
    ``start_time - boot_time`` (the process's start measured from boot, fixed for its life)
    with the live process's; ``boot_time`` is psutil's at recording time.
    """

    name: str
    pid: int
    start_time: float
    cmdline: list[str]
    version: str
    boot_id: str = ""
    boot_time: float = 0.0
    ready: bool = False
    recorded_at: float = 0.0
    token: str = ""  # HOTPLANE_PROCESS_TOKEN of the process ('' : not checked)
    restarts: int = 0  # times the program was started again (any supervisor), kept across supervisor restarts

    @classmethod
    def for_process(cls, name: str, pid: int, start_time: float, cmdline: Sequence[str], version: str = __version__, *, ready: bool = False,
                    token: str = "", restarts: int = 0) -> "ProcessRecord":
        return cls(name, pid, start_time, list(cmdline), version, boot_id(), psutil.boot_time(), ready, time.time(), token, restarts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ProcessRecord":
        try:
            d = json.loads(text)
            rec = cls(
                name=str(d["name"]),
                pid=int(d["pid"]),
                start_time=float(d["start_time"]),
                cmdline=[str(x) for x in d["cmdline"]],
                version=str(d["version"]),
                boot_id=str(d.get("boot_id", "")),
                boot_time=float(d.get("boot_time", 0.0)),
                ready=bool(d.get("ready", False)),
                recorded_at=float(d.get("recorded_at", 0.0)),
                token=str(d.get("token", "")),
                restarts=int(d.get("restarts", 0)),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise RecordError(f"malformed process record: {e}") from None
        if rec.pid <= 0 or rec.restarts < 0 or not NAME_RE.match(rec.name):
            raise RecordError(f"malformed process record: name {rec.name!r}, pid {rec.pid}, restarts {rec.restarts}")
        return rec


def records_dir(runtime_dir: str | os.PathLike) -> Path:
    """``<runtime>/procs``: where the records live."""
    return Path(runtime_dir) / "procs"


def record_path(runtime_dir: str | os.PathLike, name: str) -> Path:
    if not NAME_RE.match(name):
        raise ValueError(f"bad program name {name!r}")
    return records_dir(runtime_dir) / f"{name}.json"


def save_record(runtime_dir: str | os.PathLike, rec: ProcessRecord) -> Path:
    """Write ``rec`` atomically (temp file, fsync, rename, fsync of the directory)."""
    path = record_path(runtime_dir, rec.name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = rec.to_json().encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_record(runtime_dir: str | os.PathLike, name: str) -> ProcessRecord | None:
    """The record of ``name``, None if there is none. Raises :class:`RecordError` if unreadable."""
    path = record_path(runtime_dir, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordError(f"{path}: {e}") from None
    try:
        rec = ProcessRecord.from_json(text)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None
    if rec.name != name:
        raise RecordError(f"{path}: names program {rec.name!r}")
    return rec


def load_records(runtime_dir: str | os.PathLike, errors: list[str] | None = None) -> dict[str, ProcessRecord]:
    """All records by program name; unreadable ones are skipped (and described in ``errors``)."""
    out: dict[str, ProcessRecord] = {}
    d = records_dir(runtime_dir)
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            rec = load_record(runtime_dir, path.stem)
        except (RecordError, ValueError) as e:
            if errors is not None:
                errors.append(str(e))
            continue
        if rec is not None:
            out[rec.name] = rec
    return out


def remove_record(runtime_dir: str | os.PathLike, name: str) -> None:
    """Forget ``name``'s record and READY marker (no error if there is none)."""
    for path in (record_path(runtime_dir, name), ready_marker_path(runtime_dir, name)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def ready_marker_path(runtime_dir: str | os.PathLike, name: str) -> Path:
    """``<runtime>/procs/<name>.ready``: the READY a process reported (see the module docstring)."""
    if not NAME_RE.match(name):
        raise ValueError(f"bad program name {name!r}")
    return _marker_path(runtime_dir, name)


def ready_marker(runtime_dir: str | os.PathLike, rec: ProcessRecord) -> dict | None:
    """The READY marker of the process ``rec`` describes (its ``info``), or None.

    Only a marker naming ``rec``'s pid and identity token counts: one left by an
    earlier process of the program (same name, another pid or token) is ignored.
    """
    try:
        d = json.loads(ready_marker_path(runtime_dir, rec.name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("pid") != rec.pid or (rec.token and d.get("token") != rec.token):
        return None
    info = d.get("info")
    return info if isinstance(info, dict) else {}


def check_identity(rec: ProcessRecord) -> tuple[bool, str]:
    """Is the process at ``rec.pid`` the one ``rec`` describes? (ok, reason when not).

    Checks, with psutil: the pid exists and is not a zombie, same boot, same start time
    (measured from boot, see :class:`ProcessRecord`), same command line, and, for
    processes we spawned, the identity token in its environment (start times have a
    10 ms resolution; the token tells apart two processes started in the same tick).
    """
    if rec.boot_id and rec.boot_id != boot_id():
        return False, f"record of pid {rec.pid} is from another boot"
    try:
        p = psutil.Process(rec.pid)
        status = p.status()
        created = p.create_time()
        now_boot = psutil.boot_time()
    except psutil.NoSuchProcess:
        return False, f"no process with pid {rec.pid}"
    except psutil.Error as e:
        return False, f"cannot inspect pid {rec.pid}: {e}"
    if status == psutil.STATUS_ZOMBIE:
        return False, f"pid {rec.pid} has exited (zombie)"
    if rec.boot_time:
        live, recorded = created - now_boot, rec.start_time - rec.boot_time
    else:
        live, recorded = created, rec.start_time
    if abs(live - recorded) > START_TIME_TOLERANCE:
        return False, f"pid {rec.pid} is another process (started {live - recorded:+.3f}s from the recorded start): the pid was reused"
    cmdline = _cmdline(p)
    if cmdline != list(rec.cmdline):
        return False, f"pid {rec.pid} runs {cmdline!r}, not the recorded {rec.cmdline!r}"
    if rec.token:
        try:
            token = p.environ().get(TOKEN_VAR, "")
        except psutil.Error as e:
            return False, f"cannot read the environment of pid {rec.pid} to check its identity token: {e}"
        if token != rec.token:
            return False, f"pid {rec.pid} is another process (its identity token differs): the pid was reused"
    return True, ""


def adoptable(rec: ProcessRecord) -> bool:
    """True if ``rec`` describes a live process that may be adopted (see :func:`check_identity`)."""
    return check_identity(rec)[0]


def adopt(rec: ProcessRecord) -> tuple[Child | None, str]:
    """Take over the process ``rec`` describes: (Child, '') or (None, why not).

    Race-free against pid reuse: the pidfd is opened first, the identity checked after,
    and the pidfd then proven to still refer to a live process. If the identity check
    passed on the process holding the pid and the pidfd's process is still alive after
    it, the two are one process (a pid is not reused while its process lives).
    """
    try:
        pidfd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        return None, f"no process with pid {rec.pid}"
    except OSError as e:
        return None, f"pidfd_open({rec.pid}): {e.strerror}"
    try:
        ok, why = check_identity(rec)
        if not ok:
            os.close(pidfd)
            return None, why
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        os.close(pidfd)
        return None, f"pid {rec.pid} exited while being adopted"
    except BaseException:
        os.close(pidfd)
        raise
    return Child(rec.name, rec.pid, pidfd, rec.start_time, list(rec.cmdline), is_child=False, popen=None, version=rec.version, token=rec.token), ""
