"""The supervisor's asyncio shell around the drain-and-swap machine (``upgrade_protocol``).

``supervisorctl upgrade --to TARGET [--dry-run] [--canary N]`` arrives as the
``upgrade`` control request; the shell resolves TARGET to a build, builds an
:class:`~hotplane.supervisor.upgrade_protocol.UpgradeMachine` with one unit per
running worker, and performs the machine's actions in order:

* ``StartCandidate``: ``hotplane worker ... --id N --candidate`` from the
  target build (its interpreter and its package, see :func:`resolve_target`),
  watched by a pidfd; the candidate reports its steps with ``candidate_report``.
* ``ClaimQueue`` / ``ReleaseQueue`` / ``SendTo*``: requests on the worker's
  upgrade control socket (``<runtime>/upgrade/w<pid>.sock``); the replies
  become ``QueueClaimed`` / ``QueueReleased``, a dead channel ``IpcLost``.
* ``KillProcess`` (SIGKILL through the pidfd), ``RestartOld`` (the program's
  own process supervision starts the old version again), timers, ``Record``
  (``<runtime>/upgrade.json``, so a restarted supervisor resumes or rolls
  back), ``Progress`` lines and ``Done`` (appended to
  ``<runtime>/upgrade-history.jsonl``).

When a unit is swapped its program is handed to the candidate (the process
supervision adopts it, and a later restart runs the target build); a revert
hands it back.

Units: the primary (it hands over its IPC socket, lock and af_packet sockets,
``primary/handover.py``), every worker, and the stats secondary (it hands over
its listening socket, ``secondary/stats_handover.py``), in that order;
``kinds`` narrows the set. Candidates of the stats secondary and the primary
find the process they replace in ``$HOTPLANE_UPGRADE_OLD_PID``.

Swap order: the claimer is *armed* first (``arm``: it spins on the word and
answers at once); only then does the release go out, and only if the machine
still wants it (a release delayed past a revert would overtake the claim that
took the queue back). An old worker that does not answer its release because
it is stopped or hung between passes is fenced by generation (as the heartbeat
watch fences a hung worker): the armed candidate takes its queues, and the old
process, if it ever runs again, leaves without touching them.

Canary health: while the machine watches the canary, its workers' counter
blocks are sampled every ``HEALTH_INTERVAL`` and fed as ``HealthSample``: drops
(all reasons, with the reasons of the window in the verdict), accounting errors
(a gap in the block's books that persists over two samples) and heartbeat age.

Test hook: ``pause_at`` (a protocol step, PAUSE_STEPS) holds every event from
the moment worker-0 reaches that step until ``upgrade_resume``, so a test's
SIGKILL lands at that step. A restarted supervisor also kills candidates that
no record names (their supervisor died between spawning and recording them).

Targets
-------
``--to DIR``: a hotplane checkout (``DIR/__init__.py`` and
``DIR/supervisor/cli.py``); its interpreter is ``DIR/.venv/bin/python`` if
present, else the supervisor's own; ``DIR`` is imported as ``hotplane``
through a shim directory (``<runtime>/builds/<id>/hotplane -> DIR``) on
``PYTHONPATH``. ``--to VERSION``: a build of that version found under
``$HOTPLANE_BUILDS`` (colon-separated directories of checkouts, default
``/opt/hotplane/builds``), or ``current`` for the supervisor's own build.
``DIR/.hotplane-env`` (``KEY=VALUE`` lines) adds environment variables for
that build (e.g. ``HOTPLANE_SESSION_VERSION=2``). The build is checked by
running its interpreter: it must import ``hotplane`` from DIR.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hotplane import __version__
from hotplane.supervisor import upgrade_protocol as up

STATE_FILE = "upgrade.json"
HISTORY_FILE = "upgrade-history.jsonl"

#: What an upgrade replaces, in swap order (``kinds`` narrows it): the primary first (the
#: workers need it only to start), then the workers, then the stats secondary.
UNIT_KINDS = ("primary", "worker", "stats")
#: ``pause_at`` (a test hook: hold every event once worker-0 reaches the step, until
#: ``upgrade_resume``, so a kill lands at that step): step name -> the unit step it waits for.
PAUSE_STEPS = {"prepare": up.Step.SPAWNED, "attach": up.Step.ATTACHED, "validate": up.Step.VALIDATED, "migrate": up.Step.MIGRATED,
               "ready": up.Step.READY, "swap": up.Step.SWAPPING, "commit": None}
#: Canary health: seconds between samples of the canary workers' counters.
HEALTH_INTERVAL = 0.2
#: The upgrade_control header's phase word for each machine phase (readers without the supervisor).
PHASE_WORDS = {up.Phase.IDLE: 0, up.Phase.PREPARING: 1, up.Phase.SWAPPING: 2, up.Phase.CANARY: 3, up.Phase.SWAPPED: 4,
               up.Phase.COMMITTED: 5, up.Phase.REVERTING: 6, up.Phase.DONE: 7}


class TargetError(Exception):
    """TARGET does not name a usable hotplane build."""


@dataclass
class Build:
    """A hotplane build the supervisor can start processes from."""

    root: Path | None  # None: the supervisor's own build
    python: str
    version: str
    env: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"hotplane {self.version} at {self.root or 'the supervisor build'} ({self.python})"

    def to_dict(self) -> dict:
        return {"root": str(self.root) if self.root else None, "python": self.python, "version": self.version, "env": self.env}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Build":
        if not d:
            return current_build()
        return cls(Path(d["root"]) if d.get("root") else None, d["python"], d["version"], dict(d.get("env") or {}))


def current_build() -> Build:
    return Build(None, sys.executable, __version__, {})


def _is_checkout(d: Path) -> bool:
    return (d / "__init__.py").is_file() and (d / "supervisor" / "cli.py").is_file() and (d / "secondary" / "worker.py").is_file()


def _shim(rundir: Path, root: Path) -> Path:
    h = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    d = rundir / "builds" / h
    d.mkdir(parents=True, exist_ok=True)
    link = d / "hotplane"
    if link.is_symlink() and os.readlink(link) != str(root):
        link.unlink()
    if not link.exists():
        link.symlink_to(root, target_is_directory=True)
    return d


def _read_env_file(root: Path) -> dict:
    f = root / ".hotplane-env"
    out = {}
    if f.is_file():
        for line in f.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip()
    return out


def resolve_target(target: str, rundir: Path) -> Build:
    """TARGET (a directory or a version) as a :class:`Build`; TargetError says why not."""
    if target in ("current", __version__) and not Path(target).exists():
        return current_build()
    p = Path(target).expanduser()
    if not p.is_dir():
        dirs = [Path(x) for x in os.environ.get("HOTPLANE_BUILDS", "/opt/hotplane/builds").split(":") if x]
        found = []
        for d in dirs:
            for c in (d / target, *(sorted(d.iterdir()) if d.is_dir() else [])):
                if c.is_dir() and _is_checkout(c) and _version_in(c) == target:
                    found.append(c)
        if not found:
            raise TargetError(f"{target!r} is neither a directory holding a hotplane checkout nor an installed version "
                              f"(looked in $HOTPLANE_BUILDS={':'.join(map(str, dirs))})")
        p = found[0]
    p = p.resolve()
    if not _is_checkout(p):
        raise TargetError(f"{p} is not a hotplane checkout (no __init__.py, supervisor/cli.py, secondary/worker.py)")
    venv = p / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    env = _read_env_file(p)
    env["PYTHONPATH"] = str(_shim(rundir, p))
    probe = subprocess.run([python, "-c", "import hotplane,sys; print(hotplane.__version__); print(hotplane.__file__)"],
                           env=dict(os.environ, **env), capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        raise TargetError(f"{python} cannot import hotplane from {p}: {probe.stderr.strip()[-300:]}")
    version, origin = probe.stdout.split("\n")[:2]
    if Path(origin).resolve().parent != p:
        raise TargetError(f"{python} imports hotplane from {origin}, not from {p}")
    return Build(p, python, version.strip(), env)


def _version_in(d: Path) -> str | None:
    for line in (d / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


class _PidWatch:
    """A pidfd watch for a process we did not spawn (after a supervisor restart)."""

    def __init__(self, loop, pid: int, callback) -> None:
        self.pid = pid
        try:
            self.fd = os.pidfd_open(pid)
        except OSError:
            self.fd = -1
            loop.call_soon(callback, pid)
            return
        self.loop = loop

        def fired():
            loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
            callback(pid)

        loop.add_reader(self.fd, fired)

    def kill(self) -> None:
        if self.fd >= 0:
            try:
                signal.pidfd_send_signal(self.fd, signal.SIGKILL)
            except OSError:
                pass


class UpgradeShell:
    """Runs one upgrade at a time for a :class:`hotplane.supervisor.main.Supervisor`."""

    def __init__(self, sup) -> None:
        self.sup = sup
        self.machine: up.UpgradeMachine | None = None
        self.builds: dict[str, Build] = {}  # "old" / "new"
        self.cands: dict[str, Any] = {}  # unit -> launcher.Child or _PidWatch
        self.old_children: dict[str, Any] = {}  # unit -> the parked old Child (after hand-over)
        self.handed: set[str] = set()
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.lines: list[str] = []
        self.done: asyncio.Event | None = None
        self.settled: asyncio.Event | None = None  # committed (parked window running) or done
        self.started_ns = 0
        self.finished_ns = 0
        self.pause_at: str | None = None  # test hook (PAUSE_STEPS); cleared once it paused
        self.paused = False
        self.backlog: list = []  # events held while paused
        self.held_actions: list = []  # actions held with them (pause at "ready")
        self.armed: dict[tuple[str, str], asyncio.Event] = {}  # (unit, queue) -> the claimer is spinning on it
        self.health_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ paths

    @property
    def state_path(self) -> Path:
        return self.sup.rundir / STATE_FILE

    @property
    def history_path(self) -> Path:
        return self.sup.rundir / HISTORY_FILE

    @property
    def busy(self) -> bool:
        return self.machine is not None and self.machine.busy

    # ------------------------------------------------------------------ requests

    async def start(self, params: dict) -> dict:
        """The ``upgrade`` request: run an upgrade to ``params['to']``; returns when done (or ``wait=False``)."""
        from hotplane.shared.ipc import RemoteError

        if self.busy:
            raise RemoteError("busy", f"an upgrade is already running (phase {self.machine.phase.value}, target {self.machine.config.target}); "
                                      "only one at a time: see 'supervisorctl upgrade status'")
        target = params.get("to")
        if not target:
            raise RemoteError("usage", "upgrade needs --to TARGET")
        try:
            build = await asyncio.get_running_loop().run_in_executor(None, resolve_target, str(target), self.sup.rundir)
        except (TargetError, OSError, subprocess.SubprocessError) as e:
            raise RemoteError("usage", f"upgrade target: {e}") from None
        kinds = tuple(params.get("kinds") or UNIT_KINDS)
        bad = [k for k in kinds if k not in UNIT_KINDS]
        if bad:
            raise RemoteError("usage", f"upgrade: unknown unit kind(s) {', '.join(bad)}; choose from {', '.join(UNIT_KINDS)}")
        pause_at = params.get("pause_at")
        if pause_at is not None and pause_at not in PAUSE_STEPS:
            raise RemoteError("usage", f"upgrade: pause_at must be one of {', '.join(PAUSE_STEPS)}")
        units = []
        for kind in UNIT_KINDS:
            if kind not in kinds:
                continue
            for p in self.sup.programs.values():
                if p.kind != kind:
                    continue
                if not p.machine.is_up or p.machine.pid is None:
                    raise RemoteError("not_ready", f"{p.name} is {p.state.value}: upgrade a running instance only")
                queues = (f"inside/{p.worker_id}", f"outside/{p.worker_id}") if kind == "worker" else ()
                units.append(up.UnitSpec(p.name, kind, p.machine.pid, queues))
        deadlines = dict(up.DEFAULT_DEADLINES)
        deadlines.update({k: float(v) for k, v in (params.get("deadlines") or {}).items()})
        cfg = up.UpgradeConfig(target=str(target), canary=int(params.get("canary", 0)), canary_window=float(params.get("canary_window", 5.0)),
                               park_time=float(params.get("park_time", 10.0)), dry_run=bool(params.get("dry_run")), deadlines=deadlines,
                               max_drops=int(params.get("max_drops", 0)), max_errors=int(params.get("max_errors", 0)),
                               max_heartbeat_age=float(params.get("max_heartbeat_age", 1.0)))
        self.builds = {"old": self._current_program_build(), "new": build}
        for h in self.timers.values():  # nothing of an earlier upgrade may fire into this one
            h.cancel()
        self.timers.clear()
        self.machine = up.UpgradeMachine.new(cfg, units)
        self.lines = [f"target: {build.describe()}"]
        self.cands.clear()
        self.old_children.clear()
        self.handed.clear()
        self.done = asyncio.Event()
        self.settled = asyncio.Event()
        self.started_ns = time.monotonic_ns()
        self.finished_ns = 0
        self.pause_at, self.paused, self.backlog, self.held_actions = pause_at, False, [], []
        self.armed.clear()
        self._prepare_control_zone()
        self.feed(up.Begin())
        if params.get("wait", True):
            try:
                await asyncio.wait_for(self.settled.wait(), float(params.get("timeout", 120.0)))
            except asyncio.TimeoutError:
                pass
        return self.status()

    def _current_program_build(self) -> Build:
        b = getattr(self.sup, "worker_build", None)
        return b if b is not None else current_build()

    async def rollback(self, params: dict) -> dict:
        from hotplane.shared.ipc import RemoteError

        if not self.busy:
            raise RemoteError("not_running", "no upgrade to roll back (rollback works while the old processes are parked, until the upgrade is done)")
        self.feed(up.RollbackRequested(params.get("reason") or "operator requested rollback"))
        if params.get("wait", True):
            try:
                await asyncio.wait_for(self.done.wait(), float(params.get("timeout", 60.0)))
            except asyncio.TimeoutError:
                pass
        return self.status()

    def resume_paused(self) -> dict:
        """End a ``pause_at`` hold: the held events are handled in order, the upgrade goes on."""
        self.paused = False
        acts, self.held_actions = self.held_actions, []
        if acts:
            self._perform(acts)
        held, self.backlog = self.backlog, []
        for ev in held:
            self.feed(ev)
        return self.status()

    def commit_now(self) -> None:
        """End the park window now (tests, operators that are sure)."""
        if self.machine is not None and self.machine.phase is up.Phase.COMMITTED:
            t = self.machine.timers.get("park")
            if t:
                self._timer("park", t[0])

    def status(self) -> dict:
        m = self.machine
        st = m.status() if m is not None else {"phase": "IDLE", "target": None, "units": {}}
        st["lines"] = list(self.lines)
        st["builds"] = {k: b.to_dict() for k, b in self.builds.items()}
        st["swap_gaps_us"] = self.swap_gaps()
        st["paused"] = self.paused
        if self.finished_ns:
            st["elapsed_s"] = (self.finished_ns - self.started_ns) / 1e9
        return st

    def history(self) -> list[dict]:
        out = []
        if self.history_path.exists():
            for line in self.history_path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def swap_gaps(self) -> dict[str, float]:
        """Per queue: new owner's first burst - old owner's last burst, microseconds (this upgrade)."""
        inst = self.sup.inst
        if inst is None:
            return {}
        z = inst.directory.lookup("upgrade_control")
        if z is None:
            return {}
        from hotplane.schema import upgrade as us

        _, recs = us.attach(z.view)
        nq = sum(1 for p in self.sup.programs.values() if p.kind == "worker")
        out = {}
        for i, r in enumerate(recs):
            a, b = int(r["old_last_burst_ns"]), int(r["new_first_burst_ns"])
            if a and b and b >= a and a >= self.started_ns:
                out[f"{('inside', 'outside')[i // nq] if nq else '?'}/{i % nq if nq else i}"] = (b - a) / 1e3
        return out

    def _prepare_control_zone(self) -> None:
        """The ``upgrade_control`` zone (one record per queue), created on the first upgrade."""
        self.sup._attach_memory()
        inst = self.sup.inst
        if inst is None:
            return
        from hotplane.schema import upgrade as us

        nq = sum(1 for p in self.sup.programs.values() if p.kind == "worker")
        try:
            z, created = inst.directory.reserve_or_lookup("upgrade_control", us.LAYOUT.zone_size(2 * nq), us.LAYOUT)
            hdr, recs = us.create(z.view, 2 * nq) if created else us.attach(z.view)
            hdr["upgrade_seq"] = int(hdr["upgrade_seq"][0]) + 1
            hdr["phase"] = us.PHASE_PREPARING
        except Exception as e:  # noqa: BLE001 - measurement only: the upgrade runs without it
            self.sup.say(f"upgrade: no upgrade_control zone ({e}); swap gaps will not be measured", "warning")

    # ------------------------------------------------------------------ the machine

    def feed(self, event) -> None:
        m = self.machine
        if m is None:
            return
        if self.paused:
            self.backlog.append(event)
            return
        loop = self.sup.loop
        actions = m.handle(event, loop.time())
        if self.pause_at == "ready" and self._reached("ready"):
            # The event that made worker-0 ready may start the swap at once: hold its actions too,
            # so the pause is between "every candidate ready" and the first swap order.
            self.pause_at, self.paused, self.held_actions = None, True, actions
            self.lines.append("paused at step ready (test hook): events are held until 'upgrade_resume'")
            self.sup.say(f"upgrade: {self.lines[-1]}", "warning")
            return
        self._perform(actions)

    def _perform(self, actions: list) -> None:
        m = self.machine
        for a in actions:
            try:
                self._do(a)
            except Exception as e:  # noqa: BLE001 - one failed action must not kill the supervisor
                self.sup.say(f"upgrade: action {a!r} failed: {e}", "error")
        handed = set(self.handed)
        self._hand_over()
        if self.handed != handed:
            self._save_state(m.to_dict())  # a restarted supervisor must know which programs run the candidate
        self._publish_phase()
        if m.phase is up.Phase.CANARY and (self.health_task is None or self.health_task.done()):
            self.health_task = asyncio.ensure_future(self._watch_canary())
        if self.pause_at is not None and self._reached(self.pause_at):
            step, self.pause_at, self.paused = self.pause_at, None, True
            self.lines.append(f"paused at step {step} (test hook): events are held until 'upgrade_resume'")
            self.sup.say(f"upgrade: {self.lines[-1]}", "warning")
        if m.phase in (up.Phase.COMMITTED, up.Phase.DONE) and self.settled is not None and not self.settled.is_set():
            if not self.finished_ns and m.phase is up.Phase.COMMITTED:
                self.finished_ns = time.monotonic_ns()
            self.settled.set()

    def _reached(self, step: str) -> bool:
        """Has the first worker unit (else the first unit) reached ``step`` (PAUSE_STEPS) of this upgrade?"""
        m = self.machine
        if PAUSE_STEPS[step] is None:
            return m.phase is up.Phase.COMMITTED
        u = next((x for x in m.units if x.kind == "worker"), m.units[0] if m.units else None)
        if step == "ready":  # it may be swapping already in the same event (see feed)
            return u is not None and u.step in (up.Step.READY, up.Step.SWAPPING, up.Step.SWAPPED) and m.phase is not up.Phase.REVERTING
        return u is not None and u.step is PAUSE_STEPS[step]

    def _publish_phase(self) -> None:
        """The phase word of the upgrade_control zone follows the machine (stats reads it)."""
        inst = self.sup.inst
        z = inst.directory.lookup("upgrade_control") if inst is not None else None
        if z is None or self.machine is None:
            return
        from hotplane.schema import upgrade as us

        try:
            us.attach(z.view)[0]["phase"] = PHASE_WORDS[self.machine.phase]
        except Exception:  # noqa: BLE001 - a figure, never a reason to fail the upgrade
            pass

    async def _watch_canary(self) -> None:
        """Feed the machine the canary workers' health while it watches them (HealthSample).

        Per canary unit: drops (every reason) and accounting errors (packets received
        and neither forwarded, punted nor dropped: the block's books do not balance)
        as cumulative counts -- the machine takes the first sample as the base -- and
        the heartbeat's age. Bad figures make the machine roll the upgrade back.
        """
        from hotplane.shared.counters import REASON_NAMES, CounterBlocks

        base: dict[str, np.ndarray] = {}
        gaps: dict[str, tuple[int, int]] = {}  # unit -> (last accounting gap seen, errors reported)
        while self.machine is not None and self.machine.phase is up.Phase.CANARY:
            inst = self.sup.inst
            z = inst.directory.lookup("counters") if inst is not None else None
            if z is not None:
                blocks = CounterBlocks.attach(z.view)
                snap = blocks.snapshot()
                now = time.monotonic_ns()
                for u in self.machine.units:
                    prog = self.sup.programs.get(u.name)
                    if not u.canary or prog is None or prog.worker_id is None or not u.cand_alive:
                        continue
                    rec = snap[prog.worker_id]
                    drops = rec["dropped"].astype(np.int64)
                    base.setdefault(u.name, drops.copy())
                    delta = drops - base[u.name]
                    detail = ", ".join(f"{REASON_NAMES[i]} {int(v)}" for i, v in enumerate(delta) if v)
                    hb = int(rec["heartbeat_ns"])
                    age = (now - hb) / 1e9 if hb else float("inf")
                    # A gap read mid-burst is transient (the books are written after the burst): only
                    # one that stays the same over two samples is an error.
                    gap = int(blocks.accounting_gap(prog.worker_id))
                    last, errors = gaps.get(u.name, (None, 0))
                    if gap == last:
                        errors = abs(gap)
                    gaps[u.name] = (gap, errors)
                    self.feed(up.HealthSample(u.name, int(drops.sum()), errors, max(0.0, age), detail))
            await asyncio.sleep(HEALTH_INTERVAL)

    def _do(self, a) -> None:
        loop = self.sup.loop
        if isinstance(a, up.StartCandidate):
            self._start_candidate(a)
        elif isinstance(a, up.ClaimQueue):
            ev = self.armed[(a.unit, a.queue)] = asyncio.Event()
            self._spawn_task(self._claim(a, ev))
        elif isinstance(a, up.ReleaseQueue):
            self._spawn_task(self._release(a))
        elif isinstance(a, (up.SendToWorker, up.SendToCandidate)):
            role = "old" if isinstance(a, up.SendToWorker) else "new"
            self._spawn_task(self._request(a.unit, role, a.pid, a.msg.get("op", "status"), dict(a.msg), ok=None))
        elif isinstance(a, up.KillProcess):
            self._kill(a.unit, a.role, a.pid)
        elif isinstance(a, up.RestartOld):
            self._restart_old(a.unit)
        elif isinstance(a, up.ArmTimer):
            old = self.timers.pop(a.name, None)
            if old:
                old.cancel()
            self.timers[a.name] = loop.call_later(a.seconds, self._timer, a.name, a.token)
        elif isinstance(a, up.CancelTimer):
            h = self.timers.pop(a.name, None)
            if h:
                h.cancel()
        elif isinstance(a, up.Log):
            self.sup.say(a.message, a.level)
        elif isinstance(a, up.Progress):
            self.lines.append(a.line)
            self.sup.say(f"upgrade: {a.line}")
        elif isinstance(a, up.Record):
            self._save_state(a.state)
        elif isinstance(a, up.Done):
            self._done(a)

    def _save_state(self, state: dict) -> None:
        """The machine's state plus what the shell adds (builds, programs handed over), for a restart."""
        state = dict(state, builds={k: b.to_dict() for k, b in self.builds.items()}, handed=sorted(self.handed), started_ns=self.started_ns)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def _timer(self, name: str, token: int) -> None:
        h = self.timers.pop(name, None)
        if h is not None:
            # Fired early by hand (commit_now): the loop's handle must not fire again later. Every
            # upgrade's machine numbers its timers from 1, so a stale "park" of an earlier
            # upgrade would carry a token the current machine accepts and end its park at once.
            h.cancel()
        self.feed(up.TimerFired(name, token))

    def _spawn_task(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self.sup._tasks.append(t)
        t.add_done_callback(lambda t: self.sup._tasks.remove(t) if t in self.sup._tasks else None)

    async def _claim(self, a: up.ClaimQueue, armed: asyncio.Event) -> None:
        """Arm the claimer (it spins on the word and answers at once), then wait for the claim to land."""
        timeout = self.machine.config.deadline("swap_primary" if self._kind(a.unit) == "primary" else "swap") + 1
        try:
            if not a.force:
                await self._request(a.unit, a.role, a.pid, "arm", {"queue": a.queue, "timeout": timeout}, ok=None, lost=False)
        finally:
            armed.set()  # the release goes out now (also if arming failed: the deadline decides then)
        await self._request(a.unit, a.role, a.pid, "claim", {"queue": a.queue, "force": a.force, "timeout": timeout},
                            ok=up.QueueClaimed(a.unit, a.queue, a.role))

    def _kind(self, unit: str) -> str:
        u = self.machine.unit(unit) if self.machine is not None else None
        return u.kind if u is not None else "worker"

    async def _release(self, a: up.ReleaseQueue) -> None:
        """Order the release once the other side is armed for every queue of the unit, so it takes over
        within microseconds; an old worker that stalls (stopped, hung) instead is fenced by generation."""
        waits = [e.wait() for (unit, _), e in self.armed.items() if unit == a.unit and not e.is_set()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), 2.0)
            except asyncio.TimeoutError:
                pass
        m = self.machine
        u = m.unit(a.unit) if m is not None else None
        want = up.Stage.SWAP if a.role == "old" else up.Stage.BACK
        if u is None or u.stages.get(a.queue) is not want:
            # The machine moved on while we waited (a revert): an order sent now would overtake its
            # later ones to this process (a release after the claim that took the queue back).
            self.sup.say(f"upgrade: {a.unit}: release of {a.queue} by {a.role} no longer wanted; not sent", "warning")
            return
        budget = max(0.2, self.machine.config.deadline("swap_primary" if self._kind(a.unit) == "primary" else "swap") / 2)
        params = {"queue": a.queue, "timeout": budget}
        try:
            await asyncio.wait_for(self._request(a.unit, a.role, a.pid, "release", params, ok=up.QueueReleased(a.unit, a.queue, a.role)), budget + 0.5)
        except asyncio.TimeoutError:
            if a.role == "old" and self._fence_stalled(a.unit, a.pid):
                self.feed(up.QueueReleased(a.unit, a.queue, a.role))

    def _fence_stalled(self, unit: str, pid: int | None) -> bool:
        """The old worker of ``unit`` did not answer its release: if it is stopped or hung *between*
        passes, fence its queues by generation (queue_owner.fence) and free them for the armed
        candidate, and clear its session tables' writer role. Resumed later, it finds its words
        changed and leaves without touching the queues. Inside a pass (busy) it cannot be fenced."""
        prog = self.sup.programs.get(unit)
        if pid is None or prog is None or prog.worker_id is None or self.sup.inst is None or not _stalled(pid, self.sup.inst, prog.worker_id):
            return False
        from hotplane.schema.port import QUEUE_STATE
        from hotplane.shared.burst import QueueState
        from hotplane.shared.queue_owner import FENCED, fence, hand_back

        words, tables = [], []
        for z in self.sup.inst.directory.list():
            if z.schema_id == QUEUE_STATE.schema_id:
                qs = QueueState.attach(z.view)
                if prog.worker_id < qs.nqueues:
                    words.append(qs.words[prog.worker_id])
            elif z.name.startswith(f"nat.w{prog.worker_id}.") and z.layout.header is not None and "writer_pid" in z.layout.header.names:
                tables.append(z.header(z.layout))
        outcomes = [fence(w, pid) for w in words]
        if not any(o == FENCED for o in outcomes):
            self.sup.say(f"upgrade: {unit}: old pid {pid} stalls and cannot be fenced ({', '.join(outcomes)})", "warning")
            return False
        for w, o in zip(words, outcomes):
            if o == FENCED:
                hand_back(w, pid)
        for h in tables:
            if int(h[0]["writer_pid"]) == pid:
                h[0]["writer_pid"] = 0
        self.lines.append(f"{unit}: old pid {pid} stalled at its release: fenced by generation, its queues go to the candidate")
        self.sup.say(f"upgrade: {self.lines[-1]}", "warning")
        return True

    async def _request(self, unit: str, role: str, pid: int | None, op: str, params: dict, ok, lost: bool = True) -> None:
        from hotplane.shared import ipc
        from hotplane.secondary.worker import control_socket_path

        if pid is None:
            return
        path = control_socket_path(self.sup.rundir, pid)
        try:
            async with await ipc.connect(path, heartbeat_interval=None) as ch:
                await ch.request(op, params, timeout=float(params.get("timeout", 5.0)) + 10.0)
        except ipc.RemoteError as e:
            self.sup.say(f"upgrade: {unit}: {op} refused by {role} pid {pid}: {e.message}", "warning")
            if op == "claim" and role == "new" and self.machine is not None and self.machine.busy:
                self.feed(up.IpcLost(unit, role))  # a candidate that cannot take over: revert now, not at the deadline
            return
        except (ipc.IpcError, OSError) as e:
            if lost and self.machine is not None and self.machine.busy:
                self.sup.say(f"upgrade: {unit}: {op} to {role} pid {pid} failed: {e}", "warning")
                self.feed(up.IpcLost(unit, role))
            return
        if ok is not None:
            self.feed(ok)

    # ------------------------------------------------------------------ processes

    def _candidate_argv(self, build: Build, prog, candidate: bool, dry_run: bool = False) -> list[str]:
        argv = list(prog.argv)
        argv[0] = build.python
        if candidate:
            argv.append("--candidate")
            if dry_run:
                argv.append("--dry-run")
        return argv

    def _env(self, build: Build, name: str, unit: str) -> dict:
        from hotplane.shared.runtime import runtime_root
        from hotplane.supervisor.main import SOCKET_NAME

        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.pop("HOTPLANE_SESSION_VERSION", None)
        env.update(build.env)
        env.update({"HOTPLANE_SUPERVISOR_SOCKET": str(self.sup.rundir / SOCKET_NAME), "HOTPLANE_PROGRAM": name, "HOTPLANE_UPGRADE_UNIT": unit,
                    "HOTPLANE_RUNTIME_DIR": str(runtime_root()), "PYTHONUNBUFFERED": "1"})
        u = self.machine.unit(unit) if self.machine is not None else None
        if u is not None and u.old_pid:
            env["HOTPLANE_UPGRADE_OLD_PID"] = str(u.old_pid)  # stats / primary candidates take over from it
        return env

    def _start_candidate(self, a: up.StartCandidate) -> None:
        from hotplane.supervisor import launcher
        from hotplane.supervisor.logs import LogFile

        prog = self.sup.programs[a.unit]
        build = self.builds["new"]
        name = f"{a.unit}.candidate"
        spec = launcher.LaunchSpec(name, self._candidate_argv(build, prog, True, a.dry_run), env=self._env(build, name, a.unit), version=build.version)
        log = LogFile(self.sup.log_dir / f"{name}.log", name=name)
        log.write_line(f"starting: {' '.join(spec.argv)}")
        try:
            child = launcher.spawn(spec, log)
        except launcher.SpawnError as e:
            self.feed(up.CandidateStartFailed(a.unit, str(e)))
            return
        self.cands[a.unit] = child
        child.watch(self.sup.loop, lambda c, ex, unit=a.unit: self._candidate_exited(unit, c, ex))
        self.feed(up.CandidateStarted(a.unit, child.pid))

    def _candidate_exited(self, unit: str, child, ex) -> None:
        prog = self.sup.programs.get(unit)
        if prog is not None and prog.child is child:
            self.sup.feed(prog, ex)  # it is the program now: process supervision restarts it
        self.feed(up.ProcessExited(unit, "new", child.pid, ex.describe() if hasattr(ex, "describe") else str(ex)))

    def on_program_exit(self, prog, pid: int | None, detail: str) -> None:
        """Called by the supervisor for every exit of a worker program's process."""
        if self.machine is None or not self.machine.busy:
            return
        u = self.machine.unit(prog.name)
        if u is None:
            return
        cand = self.cands.get(prog.name)
        if cand is not None and getattr(cand, "pid", None) == pid:
            return  # reported by the candidate watch
        self.feed(up.ProcessExited(prog.name, "old", pid, detail))

    def _kill(self, unit: str, role: str, pid: int | None) -> None:
        if pid is None:
            return
        if self._kind(unit) in ("stats", "primary"):
            # Not on the packet path: asked to leave first, so that a scrape or a worker's request
            # it is answering is not cut off (SIGKILL follows if it does not go in time).
            self._spawn_task(self._stop_then_kill(unit, role, pid))
            return
        self._kill_now(unit, role, pid)

    async def _stop_then_kill(self, unit: str, role: str, pid: int, grace: float = 3.0) -> None:
        from hotplane.shared import ipc
        from hotplane.shared.upgrade_agent import control_socket_path

        try:
            async with await ipc.connect(control_socket_path(self.sup.rundir, pid), heartbeat_interval=None) as ch:
                await ch.request("exit", {}, timeout=grace)
            deadline = self.sup.loop.time() + grace
            while _alive(pid) and self.sup.loop.time() < deadline:
                await asyncio.sleep(0.02)
        except (ipc.IpcError, OSError, asyncio.TimeoutError):
            pass
        self._kill_now(unit, role, pid)

    def _kill_now(self, unit: str, role: str, pid: int) -> None:
        holder = self.cands.get(unit) if role == "new" else self.old_children.get(unit)
        prog = self.sup.programs.get(unit)
        if holder is None and role == "old" and prog is not None and prog.child is not None and prog.child.pid == pid:
            holder = prog.child
        if holder is not None and getattr(holder, "pid", None) == pid:
            if isinstance(holder, _PidWatch):
                holder.kill()
            else:
                holder.send_signal(signal.SIGKILL)
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.feed(up.ProcessExited(unit, role, pid, "already gone"))

    def _restart_old(self, unit: str) -> None:
        from hotplane.supervisor.process_state import IDLE_STATES, State, Start

        prog = self.sup.programs.get(unit)
        if prog is None:
            return
        if unit in self.handed:
            self._hand_back(unit, restart=True)
            return
        if prog.state in IDLE_STATES or prog.state is State.BACKOFF:
            prog.wanted = True
            self.sup.feed(prog, Start())

    # ------------------------------------------------------------------ program hand-over

    def _hand_over(self) -> None:
        """A swapped unit's program becomes its candidate (new version); a reverted one goes back."""
        m = self.machine
        if m is None:
            return
        for u in m.units:
            if u.step is up.Step.SWAPPED and u.name not in self.handed and u.cand_alive:
                self._adopt(u.name, self.cands.get(u.name), self.builds["new"])
                self.old_children[u.name] = self._old_child
                self.handed.add(u.name)
            elif u.step is up.Step.REVERTED and u.name in self.handed:
                self._hand_back(u.name, restart=not u.old_alive)

    _old_child = None

    def _adopt(self, unit: str, child, build: Build) -> None:
        from hotplane.supervisor.process_state import Adopted, ProcessMachine

        prog = self.sup.programs[unit]
        self._old_child = prog.child
        for h in prog.timers.values():
            h.cancel()
        prog.timers.clear()
        prog.machine = ProcessMachine(prog.config)
        prog.argv = self._candidate_argv(build, prog, False)
        prog.extra_env = dict(build.env)
        prog.version = build.version
        prog.ready_info = {"version": build.version}
        prog.child = child
        if child is not None and not isinstance(child, _PidWatch):
            child.name = unit
            self.sup.feed(prog, Adopted(child.pid, child.start_time, ready=True))
        self.sup._changed(prog)

    def _hand_back(self, unit: str, restart: bool) -> None:
        from hotplane.supervisor.process_state import Adopted, ProcessMachine, Start

        prog = self.sup.programs[unit]
        old = self.old_children.pop(unit, None)
        self.handed.discard(unit)
        build = self.builds["old"]
        # The candidate's program may have autorestarted it (new build) after it was killed
        # for the revert: that process must not outlive the hand-back, or two workers of
        # one slot would exist and the tracked one could never claim the queues.
        stray = prog.child
        if stray is not None and stray is not old and getattr(stray, "exit", None) is None:
            try:
                stray.send_signal(signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        for h in prog.timers.values():
            h.cancel()
        prog.timers.clear()
        prog.machine = ProcessMachine(prog.config)
        prog.argv = self._candidate_argv(build, prog, False)
        prog.extra_env = dict(build.env)
        prog.version = build.version
        prog.ready_info = {"version": build.version}
        if not restart and old is not None and old.exit is None:
            prog.child = old
            self.sup.feed(prog, Adopted(old.pid, old.start_time, ready=True))
        else:
            prog.child = None
            self.sup.feed(prog, Start())
        self.sup._changed(prog)

    # ------------------------------------------------------------------ end

    def _done(self, a: up.Done) -> None:
        self.finished_ns = self.finished_ns or time.monotonic_ns()
        if a.result == "committed":
            self.sup.worker_build = self.builds["new"]
        m = self.machine
        entry = {"time": time.time(), "target": m.config.target, "result": a.result, "reason": a.reason,
                 "from": self.builds["old"].version, "to": self.builds["new"].version, "dry_run": m.config.dry_run,
                 "elapsed_s": (self.finished_ns - self.started_ns) / 1e9, "swap_gaps_us": self.swap_gaps(),
                 "units": {u.name: {"step": u.step.value, "zones": u.zones} for u in m.units}, "lines": list(self.lines)}
        with open(self.history_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        inst = self.sup.inst
        z = inst.directory.lookup("upgrade_control") if inst is not None else None
        if z is not None:
            from hotplane.schema import upgrade as us

            us.attach(z.view)[0]["phase"] = us.PHASE_DONE
        for unit, c in list(self.cands.items()):
            prog = self.sup.programs.get(unit)
            if prog is None or prog.child is not c:
                pass  # killed by the machine (KillProcess); its watch reports the exit
        if self.done is not None:
            self.sup.loop.call_soon(self.done.set)

    # ------------------------------------------------------------------ supervisor restart

    def resume_after_restart(self) -> None:
        """A previous supervisor died mid-upgrade: reload its record and resume or roll back.

        Candidates it started but never recorded (it died between spawning one and
        writing the record) are found by their command line and killed: nothing of
        another version may run unsupervised, holding a table's writer role.
        """
        keep: set[int] = set()
        try:
            d = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
            keep = {int(u["cand_pid"]) for u in d.get("units", []) if u.get("cand_pid") and u.get("cand_alive")}
            keep = keep if up.Phase(d.get("phase", "DONE")) not in (up.Phase.DONE, up.Phase.IDLE) else set()
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self._kill_orphan_candidates(keep)
        if not self.state_path.exists():
            return
        try:
            d = json.loads(self.state_path.read_text())
            m = up.UpgradeMachine.from_dict(d)
        except (ValueError, KeyError, TypeError) as e:
            self.sup.say(f"upgrade: unreadable {self.state_path}: {e}", "error")
            return
        if not m.busy:
            return
        self.machine = m
        self.builds = {k: Build.from_dict(v) for k, v in (d.get("builds") or {}).items()}
        self.builds.setdefault("old", current_build())
        self.builds.setdefault("new", current_build())
        self.started_ns = int(d.get("started_ns", time.monotonic_ns()))
        self.done = asyncio.Event()
        self.settled = asyncio.Event()
        self.lines = [f"resumed by supervisor pid {os.getpid()}"]
        loop = self.sup.loop
        alive, owners = {}, {}
        qown = self._queue_owner_pids()
        for u in m.units:
            a = {"old": bool(u.old_pid) and _alive(u.old_pid), "new": bool(u.cand_pid) and _alive(u.cand_pid)}
            alive[u.name] = a
            if a["new"]:
                self.cands[u.name] = _PidWatch(loop, u.cand_pid, lambda pid, unit=u.name: self.feed(up.ProcessExited(unit, "new", pid, "exited")))
            if u.name in (d.get("handed") or []):
                self.handed.add(u.name)
            owners[u.name] = {q: ("old" if qown.get(q) == u.old_pid else "new" if qown.get(q) == u.cand_pid else None) for q in u.queues}
            prog = self.sup.programs.get(u.name)
            if a["old"] and prog is not None and (prog.child is None or prog.child.pid != u.old_pid):
                # A parked old process (the program is its candidate now): adopted properly, so a
                # rollback can hand the program back to it (pidfd, identity, exit watch).
                child = self._adopt_old(u.name, u.old_pid)
                self.old_children[u.name] = child if child is not None else _PidWatch(loop, u.old_pid, lambda pid, unit=u.name: self.feed(up.ProcessExited(unit, "old", pid, "exited")))
        self.feed(up.Resumed(alive, owners))

    def _adopt_old(self, unit: str, pid: int):
        """A launcher.Child for the old process ``pid`` of ``unit`` (not our child: a previous supervisor's)."""
        import psutil

        from hotplane.supervisor import launcher

        try:
            proc = psutil.Process(pid)
            rec = launcher.ProcessRecord.for_process(unit, pid, proc.create_time(), proc.cmdline(), self.builds["old"].version, ready=True)
        except psutil.Error:
            return None
        child, _ = launcher.adopt(rec)
        if child is None:
            return None

        def exited(c, ex, unit=unit) -> None:
            prog = self.sup.programs.get(unit)
            if prog is not None and prog.child is c:
                self.sup.feed(prog, ex)  # handed back: it is the program's process again
            else:
                self.feed(up.ProcessExited(unit, "old", c.pid, ex.describe() if hasattr(ex, "describe") else str(ex)))

        child.watch(self.sup.loop, exited)
        return child

    def _kill_orphan_candidates(self, keep: set[int]) -> None:
        """SIGKILL every upgrade candidate of this instance that is neither a program nor in ``keep``."""
        import psutil

        known = {p.child.pid for p in self.sup.programs.values() if p.child is not None} | set(keep)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = proc.info["cmdline"] or []
            except psutil.Error:
                continue
            if "--candidate" not in cmd or proc.pid in known or proc.pid == os.getpid():
                continue
            try:
                prefix = cmd[cmd.index("--file-prefix") + 1]
            except (ValueError, IndexError):
                continue
            if prefix != self.sup.prefix:
                continue
            self.sup.say(f"upgrade: killing candidate pid {proc.pid} that no record describes (its supervisor died before recording it)", "warning")
            try:
                proc.kill()
            except psutil.Error:
                pass

    def _queue_owner_pids(self) -> dict[str, int]:
        snap = self.sup.sample() or {}
        cfg = self.sup.cfg.gateway
        names = {cfg.inside_port.name: "inside", cfg.outside_port.name: "outside"}
        return {f"{names.get(q['port'], q['port'])}/{q['queue']}": int(q["owner_pid"]) for q in snap.get("queues", [])}


def _stalled(pid: int, inst, worker_id: int, hb_limit: float = 1.0) -> bool:
    """Is worker process ``pid`` stopped (SIGSTOP, a debugger) or without a heartbeat for ``hb_limit`` s?"""
    try:
        import psutil

        if psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            return True
    except Exception:  # noqa: BLE001 - gone: not ours to fence
        return False
    from hotplane.shared.counters import CounterBlocks

    z = inst.directory.lookup("counters")
    if z is None:
        return False
    hb = int(CounterBlocks.attach(z.view).heartbeats()[worker_id])
    return bool(hb) and (time.monotonic_ns() - hb) / 1e9 > hb_limit


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False
