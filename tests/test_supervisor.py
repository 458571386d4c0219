"""The supervisor and the process tree, with real processes and gen-to-sink traffic on ring ports.

* every process type is SIGKILLed under traffic: it comes back, the memory zones and
  counters survive, the sink loses nothing where no data-path process died and, where a
  worker died, only what the generator could not queue (ring capacity) -- nothing inside;
* a SIGKILLed supervisor stops nothing and its successor re-adopts the tree, but never a
  pid that now belongs to another process;
* hangs (missed heartbeats) are detected and repaired; systemd notifications are sent;
* bad input: a config typo, a missing interface, a second ``up``: clear message, right code,
  nothing half-started left behind.
"""

from __future__ import annotations

import json
import os
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
RING_SLOTS = 1024


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


@pytest.mark.timeout(180)
def test_embedded_default_survives_each_process_type_being_killed(tree, tmp_path: Path) -> None:
    inst = tree
    r = hotplane(inst, "up", "-p", inst.prefix, "--daemon", "--no-huge", "--socket-mem", "160", "--rate", str(RATE),
                 "--stats-listen", "127.0.0.1:0", "--stop-wait", "3")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "is up" in r.stdout
    p = inst.prefix
    ps = all_up(p)
    assert set(ps) == {"primary", "worker-0", "worker-1", "stats", "sink", "gen"}
    assert all(ps[n]["state"] == "READY" for n in ("primary", "worker-0", "worker-1", "stats")), ps
    wait_for(lambda: _sink_received_more(p, 500), 30, "traffic reaching the sink")
    zones = _zone_names(inst)
    assert {"counters", "traffic", "ring.in.state", "ring.out.state"} <= set(zones)

    # stats and primary are not on the data path: nothing may be lost while they are down.
    for name in ("stats", "primary"):
        old = programs(p)[name]["pid"]
        before = traffic(p)["sink"]["packets"]
        sigkill(old)
        if name == "primary":
            # The packet path does not pause while the primary is dead or restarting.
            wait_for(lambda: _sink_received_more(p, before + 200), 30, "traffic while the primary is restarted")
        new = wait_for(lambda: up_again(p, name, old), 30, f"{name} to come back")
        assert new["state"] == "READY"
        assert _zone_names(inst) == zones, f"the memory zones survive the {name}"
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
    assert s["lost"] <= g["ring_drops"], f"everything lost was refused by a full ring at the generator: {s} {g}"
    assert s["lost"] <= RING_SLOTS, f"loss bounded by the ring capacity: {s}"

    # The supervisor: killing it stops nothing; a new one adopts everything.
    sup_pid = call(p, "pid")["pid"]
    pids = {n: x["pid"] for n, x in programs(p).items()}
    sigkill(sup_pid)
    before = traffic_from_memory(inst)
    wait_for(lambda: traffic_from_memory(inst) > before + 400, 30, "traffic with no supervisor at all")
    assert all(psutil.pid_exists(pid) for pid in pids.values())
    r = ctl(inst, "status")
    assert r.returncode == 3 and "not running" in r.stderr
    r = hotplane(inst, "up", "-p", inst.prefix, "--daemon", "--no-huge", "--rate", str(RATE), "--stats-listen", "127.0.0.1:0", "--stop-wait", "3")
    assert r.returncode == 0, r.stderr
    ps = programs(p)
    assert {n: x["pid"] for n, x in ps.items()} == pids, "the same processes, adopted"
    assert all(x["adopted"] for x in ps.values())
    assert ps["worker-0"]["state"] == "READY"
    lost_before = traffic(p)["sink"]["lost"]
    n0 = traffic(p)["sink"]["packets"]
    wait_for(lambda: _sink_received_more(p, n0 + 200), 30, "traffic under the new supervisor")
    assert traffic(p)["sink"]["lost"] == lost_before, "re-adoption loses nothing"

    # Down: everything stops, in order, and nothing is left.
    r = hotplane(inst, "down", "-p", p)
    assert r.returncode == 0, r.stderr
    assert not any(alive(pid) for pid in pids.values())
    assert list((inst.root / p / "procs").glob("*.json")) == []
    assert ctl(inst, "status").returncode == 3


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


@pytest.mark.timeout(180)
def test_control_heartbeats_notify_and_readoption_refusing_a_reused_pid(tree, tmp_path: Path) -> None:
    inst = tree
    p = inst.prefix
    cfg = _write_config(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = dict(inst.env, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    common = ["-c", str(cfg), "--pipeline", "forward", "--no-traffic", "--stats-listen", "127.0.0.1:0", "--stop-wait", "2",
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
        r = ctl(inst, "--json", "version")
        assert json.loads(r.stdout)["programs"]["worker-0"]
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

        # A hung worker (SIGSTOP: no heartbeats) is stopped (SIGKILL after --stop-wait) and restarted.
        os.kill(wpid2, signal.SIGSTOP)
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

        # SIGTERM: ordered stop, STOPPING=1, exit 0, nothing left.
        sup2.send_signal(signal.SIGTERM)
        notify.wait("STOPPING", "1", timeout=30)
        assert sup2.wait(60) == 0
        assert not any(alive(pid) for pid in (ps["primary"]["pid"], ps["worker-0"]["pid"], ps["stats"]["pid"]))
        assert impostor.poll() is None
    finally:
        notify.close()


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
