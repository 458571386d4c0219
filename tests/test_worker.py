"""The worker process on ring ports: exact accounting, resume at saved cursors, fencing."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from hotplane.schema.port import W_OWNER, W_RX_CURSOR, pack_owner, unpack_owner
from hotplane.shared.counters import CounterBlocks
from hotplane.shared.eal import parse_eal
from hotplane.shared.instance import eal_init
from hotplane.shared.ports import attach_ring_port
from hotplane.shared.traffic import FlowSet, Generator, Sink


pytestmark = pytest.mark.timeout(120)

GW_INSIDE_MAC = bytes.fromhex("026870000001")


@pytest.fixture
def gateway(instance):
    """A primary with one worker slot on small ring ports, attached from the test process."""
    p = instance.spawn(["primary", *instance.eal("--socket-mem", "32", "--no-huge"), "--", "--json", "--workers", "1",
                        "--inside", "ring:in,queues=1,slots=256,steer=inside", "--outside", "ring:out,queues=1,slots=256,steer=outside"])
    line = instance.read_line(p, 30)
    assert line, p.stderr.read() if p.poll() is not None else "primary not ready"
    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    pin = attach_ring_port(inst.directory, "ring:in")
    pout = attach_ring_port(inst.directory, "ring:out")
    counters = CounterBlocks.attach(inst.directory.lookup("counters").view)
    try:
        yield instance, inst, pin, pout, counters
    finally:
        # Unmap, or every test would leave a fixed-address mapping in this process.
        del pin, pout, counters
        inst.close()


def start_worker(instance, wid: int = 0) -> subprocess.Popen:
    w = instance.spawn(["worker", *instance.eal(), "--", "--id", str(wid), "--json"])
    line = instance.read_line(w, 30)
    assert line and json.loads(line)["event"] == "ready", w.stderr.read() if w.poll() is not None else "worker not ready"
    return w


def pump(pin, pout, gen, sink, packets: int, *, drain_s: float = 10.0) -> None:
    """Send ``packets`` frames (never more than the RX ring holds at once) and collect everything."""
    out = np.zeros((512, 2048), np.uint8)
    ln = np.zeros(512, np.uint32)
    rng = np.random.default_rng(7)
    sent = 0
    deadline = time.monotonic() + drain_s + 30
    while sent < packets and time.monotonic() < deadline:
        room = pin.rx_rings[0].peer_space()
        # Keep at most 192 frames in flight, so the TX ring (256) never overflows when
        # this process is slower than the worker: overflow is counted, not a bug.
        in_flight = int(gen.sent().sum()) - int(sink.received.sum())
        k = max(0, min(room, 64, packets - sent, 192 - in_flight))
        if k:
            fr, l = gen.fill(rng.integers(0, gen.flows.n, k))
            assert int(pin.peer_send(fr, l).sum()) == k
            sent += k
        n = pout.peer_recv(512, out, ln)
        if n:
            sink.verify(out[:n], ln[:n])
    assert sent == packets
    end = time.monotonic() + drain_s
    while sink.report()["received"] < int(gen.sent().sum()) and time.monotonic() < end:
        n = pout.peer_recv(512, out, ln)
        if n:
            sink.verify(out[:n], ln[:n])
        else:
            time.sleep(0.002)


def test_forwarding_is_exact_and_books_balance(gateway):
    instance, inst, pin, pout, counters = gateway
    w = start_worker(instance)
    gen = Generator(FlowSet.make(16, "udp", 100, dst_mac=GW_INSIDE_MAC), burst=64)
    sink = Sink()
    pump(pin, pout, gen, sink, 20000)
    r = sink.report(gen.sent())
    assert (r["received"], r["lost"], r["duplicated"], r["reordered"], r["corrupted"]) == (20000, 0, 0, 0, 0)
    t = counters.totals()
    assert t["rx_packets"] == t["forwarded"] == 20000
    assert t["accounting_gap"] == 0
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=30) == 0
    pid, _ = unpack_owner(int(pin.queues[0].words[W_OWNER]))
    assert pid == 0, "a stopping worker releases its queues"


def test_invalid_frames_are_dropped_by_reason(gateway):
    instance, inst, pin, pout, counters = gateway
    start_worker(instance)
    frames = np.zeros((3, 128), np.uint8)
    frames[0, 12:14] = (0x86, 0xDD)  # IPv6: not IPv4
    frames[1, 12:14] = (0x08, 0x00)
    frames[1, 14] = 0x45  # IPv4 header with a wrong checksum
    lengths = np.array([60, 60, 10], np.uint32)  # the last one is a runt
    pin.peer_send(frames, lengths)
    deadline = time.monotonic() + 20
    while counters.totals()["rx_packets"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    t = counters.totals()
    assert t["rx_packets"] == 3 and t["forwarded"] == 0
    assert t["dropped"]["not_ipv4"] == 1 and t["dropped"]["runt"] == 1
    assert t["dropped"]["bad_ip_checksum"] + t["dropped"]["bad_ip_header"] == 1
    assert t["accounting_gap"] == 0


def test_killed_worker_replacement_resumes_at_saved_cursor(gateway):
    instance, inst, pin, pout, counters = gateway
    w = start_worker(instance)
    gen = Generator(FlowSet.make(8, "udp", 80, dst_mac=GW_INSIDE_MAC), burst=64)
    sink = Sink()
    pump(pin, pout, gen, sink, 3000)
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=10)
    # Frames sent while no worker polls stay in the RX ring (up to its 256 slots).
    fr, l = gen.fill(np.arange(200) % 8)
    assert int(pin.peer_send(fr, l).sum()) == 200
    cursor_before = int(pin.queues[0].words[W_RX_CURSOR])
    start_worker(instance)
    pump(pin, pout, gen, sink, 1000)
    r = sink.report(gen.sent())
    # A SIGKILL between transmitting a burst and releasing it can repeat that one burst;
    # nothing may be lost or corrupted.
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["duplicated"] <= 256
    assert r["received"] == 4200
    assert int(pin.queues[0].words[W_RX_CURSOR]) >= cursor_before + 1200
    assert counters.totals()["restarts"] == 1


def test_takeover_repairs_cursors_left_behind_by_a_killed_owner(gateway):
    """A worker killed between publishing slot statuses and moving its cursors."""
    from hotplane.schema.port import W_TX_CURSOR
    from hotplane.shared.burst import reconcile, rx_burst, rx_release

    instance, inst, pin, pout, counters = gateway
    gen = Generator(FlowSet.make(2, "udp", 64, dst_mac=GW_INSIDE_MAC), burst=64)
    fr, l = gen.fill(np.arange(40) % 2)
    pin.peer_send(fr, l)
    q = pin.queues[0]
    b = rx_burst(q, 16)
    assert b.n == 16
    rx_release(q, b)
    q.words[W_RX_CURSOR] -= 16  # as if killed after the status stores, before the cursor store
    oq = pout.queues[0]
    from hotplane.shared.burst import tx_burst

    tx_burst(oq, np.ascontiguousarray(fr[:5]), l[:5])
    oq.words[W_TX_CURSOR] -= 5
    moved = reconcile(q)
    assert moved["rx"] == 16
    assert reconcile(oq)["tx"] == 5
    assert reconcile(q) == {"rx": 0, "tx": 0}, "a consistent queue is left alone"
    w = start_worker(instance)
    sink = Sink()
    out = np.zeros((64, 2048), np.uint8)
    ln = np.zeros(64, np.uint32)
    deadline = time.monotonic() + 20
    got = 0
    while got < 5 + 24 and time.monotonic() < deadline:
        n = pout.peer_recv(64, out, ln)
        got += n
        if n:
            sink.verify(out[:n], ln[:n])
    assert got == 29
    assert w.poll() is None


def test_fenced_worker_stops_without_touching_the_queue(gateway):
    instance, inst, pin, pout, counters = gateway
    w = start_worker(instance)
    words = pin.queues[0].words
    pid, gen_no = unpack_owner(int(words[W_OWNER]))
    assert pid == w.pid
    # A successor takes the queue (as the drain-and-swap protocol or the hang detector would).
    words[W_OWNER] = pack_owner(1, gen_no + 1)
    assert w.wait(timeout=20) == 3
    cursor = int(words[W_RX_CURSOR])
    fr, l = Generator(FlowSet.make(1, "udp", 64), burst=8).fill(np.zeros(8, np.intp))
    pin.peer_send(fr, l)
    assert int(words[W_RX_CURSOR]) == cursor
    assert unpack_owner(int(words[W_OWNER])) == (1, gen_no + 1)


def test_second_worker_for_a_live_owner_is_refused(gateway):
    instance, inst, pin, pout, counters = gateway
    start_worker(instance)
    r = instance.run(["worker", *instance.eal(), "--", "--id", "0"])
    assert r.returncode == 1 and "owned by live pid" in r.stderr


def test_worker_bad_id_and_no_instance(instance):
    r = instance.run(["worker", *instance.eal(), "--", "--id", "0"])
    assert r.returncode == 1 and "start its primary first" in r.stderr
    r = instance.run(["worker", *instance.eal()])
    assert r.returncode == 2


def _load(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_a_worker_stopped_inside_a_pass_cannot_be_fenced_and_an_idle_one_is(gateway):
    """DESIGN invariant 1 against SIGSTOP at any instruction: the fence refuses a worker stopped
    mid-pass (it may be between any two stores of its burst), and fences an idle one for good."""
    from hotplane.shared.queue_owner import FENCE_BUSY, FENCED, fence, hand_back

    instance, inst, pin, pout, counters = gateway
    w = start_worker(instance)
    words = [pin.queues[0].words, pout.queues[0].words]
    gen = Generator(FlowSet.make(16, "udp", 100, dst_mac=GW_INSIDE_MAC), burst=64)
    rng = np.random.default_rng(3)
    out = np.zeros((256, 2048), np.uint8)
    ln = np.zeros(256, np.uint32)

    def feed():  # keep the worker busy: frames in, frames out
        pout.peer_recv(256, out, ln)
        k = min(pin.rx_rings[0].peer_space(), 64)
        if k:
            fr, l = gen.fill(rng.integers(0, 16, k))
            pin.peer_send(fr, l)

    try:
        assert _load("_stop_util").stop_when(w.pid, words, True, feed), "never caught the worker inside a pass"
        before = [int(x[W_OWNER]) for x in words]
        assert fence(words[0], w.pid) == FENCE_BUSY
        assert [int(x[W_OWNER]) for x in words] == before, "a refused fence changes nothing"
        w.send_signal(signal.SIGCONT)
        # Resumed, it is still the owner and carries on.
        for _ in range(50):
            feed()
        assert w.poll() is None

        assert _load("_stop_util").stop_when(w.pid, words, False), "never caught the worker between passes"
        assert all(fence(x, w.pid) == FENCED for x in words)
        assert all(hand_back(x, w.pid) for x in words)
        snap = [(int(x[W_OWNER]), int(x[W_RX_CURSOR]), int(x[2]), int(x[3])) for x in words]
        feed()  # frames waiting for a poller that must not come
        w.send_signal(signal.SIGCONT)
        assert w.wait(timeout=20) == 3, "a fenced worker, resumed, exits with EXIT_FENCED"
        assert [(int(x[W_OWNER]), int(x[W_RX_CURSOR]), int(x[2]), int(x[3])) for x in words] == snap, \
            "the resumed worker touched its queues (owner, RX/TX cursor or last poll moved)"
    finally:
        if w.poll() is None:
            w.send_signal(signal.SIGCONT)
            w.kill()
            w.wait(10)
