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

HUGEPAGES_FREE_NEEDED = 64  # 128 MiB of 2 MiB pages free: a few 16 MiB test instances at once


#: xdist groups: the tests of a group run in one worker, one after another.
#: ``lab``: the lab's fixed namespaces (hp-inside, hp-outside, hp-gw). ``hugepages``: the
#: hugepage pool and the hugetlbfs mounts every process discovers. ``upgrade``, ``chaos``,
#: ``supervisor``: whole instances under load whose tests judge timing (heartbeats,
#: deadlines, recovery), one at a time per group. Everything else (unique prefixes,
#: private runtime dirs, throwaway namespaces) runs side by side.
GROUPS = {
    "upgrade": {"test_upgrade.py"},
    "lab": {"test_lab.py", "test_nat_lab.py", "test_gen_sink.py", "test_chaos_lab.py"},
    "chaos": {"test_chaos.py"},
    "supervisor": {"test_supervisor.py"},
    "hugepages": {"test_memory.py", "test_deploy.py", "test_faults.py"},
}
_GROUP_OF = {m: g for g, mods in GROUPS.items() for m in mods}
#: Handed out first (the longest chains): started late, one of them would be the run's tail.
FIRST = ("upgrade", "lab")


def pytest_configure(config: pytest.Config) -> None:
    # Unix socket paths are at most 107 bytes, and the runtime directories of the test
    # instances live under tmp_path: pytest's default base (/tmp/pytest-of-root/pytest-N,
    # plus popen-gwN under xdist) leaves too little room for RUN/PREFIX/upgrade/wPID.sock.
    # A short base of our own, removed when the run ends (by the controlling process).
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        import tempfile

        config.option.basetemp = tempfile.mkdtemp(prefix="hpt-", dir="/tmp")
        config._hotplane_basetemp = config.option.basetemp


def pytest_unconfigure(config: pytest.Config) -> None:
    base = getattr(config, "_hotplane_basetemp", None)
    if base:
        shutil.rmtree(base, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = _GROUP_OF.get(item.path.name) or ("hugepages" if "hugepages" in getattr(item, "fixturenames", ()) else None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    order = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda it: order.get(_GROUP_OF.get(it.path.name, ""), len(order)))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"hugepages: {_hugepage_status()}"]


def _hugepage_status() -> str:
    try:
        n = int(Path("/proc/sys/vm/nr_hugepages").read_text())
    except OSError:
        return "unknown"
    from hotplane.shared.memory import default_hugepage_size, free_hugepages

    return f"nr_hugepages={n}, free={free_hugepages(default_hugepage_size())}, mounts={[m.path for m in _mounts()]}"


def _mounts():
    from hotplane.shared.memory import hugetlbfs_mounts

    return hugetlbfs_mounts()


class HugepageGrant:
    """What this test session did to get hugepages, so that exactly that is given back at its end."""

    def __init__(self) -> None:
        self.nr_path: Path | None = None
        self.added = 0  # pages this session added to nr_hugepages
        self.mounted: str | None = None  # the hugetlbfs mount this session made
        self.made_dir = False

    def enable(self, need: int = HUGEPAGES_FREE_NEEDED) -> str | None:
        """Make ``need`` free hugepages of the default size and a mount for them; returns a skip reason or None."""
        from hotplane.shared.memory import default_hugepage_size, free_hugepages

        if os.geteuid() != 0:
            return "not root: cannot enable hugepages"
        size = default_hugepage_size()
        kb = size >> 10
        self.nr_path = Path(f"/sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages")
        # Free, not total: pages other processes hold or have reserved are of no use here.
        free = free_hugepages(size)
        if free < need:
            try:
                cur = int(self.nr_path.read_text())
                self.nr_path.write_text(str(cur + need - free))
                self.added = max(0, int(self.nr_path.read_text()) - cur)
            except OSError as e:
                return f"{free} free {kb} KiB hugepages, {need} needed, and nr_hugepages cannot be raised: {e}"
            free = free_hugepages(size)
            if free < need:
                return f"only {free} free {kb} KiB hugepages ({need} needed) even after adding {self.added}: the kernel has no more memory to give"
        if not any(m.page_size == size for m in _mounts()):
            where = "/dev/hugepages"
            if not os.path.isdir(where):
                os.makedirs(where)
                self.made_dir = True
            r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={kb}K", "nodev", where], capture_output=True, text=True)
            if r.returncode != 0:
                return f"cannot mount hugetlbfs on {where}: {r.stderr.strip()}"
            self.mounted = where
        return None

    def mount_path(self) -> str:
        """The hugetlbfs mount of the default page size."""
        from hotplane.shared.memory import default_hugepage_size

        size = default_hugepage_size()
        return next(m.path for m in _mounts() if m.page_size == size)

    def give_back(self) -> list[str]:
        """Unmount what was mounted and remove the pages that were added; returns what could not be undone."""
        left = []
        if self.mounted is not None:
            files = os.listdir(self.mounted)
            if files:
                # Unmounting would destroy them: they belong to someone else (another session, a live instance).
                left.append(f"{self.mounted} stays mounted: it holds {files}")
            else:
                r = subprocess.run(["umount", self.mounted], capture_output=True, text=True)
                if r.returncode != 0:
                    left.append(f"cannot unmount {self.mounted}: {r.stderr.strip()}")
                elif self.made_dir:
                    os.rmdir(self.mounted)
            self.mounted = None
        if self.added and self.nr_path is not None:
            try:
                cur = int(self.nr_path.read_text())
                # Only the session's own pages go; the kernel frees pages still in use once they are released.
                self.nr_path.write_text(str(max(0, cur - self.added)))
            except OSError as e:
                left.append(f"cannot give back {self.added} hugepages: {e}")
            self.added = 0
        return left


def _say(config: pytest.Config, text: str) -> None:
    """A line on the terminal even while test output is captured."""
    import contextlib

    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        if tr is not None:
            tr.write_line(text)
        else:
            print(text)


@pytest.fixture(scope="session")
def hugepages(request: pytest.FixtureRequest) -> Iterator[str]:
    """A hugetlbfs mount with free pages, or the test is skipped with the reason printed.

    What the fixture reserved (nr_hugepages) and mounted is given back at the end of the session.
    """
    grant = HugepageGrant()
    try:
        reason = grant.enable()
        if reason:
            _say(request.config, f"\nSKIP hugepage variant: {reason}")
            pytest.skip(reason)
        yield grant.mount_path()
    finally:
        for problem in grant.give_back():
            _say(request.config, f"\nhugepages: {problem}")


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
