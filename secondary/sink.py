"""``hotplane sink``: the verifying sink -- counts every stamped packet, exactly.

``hotplane sink [EAL] -- --port SPEC [options]``

* ``--port ring:NAME``: attaches to the instance as a secondary and reads the
  port's TX rings from the peer side (every queue), as the kernel's send
  would: what the workers transmitted on that port.
* ``--port af_packet:IFACE``: needs no instance; reads IFACE (in the current
  network namespace) through its own AF_PACKET socket with an RX ring
  (frames this host sends itself are ignored). An explicit ``--file-prefix``
  also publishes its figures to that instance's ``traffic`` zone.
* ``--port pcap:FILE``: needs no instance; verifies the frames of a capture
  file (what a ``pcap:FILE,mode=capture`` port or ``tcpdump -w`` wrote), to
  the end of the file (or ``--duration``). A truncated file or one of another
  link type is refused before anything is counted.

``--capture FILE`` also writes every frame the sink receives into FILE (pcap,
for tcpdump or Wireshark), whatever the port.

Each packet's IPv4 and L4 checksums, stamp (flow id, sequence, check word)
and fill are verified (:class:`hotplane.shared.traffic.Sink`); per flow it
counts received, lost, duplicated, reordered and corrupted (by reason).
Frames that are not ours (ARP, stray traffic) are counted apart as
``not_ours``. Loss is exact with ``--expect FILE`` (the generator's
``--report``: per-flow sent counts, ring drops included); without it, it is
the gaps below each flow's highest sequence seen (tail loss is invisible).

The run ends at ``--duration``, or ``--idle-exit S`` seconds after the last
packet once some arrived, or on SIGTERM/SIGINT. With ``--expect`` the sink
then waits for the file (at most ``--expect-wait`` s, still draining), drains
what is still in flight, and reports. Once its port is open it reports
READY (to the supervisor named by ``$HOTPLANE_SUPERVISOR_SOCKET``, and as a
first line on stdout: ``READY sink pid N``, or JSON with ``"event": "ready"``
under ``--json``; ``sink: ready on PORT`` also goes to stderr). Progress
line every second on stderr; final report as a table (``--per-flow``: with
one row per flow) or, with ``--json``, JSON as the last line of stdout.

Exit codes (for tests and CI): 0 clean -- packets arrived and none was lost,
duplicated or corrupted (reordering is reported, and fails only with
``--fail-on-reorder``); 1 anything lost, duplicated or corrupted, nothing
received, the expected report missing, or the sink could not run;
2 usage (bad options or port spec).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

import numpy as np

from hotplane.secondary.gen import GenError, TrafficSlot, UsageProblem, attach_ring, eal_prefix_given
from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit

PROGRESS_INTERVAL = 1.0
SLOT_INTERVAL = 0.1
DEFAULT_DURATION = 10.0
DEFAULT_EXPECT_WAIT = 30.0
FINAL_DRAIN_IDLE = 0.2
FINAL_DRAIN_MAX = 2.0
# Ring source pacing. Verifying costs mostly per call, so a sink that wakes for every frame of
# light traffic spends half a core on it: while polls bring fewer than LIGHT_BURST frames
# (or none), the sleep between them doubles up to IDLE_WAIT_MAX, so light traffic is
# verified a few frames at a time; a fuller poll polls again at once. A ring holds several
# ms of traffic at the rates our workers forward, so the longest sleep loses nothing.
IDLE_WAIT_MIN, IDLE_WAIT_MAX = 200e-6, 4e-3
LIGHT_BURST = 8
VERIFY_BURST = 2048  # verification cost is mostly per call: verify big bursts


class RingSource:
    """The peer side of a ring port's TX rings (all queues)."""

    kind = "ring"

    def __init__(self, port, burst: int, arp: dict[int, bytes] | None = None) -> None:
        self.port = port
        self.frames = np.zeros((burst, port.frame_size), np.uint8)
        self.lengths = np.zeros(burst, np.uint32)
        self.burst = burst
        # Addresses this sink answers ARP for, as the hosts behind a real port would:
        # a gateway resolves its next hop before it forwards anything.
        self.arp = arp or {}
        self.arp_replies = 0
        self.idle = IDLE_WAIT_MIN

    def poll(self, verify) -> int:
        got = self.port.peer_recv(self.burst, self.frames, self.lengths)
        if got >= LIGHT_BURST:
            self.idle = IDLE_WAIT_MIN
        if got:
            lens = self.lengths[:got]
            if self.arp:
                self._answer_arp(got)
            verify(self.frames[:got, : int(lens.max())], lens)
        return got

    def _answer_arp(self, got: int) -> None:
        from hotplane.shared.packet import build_arp_reply, parse_arp

        is_arp = (self.frames[:got, 12] == 0x08) & (self.frames[:got, 13] == 0x06)
        for i in np.flatnonzero(is_arp):
            a = parse_arp(bytes(self.frames[i, : self.lengths[i]]))
            if a is None or a.op != 1 or a.tpa not in self.arp:
                continue
            reply = np.frombuffer(build_arp_reply(self.arp[a.tpa], a.tpa, a.sha, a.spa), np.uint8)
            self.port.peer_send(reply.reshape(1, -1), np.array([reply.size], np.uint32))
            self.arp_replies += 1

    def wait(self, timeout: float) -> None:
        # Back off while nothing comes (a test instance at 800 pps polled every 200 us
        # spent a fifth of a core on empty rings); any frame resets it.
        time.sleep(min(timeout, self.idle))
        self.idle = min(self.idle * 2, IDLE_WAIT_MAX)

    def drops(self) -> int:
        return 0

    def close(self) -> None:
        pass


class AfPacketSource:
    """Our own RX ring on an interface (TPACKET_V2), read with the burst engine."""

    kind = "af_packet"

    def __init__(self, iface: str, slots: int, burst: int) -> None:
        from hotplane.schema.port import QUEUE_WORDS
        from hotplane.shared.af_packet import AfPacketError, RingParams, map_af_packet_queue, open_af_packet_queues
        from hotplane.shared.burst import Queue
        from hotplane.shared.frame_ring import FrameRing

        try:
            (self.afq,) = open_af_packet_queues(iface, 1, "rss", RingParams(frame_size=2048, frame_nr=slots, tx_frame_nr=2))
        except AfPacketError as e:
            raise GenError(str(e)) from None
        rx, tx, self.doorbell = map_af_packet_queue(self.afq.fd, self.afq.params)
        self.q = Queue(FrameRing.from_frames(rx), FrameRing.from_frames(tx), np.zeros(QUEUE_WORDS, "<u8"))
        self.poller = select.poll()
        self.poller.register(self.afq.fd, select.POLLIN)
        self.burst = burst

    def poll(self, verify) -> int:
        from hotplane.shared.burst import rx_burst, rx_release

        total = 0
        # Two bursts at most: a burst stops at the ring's wrap.
        for _ in range(2):
            b = rx_burst(self.q, self.burst - total)
            if b.n == 0:
                break
            if b.all_valid:
                verify(b.frames[:, : int(b.lengths.max())], b.lengths)
            else:
                # Runt/truncated descriptors: still frames that reached us; the sink judges them.
                verify(b.frames[:, : max(1, int(b.lengths.max()))], np.minimum(b.lengths, b.frames.shape[1]).astype(np.uint32))
            rx_release(self.q, b)
            total += b.n
            if total >= self.burst:
                break
        return total

    def wait(self, timeout: float) -> None:
        self.poller.poll(max(0, int(timeout * 1000)) or 1)

    def drops(self) -> int:
        return self.afq.read_kernel_stats().drops

    def close(self) -> None:
        self.doorbell.close()
        self.afq.close()


class PcapSource:
    """A capture file, read in bursts to its end."""

    kind = "pcap"

    def __init__(self, path: str, burst: int) -> None:
        from hotplane.shared.pcap_port import PcapError, PcapReader

        try:
            self.reader = PcapReader(path)
            self.records = self.reader.scan()  # refuse a cut or corrupt file before counting anything
        except PcapError as e:
            raise GenError(str(e)) from None
        except OSError as e:
            raise GenError(f"cannot read {path}: {e.strerror or e}") from None
        self.burst = burst
        self.exhausted = False

    def poll(self, verify) -> int:
        b = self.reader.read_batch(self.burst)
        if b is None:
            self.exhausted = True
            return 0
        verify(b.frames, b.lengths)
        return len(b)

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.01))  # only called once the file is read: nothing more will come

    def drops(self) -> int:
        return 0

    def close(self) -> None:
        self.reader.close()


class SinkRun:
    def __init__(self, app: argparse.Namespace, source, slot: TrafficSlot | None) -> None:
        from hotplane.shared.packet import ParsedBurst
        from hotplane.shared.traffic import Sink

        self.app = app
        self.source = source
        self.slot = slot
        self.sink = Sink(max_flows=app.max_flows, parsed=ParsedBurst(VERIFY_BURST))
        self.received_frames = 0
        self.bytes = 0
        self.stop = False
        self.expect: dict | None = None
        self.expect_error: str | None = None
        self.first_rx: float | None = None
        self.last_rx: float | None = None
        self.capture = None  # a PcapWriter with --capture FILE

    def _verify(self, frames: np.ndarray, lengths: np.ndarray) -> None:
        self.sink.verify(frames, lengths)
        self.bytes += int(lengths.sum())
        if self.capture is not None:
            self.capture.write_burst(frames, lengths)

    def _pump(self) -> int:
        got = self.source.poll(self._verify)
        if got:
            now = time.monotonic()
            self.received_frames += got
            if self.first_rx is None:
                self.first_rx = now
            self.last_rx = now
        return got

    def run(self) -> dict:
        app = self.app
        start = time.monotonic()
        self.start = start
        next_progress = start + PROGRESS_INTERVAL
        next_slot = start
        prog_n, prog_t = 0, start
        end = start + app.duration
        while not self.stop:
            got = self._pump()
            now = time.monotonic()
            if now >= next_progress:
                self._progress(now - start, (self.received_frames - prog_n) / (now - prog_t))
                prog_n, prog_t = self.received_frames, now
                next_progress = max(next_progress + PROGRESS_INTERVAL, now)
            if self.slot is not None and now >= next_slot:
                self._publish()
                next_slot = now + SLOT_INTERVAL
            if now >= end:
                break
            if app.idle_exit is not None and self.last_rx is not None and now - self.last_rx >= app.idle_exit:
                break
            if getattr(self.source, "exhausted", False):
                break  # a file source: its last frame was read
            if got < LIGHT_BURST and (got == 0 or self.source.kind == "ring"):
                self.source.wait(min(0.01, max(0.0, end - now)))
        self.recv_elapsed = time.monotonic() - start
        if app.expect:
            self._load_expect()
            self._final_drain()
        doc = self.result()
        if self.slot is not None:
            self._publish(final=True, doc=doc)
        return doc

    def _load_expect(self) -> None:
        """Wait (bounded, still draining) for the generator's report; then read it."""
        path = Path(self.app.expect)
        deadline = time.monotonic() + self.app.expect_wait
        while not path.exists():
            if self.stop or time.monotonic() >= deadline:
                self.expect_error = f"no generator report at {path} after {self.app.expect_wait:g} s: loss is not exact"
                return
            if not self._pump():
                self.source.wait(0.01)
        try:
            doc = json.loads(path.read_text())
            sent = doc["per_flow_sent"]
            int(doc.get("first_id", 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.expect_error = f"cannot read the generator report {path}: {e}"
            return
        self.expect = doc

    def _final_drain(self) -> None:
        """Take what is still in flight: until nothing came for a moment (bounded)."""
        t0 = time.monotonic()
        quiet_since = t0
        while time.monotonic() - t0 < FINAL_DRAIN_MAX:
            if self._pump():
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= FINAL_DRAIN_IDLE:
                break
            else:
                self.source.wait(0.005)

    def _progress(self, el: float, pps: float) -> None:
        s = self.sink
        lost = s.lost_so_far()
        print(f"sink: {el:6.1f}s {pps:12,.0f} pps  received {int(s.received.sum()):,}  gaps {lost:,}  dup {int(s.dups.sum()):,}  "
              f"corrupt {s.corrupted:,}  not ours {s.not_ours:,}", file=sys.stderr, flush=True)

    def _publish(self, final: bool = False, doc: dict | None = None) -> None:
        s = self.sink
        if doc is None:
            lost = s.lost_so_far()
            fields = dict(packets=int(s.received.sum()), bytes=self.bytes, lost=lost, duplicated=int(s.dups.sum()),
                          reordered=int(s.reord.sum()), corrupted=int(s.corrupted), flows=int(np.count_nonzero(s.received)))
        else:
            fields = dict(packets=doc["received"], bytes=self.bytes, lost=doc["lost"], duplicated=doc["duplicated"],
                          reordered=doc["reordered"], corrupted=doc["corrupted"], flows=len(doc["flows"]))
        if final:
            self.slot.finish(**fields)
        else:
            self.slot.update(**fields)

    def result(self) -> dict:
        app = self.app
        sent = first_id = None
        if self.expect is not None:
            sent = np.asarray(self.expect["per_flow_sent"], np.int64)
            first_id = int(self.expect.get("first_id", 0))
        rep = self.sink.report(sent=sent, first_id=first_id or 0)
        active = (self.last_rx - self.first_rx) if self.first_rx is not None and self.last_rx is not None else 0.0
        rep.update({
            "tool": "sink",
            "name": app.name,
            "port": app.port,
            "frames": self.received_frames,
            "bytes": self.bytes,
            "duration": round(self.recv_elapsed, 6),
            "active": round(active, 6),
            "pps": (rep["received"] / active) if active > 0 else 0.0,
            "kernel_drops": self.source.drops(),
        })
        if self.expect is not None:
            rd = int(self.expect.get("ring_drops", 0))
            rep["generator"] = {k: self.expect.get(k) for k in ("name", "port", "generated", "sent", "ring_drops", "pps", "duration")}
            rep["lost_ring_drops"] = rd
            rep["lost_in_path"] = rep["lost"] - rd
        if self.expect_error:
            rep["expect_error"] = self.expect_error
        problems = []
        if rep["received"] == 0:
            problems.append("nothing received")
        for k in ("lost", "duplicated", "corrupted"):
            if rep[k]:
                problems.append(f"{k} {rep[k]}")
        if rep["beyond_max_flows"]:
            problems.append(f"{rep['beyond_max_flows']} packets of flow ids >= --max-flows {app.max_flows} (not counted per flow)")
        if app.fail_on_reorder and rep["reordered"]:
            problems.append(f"reordered {rep['reordered']}")
        if self.expect_error:
            problems.append(self.expect_error)
        rep["clean"] = not problems
        rep["problems"] = problems
        return rep


def print_table(doc: dict, per_flow: bool, out=sys.stdout) -> None:
    print("== hotplane sink ==", file=out)
    rows = [
        ("port", doc["port"]),
        ("received", f"{doc['received']:,}" + (f" of {doc['expected']:,} expected" + (" (exact)" if doc["exact_loss"] else " (from sequence gaps)"))),
        ("lost", f"{doc['lost']:,}" + (f"  (generator ring drops {doc['lost_ring_drops']:,}, in the path {doc['lost_in_path']:,})" if "lost_ring_drops" in doc else "")),
        ("duplicated", f"{doc['duplicated']:,}"),
        ("reordered", f"{doc['reordered']:,}"),
        ("corrupted", f"{doc['corrupted']:,}" + (" (" + ", ".join(f"{k} {v}" for k, v in doc["corrupted_by_reason"].items() if v)
                                                  + f"; {doc['corrupted_unattributed']:,} without a readable flow)" if doc["corrupted"] else "")),
        ("not ours", f"{doc['not_ours']:,}"),
        ("rate", f"{doc['pps']:,.0f} pps over {doc['active']:.3f} s"),
        ("verdict", "clean" if doc["clean"] else "NOT CLEAN: " + "; ".join(doc["problems"])),
    ]
    for k, v in rows:
        print(f"{k:>11}: {v}", file=out)
    if per_flow:
        print(f"{'flow':>8} {'expected':>10} {'received':>10} {'lost':>8} {'dup':>6} {'reord':>6} {'corrupt':>7}", file=out)
        for f in doc["flows"]:
            print(f"{f['flow']:>8} {f['expected']:>10,} {f['received']:>10,} {f['lost']:>8,} {f['duplicated']:>6,} {f['reordered']:>6,} {f['corrupted']:>7,}", file=out)


def app_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hotplane sink [EAL] --",
        description="verifying sink: received, lost, duplicated, reordered, corrupted -- per flow and in total",
        epilog="exit codes: 0 clean; 1 lost/duplicated/corrupted, nothing received, or failure; 2 usage",
    )
    ap.add_argument("--port", help="ring:NAME (reads the port's TX rings, all queues), af_packet:IFACE (own RX ring in this netns) "
                    "or pcap:FILE (verifies a capture file)")
    ap.add_argument("--duration", type=float, default=None, help=f"seconds to receive at most (default {DEFAULT_DURATION:g}; pcap: the whole file)")
    ap.add_argument("--capture", metavar="FILE", help="also write every frame received into this pcap file")
    ap.add_argument("--idle-exit", type=float, help="stop S seconds after the last packet, once some arrived")
    ap.add_argument("--expect", metavar="FILE", help="the generator's --report: exact loss (waits for it, bounded)")
    ap.add_argument("--expect-wait", type=float, default=DEFAULT_EXPECT_WAIT, help=f"seconds to wait for --expect FILE (default {DEFAULT_EXPECT_WAIT:g})")
    ap.add_argument("--per-flow", action="store_true", help="table of flows in the text report")
    ap.add_argument("--json", action="store_true", help="final report as JSON on stdout (always with per-flow figures)")
    ap.add_argument("--name", help="slot name in the instance's traffic zone (default sink-PID)")
    ap.add_argument("--burst", type=int, default=VERIFY_BURST, help=f"frames per poll (default {VERIFY_BURST})")
    ap.add_argument("--slots", type=int, default=8192, help="af_packet: RX ring slots (default 8192)")
    ap.add_argument("--max-flows", type=int, default=1 << 20, help="highest flow id + 1 the sink accepts (default 1048576)")
    ap.add_argument("--fail-on-reorder", action="store_true", help="exit 1 when anything was reordered too")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--arp", action="append", default=[], metavar="IP",
                    help="ring ports: answer ARP requests for IP (repeatable), as the host behind the port would")
    ap.add_argument("--mac", default="02:68:70:00:02:01", help="the MAC --arp answers with (default 02:68:70:00:02:01)")
    return ap


def check_app(app: argparse.Namespace) -> None:
    if not app.port:
        raise UsageProblem("--port is required: ring:NAME, af_packet:IFACE or pcap:FILE")
    if app.duration is not None and app.duration <= 0:
        raise UsageProblem("--duration must be > 0 seconds")
    if app.duration is None:
        app.duration = float("inf") if app.port.lower().startswith("pcap:") else DEFAULT_DURATION
    if app.idle_exit is not None and app.idle_exit <= 0:
        raise UsageProblem("--idle-exit must be > 0 seconds")
    if app.expect_wait < 0:
        raise UsageProblem("--expect-wait must be >= 0")
    if not 1 <= app.burst <= 1 << 16:
        raise UsageProblem("--burst must be 1..65536")
    if app.slots < 16 or app.slots & (app.slots - 1):
        raise UsageProblem("--slots must be a power of two >= 16")
    if not 1 <= app.max_flows <= 1 << 24:
        raise UsageProblem("--max-flows must be 1..16777216")
    if app.name is None:
        app.name = f"sink-{os.getpid()}"


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane sink", role="secondary")
    try:
        app = app_parser().parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    from hotplane.shared.ring_port import parse_port_spec

    try:
        check_app(app)
        spec = parse_port_spec(app.port)
        if opts.vdevs:
            raise UsageProblem(f"--vdev {opts.vdevs[0]} is not supported: the sink's port is --port SPEC (after --)")
        if app.capture and spec.type == "pcap" and os.path.abspath(app.capture) == os.path.abspath(spec.name):
            raise UsageProblem(f"--capture {app.capture} is the file --port reads")
    except (UsageProblem, ValueError) as e:
        print(f"hotplane sink: {e}", file=sys.stderr)
        return EXIT_USAGE
    inst = slot = source = capture = None
    try:
        if spec.type == "ring" or eal_prefix_given(argv):
            from hotplane.shared.instance import InstanceError, eal_init

            try:
                inst = eal_init(opts)
            except InstanceError as e:
                raise GenError(str(e)) from None
        else:
            from hotplane.shared.eal import apply_affinity

            apply_affinity(opts)
        if spec.type == "ring":
            from hotplane.shared.memzone import MemzoneError

            try:
                import ipaddress

                from hotplane.shared.packet import mac_bytes

                arp = {int(ipaddress.IPv4Address(ip)): mac_bytes(app.mac) for ip in app.arp}
                source = RingSource(attach_ring(inst, app.port, spec), app.burst, arp)
            except (MemzoneError, ValueError) as e:
                raise GenError(str(e)) from None
        elif spec.type == "pcap":
            source = PcapSource(spec.name, app.burst)
        else:
            source = AfPacketSource(spec.name, app.slots, app.burst)
        if app.capture:
            from hotplane.shared.pcap_port import PcapWriter

            try:
                capture = PcapWriter(app.capture)
            except OSError as e:
                raise GenError(f"cannot write --capture {app.capture}: {e.strerror or e}") from None
        if inst is not None:
            from hotplane.schema.traffic import KIND_SINK

            slot = TrafficSlot.claim(inst, app.name, KIND_SINK)
        run = SinkRun(app, source, slot)
        run.capture = capture
        # Scripts and tests wait for this line before they start sending.
        print(f"sink: ready on {app.port}", file=sys.stderr, flush=True)
        from hotplane.shared.ready import report_ready

        report_ready("sink", {"tool": "sink", "port": app.port, "slot": app.name}, as_json=app.json)

        def on_signal(*_):
            run.stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if app.quiet:
            run._progress = lambda *a: None  # type: ignore[method-assign]
        doc = run.run()
    except GenError as e:
        print(f"hotplane sink: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if source is not None:
            source.close()
        if capture is not None:
            capture.close()
        if slot is not None and slot.rec["running"][0]:
            slot.finish()
        if inst is not None:
            slot = None
            inst.close()
    if app.json:
        print(json.dumps(doc))
    else:
        print_table(doc, app.per_flow)
    if doc.get("expect_error"):
        print(f"hotplane sink: {doc['expect_error']}", file=sys.stderr)
    return EXIT_OK if doc["clean"] else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
