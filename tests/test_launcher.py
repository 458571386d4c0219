"""Launching real children: pidfd exit notification, logs, stop escalation, identity records, adoption."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from hotplane.supervisor import launcher
from hotplane.supervisor.launcher import (
    Child,
    LaunchSpec,
    ProcessRecord,
    RecordError,
    SpawnError,
    adopt,
    adoptable,
    check_identity,
    load_record,
    load_records,
    remove_record,
    save_record,
    spawn,
)
from hotplane.supervisor.logs import LogFile, backup_path
from hotplane.supervisor.process_state import (
    Adopted,
    ArmTimer,
    CancelTimer,
    ClearRecord,
    Exited,
    Log,
    Notify,
    ProcessMachine,
    ProgramConfig,
    Record,
    SendSignal,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    State,
    StopRequested,
    timer_event,
)

PY = sys.executable
SLEEPER = "import sys, time\nprint('started', flush=True)\nprint('on stderr', file=sys.stderr, flush=True)\ntime.sleep(3600)\n"
# Ignores SIGTERM and says so on the fd given as argv[1] (an event to wait for, not a timer).
STUBBORN = "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.write(int(sys.argv[1]), b'r')\ntime.sleep(3600)\n"


def loops() -> list[str]:
    out = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        out.append("uvloop")
    except ImportError:
        pass
    return out


def run(kind: str, coro_fn: Callable, timeout: float = 60):
    async def main():
        return await asyncio.wait_for(coro_fn(), timeout)

    if kind == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


@pytest.fixture
def children():
    """Everything a test starts is killed and reaped afterwards."""
    made: list = []
    yield made
    for c in made:
        try:
            if isinstance(c, Child):
                c.send_signal(signal.SIGKILL)
                if c.is_child:
                    c.wait(10)
                c.close()
            elif isinstance(c, subprocess.Popen):
                if c.poll() is None:
                    c.kill()
                c.wait(10)
            elif isinstance(c, int):
                os.kill(c, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass


def wait_fd(fd: int, timeout: float = 30) -> bytes:
    r, _, _ = select.select([fd], [], [], timeout)
    assert r, "the child did not signal readiness"
    return os.read(fd, 100)


def wait_log(path: Path, text: str, timeout: float = 30) -> str:
    """Poll a log file (bounded) until ``text`` appears; the child writes it once started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.01)
    raise AssertionError(f"{text!r} never appeared in {path}")


# --------------------------------------------------------------------------- spawning


def test_spawn_identity_log_session_env(tmp_path: Path, children, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("HOTPLANE_TEST_VAR", "kept")
    log = LogFile(tmp_path / "logs" / "s.log")
    code = "import os, sys, time\nprint(os.environ.get('NOTIFY_SOCKET'), os.environ.get('HOTPLANE_TEST_VAR'), os.getsid(0) == os.getpid(), flush=True)\ntime.sleep(3600)\n"
    c = spawn(LaunchSpec("s", [PY, "-c", code]), log)
    children.append(c)
    assert c.is_child and c.pidfd >= 0 and c.exit is None
    p = psutil.Process(c.pid)
    assert c.start_time == p.create_time() and c.cmdline == [PY, "-c", code]
    assert wait_log(log.path, "\n").startswith("None kept True"), "no NOTIFY_SOCKET, env kept, own session"
    assert c.alive
    log.close()


def test_spawn_error_is_clear(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match=r"x: cannot run '/nonexistent/prog'"):
        spawn(LaunchSpec("x", ["/nonexistent/prog"]))
    with pytest.raises(ValueError):
        LaunchSpec("../evil", ["true"])
    with pytest.raises(ValueError):
        LaunchSpec("x", [])


def test_pass_fds_and_close_fds(tmp_path: Path, children) -> None:
    r, w = os.pipe()
    secret_r, secret_w = os.pipe()
    os.set_inheritable(secret_w, True)  # inheritable, but not in pass_fds: close_fds must close it
    try:
        code = "import os, sys\nfd = int(sys.argv[1]); leak = int(sys.argv[2])\ntry:\n    os.fstat(leak); leaked = b'1'\nexcept OSError:\n    leaked = b'0'\nos.write(fd, b'ok' + leaked)\n"
        c = spawn(LaunchSpec("p", [PY, "-c", code, str(w), str(secret_w)], pass_fds=[w]))
        children.append(c)
        assert wait_fd(r) == b"ok0"
        assert c.wait(30) == Exited(0, None, c.pid)
    finally:
        for fd in (r, w, secret_r, secret_w):
            os.close(fd)


@pytest.mark.parametrize("kind", loops())
def test_pidfd_wakes_the_loop_with_the_exit_status(kind: str, children) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        c1 = spawn(LaunchSpec("a", [PY, "-c", "import sys; sys.exit(3)"]))
        c2 = spawn(LaunchSpec("b", [PY, "-c", "import time; time.sleep(3600)"]))
        children.extend([c1, c2])
        got: dict[str, Exited] = {}
        done = asyncio.Event()

        def on_exit(child: Child, ex: Exited) -> None:
            got[child.name] = ex
            if len(got) == 2:
                done.set()

        c1.watch(loop, on_exit)
        c2.watch(loop, on_exit)
        await asyncio.sleep(0)
        assert c2.send_signal(signal.SIGKILL)
        await done.wait()
        return c1, c2, got

    c1, c2, got = run(kind, main)
    assert got["a"] == Exited(3, None, c1.pid)
    assert got["b"] == Exited(None, int(signal.SIGKILL), c2.pid)
    # Reaped (no zombie), Popen told, pidfd closed, further signals refused.
    for c in (c1, c2):
        assert not psutil.pid_exists(c.pid) or psutil.Process(c.pid).create_time() != c.start_time
        assert c.popen.returncode is not None and c.pidfd == -1 and c.send_signal(signal.SIGTERM) is False
    assert c2.popen.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kind", loops())
def test_wait_async(kind: str, children) -> None:
    async def main():
        c = spawn(LaunchSpec("a", [PY, "-c", "import sys; sys.exit(0)"]))
        children.append(c)
        return await c.wait_async()

    assert run(kind, main).code == 0


def test_stop_escalates_to_sigkill_after_the_deadline(children) -> None:
    r, w = os.pipe()
    try:
        c = spawn(LaunchSpec("stubborn", [PY, "-c", STUBBORN, str(w)], pass_fds=[w]))
        children.append(c)
        wait_fd(r)
        t0 = time.monotonic()
        ex = c.stop(timeout=0.5)
        elapsed = time.monotonic() - t0
    finally:
        os.close(r)
        os.close(w)
    assert ex == Exited(None, int(signal.SIGKILL), c.pid)
    assert elapsed >= 0.5


def test_log_capture_and_rotation_of_a_running_child(tmp_path: Path, children) -> None:
    log = LogFile(tmp_path / "w.log", max_bytes=1, backups=2)
    # Prints 'first', then 'tick' for every byte the test writes to its pipe; exits at EOF.
    code = "import os, sys\nprint('first', flush=True)\nr = int(sys.argv[1])\nwhile os.read(r, 1):\n    print('tick', flush=True)\n"
    r, w = os.pipe()
    try:
        c = spawn(LaunchSpec("w", [PY, "-c", code, str(r)], pass_fds=[r]), log)
        children.append(c)
        wait_log(log.path, "first\n")
        assert log.maybe_rotate()
        assert backup_path(log.path, 1).read_text() == "first\n"
        os.write(w, b"x")
        wait_log(log.path, "tick\n")
        assert log.path.read_text() == "tick\n", "after the rotation the child writes at the start of the file"
    finally:
        os.close(w)
        os.close(r)
    assert c.wait(30).code == 0
    log.close()


# --------------------------------------------------------------------------- a shell around the state machine


class Shell:
    """The thin asyncio shell the supervisor will be: actions -> launcher/timers, events back."""

    def __init__(self, loop, cfg: ProgramConfig, spec: LaunchSpec, log: LogFile, rundir: Path) -> None:
        self.loop, self.spec, self.log, self.rundir = loop, spec, log, rundir
        self.m = ProcessMachine(cfg)
        self.child: Child | None = None
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.history: list[tuple[float, object]] = []
        self.changed = asyncio.Event()

    def feed(self, ev) -> None:
        for a in self.m.handle(ev, self.loop.time()):
            self.history.append((self.loop.time(), a))
            self.do(a)

    def do(self, a) -> None:
        if isinstance(a, Spawn):
            try:
                self.child = spawn(self.spec, self.log)
            except SpawnError as e:
                self.feed(SpawnFailed(str(e)))
                return
            self.child.watch(self.loop, lambda c, ex: self.feed(ex))
            self.feed(Spawned(self.child.pid, self.child.start_time))
        elif isinstance(a, SendSignal):
            if self.child is not None and self.child.pid == a.pid:
                self.child.send_signal(a.signal)
        elif isinstance(a, ArmTimer):
            old = self.timers.pop(a.name, None)
            if old:
                old.cancel()
            self.timers[a.name] = self.loop.call_later(a.seconds, self.feed, timer_event(a.name, a.token))
        elif isinstance(a, CancelTimer):
            h = self.timers.pop(a.name, None)
            if h:
                h.cancel()
        elif isinstance(a, Record):
            assert self.child is not None
            save_record(self.rundir, self.child.record(ready=a.ready))
        elif isinstance(a, ClearRecord):
            remove_record(self.rundir, self.m.name)
        elif isinstance(a, Log):
            self.log.write_line(a.message)
        elif isinstance(a, Notify):
            self.changed.set()

    async def until(self, *states: State) -> None:
        while self.m.state not in states:
            self.changed.clear()
            await self.changed.wait()


@pytest.mark.parametrize("kind", loops())
def test_state_machine_with_real_processes_sigterm_then_sigkill(kind: str, tmp_path: Path, children) -> None:
    r, w = os.pipe()
    log = LogFile(tmp_path / "stubborn.log")
    cfg = ProgramConfig("stubborn", startsecs=0.2, stopwaitsecs=0.5)
    spec = LaunchSpec("stubborn", [PY, "-c", STUBBORN, str(w)], pass_fds=[w])

    async def main():
        sh = Shell(asyncio.get_running_loop(), cfg, spec, log, tmp_path / "run")
        sh.feed(Start())
        children.append(sh.child)
        await sh.until(State.RUNNING)
        await asyncio.get_running_loop().run_in_executor(None, wait_fd, r)
        rec = load_record(tmp_path / "run", "stubborn")
        assert rec is not None and rec.pid == sh.child.pid and adoptable(rec)
        sh.feed(StopRequested())
        await sh.until(State.STOPPED)
        return sh

    try:
        sh = run(kind, main)
    finally:
        os.close(r)
        os.close(w)
        log.close()
    sigs = [(t, a.signal) for t, a in sh.history if isinstance(a, SendSignal)]
    assert [s for _, s in sigs] == [signal.SIGTERM, signal.SIGKILL]
    assert sigs[1][0] - sigs[0][0] >= 0.5 - 0.01
    assert sh.m.last_exit.signal == signal.SIGKILL
    assert load_record(tmp_path / "run", "stubborn") is None, "the record goes with the process"
    text = (tmp_path / "stubborn.log").read_text()
    assert "did not stop within 0.5s: SIGKILL" in text


@pytest.mark.parametrize("kind", loops())
def test_state_machine_crash_loop_to_fatal(kind: str, tmp_path: Path) -> None:
    log = LogFile(tmp_path / "crash.log")
    cfg = ProgramConfig("crash", startsecs=5, startretries=2, backoff_base=0.05, backoff_max=0.1)
    spec = LaunchSpec("crash", [PY, "-c", "import sys; print('crashing', flush=True); sys.exit(1)"])

    async def main():
        sh = Shell(asyncio.get_running_loop(), cfg, spec, log, tmp_path / "run")
        sh.feed(Start())
        await sh.until(State.FATAL)
        return sh

    try:
        sh = run(kind, main)
    finally:
        log.close()
    assert sum(isinstance(a, Spawn) for _, a in sh.history) == 3
    assert (tmp_path / "crash.log").read_text().count("crashing") == 3


# --------------------------------------------------------------------------- records and adoption


def test_record_roundtrip_and_atomic_save(tmp_path: Path, children) -> None:
    c = spawn(LaunchSpec("w0", [PY, "-c", SLEEPER], version="9.9"))
    children.append(c)
    path = save_record(tmp_path, c.record(ready=True))
    assert path == tmp_path / "procs" / "w0.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in (tmp_path / "procs").iterdir()] == ["w0.json"], "no temp file left"
    rec = load_record(tmp_path, "w0")
    assert rec == ProcessRecord.from_json(path.read_text())
    assert (rec.pid, rec.start_time, rec.cmdline, rec.version, rec.ready) == (c.pid, c.start_time, c.cmdline, "9.9", True)
    assert rec.boot_id == launcher.boot_id() != ""
    assert load_record(tmp_path, "absent") is None
    assert set(load_records(tmp_path)) == {"w0"}
    remove_record(tmp_path, "w0")
    remove_record(tmp_path, "w0")
    assert load_records(tmp_path) == {}


def test_record_keeps_the_restart_count(tmp_path: Path, children) -> None:
    c = spawn(LaunchSpec("w0", [PY, "-c", SLEEPER]))
    children.append(c)
    save_record(tmp_path, c.record(ready=True, restarts=7))
    assert load_record(tmp_path, "w0").restarts == 7
    d = json.loads((tmp_path / "procs" / "w0.json").read_text())
    del d["restarts"]  # a record written before restart counts were kept
    (tmp_path / "procs" / "w0.json").write_text(json.dumps(d))
    assert load_record(tmp_path, "w0").restarts == 0
    d["restarts"] = -1
    (tmp_path / "procs" / "w0.json").write_text(json.dumps(d))
    with pytest.raises(RecordError):
        load_record(tmp_path, "w0")


# The child reports READY the way every program does (shared/ready.py, as if a supervisor
# were listening at a socket nobody serves), then says so on the fd in argv[1].
READY_REPORTER = (
    "import os, sys, time\n"
    "from hotplane.shared.ready import report_ready\n"
    "report_ready('w0', {'answer': 42}, timeout=2)\n"
    "os.write(int(sys.argv[1]), b'r')\n"
    "time.sleep(3600)\n"
)


def test_ready_marker_of_a_process_that_reported_with_no_supervisor(tmp_path: Path, children) -> None:
    r, w = os.pipe()
    env = dict(os.environ, HOTPLANE_SUPERVISOR_SOCKET=str(tmp_path / "supervisor.sock"), HOTPLANE_PROGRAM="w0")
    c = spawn(LaunchSpec("w0", [PY, "-c", READY_REPORTER, str(w)], env=env, pass_fds=(w,)))
    children.append(c)
    os.close(w)
    try:
        assert wait_fd(r) == b"r"
    finally:
        os.close(r)
    rec = c.record()
    marker = launcher.ready_marker(tmp_path, rec)
    assert marker is not None and marker["answer"] == 42 and marker["pid"] == c.pid
    assert launcher.load_records(tmp_path) == {}, "a marker is not a record"
    # Only this very process counts: another pid, or the same pid with another identity token, does not.
    assert launcher.ready_marker(tmp_path, ProcessRecord(**{**rec.__dict__, "pid": c.pid + 1})) is None
    assert launcher.ready_marker(tmp_path, ProcessRecord(**{**rec.__dict__, "token": "0" * 32})) is None
    remove_record(tmp_path, "w0")
    assert launcher.ready_marker(tmp_path, rec) is None and not launcher.ready_marker_path(tmp_path, "w0").exists()


def test_corrupt_records_are_reported_not_adopted(tmp_path: Path) -> None:
    d = tmp_path / "procs"
    d.mkdir()
    (d / "bad.json").write_text("{not json")
    (d / "worse.json").write_text(json.dumps({"name": "worse", "pid": -3, "start_time": 1, "cmdline": [], "version": "x"}))
    (d / "liar.json").write_text(json.dumps({"name": "other", "pid": 5, "start_time": 1, "cmdline": [], "version": "x"}))
    errors: list[str] = []
    assert load_records(tmp_path, errors) == {}
    assert len(errors) == 3 and any("bad.json" in e for e in errors)
    with pytest.raises(RecordError):
        load_record(tmp_path, "bad")


def test_adoptable_live_process_and_after_exit(tmp_path: Path, children) -> None:
    c = spawn(LaunchSpec("w0", [PY, "-c", SLEEPER]))
    children.append(c)
    rec = c.record()
    assert adoptable(rec) and check_identity(rec) == (True, "")
    c.send_signal(signal.SIGKILL)
    # Exited but not reaped yet: a zombie is not adoptable.
    deadline = time.monotonic() + 30
    while psutil.Process(c.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ok, why = check_identity(rec)
    assert not ok and "zombie" in why
    c.wait(30)
    ok, why = check_identity(rec)
    assert not ok and ("no process" in why or "another process" in why)
    assert adopt(rec)[0] is None


def test_forged_records_are_refused(children) -> None:
    c = spawn(LaunchSpec("w0", [PY, "-c", SLEEPER]))
    children.append(c)
    rec = c.record()
    # The pid now "belongs to" a process started at another time.
    for delta in (1.0, -0.5, 0.02):
        forged = ProcessRecord(**{**rec.__dict__, "start_time": rec.start_time + delta})
        ok, why = check_identity(forged)
        assert not ok and "pid was reused" in why, (delta, why)
    forged = ProcessRecord(**{**rec.__dict__, "cmdline": [PY, "-c", "something else"]})
    ok, why = check_identity(forged)
    assert not ok and "not the recorded" in why
    forged = ProcessRecord(**{**rec.__dict__, "boot_id": "00000000-0000-0000-0000-000000000000"})
    assert not adoptable(forged)
    forged = ProcessRecord(**{**rec.__dict__, "token": "0" * 32})
    ok, why = check_identity(forged)
    assert not ok and "identity token differs" in why
    assert len(rec.token) == 32 and psutil.Process(c.pid).environ()[launcher.TOKEN_VAR] == rec.token
    # A wall-clock step moves create_time and boot_time together: still the same process.
    stepped = ProcessRecord(**{**rec.__dict__, "start_time": rec.start_time + 3600, "boot_time": rec.boot_time + 3600})
    assert adoptable(stepped)
    assert adoptable(rec)


def _pid_reuse(pid: int, argv: list[str], attempts: int = 50) -> subprocess.Popen | None:
    """Start ``argv`` as pid ``pid`` (now free) by steering the kernel's pid allocator (root only)."""
    for _ in range(attempts):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def test_reused_pid_is_never_adopted(children) -> None:
    """A real recycled pid: same pid, same command line, another process."""
    argv = [PY, "-c", "import time; time.sleep(3600)"]
    c = spawn(LaunchSpec("w0", argv))
    children.append(c)
    rec = c.record()
    c.send_signal(signal.SIGKILL)
    c.wait(30)
    if os.geteuid() != 0:
        pytest.skip("steering pid allocation needs root")
    p = _pid_reuse(rec.pid, argv)
    if p is None:
        pytest.skip("could not get the pid reused (busy machine)")
    children.append(p)
    assert p.pid == rec.pid and launcher._cmdline(psutil.Process(p.pid)) == rec.cmdline
    ok, why = check_identity(rec)
    assert not ok and "pid was reused" in why
    assert adopt(rec) == (None, why)
    # Even a record whose start time matches the impostor's (same 10 ms tick) is refused.
    same_tick = ProcessRecord(**{**rec.__dict__, "start_time": psutil.Process(p.pid).create_time(), "boot_time": psutil.boot_time()})
    ok, why = check_identity(same_tick)
    assert not ok and "identity token differs" in why


SUPERVISOR = """
import json, sys, time
from hotplane.supervisor.launcher import LaunchSpec, spawn, save_record
from hotplane.supervisor.logs import LogFile
rundir, logpath = sys.argv[1], sys.argv[2]
code = "import time, itertools\\nfor i in itertools.count():\\n    print('tick', i, flush=True)\\n    time.sleep(0.02)\\n"
log = LogFile(logpath)
c = spawn(LaunchSpec("worker-0", [sys.executable, "-c", code]), log)
save_record(rundir, c.record(ready=True))
print(c.pid, flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("kind", loops())
def test_supervisor_death_stops_nothing_and_readoption(kind: str, tmp_path: Path, children) -> None:
    rundir, logpath = tmp_path / "run", tmp_path / "logs" / "worker-0.log"
    sup = subprocess.Popen([PY, "-c", SUPERVISOR, str(rundir), str(logpath)], stdout=subprocess.PIPE, text=True)
    children.append(sup)
    r, _, _ = select.select([sup.stdout], [], [], 60)
    assert r, "the mini supervisor did not start its worker"
    pid = int(sup.stdout.readline())
    children.append(pid)
    wait_log(logpath, "tick 1\n")
    sup.kill()  # SIGKILL: no cleanup at all
    sup.wait(30)
    # The worker lives on and keeps writing its log (no pipe, no SIGPIPE).
    size = logpath.stat().st_size
    wait_log(logpath, "tick %d\n" % (logpath.read_text().count("tick") + 3))
    assert logpath.stat().st_size > size and psutil.pid_exists(pid)
    # A new supervisor adopts it from the record.
    rec = load_records(rundir)["worker-0"]
    assert rec.pid == pid and rec.ready
    c, why = adopt(rec)
    assert c is not None, why
    children.append(c)
    assert not c.is_child and c.popen is None
    m = ProcessMachine(ProgramConfig("worker-0"))
    m.handle(Adopted(rec.pid, rec.start_time, ready=rec.ready), 0.0)
    assert m.state is State.READY
    # Its log keeps rotating under the new supervisor.
    log = LogFile(logpath, max_bytes=1, backups=1)
    assert log.maybe_rotate()

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        c.watch(loop, lambda ch, ex: fut.set_result(ex))
        assert c.send_signal(signal.SIGTERM)
        return await fut

    ex = run(kind, main)
    log.close()
    assert ex == Exited(None, None, pid) and not ex.known, "exit status of a non-child is unknown"
    acts = m.handle(ex, 1.0)
    assert m.state is State.STARTING and isinstance(acts[-1], Spawn), "an unknown exit is unexpected: restart"
