"""``hotplane bench attach``: how long a secondary takes to join an instance.

Measured against a reference in the same run: a plain ``mmap`` of the same
file (no fixed address, no directory validation), and for whole processes a
bare ``python -c pass``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time

from hotplane.bench.report import emit


def _start_primary(env: dict, prefix: str, extra: list[str]) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "hotplane.supervisor.cli", "primary", "--file-prefix", prefix, "--socket-mem", "64", *extra, "--", "--json", "--bare"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        raise SystemExit(f"bench attach: primary failed: {p.stderr.read()}")
    return p


def _measure(mode: str, extra: list[str], n: int, nproc: int) -> dict:
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import cleanup, eal_init
    from hotplane.shared.runtime import MemoryDescriptor, runtime_dir

    prefix = f"bench-attach-{os.getpid()}-{mode}"
    env = dict(os.environ)
    p = _start_primary(env, prefix, extra)
    try:
        opts = parse_eal(["--file-prefix", prefix], role="secondary")
        attach_us = []
        for _ in range(n):
            t0 = time.perf_counter()
            inst = eal_init(opts)
            t1 = time.perf_counter()
            inst.close()
            attach_us.append((t1 - t0) * 1e6)
        desc = MemoryDescriptor.load(runtime_dir(prefix))
        ref_us = []
        for _ in range(n):
            t0 = time.perf_counter()
            fd = os.open(desc.path, os.O_RDWR)
            m = mmap.mmap(fd, desc.size)
            t1 = time.perf_counter()
            m.close()
            os.close(fd)
            ref_us.append((t1 - t0) * 1e6)
        proc_ms, bare_ms = [], []
        for _ in range(nproc):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", "memzones", "--file-prefix", prefix, "--", "--json"], env=env, capture_output=True, check=True)
            proc_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import numpy"], capture_output=True, check=True)
            bare_ms.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median
        return {
            "memory": mode,
            "attach_us_p50": med(attach_us),
            "attach_us_max": max(attach_us),
            "plain_mmap_us_p50": med(ref_us),
            "ratio_vs_plain_mmap": med(attach_us) / med(ref_us),
            "process_attach_ms_p50": med(proc_ms),
            "bare_python_numpy_ms_p50": med(bare_ms),
        }
    finally:
        p.terminate()
        p.wait(timeout=30)
        cleanup(prefix)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench attach", description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-n", type=int, default=200, help="in-process attaches per variant")
    ap.add_argument("--processes", type=int, default=5, help="whole-process attaches per variant")
    a = ap.parse_args(argv)
    os.environ.setdefault("HOTPLANE_RUNTIME_DIR", tempfile.mkdtemp(prefix="hotplane-bench-"))
    rows = []
    from hotplane.shared.memory import free_hugepages, hugetlbfs_mounts

    mounts = hugetlbfs_mounts()
    if mounts and free_hugepages(mounts[0].page_size) * mounts[0].page_size >= (64 << 20):
        rows.append(_measure("hugepages", [], a.n, a.processes))
    else:
        print("bench attach: hugepage variant skipped (no hugetlbfs mount with 64 MiB free; run deploy/hugepages.sh)", file=sys.stderr)
    rows.append(_measure("4k", ["--no-huge"], a.n, a.processes))
    emit("attach", rows, as_json=a.json, summary={"secondary_attach_us_p50": rows[0]["attach_us_p50"], "ratio_vs_plain_mmap": rows[0]["ratio_vs_plain_mmap"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
