"""The stats secondary: shared-memory figures summed and served in the Prometheus text format."""

from __future__ import annotations

import json
import signal
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotplane.secondary.stats import parse_listen, snapshot, with_rates


def read_line(p, timeout: float) -> str:
    """One stdout line of ``p`` within ``timeout`` s ('' on EOF or timeout)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        return p.stdout.readline() if sel.select(timeout) else ""


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.timeout(90)
def test_exposition_of_workers_queues_drops_and_sessions(instance) -> None:
    from hotplane.schema.counters import DROP_REASONS
    from hotplane.shared.counters import CounterBlocks
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init
    from hotplane.shared.session_table import SessionTable
    from hotplane.schema.session import LAYOUT, VALUE_DTYPE

    prim = instance.spawn(["primary", *instance.eal("--no-huge", "--socket-mem", "32"), "--", "--workers", "2", "--json"])
    assert read_line(prim, 60), "primary ready"
    inst = eal_init(EalOptions(file_prefix=instance.prefix, proc_type="secondary"))
    try:
        d = inst.directory
        blocks = CounterBlocks.attach(d.lookup("counters").view)
        b = blocks.block(1)
        b.start("9.9.9", 3)
        b.count_rx(10, 640)
        b.count_forwarded(7)
        b.count_drop(DROP_REASONS.index("ttl_expired"), 3)
        # A NAT session table of worker 1 with two UDP sessions and one TCP session.
        z = d.reserve("nat.w1.sessions", SessionTable.zone_size(64), LAYOUT)
        t = SessionTable.create(z.view[: SessionTable.zone_size(64)], 64)
        vals = np.zeros(3, VALUE_DTYPE)
        vals["protocol"] = [17, 17, 6]
        t.insert_batch(np.array([1, 2, 3], np.uint64), np.array([4, 5, 6], np.uint64), vals)

        snap = snapshot(d)
        assert [w["id"] for w in snap["workers"]] == [1]
        w = snap["workers"][0]
        assert (w["rx_packets"], w["forwarded"], w["dropped"], w["version"], w["generation"]) == (10, 7, {"ttl_expired": 3}, "9.9.9", 3)
        assert {(q["port"], q["queue"]) for q in snap["queues"]} == {("in", 0), ("in", 1), ("out", 0), ("out", 1)}
        assert snap["sessions"]["by_protocol"] == {"udp": 2, "tcp": 1} and snap["sessions"]["per_worker"] == {"1": {"udp": 2, "tcp": 1}}
        b.count_rx(20, 1280)
        later = snapshot(d)
        r = with_rates(later, snap)
        assert r["workers"][0]["rx_pps"] > 0 and r["totals"]["rx_packets"] == 30 and r["totals"]["dropped"]["ttl_expired"] == 3

        st = instance.spawn(["stats", "--file-prefix", instance.prefix, "--", "--listen", "127.0.0.1:0", "--json"])
        line = read_line(st, 60)
        assert line, "stats ready line"
        ready = json.loads(line)
        assert ready["event"] == "ready" and ready["name"] == "stats"
        text = urllib.request.urlopen(ready["url"], timeout=10).read().decode()
        s = _samples(text)
        assert s[("hotplane_worker_rx_packets_total", (("worker", "1"),))] == 30
        assert s[("hotplane_worker_dropped_packets_total", (("reason", "ttl_expired"), ("worker", "1")))] == 3
        assert ("hotplane_queue_rx_frames_total", (("port", "in"), ("queue", "0"))) in s
        assert s[("hotplane_sessions", (("protocol", "udp"), ("worker", "1")))] == 2
        assert s[("hotplane_supervisor_up", ())] == 0, "no supervisor: process states are absent, not invented"
        st.send_signal(signal.SIGTERM)
        assert st.wait(30) == 0
    finally:
        inst.close()


def test_listen_address_is_checked(instance) -> None:
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("localhost:9108", "127.0.0.1", "1.2.3.4:99999"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    r = instance.run(["stats", "--file-prefix", instance.prefix, "--", "--listen", "nowhere:1"])
    assert r.returncode == 2 and "not an IP address" in r.stderr
    r = instance.run(["stats", "--file-prefix", instance.prefix])
    assert r.returncode == 1 and "no hotplane instance" in r.stderr
