"""hotplane gen / hotplane sink: exact accounting on ring ports (through a real worker and
with injected faults) and on af_packet ports (a veth pair between two throwaway netns).

Every process is started with a bounded timeout and killed at teardown; namespaces are
deleted even when a test fails. Addresses: inside 100.64.0.0/10, outside 198.18.0.0/15 only.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CLI = [sys.executable, "-m", "hotplane.supervisor.cli"]
PRIMARY_MEM = ("--no-huge", "--socket-mem", "64")


# --- helpers ----------------------------------------------------------------------------------


def wait_stream_line(stream, pred, timeout: float) -> str:
    """The first line of ``stream`` satisfying ``pred`` within ``timeout`` s ('' if none)."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return ""
            line = stream.readline()
            if not line:
                return ""
            if pred(line):
                return line
    finally:
        sel.close()


def start_primary(env, workers: int):
    p = env.spawn(["primary", *env.eal(*PRIMARY_MEM), "--", "--workers", str(workers), "--json"])
    line = wait_stream_line(p.stdout, lambda s: s.startswith("{"), 30)
    if not line:
        p.kill()
        raise AssertionError(f"primary did not become ready: {p.communicate(timeout=10)[1]}")
    return p


def start_worker(env, wid: int):
    p = env.spawn(["worker", *env.eal(), "--", "--id", str(wid), "--json"])
    line = wait_stream_line(p.stdout, lambda s: "ready" in s.lower(), 30)
    if not line:
        p.kill()
        raise AssertionError(f"worker {wid} did not become ready: {p.communicate(timeout=10)[1]}")
    return p


def start_sink(env, args: list[str], prefix_cmd: list[str] | None = None, env_vars=None):
    """Start a sink and wait for its 'ready' line (its port is open: sending may start)."""
    cmd = [*(prefix_cmd or []), *CLI, "sink", *args]
    p = subprocess.Popen(cmd, env=env_vars if env_vars is not None else env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if env is not None:
        env.procs.append(p)
    if not wait_stream_line(p.stderr, lambda s: s.startswith("sink: ready"), 30):
        p.kill()
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"sink did not become ready (rc={p.returncode}): {err}")
    return p


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"process did not stop by itself within {timeout} s: {err[-2000:]}")
    return p.returncode, out, err


def json_out(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON in output: {out!r}"
    return json.loads(lines[-1])


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def attach(prefix: str):
    """Attach this test process to the instance as a secondary (the env var names the runtime dir)."""
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init

    return eal_init(parse_eal(["--file-prefix", prefix], role="secondary"))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", ["gen", "sink"])
def test_bad_input_clear_message_and_exit_code(instance, tool):
    r = instance.run([tool, *instance.eal(), "--"], timeout=30)
    assert r.returncode == 2 and "--port is required" in r.stderr
    r = instance.run([tool, *instance.eal(), "--", "--port", "bogus:x"], timeout=30)
    assert r.returncode == 2 and "unknown port type" in r.stderr
    r = instance.run([tool, *instance.eal(), "--", "--port", "ring:in,queues=0"], timeout=30)
    assert r.returncode == 2 and "queues=0" in r.stderr
    # pcap: is a port of both (gen writes the file, sink reads it): a file that cannot be used is a failure, said clearly.
    r = instance.run([tool, "--", "--port", "pcap:/nonexistent-hotplane-dir/x.pcap", "--duration", "1"], timeout=30)
    assert r.returncode == 1 and "/nonexistent-hotplane-dir" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = instance.run([tool, *instance.eal(), "--", "--port", "ring:in", "--duration", "-1"], timeout=30)
    assert r.returncode == 2 and "--duration" in r.stderr
    # No instance with this prefix: a secondary cannot attach, and says what to do.
    r = instance.run([tool, *instance.eal(), "--", "--port", "ring:in", "--duration", "1"], timeout=30)
    assert r.returncode == 1 and "start its primary first" in r.stderr


@pytest.mark.timeout(60)
def test_gen_rejects_bad_flow_options(instance):
    r = instance.run(["gen", "--", "--port", "ring:in", "--src", "not-an-ip"], timeout=30)
    assert r.returncode == 2 and "--src" in r.stderr
    r = instance.run(["gen", "--", "--port", "ring:in", "--dst-mac", "zz:00"], timeout=30)
    assert r.returncode == 2 and "MAC" in r.stderr


@pytest.mark.timeout(60)
def test_missing_ring_port_named(instance):
    start_primary(instance, 1)
    for tool in ("gen", "sink"):
        r = instance.run([tool, *instance.eal(), "--", "--port", "ring:nosuch", "--duration", "1"], timeout=30)
        assert r.returncode == 1, r.stderr
        assert "no ring port 'nosuch'" in r.stderr and "in" in r.stderr


# --- ring mode through a worker ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ring_clean_run_through_workers_exact(instance, tmp_path):
    """gen -> ring:in -> 2 workers (forward pipeline) -> ring:out -> sink: every packet, exact per flow."""
    start_primary(instance, 2)
    workers = [start_worker(instance, i) for i in range(2)]
    rep = tmp_path / "gen.json"
    sink = start_sink(instance, [*instance.eal(), "--", "--port", "ring:out", "--idle-exit", "1", "--duration", "60",
                                 "--expect", str(rep), "--json", "--name", "tsink"])
    g = instance.run(["gen", *instance.eal(), "--", "--port", "ring:in", "--flows", "16", "--src-hosts", "4", "--count", "4000",
                      "--rate", "20000", "--no-drop", "--report", str(rep), "--json", "--name", "tgen"], timeout=60)
    assert g.returncode == 0, g.stderr
    gdoc = json_out(g.stdout)
    assert gdoc["generated"] == gdoc["sent"] == 4000 and gdoc["ring_drops"] == 0
    assert gdoc["per_flow_sent"] == [250] * 16
    rc, out, err = finish(sink, 60)
    doc = json_out(out)
    assert rc == 0, (doc["problems"], err[-1000:])
    assert doc["exact_loss"] and doc["expected"] == 4000 and doc["received"] == 4000
    assert doc["lost"] == doc["duplicated"] == doc["corrupted"] == doc["reordered"] == 0
    assert [f["received"] for f in doc["flows"]] == [250] * 16
    # Both queues carried traffic: the generator steered by the port's inside steering.
    inst = attach(instance.prefix)
    try:
        from hotplane.schema.port import QUEUE_STATE, W_RX_FRAMES
        from hotplane.schema.traffic import KIND_GEN, KIND_SINK, TRAFFIC_STATS
        from hotplane.shared.burst import QueueState

        st = QueueState.attach(inst.directory.lookup_checked("ring.in.state", QUEUE_STATE).view)
        per_q = [int(st.words[i][W_RX_FRAMES]) for i in range(2)]
        assert sum(per_q) == 4000 and min(per_q) > 0, per_q
        z = inst.directory.lookup_checked("traffic", TRAFFIC_STATS)
        slots = {bytes(s["name"]).rstrip(b"\0").decode(): (int(s["kind"]), int(s["packets"]), int(s["running"]), int(s["lost"]))
                 for s in z.elements(TRAFFIC_STATS, 16) if s["pid"]}
        del st, z
        assert slots["tgen"] == (KIND_GEN, 4000, 0, 0)
        assert slots["tsink"] == (KIND_SINK, 4000, 0, 0)
    finally:
        inst.close()
    for w in workers:
        stop(w)


@pytest.mark.timeout(120)
def test_ring_drops_without_worker_equal_sink_loss(instance, tmp_path):
    """No worker polls: the RX ring takes its 1024 slots, the rest are ring drops -- and exactly the sink's loss."""
    start_primary(instance, 1)
    rep = tmp_path / "gen.json"
    g = instance.run(["gen", *instance.eal(), "--", "--port", "ring:in", "--flows", "5", "--count", "3000",
                      "--report", str(rep), "--json"], timeout=60)
    assert g.returncode == 0, g.stderr
    gdoc = json_out(g.stdout)
    assert gdoc["generated"] == 3000 and gdoc["sent"] == 1024 and gdoc["ring_drops"] == 1976
    start_worker(instance, 0)  # late: drains what the ring buffered
    sink = start_sink(instance, [*instance.eal(), "--", "--port", "ring:out", "--idle-exit", "1", "--duration", "60",
                                 "--expect", str(rep), "--json"])
    rc, out, err = finish(sink, 60)
    doc = json_out(out)
    assert rc == 1  # loss is not clean
    assert doc["received"] == 1024 and doc["expected"] == 3000
    assert doc["lost"] == 1976 == doc["lost_ring_drops"] and doc["lost_in_path"] == 0
    assert doc["duplicated"] == doc["corrupted"] == 0
    assert sum(f["lost"] for f in doc["flows"]) == 1976


@pytest.mark.timeout(120)
def test_injected_faults_detected_exactly(instance, tmp_path):
    """Between gen and sink (direct ring manipulation): drop 2, duplicate 1, reorder 1, corrupt 3 (ip checksum, l4 checksum, fill)."""
    start_primary(instance, 1)
    rep = tmp_path / "gen.json"
    g = instance.run(["gen", *instance.eal(), "--", "--port", "ring:in", "--flows", "3", "--count", "600",
                      "--report", str(rep), "--json"], timeout=60)
    assert g.returncode == 0 and json_out(g.stdout)["sent"] == 600, g.stderr
    inst = attach(instance.prefix)
    try:
        from hotplane.shared.burst import rx_burst, rx_release, tx_burst
        from hotplane.shared.ports import attach_ring_port

        pin, pout = attach_ring_port(inst.directory, "ring:in"), attach_ring_port(inst.directory, "ring:out")
        rows, lens = [], []
        for _ in range(4):
            b = rx_burst(pin.queues[0], 1024)
            if b.n == 0:
                break
            rows.append(b.frames[:, :128].copy())
            lens.append(b.lengths.copy())
            rx_release(pin.queues[0], b)
        frames, lengths = np.concatenate(rows), np.concatenate(lens)
        assert frames.shape[0] == 600
        # Flows go round robin 0,1,2,...: rows 40 and 43 are one flow's consecutive packets.
        order = [i for i in range(600) if i not in (10, 20)]  # two lost
        order.insert(order.index(31), 30)  # row 30 twice: one duplicate
        a, b_ = order.index(40), order.index(43)
        order[a], order[b_] = order[b_], order[a]  # 43 before 40: one reordered (and 43 itself is on time)
        out = frames[order].copy()
        outlen = lengths[order].copy()
        k = order.index(50)
        out[k, 22] ^= 0x01  # TTL changed, IP checksum not: ip_checksum
        k = order.index(55)
        out[k, int(outlen[k]) - 1] ^= 0xFF  # payload byte, checksum left: l4_checksum
        k = order.index(58)
        out[k, int(outlen[k]) - 1] ^= 0xFF
        out[k, 40:42] = 0  # UDP checksum 0 ("not computed") hides it from the checksum: the fill check finds it
        assert tx_burst(pout.queues[0], out, outlen) == len(order)
        del pin, pout, b, rows, frames
    finally:
        inst.close()
    sink = start_sink(instance, [*instance.eal(), "--", "--port", "ring:out", "--idle-exit", "1", "--duration", "30",
                                 "--expect", str(rep), "--json"])
    rc, outp, err = finish(sink, 60)
    doc = json_out(outp)
    assert rc == 1
    assert doc["expected"] == 600
    # The 3 corrupted carry readable stamps: they arrived (damaged), so only the 2 dropped are lost.
    assert doc["lost"] == 2 and sum(f["lost"] for f in doc["flows"]) == 2
    assert doc["received"] == 595 and doc["received"] + doc["lost"] + doc["corrupted"] == doc["expected"]
    assert doc["duplicated"] == 1 and doc["reordered"] == 1 and doc["corrupted"] == 3 and doc["corrupted_unattributed"] == 0
    assert {k: v for k, v in doc["corrupted_by_reason"].items() if v} == {"ip_checksum": 1, "l4_checksum": 1, "fill": 1}
    per_flow = {f["flow"]: f for f in doc["flows"]}
    assert per_flow[30 % 3]["duplicated"] == 1 and per_flow[40 % 3]["reordered"] == 1
    assert {f: per_flow[f]["corrupted"] for f in per_flow} == {0: 0, 1: 2, 2: 1}  # rows 55 and 58 are flow 1, row 50 flow 2


@pytest.mark.timeout(60)
def test_gen_stops_at_duration_and_paces(instance):
    start_primary(instance, 1)
    t0 = time.monotonic()
    g = instance.run(["gen", *instance.eal(), "--", "--port", "ring:in", "--rate", "500", "--duration", "1.5", "--json"], timeout=30)
    took = time.monotonic() - t0
    assert g.returncode == 0, g.stderr
    doc = json_out(g.stdout)
    assert 1.45 <= doc["duration"] < 10 and took < 30
    # The token bucket: at most rate x duration plus its depth (a loaded 2-core machine may only lag).
    assert 0 < doc["generated"] <= 760, doc["generated"]
    assert "gen:" in g.stderr  # the progress line


# --- af_packet mode in a throwaway namespace pair -----------------------------------------------------


def _need_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and AF_PACKET"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


@pytest.fixture
def veth_pair():
    """Namespaces A (100.64.77.2, route to 198.18.0.0/15 via 100.64.77.1) and B (100.64.77.1) joined by a veth."""
    reason = _need_netns()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    a, b = f"hpgs-a-{tag}", f"hpgs-b-{tag}"
    made = []
    try:
        for ns in (a, b):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            for key in ("all", "default"):
                _sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", a, "link", "add", "name", "gsa", "type", "veth", "peer", "name", "gsb", "netns", b)
        _sh("ip", "-n", a, "addr", "add", "100.64.77.2/24", "dev", "gsa")
        _sh("ip", "-n", b, "addr", "add", "100.64.77.1/24", "dev", "gsb")
        _sh("ip", "-n", a, "link", "set", "gsa", "up")
        _sh("ip", "-n", b, "link", "set", "gsb", "up")
        _sh("ip", "-n", a, "route", "add", "198.18.0.0/15", "via", "100.64.77.1")
        yield a, b
    finally:
        for ns in made:
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _sh("ip", "netns", "del", ns, check=False)


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_af_packet_clean_and_both_stop_at_duration(veth_pair, tmp_path):
    a, b = veth_pair
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rep = tmp_path / "gen.json"
    procs = []
    try:
        sink = start_sink(None, ["--", "--port", "af_packet:gsb", "--duration", "4", "--expect", str(rep), "--json"],
                          prefix_cmd=["ip", "netns", "exec", b], env_vars=env)
        procs.append(sink)
        t0 = time.monotonic()
        # No --dst-mac: the generator resolves 100.64.77.1 (the next hop to 198.18.0.2) by ARP in namespace A.
        g = subprocess.run(["ip", "netns", "exec", a, *CLI, "gen", "--", "--port", "af_packet:gsa", "--flows", "8", "--proto", "udp",
                            "--size", "128", "--rate", "4000", "--duration", "1", "--report", str(rep), "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
        g_took = time.monotonic() - t0
        assert g.returncode == 0, g.stderr
        gdoc = json_out(g.stdout)
        # Stops at its duration, not before (how much later, and how much it sent, depend on the machine's load).
        assert 0.95 <= gdoc["duration"] < 10 and g_took < 60
        assert gdoc["ring_drops"] == 0 and gdoc["sent"] == gdoc["generated"] > 0
        rc, out, err = finish(sink, 60)
        s_took = time.monotonic() - t0
        doc = json_out(out)
        assert rc == 0, (doc["problems"], err[-1500:])
        assert doc["exact_loss"] and doc["received"] == doc["expected"] == gdoc["sent"]
        assert doc["lost"] == doc["duplicated"] == doc["corrupted"] == 0
        assert len(doc["flows"]) == 8
        assert 3.9 <= doc["duration"] < 15 and s_took < 90  # the sink ran to its own --duration
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("proto", ["tcp", "icmp"])
def test_af_packet_tcp_icmp_with_explicit_macs(veth_pair, tmp_path, proto):
    a, b = veth_pair
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    mac_b = json.loads(_sh("ip", "-j", "-n", b, "link", "show", "gsb").stdout)[0]["address"]
    rep = tmp_path / "gen.json"
    sink = start_sink(None, ["--", "--port", "af_packet:gsb", "--duration", "30", "--idle-exit", "1", "--expect", str(rep), "--json"],
                      prefix_cmd=["ip", "netns", "exec", b], env_vars=env)
    try:
        g = subprocess.run(["ip", "netns", "exec", a, *CLI, "gen", "--", "--port", "af_packet:gsa", "--flows", "4", "--proto", proto,
                            "--size", "96", "--count", "2000", "--rate", "10000", "--dst-mac", mac_b, "--report", str(rep), "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
        assert g.returncode == 0, g.stderr
        rc, out, err = finish(sink, 60)
        doc = json_out(out)
        assert rc == 0, (doc["problems"], err[-1500:])
        assert doc["received"] == doc["expected"] == 2000 and doc["lost"] == 0
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(timeout=10)


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_af_packet_missing_interface(veth_pair):
    a, _ = veth_pair
    for tool, extra in (("gen", ["--dst-mac", "02:00:00:00:00:01"]), ("sink", [])):
        r = subprocess.run(["ip", "netns", "exec", a, *CLI, tool, "--", "--port", "af_packet:nope0", "--duration", "1", *extra],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, (tool, r.stderr)
        assert "nope0 does not exist" in r.stderr


# --- offline runs through pcap files: new-flow rate, the text report, READY -------------------------------


@pytest.mark.timeout(60)
def test_new_flow_rate_starts_flows_progressively(tmp_path):
    """--new-flow-rate 5 with --rate 1000 over 1.5 s: flow k starts k/5 s in, so flows 8 and 9 never start.
    Written to a pcap file the run is on computed time, so the file's timestamps show it exactly."""
    from hotplane.shared.pcap_port import read_pcap

    f = tmp_path / "nfr.pcap"
    r = subprocess.run([*CLI, "gen", "--", "--port", f"pcap:{f}", "--flows", "10", "--new-flow-rate", "5", "--rate", "1000",
                        "--duration", "1.5", "--json", "--quiet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json_out(r.stdout)
    sent = doc["per_flow_sent"]
    assert sum(sent) == doc["sent"] == 1500 and sent[8] == sent[9] == 0 and all(sent[:8])
    b = read_pcap(f)
    sport = (b.frames[:, 34].astype(int) << 8) | b.frames[:, 35]
    t = (b.ts_ns - b.ts_ns[0]) / 1e9
    for k in range(8):
        # Active from k/5 s on; its first packet within one round-robin pass over the k+1 active flows (1 ms each).
        first = t[np.argmax(sport == 10000 + k)]
        assert k / 5 - 1e-6 <= first <= k / 5 + (k + 1) / 1000 + 1e-6, (k, first)
    # Flows that started earlier carried more packets.
    assert sent[0] > sent[3] > sent[7]


def _faulty_capture(tmp_path):
    """A capture of 3 flows x 10 packets: flow 1 loses seq 4, flow 2 has seq 7 duplicated and seq 2 corrupted."""
    from hotplane.shared.pcap_port import PcapWriter
    from hotplane.shared.traffic import FlowSet, Generator

    g = Generator(FlowSet.make(3, "udp", 80), burst=64)
    fr, ln = g.fill(np.tile(np.arange(3), 10))
    fr, ln = fr.copy(), ln.copy()
    rows = [i for i in range(30) if i != 3 * 4 + 1] + [3 * 7 + 2]
    fr[3 * 2 + 2, 79] ^= 0x55
    with PcapWriter(tmp_path / "faulty.pcap") as w:
        w.write_burst(fr[rows], ln[rows])
    rep = tmp_path / "faulty.json"
    rep.write_text(json.dumps({"per_flow_sent": [10, 10, 10], "first_id": 0}))
    return tmp_path / "faulty.pcap", rep


@pytest.mark.timeout(60)
def test_sink_text_report_and_per_flow_table(tmp_path):
    f, rep = _faulty_capture(tmp_path)
    r = subprocess.run([*CLI, "sink", "--", "--port", f"pcap:{f}", "--expect", str(rep), "--per-flow"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # lost, duplicated and corrupted: not clean
    lines = r.stdout.splitlines()
    assert lines[0].startswith("READY sink pid ")
    rows = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in lines if ":" in ln and not ln.startswith("READY")}
    assert rows["received"] == "28 of 30 expected (exact)"
    assert rows["lost"].startswith("1 ") and rows["duplicated"] == "1" and rows["reordered"] == "0"
    assert rows["corrupted"] == "1 (l4_checksum 1; 0 without a readable flow)"
    assert rows["verdict"] == "NOT CLEAN: lost 1; duplicated 1; corrupted 1"
    head = lines.index(next(ln for ln in lines if ln.split() == ["flow", "expected", "received", "lost", "dup", "reord", "corrupt"]))
    table = [ln.split() for ln in lines[head + 1 :]]
    assert table == [["0", "10", "10", "0", "0", "0", "0"], ["1", "10", "9", "1", "0", "0", "0"], ["2", "10", "9", "0", "1", "0", "1"]]
    # Without --per-flow: the totals only.
    r = subprocess.run([*CLI, "sink", "--", "--port", f"pcap:{f}", "--expect", str(rep)], capture_output=True, text=True, timeout=60)
    assert "verdict: NOT CLEAN" in r.stdout and "flow" not in r.stdout.split("verdict")[1]


@pytest.fixture
def fake_supervisor(tmp_path):
    """A unix socket answering ``ready`` the way the supervisor does; yields (path, list of reports)."""
    import asyncio
    import threading

    from hotplane.shared import ipc

    path = str(tmp_path / "supervisor.sock")
    got: list = []
    up = threading.Event()
    loop = asyncio.new_event_loop()

    async def handler(channel, req):
        got.append((req.method, req.params))
        return {"ok": True}, ()

    done = asyncio.Event()

    async def main():
        server = await ipc.serve(path, handler, heartbeat_interval=None)
        up.set()
        try:
            await done.wait()
        finally:
            await server.close()

    t = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    t.start()
    assert up.wait(10)
    try:
        yield path, got
    finally:
        loop.call_soon_threadsafe(done.set)
        t.join(10)
        loop.close()


@pytest.mark.timeout(60)
def test_gen_and_sink_report_ready_to_the_supervisor(fake_supervisor, tmp_path):
    path, got = fake_supervisor
    f, rep = _faulty_capture(tmp_path)
    env = dict(os.environ, HOTPLANE_SUPERVISOR_SOCKET=path, HOTPLANE_PROGRAM="sink")
    s = subprocess.run([*CLI, "sink", "--", "--port", f"pcap:{f}", "--json"], capture_output=True, text=True, timeout=60, env=env)
    env["HOTPLANE_PROGRAM"] = "gen"
    g = subprocess.run([*CLI, "gen", "--", "--port", f"pcap:{tmp_path / 'g.pcap'}", "--count", "10", "--json"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert g.returncode == 0, g.stderr
    ready = {p["name"]: p for m, p in got if m == "ready"}
    assert set(ready) == {"sink", "gen"}
    assert ready["sink"]["pid"] > 0 and ready["sink"]["port"] == f"pcap:{f}" and ready["gen"]["tool"] == "gen"
    # And the ready line on stdout, before the report (the report stays the last line).
    first = json.loads(g.stdout.splitlines()[0])
    assert first["event"] == "ready" and first["name"] == "gen"
    assert json_out(g.stdout)["sent"] == 10 and json_out(s.stdout)["received"] == 28


@pytest.fixture
def eth0_pair():
    """Two throwaway namespaces joined by a veth named eth0 on both ends, addressed like the lab's hosts:
    A = inside host 100.64.0.2 (default route via 100.64.0.1), B = its next hop 100.64.0.1."""
    reason = _need_netns()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    a, b = f"hpgl-a-{tag}", f"hpgl-b-{tag}"
    made = []
    try:
        for ns in (a, b):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            for key in ("all", "default"):
                _sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", a, "link", "add", "name", "eth0", "type", "veth", "peer", "name", "hpgltmp", "netns", b)
        _sh("ip", "-n", b, "link", "set", "hpgltmp", "name", "eth0")
        _sh("ip", "-n", a, "addr", "add", "100.64.0.2/24", "dev", "eth0")
        _sh("ip", "-n", b, "addr", "add", "100.64.0.1/24", "dev", "eth0")
        for ns in (a, b):
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", a, "route", "add", "default", "via", "100.64.0.1")
        yield a, b
    finally:
        for ns in made:
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _sh("ip", "netns", "del", ns, check=False)


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_lab_status_gen_hint_is_a_command_that_runs(eth0_pair, tmp_path):
    """`hotplane lab status` prints the sink + generator pair to run; the same argv, run in two namespaces
    shaped like the lab's hosts (eth0, 100.64.0.2 behind 100.64.0.1), gives an exact clean count."""
    import shlex

    from hotplane.deploy import lab

    hint = next(h for h in lab._how_to("dataplane") if h.startswith("hotplane gen:"))
    sink_part, gen_part = (shlex.split(p) for p in hint.split(":", 1)[1].split(" & "))
    assert sink_part[:4] == ["ip", "netns", "exec", lab.NS_OUTSIDE] and sink_part[4:6] == ["hotplane", "sink"]
    assert gen_part[:4] == ["ip", "netns", "exec", lab.NS_INSIDE] and gen_part[4:6] == ["hotplane", "gen"]
    assert f"af_packet:{lab.HOST_IF}" in gen_part and lab.OUTSIDE_HOSTS[0] in gen_part and lab.INSIDE_HOST in gen_part
    rep = str(tmp_path / "gen.json")
    sink_args = [rep if x == "/tmp/hp-gen.json" else x for x in sink_part[6:]] + ["--json"]
    gen_args = [rep if x == "/tmp/hp-gen.json" else x for x in gen_part[6:]] + ["--json"]
    a, b = eth0_pair
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sink = start_sink(None, sink_args, prefix_cmd=["ip", "netns", "exec", b], env_vars=env)
    try:
        g = subprocess.run(["ip", "netns", "exec", a, *CLI, "gen", *gen_args], env=env, capture_output=True, text=True, timeout=60)
        assert g.returncode == 0, g.stderr
        rc, out, err = finish(sink, 90)
        doc = json_out(out)
        assert rc == 0, (doc["problems"], err[-1500:])
        assert doc["received"] == doc["expected"] == json_out(g.stdout)["sent"] > 0 and len(doc["flows"]) == 16
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(timeout=10)
