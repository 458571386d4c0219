"""``supervisorctl``: the operator's interface to a running instance's supervisor.

``supervisorctl [-p PREFIX] [--json] [--timeout S] COMMAND [args]``

==========================  =====================================================
``status [NAME...]``        state, pid, uptime, restarts and version of each program
``start NAME...|all``       start (waits until READY or failed)
``stop NAME...|all``        stop (SIGTERM, SIGKILL after the deadline; waits)
``restart NAME...|all``     stop then start
``signal SIG NAME...|all``  send a signal (HUP, USR1, 15 ...)
``pid [NAME]``              the supervisor's pid, or a program's
``tail [-f] [-n N] [NAME]`` last lines of a program's log (default: the supervisor's)
``stats [--watch]``         per-worker and per-queue rates, drops by reason, traffic,
                            sessions by protocol, process states
``sessions``                NAT sessions by protocol and worker
``version``                 versions of the supervisor and of each program
``shutdown``                stop everything and the supervisor
==========================  =====================================================

``NAME`` may end in ``*`` (``worker-*``). Data goes to stdout (``--json``: one JSON
document, or one per line for ``tail -f`` and ``stats --watch``), messages to
stderr. Exit status, as LSB init scripts have it: 0 success; 1 a command failed
(a program did not start, a signal could not be sent); 2 usage; 3 the instance is
not running (no supervisor), and for ``status``, a program is not up; 4 unknown
program, or the caller may not ask (another user: the runtime directory is 0700 and
the socket 0600, LSB's "insufficient privilege" / "status unknown"). It talks to
``<runtime>/supervisor.sock`` (0600, checked with SO_PEERCRED both ways).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from hotplane.shared.eal import DEFAULT_PREFIX, PREFIX_RE
from hotplane.shared.runtime import runtime_dir
from hotplane.supervisor.main import EXIT_NOT_RUNNING, EXIT_UNKNOWN, SOCKET_NAME, running_supervisor_pid

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    def __init__(self, code: int, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="supervisorctl", description="control a hotplane instance's supervisor",
                                 epilog="exit status: 0 ok, 1 failed, 2 usage, 3 not running, 4 unknown program or not allowed")
    ap.add_argument("-p", "--file-prefix", default=DEFAULT_PREFIX, help="instance (default hotplane)")
    ap.add_argument("--json", action="store_true", help="JSON on stdout")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for start/stop/restart (default 60)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("status", help="program states")
    p.add_argument("names", nargs="*")
    for name, text in (("start", "start programs"), ("stop", "stop programs"), ("restart", "restart programs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("names", nargs="+")
    p = sub.add_parser("signal", help="send a signal to programs")
    p.add_argument("signal")
    p.add_argument("names", nargs="+")
    p = sub.add_parser("pid", help="pid of the supervisor or of a program")
    p.add_argument("name", nargs="?")
    p = sub.add_parser("tail", help="last lines of a log")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=10)
    p.add_argument("name", nargs="?", default="supervisor")
    p = sub.add_parser("stats", help="figures")
    p.add_argument("--watch", action="store_true", help="repeat every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--count", type=int, help="with --watch: stop after this many reports")
    sub.add_parser("sessions", help="NAT sessions by protocol")
    sub.add_parser("version", help="versions")
    sub.add_parser("shutdown", help="stop everything")
    p = sub.add_parser("upgrade", help="hot upgrade: 'upgrade --to TARGET', 'upgrade status', 'upgrade history', 'upgrade commit'")
    p.add_argument("action", nargs="?", choices=("status", "history", "commit"), help="show the running/last upgrade, the history, or end the park window now")
    p.add_argument("--to", dest="target", help="another hotplane build: a checkout directory (with .venv/bin/python or using ours) or an installed version")
    p.add_argument("--dry-run", action="store_true", help="validate every zone against the target build (compatible / needs migration / refused); change nothing")
    p.add_argument("--canary", type=int, default=0, help="swap N workers first and watch their health before the rest")
    p.add_argument("--canary-window", type=float, default=5.0, help="seconds the canary is watched (default 5)")
    p.add_argument("--park-time", type=float, default=10.0, help="seconds the old processes stay parked after commit (rollback possible; default 10)")
    p.add_argument("--only", help="comma-separated unit kinds to upgrade: primary, worker, stats (default all)")
    p.add_argument("--canary-max-drops", type=int, default=0, help="drops a canary worker may add during its window (default 0)")
    p.add_argument("--canary-max-heartbeat-age", type=float, default=1.0, help="seconds a canary worker may go without a heartbeat (default 1)")
    p.add_argument("--pause-at", choices=("prepare", "attach", "validate", "migrate", "ready", "swap", "commit"), help=argparse.SUPPRESS)
    p = sub.add_parser("rollback", help="swap back to the old version while its processes are parked")
    # `supervisorctl stats --json` reads as naturally as `supervisorctl --json stats`.
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON on stdout")
    return ap


# --------------------------------------------------------------------------- talking to the supervisor


def call(prefix: str, method: str, params: dict | None = None, timeout: float = 10.0) -> Any:
    """One request to the supervisor of ``prefix``; CtlError with the LSB code on failure."""
    from hotplane.shared.ipc import IpcClosed, IpcError, IpcRefused, RemoteError, request_sync

    path = runtime_dir(prefix) / SOCKET_NAME
    try:
        pid = running_supervisor_pid(prefix)
    except PermissionError as e:
        raise CtlError(EXIT_UNKNOWN, f"instance {prefix!r}: permission denied on its runtime directory {runtime_dir(prefix)} ({e.strerror}): "
                                     "supervisorctl must run as the user that started the instance, or root", "refused") from None
    if pid is None:
        raise CtlError(EXIT_NOT_RUNNING, f"instance {prefix!r} is not running (no supervisor); start it with 'hotplane up -p {prefix}'", "not_running")
    try:
        return request_sync(str(path), method, params or {}, timeout=timeout).result
    except RemoteError as e:
        code = EXIT_UNKNOWN if e.type == "unknown_program" else EXIT_USAGE if e.type == "usage" else EXIT_FAILED
        raise CtlError(code, e.message, e.type) from None
    except IpcRefused as e:
        raise CtlError(EXIT_UNKNOWN, f"{e} (supervisorctl must run as the supervisor's user or root)", "refused") from None
    except IpcClosed as e:
        raise CtlError(EXIT_NOT_RUNNING, f"instance {prefix!r}: the supervisor is not answering ({e})", "not_running") from None
    except IpcError as e:
        raise CtlError(EXIT_FAILED, f"instance {prefix!r}: {e}", "ipc") from None


# --------------------------------------------------------------------------- text output


def _uptime(sec: float | None) -> str:
    if sec is None:
        return ""
    s = int(sec)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_status(programs: list[dict]) -> str:
    lines = []
    for p in programs:
        desc = p.get("description") or ""
        extra = []
        if p.get("restarts"):
            extra.append(f"restarts {p['restarts']}")
        if p.get("version"):
            extra.append(f"version {p['version']}")
        if p.get("adopted"):
            extra.append("adopted")
        lines.append(f"{p['name']:<16} {p['state']:<9} {desc}" + (f" ({', '.join(extra)})" if extra else ""))
    return "\n".join(lines)


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_stats(st: dict) -> str:
    from hotplane.supervisor.up import si

    out = [f"instance {st.get('prefix', '?')}" + (f"  (rates over {st['interval']:.2f}s)" if st.get("interval") else "")]
    ws = st.get("workers", [])
    if ws:
        out.append(f"\n{'worker':>6} {'rx pps':>9} {'tx pps':>9} {'rx':>12} {'forwarded':>12} {'punted':>9} {'dropped':>9} {'hb age':>7} {'restarts':>8}  version")
        for w in ws:
            out.append(f"{w['id']:>6} {si(w.get('rx_pps', 0)):>9} {si(w.get('tx_pps', 0)):>9} {w['rx_packets']:>12,} {w['forwarded']:>12,} {w['punted']:>9,} "
                       f"{w['dropped_total']:>9,} {_f(w.get('heartbeat_age'), 2):>7} {w['restarts']:>8}  {w['version']}")
    qs = st.get("queues", [])
    if qs:
        out.append(f"\n{'port':>8} {'queue':>5} {'owner':>7} {'rx pps':>9} {'tx pps':>9} {'rx frames':>12} {'tx frames':>12} {'kernel drops':>12} {'tx full':>8} {'poll age':>8}")
        for q in qs:
            out.append(f"{q['port']:>8} {q['queue']:>5} {q['owner_pid']:>7} {si(q.get('rx_pps', 0)):>9} {si(q.get('tx_pps', 0)):>9} {q['rx_frames']:>12,} "
                       f"{q['tx_frames']:>12,} {q['kernel_drops']:>12,} {q['tx_ring_full']:>8,} {_f(q.get('poll_age'), 3):>8}")
    drops = (st.get("totals") or {}).get("dropped") or {}
    nz = {k: v for k, v in drops.items() if v}
    out.append("\ndrops by reason: " + (", ".join(f"{k} {v:,}" for k, v in sorted(nz.items())) if nz else "none"))
    tr = st.get("traffic", [])
    if tr:
        out.append(f"\n{'traffic':>8} {'kind':>5} {'pps':>9} {'packets':>12} {'lost':>9} {'dup':>7} {'reord':>7} {'corrupt':>8} {'ring full':>9}")
        for t in tr:
            out.append(f"{t['name']:>8} {t['kind']:>5} {si(t.get('pps', 0)):>9} {t['packets']:>12,} {t['lost']:>9,} {t['duplicated']:>7,} {t['reordered']:>7,} "
                       f"{t['corrupted']:>8,} {t['ring_drops']:>9,}" + ("" if t["running"] else "  (finished)"))
    out.append("\n" + format_sessions(st.get("sessions") or {}))
    procs = st.get("processes", [])
    if procs:
        out.append(f"\n{'process':<16} {'state':<9} {'pid':>7} {'restarts':>8}  version")
        for p in procs:
            out.append(f"{p['name']:<16} {p['state']:<9} {p.get('pid') or '-':>7} {p.get('restarts', 0):>8}  {p.get('version') or '-'}"
                       + ("  (adopted)" if p.get("adopted") else ""))
    return "\n".join(out)


def format_sessions(s: dict) -> str:
    if not s.get("available"):
        return "sessions: none (no NAT session tables in this instance: the pipeline is not nat)"
    line = f"sessions: {s['total']:,} (" + ", ".join(f"{k} {v:,}" for k, v in sorted(s["by_protocol"].items())) + ")"
    for wid, protos in s.get("per_worker", {}).items():
        line += f"\n  worker {wid}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(protos.items()))
    return line


# --------------------------------------------------------------------------- commands


def run(a: argparse.Namespace) -> int:
    prefix = a.file_prefix
    cmd = a.command
    emit = (lambda d: print(json.dumps(d), flush=True)) if a.json else None

    if cmd == "status":
        res = call(prefix, "status", {"names": a.names} if a.names else {})
        progs = res["programs"]
        if emit:
            emit(res)
        else:
            print(format_status(progs))
        return EXIT_OK if all(p["state"] in ("RUNNING", "READY") for p in progs) else EXIT_NOT_RUNNING
    if cmd in ("start", "stop", "restart"):
        res = call(prefix, cmd, {"names": a.names, "timeout": a.timeout}, timeout=a.timeout + 10)
        failed = [r for r in res["results"] if not r["ok"]]
        if emit:
            emit(res)
        else:
            verb = {"start": "started", "stop": "stopped", "restart": "restarted"}[cmd]
            for r in res["results"]:
                if r["ok"]:
                    print(f"{r['name']}: {verb}" + (f" (pid {r['pid']})" if r.get("pid") else ""))
                else:
                    print(f"{r['name']}: ERROR: {r['state']} {r.get('description') or ''}".rstrip(), file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_OK
    if cmd == "signal":
        res = call(prefix, "signal", {"names": a.names, "signal": a.signal})
        if emit:
            emit(res)
        else:
            for r in res["results"]:
                print(f"{r['name']}: {r['message']}" + (f" (pid {r['pid']})" if r.get("pid") else ""), file=sys.stdout if r["ok"] else sys.stderr)
        return EXIT_OK if all(r["ok"] for r in res["results"]) else EXIT_FAILED
    if cmd == "pid":
        res = call(prefix, "pid", {"name": a.name} if a.name else {})
        if emit:
            emit(res)
        elif res["pid"]:
            print(res["pid"])
        if not res["pid"]:
            if not emit:
                print(f"{res['name']} is not running", file=sys.stderr)
            return EXIT_NOT_RUNNING
        return EXIT_OK
    if cmd == "tail":
        if a.lines < 0:
            raise CtlError(EXIT_USAGE, "-n must be >= 0", "usage")
        res = call(prefix, "tail", {"name": a.name, "lines": a.lines})
        if emit and not a.follow:
            emit(res)
        else:
            for line in res["lines"]:
                print(json.dumps({"name": res["name"], "line": line}) if emit else line, flush=True)
        if a.follow:
            return follow(res["path"], res["name"], emit)
        return EXIT_OK
    if cmd == "stats":
        n = 0
        while True:
            res = call(prefix, "stats")
            if emit:
                emit(res)
            else:
                print(format_stats(res), flush=True)
            n += 1
            if not a.watch or (a.count is not None and n >= a.count):
                return EXIT_OK
            if not emit:
                print("", flush=True)
            time.sleep(max(0.1, a.interval))
    if cmd == "sessions":
        res = call(prefix, "sessions")
        if emit:
            emit(res)
        else:
            print(format_sessions(res))
        return EXIT_OK
    if cmd == "version":
        res = call(prefix, "version")
        if emit:
            emit(res)
        else:
            print(f"supervisor {res['version']} (pid {res['pid']})")
            for name, v in res["programs"].items():
                print(f"{name:<16} {v}")
        return EXIT_OK
    if cmd == "upgrade" or cmd == "rollback":
        return run_upgrade(a, prefix, emit)
    if cmd == "shutdown":
        res = call(prefix, "shutdown")
        if emit:
            emit(res)
        else:
            print(f"supervisor pid {res['pid']} is shutting down instance {prefix!r} ('hotplane down -p {prefix}' waits for it)")
        return EXIT_OK
    raise CtlError(EXIT_USAGE, f"unknown command {cmd!r}", "usage")


def format_upgrade(st: dict, lines: bool = True) -> str:
    lines = list(st.get("lines") or []) if lines else []
    lines.append(f"phase {st.get('phase')}" + (f", result {st['result']}" if st.get("result") else "") + (f": {st['reason']}" if st.get("reason") else ""))
    for name, u in (st.get("units") or {}).items():
        owners = ", ".join(f"{q}={o}" for q, o in u.get("owners", {}).items())
        lines.append(f"  {name:<12} {u.get('step'):<10} {owners}")
    gaps = st.get("swap_gaps_us") or {}
    if gaps:
        lines.append("  swap gaps: " + ", ".join(f"{q} {g:.0f} us" for q, g in gaps.items()))
    return "\n".join(lines)


def run_upgrade(a: argparse.Namespace, prefix: str, emit) -> int:
    """``upgrade --to T``, ``upgrade status|history|commit``, ``rollback``."""
    if a.command == "rollback":
        res = call(prefix, "rollback", {"wait": False}, timeout=30)
        res = stream_progress(prefix, res, emit, a.timeout, until=("DONE",))
        emit(res) if emit else print(format_upgrade(res, lines=False))
        return EXIT_OK if res.get("result") in ("rolled back", "aborted") else EXIT_FAILED
    if a.action == "history":
        res = call(prefix, "upgrade_history")
        if emit:
            emit(res)
        else:
            for h in res["history"]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"]))
                print(f"{when}  {h['from']} -> {h['to']}  {h['result']}{' (dry run)' if h.get('dry_run') else ''}  {h['elapsed_s']:.2f}s  {h.get('reason') or ''}".rstrip())
        return EXIT_OK
    if a.action in ("status", "commit"):
        res = call(prefix, "upgrade_status" if a.action == "status" else "upgrade_commit")
        emit(res) if emit else print(format_upgrade(res))
        return EXIT_OK
    if not a.target:
        raise CtlError(EXIT_USAGE, "upgrade needs --to TARGET (or status / history / commit)", "usage")
    params = {"to": a.target, "dry_run": a.dry_run, "canary": a.canary, "canary_window": a.canary_window, "park_time": a.park_time,
              "max_drops": a.canary_max_drops, "max_heartbeat_age": a.canary_max_heartbeat_age, "wait": False}
    if a.only:
        params["kinds"] = [k.strip() for k in a.only.split(",") if k.strip()]
    if a.pause_at:
        params["pause_at"] = a.pause_at
    res = call(prefix, "upgrade", params, timeout=90)
    res = stream_progress(prefix, res, emit, a.timeout, until=("COMMITTED", "DONE"))
    emit(res) if emit else print(format_upgrade(res, lines=False))
    ok = res.get("result") in ("committed", "dry run") or res.get("phase") == "COMMITTED" or res.get("paused")
    return EXIT_OK if ok else EXIT_FAILED


def stream_progress(prefix: str, res: dict, emit, timeout: float, until: tuple[str, ...]) -> dict:
    """Print the upgrade's progress lines as they come (``{"line": ...}`` objects with --json) until its
    phase is one of ``until`` (or it is paused by a test hook, or ``timeout`` passed); returns the last status."""
    printed = 0
    deadline = time.monotonic() + timeout
    while True:
        lines = res.get("lines") or []
        for line in lines[printed:]:
            print(json.dumps({"line": line}) if emit else line, flush=True)
        printed = max(printed, len(lines))
        if res.get("phase") in until or res.get("paused") or time.monotonic() > deadline:
            return res
        time.sleep(0.1)
        res = call(prefix, "upgrade_status")


def follow(path: str, name: str, emit) -> int:
    """``tail -f``: print what is appended to ``path`` (across rotations) until Ctrl-C / SIGTERM."""
    from hotplane.supervisor.logs import Follower

    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    f = Follower(path, from_end=True)
    partial = b""
    try:
        while not stop:
            data = f.poll()
            if not data:
                time.sleep(0.2)
                continue
            partial += data
            *lines, partial = partial.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                print(json.dumps({"name": name, "line": line}) if emit else line, flush=True)
    finally:
        f.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if not a.command:
        ap.print_usage(sys.stderr)
        return EXIT_USAGE
    if not PREFIX_RE.match(a.file_prefix):
        print(f"supervisorctl: bad --file-prefix {a.file_prefix!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(a)
    except CtlError as e:
        print(f"supervisorctl: {e}", file=sys.stderr)
        if a.json:
            print(json.dumps({"ok": False, "error": e.kind, "message": str(e), "exit": e.code}))
        return e.code
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
