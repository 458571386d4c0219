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


# --------------------------------------------------------------------------- reading the instance's memory


class Memory:
    """The instance memory, attached once (figures and sessions without asking the supervisor)."""

    def __init__(self, prefix: str) -> None:
        from hotplane.shared.eal import EalOptions
        from hotplane.shared.instance import eal_init

        self.inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))

    def snapshot(self) -> dict:
        from hotplane.secondary.stats import snapshot

        return snapshot(self.inst.directory)

    def sink_packets(self) -> int:
        return {t["name"]: t for t in self.snapshot()["traffic"]}["sink"]["packets"]

    def sink_received(self, pid: int) -> int:
        """Every stamped packet sink process ``pid`` got, duplicates included: a restarted generator
        replays its flows from sequence 0, which the sink counts as duplicates until it passes
        the old sequence numbers (a restarted sink has a slot of its own, counting from 0)."""
        rows = [x for x in self.snapshot()["traffic"] if x["name"] == "sink" and x["pid"] == pid]
        return rows[0]["packets"] + rows[0]["duplicated"] if rows else 0

    def owners(self) -> dict[tuple[str, int], int]:
        return {(q["port"], q["queue"]): q["owner_pid"] for q in self.snapshot()["queues"]}

    def sessions(self) -> set[tuple[int, int, int]]:
        """Every NAT session as (worker, key0, key1), read from the in2out tables."""
        import re

        import numpy as np

        from hotplane.shared.session_table import SessionTable

        out: set[tuple[int, int, int]] = set()
        for z in self.inst.directory.list():
            m = re.match(r"^nat\.w(\d+)\.in2out$", z.name)
            if m is None:
                continue
            e = SessionTable.attach(z.view).entries
            used = np.flatnonzero(e["state"] == 1)
            w = int(m.group(1))
            out.update((w, int(a), int(b)) for a, b in zip(e["key0"][used].tolist(), e["key1"][used].tolist()))
        return out

    def close(self) -> None:
        self.inst.close()


# --------------------------------------------------------------------------- another user


NOBODY = 65534


def nobody_argv(argv: list[str], stash: Path, *, new_netns: bool = False) -> list[str]:
    """``argv`` run as uid/gid 65534 with no capabilities (setpriv), this interpreter included.

    The interpreter may live where nobody can reach it (pyenv under root's 0700 home):
    then the command runs in a private mount namespace where that home is replaced by
    a tmpfs holding only a bind mount of the interpreter's tree (the same paths, so
    the interpreter finds its libraries). ``stash`` is an empty directory for the bind.
    Nothing changes outside the namespace. ``new_netns``: also a private network
    namespace (only its own ``lo``).
    """
    real = Path(os.path.realpath(sys.executable))
    blocked = next((d for d in reversed(real.parents) if d != Path("/") and not os.stat(d).st_mode & 0o001), None)
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    unshare = ["unshare", "-m", "--propagation", "private"] + (["-n"] if new_netns else [])
    if blocked is None:
        return [*unshare, *setpriv, *argv] if new_netns else [*setpriv, *argv]
    keep = real.relative_to(blocked).parts[0]  # e.g. .pyenv under /root
    script = ('set -e; mount --bind "$1/$2" "$3"; mount -t tmpfs -o mode=0755 tmpfs "$1"; mkdir -p "$1/$2"; '
              'mount --bind "$3" "$1/$2"; shift 3; exec "$@"')
    return [*unshare, "sh", "-c", script, "sh", str(blocked), keep, str(stash), *setpriv, *argv]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """A Prometheus text exposition as {(sample name, sorted label items): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out
