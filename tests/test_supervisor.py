"""The supervisor and the process tree, with real processes and gen-to-sink traffic on ring ports.

* every process type is SIGKILLed under traffic: it comes back, the memory zones, counters
  and sessions survive, the packet path keeps flowing while the primary is held down, the
  sink loses nothing where no data-path process died and, where a worker died, only what
  the generator could not queue (ring capacity) -- nothing inside;
* a hot standby per worker (already attached, parked) takes over a SIGKILLed worker's queues,
  and a new standby follows;
* a SIGKILLed supervisor stops nothing and its successor re-adopts the tree with its restart
  counts and READYs (also one reported while no supervisor listened), but never a pid that
  now belongs to another process;
* hangs (missed heartbeats) are detected and repaired; systemd notifications are sent; the
  systemd ExecStop stops nothing after a supervisor crash;
* supervisorctl in text and JSON, its exit codes (another user included); ``stats --watch``;
  Prometheus process metrics; ``hotplane up`` in the foreground;
* bad input: a config typo, a missing interface, a second ``up``, a user without the needed
  privileges: clear message, right code, nothing half-started left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest


def _load(name: str):
    """Private test helpers live beside the tests (no package, importlib mode)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


u = _load("_supervisor_util")
ONE_WORKER_TOML, PY, NotifySocket = u.ONE_WORKER_TOML, u.PY, u.NotifySocket
all_up, call, ctl, hotplane, kill_prefix, pid_reuse = u.all_up, u.call, u.ctl, u.hotplane, u.kill_prefix, u.pid_reuse
programs, sigkill, traffic, up_again, wait_for = u.programs, u.sigkill, u.traffic, u.up_again, u.wait_for

RATE = 800  # packets/s: 400 per worker queue, so a 1024-slot RX ring holds > 2 s of a dead worker's traffic
RING_SLOTS = 1024  # the instance's ring slots per queue (RATE is chosen against it)


@pytest.fixture
def tree(instance):
    """The instance environment; every process of the prefix is killed at the end, even on failure."""
    try:
        yield instance
    finally:
        kill_prefix(instance.prefix)


def _zone_names(inst) -> list[str]:
    r = hotplane(inst, "memzones", "--file-prefix", inst.prefix, "--", "--json")
    assert r.returncode == 0, r.stderr
    return [z["name"] for z in json.loads(r.stdout)["zones"]]


def _sink_received_more(prefix: str, than: int) -> dict | None:
    s = traffic(prefix).get("sink")
    return s if s and s["packets"] > than else None


def _hold_config(tmp_path: Path) -> Path:
    """The embedded default plus a 4 s restart backoff: a second quick kill of a program holds it
    in BACKOFF (no process) long enough to watch the packet path without it."""
    from hotplane.shared.nat_config import DEFAULT_CONFIG_TOML

    cfg = tmp_path / "hold.toml"
    cfg.write_text(DEFAULT_CONFIG_TOML + "\n[supervisor]\nbackoff_initial = 4.0\nbackoff_max = 4.0\n")
    return cfg


def _no_session_lost(mem, before: set, when: str) -> None:
    after = mem.sessions()
    assert before and before <= after, f"{when}: {len(before - after)} of {len(before)} session(s) lost"


@pytest.mark.timeout(300)
def test_each_process_type_killed_under_traffic(tree, tmp_path: Path) -> None:
    """SIGKILL each process type under gen->sink traffic (NAT pipeline, ring ports): it comes back,
    no session is lost, the sink loses nothing unless a worker died, and then only what the
    generator could not queue (ring capacity)."""
    inst = tree
    p = inst.prefix
    r = hotplane(inst, "up", "-p", p, "--daemon", "--no-huge", "--socket-mem", "160", "-c", str(_hold_config(tmp_path)), "--traffic",
                 "--rate", str(RATE), "--stats-listen", "127.0.0.1:0", "--stop-wait", "3")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "is up" in r.stdout
    ps = all_up(p)
    assert set(ps) == {"primary", "worker-0", "worker-1", "stats", "sink", "gen"}
    # Every program, gen and sink included, is up because it said so over the socket (READY), not after a timer.
    assert {n: x["state"] for n, x in ps.items()} == dict.fromkeys(ps, "READY"), ps
    assert ps["gen"]["ready_info"]["tool"] == "gen" and ps["sink"]["ready_info"]["tool"] == "sink"
    wait_for(lambda: _sink_received_more(p, 500), 30, "traffic reaching the sink")
    zones = _zone_names(inst)
    assert {"counters", "traffic", "ring.in.state", "ring.out.state"} <= set(zones)
    mem = u.Memory(p)
    try:
        sessions = wait_for(lambda: (lambda s: s if len(s) >= 64 else None)(mem.sessions()), 30, "a session per generator flow")

        # stats and primary are not on the data path: nothing may be lost while they are down.
        for name in ("stats", "primary"):
            old = programs(p)[name]["pid"]
            before = mem.sink_packets()
            sigkill(old)
            if name == "primary":
                # The packet path does not pause while the primary is dead or restarting.
                wait_for(lambda: mem.sink_packets() > before + 200, 30, "traffic while the primary is restarted")
            new = wait_for(lambda: up_again(p, name, old), 30, f"{name} to come back")
            assert new["state"] == "READY"
            assert _zone_names(inst) == zones, f"the memory zones survive the {name}"
        _no_session_lost(mem, sessions, "after the primary's restart")

        # The primary killed again at once: the restart backoff (4 s) holds it down, with no
        # process at all, while the workers keep forwarding.
        old = programs(p)["primary"]["pid"]
        sigkill(old)
        held = wait_for(lambda: (lambda x: x if x["state"] == "BACKOFF" else None)(programs(p)["primary"]), 30, "the primary held in BACKOFF")
        assert held["pid"] is None
        before = mem.sink_packets()
        wait_for(lambda: mem.sink_packets() > before + 200, 30, "traffic while no primary exists")
        down = programs(p)["primary"]
        assert down["state"] == "BACKOFF" and down["pid"] is None, f"the sink advanced while the primary was down: {down}"
        wait_for(lambda: up_again(p, "primary", old), 30, "the primary back after its backoff")
        _no_session_lost(mem, sessions, "while and after the primary was down")
        n0 = traffic(p)["sink"]["packets"]
        wait_for(lambda: _sink_received_more(p, n0 + 200), 30, "traffic after the restarts")
        s = traffic(p)["sink"]
        assert (s["lost"], s["duplicated"], s["corrupted"]) == (0, 0, 0), s

        # A worker: restarted, resumes at its cursors; loss only where the generator found its ring full.
        stats = call(p, "stats")
        w0 = {w["id"]: w for w in stats["workers"]}[0]
        old = programs(p)["worker-0"]["pid"]
        sigkill(old)
        wait_for(lambda: up_again(p, "worker-0", old), 30, "worker-0 to come back")
        n0 = traffic(p)["sink"]["packets"]
        wait_for(lambda: _sink_received_more(p, n0 + 400), 30, "traffic after the worker restart")
        stats = call(p, "stats")
        w0_after = {w["id"]: w for w in stats["workers"]}[0]
        assert w0_after["rx_packets"] > w0["rx_packets"] and w0_after["restarts"] == w0["restarts"] + 1, "counters survive the worker"
        q = [x for x in stats["queues"] if x["port"] == "in" and x["queue"] == 0][0]
        assert q["owner_pid"] == programs(p)["worker-0"]["pid"]
        t = {x["name"]: x for x in stats["traffic"]}
        s, g = t["sink"], t["gen"]
        assert s["duplicated"] == 0 and s["corrupted"] == 0, s
        # The ring buffers RING_SLOTS frames of the dead worker's queue; what arrived beyond that
        # (a restart slower than RING_SLOTS / rate on a loaded machine) the generator was refused.
        # Nothing that entered the ring may be lost:
        assert s["lost"] <= g["ring_drops"], f"everything lost was refused by a full ring at the generator: {s} {g}"
        _no_session_lost(mem, sessions, "after the worker's restart")

        # The supervisor: killing it stops nothing; a new one adopts everything, restart counts included.
        restarts = {n: x["restarts"] for n, x in programs(p).items()}
        assert restarts == {"primary": 2, "worker-0": 1, "worker-1": 0, "stats": 1, "sink": 0, "gen": 0}, restarts
        sup_pid = call(p, "pid")["pid"]
        pids = {n: x["pid"] for n, x in programs(p).items()}
        sigkill(sup_pid)
        before = mem.sink_packets()
        wait_for(lambda: mem.sink_packets() > before + 400, 30, "traffic with no supervisor at all")
        assert all(psutil.pid_exists(pid) for pid in pids.values())
        r = ctl(inst, "status")
        assert r.returncode == 3 and "not running" in r.stderr
        r = hotplane(inst, "up", "-p", p, "--daemon", "--no-huge", "-c", str(_hold_config(tmp_path)), "--traffic", "--rate", str(RATE),
                     "--stats-listen", "127.0.0.1:0", "--stop-wait", "3")
        assert r.returncode == 0, r.stderr
        ps = programs(p)
        assert {n: x["pid"] for n, x in ps.items()} == pids, "the same processes, adopted"
        assert all(x["adopted"] for x in ps.values())
        assert {n: x["restarts"] for n, x in ps.items()} == restarts, "restart counts survive the supervisor"
        assert ps["worker-0"]["state"] == "READY"
        lost_before = traffic(p)["sink"]["lost"]
        n0 = traffic(p)["sink"]["packets"]
        wait_for(lambda: _sink_received_more(p, n0 + 200), 30, "traffic under the new supervisor")
        assert traffic(p)["sink"]["lost"] == lost_before, "re-adoption loses nothing"

        # The traffic peers themselves. A new generator replays the same flows from sequence 0
        # and a new sink counts from scratch, so only forwarding, integrity and sessions are judged.
        for name in ("gen", "sink"):
            old = programs(p)[name]["pid"]
            sigkill(old)
            new = wait_for(lambda: up_again(p, name, old), 30, f"{name} to come back")
            assert new["state"] == "READY" and new["restarts"] == 1
            sink = programs(p)["sink"]["pid"]
            before = mem.sink_received(sink) if name == "gen" else 0
            wait_for(lambda: mem.sink_received(sink) > before + 200, 30, f"traffic through the gateway after the {name} restart")
            assert all(t["corrupted"] == 0 for t in mem.snapshot()["traffic"] if t["kind"] == "sink")
            _no_session_lost(mem, sessions, f"after the {name} restart")
        assert len(mem.sessions()) == len(sessions), "the restarted generator's flows found their sessions"
    finally:
        mem.close()

    # supervisorctl --json shutdown, then hotplane down waits: everything stops, in order, and nothing is left.
    pids = {n: x["pid"] for n, x in programs(p).items()}
    sup_pid = call(p, "pid")["pid"]
    r = ctl(inst, "--json", "shutdown")
    assert r.returncode == 0 and json.loads(r.stdout) == {"pid": sup_pid, "shutting_down": True}, r
    r = hotplane(inst, "down", "-p", p)
    assert r.returncode == 0, r.stderr
    assert not alive(sup_pid)
    assert not any(alive(pid) for pid in pids.values())
    assert list((inst.root / p / "procs").glob("*.json")) == []
    assert ctl(inst, "status").returncode == 3


def _read_lines_until(proc: subprocess.Popen, pred, timeout: float, what: str) -> list[str]:
    """stdout lines of ``proc`` until ``pred(line)`` (bounded by ``timeout``); the lines read.

    Reads the pipe's fd directly (no buffered reader that could hold lines a select never
    reports); a partial line waits in ``proc._partial`` for the next call.
    """
    import select

    fd = proc.stdout.fileno()
    lines: list[str] = []
    buf: bytes = getattr(proc, "_partial", b"")
    deadline = time.monotonic() + timeout
    try:
        while True:
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode("utf-8", "replace")
                lines.append(line)
                if pred(line):
                    return lines
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            buf += data
    finally:
        proc._partial = buf
    raise AssertionError(f"no {what} within {timeout}s; got {lines[-10:]}")


@pytest.mark.timeout(240)
def test_foreground_up_with_hot_standby(tree) -> None:
    """``hotplane up`` in the foreground: live figures; a hot standby per worker takes over a
    SIGKILLed worker with no session lost; stats --watch and Prometheus show the tree; SIGINT stops all."""
    import re

    from hotplane import __version__

    inst = tree
    p = inst.prefix
    up = subprocess.Popen([PY, "-m", "hotplane.supervisor.cli", "up", "-p", p, "--no-huge", "--socket-mem", "160", "--rate", str(RATE),
                           "--stats-listen", "127.0.0.1:0", "--stop-wait", "3", "--hot-standby"],
                          env=inst.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    inst.procs.append(up)
    live = re.compile(r"^\d\d:\d\d:\d\d \+\d+s \| .*workers w0 \S+ w1 \S+pps \| queues in rx .* \| sink \S+pps recv ([\d,]+) lost .* \| 8/8 up$")
    lines = _read_lines_until(up, lambda ln: (m := live.match(ln)) is not None and int(m.group(1).replace(",", "")) > 0,
                              90, "a live line with packets received and 8/8 up")
    assert len(lines) >= 1
    more = _read_lines_until(up, lambda ln: live.match(ln) is not None, 30, "a second live line")
    assert more

    ps = all_up(p)
    assert {n: x["state"] for n, x in ps.items()} == dict.fromkeys(
        ["primary", "worker-0", "worker-1", "standby-0", "standby-1", "stats", "sink", "gen"], "READY"), ps
    mem = u.Memory(p)
    try:
        sessions = wait_for(lambda: (lambda s: s if len(s) >= 64 else None)(mem.sessions()), 30, "a session per generator flow")
        n0 = mem.sink_packets()
        wait_for(lambda: mem.sink_packets() > n0 + 200, 30, "traffic")
        lost0 = traffic(p)["sink"]["lost"]

        # SIGKILL worker-0: its standby (already attached, parked) owns both queues next.
        old, heir = ps["worker-0"]["pid"], ps["standby-0"]["pid"]
        sigkill(old)
        w0 = wait_for(lambda: up_again(p, "worker-0", old), 30, "worker-0 back")
        assert w0["pid"] == heir and w0["state"] == "READY", f"the standby was promoted: {w0}"
        assert w0["ready_info"]["promoted_from"] == "standby-0" and w0["restarts"] == 1
        own = mem.owners()
        assert own[("in", 0)] == heir and own[("out", 0)] == heir, own
        sb = wait_for(lambda: up_again(p, "standby-0", heir), 60, "a new standby-0")
        assert sb["pid"] not in (old, heir)
        n0 = mem.sink_packets()
        wait_for(lambda: mem.sink_packets() > n0 + 400, 30, "traffic after the promotion")
        t = traffic(p)
        s, g = t["sink"], t["gen"]
        assert s["duplicated"] == 0 and s["corrupted"] == 0, s
        assert s["lost"] - lost0 <= g["ring_drops"], f"nothing that entered a ring is lost: {s} {g}"
        _no_session_lost(mem, sessions, "after the standby took over")
        assert len(mem.sessions()) == len(sessions), "the promoted worker found every session of its flows"
    finally:
        mem.close()

    # supervisorctl stats --watch: per-queue pps, drops by reason, sessions by protocol, each process.
    r = ctl(inst, "stats", "--watch", "--count", "2", "--interval", "0.5")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    reports = r.stdout.split("\ninstance ")
    assert len(reports) == 2, r.stdout
    for rep in reports:
        queues = re.findall(r"^\s+(in|out)\s+(\d)\s+(\d+)\s+(\S+)\s+(\S+)\s+[\d,]+", rep, re.M)
        assert {(q[0], q[1]) for q in queues} == {("in", "0"), ("in", "1"), ("out", "0"), ("out", "1")}, rep
        assert re.search(r"^drops by reason: (none|\w+ [\d,]+)", rep, re.M), rep
        assert re.search(r"^sessions: [\d,]+ \(udp [\d,]+\)", rep, re.M), rep
        for name in ("primary", "worker-0", "worker-1", "standby-0", "standby-1", "stats", "sink", "gen"):
            m = re.search(rf"^{name}\s+(\w+)\s+(\d+)\s+(\d+)\s+(\S+)", rep, re.M)
            assert m and m.group(1) == "READY" and m.group(4) == __version__, (name, rep)
            assert int(m.group(3)) == (1 if name in ("worker-0", "standby-0") else 0), (name, rep)
    assert any(float(q[3].rstrip("kM")) > 0 for q in re.findall(r"^\s+(in)\s+(\d)\s+(\d+)\s+(\S+)", reports[1], re.M)), "per-queue rx pps"
    r = ctl(inst, "--json", "stats", "--watch", "--count", "2", "--interval", "0.2")
    docs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(docs) == 2 and all({"queues", "workers", "sessions", "processes", "totals"} <= set(d) for d in docs)
    r = ctl(inst, "sessions")
    assert r.returncode == 0 and re.match(r"sessions: [\d,]+ \(udp [\d,]+\)\n  worker 0: udp [\d,]+\n  worker 1: udp [\d,]+", r.stdout), r.stdout

    # Prometheus: each process's state, restarts and version, scraped from the running stats secondary.
    ps = programs(p)
    metrics = u.scrape(ps["stats"]["ready_info"]["url"])
    for name, row in ps.items():
        assert metrics[("hotplane_process_state", (("program", name), ("state", "READY")))] == 1, name
        assert metrics[("hotplane_process_restarts_total", (("program", name),))] == row["restarts"], name
        assert metrics[("hotplane_process_info", (("pid", str(row["pid"])), ("program", name), ("version", __version__)))] == 1, name
    assert metrics[("hotplane_process_restarts_total", (("program", "worker-0"),))] == 1
    assert metrics[("hotplane_supervisor_up", ())] == 1

    # SIGINT (Ctrl-C): the whole tree stops in order, the supervisor exits 0, nothing is left.
    pids = [x["pid"] for x in ps.values()]
    up.send_signal(signal.SIGINT)
    assert up.wait(90) == 0
    assert not any(alive(pid) for pid in pids)
    assert list((inst.root / p / "procs").glob("*.json")) == []


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper -- init, for adopted processes -- is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def traffic_from_memory(inst) -> int:
    """The sink's received count, read from the shared memory directly (no supervisor needed)."""
    from hotplane.secondary.stats import snapshot
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init

    i = eal_init(EalOptions(file_prefix=inst.prefix, proc_type="secondary"))
    try:
        return {t["name"]: t for t in snapshot(i.directory)["traffic"]}["sink"]["packets"]
    finally:
        i.close()


def _write_config(tmp_path: Path, workers: int = 1) -> Path:
    cfg = tmp_path / "one.toml"
    cfg.write_text(ONE_WORKER_TOML.format(workers=workers))
    return cfg


@pytest.mark.timeout(300)
def test_control_heartbeats_notify_and_readoption_refusing_a_reused_pid(tree, tmp_path: Path) -> None:
    inst = tree
    p = inst.prefix
    cfg = _write_config(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = dict(inst.env, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    common = ["-c", str(cfg), "--pipeline", "forward", "--no-traffic", "--stats-listen", "127.0.0.1:0", "--stop-wait", "4",
              "--heartbeat-interval", "0.2", "--heartbeat-misses", "5"]
    sup = subprocess.Popen([PY, "-m", "hotplane.supervisor.cli", "supervisor", "--file-prefix", p, "--no-huge", "--socket-mem", "32", "--", *common],
                           env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sup1.err", "w"), text=True)
    inst.procs.append(sup)
    try:
        ready = notify.wait("READY", "1", timeout=60)
        assert ready.get("STATUS", "").startswith("3/3 programs up"), ready
        notify.wait("WATCHDOG", "1", timeout=10)

        # supervisorctl: text and JSON, exit codes.
        r = ctl(inst, "status")
        assert r.returncode == 0 and r.stderr == ""
        lines = r.stdout.splitlines()
        assert [ln.split()[0] for ln in lines] == ["primary", "worker-0", "stats"]
        assert all(" READY " in ln and "pid " in ln and "uptime " in ln for ln in lines), lines
        r = ctl(inst, "--json", "status")
        doc = json.loads(r.stdout)
        assert doc["supervisor"]["pid"] == sup.pid and {x["name"]: x["state"] for x in doc["programs"]} == {"primary": "READY", "worker-0": "READY", "stats": "READY"}
        r = ctl(inst, "status", "nosuch")
        assert r.returncode == 4 and "no program 'nosuch'" in r.stderr and r.stdout == ""
        r = ctl(inst, "--json", "stop", "nosuch")
        assert r.returncode == 4 and json.loads(r.stdout)["error"] == "unknown_program"
        r = ctl(inst, "pid")
        assert r.returncode == 0 and int(r.stdout) == sup.pid
        wpid = int(ctl(inst, "pid", "worker-0").stdout)
        r = ctl(inst, "--json", "pid", "worker-0")
        assert r.returncode == 0 and json.loads(r.stdout) == {"name": "worker-0", "pid": wpid}
        r = ctl(inst, "--json", "version")
        assert json.loads(r.stdout)["programs"]["worker-0"]
        from hotplane import __version__

        r = ctl(inst, "version")
        assert r.returncode == 0 and r.stderr == ""
        assert r.stdout.splitlines() == [f"supervisor {__version__} (pid {sup.pid})"] + [f"{n:<16} {__version__}" for n in ("primary", "worker-0", "stats")]
        r = ctl(inst, "sessions")
        assert r.returncode == 0 and r.stdout.startswith("sessions: none (no NAT session tables"), r.stdout

        # signal: delivered (a harmless SIGWINCH: the process lives on), text and JSON.
        spid = int(ctl(inst, "pid", "stats").stdout)
        r = ctl(inst, "signal", "WINCH", "stats")
        assert r.returncode == 0 and r.stdout == f"stats: sent SIGWINCH (pid {spid})\n" and r.stderr == ""
        r = ctl(inst, "--json", "signal", "28", "stats")
        assert r.returncode == 0 and json.loads(r.stdout) == {"results": [{"name": "stats", "ok": True, "pid": spid, "message": "sent SIGWINCH"}]}
        assert alive(spid) and programs(p)["stats"]["pid"] == spid

        # Another user is refused: the runtime directory is the supervisor's (0700), the socket 0600.
        if os.geteuid() == 0 and shutil.which("setpriv") and shutil.which("unshare"):
            stash = tmp_path / "stash"
            stash.mkdir()
            cmd = u.nobody_argv([PY, "-m", "hotplane.supervisor.ctl", "-p", p, "status"], stash)
            r = subprocess.run(cmd, env=inst.env, capture_output=True, text=True, timeout=60, cwd="/")
            assert r.returncode == 4 and r.stdout == "" and "permission denied" in r.stderr and "as the user that started the instance, or root" in r.stderr, r
            r = subprocess.run(cmd[:-1] + ["--json", "status"], env=inst.env, capture_output=True, text=True, timeout=60, cwd="/")
            assert r.returncode == 4 and json.loads(r.stdout)["error"] == "refused", r

        # tail -f through supervisorctl: lines appended to the log arrive as they are written.
        follow = subprocess.Popen([PY, "-m", "hotplane.supervisor.ctl", "-p", p, "tail", "-f", "-n", "1", "supervisor"], env=inst.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        inst.procs.append(follow)
        _read_lines_until(follow, lambda ln: True, 30, "the last line, before tail -f follows")
        # A stopped stats ignores SIGTERM: the restart waits --stop-wait (4 s) for the SIGKILL, longer than
        # any channel heartbeat limit, and supervisorctl still gets its answer.
        r = ctl(inst, "signal", "STOP", "stats")
        assert r.returncode == 0 and "sent SIGSTOP" in r.stdout
        r = ctl(inst, "--json", "restart", "stats")
        assert r.returncode == 0, r
        res = json.loads(r.stdout)["results"][0]
        assert res["name"] == "stats" and res["ok"] and res["state"] == "READY" and res["pid"] != spid
        got = _read_lines_until(follow, lambda ln: "stats: STARTING -> READY" in ln, 30, "the restart of stats in tail -f")
        assert any("stats: READY -> STOPPING" in ln for ln in got), got
        follow.send_signal(signal.SIGTERM)
        assert follow.wait(10) == 0
        r = ctl(inst, "--json", "tail", "-n", "3", "stats")
        doc = json.loads(r.stdout)
        assert r.returncode == 0 and doc["name"] == "stats" and doc["path"].endswith("stats.log") and len(doc["lines"]) == 3
        r = ctl(inst, "stop", "stats")
        assert r.returncode == 0 and "stats: stopped" in r.stdout
        r = ctl(inst, "status")
        assert r.returncode == 3 and "stats            STOPPED" in r.stdout
        r = ctl(inst, "--json", "start", "stats")
        assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["state"] == "READY"
        r = ctl(inst, "tail", "-n", "5", "stats")
        assert r.returncode == 0 and "READY stats" in r.stdout
        r = ctl(inst, "--json", "stats")
        st = json.loads(r.stdout)
        assert [w["id"] for w in st["workers"]] == [0] and {q["port"] for q in st["queues"]} == {"in", "out"}
        r = ctl(inst, "stats")
        assert r.returncode == 0 and "drops by reason" in r.stdout and "worker-0" in r.stdout
        r = ctl(inst, "--json", "sessions")
        assert r.returncode == 0 and "available" in json.loads(r.stdout)
        r = ctl(inst, "signal", "BOGUS", "worker-0")
        assert r.returncode == 2
        r = ctl(inst, "restart", "worker-0")
        assert r.returncode == 0
        wpid2 = int(ctl(inst, "pid", "worker-0").stdout)
        assert wpid2 != wpid and not alive(wpid)

        # A hung worker (SIGSTOP through supervisorctl: no heartbeats) is fenced and replaced.
        r = ctl(inst, "signal", "STOP", "worker-0")
        assert r.returncode == 0 and "sent SIGSTOP" in r.stdout
        new = wait_for(lambda: up_again(p, "worker-0", wpid2), 30, "the hung worker to be replaced")
        assert "missed" in "\n".join(call(p, "tail", {"name": "supervisor", "lines": 40})["lines"])

        # A second instance of the same prefix is refused, naming the supervisor.
        r = hotplane(inst, "up", "-p", p, "-c", str(cfg), "--daemon")
        assert r.returncode == 1 and f"supervisor pid {sup.pid}" in r.stderr

        # Kill the supervisor and worker-0; worker-0's pid goes to an unrelated process.
        pids = {n: x["pid"] for n, x in programs(p).items()}
        sigkill(sup.pid)
        sup.wait(10)
        wpid3 = new["pid"]
        sigkill(wpid3)
        impostor = pid_reuse(wpid3, ["sleep", "600"])
        if impostor is None:  # not root or a busy pid space: forge the record onto another live process
            impostor = subprocess.Popen(["sleep", "600"])
            rec = inst.root / p / "procs" / "worker-0.json"
            d = json.loads(rec.read_text())
            d["pid"] = impostor.pid
            rec.write_text(json.dumps(d))
        inst.procs.append(impostor)

        notify.clear()
        sup2 = subprocess.Popen([PY, "-m", "hotplane.supervisor.cli", "supervisor", "--file-prefix", p, "--no-huge", "--socket-mem", "32", "--", *common],
                                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sup2.err", "w"), text=True)
        inst.procs.append(sup2)
        notify.wait("READY", "1", timeout=60)
        ps = programs(p)
        assert ps["primary"]["pid"] == pids["primary"] and ps["primary"]["adopted"]
        assert ps["stats"]["pid"] == pids["stats"] and ps["stats"]["adopted"]
        assert ps["worker-0"]["pid"] not in (wpid3, impostor.pid) and not ps["worker-0"]["adopted"]
        assert impostor.poll() is None, "the process that got the pid was left alone"
        log = "\n".join(call(p, "tail", {"name": "supervisor", "lines": 60})["lines"])
        assert "not adopting worker-0" in log

        # supervisorctl shutdown: ordered stop, STOPPING=1, exit 0, nothing left.
        r = ctl(inst, "shutdown")
        assert r.returncode == 0 and r.stdout.startswith(f"supervisor pid {sup2.pid} is shutting down instance {p!r}"), r
        notify.wait("STOPPING", "1", timeout=30)
        assert sup2.wait(60) == 0
        assert not any(alive(pid) for pid in (ps["primary"]["pid"], ps["worker-0"]["pid"], ps["stats"]["pid"]))
        assert impostor.poll() is None
    finally:
        notify.close()


def _supervisor_gone(prefix: str) -> bool:
    from hotplane.supervisor.main import running_supervisor_pid

    return running_supervisor_pid(prefix) is None


@pytest.mark.timeout(180)
def test_ready_reported_while_no_supervisor_runs_is_not_lost(tree, tmp_path: Path) -> None:
    """A worker reports READY while no supervisor listens: the next supervisor adopts it as READY
    (its READY marker), keeps its restart count, and does not kill it at the ready timeout.
    Then the systemd ExecStop logic: ``down --systemd`` without $MAINPID stops nothing, with it everything."""
    inst = tree
    p = inst.prefix
    cfg = tmp_path / "one.toml"
    cfg.write_text(ONE_WORKER_TOML.format(workers=1).replace("ready_timeout = 30", "ready_timeout = 10"))
    up = ["up", "-p", p, "--daemon", "--no-huge", "--socket-mem", "32", "-c", str(cfg), "--pipeline", "forward", "--no-traffic",
          "--stats-listen", "127.0.0.1:0", "--stop-wait", "2"]
    r = hotplane(inst, *up)
    assert r.returncode == 0, r.stderr
    ps = programs(p)
    primary, old_worker, sup = ps["primary"]["pid"], ps["worker-0"]["pid"], call(p, "pid")["pid"]

    # The primary stopped: a new worker-0 waits for its configuration, so it cannot report READY yet.
    os.kill(primary, signal.SIGSTOP)
    try:
        call(p, "restart", {"names": ["worker-0"], "wait": False})
        starting = wait_for(lambda: (lambda x: x if x["state"] == "STARTING" and x["pid"] not in (None, old_worker) else None)(programs(p)["worker-0"]),
                            30, "a new worker-0 STARTING")
        new_worker = starting["pid"]
        sigkill(sup)
        wait_for(lambda: _supervisor_gone(p), 10, "the supervisor's lock to be released")
    finally:
        os.kill(primary, signal.SIGCONT)
    # With nobody listening, its READY lands in its marker only.
    marker = inst.root / p / "procs" / "worker-0.ready"
    wait_for(lambda: marker.exists() and json.loads(marker.read_text())["pid"] == new_worker, 60, "worker-0's READY marker")

    r = hotplane(inst, *up)
    assert r.returncode == 0, r.stderr
    w = programs(p)["worker-0"]
    assert (w["pid"], w["state"], w["adopted"]) == (new_worker, "READY", True), w
    assert w["restarts"] == 1, "the restart count survives the supervisor"
    log = "\n".join(call(p, "tail", {"name": "supervisor", "lines": 40})["lines"])
    assert "reported READY while no supervisor was listening" in log
    assert alive(new_worker)

    # ExecStop after a crash (systemd passes no $MAINPID): the tree is left for the restarted supervisor.
    pids = {n: x["pid"] for n, x in programs(p).items()}
    sup = call(p, "pid")["pid"]
    env = {k: v for k, v in inst.env.items() if k != "MAINPID"}
    r = hotplane(inst, "down", "-p", p, "--systemd", env=env)
    assert r.returncode == 0 and "nothing stopped" in r.stderr, r
    assert alive(sup) and all(alive(x) for x in pids.values())
    # ExecStop of `systemctl stop` ($MAINPID is the running supervisor): everything stops.
    r = hotplane(inst, "down", "-p", p, "--systemd", env=dict(env, MAINPID=str(sup)))
    assert r.returncode == 0 and "stopped" in r.stderr, r
    assert not alive(sup) and not any(alive(x) for x in pids.values())


def _open_dir(tmp_root: Path, name: str, owner: int | None) -> Path:
    d = tmp_root / name
    d.mkdir()
    if owner is not None:
        os.chown(d, owner, owner)
    return d


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"), reason="needs root, setpriv and unshare to act as another user")
def test_unprivileged_user_is_told_what_is_missing(instance, tmp_path: Path) -> None:
    """``hotplane up`` as uid 65534 without capabilities: every missing privilege is named, exit 1, nothing started."""
    import tempfile

    from hotplane.shared.memory import hugetlbfs_mounts

    top = Path(tempfile.mkdtemp(prefix="hotplane-nobody-"))
    try:
        os.chmod(top, 0o755)
        stash = _open_dir(top, "stash", None)
        p = instance.prefix

        # 1. A runtime directory owned by root (0700): refused, and it says where to go instead.
        closed = _open_dir(top, "closed", None)
        os.chmod(closed, 0o700)
        env = dict(instance.env, HOTPLANE_RUNTIME_DIR=str(closed / "run"))
        r = subprocess.run(u.nobody_argv([PY, "-m", "hotplane.supervisor.cli", "up", "-p", p, "--daemon", "--no-huge"], stash),
                           env=env, capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 1, r
        assert f"uid {u.NOBODY} lacks what instance {p!r} needs" in r.stderr and "nothing was started" in r.stderr, r.stderr
        assert f"runtime directory {closed}/run/{p} cannot be created" in r.stderr and "HOTPLANE_RUNTIME_DIR" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert list(closed.iterdir()) == []

        # 2. Its own runtime directory, but hugepages and an af_packet port (in a private network
        #    namespace: only its own lo) it has no right to.
        own = _open_dir(top, "own", u.NOBODY)
        cfg = own / "afp.toml"
        cfg.write_text(ONE_WORKER_TOML.format(workers=1).replace('"ring:in"', '"af_packet:lo"'))
        env = dict(instance.env, HOTPLANE_RUNTIME_DIR=str(own / "run"))
        r = subprocess.run(u.nobody_argv([PY, "-m", "hotplane.supervisor.cli", "up", "-p", p, "-c", str(cfg), "--daemon"], stash, new_netns=True),
                           env=env, capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 1, r
        assert 'gateway.inside_port = "af_packet:lo": af_packet ports need root or CAP_NET_RAW' in r.stderr, r.stderr
        mounts = hugetlbfs_mounts()
        if mounts:
            assert f"hugepages: the hugetlbfs mount {mounts[0].path} is not writable by uid {u.NOBODY}" in r.stderr and "--no-huge" in r.stderr, r.stderr
        assert "runtime directory" not in r.stderr and "Traceback" not in r.stderr
        assert sorted(x.name for x in own.iterdir()) == ["afp.toml"], "nothing half-started: no runtime directory, no logs"
        assert not kill_prefix(p), "no process of the instance was started"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_config_typo_is_refused_and_starts_nothing(instance, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(ONE_WORKER_TOML.format(workers=1).replace("workers = 1", "workrs = 1"))
    r = hotplane(instance, "up", "-p", instance.prefix, "-c", str(bad), "--no-huge")
    assert r.returncode == 2
    assert "nat.workrs" in r.stderr and 'did you mean "workers"' in r.stderr and "nothing was started" in r.stderr
    rdir = instance.root / instance.prefix
    assert not (rdir / "procs").exists() and not (rdir / "memory.json").exists()
    from hotplane.shared import memory

    assert memory.existing_memory_file(instance.prefix) is None


def test_missing_interface_is_refused(instance, tmp_path: Path) -> None:
    cfg = tmp_path / "afp.toml"
    cfg.write_text(ONE_WORKER_TOML.format(workers=1).replace('"ring:in"', '"af_packet:hpnosuch0"'))
    r = hotplane(instance, "up", "-p", instance.prefix, "-c", str(cfg), "--daemon")
    assert r.returncode == 2
    assert "no network interface 'hpnosuch0'" in r.stderr and "nothing was started" in r.stderr
    assert not (instance.root / instance.prefix / "procs").exists()


def test_not_running_instance(instance) -> None:
    r = ctl(instance, "status")
    assert r.returncode == 3 and r.stdout == "" and "not running" in r.stderr
    r = ctl(instance, "--json", "stats")
    assert r.returncode == 3 and json.loads(r.stdout)["error"] == "not_running"
    r = hotplane(instance, "down", "-p", instance.prefix)
    assert r.returncode == 0 and "not running" in r.stderr


@pytest.mark.timeout(120)
def test_a_primary_that_cannot_start_leaves_nothing_behind(tree, tmp_path: Path) -> None:
    """--socket-mem too small for the zones: the primary fails, start-up is abandoned, memory removed."""
    inst = tree
    cfg = _write_config(tmp_path)
    r = hotplane(inst, "up", "-p", inst.prefix, "-c", str(cfg), "--no-huge", "--socket-mem", "1", "--daemon", "--no-traffic", "--stats-listen", "127.0.0.1:0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "primary could not be started" in r.stderr
    assert not kill_prefix(inst.prefix), "no process of the instance is left"
    from hotplane.shared import memory

    assert memory.existing_memory_file(inst.prefix) is None
    assert list((inst.root / inst.prefix / "procs").glob("*.json")) == []
