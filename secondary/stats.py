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
    """Sessions by worker and protocol, from the NAT session tables (if the NAT pipeline made any)."""
    from hotplane.shared.session_table import SessionTable

    by_proto: dict[str, int] = {}
    per_worker: dict[int, dict[str, int]] = {}
    tables = 0
    for z in directory.list():
        m = _NAT_ZONE.match(z.name)
        if m is None or z.schema_id != SESSION_SCHEMA_ID:
            continue
        try:
            t = SessionTable.attach(z.view)  # a reader: no writes, no recovery
        except (SchemaError, ValueError):
            continue
        tables += 1
        used = t.entries["state"] == 1
        counts = np.bincount(t.entries["protocol"][used], minlength=256)
        w = per_worker.setdefault(int(m.group(1)), {})
        for proto in np.flatnonzero(counts):
            name = PROTO_NAMES.get(int(proto), str(int(proto)))
            w[name] = w.get(name, 0) + int(counts[proto])
            by_proto[name] = by_proto.get(name, 0) + int(counts[proto])
    return {"available": tables > 0, "tables": tables, "total": sum(by_proto.values()), "by_protocol": by_proto,
            "per_worker": {str(k): v for k, v in sorted(per_worker.items())}}


def snapshot(directory) -> dict[str, Any]:
    """Every shared-memory figure, cumulative, read once (plain Python values)."""
    return {
        "mono_ns": time.monotonic_ns(),
        "workers": _workers(directory),
        "queues": _queues(directory),
        "traffic": _traffic(directory),
        "sessions": _sessions(directory),
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
        for w in snap["workers"]:
            lab = [str(w["id"])]
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
    try:
        app = ap.parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        host, port = parse_listen(app.listen)
    except ValueError as e:
        print(f"hotplane stats: {e}", file=sys.stderr)
        return EXIT_USAGE

    from hotplane.shared.instance import InstanceError, eal_init
    from hotplane.shared.ready import SUPERVISOR_SOCKET_ENV, report_ready
    from hotplane.supervisor.logs import guard_stdio

    if os.environ.get(SUPERVISOR_SOCKET_ENV):
        guard_stdio()
    try:
        inst = eal_init(opts)
    except InstanceError as e:
        print(f"hotplane stats: {e}", file=sys.stderr)
        return EXIT_FAILURE
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    collector = HotplaneCollector(inst.directory, app.supervisor_socket or os.environ.get(SUPERVISOR_SOCKET_ENV))
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        print(f"hotplane stats: cannot listen on {host}:{port}: {e.strerror or e} (pick another [stats] listen address)", file=sys.stderr)
        inst.close()
        return EXIT_FAILURE
    bound = server.server_address[1]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    report_ready("stats", {"listen": f"{host}:{bound}", "url": f"http://{host}:{bound}/metrics", "prefix": inst.prefix}, as_json=app.json)
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.shutdown()
        server.server_close()
        with collector.lock:
            collector.directory = None
            inst.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
