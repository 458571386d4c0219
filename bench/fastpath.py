"""Fast-path benchmark: the worker's forward pass between ring ports, burst sweep 32..512.

For each burst size a peer fills the input port's RX ring with 64-byte
IPv4/UDP frames and drains the output port's TX ring between timed sections
(same process: the peer is not timed). The timed section is what a worker
runs per pass:

* ``worker`` (the headline): :meth:`hotplane.secondary.worker.Worker.poll_once`
  -- the real worker code, both directions, its counter block -- with
  :class:`hotplane.secondary.forward.ForwardPipeline` (parse_burst, drop by
  reason, TTL decrement with the RFC 1624 checksum update, MAC rewrite) on
  ``rx_burst`` / ``tx_burst`` / ``rx_release``.
* ``local`` (a labelled reference, no worker runs it): the two vectorized
  rewrite ops on the fixed IPv4 offset, through ``forward_burst``: what the
  burst engine costs with almost no pipeline.
* ``python`` (the reference the ratio is against): a per-packet Python
  forwarder using bytes slicing over the same rings, at burst 256.

A linear fit of the median time per burst against burst size gives the fixed
cost per burst (intercept) and the cost per packet (slope). Forwarded frames
are checked (MACs, TTL, header checksum) before timing starts, and every
timed burst must forward all of its frames.
"""

from __future__ import annotations

import argparse
import gc
import struct
import sys
import time

import numpy as np

from hotplane.bench.report import emit
from hotplane.shared.burst import Burst, Queue, forward_burst
from hotplane.shared.ring_port import RingPort, alloc_buffers

BURSTS = (32, 64, 128, 256, 512)
FRAME_LEN = 64
NEW_DST = bytes.fromhex("020000000b02")
NEW_SRC = bytes.fromhex("020000000b01")
SLOTS = 1024


def _ip_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def make_frames(n: int, length: int = FRAME_LEN) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct Ethernet/IPv4/UDP frames of ``length`` bytes (valid IP header checksums)."""
    frames = np.zeros((n, length), dtype=np.uint8)
    for i in range(n):
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, length - 14, i & 0xFFFF, 0, 64, 17, 0, bytes([100, 64, (i >> 8) & 0x3F, i & 0xFF]), bytes([198, 18, 0, 1])))
        ip[10:12] = struct.pack("!H", _ip_checksum(bytes(ip)))
        udp = struct.pack("!HHHH", 1024 + (i % 60000), 53, length - 34, 0)
        eth = bytes.fromhex("020000000a02020000000a01") + b"\x08\x00"
        raw = (eth + bytes(ip) + udp).ljust(length, b"\x00")
        frames[i] = np.frombuffer(raw, dtype=np.uint8)
    return frames, np.full(n, length, dtype=np.uint32)


# -- the two vectorized rewrite ops (used when shared.packet is absent, and as the "local" variant) --

_MACS = np.frombuffer(NEW_DST + NEW_SRC, dtype=np.uint8)


def _ttl_csum(tp: np.ndarray, hc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New TTL:protocol words and header checksums for TTL - 1 (RFC 1624 eqn. 3).

    HC' = ~(~HC + ~m + m') with m' = m - 0x100; since ~m + m = 0xFFFF the TTL
    word drops out: HC' = ~(~HC + 0xFEFF), summed with end-around carry.
    """
    s = 0x1FEFE - hc.astype(np.uint32)
    s = (s & 0xFFFF) + (s >> 16)
    return tp - 0x100, 0xFFFF - s


def rewrite_local(b: Burst) -> np.ndarray | None:
    """MAC rewrite (one column slice) and TTL decrement with checksum update on IPv4 frames; others are filtered."""
    f = b.frames
    f[:, 0:12] = _MACS
    if f.shape[1] % 2:  # no 16-bit view of an odd-width row: take the byte path
        return _rewrite_bytes(f)
    v = f.view(">u2")  # big-endian 16-bit words: 6 ethertype, 11 TTL:protocol, 12 header checksum
    tp = v[:, 11]
    ok = (v[:, 6] == 0x0800) & (tp >= 0x0200)
    if ok.all():
        v[:, 11], v[:, 12] = _ttl_csum(tp, v[:, 12])
        return None
    idx = np.flatnonzero(ok)
    v[idx, 11], v[idx, 12] = _ttl_csum(tp[idx], v[idx, 12])
    return ok


def _rewrite_bytes(f: np.ndarray) -> np.ndarray | None:
    tp = (f[:, 22].astype(np.uint32) << 8) | f[:, 23]
    hc = (f[:, 24].astype(np.uint32) << 8) | f[:, 25]
    ok = (f[:, 12] == 8) & (f[:, 13] == 0) & (tp >= 0x0200)
    idx = np.flatnonzero(ok)
    ntp, nhc = _ttl_csum(tp[idx], hc[idx])
    f[idx, 22] = ntp >> 8
    f[idx, 24] = nhc >> 8
    f[idx, 25] = nhc & 0xFF
    return None if ok.all() else ok


class WorkerRig:
    """A real worker on a real instance, without its process: ``hotplane worker``'s own objects.

    Starts a primary (4 KiB pages, ring ports ``in``/``out`` of SLOTS slots,
    forward pipeline, the bench's MACs), attaches this process as a
    secondary, builds :class:`hotplane.secondary.worker.Worker` with the
    primary's config and claims its queues, as the worker process does. A
    timed pass is ``enter_pass`` + ``poll_once`` + ``leave_pass``: what the
    worker's loop runs per iteration (the 10 ms tick aside).
    """

    def __init__(self) -> None:
        import os
        import subprocess
        import tempfile

        from hotplane.shared.eal import parse_eal
        from hotplane.shared.instance import eal_init
        from hotplane.shared.ports import attach_ring_port

        self.prefix = f"bench-fastpath-{os.getpid()}"
        os.environ.setdefault("HOTPLANE_RUNTIME_DIR", tempfile.mkdtemp(prefix="hotplane-bench-"))
        macs = ["--mac", f"outside_gw={NEW_SRC.hex(':')}", "--mac", f"outside_peer={NEW_DST.hex(':')}"]
        self.primary = subprocess.Popen(
            [sys.executable, "-m", "hotplane.supervisor.cli", "primary", "--file-prefix", self.prefix, "--no-huge", "--socket-mem", "32", "--",
             "--workers", "1", "--pipeline", "forward", "--inside", f"ring:in,slots={SLOTS}", "--outside", f"ring:out,slots={SLOTS}", "--json", *macs],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.inst = None
        try:
            if not self.primary.stdout.readline():
                raise RuntimeError(f"fastpath bench: the primary did not start: {self.primary.stderr.read()[-2000:]}")
            from hotplane.secondary.worker import Worker, primary_config

            self.inst = eal_init(parse_eal(["--file-prefix", self.prefix], role="secondary"))
            cfg = primary_config(self.inst)
            self.pin = attach_ring_port(self.inst.directory, "ring:in")
            self.pout = attach_ring_port(self.inst.directory, "ring:out")
            self.worker = Worker(self.inst, cfg, 0)
            self.worker.claim_queues()
        except BaseException:
            self.close()
            raise

    def step(self, n: int) -> int:
        """One worker pass with bursts of up to ``n``; returns the frames it received."""
        w = self.worker
        if not w.enter_pass():
            raise RuntimeError("fastpath bench: the worker lost its queues")
        try:
            return w.poll_once(n)
        finally:
            w.leave_pass()

    def close(self) -> None:
        from hotplane.shared.instance import cleanup

        if self.inst is not None:
            w = getattr(self, "worker", None)
            if w is not None and w.owned:
                w.release_queues()
            self.worker = self.pin = self.pout = None
            self.inst.close()
            self.inst = None
        self.primary.terminate()
        try:
            self.primary.wait(timeout=30)
        finally:
            cleanup(self.prefix)


# -- the reference: a per-packet Python forwarder over the same rings --


def python_forward(rxq: Queue, txq: Queue, max_n: int) -> int:
    """Per-packet Python: bytes slicing on the ring memory, struct for the descriptors."""
    rx, tx = rxq.rx, txq.tx
    rmv = memoryview(rx.frames.reshape(-1))
    tmv = memoryview(tx.frames.reshape(-1))
    rfs, tfs, rns, tns = rx.frame_size, tx.frame_size, rx.nslots, tx.nslots
    roff, toff = rx.rx_data_offset, tx.tx_data_offset
    rc, tc = rxq.rx_cursor, txq.tx_cursor
    unpack, pack_into = struct.unpack_from, struct.pack_into
    done = 0
    while done < max_n:
        rs = ((rc + done) % rns) * rfs
        status, _len, snap = unpack("<III", rmv, rs)
        if not status & 1:
            break
        ts = ((tc + done) % tns) * tfs
        if unpack("<I", tmv, ts)[0]:
            break
        data = bytes(rmv[rs + roff : rs + roff + snap])
        ttl = data[22]
        hc = (data[24] << 8) | data[25]
        m = (ttl << 8) | data[23]
        s = (~hc & 0xFFFF) + (~m & 0xFFFF) + (m - 0x100)
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        s = ~s & 0xFFFF
        out = NEW_DST + NEW_SRC + data[12:22] + bytes((ttl - 1,)) + data[23:24] + bytes((s >> 8, s & 0xFF)) + data[26:]
        tmv[ts + toff : ts + toff + snap] = out
        pack_into("<I", tmv, ts + 4, snap)
        pack_into("<I", tmv, ts, 1)
        pack_into("<I", rmv, rs, 0)
        done += 1
    rxq.words[1] = rc + done  # W_RX_CURSOR
    txq.words[2] = tc + done  # W_TX_CURSOR
    return done


def _ports():
    layout_in = RingPort.layout("bench_in", 1, SLOTS, 2048)
    layout_out = RingPort.layout("bench_out", 1, SLOTS, 2048)
    bufs = alloc_buffers(layout_in + layout_out)
    return RingPort.create("bench_in", bufs, 1, SLOTS, 2048), RingPort.create("bench_out", bufs, 1, SLOTS, 2048)


def _check_forwarded(frames: np.ndarray, lengths: np.ndarray, src: np.ndarray) -> None:
    """The forwarded frames carry the new MACs, TTL - 1 and a valid IP header checksum."""
    for j in range(min(len(lengths), 8)):
        f = bytes(frames[j, : lengths[j]])
        if f[0:6] != NEW_DST or f[6:12] != NEW_SRC or f[22] != src[j, 22] - 1 or _ip_checksum(f[14:34]) != 0 or f[26:] != bytes(src[j, 26 : lengths[j]]):
            raise RuntimeError(f"fastpath bench: forwarded frame {j} is wrong: {f.hex()}")


def measure(variant: str, fn, bursts, iters: int, budget_s: float, rig: WorkerRig | None = None) -> list[dict]:
    """Time ``variant`` (worker on ``rig``, local or python) at each burst size; one row per size."""
    pin, pout = (rig.pin, rig.pout) if rig is not None else _ports()
    rxq, txq = pin.queues[0], pout.queues[0]
    src, lens = make_frames(max(bursts))
    sink = np.zeros((SLOTS, 2048), dtype=np.uint8)
    sink_len = np.zeros(SLOTS, dtype=np.uint32)
    if variant == "python":
        def step(n: int) -> int:
            return python_forward(rxq, txq, n)
    elif variant == "worker":
        step = rig.step
    else:
        def step(n: int) -> int:
            return forward_burst(rxq, txq, n, fn).sent
    # Correctness first: one burst through, checked.
    pin.peer_send(src[:32], lens[:32])
    step(32)
    got = pout.peer_recv(SLOTS, sink, sink_len)
    if got != 32:
        raise RuntimeError(f"fastpath bench ({variant}): forwarded {got} of 32 frames")
    _check_forwarded(sink, sink_len, src)
    rows = []
    for b in bursts:
        times = np.zeros(iters, dtype=np.int64)
        done = 0
        t_end = time.perf_counter() + budget_s
        gc.disable()
        try:
            for _ in range(iters):
                pin.peer_send(src[:b], lens[:b])
                t0 = time.perf_counter_ns()
                n = step(b)
                if n < b:  # a burst stops at the ring's wrap; the next poll continues (as a worker's would)
                    n += step(b - n)
                times[done] = time.perf_counter_ns() - t0
                out = pout.peer_recv(SLOTS, sink, sink_len)
                if n != b or out != b:
                    raise RuntimeError(f"fastpath bench ({variant}): burst of {b}: received {n}, forwarded {out}")
                done += 1
                if time.perf_counter() > t_end:
                    break
        finally:
            gc.enable()
        # The median is robust to the scheduler: the machine is shared and has few cores.
        per_burst_us = float(np.median(times[:done])) / 1e3
        mean_us = float(times[:done].mean()) / 1e3
        rows.append(
            {"variant": variant, "burst": b, "bursts": done, "us_per_burst": per_burst_us, "mean_us_per_burst": mean_us, "ns_per_pkt": per_burst_us * 1e3 / b, "mpps": b / per_burst_us}
        )
    return rows


def fit(rows: list[dict]) -> tuple[float, float]:
    """(fixed us per burst, ns per packet) from a least-squares line through (burst, us_per_burst)."""
    x = np.array([r["burst"] for r in rows], dtype=float)
    y = np.array([r["us_per_burst"] for r in rows], dtype=float)
    if len(x) < 2:
        return float(y[0]), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope * 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench fastpath", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--iters", type=int, default=2000, help="bursts per size (bounded by --budget)")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds per burst size and variant")
    ap.add_argument("--bursts", default=",".join(map(str, BURSTS)), help="comma-separated burst sizes")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    bursts = [int(x) for x in args.bursts.split(",")]
    if max(bursts) > SLOTS // 2:
        ap.error(f"burst sizes must be at most {SLOTS // 2}")
    variants = [("worker", None), ("local", rewrite_local)]
    rows: list[dict] = []
    summary: dict = {"frame_bytes": FRAME_LEN, "headline": "worker: Worker.poll_once + ForwardPipeline on ring ports (what hotplane worker runs)"}
    fits = {}
    rig = WorkerRig()
    try:
        wr = measure("worker", None, bursts, args.iters, args.budget, rig)
    finally:
        rig.close()
    for name, fn in variants:
        vr = wr if name == "worker" else measure(name, fn, bursts, args.iters, args.budget)
        fixed_us, per_pkt_ns = fit(vr)
        fits[name] = (fixed_us, per_pkt_ns)
        for r in vr:
            r["fit_fixed_us"] = fixed_us
            r["fit_ns_per_pkt"] = per_pkt_ns
        rows.extend(vr)
    ref_burst = 256 if 256 in bursts else bursts[-1]
    at = {name: [r for r in rows if r["variant"] == name and r["burst"] == ref_burst][0] for name, _ in variants}
    summary["worker_fixed_us_per_burst"], summary["worker_ns_per_packet"] = fits["worker"]
    summary[f"worker_mpps_at_{ref_burst}"] = at["worker"]["mpps"]
    summary["reference_local_fixed_us_per_burst"], summary["reference_local_ns_per_packet"] = fits["local"]
    summary[f"reference_local_mpps_at_{ref_burst}"] = at["local"]["mpps"]
    ref = measure("python", None, [ref_burst], max(50, args.iters // 10), args.budget)
    rows.extend(ref)
    summary["python_reference_mpps"] = ref[0]["mpps"]
    summary["worker_speedup_vs_python"] = at["worker"]["mpps"] / ref[0]["mpps"]
    summary["target_mpps_at_256"] = 5.0
    emit("fastpath", rows, as_json=args.json, summary=summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
