"""``hotplane bench recovery [--json] [--reps N] [--rate PPS]``: how fast the tree repairs itself.

Starts private instances (the embedded default configuration: ring ports, generator
and sink; 4 KiB pages) under a detached supervisor, one without and one with a hot
standby per worker, and measures:

* ``worker_sigkill_to_poll``: from a worker's SIGKILL to its inside queue being polled
  again -- the queue-state record's ``last_poll_ns`` (CLOCK_MONOTONIC, written by the
  new owner) minus the monotonic time just before the kill, with the owner pid checked
  to be another process. Without a standby the supervisor starts a new worker
  (restart from scratch: interpreter, imports, attach, claim); with one it promotes the
  parked standby (forced claim over the dead owner, cursors repaired), whose pid is
  checked to be the new owner.
* ``supervisor_readoption``: from launching a new supervisor after the old one was
  SIGKILLed to its READY=1 (every program adopted, none restarted): ``hotplane up
  --daemon`` returns on that notification.
* the reference, measured in the same run: starting ``python -c "import numpy"`` to its
  exit -- the floor for bringing back any Python process of this project.

Also reported: what the sink lost across the worker kills (packets the generator could
not queue while the ring was full, never frames inside the gateway). The instances run
with ``restart_window = 1`` so that every kill is a first restart (no backoff): the
figure is the repair, not the crash-loop throttle.
"""

from __future__ import annotations

import argparse
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

from hotplane.bench.report import emit


def _cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _wait(pred, timeout: float, what: str, step: float = 0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise RuntimeError(f"timed out waiting for {what}")


def _stats(s: list[float]) -> dict:
    return {"p50_ms": statistics.median(s) * 1e3, "min_ms": min(s) * 1e3, "max_ms": max(s) * 1e3, "n": len(s)}


class BenchFailed(Exception):
    """The instance did not do what the measurement needs; the message says what."""


def _config(root: Path, standby: bool) -> Path:
    from hotplane.shared.nat_config import DEFAULT_CONFIG_TOML

    path = root / f"recovery-{'standby' if standby else 'plain'}.toml"
    path.write_text(DEFAULT_CONFIG_TOML + f"\n[supervisor]\nrestart_window = 1.0\nmax_restarts = 1000\nhot_standby = {'true' if standby else 'false'}\n")
    return path


def _measure(root: Path, env: dict, a: argparse.Namespace, *, standby: bool, readoption: int) -> dict:
    """One instance: ``a.reps`` worker kills (and ``readoption`` supervisor kills); the figures."""
    from hotplane.schema.port import W_LAST_POLL_NS, W_OWNER, unpack_owner
    from hotplane.shared.burst import QueueState
    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init
    from hotplane.supervisor.ctl import call

    prefix = "br" + uuid.uuid4().hex[:8]
    up = ["up", "-p", prefix, "--daemon", "--no-huge", "--socket-mem", "160", "-c", str(_config(root, standby)), "--traffic",
          "--rate", str(a.rate), "--stats-listen", "127.0.0.1:0", "--stop-wait", "3"]
    inst = None
    try:
        r = _cli(*up, env=env)
        if r.returncode != 0:
            raise BenchFailed(f"the instance did not start:\n{r.stderr}")
        inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))
        words = QueueState.attach(inst.directory.lookup("ring.in.state").view).words[0]

        def progs() -> dict:
            return {p["name"]: p for p in call(prefix, "status")["programs"]}

        def sink() -> dict:
            return {t["name"]: t for t in call(prefix, "stats")["traffic"]}

        def ready(name: str, not_pid: int | None = None):
            p = progs()[name]
            return p if p["state"] == "READY" and p["pid"] not in (None, not_pid) else None

        _wait(lambda: sink().get("sink", {}).get("packets", 0) > a.rate // 2, 30, "traffic", 0.05)
        lost0 = sink()["sink"]["lost"]
        worker = []
        for _ in range(a.reps):
            ps = progs()
            old = ps["worker-0"]["pid"]
            heir = ps["standby-0"]["pid"] if standby else None
            t0 = time.monotonic_ns()
            os.kill(old, signal.SIGKILL)

            def polled():
                pid, _ = unpack_owner(int(words[W_OWNER]))
                last = int(words[W_LAST_POLL_NS])
                return (last, pid) if pid not in (0, old) and last > t0 else None

            t1, owner = _wait(polled, 60, "the queue to be polled again")
            if standby and owner != heir:
                raise BenchFailed(f"worker-0's queue went to pid {owner}, not to the standby pid {heir}")
            worker.append((t1 - t0) / 1e9)
            _wait(lambda: ready("worker-0", old), 30, "worker-0 READY", 0.01)
            if standby:
                _wait(lambda: ready("standby-0", heir), 60, "a new standby-0 READY", 0.01)
        lost = sink()["sink"]["lost"] - lost0

        adopt = []
        for _ in range(readoption):
            before = {n: p["pid"] for n, p in progs().items()}
            sup = call(prefix, "pid")["pid"]
            os.kill(sup, signal.SIGKILL)
            _wait(lambda: not _locked(prefix), 10, "the dead supervisor's lock to be released", 0.005)
            t0 = time.monotonic()
            r = _cli(*up, env=env)
            adopt.append(time.monotonic() - t0)
            if r.returncode != 0:
                raise BenchFailed(f"re-adoption failed:\n{r.stderr}")
            after = {n: p["pid"] for n, p in progs().items()}
            if after != before:
                raise BenchFailed(f"the new supervisor did not adopt everything: {before} -> {after}")
        return {"worker": worker, "lost": lost, "adopt": adopt}
    finally:
        if inst is not None:
            inst.close()
        _cli("down", "-p", prefix, env=env)
        _cli("cleanup", "--file-prefix", prefix, env=env)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench recovery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reps", type=int, default=4, help="worker kills per instance (default 4); supervisor kills: half of it, at least 2")
    ap.add_argument("--rate", type=int, default=2000, help="generator packets/s (default 2000)")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.rate < 1:
        print("bench recovery: --reps and --rate must be >= 1", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="hotplane-bench-recovery-"))
    env = dict(os.environ, HOTPLANE_RUNTIME_DIR=str(root), PYTHONUNBUFFERED="1")
    os.environ["HOTPLANE_RUNTIME_DIR"] = str(root)
    try:
        plain = _measure(root, env, a, standby=False, readoption=max(2, a.reps // 2))
        hot = _measure(root, env, a, standby=True, readoption=0)
        ref = []
        for _ in range(a.reps):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", "import numpy"], check=True)
            ref.append(time.monotonic() - t0)
    except BenchFailed as e:
        print(f"bench recovery: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)

    w, h, s, rf = _stats(plain["worker"]), _stats(hot["worker"]), _stats(plain["adopt"]), _stats(ref)
    rows = [
        {"measure": "worker SIGKILL -> queue polled again (restart, no standby)", **w},
        {"measure": "worker SIGKILL -> queue polled again (hot standby promoted)", **h},
        {"measure": "supervisor SIGKILL -> new supervisor READY, all adopted", **s},
        {"measure": "reference: python -c 'import numpy' start to exit", **rf},
    ]
    summary = {
        "worker_recovery_p50_ms": w["p50_ms"],
        "worker_recovery_vs_reference": w["p50_ms"] / rf["p50_ms"],
        "standby_recovery_p50_ms": h["p50_ms"],
        "standby_speedup": w["p50_ms"] / h["p50_ms"] if h["p50_ms"] else None,
        "readoption_p50_ms": s["p50_ms"],
        "readoption_vs_reference": s["p50_ms"] / rf["p50_ms"],
        "sink_lost_over_worker_kills": plain["lost"],
        "sink_lost_over_standby_promotions": hot["lost"],
        "generator_rate_pps": a.rate,
    }
    emit("recovery", rows, as_json=a.json, summary=summary)
    return 0


def _locked(prefix: str) -> bool:
    from hotplane.supervisor.main import running_supervisor_pid

    return running_supervisor_pid(prefix) is not None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
