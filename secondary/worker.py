"""The worker: polls queue N of the inside and the outside port and runs the pipeline on bursts.

``hotplane worker [EAL] -- --id N [--busy-poll] [--json]``

Run to completion, as a DPDK lcore does: receive a burst, process it with
numpy, transmit it with one doorbell, hand the slots back. The queues'
cursors and ownership words live in shared memory, so a replacement worker
continues exactly where this one stopped, and a worker whose ownership word
was taken (fenced) stops polling at once and exits without touching the
queue again.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

from hotplane import __version__
from hotplane.schema.counters import WORKER_COUNTERS
from hotplane.shared.burst import rx_burst, rx_release, tx_burst
from hotplane.shared.counters import CounterBlocks
from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit
from hotplane.shared.instance import InstanceError, eal_init
from hotplane.shared.queue_owner import QueueBusy, claim, release, still_mine
from hotplane.shared.ready import report_ready

EXIT_FENCED = 3  # another process owns our queue now: exit without touching it

IDLE_SLEEP_MIN = 20e-6
IDLE_SLEEP_MAX = 1e-3
TICK_INTERVAL = 0.01


def _mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def primary_config(inst, timeout: float = 30.0) -> dict:
    """Ask the primary for the instance configuration, retrying while it (re)starts."""
    from hotplane.shared.ipc import IpcError, request_sync

    path = str(inst.runtime_dir / "primary.sock")
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return request_sync(path, "config", timeout=5.0).result
        except (IpcError, OSError) as e:
            if time.monotonic() > deadline:
                raise InstanceError(f"the primary of instance {inst.prefix!r} does not answer on {path}: {e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def af_packet_fds(inst):
    """A function fetching an af_packet queue's socket from the primary."""
    from hotplane.shared.ipc import request_sync

    def fetch(spec: str, qid: int):
        reply = request_sync(str(inst.runtime_dir / "primary.sock"), "af_packet_queue", {"port": spec, "queue": qid}, timeout=10.0)
        if len(reply.fds) != 1:
            raise InstanceError(f"primary sent {len(reply.fds)} fds for {spec}#{qid}")
        return reply.fds[0], reply.result["ring_params"]

    return fetch


def make_pipeline(cfg: dict, worker_id: int, inst):
    """The pipeline the instance is configured for."""
    kind = cfg.get("pipeline", "forward")
    if kind == "forward":
        from hotplane.secondary.forward import ForwardPipeline

        return ForwardPipeline({k: _mac(v) for k, v in cfg["macs"].items()})
    if kind == "nat":
        from hotplane.secondary.nat_pipeline import build_pipeline

        return build_pipeline(cfg, worker_id, inst)
    raise InstanceError(f"unknown pipeline {kind!r}")


class Worker:
    """One worker's state: its two queues, its counter block, its pipeline."""

    def __init__(self, inst, cfg: dict, worker_id: int) -> None:
        from hotplane.shared.ports import port_queue

        self.inst = inst
        self.id = worker_id
        fetch = af_packet_fds(inst)
        self.inq, self._keep_in = port_queue(inst.directory, cfg["inside"], worker_id, fds_from=fetch)
        self.outq, self._keep_out = port_queue(inst.directory, cfg["outside"], worker_id, fds_from=fetch)
        z = inst.directory.lookup_checked("counters", WORKER_COUNTERS)
        self.counters = CounterBlocks.attach(z.view).block(worker_id)
        self.pipeline = make_pipeline(cfg, worker_id, inst)
        self.stop = False
        self.tokens: list[tuple[np.ndarray, int]] = []

    def claim_queues(self) -> None:
        from hotplane.shared.burst import reconcile
        from hotplane.shared.queue_owner import owner_of

        for q in (self.inq, self.outq):
            prev_pid, _ = owner_of(q.words)
            self.tokens.append((q.words, claim(q.words, prefix=self.inst.prefix)))
            if prev_pid:  # the previous owner died holding the queue: repair its cursors
                moved = reconcile(q)
                if moved["rx"] or moved["tx"]:
                    print(f"worker {self.id}: queue {q.qid} taken over from dead pid {prev_pid}: cursors repaired {moved}", file=sys.stderr)

    def release_queues(self) -> None:
        for words, tok in self.tokens:
            release(words, tok)

    def fenced(self) -> bool:
        return not all(still_mine(w, t) for w, t in self.tokens)

    def _send_emitted(self) -> None:
        p = self.pipeline
        for side in (0, 1):
            frames = [f for s, f in p.emit if s == side]
            if not frames:
                continue
            width = max(len(f) for f in frames)
            buf = np.zeros((len(frames), width), np.uint8)
            for i, f in enumerate(frames):
                buf[i, : len(f)] = np.frombuffer(f, np.uint8)
            lengths = np.array([len(f) for f in frames], np.uint32)
            sent = tx_burst(self.inq if side == 0 else self.outq, buf, lengths)
            self.counters.count_tx(sent, int(lengths[:sent].sum()))
        p.emit.clear()

    def poll_once(self, max_burst: int) -> int:
        """One pass over both directions; returns how many packets were received."""
        total = 0
        p = self.pipeline
        c = self.counters
        for direction, rxq, otherq in ((0, self.inq, self.outq), (1, self.outq, self.inq)):
            b = rx_burst(rxq, max_burst)
            n = b.n
            if n == 0:
                continue
            total += n
            frames, lengths = b.frames, b.lengths
            c.count_rx(n, int(lengths.sum()))
            if not b.all_valid:
                from hotplane.secondary.forward import RX_TO_COUNTER

                for reason, cnt in zip(RX_TO_COUNTER, b.drops.tolist()):
                    if cnt:
                        c.count_drop(int(reason), cnt)
            to_other, to_same = p.process(direction, frames, lengths, b.valid)
            sent_bytes = 0
            sent = 0
            if to_other.size:
                k = tx_burst(otherq, frames[to_other], lengths[to_other])
                sent += k
                sent_bytes += int(lengths[to_other[:k]].sum())
                if k < to_other.size:
                    c.count_drop(_TX_FULL, to_other.size - k)
            if to_same.size:
                k = tx_burst(rxq, frames[to_same], lengths[to_same])
                sent += k
                sent_bytes += int(lengths[to_same[:k]].sum())
                if k < to_same.size:
                    c.count_drop(_TX_FULL, to_same.size - k)
            rx_release(rxq, b)
            # A frame that found no TX slot was counted as forwarded by the pipeline and
            # as a tx_ring_full drop above: take it out of forwarded so the books balance.
            lost_tx = (to_other.size + to_same.size) - sent
            c.count_forwarded(p.forwarded - lost_tx if p.forwarded >= lost_tx else 0)
            c.count_punted(p.punted - max(0, lost_tx - p.forwarded))
            if p.drops.any():
                c.add_drop_counts(p.drops)
                p.drops[:] = 0
            c.count_tx(sent, sent_bytes)
        if p.emit:
            self._send_emitted()
        return total

    def run(self, max_burst: int, busy_poll: bool) -> int:
        """The poll loop; returns the exit code."""
        idle_sleep = IDLE_SLEEP_MIN
        next_tick = time.monotonic()
        c = self.counters
        while not self.stop:
            if self.fenced():
                print(f"worker {self.id}: queue ownership taken by another process: stopping without touching the queues", file=sys.stderr)
                return EXIT_FENCED
            n = self.poll_once(max_burst)
            now = time.monotonic()
            c.beat()
            if now >= next_tick:
                self.pipeline.tick(now)
                if self.pipeline.emit:
                    self._send_emitted()
                next_tick = now + TICK_INTERVAL
            if n == 0 and not busy_poll:
                # Two cores are shared by every process here: back off while idle
                # (DPDK's power-management idea) instead of spinning.
                time.sleep(idle_sleep)
                idle_sleep = min(idle_sleep * 2, IDLE_SLEEP_MAX)
            else:
                idle_sleep = IDLE_SLEEP_MIN
        self.release_queues()
        return EXIT_OK


from hotplane.schema.counters import DROP_REASONS  # noqa: E402

_TX_FULL = DROP_REASONS.index("tx_ring_full")


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane worker", role="secondary")
    ap = argparse.ArgumentParser(prog="hotplane worker [EAL] --")
    ap.add_argument("--id", type=int, required=True, help="worker slot: polls queue ID of each port")
    ap.add_argument("--burst", type=int, default=256, help="maximum burst size (default 256)")
    ap.add_argument("--busy-poll", action="store_true", help="never sleep when idle (benchmarks, dedicated cores)")
    ap.add_argument("--json", action="store_true")
    try:
        app = ap.parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if not 1 <= app.burst <= 512:
        print("hotplane worker: --burst must be 1..512", file=sys.stderr)
        return EXIT_USAGE
    try:
        inst = eal_init(opts)
        cfg = primary_config(inst)
        if not 0 <= app.id < int(cfg["workers"]):
            print(f"hotplane worker: --id {app.id} out of range: the instance has {cfg['workers']} worker slots", file=sys.stderr)
            return EXIT_USAGE
        w = Worker(inst, cfg, app.id)
        w.claim_queues()
    except (InstanceError, QueueBusy, ValueError) as e:
        print(f"hotplane worker: {e}", file=sys.stderr)
        return EXIT_FAILURE

    def on_term(*_):
        w.stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    w.counters.start(f"{__version__}", inst.generation)
    report_ready(f"worker-{app.id}", {"worker": app.id, "version": __version__, "pipeline": cfg.get("pipeline")}, as_json=app.json)
    return w.run(app.burst, app.busy_poll)
