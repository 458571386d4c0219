"""Benchmark: the parts of ``hotplane bench upgrade`` measurable without the supervisor and worker.

1. **Swap-time delta pause vs table size** (``shared/session_migrate.py``): a
   writer process keeps changing a v1 session table (bursts of 64 inserts /
   touches / deletes) while the candidate copies it ahead into v2 and tracks
   the journal; the writer stops (as the old worker does at the swap) and the
   delta runs. Reported: the tracked delta (what a swap pays) and, on the same
   stopped table, the full-compare fallback (what a swap would pay without
   tracking) -- the reference that grows with the table.
2. **Per-queue swap gap of the ownership handover** between two processes:
   the owner finishes its "burst", releases the word (``queue_owner.release``);
   the other, already spinning on the word, claims it (``queue_owner.claim``)
   and starts its first burst. Gap = claim time - release time and first burst
   - last burst (CLOCK_MONOTONIC ns in both processes), p50/p99, against the
   wakeup latency of a process blocked on an ``os.pipe`` read (the reference).

Run: ``python -m hotplane.bench.upgrade_swap [--json] [--sizes 10k,1M] [--rounds 2000]``
(``--sizes 10k,1M,10M`` needs ~2.2 GB of memory and ~1 minute more).
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
from hotplane.schema import upgrade as upgrade_schema
from hotplane.schema.port import pack_owner
from hotplane.schema.session import VALUE_DTYPE
from hotplane.shared import queue_owner
from hotplane.shared.session_migrate import OnlineMigration, SessionTableV2
from hotplane.shared.session_table import SessionTable

CTX = mp.get_context("fork")


def _shared(n: int) -> tuple[mmap.mmap, np.ndarray]:
    mm = mmap.mmap(-1, n)
    return mm, np.frombuffer(mm, np.uint8)


def _parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


# ---------------------------------------------------------------------------- delta pause


def _writer(buf, ctl, universe: int) -> None:
    t = SessionTable.attach(buf, writer=True)
    rng = np.random.default_rng(3)
    k0 = np.arange(1, universe + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    k1 = k0 ^ np.uint64(0x5555)
    v = np.zeros(64, VALUE_DTYPE)
    slots = np.empty(64, np.int64)
    hit = np.empty(64, np.bool_)
    while not ctl[0]:
        pick = rng.integers(0, universe, 64)
        op = int(rng.integers(0, 4))
        if op == 0:
            v["bytes"] = 100
            t.insert_batch(k0[pick], k1[pick], v)
        elif op == 3:
            t.delete_batch(k0[pick[:8]], k1[pick[:8]])
        else:
            t.lookup_batch(k0[pick], k1[pick], slots, hit)
            t.touch_batch(np.where(hit, slots, -1), 1, 100)
        ctl[2] += 1
        time.sleep(0.0002)  # a worker at moderate load: ~5k bursts/s
    t.release()
    ctl[1] = 1


def delta_pause(n: int, track_s: float) -> dict[str, Any]:
    cap = 1 << max(10, int(np.ceil(np.log2(n / 0.6))))
    mm1, b1 = _shared(SessionTable.zone_size(cap))
    mm2, b2 = _shared(SessionTableV2.zone_size(cap))
    mmc, cb = _shared(4096)
    ctl = cb[:64].view(np.uint64)
    t = SessionTable.create(b1, cap, seed=1)
    k0 = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    t0 = time.perf_counter()
    for a in range(0, n, 1 << 16):
        b = min(n, a + (1 << 16))
        t.insert_batch(k0[a:b], k0[a:b] ^ np.uint64(0x5555))
    fill_s = time.perf_counter() - t0
    t.release()
    p = CTX.Process(target=_writer, args=(b1, ctl, int(n * 1.1)), daemon=True)
    p.start()
    try:
        by = time.monotonic() + 30
        while not ctl[2] and time.monotonic() < by:  # the writer has attached and is writing
            time.sleep(0.001)
        mig = OnlineMigration(b1, b2, to_version=2, create=True)
        t0 = time.perf_counter()
        ahead = mig.copy_ahead()
        ahead_s = time.perf_counter() - t0
        end = time.monotonic() + track_s
        while time.monotonic() < end:
            mig.track()
            if mig.covered:
                mig.catch_up()
            else:
                mig.copy_ahead(max_passes=1)
        mig.catch_up()  # the candidate keeps catching up while it spins; the swap comes at some point
        ctl[0] = 1
        stop_by = time.monotonic() + 30
        while not ctl[1] and time.monotonic() < stop_by:
            mig.track()
        p.join(10)
        res = mig.finish()
        full = mig.finish(full=True)  # same stopped table: the whole-table compare, for reference
        return {
            "sessions": n,
            "capacity": cap,
            "fill_s": round(fill_s, 3),
            "copy_ahead_s": round(ahead_s, 3),
            "writer_bursts": int(ctl[2]),
            "delta_mode": res.mode,
            "delta_compared": res.compared,
            "delta_copied": res.copied,
            "delta_pause_ms": res.pause_ns / 1e6,
            "full_compare_ms": full.pause_ns / 1e6,
            "ratio_full_vs_delta": full.pause_ns / max(res.pause_ns, 1),
        }
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)


# ---------------------------------------------------------------------------- swap gap


def _swapper(words, rec, ctl, me: int, rounds: int) -> None:
    """One of two processes passing a queue back and forth: poll bursts while owner, spin while not."""
    pid = os.getpid()
    token = queue_owner.claim(words, force=True) if me == 0 else 0
    spins = 0
    while int(ctl[0]) < rounds:
        if token:
            # A "burst" (the data-path work is elsewhere; here only the handover matters).
            if not queue_owner.still_mine(words, token):
                token = 0
                continue
            if int(ctl[1]) == me + 1:  # swap requested for me: finish the burst, release
                ctl[1] = 0  # before the release: after it the next round's request may already be here
                r = rec[int(ctl[0]) % rec.shape[0]]
                r["old_last_burst_ns"] = time.monotonic_ns()
                r["old_token"] = token
                queue_owner.release(words, token)
                r["released_ns"] = time.monotonic_ns()
                token = 0
        else:
            # Armed first, then the word: a word read before the arm could be a stale "unowned"
            # from an earlier round (loads are not reordered on x86-64, so this order holds).
            if int(ctl[2]) == me + 1 and int(words[0]) >> 32 == 0:
                token = queue_owner.claim(words, pid=pid)
                r = rec[int(ctl[0]) % rec.shape[0]]
                r["claimed_ns"] = time.monotonic_ns()
                r["new_token"] = token
                r["new_first_burst_ns"] = time.monotonic_ns()
                ctl[2] = 0
                ctl[0] += 1
            else:
                spins += 1
                if spins & 1023 == 0:
                    os.sched_yield()  # be polite on a shared 2-core box


def swap_gap(rounds: int) -> dict[str, Any]:
    mm, buf = _shared(1 << 20)
    words = buf[:128].view(np.uint64)
    hdr, rec = upgrade_schema.create(buf[4096:], nqueues=rounds)
    ctl = buf[256:320].view(np.uint64)
    procs = [CTX.Process(target=_swapper, args=(words, rec, ctl, i, rounds), daemon=True) for i in range(2)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.05)
        owner = 0
        end = time.monotonic() + 60
        for i in range(rounds):
            succ = 1 - owner
            rec[i]["requested_ns"] = time.monotonic_ns()
            ctl[2] = succ + 1  # arm the successor (ClaimQueue), then ask the owner to release (ReleaseQueue)
            ctl[1] = owner + 1
            while int(ctl[0]) <= i:
                if time.monotonic() > end:
                    raise RuntimeError(f"handover {i} did not complete (word {int(words[0]):#x}, ctl {ctl[:3].tolist()}, alive {[p.is_alive() for p in procs]})")
                time.sleep(0)
            owner = succ
        r = rec[:rounds]
        handover = (r["claimed_ns"].astype(np.int64) - r["released_ns"].astype(np.int64)) / 1e3
        gap = (r["new_first_burst_ns"].astype(np.int64) - r["old_last_burst_ns"].astype(np.int64)) / 1e3
        gens = r["new_token"] & 0xFFFFFFFF
        assert np.all(np.diff(gens.astype(np.int64)) == 1), "every handover bumps the generation once (release keeps it, claim bumps it)"
        return {"handover_us_p50": float(np.percentile(handover, 50)), "handover_us_p99": float(np.percentile(handover, 99)), "gap_us_p50": float(np.percentile(gap, 50)), "gap_us_p99": float(np.percentile(gap, 99)), "gap_us_max": float(gap.max())}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        del words, rec, hdr, ctl, buf


def _pipe_child(rfd: int, out_w: int, rounds: int) -> None:
    for _ in range(rounds):
        os.read(rfd, 8)
        os.write(out_w, time.monotonic_ns().to_bytes(8, "little"))


def pipe_wakeup(rounds: int) -> dict[str, Any]:
    r, w = os.pipe()
    r2, w2 = os.pipe()
    p = CTX.Process(target=_pipe_child, args=(r, w2, rounds), daemon=True)
    p.start()
    lat = np.empty(rounds)
    try:
        for i in range(rounds):
            t0 = time.monotonic_ns()
            os.write(w, b"x")
            t1 = int.from_bytes(os.read(r2, 8), "little")
            lat[i] = (t1 - t0) / 1e3
        return {"pipe_wakeup_us_p50": float(np.percentile(lat, 50)), "pipe_wakeup_us_p99": float(np.percentile(lat, 99))}
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
        for fd in (r, w, r2, w2):
            os.close(fd)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench upgrade_swap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", default="10k,1M", help="session counts for the delta pause (10M: ~2.2 GB)")
    ap.add_argument("--rounds", type=int, default=2000, help="queue handovers to time")
    ap.add_argument("--track", type=float, default=0.3, help="seconds the candidate tracks the journal before the swap")
    a = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for n in [_parse_size(s) for s in a.sizes.split(",") if s]:
        rows.append({"measure": "delta_pause", **delta_pause(n, a.track)})
    sg = swap_gap(a.rounds)
    pw = pipe_wakeup(a.rounds)
    rows.append({"measure": "swap_gap", "rounds": a.rounds, **sg})
    rows.append({"measure": "pipe_wakeup (reference)", "rounds": a.rounds, **pw})
    deltas = [r for r in rows if r["measure"] == "delta_pause"]
    summary = {
        "delta_pause_ms_by_sessions": {r["sessions"]: round(r["delta_pause_ms"], 3) for r in deltas},
        "full_compare_ms_by_sessions": {r["sessions"]: round(r["full_compare_ms"], 3) for r in deltas},
        "swap_gap_us_p99": round(sg["gap_us_p99"], 2),
        "swap_gap_p99_vs_pipe_wakeup_p99": round(sg["gap_us_p99"] / max(pw["pipe_wakeup_us_p99"], 1e-9), 3),
    }
    emit("upgrade_swap", rows, as_json=a.json, summary=summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
