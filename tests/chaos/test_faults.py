"""Fault detection (issue 7, item 2), with real processes:

* a SIGSTOPped worker is found by its missed heartbeats and replaced. Stopped between
  passes, it is fenced (ownership generation bumped) and replaced *while still stopped*,
  and exits when resumed without touching the queues. Stopped inside a pass (its
  ownership word busy), it cannot be fenced -- it may be between any two stores of its
  burst -- so the supervisor kills it before anyone takes its queues;
* an IPC connection cut (half a frame, garbage, a client killed mid-stream) on the
  supervisor's and the primary's sockets: both carry on;
* a full log disk (the logs on a 64 KiB tmpfs): the supervisor says so clearly and
  keeps supervising;
* hugepage exhaustion at start (a hugetlbfs mount limited to 4 MiB): a clear message,
  exit 1, no traceback, nothing left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def _load(name: str):
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


u = _load("_supervisor_util")
stop_util = _load("_stop_util")
UP = ["--daemon", "--no-huge", "--socket-mem", "160", "--rate", "800", "--stats-listen", "127.0.0.1:0",
      "--heartbeat-interval", "0.2", "--heartbeat-misses", "5", "--stop-wait", "2"]


@pytest.fixture
def tree(instance):
    try:
        yield instance
    finally:
        for pid in getattr(instance, "stopped", []):
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        u.kill_prefix(instance.prefix)


def _up(inst, *extra: str) -> None:
    r = u.hotplane(inst, "up", "-p", inst.prefix, *UP, *extra)
    assert r.returncode == 0, r.stderr + r.stdout
    u.wait_for(lambda: (u.traffic(inst.prefix).get("sink") or {}).get("packets", 0) > 200, 30, "traffic at the sink")


def _queue_words(inst, worker: int):
    """The worker's queue-state words, one row per port (the caller must keep ``inst`` attached)."""
    from hotplane.shared.burst import QueueState
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init

    i = eal_init(EalOptions(file_prefix=inst.prefix, proc_type="secondary"))
    rows = [QueueState.attach(z.view).words[worker] for z in i.directory.list() if z.schema_id == 6 and z.name.endswith(".state")]
    return i, rows


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


@pytest.mark.timeout(120)
def test_a_stopped_worker_is_found_by_missed_heartbeats_and_replaced(tree) -> None:
    from hotplane.schema.port import W_OWNER, unpack_owner

    inst, p = tree, tree.prefix
    _up(inst)
    old = u.programs(p)["worker-0"]["pid"]
    mem, words = _queue_words(inst, 0)
    try:
        os.kill(old, signal.SIGSTOP)
        inst.stopped = [old]
        new = u.wait_for(lambda: u.up_again(p, "worker-0", old), 30, "the hung worker to be replaced")
        assert all(unpack_owner(int(w[W_OWNER]))[0] == new["pid"] for w in words), "the replacement owns both queues"
        log = "\n".join(u.call(p, "tail", {"name": "supervisor", "lines": 60})["lines"])
        assert "last heartbeat" in log and "it hangs" in log, log
        n0 = u.traffic(p)["sink"]["packets"]
        u.wait_for(lambda: u.traffic(p)["sink"]["packets"] > n0 + 400, 30, "traffic after the replacement")
        s = u.traffic(p)["sink"]
        assert s["duplicated"] == 0 and s["corrupted"] == 0, s
    finally:
        mem.close()


@pytest.mark.timeout(120)
def test_a_stopped_worker_is_fenced_and_replaced_while_still_stopped(tree) -> None:
    from hotplane.schema.port import W_OWNER, unpack_owner

    inst, p = tree, tree.prefix
    _up(inst, "--stop-wait", "20")  # a long stop deadline: only fencing can replace it in time
    old = u.programs(p)["worker-0"]["pid"]
    mem, words = _queue_words(inst, 0)
    try:
        inst.stopped = [old]
        assert stop_util.stop_when(old, words, want_busy=False), "never caught the worker between passes"
        taken = u.wait_for(lambda: all(unpack_owner(int(w[W_OWNER]))[0] not in (0, old) for w in words), 10, "the queues fenced and taken")
        assert taken and _stopped(old), "replaced while the hung worker is still stopped"
        os.kill(old, signal.SIGCONT)
        u.wait_for(lambda: not u_alive(old), 10, "the resumed, fenced worker to exit")
        assert all(unpack_owner(int(w[W_OWNER]))[0] != old for w in words)
    finally:
        mem.close()


@pytest.mark.timeout(120)
def test_a_worker_hung_inside_a_pass_is_killed_before_its_queues_move(tree) -> None:
    from hotplane.schema.port import W_OWNER, unpack_owner

    inst, p = tree, tree.prefix
    _up(inst, "--stop-wait", "20")  # a long stop deadline: the kill must not wait for it
    old = u.programs(p)["worker-0"]["pid"]
    mem, words = _queue_words(inst, 0)
    try:
        inst.stopped = [old]
        assert stop_util.stop_when(old, words, want_busy=True), "never caught the worker inside a pass"
        seen_alive_with_new_owner = []

        def replaced():
            owners = [unpack_owner(int(w[W_OWNER]))[0] for w in words]
            if all(o not in (0, old) for o in owners):
                seen_alive_with_new_owner.append(u_alive(old))
                return True
            return False

        assert u.wait_for(replaced, 15, "the hung worker's queues taken by a successor")
        assert seen_alive_with_new_owner == [False], "a successor owned the queues while the worker stopped mid-pass still lived"
        log = "\n".join(u.call(p, "tail", {"name": "supervisor", "lines": 80})["lines"])
        assert "inside a pass" in log and "killing it now" in log, log
        n0 = u.traffic(p)["sink"]["packets"]
        u.wait_for(lambda: u.traffic(p)["sink"]["packets"] > n0 + 400, 30, "traffic after the replacement")
        assert u.traffic(p)["sink"]["corrupted"] == 0
    finally:
        mem.close()


def u_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.timeout(120)
def test_a_fenced_worker_resumed_exits_without_touching_its_queues(tree) -> None:
    """What the supervisor should do, done by hand: fence the stopped worker's queues for a designated
    successor (here a placeholder process of the instance, so no replacement can claim them), resume it."""
    from hotplane.schema.port import W_LAST_POLL_NS, W_OWNER, W_RX_CURSOR, pack_owner, unpack_owner

    inst, p = tree, tree.prefix
    _up(inst)
    old = u.programs(p)["worker-0"]["pid"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "hotplane", p])  # a live 'hotplane' process of this prefix
    inst.procs.append(holder)
    mem, words = _queue_words(inst, 0)
    try:
        inst.stopped = [old]
        assert stop_util.stop_when(old, words, want_busy=False), "never caught the worker between passes"
        for w in words:
            _, gen = unpack_owner(int(w[W_OWNER]))
            w[W_OWNER] = pack_owner(holder.pid, (gen + 1) & 0xFFFFFFFF)
        snap = [(int(w[W_OWNER]), int(w[W_RX_CURSOR]), int(w[W_LAST_POLL_NS])) for w in words]
        os.kill(old, signal.SIGCONT)
        u.wait_for(lambda: not u_alive(old), 20, "the resumed worker to exit")
        assert [(int(w[W_OWNER]), int(w[W_RX_CURSOR]), int(w[W_LAST_POLL_NS])) for w in words] == snap, (
            "the resumed, fenced worker touched its queues (last_poll_ns / rx_cursor moved)")
        log = (inst.root / p / "logs" / "worker-0.log").read_text()
        assert "queue ownership taken by another process: stopping without touching the queues" in log
        # The designated successor steps aside: the supervisor's next worker-0 claims the queues and traffic flows.
        holder.kill()
        holder.wait(10)
        for w in words:
            w[W_OWNER] = pack_owner(0, unpack_owner(int(w[W_OWNER]))[1])
        new = u.wait_for(lambda: u.up_again(p, "worker-0", old), 40, "worker-0 back")
        u.wait_for(lambda: all(unpack_owner(int(w[W_OWNER]))[0] == new["pid"] for w in words), 10, "queues claimed by the new worker-0")
    finally:
        mem.close()


def _garbage(path: Path) -> None:
    """Cut connections every way a broken peer can: connect+close, half a frame, garbage, an absurd length."""
    for payload in (b"", b"\x00\x00", b"\x00\x00\x00\x40" + b"\x93" * 10, os.urandom(512), b"\xff\xff\xff\xff" + b"x" * 64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(path))
        if payload:
            try:
                s.sendall(payload)
            except OSError:
                pass
        s.close()
    # And a connection left half-open while others work, then reset.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.sendall(b"\x00\x00\x00\x10")
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


@pytest.mark.timeout(120)
def test_ipc_connections_cut_leave_supervisor_and_primary_running(tree) -> None:
    inst, p = tree, tree.prefix
    _up(inst)
    before = {n: x["pid"] for n, x in u.programs(p).items()}
    sup = u.call(p, "pid")["pid"]
    rundir = inst.root / p
    for sock in (rundir / "supervisor.sock", rundir / "primary.sock"):
        assert sock.exists(), sock
        _garbage(sock)
    # A client killed in the middle of a stream of answers.
    watch = subprocess.Popen([sys.executable, "-m", "hotplane.supervisor.ctl", "-p", p, "stats", "--watch", "--interval", "0.1"],
                             env=inst.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    inst.procs.append(watch)
    watch.stdout.readline()
    watch.kill()
    watch.wait(10)
    assert u.call(p, "pid")["pid"] == sup
    assert {n: x["pid"] for n, x in u.programs(p).items()} == before, "nothing died"
    # The primary still answers its clients: a restarted worker asks it for the config.
    old = before["worker-1"]
    u.sigkill(old)
    u.wait_for(lambda: u.up_again(p, "worker-1", old), 30, "worker-1 back (it asks the primary for its config)")
    r = u.ctl(inst, "status")
    assert r.returncode == 0, r.stderr
    s = u.traffic(p)["sink"]
    assert s["corrupted"] == 0 and s["duplicated"] == 0


@pytest.mark.timeout(150)
def test_a_full_log_disk_is_reported_and_supervision_goes_on(tree, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    inst, p = tree, tree.prefix
    logs = tmp_path / "logs"
    logs.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(logs)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    err = tmp_path / "sup.err"
    sup = None
    try:
        cfg = tmp_path / "one.toml"
        cfg.write_text(u.ONE_WORKER_TOML.format(workers=1))
        sup = subprocess.Popen([sys.executable, "-m", "hotplane.supervisor.cli", "supervisor", "--file-prefix", p, "--no-huge", "--socket-mem", "64", "--",
                                "-c", str(cfg), "--pipeline", "forward", "--no-traffic", "--stats-listen", "127.0.0.1:0", "--stop-wait", "2",
                                "--log-dir", str(logs)], env=inst.env, stdout=subprocess.DEVNULL, stderr=open(err, "w"))
        inst.procs.append(sup)
        u.wait_for(lambda: u.all_up(p), 60, "the instance up")
        # Fill the disk to the last byte.
        fd = os.open(logs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        old = u.programs(p)["worker-0"]["pid"]
        # Log lines until the last partly used tmpfs page of each log is full too: stop/start cycles
        # (operator requests: no restart budget used), bounded.
        for _ in range(60):
            if "log disk problem" in err.read_text():
                break
            assert u.ctl(inst, "restart", "stats").returncode == 0
        assert "log disk problem" in err.read_text(), f"no message about the full disk on the supervisor's stderr: {err.read_text()[-2000:]}"
        u.sigkill(old)
        u.wait_for(lambda: u.up_again(p, "worker-0", old), 30, "worker-0 back with a full log disk")
        text = err.read_text()
        assert "No space left on device" in text and "keeps running" in text, text[-2000:]
        assert "Traceback" not in text, text[-3000:]
        assert sup.poll() is None and u.programs(p)["worker-0"]["pid"] != old
        # Space returns: logging resumes and says what was dropped.
        (logs / "filler").unlink()
        u.sigkill(u.programs(p)["worker-0"]["pid"])
        u.wait_for(lambda: "writable again" in err.read_text(), 30, "the all-clear")
    finally:
        if sup is not None and sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(30)
            except subprocess.TimeoutExpired:
                sup.kill()
        u.kill_prefix(p)
        subprocess.run(["umount", "-l", str(logs)], capture_output=True)


@pytest.mark.timeout(120)
def test_hugepage_exhaustion_at_start_is_a_clear_message(instance, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount hugetlbfs")
    mnt = tmp_path / "huge"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "size=4M", "nodev", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount hugetlbfs: {r.stderr.strip()}")
    try:
        # 4 MiB (two 2 MiB pages) for a 64 MiB instance: the pages run out at start, whatever the system has free.
        r = u.hotplane(instance, "up", "-p", instance.prefix, "--daemon", "--huge-dir", str(mnt), "--socket-mem", "64",
                       "--rate", "100", "--stats-listen", "127.0.0.1:0", timeout=90)
        out = r.stdout + r.stderr
        assert r.returncode == 1, out
        assert "primary could not be started" in out and "hugepages" in out and "--socket-mem" in out, out
        assert "Traceback" not in out, out
        assert not u.kill_prefix(instance.prefix), "nothing of the instance is left running"
        assert list(mnt.iterdir()) == [], "no hugepage file left behind"
    finally:
        u.kill_prefix(instance.prefix)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
