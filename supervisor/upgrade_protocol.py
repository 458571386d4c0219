"""The drain-and-swap hot upgrade, as a pure state machine (sans-IO, like process_state).

Nothing here forks, signals, sends, sleeps or reads a clock. The supervisor's
asyncio shell feeds *events* (what happened, with the current CLOCK_MONOTONIC
time) and performs the *actions* returned, in order. The whole state is plain
data: :meth:`UpgradeMachine.to_dict` / :meth:`from_dict` round-trip through
JSON, so a restarted supervisor reloads the ``Record``-ed state, feeds
:class:`Resumed` with what it observes, and the machine resumes or rolls back.

Units and queues
----------------
An upgrade replaces a set of *units*: ``worker`` units (an old worker process
and its queues, e.g. ``inside/0`` and ``outside/0``), and, as separate kinds,
the ``stats`` secondary and the ``primary``. A unit without queues hands over
one pseudo-queue named after its kind (the stats export / the primary's IPC
socket and memory), so every unit follows the same handover. Each queue has
exactly one *designated owner* at every point, ``"old"`` or ``"new"``
(:meth:`UpgradeMachine.designated_owner`), derived from its stage:

========== ========= ==============================================================
stage      owner     meaning
========== ========= ==============================================================
OLD        old       the old process polls it (start, and end of a revert)
SWAP       old       candidate armed (ClaimQueue), old ordered to release (ReleaseQueue)
NEW        new       the candidate reported its claim (TAKEN_OVER)
BACK       new       rollback: old armed, candidate ordered to release
RECLAIM    old       abort: waiting for the candidate to be dead, then old reclaims
========== ========= ==============================================================

The ownership word in shared memory (``shared/queue_owner.py``) carries a
generation, so whatever the machine designates, a fenced process cannot poll.
The machine never orders the old process to claim a queue the candidate is
armed for while that candidate may still be alive: an abort first kills the
candidate and waits for its exit (or a kill deadline) -- numpy has no CAS.

Phases
------
``IDLE`` -> ``PREPARING`` (StartCandidate per unit; each reports attached,
validated (zone verdicts), migrated (if a zone needs it), warm, ready) ->
``SWAPPING`` (canary units first, one unit at a time) -> ``CANARY`` (health
watched for ``canary_window``) -> ``SWAPPING`` (the rest) -> ``SWAPPED`` ->
``COMMITTED`` (old processes parked for ``park_time``, rollback still
possible) -> ``DONE``. Any failure before commit, a rollback request, or a
rollback while parked: ``REVERTING`` (the same swap in reverse; candidates
killed) -> ``DONE``. Every step has a deadline (``ArmTimer``).

Contract for the shell
----------------------
* ``StartCandidate``: launch the candidate of the target version for the unit;
  answer ``CandidateStarted(pid)`` / ``CandidateStartFailed``. Candidate IPC
  reports (``candidate_report {step, detail}``) become ``CandidateReport``.
* ``CandidateStarted`` may arrive after the exit of that candidate (both race
  from the shell): an exit report of an unknown pid in ``STARTING`` is kept and
  fails the unit when its start report comes. A dry run's candidates leave once
  they reported their zones: not a failure.
* The primary's swap re-attaches the memory (slower, off the packet path): its
  deadline is ``swap_primary``.
* ``ClaimQueue(role, pid, force)``: order that process to claim the queue: for
  the candidate of a swap (or the old process of a rollback) *arm*: spin on
  the word and claim it as soon as it reads unowned (pid 0), then report
  (``QueueClaimed``); with ``force`` claim now even over a dead owner (the
  generation fences it). A process that already owns the queue just acks.
* ``ReleaseQueue(role, pid)``: order that process to finish its burst, stop
  polling and ticking, flush TX, write its cursors, release the session table
  writer role and then the ownership word; it reports ``QueueReleased`` and
  stays parked (alive, not polling) until told otherwise.
* ``KillProcess``: SIGKILL the process; feed ``ProcessExited`` when it is gone.
  ``RestartOld(unit)``: once the unit's old process is gone, have the process
  supervision start a new process of the *old* version for it (it claims the
  unit's queues at start, forcing over a dead owner).
* ``SendToWorker`` / ``SendToCandidate``: IPC messages (``park``, ``commit``,
  ``exit``); if the channel is gone feed ``IpcLost``.
* Timers as in process_state: ``ArmTimer(name, seconds, token)`` -> feed
  ``TimerFired(name, token)``; stale tokens are ignored.
* ``Record(state)``: persist ``state`` (JSON) for a supervisor restart;
  ``Progress(line)``: a progress line for ``supervisorctl upgrade``;
  ``Done(result, reason)``: the upgrade is over (``committed``, ``rolled back``,
  ``aborted``, ``dry run``).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Union

# The timer and log actions are the same ones the process state machine emits: one shell
# vocabulary for both machines.
from hotplane.supervisor.process_state import ArmTimer, CancelTimer, Log  # noqa: F401

# --------------------------------------------------------------------------- enums


class Phase(str, enum.Enum):
    IDLE = "IDLE"
    PREPARING = "PREPARING"
    SWAPPING = "SWAPPING"
    CANARY = "CANARY"
    SWAPPED = "SWAPPED"
    COMMITTED = "COMMITTED"
    REVERTING = "REVERTING"
    DONE = "DONE"


class Step(str, enum.Enum):
    """Where one unit is."""

    PENDING = "PENDING"
    STARTING = "STARTING"  # StartCandidate issued
    SPAWNED = "SPAWNED"  # candidate process exists
    ATTACHED = "ATTACHED"
    VALIDATED = "VALIDATED"
    MIGRATED = "MIGRATED"
    WARM = "WARM"
    READY = "READY"
    SWAPPING = "SWAPPING"
    SWAPPED = "SWAPPED"
    REVERTING = "REVERTING"
    REVERTED = "REVERTED"


class Stage(str, enum.Enum):
    """Where one queue is (see the module docstring)."""

    OLD = "OLD"
    SWAP = "SWAP"
    NEW = "NEW"
    BACK = "BACK"
    RECLAIM = "RECLAIM"


OWNER_OF_STAGE = {Stage.OLD: "old", Stage.SWAP: "old", Stage.RECLAIM: "old", Stage.NEW: "new", Stage.BACK: "new"}

# Candidate reports, in order; "migrated" only when a zone needs migration.
REPORT_ORDER = {"attached": (Step.SPAWNED, Step.ATTACHED), "validated": (Step.ATTACHED, Step.VALIDATED), "migrated": (Step.VALIDATED, Step.MIGRATED), "warm": (None, Step.WARM), "ready": (Step.WARM, Step.READY)}
# The deadline that runs while a unit is in a step (key into UpgradeConfig.deadlines).
STEP_DEADLINE = {Step.STARTING: "start", Step.SPAWNED: "attach", Step.ATTACHED: "validate", Step.VALIDATED: "migrate", Step.MIGRATED: "warm", Step.WARM: "ready", Step.SWAPPING: "swap", Step.REVERTING: "revert"}
PRE_SWAP_STEPS = frozenset({Step.PENDING, Step.STARTING, Step.SPAWNED, Step.ATTACHED, Step.VALIDATED, Step.MIGRATED, Step.WARM, Step.READY})
KINDS = ("worker", "stats", "primary")

DEFAULT_DEADLINES = {"start": 30.0, "attach": 30.0, "validate": 30.0, "migrate": 300.0, "warm": 60.0, "ready": 60.0, "swap": 2.0, "revert": 2.0, "kill": 5.0,
                     "swap_primary": 10.0}  # the primary's swap re-attaches the memory: slower, and off the packet path


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class UnitSpec:
    """One process to replace: ``kind`` worker/stats/primary, its old pid and the queues it owns."""

    name: str
    kind: str
    old_pid: int
    queues: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unit {self.name}: kind must be one of {KINDS}")
        object.__setattr__(self, "queues", tuple(self.queues) or (f"{self.kind}:{self.name}",))


@dataclass(frozen=True)
class UpgradeConfig:
    """What ``supervisorctl upgrade --to TARGET [--canary N] [--dry-run]`` asked for, and the timings."""

    target: str
    canary: int = 0  # worker units swapped first and watched
    canary_window: float = 30.0
    park_time: float = 60.0  # old processes stay parked this long after commit
    auto_commit: bool = True
    dry_run: bool = False
    deadlines: dict = field(default_factory=lambda: dict(DEFAULT_DEADLINES))
    max_drops: int = 0  # canary health: new drops allowed during the window
    max_errors: int = 0
    max_heartbeat_age: float = 1.0

    def deadline(self, name: str) -> float:
        return float(self.deadlines.get(name, DEFAULT_DEADLINES[name]))


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Begin:
    """Start the upgrade (the machine was built with its config and units)."""


@dataclass(frozen=True)
class CandidateStarted:
    unit: str
    pid: int


@dataclass(frozen=True)
class CandidateStartFailed:
    unit: str
    error: str


@dataclass(frozen=True)
class CandidateReport:
    """The candidate reached ``step`` (attached/validated/migrated/warm/ready).

    ``validated`` carries ``detail={"zones": {zone: "compatible" | "needs migration" | "refused: ..."}}``.
    """

    unit: str
    step: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QueueReleased:
    unit: str
    queue: str
    role: str  # "old" | "new": who released it


@dataclass(frozen=True)
class QueueClaimed:
    unit: str
    queue: str
    role: str  # "old" | "new": who now holds the ownership word


@dataclass(frozen=True)
class ProcessExited:
    unit: str
    role: str  # "old" | "new"
    pid: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class IpcLost:
    unit: str
    role: str


@dataclass(frozen=True)
class HealthSample:
    """Cumulative counters of a swapped unit's new process (drops, errors) and its heartbeat age."""

    unit: str
    drops: int
    errors: int
    heartbeat_age: float
    detail: str = ""  # e.g. the drop reasons of the window, for the verdict's line


@dataclass(frozen=True)
class TimerFired:
    name: str
    token: int | None = None


@dataclass(frozen=True)
class CommitRequested:
    pass


@dataclass(frozen=True)
class RollbackRequested:
    reason: str = "operator requested rollback"


@dataclass(frozen=True)
class AbortRequested:
    reason: str = "operator requested abort"


@dataclass(frozen=True)
class Resumed:
    """A restarted supervisor reloaded the state and observed the world.

    ``alive``: ``{unit: {"old": bool, "new": bool}}``; ``owners``: ``{unit:
    {queue: "old" | "new" | None}}`` from the ownership words (None: unowned).
    """

    alive: dict = field(default_factory=dict)
    owners: dict = field(default_factory=dict)


Event = Union[Begin, CandidateStarted, CandidateStartFailed, CandidateReport, QueueReleased, QueueClaimed, ProcessExited, IpcLost, HealthSample, TimerFired, CommitRequested, RollbackRequested, AbortRequested, Resumed]


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartCandidate:
    unit: str
    kind: str
    target: str
    queues: tuple[str, ...]
    dry_run: bool = False  # validate only: attach read-only, migrate nothing


@dataclass(frozen=True)
class SendToWorker:
    unit: str
    pid: int
    msg: dict


@dataclass(frozen=True)
class SendToCandidate:
    unit: str
    pid: int
    msg: dict


@dataclass(frozen=True)
class ClaimQueue:
    unit: str
    queue: str
    role: str
    pid: int | None
    force: bool = False


@dataclass(frozen=True)
class ReleaseQueue:
    unit: str
    queue: str
    role: str
    pid: int | None


@dataclass(frozen=True)
class KillProcess:
    unit: str
    role: str
    pid: int | None


@dataclass(frozen=True)
class RestartOld:
    unit: str


@dataclass(frozen=True)
class Progress:
    line: str


@dataclass(frozen=True)
class Record:
    state: dict


@dataclass(frozen=True)
class Done:
    result: str  # committed | rolled back | aborted | dry run
    reason: str = ""


Action = Union[StartCandidate, SendToWorker, SendToCandidate, ClaimQueue, ReleaseQueue, KillProcess, RestartOld, ArmTimer, CancelTimer, Log, Progress, Record, Done]


# --------------------------------------------------------------------------- state


@dataclass
class Unit:
    """Mutable per-unit state (plain data: serializable)."""

    name: str
    kind: str
    old_pid: int | None
    queues: list
    step: Step = Step.PENDING
    stages: dict = field(default_factory=dict)  # queue -> Stage
    cand_pid: int | None = None
    cand_alive: bool = False
    old_alive: bool = True
    old_reachable: bool = True
    cand_kill_sent: bool = False
    cand_kill_deadlines: int = 0
    restart_old_sent: bool = False
    canary: bool = False
    migrate: bool = False
    zones: dict = field(default_factory=dict)
    health_base: list | None = None
    forced: list = field(default_factory=list)  # queues the old was ordered to claim with force
    retired_pids: list = field(default_factory=list)  # old processes replaced by RestartOld (their exits are stale)
    early_exits: list = field(default_factory=list)  # candidate pids whose exit was reported before CandidateStarted

    def owned_by(self, owner: str) -> list[str]:
        return [q for q in self.queues if OWNER_OF_STAGE[self.stages[q]] == owner]


@dataclass
class UpgradeMachine:
    """One upgrade: build with the config and units, feed :class:`Begin`, then events."""

    config: UpgradeConfig
    units: list = field(default_factory=list)  # list[Unit]
    phase: Phase = Phase.IDLE
    group: str = ""  # "canary" | "rest" while swapping
    reason: str = ""
    result: str = ""
    swapped_any: bool = False
    timers: dict = field(default_factory=dict)  # name -> [token, absolute deadline]
    history: list = field(default_factory=list)  # [time, line]
    _token: int = 0

    @classmethod
    def new(cls, config: UpgradeConfig, specs: list[UnitSpec]) -> "UpgradeMachine":
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("unit names must be unique")
        units = []
        n_canary = 0
        for s in specs:
            u = Unit(s.name, s.kind, s.old_pid, list(s.queues), stages={q: Stage.OLD for q in s.queues})
            if s.kind == "worker" and n_canary < config.canary:
                u.canary = True
                n_canary += 1
            units.append(u)
        return cls(config, units)

    # ------------------------------------------------------------------ queries

    @property
    def busy(self) -> bool:
        """An upgrade is under way (only one at a time: refuse a new one while busy)."""
        return self.phase not in (Phase.IDLE, Phase.DONE)

    def unit(self, name: str) -> Unit | None:
        for u in self.units:
            if u.name == name:
                return u
        return None

    def designated_owner(self, unit: str, queue: str) -> str:
        """'old' or 'new': who is in charge of the queue now (exactly one, by construction)."""
        return OWNER_OF_STAGE[self.unit(unit).stages[queue]]

    def owners(self) -> dict[str, dict[str, str]]:
        return {u.name: {q: OWNER_OF_STAGE[u.stages[q]] for q in u.queues} for u in self.units}

    def status(self) -> dict[str, Any]:
        """For ``supervisorctl upgrade status``."""
        return {"phase": self.phase.value, "target": self.config.target, "reason": self.reason, "result": self.result,
                "units": {u.name: {"kind": u.kind, "step": u.step.value, "owners": {q: OWNER_OF_STAGE[u.stages[q]] for q in u.queues}, "zones": u.zones,
                                   "old_pid": u.old_pid, "cand_pid": u.cand_pid, "canary": u.canary} for u in self.units}}

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (enums as strings)."""
        d = {
            "config": asdict(self.config),
            "phase": self.phase.value,
            "group": self.group,
            "reason": self.reason,
            "result": self.result,
            "swapped_any": self.swapped_any,
            "timers": {k: list(v) for k, v in self.timers.items()},
            "history": [list(h) for h in self.history],
            "token": self._token,
            "units": [],
        }
        for u in self.units:
            ud = asdict(u)
            ud["step"] = u.step.value
            ud["stages"] = {q: s.value for q, s in u.stages.items()}
            d["units"].append(ud)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UpgradeMachine":
        cfg = dict(d["config"])
        m = cls(UpgradeConfig(**cfg))
        m.phase = Phase(d["phase"])
        m.group = d["group"]
        m.reason = d["reason"]
        m.result = d["result"]
        m.swapped_any = d["swapped_any"]
        m.timers = {k: list(v) for k, v in d["timers"].items()}
        m.history = [list(h) for h in d["history"]]
        m._token = d["token"]
        for ud in d["units"]:
            ud = dict(ud)
            ud["step"] = Step(ud["step"])
            ud["stages"] = {q: Stage(s) for q, s in ud["stages"].items()}
            m.units.append(Unit(**ud))
        return m

    # ------------------------------------------------------------------ entry point

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply ``event`` (at CLOCK_MONOTONIC time ``now``); returns the actions to perform in order."""
        out: list[Action] = []
        before = self.to_dict()
        method = getattr(self, "_on_" + type(event).__name__, None)
        if method is None:
            out.append(Log("error", f"upgrade: unknown event {event!r} ignored"))
            return out
        if getattr(event, "unit", None) is not None and self.unit(event.unit) is None:
            out.append(Log("error", f"upgrade: event for unknown unit {event.unit!r} ignored"))
            return out
        method(event, now, out)
        after = self.to_dict()
        if after != before:
            out.append(Record(after))
        return out

    # ------------------------------------------------------------------ helpers

    def _progress(self, now: float, line: str, out: list[Action]) -> None:
        self.history.append([now, line])
        out.append(Progress(line))

    def _arm(self, name: str, seconds: float, now: float, out: list[Action]) -> None:
        self._token += 1
        self.timers[name] = [self._token, now + seconds]
        out.append(ArmTimer(name, seconds, self._token))

    def _cancel(self, name: str, out: list[Action]) -> None:
        if self.timers.pop(name, None) is not None:
            out.append(CancelTimer(name))

    def _arm_step(self, u: Unit, now: float, out: list[Action], name: str | None = None) -> None:
        key = name or STEP_DEADLINE.get(u.step)
        if key == "swap" and u.kind == "primary":
            key = "swap_primary"
        if key is None:
            self._cancel("u:" + u.name, out)
        else:
            self._arm("u:" + u.name, self.config.deadline(key), now, out)

    def _set_step(self, u: Unit, step: Step, now: float, out: list[Action]) -> None:
        u.step = step
        self._arm_step(u, now, out)

    def _kill_candidate(self, u: Unit, out: list[Action]) -> None:
        if u.cand_alive and not u.cand_kill_sent:
            u.cand_kill_sent = True
            out.append(KillProcess(u.name, "new", u.cand_pid))

    # ------------------------------------------------------------------ preparing

    def _on_Begin(self, ev: Begin, now: float, out: list[Action]) -> None:
        if self.phase is not Phase.IDLE:
            out.append(Log("warning", f"upgrade: already {self.phase.value}; only one upgrade at a time"))
            return
        if not self.units:
            self.phase = Phase.DONE
            self.result = "committed"
            out.append(Done("committed", "nothing to upgrade"))
            return
        self.phase = Phase.PREPARING
        self._progress(now, f"upgrade to {self.config.target}: starting {len(self.units)} candidate(s)" + (" (dry run)" if self.config.dry_run else ""), out)
        for u in self.units:
            self._set_step(u, Step.STARTING, now, out)
            out.append(StartCandidate(u.name, u.kind, self.config.target, tuple(u.queues), self.config.dry_run))

    def _on_CandidateStarted(self, ev: CandidateStarted, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        if u.step is not Step.STARTING or self.phase is not Phase.PREPARING:
            # A candidate we no longer want (the upgrade is reverting or it is a duplicate): not unsupervised.
            out.append(Log("warning", f"upgrade: {u.name}: candidate pid {ev.pid} started in step {u.step.value}: killing it"))
            out.append(KillProcess(u.name, "new", ev.pid))
            return
        u.cand_pid, u.cand_alive = ev.pid, True
        self._set_step(u, Step.SPAWNED, now, out)
        self._progress(now, f"{u.name}: candidate pid {ev.pid} started", out)
        if ev.pid in u.early_exits:
            # Its exit report overtook this one (both race from the shell): it is gone already.
            u.cand_alive = False
            self._fail(now, f"{u.name}: candidate pid {ev.pid} exited before it was reported started", out)

    def _on_CandidateStartFailed(self, ev: CandidateStartFailed, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        if u.step is Step.STARTING:
            u.step = Step.PENDING
            self._fail(now, f"{u.name}: candidate failed to start: {ev.error}", out)

    def _on_CandidateReport(self, ev: CandidateReport, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        if self.phase is not Phase.PREPARING or ev.step not in REPORT_ORDER:
            if ev.step not in REPORT_ORDER:
                out.append(Log("warning", f"upgrade: {u.name}: unknown candidate report {ev.step!r}"))
            return
        want, new = REPORT_ORDER[ev.step]
        if ev.step == "warm":
            ok = u.step is (Step.MIGRATED if u.migrate else Step.VALIDATED)
        elif ev.step == "migrated":
            ok = u.step is Step.VALIDATED and u.migrate
        else:
            ok = u.step is want
        if not ok:
            out.append(Log("warning", f"upgrade: {u.name}: report {ev.step!r} in step {u.step.value} ignored"))
            return
        if ev.step == "validated":
            zones = dict(ev.detail.get("zones", {}))
            u.zones = zones
            refused = {z: v for z, v in zones.items() if str(v).startswith("refused")}
            u.migrate = any(v == "needs migration" for v in zones.values())
            for z, v in sorted(zones.items()):
                self._progress(now, f"{u.name}: zone {z}: {v}", out)
            if refused:
                u.step = Step.VALIDATED
                self._fail(now, f"{u.name}: candidate refuses zone(s) {', '.join(sorted(refused))}", out)
                return
        self._set_step(u, new, now, out)
        self._progress(now, f"{u.name}: candidate {ev.step}", out)
        if self.config.dry_run and all(x.step in (Step.VALIDATED, Step.MIGRATED, Step.WARM, Step.READY) for x in self.units):
            self._finish_dry_run(now, out)
            return
        if new is Step.READY and all(x.step is Step.READY for x in self.units):
            self._start_group(now, "canary" if any(x.canary for x in self.units) else "rest", out)

    def _finish_dry_run(self, now: float, out: list[Action]) -> None:
        for u in self.units:
            self._cancel("u:" + u.name, out)
            self._kill_candidate(u, out)
            u.step = Step.REVERTED
        self._done(now, "dry run", "zones validated; nothing changed", out)

    # ------------------------------------------------------------------ swapping

    def _start_group(self, now: float, group: str, out: list[Action]) -> None:
        self.phase = Phase.SWAPPING
        self.group = group
        n = sum(1 for u in self.units if (u.canary if group == "canary" else not u.canary))
        self._progress(now, f"swapping {n} {group} unit(s)", out)
        self._swap_next(now, out)

    def _swap_next(self, now: float, out: list[Action]) -> None:
        for u in self.units:
            if (u.canary if self.group == "canary" else not u.canary) and u.step is Step.READY:
                self._swap_unit(u, now, out)
                return
        # Group finished.
        if self.group == "canary" and any(not u.canary for u in self.units):
            self.phase = Phase.CANARY
            for u in self.units:
                u.health_base = None
            self._arm("canary", self.config.canary_window, now, out)
            self._progress(now, f"canary: watching {sum(u.canary for u in self.units)} unit(s) for {self.config.canary_window:g}s", out)
            return
        self.phase = Phase.SWAPPED
        self._progress(now, "all units swapped", out)
        if self.config.auto_commit:
            self._commit(now, out)

    def _swap_unit(self, u: Unit, now: float, out: list[Action]) -> None:
        self._set_step(u, Step.SWAPPING, now, out)
        self._progress(now, f"{u.name}: swap requested for {', '.join(u.queues)}", out)
        for q in u.queues:
            u.stages[q] = Stage.SWAP
            out.append(ClaimQueue(u.name, q, "new", u.cand_pid))  # armed: claims once the word is released
        for q in u.queues:
            out.append(ReleaseQueue(u.name, q, "old", u.old_pid))

    def _on_QueueReleased(self, ev: QueueReleased, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        if ev.queue not in u.stages:
            out.append(Log("error", f"upgrade: {u.name}: release of unknown queue {ev.queue!r}"))
            return
        out.append(Log("info", f"upgrade: {u.name}: {ev.queue} released by {ev.role}"))
        self._check_unit(u, now, out)

    def _on_QueueClaimed(self, ev: QueueClaimed, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        st = u.stages.get(ev.queue)
        if st is None:
            out.append(Log("error", f"upgrade: {u.name}: claim of unknown queue {ev.queue!r}"))
            return
        if ev.role == "new" and st is Stage.SWAP:
            u.stages[ev.queue] = Stage.NEW
            self.swapped_any = True
            self._progress(now, f"{u.name}: {ev.queue} taken over by the candidate", out)
        elif ev.role == "old" and st in (Stage.BACK, Stage.RECLAIM) and self.phase is Phase.REVERTING and u.old_alive and not u.restart_old_sent:
            # (A claim reported by an old process that has died since does not count: it holds nothing now.)
            u.stages[ev.queue] = Stage.OLD
            self._progress(now, f"{u.name}: {ev.queue} back with the old process", out)
        elif ev.role == "new" and st in (Stage.BACK, Stage.RECLAIM):
            # The candidate's claim overtook the abort: it holds the word; the old takes it back after its death/release.
            out.append(Log("warning", f"upgrade: {u.name}: late claim of {ev.queue} by the candidate during revert"))
            return
        else:
            return
        self._check_unit(u, now, out)

    def _check_unit(self, u: Unit, now: float, out: list[Action]) -> None:
        if u.step is Step.SWAPPING and all(u.stages[q] is Stage.NEW for q in u.queues):
            u.step = Step.SWAPPED
            self._cancel("u:" + u.name, out)
            self._progress(now, f"{u.name}: swapped; old pid {u.old_pid} parked", out)
            if u.old_alive and u.old_reachable:
                out.append(SendToWorker(u.name, u.old_pid, {"op": "park"}))
            self._swap_next(now, out)
        elif u.step is Step.REVERTING:
            self._revert_progress(u, now, out)

    def _on_HealthSample(self, ev: HealthSample, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        if self.phase is not Phase.CANARY or not u.canary:
            return
        if u.health_base is None:
            u.health_base = [ev.drops, ev.errors]
        drops = ev.drops - u.health_base[0]
        errors = ev.errors - u.health_base[1]
        bad = []
        if drops > self.config.max_drops:
            bad.append(f"{drops} drops" + (f" ({ev.detail})" if ev.detail else ""))
        if errors > self.config.max_errors:
            bad.append(f"{errors} errors")
        if ev.heartbeat_age > self.config.max_heartbeat_age:
            bad.append(f"no heartbeat for {ev.heartbeat_age:.3g}s")
        if bad:
            self._revert(now, f"canary {u.name} unhealthy: {', '.join(bad)}", out)

    def _commit(self, now: float, out: list[Action]) -> None:
        self.phase = Phase.COMMITTED
        self._arm("park", self.config.park_time, now, out)
        for u in self.units:
            if u.cand_alive:
                out.append(SendToCandidate(u.name, u.cand_pid, {"op": "commit"}))
        self._progress(now, f"committed; old processes exit in {self.config.park_time:g}s (rollback possible until then)", out)

    def _on_CommitRequested(self, ev: CommitRequested, now: float, out: list[Action]) -> None:
        if self.phase is Phase.SWAPPED:
            self._commit(now, out)
        else:
            out.append(Log("warning", f"upgrade: commit refused in phase {self.phase.value}"))

    def _on_RollbackRequested(self, ev: RollbackRequested, now: float, out: list[Action]) -> None:
        if self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY, Phase.SWAPPED, Phase.COMMITTED):
            self._revert(now, ev.reason, out)
        else:
            out.append(Log("warning", f"upgrade: rollback refused in phase {self.phase.value}"))

    def _on_AbortRequested(self, ev: AbortRequested, now: float, out: list[Action]) -> None:
        if self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY, Phase.SWAPPED):
            self._revert(now, ev.reason, out)
        else:
            out.append(Log("warning", f"upgrade: abort refused in phase {self.phase.value}" + (" (use rollback)" if self.phase is Phase.COMMITTED else "")))

    # ------------------------------------------------------------------ failures

    def _fail(self, now: float, why: str, out: list[Action]) -> None:
        out.append(Log("error", f"upgrade: {why}"))
        if self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY, Phase.SWAPPED):
            self._revert(now, why, out)

    def _on_ProcessExited(self, ev: ProcessExited, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        if ev.role == "new":
            if ev.pid is not None and u.cand_pid is None and u.step is Step.STARTING:
                u.early_exits.append(ev.pid)  # CandidateStarted for it is still on its way
                return
            if ev.pid is not None and u.cand_pid is not None and ev.pid != u.cand_pid:
                return  # a stale candidate
            if not u.cand_alive:
                return
            u.cand_alive = False
            if self.config.dry_run and self.phase is Phase.PREPARING and u.step in (Step.VALIDATED, Step.MIGRATED, Step.WARM, Step.READY):
                return  # a dry-run candidate leaves once it has reported its zones
            if self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY, Phase.SWAPPED) :
                self._fail(now, f"{u.name}: candidate pid {u.cand_pid} exited ({ev.detail or 'no detail'}) in step {u.step.value}", out)
            elif self.phase is Phase.REVERTING:
                self._revert_progress(u, now, out)
            elif self.phase is Phase.COMMITTED:
                out.append(Log("warning", f"upgrade: {u.name}: new process pid {u.cand_pid} exited after commit; process supervision restarts it"))
            return
        if ev.role != "old" or not u.old_alive or (ev.pid is not None and ev.pid in u.retired_pids):
            return
        if ev.pid is not None and u.old_pid is not None and ev.pid != u.old_pid:
            return
        u.old_alive = False
        if self.phase is Phase.REVERTING:
            if u.step is Step.REVERTED:
                # Already back with the old version, but the upgrade is still finishing: replace it.
                u.restart_old_sent = False
                self._restart_old(u, out)
            self._revert_progress(u, now, out)
        elif self.phase is Phase.COMMITTED or u.step is Step.SWAPPED:
            out.append(Log("warning", f"upgrade: {u.name}: parked old pid {u.old_pid} exited ({ev.detail}); a rollback restarts the old version"))
        elif self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY, Phase.SWAPPED):
            self._fail(now, f"{u.name}: old process pid {u.old_pid} exited ({ev.detail or 'no detail'}) in step {u.step.value}", out)

    def _on_IpcLost(self, ev: IpcLost, now: float, out: list[Action]) -> None:
        u = self.unit(ev.unit)
        if ev.role == "new":
            if u.cand_alive and self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY, Phase.SWAPPED):
                self._fail(now, f"{u.name}: IPC with candidate pid {u.cand_pid} lost", out)
            elif self.phase is Phase.REVERTING and u.cand_alive:
                self._kill_candidate(u, out)
            return
        if not u.old_alive:
            return
        u.old_reachable = False
        if self.phase is Phase.REVERTING:
            self._revert_progress(u, now, out)
        elif u.step is Step.SWAPPED or self.phase is Phase.COMMITTED:
            out.append(Log("warning", f"upgrade: {u.name}: IPC with parked old pid {u.old_pid} lost"))
        elif u.step is Step.SWAPPING:
            # The candidate claims from the shared word, not from the old's ack: the swap can still complete.
            out.append(Log("warning", f"upgrade: {u.name}: IPC with old pid {u.old_pid} lost during its swap; waiting for the candidate's claim"))
        else:
            self._fail(now, f"{u.name}: IPC with old pid {u.old_pid} lost before its swap", out)

    def _on_TimerFired(self, ev: TimerFired, now: float, out: list[Action]) -> None:
        cur = self.timers.get(ev.name)
        if cur is None or (ev.token is not None and ev.token != cur[0]):
            return  # stale
        del self.timers[ev.name]
        if ev.name == "canary":
            if self.phase is Phase.CANARY:
                self._progress(now, "canary healthy", out)
                self._start_group(now, "rest", out)
        elif ev.name == "park":
            if self.phase is Phase.COMMITTED:
                for u in self.units:
                    if u.old_alive:
                        out.append(KillProcess(u.name, "old", u.old_pid))
                self._done(now, "committed", "parked old processes told to exit", out)
        elif ev.name.startswith("u:"):
            u = self.unit(ev.name[2:])
            if u is None:
                return
            if u.step is Step.REVERTING:
                self._revert_deadline(u, now, out)
            elif self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY, Phase.SWAPPED):
                self._fail(now, f"{u.name}: deadline passed in step {u.step.value}", out)

    # ------------------------------------------------------------------ revert (abort / rollback)

    def _revert(self, now: float, why: str, out: list[Action]) -> None:
        if self.phase in (Phase.REVERTING, Phase.DONE, Phase.IDLE):
            return
        self.reason = why
        self.phase = Phase.REVERTING
        self._cancel("canary", out)
        self._cancel("park", out)
        self._progress(now, f"{'rolling back' if self.swapped_any else 'aborting'}: {why}", out)
        for u in self.units:
            self._revert_unit(u, now, out)
        self._maybe_reverted(now, out)

    def _revert_unit(self, u: Unit, now: float, out: list[Action]) -> None:
        if u.step is Step.REVERTED:
            return
        if u.step in PRE_SWAP_STEPS:
            # No queue was touched: the old process never stopped.
            self._cancel("u:" + u.name, out)
            self._kill_candidate(u, out)
            u.step = Step.REVERTED
            if not u.old_alive:
                self._restart_old(u, out)
            return
        self._set_step(u, Step.REVERTING, now, out)
        for q in u.queues:
            st = u.stages[q]
            if st is Stage.SWAP:
                # The candidate is armed and may claim any moment: it must be dead before the old reclaims.
                u.stages[q] = Stage.RECLAIM
                self._kill_candidate(u, out)
            elif st is Stage.NEW:
                u.stages[q] = Stage.BACK
                if u.cand_alive:
                    if u.old_alive and u.old_reachable:
                        out.append(ClaimQueue(u.name, q, "old", u.old_pid))  # armed: spins until the candidate releases
                    out.append(ReleaseQueue(u.name, q, "new", u.cand_pid))
        self._revert_progress(u, now, out)

    def _restart_old(self, u: Unit, out: list[Action]) -> None:
        if not u.restart_old_sent:
            u.restart_old_sent = True
            if u.old_alive:
                out.append(KillProcess(u.name, "old", u.old_pid))
            if u.old_pid is not None:
                u.retired_pids.append(u.old_pid)
            out.append(RestartOld(u.name))
            # The replacement's pid is the process supervision's to know; until told, any old exit is its.
            u.old_pid, u.old_alive, u.old_reachable = None, True, False

    def _revert_progress(self, u: Unit, now: float, out: list[Action]) -> None:
        """Drive a REVERTING unit forward with what is known now (idempotent)."""
        if u.step is not Step.REVERTING:
            return
        if u.old_alive and u.old_reachable:
            if not u.cand_alive:
                # The candidate is gone (killed, crashed, or given up on): the old process takes the
                # queues back now, forcing over the dead owner; its IPC channel delivers this after
                # any earlier release order, so a queue it never released is simply acked.
                for q in u.queues:
                    if u.stages[q] in (Stage.RECLAIM, Stage.BACK) and q not in u.forced:
                        u.forced.append(q)
                        out.append(ClaimQueue(u.name, q, "old", u.old_pid, force=True))
            # else: BACK queues wait for the armed old's claim; RECLAIM ones for the candidate's death.
        elif u.cand_alive:
            # Nobody of the old version can take the queues back while the candidate lives: stop it.
            if any(u.stages[q] is not Stage.OLD for q in u.queues):
                self._kill_candidate(u, out)
        else:
            # Old process dead or unreachable, candidate gone: a fresh old-version process takes them at start.
            self._restart_old(u, out)
            for q in u.queues:
                u.stages[q] = Stage.OLD
        if all(u.stages[q] is Stage.OLD for q in u.queues):
            self._cancel("u:" + u.name, out)
            self._kill_candidate(u, out)
            u.step = Step.REVERTED
            self._progress(now, f"{u.name}: reverted to the old version", out)
        self._maybe_reverted(now, out)

    def _revert_deadline(self, u: Unit, now: float, out: list[Action]) -> None:
        if u.cand_alive:
            u.cand_kill_deadlines += 1
            if not u.cand_kill_sent:
                self._kill_candidate(u, out)
            elif u.cand_kill_deadlines >= 2:
                # Killed but never reported gone (uninterruptible?): the generation bump of a forced claim fences it.
                out.append(Log("error", f"upgrade: {u.name}: candidate pid {u.cand_pid} not gone after SIGKILL; reclaiming with a forced claim"))
                u.cand_alive = False
            else:
                out.append(KillProcess(u.name, "new", u.cand_pid))
            self._arm_step(u, now, out, "kill")
            self._revert_progress(u, now, out)
            return
        # The candidate is gone but the old process did not confirm its claims: replace it.
        out.append(Log("error", f"upgrade: {u.name}: old pid {u.old_pid} did not take its queues back in time: restarting the old version"))
        u.old_reachable = False
        self._revert_progress(u, now, out)
        if u.step is Step.REVERTING:
            self._arm_step(u, now, out, "revert")

    def _maybe_reverted(self, now: float, out: list[Action]) -> None:
        if self.phase is Phase.REVERTING and all(u.step is Step.REVERTED for u in self.units):
            self._done(now, "rolled back" if self.swapped_any else "aborted", self.reason, out)

    def _done(self, now: float, result: str, reason: str, out: list[Action]) -> None:
        for name in list(self.timers):
            self._cancel(name, out)
        self.phase = Phase.DONE
        self.result = result
        self._progress(now, f"upgrade {result}" + (f": {reason}" if reason else ""), out)
        out.append(Done(result, reason))

    # ------------------------------------------------------------------ supervisor restart

    def _on_Resumed(self, ev: Resumed, now: float, out: list[Action]) -> None:
        """Reconcile with the observed world, re-arm timers, then resume (committed/swapped) or roll back."""
        for u in self.units:
            a = ev.alive.get(u.name, {})
            if u.cand_alive and not a.get("new", False):
                u.cand_alive = False
            if u.old_alive and not a.get("old", False):
                u.old_alive = False
            u.old_reachable = u.old_alive  # the IPC channels are new: reachable if alive
            seen = ev.owners.get(u.name, {})
            for q in u.queues:
                o, st = seen.get(q, "?"), u.stages[q]
                if st is Stage.SWAP and o == "new" and u.cand_alive:
                    u.stages[q] = Stage.NEW  # the claim happened; its report was lost
                    self.swapped_any = True
                elif st in (Stage.BACK, Stage.RECLAIM) and o == "old" and u.old_alive:
                    u.stages[q] = Stage.OLD  # the old took it back; its report was lost
            u.forced = []  # forced claims in flight may be lost with the old channels: send them again
        # Timers died with the old supervisor: re-arm what is still armed with the time left.
        for name, (tok, deadline) in list(self.timers.items()):
            out.append(ArmTimer(name, max(0.0, deadline - now), tok))
        self._progress(now, f"supervisor restarted during the upgrade (phase {self.phase.value})", out)
        if self.phase in (Phase.PREPARING, Phase.SWAPPING, Phase.CANARY):
            self._revert(now, "supervisor restarted mid-upgrade", out)
        elif self.phase is Phase.SWAPPED:
            if any(not u.cand_alive for u in self.units):
                self._revert(now, "a new process died while the supervisor was down", out)
        elif self.phase is Phase.REVERTING:
            for u in self.units:
                if u.step is Step.REVERTING:
                    # Orders in flight may be lost: issue them again (processes ack idempotently).
                    for q in u.queues:
                        if u.stages[q] is Stage.BACK and u.cand_alive and u.old_alive:
                            out.append(ClaimQueue(u.name, q, "old", u.old_pid))
                            out.append(ReleaseQueue(u.name, q, "new", u.cand_pid))
                    if u.cand_alive and u.cand_kill_sent:
                        out.append(KillProcess(u.name, "new", u.cand_pid))
                    self._revert_progress(u, now, out)
            self._maybe_reverted(now, out)
