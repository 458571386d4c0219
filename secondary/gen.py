"""``hotplane gen``: the traffic generator -- stamped flows into a ring or an af_packet port.

``hotplane gen [EAL] -- --port SPEC [options]``

* ``--port ring:NAME``: attaches to the instance (``--file-prefix``) as a
  secondary and feeds the port's RX rings from the peer side, as a NIC
  would: frames are steered to queues with the port's steering (the same
  function the primary's port uses, so both directions of a flow meet one
  worker). A full RX ring drops the frame like a NIC does and counts it as a
  *ring drop*; its sequence number is consumed, so the sink sees it lost.
  ``--no-drop`` waits for ring space instead (max-rate runs).
* ``--port af_packet:IFACE``: needs no instance; opens its own AF_PACKET
  socket with a TX ring (TPACKET_V2, qdisc bypass) on IFACE in the current
  network namespace, e.g. ``ip netns exec hp-inside hotplane gen -- --port
  af_packet:eth0 ...``. The TX ring is the generator's own send queue, so a
  full one means the kernel has not sent yet: the generator waits for it
  (never drops) and reports the rate it achieved. Source MAC: the
  interface's; destination MAC: ``--dst-mac`` or the next hop's, from the
  kernel's neighbour table (resolved with one ping to the next hop if absent).
  With an explicit ``--file-prefix`` it also publishes its figures to that
  instance's ``traffic`` zone.
* ``--port pcap:FILE``: needs no instance; writes the frames to FILE (classic
  pcap, readable by tcpdump and Wireshark) instead of sending them. With a
  ``--rate`` the run is not paced by the wall clock: it is computed, and the
  packets are stamped ``1/rate`` apart (``--duration`` is then the span of the
  capture), so a file for a replay (``hotplane primary -- --inside
  pcap:FILE``) or for the sink (``hotplane sink -- --port pcap:FILE``) is
  made in moments.

``--replay FILE`` sends the frames of a capture instead of generated flows,
into any of these ports, at the recorded rate (``--rate recorded``, the
default: the file's gaps are kept) or as fast as the port takes them
(``--rate max``), ``--loop N`` times. A truncated file or one of another link
type is refused before anything is sent (``--allow-truncated`` replays the
whole records of a cut file).

Every packet carries a flow id, a sequence number and a check word
(:mod:`hotplane.shared.traffic`). Pacing is a token bucket on the monotonic
clock (``--rate`` packets/s, 0 = as fast as possible); ``--new-flow-rate``
starts flows progressively; the run ends at ``--duration`` (or after
``--count`` packets). Once its port is open it reports READY (to the
supervisor when ``$HOTPLANE_SUPERVISOR_SOCKET`` names one, and as a first
line on stdout: ``READY gen pid N``, or a JSON line with ``"event": "ready"``
under ``--json``). A progress line goes to stderr every second; the final
report is a table (or, with ``--json``, the last line: JSON) on stdout; ``--report FILE``
writes the per-flow sent counts the sink's ``--expect`` needs for exact loss.

Exit codes: 0 done, 1 failure (no instance, no interface, no permission),
2 usage (bad options or port spec).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit
from hotplane.shared.pcap_port import PcapError

PROGRESS_INTERVAL = 1.0
SLOT_INTERVAL = 0.1
MAX_SLEEP = 0.05
MAX_SENDS_PER_S = 100.0  # paced sends a second at most, at low rates (see Generator.run)
DEFAULT_DURATION = 10.0
REPORT_VERSION = 1


class GenError(Exception):
    """The generator cannot run; the message says what to do (exit code 1)."""


class UsageProblem(Exception):
    """Bad options (exit code 2)."""


# --- the instance's traffic zone ------------------------------------------------------------


class TrafficSlot:
    """This process's slot in the instance's ``traffic`` zone (schema traffic_stats).

    Claimed under a file lock in the runtime directory: a never-used slot
    first, then one whose owner finished or died (the oldest). One writer per
    slot; counters only grow; ``updated_ns`` is written last.
    """

    def __init__(self, rec: np.ndarray) -> None:
        self.rec = rec

    @classmethod
    def claim(cls, inst, name: str, kind: int) -> "TrafficSlot | None":
        import fcntl

        from hotplane.schema.traffic import TRAFFIC_STATS

        z = inst.directory.lookup("traffic")
        if z is None:
            return None
        from hotplane.schema.registry import verify

        verify(z.header(TRAFFIC_STATS)[0], TRAFFIC_STATS)
        slots = z.elements(TRAFFIC_STATS, int(z.header(TRAFFIC_STATS)[0]["nslots"]))
        fd = os.open(inst.runtime_dir / "traffic.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            best, best_key = None, None
            for i in range(slots.shape[0]):
                pid, running = int(slots[i]["pid"]), int(slots[i]["running"])
                if pid == 0:
                    key = (0, 0)
                elif not running or not _pid_alive(pid):
                    key = (1, int(slots[i]["updated_ns"]))
                else:
                    continue
                if best_key is None or key < best_key:
                    best, best_key = i, key
            if best is None:
                return None
            rec = slots[best : best + 1]
            rec["running"] = 0
            for f in ("packets", "bytes", "ring_drops", "lost", "duplicated", "reordered", "corrupted", "flows"):
                rec[f] = 0
            rec["name"] = name.encode()[:24]
            rec["kind"] = kind
            rec["pid"] = os.getpid()
            now = time.time_ns()
            rec["started_ns"] = now
            rec["updated_ns"] = now
            rec["running"] = 1
            return cls(rec)
        finally:
            os.close(fd)

    def update(self, **fields: int) -> None:
        r = self.rec
        for k, v in fields.items():
            r[k] = v
        r["updated_ns"] = time.time_ns()

    def finish(self, **fields: int) -> None:
        self.update(**fields)
        self.rec["running"] = 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def eal_prefix_given(argv: list[str]) -> bool:
    """Whether ``--file-prefix`` appears among the EAL options (before ``--``)."""
    eal = argv[: argv.index("--")] if "--" in argv else argv
    return any(a == "--file-prefix" or a.startswith("--file-prefix=") for a in eal)


def primary_port_steering(inst, spec):
    """The steering of the primary's port with the same ring name (the port's own), or None."""
    from hotplane.shared.ipc import IpcError, request_sync
    from hotplane.shared.ring_port import parse_port_spec

    try:
        cfg = request_sync(str(inst.runtime_dir / "primary.sock"), "config", timeout=3.0).result
    except (IpcError, OSError):
        return None
    for role in ("inside", "outside"):
        s = cfg.get(role)
        if not s:
            continue
        ps = parse_port_spec(s)
        if ps.type == spec.type and ps.name == spec.name:
            return ps.steering()
    return None


def attach_ring(inst, raw_spec: str, spec):
    """Attach to ``ring:NAME``; steering from the spec if it names one, else the primary's port's."""
    from hotplane.shared.ports import attach_ring_port
    from hotplane.shared.steering import Steering

    steering = None
    if "steer=" not in raw_spec:
        steering = primary_port_steering(inst, spec)
    port = attach_ring_port(inst.directory, spec)
    if steering is None:
        o = spec.options
        steering = Steering(o.get("steer", "rss"), port.nqueues, port_lo=o.get("port_lo", 1024), block=o.get("block"))
    if steering.nqueues != port.nqueues:
        steering = Steering(steering.mode, port.nqueues, port_lo=steering.port_lo, block=None)
    port.steering = steering
    return port


# --- MAC addresses and next hops (af_packet) --------------------------------------------------


def parse_mac(s: str) -> bytes:
    parts = s.replace("-", ":").split(":")
    if len(parts) != 6:
        raise UsageProblem(f"bad MAC address {s!r}: use xx:xx:xx:xx:xx:xx")
    try:
        b = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise UsageProblem(f"bad MAC address {s!r}: use xx:xx:xx:xx:xx:xx") from None
    return b


def _ip_json(*args: str) -> list:
    try:
        p = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise GenError(f"`ip {' '.join(args)}` failed ({e}): give --dst-mac") from None
    if p.returncode != 0:
        raise GenError(f"`ip {' '.join(args)}` failed: {p.stderr.strip()}; give --dst-mac")
    try:
        return json.loads(p.stdout or "[]")
    except json.JSONDecodeError:
        return []


def resolve_dst_mac(iface: str, dst: str, timeout: float = 3.0) -> bytes:
    """The MAC of ``dst``'s next hop on ``iface`` from the neighbour table; ping the next hop once if it is not there."""
    routes = _ip_json("route", "get", dst, "oif", iface)
    if not routes:
        raise GenError(f"no route to {dst} via {iface} in this network namespace: add one, or give --dst-mac")
    nh = routes[0].get("gateway") or dst
    deadline = time.monotonic() + timeout
    pinged = False
    while True:
        for n in _ip_json("neigh", "show", "to", nh, "dev", iface):
            state = n.get("state") or []
            if n.get("lladdr") and not ({"FAILED", "INCOMPLETE"} & set(state)):
                return parse_mac(n["lladdr"])
        if time.monotonic() > deadline:
            raise GenError(f"cannot resolve the MAC of next hop {nh} on {iface} (no ARP answer): give --dst-mac")
        if not pinged:
            # One echo request makes the kernel resolve the next hop (whether or not it answers the ping).
            subprocess.run(["ping", "-c", "1", "-W", "1", "-I", iface, nh], capture_output=True, timeout=5)
            pinged = True
        else:
            time.sleep(0.1)


# --- targets: where frames go -----------------------------------------------------------------


class RingTarget:
    """The peer side of a ring port's RX rings."""

    kind = "ring"

    def __init__(self, port, no_drop: bool) -> None:
        self.port = port
        self.no_drop = no_drop
        self.nqueues = port.nqueues
        self.flow_queue: np.ndarray | None = None

    def prepare(self, gen) -> None:
        """Every flow's queue, once: steering depends only on headers, which a flow keeps."""
        t = gen.templates[1]
        self.flow_queue = np.asarray(self.port.steering(t, np.full(t.shape[0], t.shape[1], np.uint32)), np.intp)

    def space(self, flow_idx: np.ndarray) -> int:
        """How many of ``flow_idx`` (in order) fit now without a drop (prefix length)."""
        if self.nqueues == 1:
            return min(flow_idx.size, self.port.rx_rings[0].peer_space(flow_idx.size))
        q = self.flow_queue[flow_idx]
        room = np.array([r.peer_space(flow_idx.size) for r in self.port.rx_rings], np.int64)
        # The k-th frame of queue j (in burst order) fits while k < room[j].
        onehot = np.zeros((flow_idx.size, self.nqueues), np.int64)
        onehot[np.arange(flow_idx.size), q] = 1
        rank = (np.cumsum(onehot, axis=0) - 1)[np.arange(flow_idx.size), q]
        over = np.flatnonzero(rank >= room[q])
        return int(over[0]) if over.size else flow_idx.size

    def send(self, frames: np.ndarray, lengths: np.ndarray, flow_idx: np.ndarray) -> int:
        q = None if self.nqueues == 1 else self.flow_queue[flow_idx]
        return int(self.port.peer_send(frames, lengths, q).sum())

    def offer(self, frames: np.ndarray, lengths: np.ndarray, ts_ns=None) -> tuple[int, int]:
        """Arbitrary frames (a replay), steered by the port: ``(queued, dropped)``; with no_drop only what fits is taken."""
        n = int(lengths.shape[0])
        if not self.no_drop:
            sent = int(self.port.peer_send(frames, lengths).sum())
            return sent, n - sent
        queues = self.port.steering(frames, lengths) if self.nqueues > 1 else np.zeros(n, np.int64)
        room = np.array([r.peer_space(n) for r in self.port.rx_rings], np.int64)
        onehot = np.zeros((n, self.nqueues), np.int64)
        onehot[np.arange(n), queues] = 1
        rank = (np.cumsum(onehot, axis=0) - 1)[np.arange(n), queues]
        over = np.flatnonzero(rank >= room[queues])
        k = int(over[0]) if over.size else n
        if k:
            self.port.peer_send(frames[:k], lengths[:k], queues[:k] if self.nqueues > 1 else None)
        return k, 0

    def close(self) -> None:
        pass


def open_tx_ring(iface: str, params):
    """An AF_PACKET socket on ``iface`` with only a TPACKET_V2 TX ring: ``(sock, tx_frames, doorbell, info)``."""
    import mmap

    from hotplane.shared import af_packet as afp

    params = params.resolved()
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing
    except PermissionError:
        raise GenError(f"AF_PACKET needs root or CAP_NET_RAW to send on {iface}: run as root") from None
    try:
        try:
            info = afp.interface_info(s, iface)
        except afp.AfPacketError as e:
            raise GenError(str(e)) from None
        if not info.up:
            raise GenError(f"interface {iface} is down: `ip link set {iface} up`")
        s.setsockopt(afp.SOL_PACKET, afp.PACKET_VERSION, afp.TPACKET_V2)
        s.setsockopt(afp.SOL_PACKET, afp.PACKET_LOSS, 1)
        try:
            s.setsockopt(afp.SOL_PACKET, afp.PACKET_TX_RING, params.tpacket_req(tx=True))
        except OSError as e:
            raise GenError(f"the kernel refused a TX ring of {params.tx_frame_nr} x {params.frame_size} B on {iface}: {e}") from None
        s.setsockopt(afp.SOL_PACKET, afp.PACKET_QDISC_BYPASS, 1)
        s.bind((iface, 0))
        mm = mmap.mmap(s.fileno(), params.tx_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        tx = np.frombuffer(mm, np.uint8).reshape(params.tx_frame_nr, params.frame_size)
        return s, tx, afp.Doorbell(s), info
    except BaseException:
        s.close()
        raise


class AfPacketTarget:
    """Our own TX ring on an interface: frames go out with one ``send()`` per burst."""

    kind = "af_packet"

    def __init__(self, iface: str, slots: int) -> None:
        from hotplane.schema.port import QUEUE_WORDS
        from hotplane.shared.af_packet import RingParams
        from hotplane.shared.burst import Queue
        from hotplane.shared.frame_ring import FrameRing

        self.sock, tx, self.doorbell, self.info = open_tx_ring(iface, RingParams(frame_size=2048, frame_nr=slots, tx_frame_nr=slots))
        ring = FrameRing.from_frames(tx)
        self.q = Queue(ring, ring, np.zeros(QUEUE_WORDS, "<u8"), self.doorbell)
        self.no_drop = True  # our own send queue: waiting is the only sensible thing

    def prepare(self, gen) -> None:
        pass

    def space(self, flow_idx: np.ndarray) -> int:
        from hotplane.shared.burst import tx_space

        room = tx_space(self.q, flow_idx.size)
        if room < flow_idx.size:
            self.doorbell()  # make sure the kernel is draining what is queued
        return room

    def send(self, frames: np.ndarray, lengths: np.ndarray, flow_idx: np.ndarray) -> int:
        from hotplane.shared.burst import tx_burst

        return tx_burst(self.q, frames, lengths)

    def offer(self, frames: np.ndarray, lengths: np.ndarray, ts_ns=None) -> tuple[int, int]:
        """A replay's frames: ``(sent, dropped)``; frames too big for a TX slot are dropped, the rest wait for room."""
        from hotplane.shared.burst import tx_burst, tx_space

        cap = min(self.q.tx.tx_capacity, frames.shape[1])
        if int(lengths.max()) > cap:
            big = int(np.argmax(lengths > cap))
            if big == 0:
                return 0, 1  # one at a time: order is kept
            frames, lengths = frames[:big], lengths[:big]
        k = tx_space(self.q, int(lengths.shape[0]))
        if k < lengths.shape[0]:
            self.doorbell()
        return (tx_burst(self.q, frames[:k], lengths[:k]) if k else 0), 0

    def close(self) -> None:
        # Let the kernel send what is still queued before the ring goes away (bounded).
        deadline = time.monotonic() + 2.0
        st = self.q.tx.status
        while np.count_nonzero(st) and time.monotonic() < deadline:
            self.doorbell()
            time.sleep(0.001)
        self.sock.close()


class PcapFileTarget:
    """A pcap file: frames are written, stamped ``1/rate`` apart (``rate`` 0: the wall clock)."""

    kind = "pcap"
    offline = True  # nothing to pace against: the generator computes time instead of waiting for it

    def __init__(self, path: str, rate: float) -> None:
        from hotplane.shared.pcap_port import PcapWriter

        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise GenError(f"cannot write {path}: directory {parent} does not exist")
        try:
            self.writer = PcapWriter(path)
        except OSError as e:
            raise GenError(f"cannot write {path}: {e.strerror or e}") from None
        self.no_drop = True
        self.rate = rate
        self.t0_ns = time.time_ns()
        self.written = 0

    def prepare(self, gen) -> None:
        pass

    def space(self, flow_idx: np.ndarray) -> int:
        return int(flow_idx.size)

    def _stamps(self, n: int) -> "np.ndarray | int":
        if self.rate <= 0:
            return time.time_ns()
        k = self.written + np.arange(n, dtype=np.float64)
        return self.t0_ns + np.round(k * (1e9 / self.rate)).astype(np.int64)

    def send(self, frames: np.ndarray, lengths: np.ndarray, flow_idx: np.ndarray) -> int:
        return self.offer(frames, lengths)[0]

    def offer(self, frames: np.ndarray, lengths: np.ndarray, ts_ns=None) -> tuple[int, int]:
        n = int(lengths.shape[0])
        self.writer.write_burst(frames, lengths, ts_ns=self._stamps(n) if ts_ns is None else ts_ns)
        self.written += n
        return n, 0

    def close(self) -> None:
        self.writer.close()


class VirtualClock:
    """Time for offline targets: ``sleep`` advances it instead of waiting (a file has no wall clock)."""

    def __init__(self) -> None:
        self.ns = 0  # integer nanoseconds: a tiny float step added to a large float time would be lost

    def now(self) -> float:
        return self.ns / 1e9

    def sleep(self, seconds: float) -> None:
        self.ns += max(1, int(round(seconds * 1e9)))


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Totals:
    generated: int = 0  # sequence numbers consumed
    delivered: int = 0  # frames the port took
    ring_drops: int = 0  # frames a full RX ring refused (seq consumed)
    bytes: int = 0
    bursts: int = 0
    waits: int = 0  # times --no-drop waited for ring space


class Generator:
    """The paced loop around :class:`hotplane.shared.traffic.Generator`."""

    def __init__(self, app: argparse.Namespace, flows, target, slot: TrafficSlot | None) -> None:
        from hotplane.shared.traffic import Generator as Frames

        self.app = app
        self.flows = flows
        self.frames = Frames(flows, app.burst)
        self.target = target
        self.slot = slot
        self.t = Totals()
        self.stop = False
        target.prepare(self.frames)
        # A file target at a given rate runs on computed time: as fast as it can, stamped as if paced.
        clock = VirtualClock() if getattr(target, "offline", False) and float(app.rate) > 0 else None
        self._now = clock.now if clock else time.monotonic
        self._sleep = clock.sleep if clock else time.sleep

    def run(self) -> dict:
        app, t, target, fr = self.app, self.t, self.target, self.frames
        nflows = self.flows.n
        rate = float(app.rate)
        burst = app.burst
        # Chunk: at most a burst, and no more than MAX_SENDS_PER_S sends a second: at low rates
        # a send per packet costs a tenth of a core in Python for nothing (10 ms between small
        # chunks is still smooth traffic).
        chunk = burst if rate <= 0 else int(max(1, min(burst, rate / MAX_SENDS_PER_S)))
        depth = max(2 * chunk, 1)  # the bucket holds two chunks: a late wake-up catches up a little, never a flood
        limit = app.count if app.count is not None else None
        duration = app.duration
        nfr = float(app.new_flow_rate)
        ar = np.arange(burst, dtype=np.int64)
        ptr = 0
        now_fn, sleep = self._now, self._sleep
        start = now_fn()
        last = start
        tokens = float(chunk)
        next_progress = start + PROGRESS_INTERVAL
        next_slot = start
        prog_sent = 0
        prog_t = start
        no_drop = target.no_drop
        while not self.stop:
            now = now_fn()
            el = now - start
            if duration is not None and el >= duration:
                break
            if limit is not None and t.generated >= limit:
                break
            if now >= next_progress:
                pps = (t.delivered - prog_sent) / (now - prog_t)
                self._progress(el, pps)
                prog_sent, prog_t = t.delivered, now
                next_progress += PROGRESS_INTERVAL
                if next_progress < now:
                    next_progress = now + PROGRESS_INTERVAL
            if self.slot is not None and now >= next_slot:
                self._publish()
                next_slot = now + SLOT_INTERVAL
            want = chunk if limit is None else min(chunk, limit - t.generated)
            if rate > 0:
                tokens = min(depth, tokens + (now - last) * rate)
                last = now
                if tokens < want:
                    wait = (want - tokens) / rate
                    sleep(min(wait, MAX_SLEEP, max(0.0, next_progress - now)))
                    continue
            active = nflows if nfr <= 0 else min(nflows, 1 + int(el * nfr))
            idx = (ptr + ar[:want]) % active
            if no_drop:
                k = target.space(idx)
                if k == 0:
                    t.waits += 1
                    sleep(20e-6)
                    continue
                idx = idx[:k]
            n = idx.size
            frames, lengths = fr.fill(idx)
            got = target.send(frames, lengths, idx)
            ptr = (ptr + n) % active
            t.generated += n
            t.delivered += got
            t.ring_drops += n - got
            t.bytes += got * self.flows.size
            t.bursts += 1
            if rate > 0:
                tokens -= n
        self.elapsed = max(now_fn() - start, 1e-9)
        target.close()
        if self.slot is not None:
            self._publish(final=True)
        return self.result()

    def _progress(self, el: float, pps: float) -> None:
        t = self.t
        print(f"gen: {el:6.1f}s {pps:12,.0f} pps  sent {t.delivered:,}  ring drops {t.ring_drops:,}", file=sys.stderr, flush=True)

    def _publish(self, final: bool = False) -> None:
        t = self.t
        fields = dict(packets=t.delivered, bytes=t.bytes, ring_drops=t.ring_drops, flows=self.flows.n)
        if final:
            self.slot.finish(**fields)
        else:
            self.slot.update(**fields)

    def result(self) -> dict:
        t, f, app = self.t, self.flows, self.app
        return {
            "version": REPORT_VERSION,
            "tool": "gen",
            "name": app.name,
            "port": app.port,
            "proto": app.proto,
            "size": f.size,
            "flows": f.n,
            "first_id": f.first_id,
            "rate": app.rate,
            "burst": app.burst,
            "duration": round(self.elapsed, 6),
            "generated": t.generated,
            "sent": t.delivered,
            "ring_drops": t.ring_drops,
            "bytes": t.bytes,
            "pps": t.delivered / self.elapsed,
            "offered_pps": t.generated / self.elapsed,
            "no_drop": bool(self.target.no_drop),
            "waits": t.waits,
            "per_flow_sent": self.frames.sent().astype(np.int64).tolist(),
        }


class Replayer:
    """``--replay FILE``: a capture's frames into the target, at the recorded rate or as fast as it takes them.

    Recorded rate: frame ``j`` is due at ``start + (ts[j] - ts[0])`` on the
    monotonic clock (later loops continue the timeline), so the file's gaps
    are kept; a frame that finds no room waits (``--no-drop``, af_packet and
    pcap targets) or is dropped and counted (a ring port's full RX ring, as a
    NIC would).
    """

    def __init__(self, app: argparse.Namespace, target, slot: "TrafficSlot | None") -> None:
        from hotplane.shared.pcap_port import PcapReader

        self.app = app
        self.target = target
        self.slot = slot
        self.reader = PcapReader(app.replay, allow_truncated=app.allow_truncated)
        self.records = self.reader.scan()  # a cut or corrupt file is refused before anything is sent
        self.stop = False
        self.sent = self.dropped = self.read = self.bytes = 0
        self.loops = 0

    def run(self) -> dict:
        app, target = self.app, self.target
        recorded = app.rate_mode == "recorded"
        start_ns = time.monotonic_ns()
        t0_file: int | None = None
        anchor: int | None = None  # monotonic ns of the file's first timestamp
        offset = 0  # ns added to the file's timestamps on later loops
        last_ts = 0
        next_progress = time.monotonic() + PROGRESS_INTERVAL
        next_slot = 0.0
        limit_ns = None if app.duration is None else int(app.duration * 1e9)
        while self.loops < app.loop and not self.stop:
            b = self.reader.read_batch(app.burst)
            if b is None:
                self.loops += 1
                if self.reader.records == 0:
                    break  # no packets: nothing to loop over
                offset = last_ts + 1 - (t0_file or 0)
                self.reader.rewind()
                continue
            ts = b.ts_ns + offset
            last_ts = int(b.ts_ns[-1])
            if t0_file is None:
                t0_file = int(ts[0])
            self.read += len(b)
            i, n = 0, len(b)
            while i < n and not self.stop:
                now = time.monotonic_ns()
                if limit_ns is not None and now - start_ns >= limit_ns:
                    self.stop = True
                    break
                if time.monotonic() >= next_progress:
                    self._progress((now - start_ns) / 1e9)
                    next_progress += PROGRESS_INTERVAL
                if self.slot is not None and time.monotonic() >= next_slot:
                    self.slot.update(packets=self.sent, bytes=self.bytes, ring_drops=self.dropped)
                    next_slot = time.monotonic() + SLOT_INTERVAL
                j = n
                if recorded:
                    if anchor is None:
                        j = i + 1  # the first frame goes now; the timeline starts once it has gone
                    else:
                        due = anchor + (ts[i:] - t0_file)
                        j = i + int(np.searchsorted(due, now, side="right"))
                        if j == i:
                            time.sleep(min((int(due[0]) - now) / 1e9, MAX_SLEEP))
                            continue
                took, dropped = target.offer(b.frames[i:j], b.lengths[i:j], ts[i:j])
                if took + dropped == 0:
                    time.sleep(20e-6)  # the port is full: wait for it to drain
                    continue
                if anchor is None:
                    # Frame k is due ts[k] - ts[0] after the first one actually went: never early.
                    anchor = time.monotonic_ns() - int(ts[i] - t0_file)
                self.sent += took
                self.dropped += dropped
                self.bytes += int(b.lengths[i : i + took].sum()) if took else 0
                i += took + dropped
        self.elapsed = max((time.monotonic_ns() - start_ns) / 1e9, 1e-9)
        target.close()
        self.reader.close()
        if self.slot is not None:
            self.slot.finish(packets=self.sent, bytes=self.bytes, ring_drops=self.dropped)
        return {
            "version": REPORT_VERSION, "tool": "gen", "mode": "replay", "name": app.name, "port": app.port, "file": app.replay,
            "rate": app.rate_mode, "loop": app.loop, "records": self.records, "truncated": bool(self.reader.truncated),
            "duration": round(self.elapsed, 6), "read": self.read, "sent": self.sent, "ring_drops": self.dropped,
            "bytes": self.bytes, "pps": self.sent / self.elapsed, "loops_done": self.loops,
        }

    def _progress(self, el: float) -> None:
        print(f"gen: {el:6.1f}s replayed {self.sent:,} of {self.records * self.app.loop:,}  dropped {self.dropped:,}", file=sys.stderr, flush=True)


# --- command line ------------------------------------------------------------------------------


def app_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hotplane gen [EAL] --",
        description="traffic generator: stamped flows (flow id, sequence, check) into a ring or af_packet port",
        epilog="exit codes: 0 done, 1 failure (no instance/interface/permission), 2 usage",
    )
    ap.add_argument("--port", help="ring:NAME (an instance's ring port, peer side), af_packet:IFACE (own socket in this netns) or pcap:FILE (write a capture)")
    ap.add_argument("--flows", type=int, default=1, help="number of flows (default 1)")
    ap.add_argument("--proto", choices=("udp", "tcp", "icmp"), default="udp")
    ap.add_argument("--size", type=int, default=64, help="frame size in bytes without FCS (default 64)")
    ap.add_argument("--rate", default=None, help="packets per second, 0 or 'max' = as fast as possible (default); "
                    "with --replay: 'recorded' (default, the file's gaps) or 'max'")
    ap.add_argument("--duration", type=float, help=f"seconds to run (default {DEFAULT_DURATION:g}, or until --count)")
    ap.add_argument("--count", type=int, help="stop after this many packets (sequence numbers)")
    ap.add_argument("--new-flow-rate", type=float, default=0.0, help="start flows progressively, FLOWS per second (0: all at once)")
    ap.add_argument("--src", default="100.64.0.2", help="first inside source address (default 100.64.0.2)")
    ap.add_argument("--dst", default="198.18.0.2", help="destination address (default 198.18.0.2)")
    ap.add_argument("--sport", type=int, default=10000, help="first source port / ICMP identifier (default 10000)")
    ap.add_argument("--dport", type=int, default=5201, help="destination port (default 5201)")
    ap.add_argument("--src-hosts", type=int, default=1, help="spread flows over this many consecutive source addresses")
    ap.add_argument("--src-mac", help="source MAC (af_packet default: the interface's)")
    ap.add_argument("--dst-mac", help="destination MAC (af_packet default: the next hop's from the neighbour table)")
    ap.add_argument("--first-id", type=int, default=0, help="flow id of the first flow (two generators into one sink: disjoint ids)")
    ap.add_argument("--burst", type=int, default=256, help="frames per burst (default 256)")
    ap.add_argument("--slots", type=int, default=4096, help="af_packet: TX ring slots (default 4096)")
    ap.add_argument("--no-drop", action="store_true", help="ring: wait for RX ring space instead of dropping (max-rate runs)")
    ap.add_argument("--replay", metavar="FILE", help="send the frames of this pcap file instead of generated flows")
    ap.add_argument("--loop", type=int, default=1, help="with --replay: play the file this many times (default 1)")
    ap.add_argument("--allow-truncated", action="store_true", help="with --replay: replay the whole records of a cut-short file")
    ap.add_argument("--report", metavar="FILE", help="write the final report with per-flow sent counts (the sink's --expect)")
    ap.add_argument("--json", action="store_true", help="final report as JSON on stdout")
    ap.add_argument("--name", help="slot name in the instance's traffic zone (default gen-PID)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def _parse_rate(app: argparse.Namespace) -> None:
    """``--rate``: a number (pps, 0 = max) or 'max'; 'recorded' (the default) only with --replay."""
    raw = app.rate
    app.rate_mode = "pps"
    if raw is None:
        raw = "recorded" if app.replay else "0"
    word = str(raw).strip().lower()
    if word in ("max", "recorded"):
        if word == "recorded" and not app.replay:
            raise UsageProblem("--rate recorded needs --replay FILE (generated flows have no recorded times)")
        app.rate_mode = word if app.replay else "pps"
        app.rate = 0.0
        return
    try:
        app.rate = float(word)
    except ValueError:
        raise UsageProblem(f"--rate {raw!r}: give packets per second, 'max'" + (" or 'recorded'" if app.replay else "")) from None
    if app.rate < 0:
        raise UsageProblem("--rate must be >= 0 (0 = as fast as possible)")
    if app.replay:
        if app.rate != 0:
            raise UsageProblem("with --replay, --rate is 'recorded' (the file's gaps) or 'max'")
        app.rate_mode = "max"


def check_app(app: argparse.Namespace) -> None:
    if not app.port:
        raise UsageProblem("--port is required: ring:NAME, af_packet:IFACE or pcap:FILE")
    _parse_rate(app)
    if app.loop < 1:
        raise UsageProblem("--loop must be >= 1")
    if app.allow_truncated and not app.replay:
        raise UsageProblem("--allow-truncated goes with --replay FILE")
    if app.duration is not None and app.duration <= 0:
        raise UsageProblem("--duration must be > 0 seconds")
    if app.count is not None and app.count < 1:
        raise UsageProblem("--count must be >= 1")
    if not 1 <= app.burst <= 4096:
        raise UsageProblem("--burst must be 1..4096")
    if app.new_flow_rate < 0:
        raise UsageProblem("--new-flow-rate must be >= 0")
    if not 1 <= app.flows <= 1 << 20:
        raise UsageProblem("--flows must be 1..1048576")
    if app.slots < 16 or app.slots & (app.slots - 1):
        raise UsageProblem("--slots must be a power of two >= 16")
    for opt in ("sport", "dport"):
        if not 0 <= getattr(app, opt) < 65536:
            raise UsageProblem(f"--{opt} must be a port number (0..65535)")
    for opt in ("src", "dst"):
        try:
            ipaddress.IPv4Address(getattr(app, opt))
        except ValueError:
            raise UsageProblem(f"--{opt} {getattr(app, opt)!r} is not an IPv4 address") from None
    if app.replay and app.count is not None:
        raise UsageProblem("--count does not apply to --replay (the file says how many; use --loop)")
    if app.duration is None and app.count is None and not app.replay:
        app.duration = DEFAULT_DURATION
    if app.name is None:
        app.name = f"gen-{os.getpid()}"


def write_report(path: str, doc: dict) -> None:
    """Write atomically (a reader polling for the file never sees half of it)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, p)


def print_table(doc: dict, out=sys.stdout) -> None:
    rows = [
        ("port", doc["port"]),
        ("flows", f"{doc['flows']:,} {doc['proto']} x {doc['size']} B"),
        ("duration", f"{doc['duration']:.3f} s"),
        ("generated", f"{doc['generated']:,}"),
        ("sent", f"{doc['sent']:,}"),
        ("ring drops", f"{doc['ring_drops']:,}"),
        ("rate", f"{doc['pps']:,.0f} pps ({doc['offered_pps']:,.0f} offered)"),
    ]
    print("== hotplane gen ==", file=out)
    for k, v in rows:
        print(f"{k:>11}: {v}", file=out)


def print_replay_table(doc: dict, out=sys.stdout) -> None:
    rows = [
        ("port", doc["port"]),
        ("file", f"{doc['file']} ({doc['records']:,} records" + (", cut short" if doc["truncated"] else "") + f") x {doc['loop']}"),
        ("rate", f"{doc['rate']}: {doc['pps']:,.0f} pps over {doc['duration']:.3f} s"),
        ("sent", f"{doc['sent']:,}"),
        ("ring drops", f"{doc['ring_drops']:,}"),
    ]
    print("== hotplane gen (replay) ==", file=out)
    for k, v in rows:
        print(f"{k:>11}: {v}", file=out)


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane gen", role="secondary")
    try:
        app = app_parser().parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    from hotplane.shared.ring_port import parse_port_spec
    from hotplane.shared.traffic import FlowSet

    try:
        check_app(app)
        spec = parse_port_spec(app.port)
        if opts.vdevs:
            raise UsageProblem(f"--vdev {opts.vdevs[0]} is not supported: the generator's port is --port SPEC (after --)")
        if spec.type == "pcap" and app.replay and os.path.abspath(spec.name) == os.path.abspath(app.replay):
            raise UsageProblem(f"--port {app.port} and --replay {app.replay} are the same file")
        src_mac = parse_mac(app.src_mac) if app.src_mac else None
        dst_mac = parse_mac(app.dst_mac) if app.dst_mac else None
        FlowSet.make(1, app.proto, app.size, src=app.src, dst=app.dst)  # checks size for the protocol before any port opens
    except (UsageProblem, ValueError) as e:
        print(f"hotplane gen: {e}", file=sys.stderr)
        return EXIT_USAGE
    inst = None
    slot = None
    target = None
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
                target = RingTarget(attach_ring(inst, app.port, spec), app.no_drop)
            except (MemzoneError, ValueError) as e:
                raise GenError(str(e)) from None
        elif spec.type == "pcap":
            target = PcapFileTarget(spec.name, app.rate)
        else:
            target = AfPacketTarget(spec.name, app.slots)
            if src_mac is None and not app.replay:
                src_mac = target.info.mac
            if dst_mac is None and not app.replay:
                dst_mac = resolve_dst_mac(spec.name, app.dst)
        if inst is not None:
            from hotplane.schema.traffic import KIND_GEN

            slot = TrafficSlot.claim(inst, app.name, KIND_GEN)
        if app.replay:
            try:
                g = Replayer(app, target, slot)
            except PcapError as e:
                raise GenError(str(e)) from None
        else:
            try:
                flows = FlowSet.make(app.flows, app.proto, app.size, src=app.src, dst=app.dst, sport=app.sport, dport=app.dport,
                                     src_hosts=app.src_hosts, first_id=app.first_id, src_mac=src_mac, dst_mac=dst_mac)
            except ValueError as e:
                target.close()
                print(f"hotplane gen: {e}", file=sys.stderr)
                return EXIT_USAGE
            g = Generator(app, flows, target, slot)
        target = None  # the run closes it

        def on_signal(*_):
            g.stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if app.quiet:
            g._progress = lambda *a: None  # type: ignore[method-assign]
        from hotplane.shared.ready import report_ready

        report_ready("gen", {"tool": "gen", "port": app.port, "slot": app.name}, as_json=app.json)
        doc = g.run()
    except GenError as e:
        print(f"hotplane gen: {e}", file=sys.stderr)
        if target is not None:
            target.close()
        return EXIT_FAILURE
    finally:
        if slot is not None and slot.rec["running"][0]:
            slot.finish()
        if inst is not None:
            slot = None
            inst.close()
    if app.report:
        write_report(app.report, doc)
    if app.json:
        out = {k: v for k, v in doc.items() if k != "per_flow_sent"}
        if doc.get("flows", 0) <= 4096 and "per_flow_sent" in doc:
            out["per_flow_sent"] = doc["per_flow_sent"]
        print(json.dumps(out))
    elif app.replay:
        print_replay_table(doc)
    else:
        print_table(doc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
