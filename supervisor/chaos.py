"""``hotplane chaos``: inject faults into a live instance under traffic and report recovery.

``hotplane chaos (-p PREFIX | --build ring|lab) [--duration S] [--seed N]
[--kill worker,stats,primary,candidate,supervisor] [--interval S | --rate PER_MIN]
[--stop] [--upgrade-every S --upgrade-to TARGET] [--json] [--schedule-only]``

What it does
------------
1. Draws a *fault schedule* from ``--seed`` alone (plus the options that shape it:
   duration, kinds, interval/rate, --stop, --upgrade-every, the worker count): the
   same seed gives the same faults, in the same order, at the same offsets. Kinds
   are drawn in shuffled rounds, so every requested kind appears once before any
   appears twice. The schedule is printed first, with a fingerprint (sha256 of
   its JSON) so two runs are compared at a glance; ``--schedule-only`` prints it
   and exits (no instance needed).
2. Injects each fault at its offset (or, if the previous fault is still
   recovering, as soon as it has recovered: faults never overlap, so every loss
   figure belongs to one fault):

   * ``worker``/``stats``/``primary``: SIGKILL of the program's current pid; the
     supervisor restarts it.
   * ``supervisor``: SIGKILL of the supervisor; chaos then plays systemd's part
     (``Restart=on-failure``) and starts it again with its own command line, in
     ``--daemon`` mode; the new supervisor must re-adopt every program (same pids).
   * ``stop``: SIGSTOP of a worker for ``--stop-for`` seconds (default: long enough
     for the supervisor's heartbeat watch plus its stop deadline), then SIGCONT if it
     still exists: a hang.
   * ``candidate``: starts ``supervisorctl upgrade --to TARGET`` and SIGKILLs the
     first candidate once it reached the scheduled step; the upgrade must fail
     safe (the old version keeps running).
   * ``upgrade`` (``--upgrade-every``): ``upgrade --to TARGET`` then ``rollback``
     while the old processes are parked (both directions of a swap).

3. Measures, per fault: the pid it hit; the recovery time (kill to the program
   READY again with a new pid, and for a worker, kill to its queues polled again
   by a new owner -- queue-state ``last_poll_ns`` after the kill, ownership word
   changed -- and forwarding again); the sink's lost / duplicated / corrupted and
   the generator's ring-full refusals from just before the fault to ``--settle``
   seconds after recovery; NAT sessions lost (every session key present before
   must still be present after).

Verdict (exit 0 pass, 1 fail, 2 usage)
--------------------------------------
* sessions lost: 0, always;
* corrupted: 0 and duplicated: 0, always (a worker killed inside a burst has it
  finished exactly once by its successor: ``shared/burst_journal.py``);
* lost: 0 where no data-path process died (stats, primary, supervisor); where one
  did (worker, stop, candidate, upgrade), within the RX ring capacity of its
  queues *and* no more than the generator was refused by a full ring (ring ports),
  or no more than the kernel dropped at a full RX ring (af_packet: the queues'
  ``kernel_drops``, plus the sink's own): nothing that entered a ring may be lost;
* ``--build lab``: the kernel TCP stream (iperf3 from hp-inside to hp-outside
  through the gateway, for the whole run) ends normally: no reset, no error;
* every fault recovers within ``--recovery-timeout``.

A table (or, with ``--json``, one JSON document on stdout) lists every fault and
p50 / p99 / max recovery per kind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
KILL_KINDS = ("worker", "stats", "primary", "candidate", "supervisor")
DATA_PATH_KINDS = {"worker", "stop", "candidate", "upgrade"}
#: The upgrade steps a candidate kill lands at, in protocol order: before the swap (the old
#: version never stopped) and after it (the candidate owns the queues; before the commit the
#: upgrade reverts to the parked old processes, after it the supervisor restarts the unit).
CANDIDATE_STEPS = ("SPAWNED", "ATTACHED", "VALIDATED", "MIGRATED", "WARM", "READY", "SWAPPED")
FIRST_FAULT_AT = 3.0  # seconds of clean traffic before the first fault (a baseline)
POLL = 0.005
CATCH_UP_S = 3.0  # at most this long for the sink to catch up with the generator after a settle


class Usage(Exception):
    """Bad options: exit 2 with the message."""


# --------------------------------------------------------------------------- the schedule


@dataclass
class Fault:
    seq: int
    at: float  # seconds from the start of the run
    kind: str  # worker | stats | primary | supervisor | stop | candidate | upgrade
    program: str | None  # worker-N, stats, primary, supervisor (None: upgrade)
    step: str | None = None  # candidate: the step it is killed at


def make_schedule(seed: int, duration: float, kinds: list[str], *, interval: float | None, rate: float | None, stop: bool,
                  upgrade_every: float | None, workers: int) -> list[Fault]:
    """The faults of a run: a pure function of its arguments (the replay guarantee)."""
    rng = random.Random(seed)
    pool = [k for k in KILL_KINDS if k in kinds] + (["stop"] if stop else [])
    mean_gap = interval if interval is not None else (60.0 / rate if rate else None)
    out: list[Fault] = []
    horizon = duration * 0.85  # leave the end of the run for the last recovery
    if pool and mean_gap:
        t = FIRST_FAULT_AT
        bag: list[str] = []
        steps: list[str] = []  # candidate kills cycle through every step before one repeats
        while t < horizon:
            if not bag:
                bag = list(pool)
                rng.shuffle(bag)
            kind = bag.pop()
            program = {"worker": None, "stop": None, "stats": "stats", "primary": "primary", "supervisor": "supervisor", "candidate": None}[kind]
            if kind in ("worker", "stop", "candidate"):
                program = f"worker-{rng.randrange(workers)}"
            step = None
            if kind == "candidate":
                if not steps:
                    steps = list(CANDIDATE_STEPS)
                    rng.shuffle(steps)
                step = steps.pop()
            out.append(Fault(0, round(t, 3), kind, program, step))
            # interval: +-20 % jitter around it; rate: exponential gaps (a Poisson process)
            gap = interval * rng.uniform(0.8, 1.2) if interval is not None else rng.expovariate(1.0 / mean_gap)
            t += max(gap, 0.5)
    if upgrade_every:
        t = upgrade_every
        while t < horizon:
            out.append(Fault(0, round(t, 3), "upgrade", None))
            t += upgrade_every
    out.sort(key=lambda f: (f.at, f.kind))
    for i, f in enumerate(out):
        f.seq = i + 1
    return out


def fingerprint(schedule: list[Fault]) -> str:
    """sha256 of the schedule (what a replay must reproduce), first 16 hex digits."""
    doc = [(f.seq, f.at, f.kind, f.program, f.step) for f in schedule]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def format_schedule(schedule: list[Fault], seed: int) -> str:
    lines = [f"schedule (seed {seed}, {len(schedule)} faults, fingerprint {fingerprint(schedule)}):"]
    for f in schedule:
        what = f.kind + (f" {f.program}" if f.program and f.program != f.kind else "") + (f" at step {f.step}" if f.step else "")
        lines.append(f"  #{f.seq:<3} +{f.at:7.2f}s  {what}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading the instance


class Probe:
    """The instance's shared memory, attached as a secondary, and its supervisor's socket."""

    def __init__(self, prefix: str) -> None:
        from hotplane.shared.eal import EalOptions
        from hotplane.shared.instance import eal_init

        self.prefix = prefix
        self.inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))
        self.directory = self.inst.directory
        self._queues = self._queue_states()

    def close(self) -> None:
        try:
            self.inst.close()
        except Exception:
            pass

    def _queue_states(self) -> dict[str, Any]:
        from hotplane.shared.burst import QueueState

        out = {}
        for z in self.directory.list():
            if z.schema_id == 6 and z.name.endswith(".state"):
                out[z.name[: -len(".state")]] = QueueState.attach(z.view)
        return out

    def queues_of(self, worker: int) -> list[tuple[str, Any]]:
        """(port, words) of the queues worker ``worker`` polls (queue N of every port)."""
        return [(port, qs.words[worker]) for port, qs in sorted(self._queues.items()) if worker < qs.nqueues]

    def rx_slots(self, worker: int) -> int:
        """RX ring capacity of the worker's ring-port queues (0 for kernel rings: not known here)."""
        from hotplane.schema.port import FRAME_RING

        total = 0
        for port, _ in self.queues_of(worker):
            z = self.directory.lookup(f"{port}.q{worker}.rx")
            if z is not None:
                total += int(z.header(FRAME_RING)[0]["nslots"])
        return total

    def figures(self) -> dict[str, int]:
        """The sink's and the generator's cumulative figures (summed over slots)."""
        from hotplane.secondary.stats import _traffic

        from hotplane.schema.port import W_KERNEL_DROPS

        f = {"sink_packets": 0, "lost": 0, "duplicated": 0, "reordered": 0, "corrupted": 0, "gen_packets": 0, "ring_drops": 0, "sinks": 0,
             "kernel_drops": sum(int(qs.words[i][W_KERNEL_DROPS]) for qs in self._queues.values() for i in range(qs.nqueues))}
        for t in _traffic(self.directory):
            if t["kind"] == "sink":
                f["sinks"] += 1
                f["sink_packets"] += t["packets"]
                f["kernel_drops"] += int(t.get("kernel_drops", 0) or 0)
                for k in ("lost", "duplicated", "reordered", "corrupted"):
                    f[k] += t[k]
            else:
                f["gen_packets"] += t["packets"]
                f["ring_drops"] += t["ring_drops"]
        return f

    def session_keys(self) -> set[tuple[str, int, int]]:
        """Every live NAT session, as (table, key0, key1)."""
        import numpy as np

        from hotplane.secondary.stats import SESSION_SCHEMA_ID, _NAT_ZONE
        from hotplane.shared.session_table import SessionTable

        keys: set[tuple[str, int, int]] = set()
        for z in self.directory.list():
            if z.schema_id != SESSION_SCHEMA_ID or _NAT_ZONE.match(z.name) is None:
                continue
            try:
                t = SessionTable.attach(z.view)
            except Exception:
                continue
            e = t.entries
            used = np.flatnonzero(e["state"] == 1)
            k0 = e["key0"][used].tolist()
            k1 = e["key1"][used].tolist()
            keys.update((z.name, a, b) for a, b in zip(k0, k1))
        return keys


def sup_call(prefix: str, method: str, params: dict | None = None, timeout: float = 5.0) -> Any:
    from hotplane.supervisor.ctl import call

    return call(prefix, method, params or {}, timeout=timeout)


def programs(prefix: str) -> dict[str, dict]:
    return {p["name"]: p for p in sup_call(prefix, "status")["programs"]}


def wait_for(pred: Callable[[], Any], timeout: float, step: float = POLL) -> Any:
    """First truthy ``pred()`` within ``timeout`` seconds, else None (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except Exception:
            v = None
        if v:
            return v
        if time.monotonic() >= deadline:
            return None
        time.sleep(step)


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    seq: int
    kind: str
    program: str | None
    scheduled_at: float
    step: str | None = None  # candidate: the upgrade step it was scheduled at
    injected_at: float | None = None
    pid: int | None = None
    new_pid: int | None = None
    recovery_s: float | None = None
    ready_s: float | None = None
    polled_s: float | None = None
    forwarding_s: float | None = None
    lost: int = 0
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    ring_drops: int = 0
    kernel_drops: int = 0
    sessions_before: int = 0
    sessions_lost: int = 0
    loss_bound: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class Chaos:
    def __init__(self, a: argparse.Namespace, prefix: str, env: dict[str, str], log: Callable[[str], None], netns: str | None = None) -> None:
        self.a = a
        self.netns = netns  # the network namespace the supervisor runs in (lab), for restarting it there
        self.prefix = prefix
        self.env = env
        self.log = log
        self.probe = Probe(prefix)
        self.sup_pid: int | None = None
        self.hb_limit, self.stop_wait = 5.0, 10.0
        self._read_supervisor_options()

    def _read_supervisor_options(self) -> None:
        """The heartbeat limit and stop deadline the supervisor runs with (from its command line)."""
        import psutil

        try:
            self.sup_pid = int(sup_call(self.prefix, "pid")["pid"])
            cmd = psutil.Process(self.sup_pid).cmdline()
        except Exception:
            return

        def opt(name: str, default: float) -> float:
            return float(cmd[cmd.index(name) + 1]) if name in cmd and cmd.index(name) + 1 < len(cmd) else default

        self.hb_limit = opt("--heartbeat-interval", 0.5) * opt("--heartbeat-misses", 10)
        self.stop_wait = opt("--stop-wait", 10.0)

    # ------------------------------------------------------------------ one fault

    def run_fault(self, f: Fault, t0: float) -> Result:
        r = Result(f.seq, f.kind, f.program, f.at, f.step)
        before = self.probe.figures()
        keys_before = self.probe.session_keys()
        r.sessions_before = len(keys_before)
        r.injected_at = round(time.monotonic() - t0, 3)
        try:
            getattr(self, f"_inject_{f.kind}")(f, r)
        except Exception as e:  # an injection that could not even be done is a failed fault, not a crash
            r.failures.append(f"injection failed: {type(e).__name__}: {e}")
        # Let traffic run after recovery so the sink sees any gap, then compare.
        time.sleep(self.a.settle)
        # A loaded machine can leave the sink behind the generator; a gap it has not read yet
        # would be booked to the next fault (or to none). Wait, bounded, until it has accounted
        # for everything the generator had delivered by now.
        mark = self.probe.figures()["gen_packets"]
        wait_for(lambda: (lambda g: g["sink_packets"] + g["lost"] >= mark)(self.probe.figures()), CATCH_UP_S)
        after = self.probe.figures()
        keys_after = self.probe.session_keys()
        r.lost = after["lost"] - before["lost"]
        r.duplicated = after["duplicated"] - before["duplicated"]
        r.corrupted = after["corrupted"] - before["corrupted"]
        r.reordered = after["reordered"] - before["reordered"]
        r.ring_drops = after["ring_drops"] - before["ring_drops"]
        r.kernel_drops = after["kernel_drops"] - before["kernel_drops"]
        gone = keys_before - keys_after
        r.sessions_lost = len(gone)
        if gone:
            r.detail["sessions_lost_sample"] = [f"{t}:{k0:#x}/{k1:#x}" for t, k0, k1 in sorted(gone)[:5]]
        if after["sinks"] and after["sink_packets"] <= before["sink_packets"]:
            r.failures.append("the sink received nothing across the fault and its settle time")
        self._judge(f, r)
        return r

    def _judge(self, f: Fault, r: Result) -> None:
        if r.sessions_lost:
            r.failures.append(f"{r.sessions_lost} NAT session(s) lost")
        if r.corrupted:
            r.failures.append(f"{r.corrupted} corrupted packet(s)")
        if f.kind in DATA_PATH_KINDS:
            wid = int(f.program.split("-")[1]) if f.program and f.program.startswith("worker-") else None
            slots = self.probe.rx_slots(wid) if wid is not None else sum(self.probe.rx_slots(i) for i in range(self.workers()))
            if slots:
                r.loss_bound = min(slots, r.ring_drops)
                why = f"ring capacity {slots}, generator refused {r.ring_drops}"
            else:  # kernel rings: what the kernel could not queue while nobody polled
                r.loss_bound = r.ring_drops + r.kernel_drops
                why = f"generator refused {r.ring_drops}, kernel dropped {r.kernel_drops} at full RX rings"
            if r.lost > r.loss_bound:
                r.failures.append(f"lost {r.lost} > bound {r.loss_bound} ({why}): packets that entered a ring were lost")
        else:
            r.loss_bound = 0
            if r.lost:
                r.failures.append(f"lost {r.lost} where no data-path process died (bound 0)")
        if r.duplicated:
            r.failures.append(f"duplicated {r.duplicated}: a packet sent twice")
        if r.recovery_s is None and not any(x.startswith("injection failed") for x in r.failures):
            r.failures.append(f"no recovery within {self.a.recovery_timeout:g}s")

    def workers(self) -> int:
        return len([n for n in programs(self.prefix) if n.startswith("worker-")])

    def _pid_of(self, name: str) -> int:
        p = programs(self.prefix)[name]
        if not p.get("pid"):
            raise RuntimeError(f"{name} has no pid (state {p['state']})")
        return int(p["pid"])

    def _wait_ready(self, name: str, old: int, t_kill: float) -> tuple[float | None, int | None]:
        def up():
            p = programs(self.prefix)[name]
            return p if p["state"] in ("READY", "RUNNING") and p["pid"] not in (None, old) else None

        p = wait_for(up, self.a.recovery_timeout, step=0.05)
        return (time.monotonic() - t_kill, int(p["pid"])) if p else (None, None)

    def _wait_queues(self, wid: int, old_words: dict[str, int], kill_ns: int, r: Result, t_kill: float) -> None:
        """Queue polled again by a new owner (word changed, poll after the kill), then frames flowing."""
        from hotplane.schema.port import W_LAST_POLL_NS, W_OWNER, W_RX_FRAMES, unpack_owner
        from hotplane.shared.queue_owner import token_of

        qs = self.probe.queues_of(wid)

        def polled():
            return all(token_of(int(w[W_OWNER])) != old_words[port] and unpack_owner(int(w[W_OWNER]))[0] != 0 and int(w[W_LAST_POLL_NS]) > kill_ns
                       for port, w in qs)

        if wait_for(polled, self.a.recovery_timeout):
            r.polled_s = time.monotonic() - t_kill
            r.detail["owners"] = {port: "pid %d gen %d" % unpack_owner(int(w[W_OWNER])) for port, w in qs}
            base = [int(w[W_RX_FRAMES]) for _, w in qs]
            sending = self.probe.figures()["gen_packets"] > 0
            if sending and wait_for(lambda: any(int(w[W_RX_FRAMES]) > b for (_, w), b in zip(qs, base)), self.a.recovery_timeout):
                r.forwarding_s = time.monotonic() - t_kill
            elif sending:
                r.failures.append(f"worker-{wid}'s queues are polled but receive nothing for {self.a.recovery_timeout:g}s (cursor lost?)")

    # ------------------------------------------------------------------ kinds

    def _kill_program(self, f: Fault, r: Result) -> None:
        from hotplane.schema.port import W_OWNER
        from hotplane.shared.queue_owner import token_of

        name = f.program
        r.pid = self._pid_of(name)
        wid = int(name.split("-")[1]) if name.startswith("worker-") else None
        old_words = {port: token_of(int(w[W_OWNER])) for port, w in self.probe.queues_of(wid)} if wid is not None else {}
        kill_ns = time.monotonic_ns()
        t_kill = time.monotonic()
        os.kill(r.pid, signal.SIGKILL)
        self.log(f"#{f.seq} SIGKILL {name} pid {r.pid}")
        if wid is not None:
            self._wait_queues(wid, old_words, kill_ns, r, t_kill)
        r.ready_s, r.new_pid = self._wait_ready(name, r.pid, t_kill)
        if r.ready_s is not None and (wid is None or r.polled_s is not None):
            r.recovery_s = max(r.ready_s, r.polled_s or 0.0)

    _inject_worker = _kill_program
    _inject_stats = _kill_program
    _inject_primary = _kill_program

    def _inject_stop(self, f: Fault, r: Result) -> None:
        """SIGSTOP a worker (a hang), hold, SIGCONT if it is still there; see who polls its queues."""
        from hotplane.schema.port import W_LAST_POLL_NS, W_OWNER, unpack_owner
        from hotplane.shared.queue_owner import token_of

        name = f.program
        wid = int(name.split("-")[1])
        hold = self.a.stop_for if self.a.stop_for is not None else self.hb_limit + self.stop_wait + 1.5
        r.detail["hold_s"] = round(hold, 2)
        r.pid = self._pid_of(name)
        old_words = {port: token_of(int(w[W_OWNER])) for port, w in self.probe.queues_of(wid)}
        kill_ns = time.monotonic_ns()
        t_stop = time.monotonic()
        os.kill(r.pid, signal.SIGSTOP)
        self.log(f"#{f.seq} SIGSTOP {name} pid {r.pid} for {hold:.1f}s")
        # Replaced: every queue polled, after the stop, by an owner other than the stopped worker.
        replaced = wait_for(lambda: all(token_of(int(w[W_OWNER])) != old_words[p] and unpack_owner(int(w[W_OWNER]))[0] not in (0, r.pid)
                                        and int(w[W_LAST_POLL_NS]) > kill_ns for p, w in self.probe.queues_of(wid)), hold, step=0.02)
        if replaced:
            r.detail["fenced_after_s"] = round(time.monotonic() - t_stop, 3)
        time.sleep(max(0.0, hold - (time.monotonic() - t_stop)))
        alive = pid_alive(r.pid)
        r.detail["alive_at_sigcont"] = alive
        if alive:
            os.kill(r.pid, signal.SIGCONT)
        if replaced:
            self._wait_queues(wid, old_words, kill_ns, r, t_stop)
            r.ready_s, r.new_pid = self._wait_ready(name, r.pid, t_stop)
            if alive:
                # Resumed after being fenced: it must leave without touching the queues.
                gone = wait_for(lambda: not pid_alive(r.pid), self.a.recovery_timeout, step=0.02)
                r.detail["resumed_exits"] = bool(gone)
                owners = {p: unpack_owner(int(w[W_OWNER]))[0] for p, w in self.probe.queues_of(wid)}
                if r.pid in owners.values():
                    r.failures.append(f"the resumed worker pid {r.pid} owns its queue again: fencing failed")
                if not gone:
                    r.failures.append(f"the fenced worker pid {r.pid} was resumed and is still running")
            r.detail["outcome"] = "replaced while stopped" + (", resumed and exited" if alive else ", stopped one killed")
        else:
            # Not detected within the hold: the resumed worker must carry on.
            r.detail["outcome"] = "not replaced within the hold: resumed"
            r.new_pid = r.pid
            r.polled_s = wait_for(lambda: all(int(w[W_LAST_POLL_NS]) > time.monotonic_ns() - 50_000_000 for _, w in self.probe.queues_of(wid)),
                                  self.a.recovery_timeout) and time.monotonic() - t_stop
            r.ready_s = r.polled_s
        if r.polled_s is not None and r.ready_s is not None:
            # From the SIGSTOP to the queues polled by the replacement (seen during the hold), or to the resumed worker polling.
            r.recovery_s = r.detail.get("fenced_after_s") if replaced else max(r.polled_s, r.ready_s)

    def _inject_supervisor(self, f: Fault, r: Result) -> None:
        """SIGKILL the supervisor; start it again as systemd would; it must adopt every program."""
        import psutil

        r.pid = int(sup_call(self.prefix, "pid")["pid"])
        proc = psutil.Process(r.pid)
        cmd, env, cwd = proc.cmdline(), proc.environ(), proc.cwd()
        before = {n: p["pid"] for n, p in programs(self.prefix).items()}
        t_kill = time.monotonic()
        os.kill(r.pid, signal.SIGKILL)
        self.log(f"#{f.seq} SIGKILL supervisor pid {r.pid}")
        wait_for(lambda: not pid_alive(r.pid), 10)
        restart = restart_command(cmd)
        if self.netns:
            restart = ["ip", "netns", "exec", self.netns, *restart]
        env.pop("NOTIFY_SOCKET", None)
        res = subprocess.run(restart, env=env, cwd=cwd, capture_output=True, text=True, timeout=self.a.recovery_timeout + 60)
        if res.returncode != 0:
            r.failures.append(f"the restarted supervisor did not come up (exit {res.returncode}): {res.stderr.strip()[-300:]}")
            return
        ps = wait_for(lambda: (lambda p: p if all(x["state"] in ("READY", "RUNNING") for x in p.values()) else None)(programs(self.prefix)),
                      self.a.recovery_timeout, step=0.05)
        if not ps:
            r.failures.append("programs not all up under the restarted supervisor")
            return
        r.recovery_s = r.ready_s = time.monotonic() - t_kill
        r.new_pid = int(sup_call(self.prefix, "pid")["pid"])
        self.sup_pid = r.new_pid
        changed = sorted(n for n, pid in before.items() if n in ps and ps[n]["pid"] != pid)
        r.detail["adopted"] = sorted(n for n, p in ps.items() if p.get("adopted"))
        if changed:
            r.failures.append(f"not re-adopted (restarted instead): {', '.join(changed)}")

    def _upgrade(self, target: str, timeout: float, extra: list[str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hotplane.supervisor.ctl", "-p", self.prefix, "--json", "upgrade", "--to", target, *(extra or [])],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def _inject_upgrade(self, f: Fault, r: Result) -> None:
        """upgrade --to TARGET, then rollback while the old version is parked: both swap directions."""
        t = time.monotonic()
        up = self._upgrade(self.a.upgrade_to, self.a.recovery_timeout + 60, ["--park-time", str(max(30.0, self.a.recovery_timeout))])
        r.detail["upgrade"] = _last_json(up.stdout).get("result") or up.stderr.strip()[-200:]
        if up.returncode != 0:
            r.failures.append(f"upgrade --to {self.a.upgrade_to} failed: {r.detail['upgrade']}")
            return
        rb = subprocess.run([sys.executable, "-m", "hotplane.supervisor.ctl", "-p", self.prefix, "--json", "rollback"], env=self.env,
                            capture_output=True, text=True, timeout=self.a.recovery_timeout + 60)
        r.detail["rollback"] = _last_json(rb.stdout).get("result") or rb.stderr.strip()[-200:]
        if rb.returncode != 0:
            r.failures.append(f"rollback failed: {r.detail['rollback']}")
            return
        r.recovery_s = r.ready_s = time.monotonic() - t

    def _inject_candidate(self, f: Fault, r: Result) -> None:
        """Start an upgrade of the workers; SIGKILL the scheduled worker's candidate once it reached the
        scheduled step (or a later one); before the commit the old version must carry on."""
        before = {n: p["pid"] for n, p in programs(self.prefix).items()}
        box: dict[str, Any] = {}
        # A short park: a kill after the commit leaves the upgrade parked, and the next fault's
        # upgrade must not find one still running.
        # Only the workers are upgraded: the kill is aimed at the scheduled worker's candidate, and
        # two candidates start in half the time of four.
        extra = ["--park-time", "1", "--only", "worker"]
        th = threading.Thread(target=lambda: box.setdefault("r", self._upgrade(self.a.upgrade_to, self.a.recovery_timeout + 60, extra)), daemon=True)
        th.start()
        want = CANDIDATE_STEPS.index(f.step)

        running = set(before.values())

        def candidate_at_step():
            st = sup_call(self.prefix, "upgrade_status")
            if st.get("phase") in (None, "IDLE", "DONE"):
                return None  # not started yet (or the previous upgrade's status)
            for unit, u in (st.get("units") or {}).items():
                if f.program and unit != f.program:
                    continue
                step, pid = u.get("step"), u.get("cand_pid")
                # This upgrade's candidate: not a process that was already running before it.
                if pid and pid not in running and step in CANDIDATE_STEPS and CANDIDATE_STEPS.index(step) >= want:
                    return unit, step, pid
            return None

        hit = wait_for(candidate_at_step, self.a.recovery_timeout, step=0.01)
        if not hit:
            th.join(self.a.recovery_timeout + 60)
            r.failures.append(f"no candidate reached step {f.step} (upgrade: {_last_json(box['r'].stdout) if 'r' in box else 'still running'})")
            return
        unit, step, r.pid = hit
        t_kill = time.monotonic()
        os.kill(r.pid, signal.SIGKILL)
        self.log(f"#{f.seq} SIGKILL candidate of {unit} pid {r.pid} at step {step}")
        r.detail.update(unit=unit, step_at_kill=step)
        th.join(self.a.recovery_timeout + 60)
        res = _last_json(box["r"].stdout) if "r" in box else {}
        r.detail["upgrade_result"] = res.get("result") or res.get("phase")
        committed = res.get("result") == "committed" or res.get("phase") == "COMMITTED"  # a kill after the commit point
        after = wait_for(lambda: (lambda p: p if all(x["state"] in ("READY", "RUNNING") for x in p.values()) else None)(programs(self.prefix)),
                         self.a.recovery_timeout, step=0.05)
        if not after:
            r.failures.append("programs not all up after the failed upgrade")
            return
        r.recovery_s = r.ready_s = time.monotonic() - t_kill
        changed = sorted(n for n, pid in before.items() if n in after and after[n]["pid"] != pid)
        if changed and not committed:
            r.failures.append(f"a failed upgrade replaced running programs: {', '.join(changed)}")

    # ------------------------------------------------------------------ whole run

    def run(self, schedule: list[Fault]) -> tuple[list[Result], dict[str, Any]]:
        t0 = time.monotonic()
        start = self.probe.figures()
        keys0 = self.probe.session_keys()
        results: list[Result] = []
        for f in schedule:
            now = time.monotonic() - t0
            # Every scheduled fault is injected, late if recoveries ran long (the schedule is the
            # replay contract); only past twice the duration does the run give up on the rest.
            if now > 2 * self.a.duration:
                self.log(f"#{f.seq} {f.kind}: skipped, the run is past twice its duration")
                continue
            if now > f.at + 1.0:
                self.log(f"#{f.seq} {f.kind}: {now - f.at:.1f}s late (earlier recoveries ran long)")
            if f.at > now:
                time.sleep(f.at - now)
            r = self.run_fault(f, t0)
            results.append(r)
            rec = f"{r.recovery_s:.3f}s" if r.recovery_s is not None else "none"
            self.log(f"#{f.seq} {f.kind} {f.program or ''}: recovered in {rec}; lost {r.lost} dup {r.duplicated} corrupt {r.corrupted} "
                     f"sessions lost {r.sessions_lost}" + (f"; FAIL: {'; '.join(r.failures)}" if r.failures else ""))
        left = self.a.duration - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        end = self.probe.figures()
        keys1 = self.probe.session_keys()
        totals = {k: end[k] - start[k] for k in ("sink_packets", "gen_packets", "lost", "duplicated", "corrupted", "reordered", "ring_drops")}
        totals["sessions_start"] = len(keys0)
        totals["sessions_end"] = len(keys1)
        totals["sessions_lost"] = len(keys0 - keys1)
        totals["elapsed_s"] = round(time.monotonic() - t0, 2)
        totals["sinks"] = end["sinks"]
        return results, totals


def _last_json(text: str) -> dict:
    for line in reversed((text or "").strip().splitlines()):
        try:
            d = json.loads(line)
            return d if isinstance(d, dict) else {}
        except ValueError:
            continue
    try:
        return json.loads(text)
    except ValueError:
        return {}


def restart_command(cmd: list[str]) -> list[str]:
    """A killed supervisor's command line, as the one that starts it again detached (``--daemon``, wait for READY)."""
    out = [c for c in cmd if c not in ("--daemonized", "--quiet")]
    if "--" not in out:
        out.append("--")
    return out + ["--daemon"]


# --------------------------------------------------------------------------- report


def summarize(results: list[Result], totals: dict[str, Any], schedule: list[Fault], seed: int) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.kind for r in results}):
        rs = [r for r in results if r.kind == kind]
        rec = [r.recovery_s for r in rs if r.recovery_s is not None]
        by_kind[kind] = {"faults": len(rs), "recovered": len(rec), "p50_s": percentile(rec, 50), "p99_s": percentile(rec, 99), "max_s": max(rec) if rec else None,
                         "lost": sum(r.lost for r in rs), "duplicated": sum(r.duplicated for r in rs), "corrupted": sum(r.corrupted for r in rs),
                         "sessions_lost": sum(r.sessions_lost for r in rs)}
    failures = [f"#{r.seq} {r.kind} {r.program or ''}: {x}".replace("  ", " ") for r in results for x in r.failures]
    if totals.get("sessions_lost"):
        failures.append(f"run: {totals['sessions_lost']} NAT session(s) present at the start are gone at the end")
    if totals.get("corrupted"):
        failures.append(f"run: {totals['corrupted']} corrupted packet(s)")
    if totals.get("sinks") and totals.get("sink_packets", 0) <= 0:
        failures.append("run: the sink received nothing")
    return {"seed": seed, "fingerprint": fingerprint(schedule), "schedule": [asdict(f) for f in schedule],
            "faults": [asdict(r) for r in results], "by_kind": by_kind, "totals": totals,
            "verdict": "FAIL" if failures else "PASS", "failures": failures}


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_report(doc: dict[str, Any]) -> str:
    lines = [f"{'#':>3} {'kind':<10} {'program':<10} {'at':>7} {'pid':>7} {'new pid':>7} {'recovery':>8} {'lost':>5} {'dup':>4} {'corr':>4} {'sess-':>5}  result"]
    for r in doc["faults"]:
        lines.append(f"{r['seq']:>3} {r['kind']:<10} {(r['program'] or '-'):<10} {r['injected_at'] or 0:>7.2f} {r['pid'] or '-':>7} {r['new_pid'] or '-':>7} "
                     f"{_s(r['recovery_s']):>8} {r['lost']:>5} {r['duplicated']:>4} {r['corrupted']:>4} {r['sessions_lost']:>5}  "
                     + ("ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])))
    lines.append("")
    lines.append(f"{'kind':<10} {'faults':>6} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'lost':>6} {'dup':>5} {'corr':>5} {'sess-':>5}")
    for k, v in doc["by_kind"].items():
        lines.append(f"{k:<10} {v['faults']:>6} {_s(v['p50_s']):>7} {_s(v['p99_s']):>7} {_s(v['max_s']):>7} {v['lost']:>6} {v['duplicated']:>5} {v['corrupted']:>5} {v['sessions_lost']:>5}")
    t = doc["totals"]
    lines.append("")
    lines.append(f"run: {t['elapsed_s']}s, generator sent {t['gen_packets']:,} (ring-full {t['ring_drops']:,}), sink received {t['sink_packets']:,}, "
                 f"lost {t['lost']:,}, duplicated {t['duplicated']:,}, reordered {t['reordered']:,}, corrupted {t['corrupted']:,}; "
                 f"sessions {t['sessions_start']} -> {t['sessions_end']} (lost {t['sessions_lost']})")
    lines.append(f"verdict: {doc['verdict']} (seed {doc['seed']}, schedule {doc['fingerprint']})")
    for x in doc["failures"]:
        lines.append(f"  {x}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- building an instance


class Built:
    """An instance ``hotplane chaos --build ring`` started and must take down."""

    def __init__(self, a: argparse.Namespace, log: Callable[[str], None]) -> None:
        import secrets

        self.prefix = f"chaos{secrets.token_hex(4)}"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log = log
        self.tmp: str | None = None
        if a.tree:
            # Run another checkout (a broken build in a test, an older release): import it as ``hotplane``.
            tree = Path(a.tree).resolve()
            if not (tree / "__init__.py").exists() or not (tree / "supervisor" / "cli.py").exists():
                raise Usage(f"--tree {tree}: not a hotplane checkout (no __init__.py / supervisor/cli.py)")
            self.tmp = tempfile.mkdtemp(prefix="hotplane-chaos-")
            os.symlink(tree, Path(self.tmp) / "hotplane")
            self.env["PYTHONPATH"] = self.tmp + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.args = ["up", "-p", self.prefix, "--daemon", "--rate", str(a.traffic_rate), "--flows", str(a.flows),
                     "--stats-listen", "127.0.0.1:0", "--heartbeat-interval", str(a.heartbeat_interval), "--heartbeat-misses", str(a.heartbeat_misses),
                     "--stop-wait", str(a.stop_wait)]
        if not a.huge:
            self.args += ["--no-huge", "--socket-mem", str(a.socket_mem)]
        self.args += shlex.split(a.up_args or "")
        self.pids: set[int] = set()

    def hotplane(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self) -> None:
        self.log(f"building instance {self.prefix!r}: hotplane {' '.join(self.args[1:])}")
        r = self.hotplane(*self.args)
        if r.returncode != 0:
            raise RuntimeError(f"hotplane up failed (exit {r.returncode}): {r.stderr.strip()[-600:]}")
        self.remember()

    def remember(self) -> None:
        """Every pid of the instance seen so far (killed by pid at teardown if ``down`` leaves any)."""
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.prefix in (p.info["cmdline"] or []):
                    self.pids.add(p.pid)
            except psutil.Error:
                pass

    def down(self) -> None:
        import psutil

        self.remember()
        try:
            r = self.hotplane("down", "-p", self.prefix, timeout=90)
            if r.returncode != 0:
                self.log(f"hotplane down: exit {r.returncode}: {r.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            self.log("hotplane down: timed out")
        self.remember()
        left = []
        for pid in sorted(self.pids):
            try:
                p = psutil.Process(pid)
                if self.prefix in p.cmdline():  # the same process (a reused pid would not name our prefix)
                    p.kill()
                    left.append(pid)
            except psutil.Error:
                pass
        if left:
            self.log(f"killed leftovers: {left}")
            psutil.wait_procs([psutil.Process(x) for x in left if psutil.pid_exists(x)], timeout=10)
        try:
            self.hotplane("cleanup", "-p", self.prefix, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _ready_line(p: subprocess.Popen, timeout: float) -> bool:
    """Wait (bounded) for the READY line gen and sink print first on stdout."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            line = p.stdout.readline()
            if not line:
                return False
            if line.startswith("READY") or '"ready"' in line:
                return True
        return False
    finally:
        sel.close()


class BuiltLab(Built):
    """An instance ``hotplane chaos --build lab`` runs in the namespace lab (``deploy/lab.py``).

    The gateway (``deploy/gateway.toml``: af_packet ports, NAT, two workers) runs
    under its supervisor in hp-gw; the generator in hp-inside and the verifying
    sink in hp-outside work on af_packet sockets of the hosts' own interfaces and
    report into the instance's traffic zone; a kernel TCP stream (iperf3, hp-inside
    to hp-outside through the NAT) runs for the whole run and must end normally.
    """

    def __init__(self, a: argparse.Namespace, log: Callable[[str], None]) -> None:
        from hotplane.deploy import lab

        super().__init__(a, log)
        self.lab = lab
        self.netns = lab.NS_GW
        self.duration = a.duration
        self.tcp_rate = a.tcp_rate
        cfg = Path(lab.__file__).resolve().parent / "gateway.toml"
        self.args = ["up", "-p", self.prefix, "--daemon", "-c", str(cfg), "--no-traffic", "--stats-listen", "127.0.0.1:0",
                     "--heartbeat-interval", str(a.heartbeat_interval), "--heartbeat-misses", str(a.heartbeat_misses), "--stop-wait", str(a.stop_wait)]
        if not a.huge:
            self.args += ["--no-huge", "--socket-mem", str(a.socket_mem)]
        self.args += shlex.split(a.up_args or "")
        self.traffic_rate, self.flows = a.traffic_rate, a.flows
        self.procs: dict[str, subprocess.Popen] = {}
        self.lab_up = False

    def _in(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def hotplane_in(self, ns: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self._in(ns, sys.executable, "-m", "hotplane.supervisor.cli", *args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs[name] = p
        return p

    def up(self) -> None:
        if os.geteuid() != 0:
            raise Usage("--build lab needs root (network namespaces)")
        if shutil.which("iperf3") is None:
            raise Usage("--build lab needs iperf3 for its kernel TCP stream (apt-get install iperf3)")
        lab = self.lab
        self.log("bringing the namespace lab up")
        lab.down()
        lab.up()
        self.lab_up = True
        self.log(f"building instance {self.prefix!r} in {lab.NS_GW}: hotplane {' '.join(self.args[1:])}")
        r = self.hotplane_in(lab.NS_GW, *self.args)
        if r.returncode != 0:
            raise RuntimeError(f"hotplane up failed (exit {r.returncode}): {r.stderr.strip()[-600:]}")
        self.remember()
        run_s = self.duration + 10
        peer = lab.OUTSIDE_HOSTS[0]
        for name, ns, args in (("sink", lab.NS_OUTSIDE, ["--duration", str(run_s + 10)]),
                               ("gen", lab.NS_INSIDE, ["--dst", peer, "--dport", "9", "--flows", str(self.flows), "--rate", str(self.traffic_rate),
                                                       "--duration", str(run_s)])):
            p = self._spawn(name, self._in(ns, sys.executable, "-m", "hotplane.supervisor.cli", name, "--file-prefix", self.prefix, "--",
                                           "--port", f"af_packet:{lab.HOST_IF}", *args, "--name", name, "--quiet"))
            if not _ready_line(p, 30):
                p.kill()
                raise RuntimeError(f"the lab's {name} did not report READY: {p.communicate(timeout=10)[1].strip()[-600:]}")
        self._spawn("iperf3-server", self._in(lab.NS_OUTSIDE, "iperf3", "-s", "-1", "-B", peer, "-J"))
        listening = wait_for(lambda: ":5201" in subprocess.run(self._in(lab.NS_OUTSIDE, "ss", "-Hltn", "sport = :5201"),
                                                              capture_output=True, text=True, timeout=5).stdout, 10, step=0.05)
        if not listening:
            raise RuntimeError("the lab's iperf3 server did not start listening")
        self._spawn("iperf3", self._in(lab.NS_INSIDE, "iperf3", "-c", peer, "-t", str(int(run_s)), "-b", self.tcp_rate, "-J",
                                       "--connect-timeout", "5000"))

    def tcp_report(self) -> dict[str, Any]:
        """The kernel TCP stream's outcome: ok (no reset, no error), bytes, retransmits, longest stall."""
        p = self.procs.get("iperf3")
        if p is None:
            return {"ok": False, "error": "the TCP stream was never started"}
        try:
            out, err = p.communicate(timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        try:
            doc = json.loads(out)
        except ValueError:
            return {"ok": False, "error": f"iperf3 exit {p.returncode}: {(err or out).strip()[-300:]}"}
        stall = run = 0.0
        for iv in doc.get("intervals", []):
            sm = iv.get("sum", {})
            if sm.get("bytes", 0) == 0:
                run += sm.get("seconds", 1.0)
                stall = max(stall, run)
            else:
                run = 0.0
        sent = doc.get("end", {}).get("sum_sent", {})
        rep = {"ok": p.returncode == 0 and "error" not in doc, "bytes": sent.get("bytes", 0), "retransmits": sent.get("retransmits"),
               "seconds": round(sent.get("seconds", 0.0), 1), "mbit_s": round(sent.get("bits_per_second", 0) / 1e6, 2), "max_stall_s": stall}
        if "error" in doc:
            rep["error"] = doc["error"]
        return rep

    def down(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
        super().down()
        if self.lab_up:
            self.lab.down()


# --------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hotplane chaos", description="Inject faults into an instance under traffic and report recovery, loss and sessions.")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("-p", "--file-prefix", help="a live instance to hurt")
    where.add_argument("--build", choices=("ring", "lab"), help="start an own instance and take it down at the end: ring (ring ports, "
                       "gen -> sink) or lab (the namespace lab: af_packet ports, gen and sink on the hosts, a kernel TCP stream)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds the run lasts (default 60)")
    ap.add_argument("--seed", type=int, default=1, help="the schedule's seed: same seed, same faults in the same order (default 1)")
    ap.add_argument("--kill", default="worker,stats,primary,supervisor", help=f"comma list of {','.join(KILL_KINDS)} (default worker,stats,primary,supervisor; '' for none)")
    rate = ap.add_mutually_exclusive_group()
    rate.add_argument("--interval", type=float, help="seconds between faults (+-20%% jitter; default 8)")
    rate.add_argument("--rate", type=float, help="faults per minute, Poisson")
    ap.add_argument("--stop", action="store_true", help="also SIGSTOP a worker for a while, then SIGCONT (a hang)")
    ap.add_argument("--stop-for", type=float, help="seconds a stopped worker is held (default: heartbeat limit + stop deadline + 1.5)")
    ap.add_argument("--upgrade-every", type=float, help="seconds between upgrade+rollback cycles (needs --upgrade-to and a build with 'supervisorctl upgrade')")
    ap.add_argument("--upgrade-to", help="the other build for upgrades and candidate kills (a checkout directory)")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds of traffic after each recovery before its figures are taken (default 1.5)")
    ap.add_argument("--recovery-timeout", type=float, default=30.0, help="a fault not recovered within this many seconds fails (default 30)")
    ap.add_argument("--workers", type=int, default=2, help="with --schedule-only: the worker count to draw targets from (default 2)")
    ap.add_argument("--schedule-only", action="store_true", help="print the schedule and exit (no instance needed)")
    ap.add_argument("--json", action="store_true", help="the report as one JSON document on stdout (progress on stderr)")
    b = ap.add_argument_group("--build ring|lab")
    b.add_argument("--tree", help="run the instance from this hotplane checkout instead of the installed one")
    b.add_argument("--traffic-rate", type=int, default=800, help="generator packets/s (default 800)")
    b.add_argument("--flows", type=int, default=64, help="generator flows (= NAT sessions; default 64)")
    b.add_argument("--huge", action="store_true", help="hugepage memory (default: --no-huge --socket-mem)")
    b.add_argument("--socket-mem", type=int, default=160, help="MiB of shared memory without hugepages (default 160)")
    b.add_argument("--heartbeat-interval", type=float, default=0.2)
    b.add_argument("--heartbeat-misses", type=int, default=5)
    b.add_argument("--stop-wait", type=float, default=2.0)
    b.add_argument("--up-args", help="more 'hotplane up' options, one shell-quoted string")
    b.add_argument("--tcp-rate", default="20M", help="--build lab: the kernel TCP stream's rate, iperf3 -b (default 20M)")
    return ap


def upgrade_available(prefix: str | None) -> str | None:
    """None when this build has ``supervisorctl upgrade`` (and the running supervisor answers it); else why not."""
    from hotplane.supervisor import ctl

    if "upgrade" not in ctl.parser()._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        return "this build has no 'supervisorctl upgrade'"
    if prefix is not None:
        try:
            sup_call(prefix, "upgrade_status")
        except Exception as e:
            return f"the supervisor of {prefix!r} does not answer upgrade_status ({e})"
    return None


def main(argv: list[str]) -> int:
    ap = parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_PASS
    out = sys.stderr if a.json else sys.stdout

    def log(text: str) -> None:
        print(f"chaos: {text}", file=out, flush=True)

    try:
        kinds = [k.strip() for k in a.kill.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KILL_KINDS]
        if bad:
            raise Usage(f"--kill: unknown kind(s) {', '.join(bad)} (choose from {', '.join(KILL_KINDS)})")
        if a.duration <= 0 or (a.interval is not None and a.interval <= 0) or (a.rate is not None and a.rate <= 0) or a.workers < 1:
            raise Usage("--duration, --interval, --rate and --workers must be > 0")
        if a.interval is None and a.rate is None:
            a.interval = 8.0
        if ("candidate" in kinds or a.upgrade_every) and not a.upgrade_to:
            raise Usage("candidate kills and --upgrade-every need --upgrade-to TARGET (the other build)")
        if not a.schedule_only and not a.file_prefix and not a.build:
            raise Usage("name a live instance (-p PREFIX) or --build ring|lab")
    except Usage as e:
        print(f"hotplane chaos: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    if a.schedule_only:
        schedule = make_schedule(a.seed, a.duration, kinds, interval=a.interval, rate=a.rate, stop=a.stop, upgrade_every=a.upgrade_every, workers=a.workers)
        if a.json:
            print(json.dumps({"seed": a.seed, "fingerprint": fingerprint(schedule), "schedule": [asdict(f) for f in schedule]}))
        else:
            print(format_schedule(schedule, a.seed))
        return EXIT_PASS

    built: Built | None = None
    chaos: Chaos | None = None
    try:
        if a.build:
            try:
                built = (BuiltLab if a.build == "lab" else Built)(a, log)
                built.up()
            except Usage as e:
                print(f"hotplane chaos: error: {e}", file=sys.stderr)
                return EXIT_USAGE
            prefix, env = built.prefix, built.env
        else:
            prefix, env = a.file_prefix, dict(os.environ)
            try:
                sup_call(prefix, "status")
            except Exception as e:
                print(f"hotplane chaos: instance {prefix!r}: {e}", file=sys.stderr)
                return EXIT_USAGE
        if "candidate" in kinds or a.upgrade_every:
            why = upgrade_available(prefix)
            if why:
                print(f"hotplane chaos: error: upgrades are not available in this build: {why}", file=sys.stderr)
                return EXIT_USAGE
        nworkers = len([n for n in programs(prefix) if n.startswith("worker-")])
        if nworkers == 0 and ("worker" in kinds or a.stop or "candidate" in kinds):
            print("hotplane chaos: error: the instance has no workers to hurt", file=sys.stderr)
            return EXIT_USAGE
        schedule = make_schedule(a.seed, a.duration, kinds, interval=a.interval, rate=a.rate, stop=a.stop, upgrade_every=a.upgrade_every, workers=max(nworkers, 1))
        log(format_schedule(schedule, a.seed).replace("\n", "\nchaos: "))
        chaos = Chaos(a, prefix, env, log, netns=getattr(built, "netns", None))
        if chaos.probe.figures()["sinks"] == 0:
            log("no sink in the instance's traffic zone: loss cannot be measured, only recovery and sessions")
        else:
            # A baseline: traffic flowing before the first fault.
            n0 = chaos.probe.figures()["sink_packets"]
            if not wait_for(lambda: chaos.probe.figures()["sink_packets"] > n0, 30, step=0.05):
                log("no traffic reaches the sink before the first fault")
        results, totals = chaos.run(schedule)
        if built:
            built.remember()
        doc = summarize(results, totals, schedule, a.seed)
        doc["prefix"] = prefix
        if isinstance(built, BuiltLab):
            doc["tcp"] = tcp = built.tcp_report()
            log(f"kernel TCP stream: {'ok' if tcp['ok'] else 'BROKEN'}: {tcp}")
            if not tcp["ok"]:
                doc["failures"].append(f"run: the kernel TCP stream through the gateway broke: {tcp.get('error', tcp)}")
                doc["verdict"] = "FAIL"
        if a.json:
            print(json.dumps(doc, default=str))
        else:
            print(format_report(doc))
        return EXIT_PASS if doc["verdict"] == "PASS" else EXIT_FAIL
    except KeyboardInterrupt:
        log("interrupted")
        return EXIT_FAIL
    except Exception as e:
        print(f"hotplane chaos: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if chaos is not None:
            chaos.probe.close()
        if built is not None:
            built.down()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
