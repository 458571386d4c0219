"""``hotplane down``: stop an instance cleanly and wait until it has stopped.

``hotplane down [-p PREFIX] [-c CONFIG] [--timeout S] [--json] [--systemd]``

With a running supervisor: asks it to shut down (it stops the secondaries, then
the primary, each SIGTERM then SIGKILL after its deadline) and waits for the
supervisor process itself to exit (through a pidfd opened before asking).

Without one (it was SIGKILLed and not restarted) the programs it left running are
found through their identity records and stopped here, in the same order: a
record whose pid now belongs to another process is ignored, never signalled.

``--systemd`` is for ``ExecStop=`` of deploy/hotplane.service, where systemd runs the
stop command both for ``systemctl stop`` and after the main process (the supervisor)
died. systemd passes ``$MAINPID`` only while the main process lives: with it, this is
an ordinary stop; without it (or naming a process that is gone) the supervisor
crashed, ``Restart=`` is about to start a new one that re-adopts the running tree,
so nothing is stopped (the supervisor's death stops nothing, also under systemd).

Exit status: 0 stopped (or nothing was running, or nothing to do for ``--systemd``),
1 something did not stop in time.
The instance memory is kept (a later ``hotplane up`` re-attaches its sessions);
``hotplane cleanup`` removes it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time

from hotplane.shared.eal import DEFAULT_PREFIX, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, PREFIX_RE
from hotplane.shared.runtime import runtime_dir
from hotplane.supervisor import launcher
from hotplane.supervisor.main import SOCKET_NAME, running_supervisor_pid

# Reverse start order for the supervisor-less stop: traffic first, the primary last.
ORDER = ("gen", "sink", "stats", "standby", "worker", "primary")


def _rank(name: str) -> int:
    for i, k in enumerate(ORDER):
        if name == k or name.startswith(k + "-"):
            return i
    return 0


def wait_pidfd(fd: int, timeout: float) -> bool:
    """True once the process behind ``fd`` has exited, False after ``timeout`` seconds."""
    r, _, _ = select.select([fd], [], [], max(0.0, timeout))
    return bool(r)


def stop_orphans(prefix: str, timeout: float, say) -> tuple[list[str], list[str]]:
    """Stop the programs a dead supervisor left running: (stopped, still running)."""
    rdir = runtime_dir(prefix)
    recs = launcher.load_records(rdir)
    stopped, left = [], []
    for rank in range(len(ORDER)):
        group = []
        for name, rec in sorted(recs.items()):
            if _rank(name) != rank:
                continue
            child, why = launcher.adopt(rec)
            if child is None:
                say(f"{name}: not stopping pid {rec.pid}: {why}")
                launcher.remove_record(rdir, name)
                continue
            child.send_signal(signal.SIGTERM)
            group.append((name, child))
        deadline = time.monotonic() + timeout
        for name, child in group:
            if not wait_pidfd(child.pidfd, deadline - time.monotonic()):
                say(f"{name}: pid {child.pid} ignored SIGTERM for {timeout:g}s: SIGKILL")
                child.send_signal(signal.SIGKILL)
                if not wait_pidfd(child.pidfd, 10):
                    left.append(name)
                    child.close()
                    continue
            stopped.append(name)
            launcher.remove_record(rdir, name)
            child.close()
    return stopped, left


def main_process_alive(environ=None) -> tuple[bool, str]:
    """For ``--systemd``: is systemd's main process (``$MAINPID``) alive? (alive, what was found)."""
    env = os.environ if environ is None else environ
    text = env.get("MAINPID", "").strip()
    if not text:
        return False, "systemd passed no $MAINPID: the main process (the supervisor) is gone"
    if not text.isdigit() or int(text) <= 0:
        return False, f"$MAINPID={text!r} is not a pid"
    try:
        fd = os.pidfd_open(int(text))
    except ProcessLookupError:
        return False, f"the main process pid {text} ($MAINPID) has exited"
    except OSError as e:
        return False, f"cannot watch $MAINPID {text}: {e.strerror or e}"
    try:
        gone = wait_pidfd(fd, 0)
    finally:
        os.close(fd)
    if gone:
        return False, f"the main process pid {text} ($MAINPID) has exited"
    return True, f"the main process pid {text} is running"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane down", description="stop an instance cleanly")
    ap.add_argument("-p", "--file-prefix", default=DEFAULT_PREFIX)
    ap.add_argument("-c", "--config", help="accepted for symmetry with 'hotplane up' (checked, not needed)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the stop (default 120)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--systemd", action="store_true",
                    help="ExecStop= mode: stop only while systemd's $MAINPID (the supervisor) runs; after its crash leave the tree to its successor")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if not PREFIX_RE.match(a.file_prefix):
        print(f"hotplane down: bad --file-prefix {a.file_prefix!r}", file=sys.stderr)
        return EXIT_USAGE
    if a.config:
        from hotplane.shared.nat_config import ConfigError, load_config

        try:
            load_config(a.config)
        except ConfigError as e:
            print(f"hotplane down: {e}", file=sys.stderr)
            return EXIT_USAGE
    prefix = a.file_prefix
    msgs: list[str] = []

    def say(m: str) -> None:
        msgs.append(m)
        if not a.json:
            print(f"hotplane down: {m}", file=sys.stderr)

    result = {"prefix": prefix, "supervisor": None, "stopped": [], "left": []}
    if a.systemd:
        alive, why = main_process_alive()
        if not alive:
            say(f"{why}; Restart= starts a new supervisor, which re-adopts the running programs of {prefix!r}: nothing stopped")
            result["skipped"] = why
            _emit(a, result, msgs)
            return EXIT_OK
    pid = running_supervisor_pid(prefix)
    if pid is not None and pid > 0:
        from hotplane.shared.ipc import IpcError, request_sync

        result["supervisor"] = pid
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        try:
            if fd is not None:
                try:
                    request_sync(str(runtime_dir(prefix) / SOCKET_NAME), "shutdown", {}, timeout=10)
                except IpcError as e:
                    say(f"asking supervisor pid {pid} to shut down failed ({e}); sending it SIGTERM")
                    signal.pidfd_send_signal(fd, signal.SIGTERM)
                say(f"supervisor pid {pid} is stopping instance {prefix!r} ...")
                if not wait_pidfd(fd, a.timeout):
                    say(f"supervisor pid {pid} still running after {a.timeout:g}s; see 'supervisorctl -p {prefix} status'")
                    result["left"] = ["supervisor"]
                    _emit(a, result, msgs)
                    return EXIT_FAILURE
        finally:
            if fd is not None:
                os.close(fd)
    # Whatever is still recorded (no supervisor, or it died while stopping) is stopped here.
    stopped, left = stop_orphans(prefix, min(30.0, a.timeout), say)
    result["stopped"], result["left"] = stopped, left
    if pid is None and not stopped and not left:
        say(f"instance {prefix!r} is not running")
    elif left:
        say(f"could not stop {', '.join(left)}")
    elif pid is None:
        say(f"no supervisor was running; stopped {', '.join(stopped)}")
    else:
        say(f"instance {prefix!r} stopped")
    _emit(a, result, msgs)
    return EXIT_FAILURE if left else EXIT_OK


def _emit(a, result: dict, msgs: list[str]) -> None:
    if a.json:
        print(json.dumps(dict(result, messages=msgs)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
