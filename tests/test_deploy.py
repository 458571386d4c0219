"""deploy/: the systemd unit parses and says what the issue asks; hugepages.sh works and is idempotent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "hotplane.service"
SCRIPT = DEPLOY / "hugepages.sh"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit parser good enough for checks: sections -> key -> values (repeatable keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            section = m.group(1)
            out.setdefault(section, {})
            continue
        assert section is not None, f"line {n}: assignment outside a section: {raw!r}"
        assert "=" in line, f"line {n}: not KEY=VALUE: {raw!r}"
        key, value = line.split("=", 1)
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"line {n}: bad key {key!r}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit, section, key) -> str:
    vals = unit[section].get(key)
    assert vals, f"[{section}] {key}= missing"
    return vals[-1]


def test_unit_has_the_required_settings() -> None:
    u = parse_unit(UNIT.read_text())
    assert set(u) == {"Unit", "Service", "Install"}
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "NotifyAccess") == "main"
    # process: systemd signals the supervisor alone, so its crash leaves the packet path running
    # (mixed would SIGKILL the cgroup after it died); `systemctl stop` stops the tree through ExecStop.
    assert one(u, "Service", "KillMode") == "process"
    assert one(u, "Service", "Restart") == "on-failure"
    assert re.fullmatch(r"\d+s?", one(u, "Service", "WatchdogSec"))
    assert one(u, "Service", "ExecStart") == "/usr/local/bin/hotplane up -c /etc/hotplane/gateway.toml"
    stop = one(u, "Service", "ExecStop")
    assert stop.startswith("/usr/local/bin/hotplane down") and "--systemd" in stop.split(), "ExecStop stops nothing after a crash"
    timeout = int(stop.split("--timeout", 1)[1].split()[0])
    assert timeout < int(one(u, "Service", "TimeoutStopSec").rstrip("s")), "hotplane down finishes before systemd gives up"
    pre = one(u, "Service", "ExecStartPre")
    assert "hugepages.sh" in pre and "--pages" in pre and pre.startswith("+/")
    caps = set(one(u, "Service", "AmbientCapabilities").split())
    assert caps == {"CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_IPC_LOCK", "CAP_SYS_NICE"}
    assert one(u, "Service", "RuntimeDirectoryPreserve") == "yes", "process records must survive a restart"
    assert one(u, "Install", "WantedBy") == "multi-user.target"
    # Every ${VAR} used in a command is defined by an Environment= line.
    env = {v.split("=", 1)[0] for v in u["Service"].get("Environment", [])}
    for key in ("ExecStartPre", "ExecStart", "ExecStop"):
        for val in u["Service"][key]:
            for var in re.findall(r"\$\{(\w+)\}", val):
                assert var in env, f"{key} uses ${{{var}}} which no Environment= defines"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (the parser check above still ran)")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists the executables exist: point them at stand-ins, keep everything else.
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("hotplane", "hugepages.sh"):
        p = fake / name
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(0o755)
    text = UNIT.read_text()
    text = text.replace("/usr/local/bin/hotplane", str(fake / "hotplane"))
    text = text.replace("/usr/local/lib/hotplane/hugepages.sh", str(fake / "hugepages.sh"))
    unit = tmp_path / "hotplane.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = r.stdout + r.stderr
    lines = [ln for ln in out.splitlines() if "hotplane.service" in ln]
    bad = [ln for ln in lines if re.search(r"Unknown|Failed to parse|Invalid|is not executable|not allowed|Missing|ignoring", ln, re.I)]
    assert not bad, out
    assert r.returncode == 0, out


def run_script(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    if check_rc is not None:
        assert r.returncode == check_rc, (args, r.returncode, r.stdout, r.stderr)
    return r


def test_hugepages_script_syntax_and_mode() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    assert os.access(SCRIPT, os.X_OK), "hugepages.sh must be executable"


@pytest.mark.skipif(not Path("/sys/kernel/mm/hugepages/hugepages-2048kB").exists(), reason="no 2M hugepage support in this kernel")
def test_hugepages_status_reports_reservation_and_mounts() -> None:
    r = run_script("--status")
    total = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").read_text())
    assert f"hugepages 2M: total {total}," in r.stdout
    mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if ln.split()[2] == "hugetlbfs"]
    for m in mounts:
        assert f"hugetlbfs mounted at {m}" in r.stdout
    if not mounts:
        assert "not mounted" in r.stdout


def test_hugepages_usage_errors() -> None:
    assert "nothing to do" in run_script(check_rc=2).stderr
    assert "non-negative integer" in run_script("--pages", "lots", check_rc=2).stderr
    assert "unsupported --size" in run_script("--pages", "1", "--size", "3M", check_rc=2).stderr
    assert "unknown argument" in run_script("--bogus", check_rc=2).stderr
    assert "--pages N" in run_script("--help").stdout


@pytest.mark.skipif(not Path("/sys/kernel/mm/hugepages/hugepages-2048kB").exists(), reason="no 2M hugepage support in this kernel")
def test_hugepages_dry_run_and_idempotence(tmp_path: Path) -> None:
    cur = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").read_text())
    r = run_script("--pages", str(cur + 3), "--dry-run", "--mount", str(tmp_path / "hp"))
    assert f"would set 2M hugepages from {cur} to {cur + 3}" in r.stdout
    assert "would mount hugetlbfs" in r.stdout
    assert not (tmp_path / "hp").exists(), "a dry run changes nothing"
    # Asking for no more than what is reserved never changes the reservation.
    r = run_script("--pages", str(cur), "--dry-run")
    assert "unchanged" in r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
@pytest.mark.skipif(not Path("/sys/kernel/mm/hugepages/hugepages-2048kB").exists(), reason="no 2M hugepage support in this kernel")
def test_hugepages_mounts_once(tmp_path: Path) -> None:
    cur = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").read_text())
    target = tmp_path / "hp"
    try:
        r = run_script("--pages", str(cur), "--mount", str(target))  # reservation unchanged: safe on a shared machine
        assert f"mounted hugetlbfs (pagesize=2M) at {target}" in r.stdout
        assert any(ln.split()[1] == str(target) and ln.split()[2] == "hugetlbfs" for ln in Path("/proc/mounts").read_text().splitlines())
        r = run_script("--pages", str(cur), "--mount", str(target))
        assert "already mounted" in r.stdout
        assert f"hugetlbfs mounted at {target}" in run_script("--status").stdout
    finally:
        subprocess.run(["umount", str(target)], capture_output=True, timeout=30)
    # A directory that is another file system's mount point is refused with a clear message.
    other = tmp_path / "tmpfs"
    other.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(other)], capture_output=True).returncode == 0:
        try:
            r = run_script("--pages", str(cur), "--mount", str(other), check_rc=1)
            assert "another file system" in r.stderr
        finally:
            subprocess.run(["umount", str(other)], capture_output=True, timeout=30)


def test_execstop_stops_only_while_the_main_process_runs(tmp_path: Path) -> None:
    """``hotplane down --systemd`` decides on systemd's $MAINPID: set and alive -> stop; unset or dead -> nothing."""
    import sys

    from hotplane.supervisor.down import main_process_alive

    assert main_process_alive({})[0] is False
    assert main_process_alive({"MAINPID": ""})[0] is False
    assert main_process_alive({"MAINPID": "nope"})[0] is False
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ok, why = main_process_alive({"MAINPID": str(gone.pid)})
    assert ok is False and "has exited" in why
    ok, why = main_process_alive({"MAINPID": str(os.getpid())})
    assert ok is True, why

    env = {k: v for k, v in os.environ.items() if k != "MAINPID"}
    env["HOTPLANE_RUNTIME_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "hotplane.supervisor.cli", "down", "-p", "tdeploynone", "--systemd", "--json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    doc = __import__("json").loads(r.stdout)
    assert r.returncode == 0 and "no $MAINPID" in doc["skipped"] and "nothing stopped" in doc["messages"][0], r
    r = subprocess.run(cmd, env=dict(env, MAINPID=str(os.getpid())), capture_output=True, text=True, timeout=60)
    doc = __import__("json").loads(r.stdout)
    assert r.returncode == 0 and "skipped" not in doc and "is not running" in doc["messages"][-1], r
