"""``hotplane bench recovery [--json] [--reps N] [--rate PPS]``: how fast the tree repairs itself.

Starts a private instance (embedded default: ring ports, generator and sink; 4 KiB pages)
under a detached supervisor, then measures:

* ``worker_sigkill_to_poll``: from a worker's SIGKILL to its inside queue being polled
  again by the replacement -- the queue-state record's ``last_poll_ns`` (CLOCK_MONOTONIC,
  written by the new owner) minus the monotonic time just before the kill, with the
  owner pid checked to be the new process. No hot standby is configured (the
  supervisor starts a new worker), so this is restart-from-scratch.
* ``supervisor_readoption``: from launching a new supervisor after the old one was
  SIGKILLed to its READY=1 (every program adopted, none restarted): ``hotplane up
  --daemon`` returns on that notification.
* the reference, measured in the same run: starting ``python -c "import numpy"`` to its
  exit -- the floor for bringing back any Python process of this project.

Also reported: what the sink lost across the worker kills (packets the generator could
not queue while the ring was full, never frames inside the gateway).
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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench recovery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="worker kills (default 5); supervisor kills: half of it, at least 2")
    ap.add_argument("--rate", type=int, default=2000, help="generator packets/s (default 2000)")
    a = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="hotplane-bench-recovery-"))
    prefix = "br" + uuid.uuid4().hex[:8]
    env = dict(os.environ, HOTPLANE_RUNTIME_DIR=str(root), PYTHONUNBUFFERED="1")
    os.environ["HOTPLANE_RUNTIME_DIR"] = str(root)
    up = ["up", "-p", prefix, "--daemon", "--no-huge", "--socket-mem", "160", "--rate", str(a.rate), "--stats-listen", "127.0.0.1:0", "--stop-wait", "3"]
    from hotplane.supervisor.ctl import call

    inst = None
    try:
        r = _cli(*up, env=env)
        if r.returncode != 0:
            print(f"bench recovery: the instance did not start:\n{r.stderr}", file=sys.stderr)
            return 1
        from hotplane.schema.port import W_LAST_POLL_NS, W_OWNER, unpack_owner
        from hotplane.shared.burst import QueueState
        from hotplane.shared.eal import EalOptions
        from hotplane.shared.instance import eal_init

        inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))
        words = QueueState.attach(inst.directory.lookup("ring.in.state").view).words[0]

        def progs() -> dict:
            return {p["name"]: p for p in call(prefix, "status")["programs"]}

        def sink() -> dict:
            return {t["name"]: t for t in call(prefix, "stats")["traffic"]}

        _wait(lambda: sink().get("sink", {}).get("packets", 0) > a.rate // 2, 30, "traffic", 0.05)
        lost0 = sink()["sink"]["lost"]
        worker = []
        for _ in range(a.reps):
            old = progs()["worker-0"]["pid"]
            t0 = time.monotonic_ns()
            os.kill(old, signal.SIGKILL)

            def polled():
                pid, _ = unpack_owner(int(words[W_OWNER]))
                last = int(words[W_LAST_POLL_NS])
                return last if pid not in (0, old) and last > t0 else None

            t1 = _wait(polled, 60, "the queue to be polled again")
            worker.append((t1 - t0) / 1e9)
            _wait(lambda: progs()["worker-0"]["state"] == "READY" and progs()["worker-0"]["pid"] != old, 30, "READY", 0.01)
        t = sink()
        lost = t["sink"]["lost"] - lost0

        adopt = []
        for _ in range(max(2, a.reps // 2)):
            before = {n: p["pid"] for n, p in progs().items()}
            sup = call(prefix, "pid")["pid"]
            os.kill(sup, signal.SIGKILL)
            _wait(lambda: not _locked(prefix), 10, "the dead supervisor's lock to be released", 0.005)
            t0 = time.monotonic()
            r = _cli(*up, env=env)
            adopt.append(time.monotonic() - t0)
            if r.returncode != 0:
                print(f"bench recovery: re-adoption failed:\n{r.stderr}", file=sys.stderr)
                return 1
            after = {n: p["pid"] for n, p in progs().items()}
            if after != before:
                print(f"bench recovery: the new supervisor did not adopt everything: {before} -> {after}", file=sys.stderr)
                return 1

        ref = []
        for _ in range(a.reps):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", "import numpy"], check=True)
            ref.append(time.monotonic() - t0)
    finally:
        if inst is not None:
            inst.close()
        _cli("down", "-p", prefix, env=env)
        _cli("cleanup", "--file-prefix", prefix, env=env)
        shutil.rmtree(root, ignore_errors=True)

    w, s, rf = _stats(worker), _stats(adopt), _stats(ref)
    rows = [
        {"measure": "worker SIGKILL -> queue polled again (restart, no standby)", **w},
        {"measure": "supervisor SIGKILL -> new supervisor READY, all adopted", **s},
        {"measure": "reference: python -c 'import numpy' start to exit", **rf},
    ]
    summary = {
        "worker_recovery_p50_ms": w["p50_ms"],
        "worker_recovery_vs_reference": w["p50_ms"] / rf["p50_ms"],
        "readoption_p50_ms": s["p50_ms"],
        "readoption_vs_reference": s["p50_ms"] / rf["p50_ms"],
        "sink_lost_over_worker_kills": lost,
        "generator_rate_pps": a.rate,
        "hot_standby": "not implemented (a standby worker would claim(force=True) the queue)",
    }
    emit("recovery", rows, as_json=a.json, summary=summary)
    return 0


def _locked(prefix: str) -> bool:
    from hotplane.supervisor.main import running_supervisor_pid

    return running_supervisor_pid(prefix) is not None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
