"""Benchmark: items/s through an SpscRing between two processes, against os.pipe and multiprocessing.Queue.

For each burst size, three transports carry the same stream of uint64 items
from a producer process to a consumer process for ``--duration`` seconds:

* ``ring``  -- SpscRing in an anonymous shared mapping (both sides busy-poll);
* ``pipe``  -- os.pipe: one ``write`` of the burst's bytes per burst, ``readv``
  into a preallocated buffer on the other side (no pickling: the strongest
  kernel-copy reference);
* ``queue`` -- multiprocessing.Queue of numpy burst arrays (batched, pickled).

Each consumer checks the last item of every burst it receives against the
sequence it expects, so a transport that loses or reorders data fails loudly
instead of looking fast. Rates are items delivered divided by the time from
the producer's start to the consumer's last item. Figures vary with load on
the machine; the ratios are measured in the same run.

Run: ``python -m hotplane.bench.ring [--json] [--bursts 1,32,256] [--duration 1.0]``.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from hotplane.bench.report import emit
from hotplane.shared.ordering import u64_word
from hotplane.shared.ring import SpscRing

U64 = np.dtype(np.uint64)
SEQ_MASK = 0xFFFF  # the producer cycles through 65536 sequence values
_SPIN_YIELD = 63  # os.sched_yield() every 64 empty polls: be polite on a 2-core box


def _source(max_burst: int) -> np.ndarray:
    """Items 0..65535 repeating, long enough that any burst starting below 65536 is one slice."""
    return (np.arange(SEQ_MASK + 1 + max_burst, dtype=U64) & U64.type(SEQ_MASK)).astype(U64)


def _child(fn, cpu: int | None, *args) -> None:
    """Process entry: optionally pin to one CPU (as a DPDK lcore is), then run ``fn``."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    fn(*args)


def _bad(last_item: int, expected_count: int) -> bool:
    return last_item != ((expected_count - 1) & SEQ_MASK)


# ---- ring --------------------------------------------------------------------------------


def _ring_producer(buf, ctl, burst, duration, barrier, conn):
    ring = SpscRing.attach(buf, U64)
    done, total = u64_word(ctl, 0), u64_word(ctl, 64)
    src = _source(burst)
    enq = ring.enqueue_burst
    barrier.wait()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop = t0 + duration
    sent, i, idle = 0, 0, 0
    while True:
        i += 1
        if not i & 63 and time.perf_counter() >= stop:
            break
        pos = sent & SEQ_MASK
        k = enq(src[pos : pos + burst])
        if k:
            sent += k
        else:
            idle += 1
            if not idle & _SPIN_YIELD:
                os.sched_yield()
    total[...] = sent
    done[...] = 1  # after the total (TSO: stores in order)
    conn.send({"t0": t0, "sent": sent, "cpu": time.process_time() - cpu0})


def _ring_consumer(buf, ctl, burst, barrier, conn):
    ring = SpscRing.attach(buf, U64)
    done, total = u64_word(ctl, 0), u64_word(ctl, 64)
    out = np.empty(burst, U64)
    deq = ring.dequeue_burst
    barrier.wait()
    cpu0 = time.process_time()
    got, idle, errors = 0, 0, 0
    while True:
        k = deq(out)
        if k:
            got += k
            if _bad(out.item(k - 1), got):
                errors += 1
        else:
            if done.item() and got == total.item():
                break
            idle += 1
            if not idle & _SPIN_YIELD:
                os.sched_yield()
    conn.send({"t1": time.perf_counter(), "got": got, "errors": errors, "cpu": time.process_time() - cpu0})


# ---- pipe --------------------------------------------------------------------------------


def _pipe_producer(fds, burst, duration, barrier, conn):
    r, w = fds
    os.close(r)
    src = memoryview(_source(burst)).cast("B")
    barrier.wait()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop = t0 + duration
    sent, i = 0, 0
    while True:
        i += 1
        if not i & 63 and time.perf_counter() >= stop:
            break
        pos = (sent & SEQ_MASK) * 8
        n = os.write(w, src[pos : pos + burst * 8])
        sent += n // 8  # bursts are <= PIPE_BUF bytes (atomic) or whole-item partial writes below
        if n % 8:  # a partial write of a big burst: finish the item
            rest = 8 - n % 8
            pos += n
            while rest:
                m = os.write(w, src[pos : pos + rest])
                pos += m
                rest -= m
            sent += 1
    os.close(w)  # EOF tells the consumer we are done
    conn.send({"t0": t0, "sent": sent, "cpu": time.process_time() - cpu0})


def _pipe_consumer(fds, burst, barrier, conn):
    r, w = fds
    os.close(w)  # or EOF never comes
    buf = bytearray(burst * 8 + 8)
    view = memoryview(buf)
    items = np.frombuffer(buf, U64)
    barrier.wait()
    cpu0 = time.process_time()
    got, have, errors = 0, 0, 0
    while True:
        n = os.readv(r, [view[have : burst * 8]])
        if n == 0:
            break
        have += n
        k = have // 8
        if k:
            got += k
            if _bad(items.item(k - 1), got):
                errors += 1
            left = have - k * 8
            if left:
                buf[:left] = buf[k * 8 : have]
            have = left
    os.close(r)
    conn.send({"t1": time.perf_counter(), "got": got, "errors": errors, "cpu": time.process_time() - cpu0})


# ---- multiprocessing.Queue -----------------------------------------------------------------


def _queue_producer(q, burst, duration, barrier, conn):
    src = _source(burst)
    barrier.wait()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop = t0 + duration
    sent, i = 0, 0
    while True:
        i += 1
        if not i & 15 and time.perf_counter() >= stop:
            break
        pos = sent & SEQ_MASK
        q.put(src[pos : pos + burst])
        sent += burst
    q.put(None)
    conn.send({"t0": t0, "sent": sent, "cpu": time.process_time() - cpu0})


def _queue_consumer(q, burst, barrier, conn):
    barrier.wait()
    cpu0 = time.process_time()
    got, errors = 0, 0
    while True:
        chunk = q.get()
        if chunk is None:
            break
        got += len(chunk)
        if _bad(int(chunk[-1]), got):
            errors += 1
    conn.send({"t1": time.perf_counter(), "got": got, "errors": errors, "cpu": time.process_time() - cpu0})


# ---- harness -----------------------------------------------------------------------------


def _trial(kind: str, burst: int, duration: float, capacity: int, pin: bool = False) -> dict[str, Any]:
    """Run one producer/consumer pair; items/s or an error."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    keep: list[Any] = []
    if kind == "ring":
        m, c = mmap.mmap(-1, SpscRing.zone_size(capacity, U64)), mmap.mmap(-1, 4096)
        keep += [m, c]
        buf = np.frombuffer(m, np.uint8)
        SpscRing.create(buf, capacity, U64)
        chan: tuple = (buf, np.frombuffer(c, np.uint8))
        prod_fn, cons_fn = _ring_producer, _ring_consumer
    elif kind == "pipe":
        chan = (os.pipe(),)
        prod_fn, cons_fn = _pipe_producer, _pipe_consumer
    elif kind == "queue":
        chan = (ctx.Queue(maxsize=1024),)
        prod_fn, cons_fn = _queue_producer, _queue_consumer
    else:
        raise ValueError(kind)
    (pr, pw), (cr, cw) = ctx.Pipe(False), ctx.Pipe(False)
    cpus = sorted(os.sched_getaffinity(0)) if pin else []
    pcpu, ccpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    prod = ctx.Process(target=_child, args=(prod_fn, pcpu, *chan, burst, duration, barrier, pw), daemon=True)
    cons = ctx.Process(target=_child, args=(cons_fn, ccpu, *chan, burst, barrier, cw), daemon=True)
    try:
        cons.start()
        prod.start()
        if kind == "pipe":
            os.close(chan[0][0])
            os.close(chan[0][1])
        limit = duration + 30
        if not (pr.poll(limit) and cr.poll(limit)):
            return {"error": "timeout"}
        p, c = pr.recv(), cr.recv()
    finally:
        for proc in (prod, cons):
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    if c["got"] != p["sent"] or c["errors"]:
        return {"error": f"sent {p['sent']}, got {c['got']}, {c['errors']} bursts out of sequence"}
    secs = c["t1"] - p["t0"]
    return {
        "items": c["got"],
        "seconds": secs,
        "items_per_s": c["got"] / secs if secs > 0 else 0.0,
        # CPU the pair actually got, as a share of two full CPUs: a busy-polling
        # ring on a shared, loaded machine is limited by this, not by the ring.
        "cpu_share": (p["cpu"] + c["cpu"]) / (2 * secs) if secs > 0 else 0.0,
    }


def run(bursts: list[int], duration: float, capacity: int, pin: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every transport at every burst size; returns (rows, summary) for :func:`emit`."""
    rows: list[dict[str, Any]] = []
    for burst in bursts:
        res = {kind: _trial(kind, burst, duration, capacity, pin) for kind in ("ring", "pipe", "queue")}
        row: dict[str, Any] = {"burst": burst}
        for kind, r in res.items():
            row[f"{kind}_items_s"] = r.get("items_per_s", 0.0)
            if "error" in r:
                row[f"{kind}_error"] = r["error"]
        row["ring_cpu_share"] = res["ring"].get("cpu_share", 0.0)
        ring = row["ring_items_s"]
        row["ring_ns_per_item"] = 1e9 / ring if ring else 0.0
        row["ring_vs_pipe"] = ring / row["pipe_items_s"] if row["pipe_items_s"] else 0.0
        row["ring_vs_queue"] = ring / row["queue_items_s"] if row["queue_items_s"] else 0.0
        rows.append(row)
    best = max(rows, key=lambda r: r["ring_items_s"])
    summary = {
        "ring_items_per_s_best": best["ring_items_s"],
        "best_burst": best["burst"],
        "ring_vs_pipe_at_best": best["ring_vs_pipe"],
        "ring_vs_queue_at_best": best["ring_vs_queue"],
        "reference": "os.pipe (bytes, readv into a preallocated buffer) and multiprocessing.Queue (numpy bursts), same items, same run",
        "capacity": capacity,
        "duration_per_trial_s": duration,
        "pinned": pin,
        "load_average_1m": os.getloadavg()[0],
        "errors": sum(1 for r in rows for k in r if k.endswith("_error")),
    }
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench ring", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--bursts", default="1,32,256", help="comma-separated burst sizes (default 1,32,256)")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per transport and burst size (default 1.0)")
    ap.add_argument("--capacity", type=int, default=8192, help="ring capacity, a power of two (default 8192)")
    ap.add_argument("--pin", action="store_true", help="pin producer and consumer to two different CPUs")
    args = ap.parse_args(argv)
    bursts = [int(b) for b in args.bursts.split(",") if b.strip()]
    if not bursts or min(bursts) < 1 or max(bursts) > args.capacity:
        ap.error("burst sizes must be between 1 and the ring capacity")
    if args.capacity < 1 or args.capacity & (args.capacity - 1):
        ap.error("--capacity must be a power of two")
    rows, summary = run(bursts, args.duration, args.capacity, args.pin)
    emit("ring", rows, as_json=args.json, summary=summary)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
