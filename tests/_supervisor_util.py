"""Helpers for the supervisor tests: run hotplane/supervisorctl, wait on conditions, kill everything of a prefix."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

PY = sys.executable

ONE_WORKER_TOML = """
[gateway]
inside_port = "ring:in"
outside_port = "ring:out"
inside_address = "100.64.0.1/24"
outside_address = "198.18.0.1/24"

[nat]
pool = ["198.18.1.0/28"]
workers = {workers}

[supervisor]
backoff_initial = 0.1
backoff_max = 1.0
ready_timeout = 30
"""


def hotplane(inst, *args: str, timeout: float = 90, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hotplane.supervisor.cli", *args], env=env or inst.env, capture_output=True, text=True, timeout=timeout)


def ctl(inst, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hotplane.supervisor.ctl", "-p", inst.prefix, *args], env=inst.env, capture_output=True, text=True, timeout=timeout)


def ctl_json(inst, *args: str) -> tuple[int, Any]:
    r = ctl(inst, "--json", *args)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None


def call(prefix: str, method: str, params: dict | None = None) -> Any:
    """In-process request to the supervisor (fast, for polling)."""
    from hotplane.supervisor.ctl import call as _call

    return _call(prefix, method, params or {}, timeout=10)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Bounded wait for ``pred()`` to return something truthy (the state is in other processes)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except Exception as e:  # the supervisor may be between lives
            last = e
        else:
            if last:
                return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def programs(prefix: str) -> dict[str, dict]:
    return {p["name"]: p for p in call(prefix, "status")["programs"]}


def all_up(prefix: str) -> dict[str, dict] | None:
    ps = programs(prefix)
    return ps if all(p["state"] in ("READY", "RUNNING") for p in ps.values()) else None


def up_again(prefix: str, name: str, old_pid: int) -> dict | None:
    p = programs(prefix)[name]
    return p if p["state"] in ("READY", "RUNNING") and p["pid"] not in (None, old_pid) else None


def traffic(prefix: str) -> dict[str, dict]:
    return {t["name"]: t for t in call(prefix, "stats")["traffic"]}


def kill_prefix(prefix: str) -> list[int]:
    """SIGKILL every process whose command line names ``prefix`` (the tree survives its supervisor)."""
    killed = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except psutil.Error:
            continue
        if prefix in cmd and p.pid != os.getpid():
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
    psutil.wait_procs([psutil.Process(pid) for pid in killed if psutil.pid_exists(pid)], timeout=10)
    return killed


def pid_reuse(pid: int, argv: list[str], attempts: int = 50) -> subprocess.Popen | None:
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


class NotifySocket:
    """A local stand-in for systemd's notify socket: a thread collects every datagram at once
    (as systemd does), so the sender never finds the queue full."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            m = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.cond:
                self.messages.append(m)
                self.cond.notify_all()

    def wait(self, key: str, value: str | None = None, timeout: float = 60) -> dict[str, str]:
        """The first message (already received or arriving within ``timeout``) that sets ``key``."""
        def find():
            return next((m for m in self.messages if key in m and (value is None or m[key] == value)), None)

        with self.cond:
            if not self.cond.wait_for(find, timeout):
                raise AssertionError(f"no {key}{'=' + value if value else ''} notification within {timeout}s; got {self.messages[-10:]}")
            return find()

    def clear(self) -> None:
        with self.cond:
            self.messages.clear()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR) if False else None
        self.sock.close()


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    try:
        psutil.Process(pid).wait(10)  # reaped by its parent (the supervisor or init)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        pass
