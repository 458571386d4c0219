"""Shared fixtures: isolated instances (prefix + runtime dir), hugepages, process helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

HUGEPAGES_WANTED = 512  # 1 GiB of 2 MiB pages: enough for a few test instances


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"hugepages: {_hugepage_status()}"]


def _hugepage_status() -> str:
    try:
        n = int(Path("/proc/sys/vm/nr_hugepages").read_text())
    except OSError:
        return "unknown"
    return f"nr_hugepages={n}, mounts={[m.path for m in _mounts()]}"


def _mounts():
    from hotplane.shared.memory import hugetlbfs_mounts

    return hugetlbfs_mounts()


def enable_hugepages(n: int = HUGEPAGES_WANTED) -> str | None:
    """Try to make ``n`` 2 MiB hugepages and a hugetlbfs mount available; returns a skip reason or None."""
    if os.geteuid() != 0:
        return "not root: cannot enable hugepages"
    try:
        cur = int(Path("/proc/sys/vm/nr_hugepages").read_text())
        if cur < n:
            Path("/proc/sys/vm/nr_hugepages").write_text(str(n))
        if int(Path("/proc/sys/vm/nr_hugepages").read_text()) < 16:
            return "the kernel gave fewer than 16 hugepages"
    except OSError as e:
        return f"cannot set nr_hugepages: {e}"
    if not _mounts():
        os.makedirs("/dev/hugepages", exist_ok=True)
        r = subprocess.run(["mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"cannot mount hugetlbfs: {r.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def hugepages() -> str:
    """A hugetlbfs mount with free pages, or the test is skipped with the reason printed."""
    reason = enable_hugepages()
    if reason:
        print(f"\nSKIP hugepage variant: {reason}")
        pytest.skip(reason)
    return _mounts()[0].path


class InstanceEnv:
    """A unique prefix and a private runtime root, exported for child processes."""

    def __init__(self, root: Path) -> None:
        self.prefix = "t" + uuid.uuid4().hex[:10]
        self.root = root
        self.env = dict(os.environ, HOTPLANE_RUNTIME_DIR=str(root), PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []

    def eal(self, *extra: str) -> list[str]:
        return ["--file-prefix", self.prefix, *extra]

    def spawn(self, args: list[str], **kw) -> subprocess.Popen:
        """Start ``hotplane ARGS`` with this instance's environment; killed at teardown."""
        p = subprocess.Popen([sys.executable, "-m", "hotplane.supervisor.cli", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p

    def run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_primary(self, *eal: str, timeout: float = 30) -> tuple[subprocess.Popen, dict]:
        """Start a primary and wait for its JSON ready line (an event, not a timer)."""
        p = self.spawn(["primary", *self.eal(*eal), "--", "--json", "--bare"])
        line = read_line(p, timeout)
        if not line:
            p.kill()
            out, err = p.communicate(timeout=10)
            raise AssertionError(f"primary did not become ready (rc={p.returncode}): {err}")
        return p, json.loads(line)

    read_line = staticmethod(lambda p, timeout: read_line(p, timeout))

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            try:
                p.communicate(timeout=10)
            except Exception:
                pass
        from hotplane.shared import memory

        path = memory.existing_memory_file(self.prefix)
        if path:
            memory.remove_file(path)
        shutil.rmtree(self.root / self.prefix, ignore_errors=True)


def read_line(p: subprocess.Popen, timeout: float) -> str:
    """One stdout line from ``p`` within ``timeout`` seconds ('' on EOF or timeout)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return p.stdout.readline()
    finally:
        sel.close()


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InstanceEnv]:
    """An isolated instance environment; everything it made is removed afterwards."""
    root = tmp_path / "run"
    root.mkdir()
    monkeypatch.setenv("HOTPLANE_RUNTIME_DIR", str(root))
    env = InstanceEnv(root)
    try:
        yield env
    finally:
        env.teardown()
