"""``hotplane bench upgrade [--json] [--sizes 10k,1M] [--upgrades 4]``: hot upgrades of a real instance.

For each table size: a private instance (the embedded default configuration with
``[nat] max_sessions`` sized for it: two workers, ring ports, 4 KiB pages) whose
session tables are pre-populated with that many entries, under generator-to-sink
load on its ring ports, is upgraded ``--upgrades`` times between two builds: this
tree (session table layout 1) and a copy of it whose ``.hotplane-env`` says
``HOTPLANE_SESSION_VERSION=2`` -- so every upgrade migrates the tables, copying
ahead while the old workers forward and copying the delta at the swap. Every unit
is replaced (primary, workers, stats; ``--only`` narrows it).

Reported per size:

* ``swap_gap_us`` p50/p99/max over every queue of every upgrade: the old worker's
  last burst to the candidate's first, from the ``upgrade_control`` stamps the two
  processes write (CLOCK_MONOTONIC);
* ``delta_*``: entries the swap-time delta copied and how long it took (stamped by
  the candidate), the part of the gap that could grow with the table;
* ``gap_release`` / ``gap_claim`` / ``gap_first``: where a gap goes -- old's last
  burst to its release, release to the candidate's claim (the delta runs here),
  claim to the candidate's first burst (p50);
* ``upgrade_s``: whole upgrade, ``supervisorctl upgrade`` to committed;
* ``lost_upgrades`` (and duplicated, corrupted): what the sink missed across the
  upgrades (its sequence gaps, read once they were done and traffic had gone on);
  ``lost_total``: the sink's exact figure (the generator's report as ``--expect``)
  for the whole run, the restart reference included -- a cold restart leaves a
  queue unpolled long enough for its ring to overflow at higher rates;
* the reference, measured in the same run: ``restart_gap_ms``, the same queue's
  polling gap when its worker is restarted instead (``supervisorctl restart``), and
  the ratio to the swap gap.

The pre-populated entries are address-filter entries (flag ADDR, key tag 2): real
64-byte table entries, copied by the migration like any other, but ones the NAT
never expires or indexes, so the instance forwards as with a table that full
without the work of that many live flows. ``--sizes 10k,1M,10M`` needs about
2.5 GiB of memory (4 KiB pages in /dev/shm) and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from hotplane.bench.report import emit

FLOWS = 64
FILLER_TAG = 2  # secondary/nat_pipeline.TAG_ADDR
FILLER_FLAG = 2  # FLAG_ADDR


class BenchFailed(Exception):
    """The instance did not do what the measurement needs; the message says what."""


def _parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def _cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _ctl(prefix: str, *args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotplane.supervisor.ctl", "-p", prefix, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _wait(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise BenchFailed(f"timed out waiting for {what}")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def make_build_b(root: Path) -> Path:
    """A copy of this tree as build B: another version, session tables at layout 2."""
    import hotplane

    src = Path(hotplane.__file__).resolve().parent
    dst = root / "hotplane-b"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "tests"))
    init = dst / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "bench-b', 1))
    (dst / ".hotplane-env").write_text("HOTPLANE_SESSION_VERSION=2\n")
    return dst


def _sizes_for(n: int, workers: int = 2) -> tuple[str, int]:
    """(config TOML, MiB of memory) for ``n`` pre-populated entries plus the flows."""
    from hotplane.secondary.nat_pipeline import index_capacity_for, table_capacity_for
    from hotplane.shared.nat_config import DEFAULT_CONFIG_TOML, parse_config
    from hotplane.shared.session_index import SessionIndex
    from hotplane.shared.session_table import SessionTable

    toml = DEFAULT_CONFIG_TOML + f"max_sessions = {int(n * 1.1) + 4 * FLOWS}\n"
    cap = table_capacity_for(parse_config(toml, source="<bench>"), workers)
    per_worker = 2 * SessionTable.zone_size(cap) + SessionIndex.zone_size(index_capacity_for(cap))  # v1 + v2 tables, index
    return toml, int(workers * per_worker / 2**20) + 160


def populate(prefix: str, n: int, workers: int = 2) -> int:
    """``n`` filler entries spread over the workers' live tables (the workers stopped: they write nothing)."""
    from hotplane.schema.session import VALUE_DTYPE
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init
    from hotplane.shared.session_migrate import live_table_zone, table_class

    inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))
    try:
        now = int(time.clock_gettime(time.CLOCK_MONOTONIC))
        stored = 0
        for w in range(workers):
            zone, v = live_table_zone(inst.directory, w)
            t = table_class(v).attach(zone.view, writer=True)
            share = n // workers + (1 if w < n % workers else 0)
            i = np.arange(share, dtype=np.uint64) + np.uint64(w << 40)
            k1 = (np.uint64(FILLER_TAG) << np.uint64(48)) | (np.uint64(17) << np.uint64(32)) | (i & np.uint64(0xFFFFFFFF))
            k0 = (i * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xC6336400C6120000)  # distinct (odd multiplier)
            vals = np.zeros(1 << 16, VALUE_DTYPE)
            vals["protocol"], vals["flags"], vals["packets"] = 17, FILLER_FLAG, 1
            vals["created"] = vals["last_seen"] = now
            for a in range(0, share, 1 << 16):
                b = min(share, a + (1 << 16))
                slots = t.insert_batch(k0[a:b], k1[a:b], vals[: b - a], update=False)
                stored += int(np.count_nonzero(slots >= 0))
            t.release()
        return stored
    finally:
        inst.close()


def _stamps(prefix: str) -> list[dict]:
    """The upgrade_control record of every queue (the last swap of each)."""
    from hotplane.schema import upgrade as us
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init

    inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))
    try:
        _, recs = us.attach(inst.directory.lookup("upgrade_control").view)
        return [{k: int(r[k]) for k in recs.dtype.names} for r in recs]
    finally:
        inst.close()


def _traffic(prefix: str) -> dict:
    """The sink's live figures (sequence gaps: exact for everything before its latest packets)."""
    from hotplane.secondary.stats import snapshot
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init

    inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))
    try:
        tr = {t["name"]: t for t in snapshot(inst.directory)["traffic"]}
    finally:
        inst.close()
    s = tr.get("bench-sink") or {}
    g = tr.get("bench-gen") or {}
    return {"lost": s.get("lost"), "duplicated": s.get("duplicated"), "corrupted": s.get("corrupted"), "gen_ring_drops": g.get("ring_drops")}


def _restart_gap(prefix: str, env: dict) -> float:
    """Seconds queue inside/0 goes unpolled while ``supervisorctl restart worker-0`` replaces its worker."""
    from hotplane.schema.port import W_LAST_POLL_NS
    from hotplane.shared.burst import QueueState
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init

    inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))
    try:
        words = QueueState.attach(inst.directory.lookup("ring.in.state").view).words[0]
        proc = subprocess.Popen([sys.executable, "-m", "hotplane.supervisor.ctl", "-p", prefix, "restart", "worker-0"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen, gap, deadline = int(words[W_LAST_POLL_NS]), 0, time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            cur = int(words[W_LAST_POLL_NS])
            if cur != seen:
                gap = max(gap, cur - seen)
                seen = cur
            time.sleep(0.0005)
        proc.wait(10)
        return gap / 1e9
    finally:
        inst.close()


def measure(n: int, build_b: Path, root: Path, a: argparse.Namespace) -> dict:
    """One instance of ``n`` pre-populated entries, ``a.upgrades`` upgrades: the figures."""
    import hotplane

    prefix = "bu" + uuid.uuid4().hex[:8]
    env = dict(os.environ, HOTPLANE_RUNTIME_DIR=str(root / "run"), PYTHONUNBUFFERED="1")
    toml, mem = _sizes_for(n)
    cfg = root / f"bench-{n}.toml"
    cfg.write_text(toml)
    targets = [str(build_b), str(Path(hotplane.__file__).resolve().parent)]
    procs: list[subprocess.Popen] = []
    try:
        r = _cli("up", "-p", prefix, "--daemon", "--no-huge", "--socket-mem", str(mem), "-c", str(cfg), "--no-traffic",
                 "--stats-listen", "127.0.0.1:0", "--stop-wait", "5", env=env)
        if r.returncode != 0:
            raise BenchFailed(f"the instance did not start:\n{r.stderr}{r.stdout}")
        _ctl(prefix, "stop", "worker-0", "worker-1", env=env)
        t0 = time.monotonic()
        stored = populate(prefix, n)
        populate_s = time.monotonic() - t0
        if _ctl(prefix, "start", "worker-0", "worker-1", env=env).returncode != 0:
            raise BenchFailed("the workers did not start again after the tables were populated")
        report = root / f"gen-{prefix}.json"
        forever = str(24 * 3600)  # both run until told to stop (the generator then writes its report)
        eal = ["--file-prefix", prefix, "--proc-type", "secondary"]
        sink = subprocess.Popen([sys.executable, "-m", "hotplane.supervisor.cli", "sink", *eal, "--", "--port", "ring:out", "--duration", forever,
                                 "--idle-exit", "3", "--expect", str(report), "--json", "--quiet", "--arp", "198.18.0.2", "--name", "bench-sink"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(sink)
        time.sleep(1.0)
        gen = subprocess.Popen([sys.executable, "-m", "hotplane.supervisor.cli", "gen", *eal, "--", "--port", "ring:in", "--flows", str(FLOWS),
                                "--rate", str(a.rate), "--duration", forever, "--report", str(report), "--quiet", "--name", "bench-gen"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(gen)
        time.sleep(2.0)
        gaps, deltas_n, deltas_us, took = [], [], [], []
        parts: dict[str, list[float]] = {"release": [], "claim": [], "first": []}
        for i in range(a.upgrades):
            args = ["--json", "--timeout", "600", "upgrade", "--to", targets[i % 2], "--park-time", "60"]
            if a.only:
                args += ["--only", a.only]
            t = time.monotonic()
            r = _ctl(prefix, *args, env=env)
            lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
            st = lines[-1] if lines else {}
            if st.get("phase") != "COMMITTED":
                raise BenchFailed(f"upgrade {i + 1} to {targets[i % 2]} did not commit: {st.get('reason') or r.stderr[-500:]}")
            took.append(time.monotonic() - t)
            for rec in _stamps(prefix):
                if rec["old_last_burst_ns"] and rec["new_first_burst_ns"] >= rec["old_last_burst_ns"]:
                    gaps.append((rec["new_first_burst_ns"] - rec["old_last_burst_ns"]) / 1e3)
                    # Where the gap goes: last burst -> released, -> claimed (the delta runs here), -> first burst.
                    parts["release"].append((rec["released_ns"] - rec["old_last_burst_ns"]) / 1e3)
                    parts["claim"].append((rec["claimed_ns"] - rec["released_ns"]) / 1e3)
                    parts["first"].append((rec["new_first_burst_ns"] - rec["claimed_ns"]) / 1e3)
                    deltas_n.append(rec["delta_entries"])
                    deltas_us.append(rec["delta_us"])
            _ctl(prefix, "upgrade", "commit", env=env)
            _wait(lambda: json.loads(_ctl(prefix, "--json", "upgrade", "status", env=env).stdout or "{}").get("phase") == "DONE", 60, "the park window to end")
        time.sleep(2.0)  # what was in flight arrives: the sink's sequence gaps show any loss so far
        during = _traffic(prefix)
        restart = _restart_gap(prefix, env)
        time.sleep(1.0)
        gen.send_signal(signal.SIGTERM)
        gen.wait(60)
        out, err = sink.communicate(timeout=300)
        try:
            tot = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except ValueError:
            tot = {}
        if "lost" not in tot:
            raise BenchFailed(f"the sink gave no report: {err[-500:]}")
        gap_p50 = statistics.median(gaps) if gaps else float("nan")
        return {
            "sessions": stored, "upgrades": a.upgrades, "queue_swaps": len(gaps),
            "swap_gap_p50_us": round(gap_p50, 1), "swap_gap_p99_us": round(_pct(gaps, 0.99), 1), "swap_gap_max_us": round(max(gaps), 1) if gaps else None,
            "delta_entries_p50": statistics.median(deltas_n) if deltas_n else None, "delta_us_p50": statistics.median(deltas_us) if deltas_us else None,
            "delta_us_max": max(deltas_us) if deltas_us else None,
            "upgrade_s_p50": round(statistics.median(took), 2), "upgrade_s_max": round(max(took), 2), "populate_s": round(populate_s, 1),
            "gap_release_p50_us": round(statistics.median(parts["release"]), 1) if gaps else None,
            "gap_claim_p50_us": round(statistics.median(parts["claim"]), 1) if gaps else None,
            "gap_first_p50_us": round(statistics.median(parts["first"]), 1) if gaps else None,
            "lost_upgrades": during["lost"], "duplicated_upgrades": during["duplicated"], "corrupted_upgrades": during["corrupted"],
            "lost_total": tot.get("lost"), "duplicated": tot.get("duplicated"), "corrupted": tot.get("corrupted"), "received": tot.get("received"),
            "exact_loss": tot.get("exact_loss"),
            "restart_gap_ms": round(restart * 1e3, 1), "restart_over_swap": round(restart * 1e6 / gap_p50, 1) if gaps and gap_p50 > 0 else None,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
        _cli("down", "-p", prefix, env=env)
        _cli("cleanup", "--file-prefix", prefix, env=env)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench upgrade", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", default="10k,1M", help="pre-populated sessions per run, comma-separated (default 10k,1M; 10M needs ~2.5 GiB)")
    ap.add_argument("--upgrades", type=int, default=4, help="upgrades per size, alternating the two builds (default 4)")
    ap.add_argument("--rate", type=int, default=2000, help="generator packets per second (default 2000)")
    ap.add_argument("--only", help="unit kinds to upgrade (default all: primary,worker,stats)")
    a = ap.parse_args(argv)
    try:
        sizes = [_parse_size(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        print(f"hotplane bench upgrade: --sizes {a.sizes!r}: write sizes like 10k,1M,10M", file=sys.stderr)
        return 2
    if a.upgrades < 1 or a.rate < 1 or not sizes:
        print("hotplane bench upgrade: --upgrades and --rate must be >= 1, and --sizes name at least one size", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="hotplane-bench-upgrade-") as tmp:
        root = Path(tmp)
        (root / "run").mkdir()
        os.environ["HOTPLANE_RUNTIME_DIR"] = str(root / "run")  # this process attaches to the private instances too
        build_b = make_build_b(root)
        for n in sizes:
            try:
                rows.append(measure(n, build_b, root, a))
            except BenchFailed as e:
                print(f"hotplane bench upgrade: {n} sessions: {e}", file=sys.stderr)
                return 1
    gaps = [r["swap_gap_p99_us"] for r in rows]
    summary = {
        "swap_gap_p99_us_max_over_sizes": max(gaps),
        "swap_gap_p99_flatness": round(max(gaps) / min(gaps), 2) if min(gaps) > 0 else None,
        "lost_during_upgrades": sum(r["lost_upgrades"] or 0 for r in rows),
        "lost_total_with_the_restart_reference": sum(r["lost_total"] or 0 for r in rows),
        "restart_over_swap_p50": [r["restart_over_swap"] for r in rows],
        "targets": "0 lost, swap gap < 1000 us p99, flat across sizes",
    }
    emit("upgrade", rows, as_json=a.json, summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
