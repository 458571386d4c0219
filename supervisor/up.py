"""``hotplane up``: start an instance under its supervisor and show it working.

``hotplane up [-c CONFIG] [-p PREFIX] [--daemon] [--no-huge] [--socket-mem MB] [supervisor options]``

Without ``-c`` it runs the embedded default configuration: two ring ports, two
workers, the traffic generator feeding ``ring:in`` and the verifying sink reading
``ring:out``, so a fresh machine shows live traffic at once (``--hot-standby`` adds a
parked standby per worker, promoted when its worker dies). In the foreground
(the default) this process *is* the supervisor: it prints the figures every second
(per-worker and per-queue packet rates, the sink's received / lost / duplicated /
reordered / corrupted, sessions, each process's state) until Ctrl-C or SIGTERM,
then stops everything in order. ``--daemon`` detaches the supervisor and returns
once every program has reported READY (exit 0), or with the reason it could not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from hotplane.shared.eal import DEFAULT_PREFIX, EXIT_USAGE, EalOptions, UsageError, validate
from hotplane.supervisor import main as supmain


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hotplane up", description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--file-prefix", default=DEFAULT_PREFIX, help="instance name (default hotplane)")
    ap.add_argument("--no-huge", action="store_true", help="4 KiB shared memory instead of hugepages")
    ap.add_argument("--socket-mem", type=int, help="shared memory size in MiB (default 256)")
    ap.add_argument("--huge-dir", help="hugetlbfs mount to use")
    supmain.add_app_options(ap)
    return ap


def supervisor_args(app: argparse.Namespace) -> list[str]:
    """The supervisor's own options reproducing ``app`` (for the detached copy)."""
    out: list[str] = []
    if app.config:
        out += ["-c", str(Path(app.config).resolve())]
    if app.pipeline:
        out += ["--pipeline", app.pipeline]
    if app.traffic is not None:
        out.append("--traffic" if app.traffic else "--no-traffic")
    out += ["--rate", str(app.rate), "--flows", str(app.flows)]
    if app.stats_listen:
        out += ["--stats-listen", app.stats_listen]
    if app.hot_standby is not None:
        out.append("--hot-standby" if app.hot_standby else "--no-hot-standby")
    out += ["--heartbeat-interval", repr(app.heartbeat_interval), "--heartbeat-misses", str(app.heartbeat_misses), "--stop-wait", repr(app.stop_wait)]
    if app.log_dir:
        out += ["--log-dir", str(Path(app.log_dir).resolve())]
    return out


# --------------------------------------------------------------------------- live figures


def si(x: float) -> str:
    """3 significant-ish digits with k/M: 95.2k."""
    x = float(x)
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def format_live(stats: dict[str, Any] | None, programs: list[dict[str, Any]], elapsed: float) -> str:
    """One line of live figures (what ``hotplane up`` prints every second)."""
    t = time.strftime("%H:%M:%S")
    parts = [f"{t} +{int(elapsed)}s"]
    if stats:
        for tr in stats.get("traffic", []):
            if tr["kind"] == "gen" and tr["running"]:
                parts.append(f"gen {si(tr['pps'])}pps sent {tr['packets']:,}" + (f" ring-full {tr['ring_drops']:,}" if tr["ring_drops"] else ""))
        ws = stats.get("workers", [])
        if ws:
            parts.append("workers " + " ".join(f"w{w['id']} {si(w['rx_pps'])}" for w in ws) + "pps")
        qs = stats.get("queues", [])
        if qs:
            by_port: dict[str, list[dict]] = {}
            for q in qs:
                by_port.setdefault(q["port"], []).append(q)
            parts.append("queues " + " ".join(
                f"{port} rx {'/'.join(si(q['rx_pps']) for q in v)} tx {'/'.join(si(q['tx_pps']) for q in v)}" for port, v in by_port.items()))
        drops = stats.get("totals", {}).get("dropped_total", 0)
        parts.append(f"drops {drops:,}")
        for tr in stats.get("traffic", []):
            if tr["kind"] == "sink" and tr["running"]:
                parts.append(f"sink {si(tr['pps'])}pps recv {tr['packets']:,} lost {tr['lost']:,} dup {tr['duplicated']:,} "
                             f"reord {tr['reordered']:,} corrupt {tr['corrupted']:,}")
        sess = stats.get("sessions") or {}
        if sess.get("available"):
            parts.append(f"sessions {sess['total']:,} (" + " ".join(f"{k} {v:,}" for k, v in sorted(sess["by_protocol"].items())) + ")")
        else:
            parts.append("sessions -")
    else:
        parts.append("(waiting for the primary)")
    wanted = [p for p in programs if p["wanted"]]
    down = [f"{p['name']} {p['state']}" for p in wanted if p["state"] not in ("READY", "RUNNING")]
    parts.append(f"{len(wanted) - len(down)}/{len(wanted)} up" + (f" [{', '.join(down)}]" if down else ""))
    return " | ".join(parts)


def main(argv: list[str]) -> int:
    ap = parser()
    try:
        app = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    opts = EalOptions(file_prefix=app.file_prefix, proc_type="auto", huge_dir=app.huge_dir, socket_mem_mb=app.socket_mem, no_huge=app.no_huge)
    try:
        validate(opts)
    except UsageError as e:
        print(f"hotplane up: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if app.socket_mem is not None and app.socket_mem <= 0:
        print("hotplane up: error: --socket-mem must be a positive number of MiB", file=sys.stderr)
        return EXIT_USAGE
    live = app.live if app.live is not None else not os.environ.get("NOTIFY_SOCKET")
    t0 = time.monotonic()

    def tick(sup: "supmain.Supervisor") -> None:
        nonlocal live
        if not live or sup.shutting_down:
            return
        try:
            print(format_live(sup.stats, sup.status()["programs"], time.monotonic() - t0), flush=True)
        except OSError:  # stdout went away (closed terminal or pipe): keep supervising, stop printing
            live = False

    return supmain.start(opts, app, supervisor_args(app), prog="hotplane up", on_tick=tick)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
