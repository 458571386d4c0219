"""Session-table benchmark: batch lookups/s at 1M entries against a Python dict.

The table (in an anonymous shared mapping, as a memzone would be) is filled
with ``--entries`` random 128-bit keys in bursts of 512; then bursts of random
*present* keys are looked up with :meth:`SessionTable.lookup_batch` for each
burst size, and the same keys (prebuilt ``(k0, k1)`` tuples: the dict gets its
keys for free) are looked up in a dict of the same sessions. Also measured:
misses (random absent keys), inserts into a fresh table and seqlock-validated
reader lookups. Ratio = table keys/s / dict keys/s.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import time

import numpy as np

from hotplane.bench.report import emit
from hotplane.shared.session_table import SessionTable, VALUE_DTYPE


def _timeit(fn, budget_s: float, max_iters: int) -> tuple[int, float]:
    """Run ``fn(i)`` until ``budget_s`` or ``max_iters``; returns (iterations, seconds)."""
    iters = 0
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    while iters < max_iters:
        fn(iters)
        iters += 1
        if (iters & 7) == 0 and time.perf_counter() > deadline:
            break
    return iters, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench table", description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--capacity", type=int, default=0, help="power of two (default: smallest with load <= 0.5)")
    ap.add_argument("--max-probe", type=int, default=32)
    ap.add_argument("--bursts", default="32,64,128,256,512")
    ap.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--memory", choices=("thp", "shm"), default="thp", help="thp: private mapping with transparent huge pages (like a hugepage memzone); shm: shared 4 KiB pages")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    n = args.entries
    cap = args.capacity or 1 << max(3, int(np.ceil(np.log2(max(8, 2 * n)))))
    bursts = [int(b) for b in args.bursts.split(",") if b]
    rng = np.random.default_rng(args.seed)
    k0 = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    k1 = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    vals = np.zeros(n, VALUE_DTYPE)
    vals["xaddr"] = np.arange(n, dtype=np.uint32)
    vals["xport"] = np.arange(n) & 0xFFFF

    size = SessionTable.zone_size(cap)
    if args.memory == "thp":
        # Production memzones are hugepage-backed; transparent huge pages give the
        # same TLB reach here without taking from the shared hugetlbfs pool.
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
    else:
        mm = mmap.mmap(-1, size)  # shared anonymous, 4 KiB pages
    buf = np.frombuffer(mm, np.uint8)
    rows: list[dict] = []
    try:
        table = SessionTable.create(buf, cap, seed=args.seed)

        # Inserts: fill the table in bursts of 512.
        out = np.empty(512, np.int64)
        t0 = time.perf_counter()
        for a in range(0, n, 512):
            b = min(n, a + 512)
            table.insert_batch(k0[a:b], k1[a:b], vals[a:b], out=out[: b - a])
        t_ins = time.perf_counter() - t0
        full = table.stats()["insert_full"]

        # The reference: a dict of the same sessions, keyed by (k0, k1) tuples.
        l0, l1 = k0.tolist(), k1.tolist()
        gc.disable()
        try:
            t0 = time.perf_counter()
            ref = {}
            for i, key in enumerate(zip(l0, l1)):
                ref[key] = i
            t_dict_ins = time.perf_counter() - t0
        finally:
            gc.enable()
        rows.append({"op": "insert", "burst": 512, "table_ns_per_key": t_ins / n * 1e9, "table_keys_per_s": n / t_ins, "dict_ns_per_key": t_dict_ins / n * 1e9, "dict_keys_per_s": n / t_dict_ins, "ratio": t_dict_ins / t_ins})

        pool = 1 << 16  # random query keys, reused round-robin
        q = rng.integers(0, n, pool * 2)
        qk0, qk1 = k0[q], k1[q]
        qtuples = [(l0[i], l1[i]) for i in q.tolist()]
        m0 = rng.integers(0, 2**64, pool * 2, dtype=np.uint64, endpoint=False)
        m1 = rng.integers(0, 2**64, pool * 2, dtype=np.uint64, endpoint=False)
        mtuples = list(zip(m0.tolist(), m1.tolist()))
        reader = SessionTable.attach(buf)
        headline = {}
        for burst in bursts:
            nb = pool // burst  # distinct bursts in the pool
            idx = np.empty(burst, np.int64)
            hits = np.empty(burst, np.bool_)
            bk0 = [qk0[i * burst : (i + 1) * burst] for i in range(nb)]
            bk1 = [qk1[i * burst : (i + 1) * burst] for i in range(nb)]
            bt = [qtuples[i * burst : (i + 1) * burst] for i in range(nb)]
            # Correctness of what is timed: every key is found, at the slot the insert reported.
            table.lookup_batch(bk0[0], bk1[0], idx, hits)
            assert hits.all(), "bench: present keys not found"

            def tab(i: int) -> None:
                table.lookup_batch(bk0[i % nb], bk1[i % nb], idx, hits)

            def dic(i: int) -> None:
                g = ref.get
                for key in bt[i % nb]:
                    g(key)

            it, dt = _timeit(tab, args.seconds, 10**7)
            it2, dt2 = _timeit(dic, args.seconds, 10**7)
            t_rate = it * burst / dt
            d_rate = it2 * burst / dt2
            rows.append({"op": "lookup_hit", "burst": burst, "table_ns_per_key": 1e9 / t_rate, "table_keys_per_s": t_rate, "dict_ns_per_key": 1e9 / d_rate, "dict_keys_per_s": d_rate, "ratio": t_rate / d_rate})
            if burst == 256:
                headline = {"lookups_per_s_burst256": t_rate, "dict_lookups_per_s": d_rate, "ratio_vs_dict": t_rate / d_rate}

        # Misses and reader-side (seqlock-validated) lookups at burst 256.
        burst = 256
        nb = pool // burst
        idx = np.empty(burst, np.int64)
        hits = np.empty(burst, np.bool_)
        mk0 = [m0[i * burst : (i + 1) * burst] for i in range(nb)]
        mk1 = [m1[i * burst : (i + 1) * burst] for i in range(nb)]
        mt = [mtuples[i * burst : (i + 1) * burst] for i in range(nb)]

        def tmiss(i: int) -> None:
            table.lookup_batch(mk0[i % nb], mk1[i % nb], idx, hits)

        def dmiss(i: int) -> None:
            g = ref.get
            for key in mt[i % nb]:
                g(key)

        it, dt = _timeit(tmiss, args.seconds, 10**7)
        it2, dt2 = _timeit(dmiss, args.seconds, 10**7)
        t_rate, d_rate = it * burst / dt, it2 * burst / dt2
        rows.append({"op": "lookup_miss", "burst": burst, "table_ns_per_key": 1e9 / t_rate, "table_keys_per_s": t_rate, "dict_ns_per_key": 1e9 / d_rate, "dict_keys_per_s": d_rate, "ratio": t_rate / d_rate})

        bk0 = [qk0[i * burst : (i + 1) * burst] for i in range(nb)]
        bk1 = [qk1[i * burst : (i + 1) * burst] for i in range(nb)]
        bt = [qtuples[i * burst : (i + 1) * burst] for i in range(nb)]

        def rcons(i: int) -> None:
            reader.lookup_consistent(bk0[i % nb], bk1[i % nb])

        def dhit(i: int) -> None:
            g = ref.get
            for key in bt[i % nb]:
                g(key)

        it, dt = _timeit(rcons, args.seconds, 10**7)
        it2, dt2 = _timeit(dhit, args.seconds, 10**7)
        t_rate, d_rate = it * burst / dt, it2 * burst / dt2
        rows.append({"op": "reader_lookup_consistent", "burst": burst, "table_ns_per_key": 1e9 / t_rate, "table_keys_per_s": t_rate, "dict_ns_per_key": 1e9 / d_rate, "dict_keys_per_s": d_rate, "ratio": t_rate / d_rate})

        summary = {
            "entries": n,
            "capacity": cap,
            "load": table.count / cap,
            "max_probe": table.max_probe,
            "memory": args.memory,
            "insert_full": full,
            **headline,
            "inserts_per_s": n / t_ins,
            "dict_note": "dict keys are prebuilt (k0, k1) tuples; ratio = table keys/s / dict keys/s",
        }
        emit("table", rows, as_json=args.json, summary=summary)
        del table, reader
    finally:
        del buf
        mm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
