"""The systemd notify client against a local AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hotplane.supervisor import sdnotify
from hotplane.supervisor.sdnotify import Notifier


class FakeSystemd:
    """A notify socket (path or abstract) that collects the datagrams sent to it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(sdnotify.socket_address(address))
        self.sock.settimeout(5.0)

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n")
        return dict(line.split("=", 1) for line in data.splitlines())

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(5.0)

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass


@pytest.fixture(params=["path", "abstract"])
def systemd(request, tmp_path: Path):
    addr = str(tmp_path / "notify") if request.param == "path" else f"@hotplane-test-{uuid.uuid4().hex}"
    fs = FakeSystemd(addr)
    try:
        yield fs
    finally:
        fs.close()


def test_messages(systemd: FakeSystemd) -> None:
    with Notifier(systemd.address) as n:
        assert n.enabled
        assert n.ready("primary and 4 workers READY")
        assert systemd.recv() == {"READY": "1", "STATUS": "primary and 4 workers READY"}
        assert n.status("worker-1 BACKOFF\nretry 2")
        assert systemd.recv() == {"STATUS": "worker-1 BACKOFF retry 2"}, "a newline must not start a new assignment"
        assert n.watchdog()
        assert systemd.recv() == {"WATCHDOG": "1"}
        assert n.stopping("stopping workers")
        assert systemd.recv() == {"STOPPING": "1", "STATUS": "stopping workers"}
        assert n.mainpid(4321)
        assert systemd.recv() == {"MAINPID": "4321"}
        assert n.extend_timeout(2.5)
        assert systemd.recv() == {"EXTEND_TIMEOUT_USEC": "2500000"}
        assert n.reloading()
        assert systemd.recv() == {"RELOADING": "1"}
        assert n.sent == 7 and n.errors == 0


def test_from_environ_unsets_and_reads_watchdog(systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = Notifier.from_environ(env=env)
    assert env == {"PATH": "/bin"}, "children must not inherit the notify variables"
    assert n.watchdog_interval == pytest.approx(15.0)
    assert n.ready()
    assert systemd.recv() == {"READY": "1"}
    n.close()
    env = {"NOTIFY_SOCKET": systemd.address}
    n = Notifier.from_environ(env=env, unset=False)
    assert env == {"NOTIFY_SOCKET": systemd.address} and n.watchdog_interval is None
    n.close()


def test_disabled_outside_systemd() -> None:
    n = Notifier.from_environ(env={})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.status("x") is False
    assert n.sent == 0
    # Malformed values disable rather than crash.
    assert not Notifier.from_environ(env={"NOTIFY_SOCKET": "relative/path"}).enabled
    assert not Notifier.from_environ(env={"NOTIFY_SOCKET": ""}).enabled


def test_send_errors_never_raise(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.ready() is False
    assert n.errors == 1 and isinstance(n.last_error, OSError)
    n.close()


@pytest.mark.parametrize(
    "env,pid,expected",
    [
        ({"WATCHDOG_USEC": "20000000"}, None, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, 1, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, 2, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None, None),
        ({"WATCHDOG_USEC": "-5"}, None, None),
        ({"WATCHDOG_USEC": "soon"}, None, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None, None),
        ({}, None, None),
    ],
)
def test_watchdog_interval(env, pid, expected) -> None:
    got = sdnotify.watchdog_interval(env, pid)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_socket_address() -> None:
    assert sdnotify.socket_address("@abc") == b"\0abc"
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    with pytest.raises(ValueError):
        sdnotify.socket_address("run/notify")


@pytest.mark.timeout(30)
def test_watchdog_loop_pings(systemd: FakeSystemd) -> None:
    n = Notifier(systemd.address, watchdog_usec=40_000)  # ping every 20 ms

    async def main() -> int:
        task = asyncio.create_task(n.watchdog_loop())
        got = 0
        loop = asyncio.get_running_loop()
        while got < 3:
            msg = await loop.run_in_executor(None, systemd.recv)
            assert msg == {"WATCHDOG": "1"}
            got += 1
        task.cancel()
        return got

    assert asyncio.run(main()) == 3
    n.close()


@pytest.mark.timeout(30)
def test_watchdog_loop_respects_health(systemd: FakeSystemd) -> None:
    n = Notifier(systemd.address, watchdog_usec=20_000)
    calls = 0

    def healthy() -> bool:
        nonlocal calls
        calls += 1
        return False

    async def main() -> None:
        task = asyncio.create_task(n.watchdog_loop(healthy))
        while calls < 5:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert not systemd.pending(), "an unhealthy supervisor must not ping the watchdog"
    # Disabled watchdog: the loop returns at once.
    asyncio.run(asyncio.wait_for(Notifier(systemd.address).watchdog_loop(), 5))


def test_child_process_notifies_through_inherited_env(systemd: FakeSystemd) -> None:
    """Like systemd does: the variable is in the environment of a fresh process."""
    code = "from hotplane.supervisor.sdnotify import Notifier; import sys; sys.exit(0 if Notifier.from_environ().ready('up') else 1)"
    env = dict(os.environ, NOTIFY_SOCKET=systemd.address)
    r = subprocess.run([sys.executable, "-c", code], env=env, timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert systemd.recv() == {"READY": "1", "STATUS": "up"}
