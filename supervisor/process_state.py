"""The life of one supervised program, as a pure state machine (sans-IO, in the manner of h11).

Nothing here forks, signals, sleeps or reads a clock. The caller (the supervisor's
asyncio shell) feeds *events* -- what happened -- together with the current time,
and gets back a list of *actions* -- what to do -- which it performs in order::

    machine = ProcessMachine(ProgramConfig("worker-0"))
    for action in machine.handle(Start(), now=loop.time()):
        ...  # Spawn -> launch, then feed Spawned(pid, start_time) or SpawnFailed(error)

Because the machine never touches the world, every state can be driven with every
event in a test, and random event sequences can be checked against invariants.

States (supervisord's, plus READY)
----------------------------------
``STOPPED``   not running, not wanted (initial state, and after a requested stop).
``STARTING``  spawn requested or process alive but not yet up.
``RUNNING``   up: alive for ``startsecs`` without exiting. A ``ready_required``
              program never counts as up on time alone.
``READY``     up, and the process itself reported READY over the IPC channel.
``BACKOFF``   a start failed, or an up process died again soon after a restart;
              waiting before the next try.
``STOPPING``  a signal was sent; waiting for the exit (SIGKILL after ``stopwaitsecs``).
``EXITED``    exited from an up state and not restarted (autorestart said no).
``FATAL``     given up until a new Start: ``startretries`` retries failed, or more than
              ``max_restarts`` automatic restarts within ``restart_window``.

Semantics (those of supervisord unless noted)
---------------------------------------------
* A start *fails* when the process cannot be spawned, exits before it is up, misses
  heartbeats before it is up, or (``ready_required``) does not report READY within
  ``ready_timeout``. Failures are counted; after ``startretries`` retries
  (``startretries + 1`` attempts) the program is FATAL. Between attempts it waits in
  BACKOFF for ``backoff_base * 2**(n-1)`` seconds capped at ``backoff_max`` (1, 2, 4 ...;
  supervisord grows linearly, the issue asks for exponential).
* Reaching RUNNING or READY resets the failure count.
* An exit from RUNNING/READY goes to EXITED; then ``autorestart`` decides:
  ``True`` restarts, ``False`` does not, ``"unexpected"`` restarts unless the exit code is
  in ``exitcodes``. Death by signal and an unknown status (an adopted process that is
  not our child) are always unexpected. The first automatic restart within
  ``restart_window`` is immediate (STARTING), as in supervisord; unlike supervisord,
  the n-th further one waits ``backoff_delay(n)`` in BACKOFF, and more than
  ``max_restarts`` of them make the program FATAL (a process that crashes just after
  ``startsecs`` would otherwise be restarted in a tight loop forever).
* A stop sends ``stopsignal``, arms ``stopwaitsecs`` and, at the deadline, sends SIGKILL
  (then again every ``stopwaitsecs`` while the process refuses to die, with a warning:
  a process in uninterruptible sleep cannot be killed any faster). The exit ends in
  STOPPED. A Start during STOPPING is remembered and honoured once the process is gone
  (that is ``restart``); a second StopRequested cancels it.
* HeartbeatMissed on an up process means it hangs: it is stopped like above and,
  once gone, restarted (an automatic restart, as above) unless ``autorestart`` is
  False (a hang is never "expected").
* ``now`` (any monotonic clock, the shell's ``loop.time()``) dates state changes
  (``since``, ``uptime``) and the restart window; durations are asked of the shell
  as timers.
* Adopted(pid, start_time, ready) takes over a process found alive by a restarted
  supervisor: RUNNING, or READY if it had reported READY (the record says so); a
  ``ready_required`` program that had not is STARTING with its ready timer armed.

Timers
------
``ArmTimer(name, seconds, token)`` asks the shell to feed ``timer_event(name, token)``
after ``seconds``; arming a name again replaces the earlier timer of that name;
``CancelTimer(name)`` cancels it. A timer event for a timer that is not armed, or
whose token is not the current one, is stale and ignored: a shell whose cancel lost a
race with the callback cannot cause a wrong SIGKILL. Names: ``startsecs``, ``ready``,
``stop``, ``backoff``.

Contract for the shell
----------------------
* Perform actions in order. ``Spawn`` is always the last action of a batch; answer
  it with ``Spawned`` or ``SpawnFailed`` (possibly right away, re-entering ``handle``).
* ``SendSignal.pid`` is the process to signal (use its pidfd); ``Record`` and
  ``ClearRecord`` persist or remove the identity record used for re-adoption.
* ``handle`` never raises for any event in any state; events that make no sense in the
  current state are ignored, with a ``Log`` action when they point at a shell bug.
"""

from __future__ import annotations

import enum
import signal as _signal
from dataclasses import dataclass, field
from typing import Literal, Union

# --------------------------------------------------------------------------- config


class State(enum.Enum):
    """Process states, named as supervisord names them (plus READY)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    READY = "READY"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


UP_STATES = frozenset({State.RUNNING, State.READY})
# States in which no process exists and none is being started or waited for.
IDLE_STATES = frozenset({State.STOPPED, State.EXITED, State.FATAL})

Autorestart = Union[bool, Literal["unexpected"]]


@dataclass(frozen=True)
class ProgramConfig:
    """How one program is supervised (the supervisord ``[program:x]`` options that matter here)."""

    name: str
    startsecs: float = 1.0
    startretries: int = 3
    autorestart: Autorestart = "unexpected"
    exitcodes: frozenset[int] = frozenset({0})
    stopsignal: int = int(_signal.SIGTERM)
    stopwaitsecs: float = 10.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    ready_required: bool = False
    # Only for ready_required programs: seconds to wait for READY (None: forever).
    ready_timeout: float | None = 60.0
    # Automatic restarts (after an up process exits or hangs) within restart_window
    # seconds: the first is immediate, the next ones wait backoff_delay(n) in BACKOFF,
    # and more than max_restarts of them (None: no limit) make the program FATAL.
    max_restarts: int | None = None
    restart_window: float = 60.0

    def __post_init__(self) -> None:
        if self.startsecs < 0 or self.stopwaitsecs <= 0:
            raise ValueError(f"{self.name}: startsecs must be >= 0 and stopwaitsecs > 0")
        if self.startretries < 0:
            raise ValueError(f"{self.name}: startretries must be >= 0")
        if self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError(f"{self.name}: need 0 < backoff_base <= backoff_max")
        if self.autorestart not in (True, False, "unexpected"):
            raise ValueError(f"{self.name}: autorestart must be true, false or 'unexpected'")
        if self.ready_timeout is not None and self.ready_timeout <= 0:
            raise ValueError(f"{self.name}: ready_timeout must be > 0 or None")
        if (self.max_restarts is not None and self.max_restarts < 0) or self.restart_window <= 0:
            raise ValueError(f"{self.name}: max_restarts must be >= 0 (or None) and restart_window > 0")
        object.__setattr__(self, "exitcodes", frozenset(self.exitcodes))

    def backoff_delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failed start (1, 2, 4 ... capped)."""
        exp = min(max(failures - 1, 0), 62)  # bounded exponent: no float overflow
        return min(self.backoff_base * (2.0**exp), self.backoff_max)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Start:
    """The operator (or the supervisor's plan) wants the program running."""


@dataclass(frozen=True)
class StopRequested:
    """The operator (or a shutdown) wants the program stopped."""


@dataclass(frozen=True)
class Spawned:
    """The shell started the process asked for by ``Spawn``. ``start_time``: psutil create_time."""

    pid: int
    start_time: float


@dataclass(frozen=True)
class SpawnFailed:
    """The shell could not start the process (exec failed, no such file, fork error ...)."""

    error: str


@dataclass(frozen=True)
class Adopted:
    """A restarted supervisor found this program's process alive and verified its identity."""

    pid: int
    start_time: float
    ready: bool = False  # it had reported READY to the previous supervisor


@dataclass(frozen=True)
class Ready:
    """The process reported READY over the IPC channel."""


@dataclass(frozen=True)
class Exited:
    """The process is gone. ``code`` / ``signal``: how; both None when unknown (adopted non-child).

    ``pid``, if given, must be the current process's: an exit of an older one is stale.
    """

    code: int | None = None
    signal: int | None = None
    pid: int | None = None

    @property
    def known(self) -> bool:
        return self.code is not None or self.signal is not None

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {_signame(self.signal)}"
        if self.code is not None:
            return f"exit status {self.code}"
        return "exit status unknown (not our child)"


@dataclass(frozen=True)
class HeartbeatMissed:
    """The process stopped sending heartbeats over the IPC channel: it hangs.

    ``kill_now``: it hangs inside a critical section (a worker mid-pass) where a
    SIGTERM can do nothing useful and every moment it lives blocks its successor:
    SIGKILL at once instead of SIGTERM and the stop deadline.
    """

    kill_now: bool = False


@dataclass(frozen=True)
class StartSecsElapsed:
    """Timer ``startsecs`` fired: the process stayed alive long enough to count as up."""

    token: int | None = None


@dataclass(frozen=True)
class ReadyTimeout:
    """Timer ``ready`` fired: a ready_required program did not report READY in time."""

    token: int | None = None


@dataclass(frozen=True)
class StopDeadline:
    """Timer ``stop`` fired: ``stopwaitsecs`` passed since the stop (or kill) signal."""

    token: int | None = None


@dataclass(frozen=True)
class BackoffElapsed:
    """Timer ``backoff`` fired: time for the next start attempt."""

    token: int | None = None


Event = Union[Start, StopRequested, Spawned, SpawnFailed, Adopted, Ready, Exited, HeartbeatMissed, StartSecsElapsed, ReadyTimeout, StopDeadline, BackoffElapsed]

TIMER_EVENTS: dict[str, type] = {
    "startsecs": StartSecsElapsed,
    "ready": ReadyTimeout,
    "stop": StopDeadline,
    "backoff": BackoffElapsed,
}


def timer_event(name: str, token: int | None = None) -> Event:
    """The event the shell feeds when the timer armed as ``ArmTimer(name, _, token)`` fires."""
    return TIMER_EVENTS[name](token)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Spawn:
    """Start the program (fork+exec); answer with Spawned or SpawnFailed. ``attempt`` counts from 1."""

    attempt: int


@dataclass(frozen=True)
class SendSignal:
    """Send ``signal`` to process ``pid`` (through its pidfd)."""

    pid: int
    signal: int


@dataclass(frozen=True)
class ArmTimer:
    """Feed ``timer_event(name, token)`` after ``seconds``; replaces a timer of the same name."""

    name: str
    seconds: float
    token: int


@dataclass(frozen=True)
class CancelTimer:
    """Cancel the timer ``name`` if armed."""

    name: str


@dataclass(frozen=True)
class Record:
    """Persist the identity of the running process (for re-adoption by a restarted supervisor)."""

    pid: int
    start_time: float
    ready: bool


@dataclass(frozen=True)
class ClearRecord:
    """Remove the identity record: no process of this program is alive any more."""


@dataclass(frozen=True)
class Log:
    """A line for the supervisor's log. ``level``: 'info' | 'warning' | 'error'."""

    level: str
    message: str


@dataclass(frozen=True)
class Notify:
    """The state changed (for status, event listeners, the IPC channel, systemd STATUS=)."""

    name: str
    old: State
    new: State
    pid: int | None
    reason: str


Action = Union[Spawn, SendSignal, ArmTimer, CancelTimer, Record, ClearRecord, Log, Notify]


class StopReason(enum.Enum):
    """Why the machine is in STOPPING: decides what happens once the process is gone."""

    REQUESTED = "requested"  # -> STOPPED (or STARTING if a Start came meanwhile)
    START_FAILED = "start failed"  # -> BACKOFF / FATAL
    HUNG = "hung"  # -> restart unless autorestart is False


def _signame(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# --------------------------------------------------------------------------- machine


@dataclass
class ProcessMachine:
    """The state of one program; feed events with :meth:`handle`."""

    config: ProgramConfig
    state: State = State.STOPPED
    pid: int | None = None
    start_time: float | None = None
    ready: bool = False
    failures: int = 0  # consecutive failed starts
    attempt: int = 0  # spawns since the last operator Start
    since: float = 0.0  # time of the last state change
    started_at: float | None = None  # time the current process was spawned/adopted
    last_exit: Exited | None = None
    stop_reason: StopReason | None = None
    restart_pending: bool = False
    restarts: list[float] = field(default_factory=list)  # times of recent automatic restarts
    fatal_reason: str = ""
    kill_sent: bool = False
    spawn_pending: bool = False
    timers: dict[str, int] = field(default_factory=dict)  # armed timer name -> token
    _token: int = 0

    # ------------------------------------------------------------------ public

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def is_up(self) -> bool:
        """RUNNING or READY."""
        return self.state in UP_STATES

    def uptime(self, now: float) -> float | None:
        """Seconds since the current process was spawned or adopted (None without a process)."""
        if self.pid is None or self.started_at is None:
            return None
        return max(0.0, now - self.started_at)

    def describe(self, now: float) -> str:
        """supervisorctl-style description: 'pid 123, uptime 0:01:02', 'Exited too quickly' ..."""
        up = self.uptime(now)
        if self.pid is not None and up is not None:
            s = int(up)
            return f"pid {self.pid}, uptime {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
        if self.state is State.BACKOFF:
            if self.failures:
                return f"start failed {self.failures} time(s), retrying"
            return f"restarted {len(self.restarts)} time(s) recently, waiting to restart"
        if self.state is State.FATAL:
            return self.fatal_reason
        if self.last_exit is not None and self.state is State.EXITED:
            return self.last_exit.describe()
        return ""

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply ``event`` (which happened at time ``now``) and return the actions to perform."""
        out: list[Action] = []
        method = getattr(self, "_on_" + type(event).__name__, None)
        if method is None:
            out.append(Log("error", f"{self.name}: unknown event {event!r} ignored"))
            return out
        method(event, now, out)
        return out

    # ------------------------------------------------------------------ helpers

    def _set(self, new: State, now: float, reason: str, out: list[Action]) -> None:
        if new is self.state:
            return
        old, self.state, self.since = self.state, new, now
        out.append(Notify(self.name, old, new, self.pid, reason))

    def _arm(self, name: str, seconds: float, out: list[Action]) -> None:
        self._token += 1
        self.timers[name] = self._token
        out.append(ArmTimer(name, seconds, self._token))

    def _cancel(self, name: str, out: list[Action]) -> None:
        if self.timers.pop(name, None) is not None:
            out.append(CancelTimer(name))

    def _cancel_all(self, out: list[Action]) -> None:
        for name in list(self.timers):
            self._cancel(name, out)

    def _timer_ok(self, name: str, token: int | None) -> bool:
        """Is this timer event current? (armed, and the token matches when one is given)."""
        cur = self.timers.get(name)
        if cur is None or (token is not None and token != cur):
            return False
        del self.timers[name]  # a fired timer is no longer armed
        return True

    def _spawn(self, now: float, reason: str, out: list[Action]) -> None:
        """Ask for a new process; Spawn is the batch's last action (see the shell contract)."""
        self._cancel_all(out)
        self.pid = self.start_time = self.started_at = None
        self.ready = self.kill_sent = self.restart_pending = False
        self.stop_reason = None
        self.attempt += 1
        self.spawn_pending = True
        self._set(State.STARTING, now, reason, out)
        out.append(Spawn(self.attempt))

    def _operator_start(self, now: float, out: list[Action]) -> None:
        self.failures = 0
        self.attempt = 0
        self.restarts.clear()
        self._spawn(now, "start requested", out)

    def _autorestart(self, now: float, why: str, out: list[Action]) -> None:
        """Restart after an up process went away: immediately, with backoff, or FATAL."""
        cfg = self.config
        self.restarts = [t for t in self.restarts if now - t < cfg.restart_window]
        n = len(self.restarts)
        if cfg.max_restarts is not None and n >= cfg.max_restarts:
            self.fatal_reason = f"restarted {n} time(s) within {cfg.restart_window:g}s"
            out.append(Log("error", f"{self.name}: giving up: {self.fatal_reason}; last: {why}"))
            self._set(State.FATAL, now, self.fatal_reason, out)
            return
        self.restarts.append(now)
        self.attempt = 0
        if n == 0:
            self._spawn(now, f"autorestart after {why}", out)
            return
        delay = cfg.backoff_delay(n)
        out.append(Log("warning", f"{self.name}: restart {n + 1} within {cfg.restart_window:g}s after {why}: waiting {delay:g}s"))
        self._set(State.BACKOFF, now, f"restart backoff after {why}", out)
        self._arm("backoff", delay, out)

    def _became_up(self, now: float, ready: bool, out: list[Action]) -> None:
        self._cancel("startsecs", out)
        self._cancel("ready", out)
        self.failures = 0
        self.ready = self.ready or ready
        if ready and self.pid is not None:
            # Persist readiness so a restarted supervisor adopts it as READY.
            out.append(Record(self.pid, self.start_time or 0.0, True))
        new = State.READY if self.ready else State.RUNNING
        self._set(new, now, "reported READY" if ready else f"up for {self.config.startsecs:g}s", out)

    def _forget_process(self, ev: Exited | None, out: list[Action]) -> None:
        self._cancel_all(out)
        if ev is not None:
            self.last_exit = ev
        self.pid = self.start_time = self.started_at = None
        self.ready = self.kill_sent = False
        out.append(ClearRecord())

    def _start_failed(self, now: float, why: str, out: list[Action]) -> None:
        """One more failed start: BACKOFF with the next delay, or FATAL when out of retries."""
        self.failures += 1
        self.stop_reason = None
        if self.failures > self.config.startretries:
            self.fatal_reason = f"gave up after {self.failures} failed start attempt(s); last: {why}"
            out.append(Log("error", f"{self.name}: {self.fatal_reason}"))
            self._set(State.FATAL, now, f"too many failed starts ({why})", out)
            return
        delay = self.config.backoff_delay(self.failures)
        out.append(Log("warning", f"{self.name}: start failed ({why}); retry {self.failures}/{self.config.startretries} in {delay:g}s"))
        self._set(State.BACKOFF, now, why, out)
        self._arm("backoff", delay, out)

    def _begin_stop(self, reason: StopReason, now: float, why: str, out: list[Action], *, kill: bool = False) -> None:
        """Signal the process (if it exists yet) and arm the SIGKILL deadline (``kill``: SIGKILL now)."""
        self._cancel_all(out)
        self.stop_reason = reason
        self.kill_sent = kill
        self._set(State.STOPPING, now, why, out)
        if self.pid is not None:
            out.append(SendSignal(self.pid, int(_signal.SIGKILL) if kill else self.config.stopsignal))
            self._arm("stop", self.config.stopwaitsecs, out)
        # else: the spawn is still in flight; Spawned will send the signal.

    def _should_restart(self, ev: Exited) -> bool:
        ar = self.config.autorestart
        if ar is True:
            return True
        if ar is False:
            return False
        expected = ev.signal is None and ev.code is not None and ev.code in self.config.exitcodes
        return not expected

    def _stray(self, what: str, pid: int | None, out: list[Action]) -> None:
        out.append(Log("error", f"{self.name}: unexpected {what} in state {self.state.value} ignored (shell bug?)"))
        if pid is not None and pid != self.pid:
            # A process we did not ask for must not run unsupervised.
            out.append(SendSignal(pid, int(_signal.SIGKILL)))

    # ------------------------------------------------------------------ events

    def _on_Start(self, ev: Start, now: float, out: list[Action]) -> None:
        s = self.state
        if s in IDLE_STATES:
            self._operator_start(now, out)
        elif s is State.BACKOFF:
            self._cancel("backoff", out)
            self._operator_start(now, out)
        elif s is State.STOPPING:
            if not self.restart_pending:
                self.restart_pending = True
                out.append(Log("info", f"{self.name}: will start again once stopped"))
        # STARTING, RUNNING, READY: already started; nothing to do.

    def _on_StopRequested(self, ev: StopRequested, now: float, out: list[Action]) -> None:
        s = self.state
        if s in (State.STARTING, State.RUNNING, State.READY):
            self._begin_stop(StopReason.REQUESTED, now, "stop requested", out)
        elif s is State.BACKOFF:
            self._cancel_all(out)
            self.stop_reason = None
            self._set(State.STOPPED, now, "stop requested", out)
        elif s is State.STOPPING:
            # The operator's stop wins over a pending restart or a failure-driven stop.
            self.restart_pending = False
            self.stop_reason = StopReason.REQUESTED
        # STOPPED, EXITED, FATAL: nothing runs; stays as is (FATAL keeps its diagnosis).

    def _on_Spawned(self, ev: Spawned, now: float, out: list[Action]) -> None:
        if not self.spawn_pending:
            self._stray(f"Spawned(pid={ev.pid})", ev.pid, out)
            return
        self.spawn_pending = False
        self.pid, self.start_time, self.started_at = ev.pid, ev.start_time, now
        self.ready = False
        out.append(Record(ev.pid, ev.start_time, False))
        out.append(Log("info", f"{self.name}: spawned pid {ev.pid} (attempt {self.attempt})"))
        if self.state is State.STOPPING:
            # Stop requested while the spawn was in flight: stop it now.
            out.append(SendSignal(ev.pid, self.config.stopsignal))
            self._arm("stop", self.config.stopwaitsecs, out)
            return
        self._arm_up_timer(now, out)

    def _arm_up_timer(self, now: float, out: list[Action]) -> None:
        if self.config.ready_required:
            if self.config.ready_timeout is not None:
                self._arm("ready", self.config.ready_timeout, out)
        elif self.config.startsecs > 0:
            self._arm("startsecs", self.config.startsecs, out)
        else:
            self._became_up(now, False, out)

    def _on_SpawnFailed(self, ev: SpawnFailed, now: float, out: list[Action]) -> None:
        if not self.spawn_pending:
            self._stray("SpawnFailed", None, out)
            return
        self.spawn_pending = False
        out.append(Log("error", f"{self.name}: spawn failed: {ev.error}"))
        if self.state is State.STOPPING:
            restart = self.restart_pending
            self.restart_pending = False
            self.stop_reason = None
            self._set(State.STOPPED, now, "stopped (spawn had failed)", out)
            if restart:
                self._operator_start(now, out)
            return
        self._start_failed(now, f"spawn error: {ev.error}", out)

    def _on_Adopted(self, ev: Adopted, now: float, out: list[Action]) -> None:
        if self.state not in IDLE_STATES and self.state is not State.BACKOFF:
            self._stray(f"Adopted(pid={ev.pid})", None, out)
            return
        self._cancel_all(out)
        self.pid, self.start_time, self.started_at = ev.pid, ev.start_time, now
        self.failures = 0
        self.attempt = 0
        self.restarts.clear()
        self.spawn_pending = self.kill_sent = self.restart_pending = False
        self.stop_reason = None
        self.ready = ev.ready
        out.append(Record(ev.pid, ev.start_time, ev.ready))
        out.append(Log("info", f"{self.name}: adopted running pid {ev.pid}"))
        if ev.ready:
            self._set(State.READY, now, "adopted (had reported READY)", out)
        elif self.config.ready_required:
            self._set(State.STARTING, now, "adopted, waiting for READY", out)
            if self.config.ready_timeout is not None:
                self._arm("ready", self.config.ready_timeout, out)
        else:
            self._set(State.RUNNING, now, "adopted", out)

    def _on_Ready(self, ev: Ready, now: float, out: list[Action]) -> None:
        if self.pid is None:
            return  # no process (or not spawned yet): a late message from a dead one
        if self.state is State.STARTING or self.state is State.RUNNING:
            self._became_up(now, True, out)
        # READY: duplicate; STOPPING: irrelevant now.

    def _on_Exited(self, ev: Exited, now: float, out: list[Action]) -> None:
        if self.pid is None or (ev.pid is not None and ev.pid != self.pid):
            out.append(Log("warning", f"{self.name}: exit of pid {ev.pid if ev.pid is not None else '?'} ignored: not the current process (state {self.state.value})"))
            return
        pid, s = self.pid, self.state
        self._forget_process(ev, out)
        out.append(Log("info" if s is State.STOPPING else "warning", f"{self.name}: pid {pid} {ev.describe()}"))
        if s is State.STARTING:
            self._start_failed(now, f"exited before it was up ({ev.describe()})", out)
        elif s in UP_STATES:
            self._set(State.EXITED, now, ev.describe(), out)
            if self._should_restart(ev):
                self._autorestart(now, ev.describe(), out)
        elif s is State.STOPPING:
            reason, restart = self.stop_reason, self.restart_pending
            self.stop_reason, self.restart_pending = None, False
            if reason is StopReason.START_FAILED:
                if restart:
                    self._set(State.STOPPED, now, "stopped", out)
                    self._operator_start(now, out)
                else:
                    self._start_failed(now, "did not report READY in time" if self.config.ready_required else "hung while starting", out)
            elif reason is StopReason.HUNG:
                self._set(State.EXITED, now, f"hung, {ev.describe()}", out)
                if restart:
                    self._operator_start(now, out)
                elif self.config.autorestart is not False:
                    self._autorestart(now, "a hang", out)
            else:
                self._set(State.STOPPED, now, f"stopped ({ev.describe()})", out)
                if restart:
                    self._operator_start(now, out)

    def _on_HeartbeatMissed(self, ev: HeartbeatMissed, now: float, out: list[Action]) -> None:
        if self.pid is None:
            return
        if self.state in UP_STATES:
            out.append(Log("error", f"{self.name}: pid {self.pid} missed its heartbeats: {'killing' if ev.kill_now else 'stopping'} it"))
            self._begin_stop(StopReason.HUNG, now, "missed heartbeats", out, kill=ev.kill_now)
        elif self.state is State.STARTING:
            out.append(Log("error", f"{self.name}: pid {self.pid} missed its heartbeats while starting"))
            self._begin_stop(StopReason.START_FAILED, now, "missed heartbeats while starting", out)

    def _on_StartSecsElapsed(self, ev: StartSecsElapsed, now: float, out: list[Action]) -> None:
        if not self._timer_ok("startsecs", ev.token):
            return
        if self.state is State.STARTING and self.pid is not None:
            self._became_up(now, False, out)

    def _on_ReadyTimeout(self, ev: ReadyTimeout, now: float, out: list[Action]) -> None:
        if not self._timer_ok("ready", ev.token):
            return
        if self.state is State.STARTING and self.pid is not None:
            out.append(Log("error", f"{self.name}: pid {self.pid} did not report READY within {self.config.ready_timeout:g}s"))
            self._begin_stop(StopReason.START_FAILED, now, "no READY in time", out)

    def _on_StopDeadline(self, ev: StopDeadline, now: float, out: list[Action]) -> None:
        if not self._timer_ok("stop", ev.token):
            return
        if self.state is not State.STOPPING or self.pid is None:
            return
        if self.kill_sent:
            out.append(Log("error", f"{self.name}: pid {self.pid} still alive {self.config.stopwaitsecs:g}s after SIGKILL (uninterruptible sleep?); sending SIGKILL again"))
        else:
            out.append(Log("warning", f"{self.name}: pid {self.pid} did not stop within {self.config.stopwaitsecs:g}s: SIGKILL"))
        self.kill_sent = True
        out.append(SendSignal(self.pid, int(_signal.SIGKILL)))
        self._arm("stop", self.config.stopwaitsecs, out)

    def _on_BackoffElapsed(self, ev: BackoffElapsed, now: float, out: list[Action]) -> None:
        if not self._timer_ok("backoff", ev.token):
            return
        if self.state is State.BACKOFF:
            why = f"retry {self.failures}/{self.config.startretries}" if self.failures else "restart after backoff"
            self._spawn(now, why, out)
