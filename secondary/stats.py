"""The stats secondary: sums the shared-memory figures and serves them to Prometheus.

``hotplane stats [EAL] -- [--listen 127.0.0.1:9108] [--supervisor-socket PATH] [--json]``

It attaches to the instance like any secondary, reads (never writes) the
``counters`` zone (per-worker counter blocks), every port's queue-state zone
(``ring.<name>.state`` / ``afp.<iface>.state``: frames, kernel drops, last poll),
the ``traffic`` zone (generator and sink live figures) and, when the NAT
pipeline has created them, the per-worker session tables (``nat.w<i>.*`` zones of
the ``session_table`` layout); process states, versions and restarts come from
the supervisor's control socket. It serves them in the Prometheus text
exposition format through a custom ``prometheus_client`` collector, on loopback
by default, then reports READY.

The collection functions (:func:`snapshot`, :func:`with_rates`) are also what the
supervisor uses to answer ``supervisorctl stats`` and to print ``hotplane up``'s
live figures: one reading of the memory, one meaning of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Iterable

import numpy as np

from hotplane.schema.counters import SCALAR_COUNTERS
from hotplane.schema.registry import SchemaError
from hotplane.schema.traffic import KIND_GEN, KIND_SINK, TRAFFIC_STATS
from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit

TRAFFIC_FIELDS = ("packets", "bytes", "ring_drops", "lost", "duplicated", "reordered", "corrupted", "flows")
QUEUE_FIELDS = ("rx_frames", "tx_frames", "kernel_drops", "tx_ring_full", "rx_runt", "rx_oversized", "rx_truncated", "rx_bad_descriptor", "tx_oversized")
SESSION_SCHEMA_ID = 4
QUEUE_STATE_SCHEMA_ID = 6
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}
_NAT_ZONE = re.compile(r"^nat\.w(\d+)\.")
_IN2OUT = re.compile(r"^nat\.w\d+\.in2out(\.v\d+)?$")


# --------------------------------------------------------------------------- reading the memory


def _workers(directory) -> list[dict[str, Any]]:
    from hotplane.shared.counters import REASON_NAMES, CounterBlocks

    z = directory.lookup("counters")
    if z is None:
        return []
    blocks = CounterBlocks.attach(z.view)
    snap = blocks.snapshot()
    out = []
    for i in range(blocks.n_workers):
        rec = snap[i]
        hb = int(rec["heartbeat_ns"])
        if hb == 0 and int(rec["rx_packets"]) == 0:
            continue  # a slot no worker ever started in
        d: dict[str, Any] = {"id": i}
        for name in SCALAR_COUNTERS:
            d[name] = int(rec[name])
        drops = rec["dropped"]
        d["dropped"] = {REASON_NAMES[k]: int(v) for k, v in enumerate(drops) if int(v)}
        d["dropped_total"] = int(drops.sum(dtype=np.uint64))
        d["heartbeat_ns"] = hb
        d["generation"] = int(rec["generation"])
        d["restarts"] = int(rec["restarts"])
        d["version"] = bytes(rec["version"]).rstrip(b"\0").decode("utf-8", "replace")
        out.append(d)
    return out


def _queues(directory) -> list[dict[str, Any]]:
    from hotplane.schema.port import unpack_owner
    from hotplane.shared.burst import QueueState

    out = []
    for z in directory.list():
        if z.schema_id != QUEUE_STATE_SCHEMA_ID or not z.name.endswith(".state"):
            continue
        kind, _, rest = z.name.partition(".")
        port = rest[: -len(".state")]
        try:
            qs = QueueState.attach(z.view)
        except (SchemaError, ValueError):
            continue
        for i in range(qs.nqueues):
            c = qs.counters(i)
            pid, gen = unpack_owner(c["owner"])
            row = {"port": port, "kind": "af_packet" if kind == "afp" else kind, "queue": i, "owner_pid": pid, "owner_generation": gen,
                   "rx_cursor": c["rx_cursor"], "tx_cursor": c["tx_cursor"], "last_poll_ns": c["last_poll_ns"]}
            for f in QUEUE_FIELDS:
                row[f] = c[f]
            out.append(row)
    return out


def _traffic(directory) -> list[dict[str, Any]]:
    z = directory.lookup("traffic")
    if z is None:
        return []
    hdr = z.header(TRAFFIC_STATS)[0]
    n = int(hdr["nslots"])
    slots = z.elements(TRAFFIC_STATS, n).copy()
    out = []
    for s in slots:
        kind = int(s["kind"])
        if kind not in (KIND_GEN, KIND_SINK):
            continue
        row = {"name": bytes(s["name"]).rstrip(b"\0").decode("utf-8", "replace"), "kind": "gen" if kind == KIND_GEN else "sink",
               "pid": int(s["pid"]), "running": bool(s["running"]), "updated_ns": int(s["updated_ns"])}
        for f in TRAFFIC_FIELDS:
            row[f] = int(s[f])
        out.append(row)
    return out


def _sessions(directory) -> dict[str, Any]:
    """Sessions by worker and protocol, from the NAT session tables (if the NAT pipeline made any).

    Each worker's *live* table only, whatever its layout version: a hot upgrade that
    migrated the sessions leaves the previous version's zone beside it, unused.
    """
    from hotplane.shared.session_migrate import live_table_zone, table_class

    by_proto: dict[str, int] = {}
    per_worker: dict[int, dict[str, int]] = {}
    tables = 0
    live: dict[int, str | None] = {}
    for z in directory.list():
        m = _NAT_ZONE.match(z.name)
        if m is None or z.schema_id != SESSION_SCHEMA_ID:
            continue
        wid = int(m.group(1))
        if _IN2OUT.match(z.name):  # one zone per layout version: only the live one holds the sessions
            if wid not in live:
                lz = live_table_zone(directory, wid)
                live[wid] = lz[0].name if lz is not None else None
            if z.name != live[wid]:
                continue
        try:
            t = table_class(z.version).attach(z.view)  # a reader: no writes, no recovery
        except (SchemaError, ValueError):
            continue
        tables += 1
        used = t.entries["state"] == 1
        counts = np.bincount(t.entries["protocol"][used], minlength=256)
        w = per_worker.setdefault(wid, {})
        for proto in np.flatnonzero(counts):
            name = PROTO_NAMES.get(int(proto), str(int(proto)))
            w[name] = w.get(name, 0) + int(counts[proto])
            by_proto[name] = by_proto.get(name, 0) + int(counts[proto])
    return {"available": tables > 0, "tables": tables, "total": sum(by_proto.values()), "by_protocol": by_proto,
            "per_worker": {str(k): v for k, v in sorted(per_worker.items())}}


UPGRADE_PHASES = ("IDLE", "PREPARING", "SWAPPING", "CANARY", "SWAPPED", "COMMITTED", "REVERTING", "DONE")  # schema/upgrade.py PHASE_*
UPGRADE_RESULTS = ("committed", "rolled back", "aborted", "dry run")


def _upgrade(directory) -> dict[str, Any]:
    """Hot upgrades: the phase now, how many ran and how they ended, the last one, its swap gaps.

    The phase and the per-queue swap stamps come from the ``upgrade_control`` zone
    (written by the supervisor and the workers), the history from the supervisor's
    ``upgrade-history.jsonl`` in the runtime directory.
    """
    import json as _json

    from hotplane.shared.runtime import runtime_dir

    out: dict[str, Any] = {"phase": "IDLE", "started": 0, "results": dict.fromkeys(UPGRADE_RESULTS, 0), "last": None, "swap_gaps_us": {}}
    z = directory.lookup("upgrade_control")
    if z is not None:
        from hotplane.schema import upgrade as us

        try:
            hdr, recs = us.attach(z.view)
        except SchemaError:
            recs = None
        if recs is not None:
            h = hdr[0]
            out["phase"] = UPGRADE_PHASES[int(h["phase"])] if int(h["phase"]) < len(UPGRADE_PHASES) else str(int(h["phase"]))
            out["started"] = int(h["upgrade_seq"])
            nq = max(1, len(recs) // 2)
            for i, r in enumerate(recs):
                a, b = int(r["old_last_burst_ns"]), int(r["new_first_burst_ns"])
                if a and b >= a:
                    out["swap_gaps_us"][f"{('inside', 'outside')[i // nq] if i // nq < 2 else '?'}/{i % nq}"] = (b - a) / 1e3
    try:
        path = runtime_dir(directory.prefix) / "upgrade-history.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
    except OSError:
        lines = []
    last = None
    for line in lines:
        try:
            h = _json.loads(line)
        except ValueError:
            continue
        out["results"][h.get("result", "?")] = out["results"].get(h.get("result", "?"), 0) + 1
        last = h
    if last is not None:
        out["last"] = {k: last.get(k) for k in ("time", "result", "reason", "from", "to", "elapsed_s", "dry_run")}
    return out


def snapshot(directory) -> dict[str, Any]:
    """Every shared-memory figure, cumulative, read once (plain Python values)."""
    return {
        "mono_ns": time.monotonic_ns(),
        "workers": _workers(directory),
        "queues": _queues(directory),
        "traffic": _traffic(directory),
        "sessions": _sessions(directory),
        "upgrade": _upgrade(directory),
    }


def _rate(cur: int, prev: int | None, dt: float) -> float:
    if prev is None or dt <= 0 or cur < prev:
        return 0.0
    return (cur - prev) / dt


def with_rates(cur: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
    """``cur`` plus per-second rates against ``prev`` (an earlier :func:`snapshot`), and totals."""
    dt = (cur["mono_ns"] - prev["mono_ns"]) / 1e9 if prev else 0.0
    out = dict(cur, interval=dt)
    pw = {w["id"]: w for w in (prev or {}).get("workers", [])}
    now = cur["mono_ns"]
    workers = []
    for w in cur["workers"]:
        p = pw.get(w["id"], {})
        w = dict(w, rx_pps=_rate(w["rx_packets"], p.get("rx_packets"), dt), tx_pps=_rate(w["tx_packets"], p.get("tx_packets"), dt),
                 drop_pps=_rate(w["dropped_total"], p.get("dropped_total"), dt),
                 heartbeat_age=max(0.0, (now - w["heartbeat_ns"]) / 1e9) if w["heartbeat_ns"] else None)
        workers.append(w)
    out["workers"] = workers
    pq = {(q["port"], q["queue"]): q for q in (prev or {}).get("queues", [])}
    queues = []
    for q in cur["queues"]:
        p = pq.get((q["port"], q["queue"]), {})
        queues.append(dict(q, rx_pps=_rate(q["rx_frames"], p.get("rx_frames"), dt), tx_pps=_rate(q["tx_frames"], p.get("tx_frames"), dt),
                           poll_age=max(0.0, (now - q["last_poll_ns"]) / 1e9) if q["last_poll_ns"] else None))
    out["queues"] = queues
    pt = {t["name"]: t for t in (prev or {}).get("traffic", [])}
    out["traffic"] = [dict(t, pps=_rate(t["packets"], pt.get(t["name"], {}).get("packets"), dt)) for t in cur["traffic"]]
    drops: dict[str, int] = {}
    for w in cur["workers"]:
        for k, v in w["dropped"].items():
            drops[k] = drops.get(k, 0) + v
    out["totals"] = {
        **{name: sum(w[name] for w in cur["workers"]) for name in SCALAR_COUNTERS},
        "dropped": drops,
        "dropped_total": sum(drops.values()),
        "rx_pps": sum(w["rx_pps"] for w in workers),
        "tx_pps": sum(w["tx_pps"] for w in workers),
    }
    return out


# --------------------------------------------------------------------------- Prometheus


def supervisor_status(path: str | None, timeout: float = 1.0) -> dict[str, Any] | None:
    """The supervisor's ``status`` answer, or None if it cannot be asked right now."""
    if not path:
        return None
    from hotplane.shared.ipc import IpcError, request_sync

    try:
        return request_sync(path, "status", {}, timeout=timeout).result
    except (IpcError, OSError):
        return None


class HotplaneCollector:
    """A prometheus_client custom collector: reads the memory (and asks the supervisor) at each scrape."""

    def __init__(self, directory, supervisor_socket: str | None = None) -> None:
        self.directory = directory
        self.supervisor_socket = supervisor_socket
        self.lock = threading.Lock()  # one scrape at a time

    def describe(self) -> list:
        return []  # unchecked collector: families are known only at scrape time

    def collect_once(self) -> int:
        """One scrape's work, discarded (a hot-upgrade candidate warms up with it); returns the families."""
        return len(list(self.collect()))

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        with self.lock:
            snap = snapshot(self.directory)
            status = supervisor_status(self.supervisor_socket)
        now = snap["mono_ns"]

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"hotplane_{name}", doc, labels=labels)

        wl = ["worker"]
        fams = {n: counter(f"worker_{n}", f"{n.replace('_', ' ')} of the worker (survives restarts)", wl) for n in SCALAR_COUNTERS}
        drops = counter("worker_dropped_packets", "packets dropped by the worker, by reason", ["worker", "reason"])
        restarts = counter("worker_restarts", "times a worker started again in this slot", wl)
        hb = GaugeMetricFamily("hotplane_worker_heartbeat_age_seconds", "seconds since the worker's last heartbeat", labels=wl)
        winfo = InfoMetricFamily("hotplane_worker", "the version of the process writing the worker's counters", labels=wl)
        for w in snap["workers"]:
            lab = [str(w["id"])]
            winfo.add_metric(lab, {"version": w["version"]})
            for n in SCALAR_COUNTERS:
                fams[n].add_metric(lab, w[n])
            for reason, v in w["dropped"].items():
                drops.add_metric([lab[0], reason], v)
            restarts.add_metric(lab, w["restarts"])
            if w["heartbeat_ns"]:
                hb.add_metric(lab, max(0.0, (now - w["heartbeat_ns"]) / 1e9))
        yield from fams.values()
        yield drops
        yield restarts
        yield hb
        yield winfo
        yield from _upgrade_families(snap["upgrade"])

        ql = ["port", "queue"]
        qf = {f: counter(f"queue_{f}", f"{f.replace('_', ' ')} of the port queue", ql) for f in QUEUE_FIELDS}
        owner = GaugeMetricFamily("hotplane_queue_owner_pid", "pid of the process polling the queue (0: none)", labels=ql)
        poll = GaugeMetricFamily("hotplane_queue_last_poll_age_seconds", "seconds since the queue was last polled", labels=ql)
        for q in snap["queues"]:
            lab = [q["port"], str(q["queue"])]
            for f in QUEUE_FIELDS:
                qf[f].add_metric(lab, q[f])
            owner.add_metric(lab, q["owner_pid"])
            if q["last_poll_ns"]:
                poll.add_metric(lab, max(0.0, (now - q["last_poll_ns"]) / 1e9))
        yield from qf.values()
        yield owner
        yield poll

        tl = ["name", "kind"]
        tf = {f: counter(f"traffic_{f}", f"{f.replace('_', ' ')} counted by the generator or sink", tl) for f in TRAFFIC_FIELDS if f != "flows"}
        flows = GaugeMetricFamily("hotplane_traffic_flows", "flows of the generator or sink", labels=tl)
        for t in snap["traffic"]:
            lab = [t["name"], t["kind"]]
            for f in tf:
                tf[f].add_metric(lab, t[f])
            flows.add_metric(lab, t["flows"])
        yield from tf.values()
        yield flows

        sess = GaugeMetricFamily("hotplane_sessions", "NAT sessions in the tables, by worker and protocol", labels=["worker", "protocol"])
        for wid, protos in snap["sessions"]["per_worker"].items():
            for proto, v in protos.items():
                sess.add_metric([wid, proto], v)
        yield sess

        up = GaugeMetricFamily("hotplane_supervisor_up", "1 if the supervisor answered this scrape")
        up.add_metric([], 1 if status else 0)
        yield up
        if status:
            st = GaugeMetricFamily("hotplane_process_state", "1 for the process's current state", labels=["program", "state"])
            pr = counter("process_restarts", "restarts of the program by this supervisor", ["program"])
            info = InfoMetricFamily("hotplane_process", "program version and pid", labels=["program", "version", "pid"])
            for p in status.get("programs", []):
                st.add_metric([p["name"], p["state"]], 1)
                pr.add_metric([p["name"]], p.get("restarts", 0))
                info.add_metric([p["name"], str(p.get("version", "")), str(p.get("pid") or "")], {})
            yield st
            yield pr
            yield info


def _upgrade_families(u: dict[str, Any]) -> Iterable:
    """Prometheus families of the hot upgrades (see :func:`_upgrade`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    phase = GaugeMetricFamily("hotplane_upgrade_phase", "1 for the phase the hot upgrade is in (IDLE/DONE: none running)", labels=["phase"])
    for name in UPGRADE_PHASES:
        phase.add_metric([name], 1 if u["phase"] == name else 0)
    yield phase
    started = CounterMetricFamily("hotplane_upgrades_started", "hot upgrades started on this instance's memory")
    started.add_metric([], u["started"])
    yield started
    res = CounterMetricFamily("hotplane_upgrades", "hot upgrades by how they ended (the supervisor's history)", labels=["result"])
    for k, v in u["results"].items():
        res.add_metric([k], v)
    yield res
    last = u.get("last")
    if last:
        info = InfoMetricFamily("hotplane_upgrade_last", "the last hot upgrade: result and versions")
        info.add_metric([], {"result": str(last.get("result")), "from_version": str(last.get("from")), "to_version": str(last.get("to"))})
        yield info
        g = GaugeMetricFamily("hotplane_upgrade_last_timestamp_seconds", "when the last hot upgrade ended (unix time)")
        g.add_metric([], float(last.get("time") or 0))
        yield g
        g = GaugeMetricFamily("hotplane_upgrade_last_duration_seconds", "how long the last hot upgrade took")
        g.add_metric([], float(last.get("elapsed_s") or 0))
        yield g
    gap = GaugeMetricFamily("hotplane_upgrade_swap_gap_seconds", "per queue: old owner's last burst to new owner's first, last swap", labels=["queue"])
    for q, us_ in sorted(u["swap_gaps_us"].items()):
        gap.add_metric([q], us_ / 1e6)
    yield gap


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError says why."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: write ADDRESS:PORT, e.g. 127.0.0.1:9108")
    host = host.strip("[]") or "127.0.0.1"
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane stats", role="secondary")
    ap = argparse.ArgumentParser(prog="hotplane stats [EAL] --", description="serve the instance's figures to Prometheus")
    ap.add_argument("--listen", default="127.0.0.1:9108", help="address:port of the exposition endpoint (default 127.0.0.1:9108; port 0 picks one)")
    ap.add_argument("--supervisor-socket", help="supervisor control socket (default $HOTPLANE_SUPERVISOR_SOCKET)")
    ap.add_argument("--json", action="store_true", help="print the ready line as JSON")
    ap.add_argument("--candidate", action="store_true", help="hot-upgrade candidate: attach, validate, take the running stats "
                    "process's listener ($HOTPLANE_UPGRADE_OLD_PID), serve once told to take over")
    ap.add_argument("--dry-run", action="store_true", help="with --candidate: validate the zones, report, exit")
    try:
        app = ap.parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        host, port = parse_listen(app.listen)
    except ValueError as e:
        print(f"hotplane stats: {e}", file=sys.stderr)
        return EXIT_USAGE

    from hotplane.secondary.stats_handover import Exporter, agent_handlers, fetch_listener, listen
    from hotplane.shared.instance import InstanceError, eal_init
    from hotplane.shared.ready import SUPERVISOR_SOCKET_ENV, report_ready
    from hotplane.shared.upgrade_agent import UpgradeAgent
    from hotplane.supervisor.logs import guard_stdio

    if os.environ.get(SUPERVISOR_SOCKET_ENV):
        guard_stdio()
    unit = os.environ.get("HOTPLANE_UPGRADE_UNIT", "stats")
    report = None
    if app.candidate:
        from hotplane.secondary.worker import report_candidate, validate_zones

        report = lambda step, detail=None: report_candidate(unit, step, detail)  # noqa: E731
    try:
        inst = eal_init(opts)
    except InstanceError as e:
        print(f"hotplane stats: {e}", file=sys.stderr)
        return EXIT_FAILURE
    from prometheus_client import CollectorRegistry, make_wsgi_app

    try:
        if report is not None:
            report("attached", {"generation": inst.generation})
            zones = validate_zones(inst.directory, migrates=False)
            report("validated", {"zones": zones})
            if app.dry_run or any(v.startswith("refused") for v in zones.values()):
                inst.close()
                return EXIT_OK
            old = int(os.environ.get("HOTPLANE_UPGRADE_OLD_PID", "0"))
            if not old:
                raise OSError("no $HOTPLANE_UPGRADE_OLD_PID: a stats candidate takes its listener from the running stats process")
            sock = fetch_listener(inst.runtime_dir, old)
        else:
            sock = listen(host, port)
    except OSError as e:
        print(f"hotplane stats: cannot listen on {host}:{port}: {e.strerror or e} (pick another [stats] listen address)", file=sys.stderr)
        inst.close()
        return EXIT_FAILURE
    registry = CollectorRegistry(auto_describe=False)
    collector = HotplaneCollector(inst.directory, app.supervisor_socket or os.environ.get(SUPERVISOR_SOCKET_ENV))
    registry.register(collector)
    exporter = Exporter(sock, make_wsgi_app(registry))
    bound = exporter.address[1]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from hotplane import __version__

    agent = UpgradeAgent(inst.runtime_dir, agent_handlers(exporter, stop, lambda: {
        "pid": os.getpid(), "version": __version__, "candidate": app.candidate, "serving": exporter.serving, "listen": f"{host}:{bound}"}))
    agent.start_thread()
    try:
        if report is not None:
            collector.collect_once()  # the first scrape's imports and zone reads, before taking over
            report("warm")
            report("ready", {"control": str(agent.path), "listen": f"{host}:{bound}"})
        else:
            exporter.serve()
            report_ready("stats", {"listen": f"{host}:{bound}", "url": f"http://{host}:{bound}/metrics", "prefix": inst.prefix, "version": __version__},
                         as_json=app.json)
        while not stop.wait(3600):
            pass
    finally:
        agent.close()
        exporter.close()
        with collector.lock:
            collector.directory = None
            inst.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
