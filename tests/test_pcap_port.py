"""pcap:FILE ports: the reader/writer, malformed files, replay into rings and capture from them."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest

from hotplane.shared.burst import forward_burst, tx_space
from hotplane.shared.pcap_port import (
    PcapCapture,
    PcapError,
    PcapPort,
    PcapReader,
    PcapReplay,
    PcapWriter,
    read_pcap,
)
from hotplane.shared.ring_port import RingPort, alloc_buffers
from hotplane.shared.steering import Steering

scapy_all = pytest.importorskip("scapy.all")


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_ports_util")


def sample_frames(n: int = 40) -> list[bytes]:
    out = []
    for i in range(n):
        l4 = u.udp(1000 + i, 53, b"q" * (i % 30)) if i % 3 else u.tcp(2000 + i, 80)
        out.append(u.ipv4_frame(0x64400001 + i % 5, 0xC6120001, 17 if i % 3 else 6, l4))
    return out


def write_sample(path, frames: list[bytes], t0_ns: int = 1_700_000_000_000_000_000, gap_ns: int = 1_000_000) -> np.ndarray:
    arr, ln = u.to_array(frames)
    ts = t0_ns + np.arange(len(frames), dtype=np.int64) * gap_ns
    with PcapWriter(path) as w:
        w.write_burst(arr, ln, ts_ns=ts)
    return ts


def test_writer_output_is_read_back_by_scapy_with_timestamps(tmp_path):
    frames = sample_frames()
    ts = write_sample(tmp_path / "a.pcap", frames, gap_ns=1_500_000)
    pk = scapy_all.rdpcap(str(tmp_path / "a.pcap"))
    assert [bytes(p) for p in pk] == frames
    assert [round(float(p.time) * 1e6) for p in pk] == (ts // 1000).tolist()


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_tcpdump_reads_the_capture(tmp_path):
    write_sample(tmp_path / "t.pcap", sample_frames(12))
    r = subprocess.run(["tcpdump", "-nn", "-r", str(tmp_path / "t.pcap")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 12 and "100.64.0.2.1001 > 198.18.0.1.53" in lines[1]
    assert "EN10MB" in r.stderr


def test_reader_reads_what_scapy_writes_including_nanosecond_files(tmp_path):
    frames = sample_frames(25)
    pkts = [scapy_all.Ether(f) for f in frames]
    for i, p in enumerate(pkts):
        p.time = 1_700_000_000 + i * 0.25
    scapy_all.wrpcap(str(tmp_path / "s.pcap"), pkts)
    b = read_pcap(tmp_path / "s.pcap")
    assert u.as_bytes(b.frames, b.lengths) == frames
    assert (b.ts_ns - b.ts_ns[0]).tolist() == [i * 250_000_000 for i in range(25)]
    w = scapy_all.PcapWriter(str(tmp_path / "n.pcap"), nano=True, linktype=1)
    w.write(pkts)
    w.close()
    with PcapReader(tmp_path / "n.pcap") as r:
        assert r.nanosecond
    assert u.as_bytes(*_fl(read_pcap(tmp_path / "n.pcap"))) == frames


def _fl(b):
    return b.frames, b.lengths


def test_reader_reads_big_endian_files_and_batches(tmp_path):
    frames = sample_frames(7)
    data = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for i, f in enumerate(frames):
        data += struct.pack(">IIII", 100 + i, 5, len(f), len(f) + 10) + f
    (tmp_path / "be.pcap").write_bytes(data)
    with PcapReader(tmp_path / "be.pcap") as r:
        got = [r.read_batch(3) for _ in range(4)]
    assert [len(g) for g in got[:3]] == [3, 3, 1] and got[3] is None
    assert u.as_bytes(got[0].frames, got[0].lengths) == frames[:3]
    assert got[0].orig_lengths[0] == len(frames[0]) + 10
    assert got[1].ts_ns[0] == 103 * 10**9 + 5000


def test_round_trip_through_writer_and_reader(tmp_path):
    rng = np.random.default_rng(4)
    arr, ln = u.random_frames(rng, 300, 1514, 14, 1514)
    ts = 1_600_000_000_000_000_000 + np.sort(rng.integers(0, 10**12, 300)) // 1000 * 1000
    with PcapWriter(tmp_path / "r.pcap") as w:
        w.write_burst(arr[:100], ln[:100], ts_ns=ts[:100])
        w.write_burst(arr[100:], ln[100:], ts_ns=ts[100:])
    b = read_pcap(tmp_path / "r.pcap")
    assert u.as_bytes(b.frames, b.lengths) == u.as_bytes(arr, ln)
    assert b.ts_ns.tolist() == ts.tolist()


# -- malformed files ---------------------------------------------------------------------------


def test_truncated_file_names_what_to_do(tmp_path):
    write_sample(tmp_path / "a.pcap", sample_frames(10))
    data = (tmp_path / "a.pcap").read_bytes()
    (tmp_path / "cut.pcap").write_bytes(data[:-7])
    with pytest.raises(PcapError, match=r"truncated: record 9 .*pcapfix"):
        read_pcap(tmp_path / "cut.pcap")
    b = read_pcap(tmp_path / "cut.pcap", allow_truncated=True)
    assert len(b) == 9
    (tmp_path / "hdr.pcap").write_bytes(data[:30])  # cut inside the first record header
    with pytest.raises(PcapError, match="record header"):
        read_pcap(tmp_path / "hdr.pcap")
    (tmp_path / "short.pcap").write_bytes(data[:10])
    with pytest.raises(PcapError, match="shorter than the 24-byte pcap header"):
        PcapReader(tmp_path / "short.pcap")
    (tmp_path / "empty.pcap").write_bytes(b"")
    with pytest.raises(PcapError, match="empty"):
        PcapReader(tmp_path / "empty.pcap")


def test_other_link_types_pcapng_and_garbage_are_refused(tmp_path):
    (tmp_path / "sll.pcap").write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113))
    with pytest.raises(PcapError, match=r"link type 113 \(LINUX_SLL.*tcpdump -i IFACE"):
        PcapReader(tmp_path / "sll.pcap")
    (tmp_path / "x.pcapng").write_bytes(struct.pack("<II", 0x0A0D0D0A, 28) + b"\x4d\x3c\x2b\x1a" + b"\x00" * 20)
    with pytest.raises(PcapError, match="pcapng.*editcap -F pcap"):
        PcapReader(tmp_path / "x.pcapng")
    (tmp_path / "junk").write_bytes(b"hello world, not a capture")
    with pytest.raises(PcapError, match="not a pcap file"):
        PcapReader(tmp_path / "junk")


def test_corrupt_record_length_is_refused(tmp_path):
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 1, 0, 10**7, 10**7) + b"\x00" * 64
    (tmp_path / "bad.pcap").write_bytes(data)
    with pytest.raises(PcapError, match="corrupt"):
        read_pcap(tmp_path / "bad.pcap")


# -- replay and capture through rings ---------------------------------------------------------


def make_port(name="p", nq=1, slots=64):
    return RingPort.create(name, alloc_buffers(RingPort.layout(name, nq, slots, 2048)), nq, slots, 2048, Steering("inside", nq) if nq > 1 else None)


def drain_rx(port: RingPort) -> list[list[bytes]]:
    from hotplane.shared.burst import rx_burst, rx_release

    out = []
    for q in port.queues:
        got = []
        while True:
            b = rx_burst(q, 64)
            if b.n == 0:
                break
            got.extend(u.as_bytes(b.frames, b.lengths))
            rx_release(q, b)
        out.append(got)
    return out


def test_replay_at_max_rate_with_backpressure_delivers_everything_in_order(tmp_path):
    frames = sample_frames(150)
    write_sample(tmp_path / "a.pcap", frames)
    port = make_port(nq=2, slots=32)
    rep = PcapReplay(tmp_path / "a.pcap", rate="max", backpressure=True, burst=40)
    got = [[], []]
    for _ in range(1000):
        if rep.done:
            break
        rep.step(port)
        for qi, lst in enumerate(drain_rx(port)):
            got[qi].extend(lst)
    assert rep.done and rep.stats.sent == 150 and rep.stats.dropped == 0
    arr, ln = u.to_array(frames)
    q = port.steering(arr, ln)
    for qi in range(2):
        assert got[qi] == [f for f, x in zip(frames, q) if x == qi]


def test_replay_without_backpressure_counts_ring_full_drops(tmp_path):
    frames = sample_frames(100)
    write_sample(tmp_path / "a.pcap", frames)
    port = make_port(slots=32)
    stats = PcapReplay(tmp_path / "a.pcap", rate="max").run(port, timeout=10)
    assert stats.sent == 32 and stats.dropped == 68 and port.peer_drops() == 68
    # The unpolled ring kept the first 32, in order; drained, it takes frames again.
    assert drain_rx(port)[0] == frames[:32]
    again = PcapReplay(tmp_path / "a.pcap", rate="max").run(port, timeout=10)
    assert again.sent == 32 and drain_rx(port)[0] == frames[:32] and port.peer_drops() == 68 + 68


@pytest.mark.timeout(30)
def test_replay_at_recorded_rate_keeps_the_gaps(tmp_path):
    write_sample(tmp_path / "a.pcap", sample_frames(5), gap_ns=40_000_000)  # 160 ms first to last
    port = make_port()
    t0 = time.monotonic()
    stats = PcapReplay(tmp_path / "a.pcap", rate="recorded").run(port, timeout=10)
    took = time.monotonic() - t0
    assert stats.sent == 5 and 0.15 <= took < 5
    # Python ints: tp_sec is a u4, and u4 * 10**9 would wrap.
    ts = [int(port.rx_rings[0].tp_sec[i]) * 10**9 + int(port.rx_rings[0].tp_nsec[i]) for i in range(5)]
    assert ts[4] - ts[0] >= 150_000_000  # RX timestamps show the recorded spacing


def test_replay_loops(tmp_path):
    frames = sample_frames(10)
    write_sample(tmp_path / "a.pcap", frames)
    port = make_port(slots=64)
    stats = PcapReplay(tmp_path / "a.pcap", rate="max", loop=3).run(port, timeout=10)
    assert stats.sent == 30 and drain_rx(port)[0] == frames * 3


def test_pcap_round_trip_through_a_forwarding_worker(tmp_path):
    """Replay a file into port A, forward A -> B with the burst engine, capture B: the same frames come out."""
    frames = sample_frames(200)
    write_sample(tmp_path / "in.pcap", frames)
    a, b = make_port("a", slots=32), make_port("b", slots=32)
    rep = PcapPort(f"pcap:{tmp_path / 'in.pcap'},rate=max", a, backpressure=True)
    cap = PcapPort(f"pcap:{tmp_path / 'out.pcap'},mode=capture", b)
    for _ in range(5000):
        rep.step()
        room = tx_space(b.queues[0], 32)
        if room:
            forward_burst(a.queues[0], b.queues[0], room)
        cap.step()
        if rep.done and a.rx_rings[0].count_ready() == 0 and b.tx_rings[0].count_ready() == 0:
            break
    rep.close()
    cap.close()
    got = read_pcap(tmp_path / "out.pcap")
    assert u.as_bytes(got.frames, got.lengths) == frames
    assert [bytes(p) for p in scapy_all.rdpcap(str(tmp_path / "out.pcap"))] == frames


def test_capture_drains_tx_rings(tmp_path):
    port = make_port(slots=16)
    from hotplane.shared.burst import tx_burst

    frames = sample_frames(12)
    arr, ln = u.to_array(frames)
    assert tx_burst(port.queues[0], arr, ln) == 12
    c = PcapCapture(tmp_path / "c.pcap")
    assert c.drain(port) == 12 and c.drain(port) == 0
    c.close()
    assert u.as_bytes(*_fl(read_pcap(tmp_path / "c.pcap"))) == frames


def test_pcap_port_refuses_other_specs_and_bad_files(tmp_path):
    port = make_port()
    with pytest.raises(ValueError, match="ring port"):
        PcapPort("ring:x", port)
    (tmp_path / "sll.pcap").write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 276))
    with pytest.raises(PcapError, match="LINUX_SLL2"):
        PcapPort(f"pcap:{tmp_path / 'sll.pcap'}", port)


# -- pcap: as a port of the commands: gen writes, sink verifies, the primary replays and captures ------------

import json  # noqa: E402
import os  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

CLI = [sys.executable, "-m", "hotplane.supervisor.cli"]


def hp(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def last_json(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


def records(path) -> int:
    """Whole records in a (possibly growing) capture file."""
    if not os.path.exists(path) or os.path.getsize(path) < 24:
        return 0
    with PcapReader(path, allow_truncated=True) as r:
        return r.scan()


def ready_line(p: subprocess.Popen, timeout: float = 30) -> dict:
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            line = p.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                return json.loads(line)
    finally:
        sel.close()
    p.kill()
    raise AssertionError(f"not ready: {p.communicate(timeout=10)[1][-2000:]}")


@pytest.mark.timeout(120)
def test_gen_writes_a_capture_that_tcpdump_reads_and_the_sink_verifies(tmp_path):
    f, rep = tmp_path / "gen.pcap", tmp_path / "gen.json"
    g = hp("gen", "--", "--port", f"pcap:{f}", "--flows", "3", "--rate", "1000", "--count", "300", "--report", str(rep), "--json", "--quiet")
    assert g.returncode == 0, g.stderr
    gdoc = last_json(g.stdout)
    assert gdoc["sent"] == 300 and gdoc["per_flow_sent"] == [100, 100, 100]
    b = read_pcap(f)
    assert len(b) == 300 and (np.diff(b.ts_ns) == 1_000_000).all()  # stamped 1/rate apart, not by the wall clock
    if shutil.which("tcpdump"):
        r = subprocess.run(["tcpdump", "-nn", "-r", str(f)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "EN10MB" in r.stderr and len(r.stdout.splitlines()) == 300
    s = hp("sink", "--", "--port", f"pcap:{f}", "--expect", str(rep), "--capture", str(tmp_path / "copy.pcap"), "--json")
    doc = last_json(s.stdout)
    assert s.returncode == 0, doc["problems"]
    assert doc["received"] == doc["expected"] == 300 and doc["exact_loss"] and doc["lost"] == 0
    copy = read_pcap(tmp_path / "copy.pcap")
    assert u.as_bytes(copy.frames, copy.lengths) == u.as_bytes(b.frames, b.lengths)


@pytest.mark.timeout(180)
def test_primary_replays_a_pcap_through_a_worker_into_a_capture_and_resumes_after_a_restart(instance, tmp_path):
    """--inside pcap:IN (replay) --outside pcap:OUT,mode=capture: net_pcap's rx_pcap/tx_pcap. Every frame
    comes out forwarded (TTL 63, new MACs), verified by the sink; a restarted primary neither replays
    again nor truncates the capture."""
    src, rep, out = tmp_path / "in.pcap", tmp_path / "in.json", tmp_path / "out.pcap"
    g = hp("gen", "--", "--port", f"pcap:{src}", "--flows", "8", "--src-hosts", "4", "--rate", "100000", "--count", "3000",
           "--report", str(rep), "--quiet")
    assert g.returncode == 0, g.stderr
    args = ["primary", *instance.eal("--no-huge", "--socket-mem", "32"), "--", "--workers", "1", "--json",
            "--inside", f"pcap:{src},rate=max,slots=256", "--outside", f"pcap:{out},mode=capture,slots=256"]
    prim = instance.spawn(args)
    ready_line(prim)
    wk = instance.spawn(["worker", *instance.eal(), "--", "--id", "0", "--json"])
    ready_line(wk)
    deadline = time.monotonic() + 60
    while records(out) < 3000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert records(out) == 3000  # readable while it grows: whole records only
    prim.send_signal(signal.SIGTERM)
    assert prim.wait(timeout=30) == 0
    assert "pcap replay of" in prim.stderr.read() and records(out) == 3000
    # A restarted primary re-attaches the rings: the replay resumes after the 3000 (nothing again), the capture appends.
    prim2 = instance.spawn(args)
    ready_line(prim2)
    time.sleep(0.3)  # give a wrong replay the chance to show (no event exists for "nothing happened")
    prim2.send_signal(signal.SIGTERM)
    assert prim2.wait(timeout=30) == 0
    assert "3000 already replayed before a restart" in prim2.stderr.read()
    assert records(out) == 3000
    wk.send_signal(signal.SIGTERM)
    wk.wait(timeout=30)
    s = hp("sink", "--", "--port", f"pcap:{out}", "--expect", str(rep), "--json")
    doc = last_json(s.stdout)
    assert s.returncode == 0, doc["problems"]
    assert doc["received"] == 3000 and doc["lost"] == doc["duplicated"] == doc["corrupted"] == 0
    got = read_pcap(out)
    assert (got.frames[:, 22] == 63).all()  # TTL decremented by the forward pipeline
    assert bytes(got.frames[0, 6:12]) == bytes.fromhex("026870000002")  # the outside_gw MAC
    if shutil.which("tcpdump"):
        r = subprocess.run(["tcpdump", "-nn", "-r", str(out)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 3000


@pytest.mark.timeout(120)
def test_gen_replay_into_a_ring_port_at_recorded_rate_keeps_the_gaps(instance, tmp_path):
    frames = sample_frames(6)
    write_sample(tmp_path / "gaps.pcap", frames, gap_ns=40_000_000)
    prim = instance.spawn(["primary", *instance.eal("--no-huge", "--socket-mem", "32"), "--", "--workers", "1", "--json",
                           "--inside", "ring:in,slots=64", "--outside", "ring:out,slots=64"])
    ready_line(prim)
    g = instance.run(["gen", *instance.eal(), "--", "--port", "ring:in", "--replay", str(tmp_path / "gaps.pcap"), "--json"])
    assert g.returncode == 0, g.stderr
    doc = last_json(g.stdout)
    assert (doc["mode"], doc["rate"], doc["sent"], doc["ring_drops"]) == ("replay", "recorded", 6, 0)
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init
    from hotplane.shared.ports import attach_ring_port

    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    try:
        port = attach_ring_port(inst.directory, "ring:in")
        rx = port.rx_rings[0]
        # RX timestamps: the time each frame was queued. Frame k never goes before k x 40 ms after
        # the first one went (a loaded machine may only make it later); 1 ms for the two clocks.
        ts = [int(rx.tp_sec[i]) * 10**9 + int(rx.tp_nsec[i]) for i in range(6)]
        assert all(ts[k] - ts[0] >= k * 40_000_000 - 1_000_000 for k in range(6)), np.diff(ts)
        assert drain_rx(port)[0] == frames
        del port, rx
    finally:
        inst.close()
    # rate max, looped: 12 frames as fast as the ring takes them
    g = instance.run(["gen", *instance.eal(), "--", "--port", "ring:in", "--replay", str(tmp_path / "gaps.pcap"), "--rate", "max",
                      "--loop", "2", "--no-drop", "--json"])
    doc = last_json(g.stdout)
    assert g.returncode == 0 and (doc["rate"], doc["sent"], doc["loops_done"]) == ("max", 12, 2)


@pytest.mark.timeout(120)
def test_bad_pcap_files_are_refused_by_the_commands(instance, tmp_path):
    write_sample(tmp_path / "ok.pcap", sample_frames(10))
    data = (tmp_path / "ok.pcap").read_bytes()
    (tmp_path / "cut.pcap").write_bytes(data[:-7])
    (tmp_path / "sll.pcap").write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113) + data[24:])
    cut, sll = str(tmp_path / "cut.pcap"), str(tmp_path / "sll.pcap")
    for args in (["sink", "--", "--port", f"pcap:{cut}"], ["gen", "--", "--port", f"pcap:{tmp_path / 'o.pcap'}", "--replay", cut]):
        r = hp(*args)
        assert r.returncode == 1 and "truncated: record 9" in r.stderr and "pcapfix" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = hp("gen", "--", "--port", f"pcap:{tmp_path / 'o.pcap'}", "--replay", cut, "--allow-truncated", "--rate", "max", "--json")
    assert r.returncode == 0 and last_json(r.stdout)["sent"] == 9 and len(read_pcap(tmp_path / "o.pcap")) == 9
    for args in (["sink", "--", "--port", f"pcap:{sll}"], ["gen", "--", "--port", f"pcap:{tmp_path / 'o.pcap'}", "--replay", sll]):
        r = hp(*args)
        assert r.returncode == 1 and "link type 113 (LINUX_SLL" in r.stderr and "Traceback" not in r.stderr, r.stderr
    base = ["primary", *instance.eal("--no-huge", "--socket-mem", "32"), "--", "--workers", "1", "--outside", "ring:out"]
    for inside, msg in ((f"pcap:{sll}", "link type 113"), (f"pcap:{cut}", "truncated"), (f"pcap:{tmp_path / 'nope.pcap'}", "no file")):
        r = instance.run([*base, "--inside", inside], timeout=60)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = instance.run(["primary", *instance.eal(), "--", "--inside", f"pcap:{cut}", "--outside", f"pcap:{cut},mode=capture"])
    assert r.returncode == 2 and "both pcap:" in r.stderr
    r = hp("gen", "--", "--port", "ring:in", "--rate", "recorded")
    assert r.returncode == 2 and "--rate recorded needs --replay" in r.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", ["primary", "gen", "sink", "memzones"])
def test_vdev_is_refused_not_ignored(instance, tool):
    r = instance.run([tool, *instance.eal("--vdev", "pcap:/tmp/x.pcap"), "--", "--port", "ring:in"])
    assert r.returncode == 2 and "--vdev pcap:/tmp/x.pcap is not supported" in r.stderr, r.stderr
