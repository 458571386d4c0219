"""The per-process state machine: every state x every event, supervisord semantics, invariants.

No processes and no clocks here: the machine is pure, so the tests drive it with
events and a fake time, and a small simulated world (timers + fake processes) checks
liveness properties such as "a stop always ends, with SIGKILL exactly at the deadline".
"""

from __future__ import annotations

import heapq
import itertools
import signal
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotplane.supervisor.process_state import (
    IDLE_STATES,
    UP_STATES,
    Adopted,
    ArmTimer,
    BackoffElapsed,
    CancelTimer,
    ClearRecord,
    Exited,
    HeartbeatMissed,
    Log,
    Notify,
    ProcessMachine,
    ProgramConfig,
    Ready,
    ReadyTimeout,
    Record,
    SendSignal,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    StartSecsElapsed,
    State,
    StopDeadline,
    StopRequested,
    timer_event,
)

SIGTERM, SIGKILL = int(signal.SIGTERM), int(signal.SIGKILL)
CFG = ProgramConfig("w", startsecs=1.0, startretries=2, autorestart="unexpected", stopwaitsecs=5.0)
CFG_R = ProgramConfig("p", startsecs=1.0, startretries=2, ready_required=True, ready_timeout=30.0, stopwaitsecs=5.0)


def drive(m: ProcessMachine, *events, now: float = 0.0) -> list:
    out = []
    for ev in events:
        out.extend(m.handle(ev, now))
    return out


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# --------------------------------------------------------------------------- table


def build(variant: str) -> ProcessMachine:
    """A machine brought to ``variant`` through public events only."""
    cfg = CFG_R if variant == "STARTING_R" else CFG
    m = ProcessMachine(cfg)
    run = [Start(), Spawned(100, 50.0)]
    seq = {
        "STOPPED": [],
        "STARTING_PENDING": [Start()],
        "STARTING": run,
        "STARTING_R": run,
        "RUNNING": run + [StartSecsElapsed()],
        "READY": run + [Ready()],
        "BACKOFF": run + [Exited(1)],
        "STOPPING": run + [StartSecsElapsed(), StopRequested()],
        "STOPPING_KILLED": run + [StartSecsElapsed(), StopRequested(), StopDeadline()],
        "STOPPING_PENDING": [Start(), StopRequested()],
        "EXITED": run + [StartSecsElapsed(), Exited(0)],
        "FATAL": [Start(), SpawnFailed("x"), BackoffElapsed(), SpawnFailed("x"), BackoffElapsed(), SpawnFailed("x")],
    }[variant]
    drive(m, *seq)
    expected_state = variant.split("_")[0]
    assert m.state.value == expected_state, (variant, m.state)
    return m


EVENTS = {
    "start": Start(),
    "stop": StopRequested(),
    "spawned": Spawned(999, 60.0),
    "spawnfail": SpawnFailed("ENOENT"),
    "adopt": Adopted(777, 70.0),
    "adoptR": Adopted(777, 70.0, ready=True),
    "ready": Ready(),
    "exit0": Exited(0),
    "exit1": Exited(1),
    "sig9": Exited(signal=9),
    "unknown": Exited(),
    "stale": Exited(1, pid=4242),
    "heartbeat": HeartbeatMissed(),
    "startsecs": StartSecsElapsed(),
    "readyto": ReadyTimeout(),
    "deadline": StopDeadline(),
    "backoff": BackoffElapsed(),
}

# Next state for every (state, event). Abbreviations: see _ABBR.
_ABBR = {"S": "STOPPED", "G": "STARTING", "R": "RUNNING", "Y": "READY", "B": "BACKOFF", "P": "STOPPING", "E": "EXITED", "F": "FATAL"}
_COLS = list(EVENTS)
#                     start stop spawned spawnfail adopt adoptR ready exit0 exit1 sig9 unknown stale heartbeat startsecs readyto deadline backoff
_TABLE = """
STOPPED              G     S    S       S         R     Y      S     S     S     S    S       S     S         S         S       S        S
STARTING_PENDING     G     P    G       B         G     G      G     G     G     G    G       G     G         G         G       G        G
STARTING             G     P    G       G         G     G      Y     B     B     B    B       G     P         R         G       G        G
STARTING_R           G     P    G       G         G     G      Y     B     B     B    B       G     P         G         P       G        G
RUNNING              R     P    R       R         R     R      Y     E     G     G    G       R     P         R         R       R        R
READY                Y     P    Y       Y         Y     Y      Y     E     G     G    G       Y     P         Y         Y       Y        Y
BACKOFF              G     S    B       B         R     Y      B     B     B     B    B       B     B         B         B       B        G
STOPPING             P     P    P       P         P     P      P     S     S     S    S       P     P         P         P       P        P
STOPPING_KILLED      P     P    P       P         P     P      P     S     S     S    S       P     P         P         P       P        P
STOPPING_PENDING     P     P    P       S         P     P      P     P     P     P    P       P     P         P         P       P        P
EXITED               G     E    E       E         R     Y      E     E     E     E    E       E     E         E         E       E        E
FATAL                G     F    F       F         R     Y      F     F     F     F    F       F     F         F         F       F        F
"""
TABLE = {}
for _line in _TABLE.strip().splitlines():
    _row, *_cells = _line.split()
    assert len(_cells) == len(_COLS), _row
    for _col, _cell in zip(_COLS, _cells):
        TABLE[(_row, _col)] = State(_ABBR[_cell])


def check_batch(m: ProcessMachine, before: State, actions: list) -> None:
    """Properties every batch of actions has, whatever the event."""
    spawns = of(actions, Spawn)
    assert len(spawns) <= 1
    if spawns:
        assert isinstance(actions[-1], Spawn), "Spawn must be the last action"
    state = before
    for n in of(actions, Notify):
        assert n.old is state and n.new is not n.old
        state = n.new
    assert state is m.state
    if m.state in IDLE_STATES:
        assert m.pid is None and not m.timers and not m.spawn_pending
    if m.state in UP_STATES:
        assert m.pid is not None
    if m.state is State.STOPPING and m.pid is not None:
        assert "stop" in m.timers, "a stopping process always has its SIGKILL deadline armed"
    for a in actions:
        assert isinstance(a, (Spawn, SendSignal, ArmTimer, CancelTimer, Record, ClearRecord, Log, Notify))


@pytest.mark.parametrize("variant", sorted({k[0] for k in TABLE}))
@pytest.mark.parametrize("event", _COLS)
def test_every_state_every_event(variant: str, event: str) -> None:
    m = build(variant)
    before = m.state
    actions = m.handle(EVENTS[event], 100.0)
    check_batch(m, before, actions)
    assert m.state is TABLE[(variant, event)], f"{variant} + {event}: got {m.state.value}"


def test_table_covers_every_state_and_event_type() -> None:
    rows = {k[0].split("_")[0] for k in TABLE}
    assert rows == {s.value for s in State}
    kinds = {type(e).__name__ for e in EVENTS.values()}
    assert kinds == {"Start", "StopRequested", "Spawned", "SpawnFailed", "Adopted", "Ready", "Exited", "HeartbeatMissed", "StartSecsElapsed", "ReadyTimeout", "StopDeadline", "BackoffElapsed"}


def test_unknown_event_is_logged_not_raised() -> None:
    m = ProcessMachine(CFG)
    acts = m.handle(object(), 0.0)  # type: ignore[arg-type]
    assert of(acts, Log) and m.state is State.STOPPED


# --------------------------------------------------------------------------- semantics


def test_start_spawn_startsecs_running() -> None:
    m = ProcessMachine(CFG)
    a = m.handle(Start(), 0.0)
    assert a[-1] == Spawn(1) and m.state is State.STARTING
    a = m.handle(Spawned(10, 123.5), 0.1)
    assert Record(10, 123.5, False) in a
    arm = of(a, ArmTimer)[0]
    assert arm.name == "startsecs" and arm.seconds == 1.0
    a = m.handle(timer_event("startsecs", arm.token), 1.1)
    assert m.state is State.RUNNING and of(a, Notify)[0].new is State.RUNNING
    assert m.describe(3723.1).startswith("pid 10, uptime 1:02:03")


def test_startsecs_zero_is_running_at_once() -> None:
    m = ProcessMachine(ProgramConfig("x", startsecs=0))
    drive(m, Start(), Spawned(5, 1.0))
    assert m.state is State.RUNNING and not m.timers


def test_ready_required_counts_only_after_ready() -> None:
    m = ProcessMachine(CFG_R)
    a = drive(m, Start(), Spawned(5, 1.0))
    assert [t.name for t in of(a, ArmTimer)] == ["ready"]
    assert m.handle(StartSecsElapsed(), 5.0) == []  # no startsecs timer for it
    assert m.state is State.STARTING
    a = m.handle(Ready(), 6.0)
    assert m.state is State.READY and Record(5, 1.0, True) in a and CancelTimer("ready") in a


def test_ready_timeout_is_a_failed_start_with_kill_escalation() -> None:
    m = ProcessMachine(CFG_R)
    a = drive(m, Start(), Spawned(5, 1.0))
    tok = of(a, ArmTimer)[0].token
    a = m.handle(ReadyTimeout(tok), 30.0)
    assert m.state is State.STOPPING and SendSignal(5, SIGTERM) in a
    stop = of(a, ArmTimer)[0]
    a = m.handle(StopDeadline(stop.token), 35.0)
    assert SendSignal(5, SIGKILL) in a
    a = m.handle(Exited(signal=9), 35.1)
    assert m.state is State.BACKOFF and m.failures == 1


def test_backoff_is_exponential_capped_then_fatal() -> None:
    cfg = ProgramConfig("x", startretries=6, backoff_base=1.0, backoff_max=8.0)
    m = ProcessMachine(cfg)
    delays = []
    a = m.handle(Start(), 0.0)
    for i in range(7):
        a = m.handle(SpawnFailed("boom"), float(i))
        arms = of(a, ArmTimer)
        if m.state is State.FATAL:
            assert not arms
            break
        delays.append(arms[0].seconds)
        a = m.handle(BackoffElapsed(arms[0].token), float(i))
        assert a[-1] == Spawn(i + 2)
    assert delays == [1, 2, 4, 8, 8, 8]
    assert m.state is State.FATAL and m.failures == 7
    # Start from FATAL resets the count.
    a = m.handle(Start(), 100.0)
    assert m.state is State.STARTING and m.failures == 0 and a[-1] == Spawn(1)


def test_exit_before_startsecs_is_a_failed_start() -> None:
    m = ProcessMachine(CFG)
    a = drive(m, Start(), Spawned(5, 1.0), Exited(0))
    assert m.state is State.BACKOFF
    assert ClearRecord() in a


@pytest.mark.parametrize(
    "autorestart,exit_,restarts",
    [
        (True, Exited(0), True),
        (True, Exited(3), True),
        (False, Exited(3), False),
        (False, Exited(signal=9), False),
        ("unexpected", Exited(0), False),
        ("unexpected", Exited(2), False),  # 2 is in exitcodes below
        ("unexpected", Exited(3), True),
        ("unexpected", Exited(signal=15), True),
        ("unexpected", Exited(), True),  # unknown status (adopted non-child)
    ],
)
def test_autorestart(autorestart, exit_, restarts) -> None:
    m = ProcessMachine(ProgramConfig("x", autorestart=autorestart, exitcodes=frozenset({0, 2})))
    drive(m, Start(), Spawned(5, 1.0), StartSecsElapsed())
    assert m.state is State.RUNNING
    a = m.handle(exit_, 10.0)
    states = [n.new for n in of(a, Notify)]
    assert states[0] is State.EXITED
    if restarts:
        assert states == [State.EXITED, State.STARTING] and a[-1] == Spawn(1)
    else:
        assert states == [State.EXITED] and not of(a, Spawn)


def test_repeated_restarts_back_off_then_fatal() -> None:
    cfg = ProgramConfig("x", startsecs=1, max_restarts=3, restart_window=60, backoff_base=1, backoff_max=60)
    m = ProcessMachine(cfg)
    drive(m, Start(), Spawned(1, 0.0), StartSecsElapsed())
    waits = []
    for i in range(4):
        a = m.handle(Exited(1), 10.0 + i)
        if m.state is State.FATAL:
            break
        if m.state is State.BACKOFF:
            arm = of(a, ArmTimer)[0]
            waits.append(arm.seconds)
            a = m.handle(BackoffElapsed(arm.token), 10.0 + i)
        else:
            waits.append(0)
        assert a[-1] == Spawn(1)
        drive(m, Spawned(2 + i, 0.0), StartSecsElapsed(), now=10.0 + i)
    assert waits == [0, 1, 2]  # immediate, then 1 s, 2 s
    assert m.state is State.FATAL and "restarted 3 time(s) within 60s" in m.describe(20.0)
    # Restarts older than the window are forgotten; an operator Start forgets them all.
    m.handle(Start(), 30.0)
    assert m.restarts == []
    m2 = ProcessMachine(cfg)
    drive(m2, Start(), Spawned(1, 0.0), StartSecsElapsed())
    for t in (0.0, 100.0, 200.0, 300.0, 400.0):
        a = m2.handle(Exited(1), t)
        assert m2.state is State.STARTING, "one crash per window always restarts at once"
        drive(m2, Spawned(9, t), StartSecsElapsed(), now=t)


def test_unlimited_restarts_by_default() -> None:
    m = ProcessMachine(ProgramConfig("x", startsecs=0, backoff_max=4))
    drive(m, Start(), Spawned(1, 0.0))
    for i in range(50):
        a = m.handle(Exited(1), float(i))
        if m.state is State.BACKOFF:
            assert of(a, ArmTimer)[0].seconds <= 4
            a = m.handle(BackoffElapsed(), float(i))
        assert a[-1] == Spawn(1)
        m.handle(Spawned(i + 2, 0.0), float(i))
        assert m.state is State.RUNNING


def test_running_resets_failures() -> None:
    m = ProcessMachine(CFG)
    drive(m, Start(), SpawnFailed("x"), BackoffElapsed(), Spawned(5, 1.0))
    assert m.failures == 1
    m.handle(StartSecsElapsed(), 2.0)
    assert m.failures == 0


def test_stop_sigterm_then_sigkill_after_deadline() -> None:
    m = ProcessMachine(ProgramConfig("x", stopsignal=int(signal.SIGINT), stopwaitsecs=7))
    drive(m, Start(), Spawned(5, 1.0), StartSecsElapsed())
    a = m.handle(StopRequested(), 10.0)
    assert SendSignal(5, int(signal.SIGINT)) in a
    arm = of(a, ArmTimer)[0]
    assert (arm.name, arm.seconds) == ("stop", 7)
    assert m.handle(StopDeadline(arm.token + 1000), 17.0) == []  # stale token
    a = m.handle(StopDeadline(arm.token), 17.0)
    assert SendSignal(5, SIGKILL) in a and m.kill_sent
    # Still alive after SIGKILL: warn and kill again, deadline re-armed.
    a = m.handle(timer_event("stop", of(a, ArmTimer)[0].token), 24.0)
    assert SendSignal(5, SIGKILL) in a and of(a, Log)[0].level == "error" and "stop" in m.timers
    a = m.handle(Exited(signal=9, pid=5), 25.0)
    assert m.state is State.STOPPED and CancelTimer("stop") in a and ClearRecord() in a


def test_restart_is_stop_then_start() -> None:
    m = ProcessMachine(CFG)
    drive(m, Start(), Spawned(5, 1.0), StartSecsElapsed(), StopRequested(), Start())
    assert m.state is State.STOPPING and m.restart_pending
    a = m.handle(Exited(0), 3.0)
    assert [n.new for n in of(a, Notify)] == [State.STOPPED, State.STARTING] and a[-1] == Spawn(1)
    # ... and a second stop cancels a pending restart.
    m2 = ProcessMachine(CFG)
    drive(m2, Start(), Spawned(5, 1.0), StopRequested(), Start(), StopRequested())
    drive(m2, Exited(0))
    assert m2.state is State.STOPPED


def test_stop_while_spawn_in_flight() -> None:
    m = ProcessMachine(CFG)
    drive(m, Start(), StopRequested())
    assert m.state is State.STOPPING
    a = m.handle(Spawned(9, 1.0), 0.5)
    assert SendSignal(9, SIGTERM) in a and "stop" in m.timers
    m.handle(Exited(signal=15), 0.6)
    assert m.state is State.STOPPED


def test_heartbeat_missed_stops_and_restarts() -> None:
    m = ProcessMachine(ProgramConfig("x", autorestart="unexpected"))
    drive(m, Start(), Spawned(5, 1.0), Ready())
    a = m.handle(HeartbeatMissed(), 5.0)
    assert m.state is State.STOPPING and SendSignal(5, SIGTERM) in a
    a = m.handle(Exited(0), 6.0)  # even a clean exit after a hang is a failure
    assert [n.new for n in of(a, Notify)] == [State.EXITED, State.STARTING]
    m2 = ProcessMachine(ProgramConfig("x", autorestart=False))
    drive(m2, Start(), Spawned(5, 1.0), Ready(), HeartbeatMissed(), Exited(0))
    assert m2.state is State.EXITED


def test_adoption() -> None:
    m = ProcessMachine(CFG)
    a = m.handle(Adopted(42, 9.0), 1.0)
    assert m.state is State.RUNNING and m.pid == 42 and Record(42, 9.0, False) in a
    m = ProcessMachine(CFG_R)
    a = m.handle(Adopted(42, 9.0), 1.0)
    assert m.state is State.STARTING and [t.name for t in of(a, ArmTimer)] == ["ready"]
    m.handle(Ready(), 2.0)
    assert m.state is State.READY
    m = ProcessMachine(CFG_R)
    m.handle(Adopted(42, 9.0, ready=True), 1.0)
    assert m.state is State.READY
    # An adopted process's exit has no known status: unexpected, restarted.
    a = m.handle(Exited(), 3.0)
    assert m.state is State.STARTING and a[-1] == Spawn(1)


def test_stray_spawned_is_killed() -> None:
    m = ProcessMachine(CFG)
    drive(m, Start(), Spawned(5, 1.0))
    a = m.handle(Spawned(6, 2.0), 1.0)
    assert SendSignal(6, SIGKILL) in a and m.pid == 5


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ProgramConfig("x", autorestart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ProgramConfig("x", stopwaitsecs=0)
    with pytest.raises(ValueError):
        ProgramConfig("x", backoff_base=4, backoff_max=2)
    with pytest.raises(ValueError):
        ProgramConfig("x", max_restarts=-1)
    assert ProgramConfig("x", backoff_max=5).backoff_delay(10_000) == 5


# --------------------------------------------------------------------------- hypothesis: chaos


_pids = itertools.count(1000)


@st.composite
def chaos_events(draw):
    """Arbitrary events, including nonsense ones; timer tokens sometimes right, sometimes stale."""
    kind = draw(st.sampled_from(["start", "stop", "ready", "exit", "exit_stale", "heartbeat", "timer", "timer_stale", "adopt", "stray"]))
    return kind, draw(st.integers(0, 3)), draw(st.sampled_from(["startsecs", "ready", "stop", "backoff"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=st.builds(
        ProgramConfig,
        name=st.just("x"),
        startsecs=st.sampled_from([0.0, 1.0]),
        startretries=st.integers(0, 3),
        autorestart=st.sampled_from([True, False, "unexpected"]),
        ready_required=st.booleans(),
        ready_timeout=st.sampled_from([None, 5.0]),
        max_restarts=st.sampled_from([None, 0, 2]),
    ),
    script=st.lists(chaos_events(), max_size=60),
    spawn_ok=st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_chaos_invariants(cfg, script, spawn_ok) -> None:
    """A correct shell (answers every Spawn) under arbitrary other events: invariants hold."""
    m = ProcessMachine(cfg)
    now = 0.0
    alive: set[int] = set()  # our processes that exist (spawned, not yet reported exited)
    armed: dict[str, int] = {}  # the shell's view of armed timers, from actions only
    last_kill_cause: list[str] = []
    ok_iter = itertools.cycle(spawn_ok)

    def feed(ev, cause: str) -> None:
        before = m.state
        acts = m.handle(ev, now)
        check_batch(m, before, acts)
        for a in acts:
            if isinstance(a, ArmTimer):
                armed[a.name] = a.token
            elif isinstance(a, CancelTimer):
                armed.pop(a.name, None)
            elif isinstance(a, SendSignal):
                if a.signal == SIGKILL and a.pid in alive:
                    assert cause == "deadline", "SIGKILL to our process only at the stop deadline"
                    last_kill_cause.append(cause)
                if a.pid not in alive:
                    assert a.signal == SIGKILL and cause == "stray"
            elif isinstance(a, Spawn):
                assert not alive, "two Spawns without an exit in between"
                if next(ok_iter):
                    pid = next(_pids)
                    alive.add(pid)
                    feed(Spawned(pid, now), "spawned")
                else:
                    feed(SpawnFailed("no"), "spawnfailed")
        assert set(armed) == set(m.timers), (armed, m.timers)
        if m.state is State.FATAL:
            assert m.failures > cfg.startretries or (cfg.max_restarts is not None and len(m.restarts) >= cfg.max_restarts)

    for kind, n, tname in script:
        now += 1.0
        if kind == "start":
            feed(Start(), kind)
        elif kind == "stop":
            feed(StopRequested(), kind)
        elif kind == "ready":
            feed(Ready(), kind)
        elif kind == "exit":
            ev = [Exited(0), Exited(1), Exited(signal=9), Exited()][n]
            if m.pid is not None and m.pid in alive:
                alive.discard(m.pid)
            elif alive:
                continue  # the process exists but the machine does not know it yet: impossible in a shell
            feed(ev, kind)
        elif kind == "exit_stale":
            feed(Exited(1, pid=1), kind)
        elif kind == "heartbeat":
            feed(HeartbeatMissed(), kind)
        elif kind == "timer":
            if tname in armed:
                tok = armed.pop(tname)
                feed(timer_event(tname, tok), "deadline" if tname == "stop" else kind)
        elif kind == "timer_stale":
            feed(timer_event(tname, 10**9), kind)
        elif kind == "adopt":
            if not alive:
                pid = next(_pids)
                before = m.state
                acts = m.handle(Adopted(pid, now, ready=bool(n & 1)), now)
                check_batch(m, before, acts)
                if m.pid == pid:
                    alive.add(pid)
                for a in acts:
                    if isinstance(a, ArmTimer):
                        armed[a.name] = a.token
                    elif isinstance(a, CancelTimer):
                        armed.pop(a.name, None)
        elif kind == "stray":
            feed(Spawned(next(_pids), now), "stray")
    # The machine's idea of its process is the shell's.
    assert (m.pid is not None) == bool(alive) or m.spawn_pending


# --------------------------------------------------------------------------- hypothesis: simulated world


@dataclass
class Behaviour:
    """How one fake process behaves."""

    spawn_fails: bool = False
    exit_after: float | None = None  # exits on its own after this long
    exit_code: int = 1
    ready_after: float | None = None
    ignores_term: bool = False
    term_delay: float = 0.5
    hang_after: float | None = None  # heartbeats stop


FOREVER = Behaviour()  # used once the script's behaviours are exhausted


@dataclass
class World:
    """A deterministic shell: fake clock, timers, fake processes. Records every signal."""

    cfg: ProgramConfig
    behaviours: list[Behaviour]
    now: float = 0.0
    m: ProcessMachine = None  # type: ignore[assignment]
    timers: dict[str, tuple[float, int]] = field(default_factory=dict)
    queue: list = field(default_factory=list)  # (due, seq, kind, pid, data)
    alive: dict[int, Behaviour] = field(default_factory=dict)
    signals: list[tuple[float, int, int]] = field(default_factory=list)
    spawns: list[float] = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)
    pids: itertools.count = field(default_factory=lambda: itertools.count(100))

    def __post_init__(self) -> None:
        self.m = ProcessMachine(self.cfg)

    def feed(self, ev) -> None:
        before = self.m.state
        acts = self.m.handle(ev, self.now)
        check_batch(self.m, before, acts)
        for a in acts:
            self.apply(a)

    def at(self, delay: float, kind: str, pid: int, data=None) -> None:
        heapq.heappush(self.queue, (self.now + delay, next(self.seq), kind, pid, data))

    def apply(self, a) -> None:
        if isinstance(a, ArmTimer):
            self.timers[a.name] = (self.now + a.seconds, a.token)
        elif isinstance(a, CancelTimer):
            self.timers.pop(a.name, None)
        elif isinstance(a, Spawn):
            assert not self.alive, "double spawn"
            self.spawns.append(self.now)
            b = self.behaviours.pop(0) if self.behaviours else FOREVER
            if b.spawn_fails:
                self.feed(SpawnFailed("scripted"))
                return
            pid = next(self.pids)
            self.alive[pid] = b
            if b.exit_after is not None:
                self.at(b.exit_after, "exit", pid, (b.exit_code, None))
            if b.ready_after is not None:
                self.at(b.ready_after, "ready", pid)
            if b.hang_after is not None:
                self.at(b.hang_after, "hang", pid)
            self.feed(Spawned(pid, self.now))
        elif isinstance(a, SendSignal):
            assert a.pid in self.alive, "signal to a process that is not ours or is gone"
            self.signals.append((self.now, a.pid, a.signal))
            b = self.alive[a.pid]
            if a.signal == SIGKILL:
                self.at(0.0, "exit", a.pid, (None, SIGKILL))
            elif not b.ignores_term:
                self.at(b.term_delay, "exit", a.pid, (None, a.signal))

    def step(self) -> bool:
        """Fire the next timer or process event; False when nothing is pending."""
        cands = []
        if self.queue:
            cands.append((self.queue[0][0], 0))
        for name, (due, _tok) in self.timers.items():
            cands.append((due, 1))
        if not cands:
            return False
        due, which = min(cands)
        self.now = max(self.now, due)
        if which == 0:
            _due, _s, kind, pid, data = heapq.heappop(self.queue)
            if pid not in self.alive:
                return True
            if kind == "exit":
                del self.alive[pid]
                code, sig = data
                self.feed(Exited(code, sig, pid=pid))
            elif kind == "ready":
                self.feed(Ready())
            elif kind == "hang":
                self.feed(HeartbeatMissed())
        else:
            name = min(self.timers, key=lambda k: self.timers[k][0])
            _due, tok = self.timers.pop(name)
            self.feed(timer_event(name, tok))
        return True

    def run_until(self, t: float) -> None:
        for _ in range(5000):
            nxt = [self.queue[0][0]] if self.queue else []
            nxt += [d for d, _ in self.timers.values()]
            if not nxt or min(nxt) > t:
                break
            self.step()
        self.now = max(self.now, t)

    def settle(self) -> None:
        for _ in range(5000):
            if not self.step():
                return
        raise AssertionError("the machine never settled")


behaviours = st.lists(
    st.builds(
        Behaviour,
        spawn_fails=st.booleans(),
        exit_after=st.one_of(st.none(), st.floats(0.1, 20)),
        exit_code=st.sampled_from([0, 1]),
        ready_after=st.one_of(st.none(), st.floats(0.1, 20)),
        ignores_term=st.booleans(),
        term_delay=st.floats(0.0, 10),
        hang_after=st.one_of(st.none(), st.floats(0.5, 30)),
    ),
    max_size=8,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=st.builds(
        ProgramConfig,
        name=st.just("x"),
        startsecs=st.sampled_from([0.0, 1.0, 3.0]),
        startretries=st.integers(0, 3),
        autorestart=st.sampled_from([True, False, "unexpected"]),
        stopwaitsecs=st.sampled_from([1.0, 5.0]),
        ready_required=st.booleans(),
        ready_timeout=st.sampled_from([None, 4.0]),
        backoff_max=st.sampled_from([1.0, 4.0]),
        max_restarts=st.sampled_from([None, 1, 3]),
        restart_window=st.sampled_from([5.0, 60.0]),
    ),
    script=behaviours,
    ops=st.lists(st.tuples(st.floats(0, 60), st.sampled_from(["start", "stop"])), max_size=6),
    final_stop_at=st.floats(0, 80),
)
def test_simulated_world_stop_always_ends(cfg, script, ops, final_stop_at) -> None:
    w = World(cfg, list(script))
    w.feed(Start())
    for t, op in sorted(ops):
        w.run_until(t)
        w.feed(Start() if op == "start" else StopRequested())
    w.run_until(final_stop_at)
    state_at_stop = w.m.state
    spawns_before = len(w.spawns)
    w.feed(StopRequested())
    stop_time = w.now
    w.settle()
    # A stop always ends: nothing alive, no timers, STOPPED (idle states stay as they were).
    assert not w.alive and not w.m.timers and w.m.pid is None
    if state_at_stop in IDLE_STATES:
        assert w.m.state is state_at_stop
    else:
        assert w.m.state is State.STOPPED
    assert len(w.spawns) == spawns_before, "no spawn after a stop"
    # SIGKILL only at the deadline: exactly stopwaitsecs after the stop signal to that pid.
    first_term: dict[int, float] = {}
    for t, pid, sig in w.signals:
        if sig != SIGKILL:
            first_term.setdefault(pid, t)
        else:
            assert pid in first_term, "SIGKILL without a stop signal first"
            assert t - first_term[pid] >= cfg.stopwaitsecs - 1e-9
    for t, pid, sig in w.signals:
        if sig == SIGKILL and t >= stop_time:
            assert w.signals.count((t, pid, sig)) == 1
    # Never more than startretries+1 failed attempts in a row without FATAL.
    assert w.m.failures <= cfg.startretries + 1


def test_simulated_sigkill_exactly_at_deadline() -> None:
    w = World(ProgramConfig("x", startsecs=1, stopwaitsecs=5), [Behaviour(ignores_term=True)])
    w.feed(Start())
    w.run_until(2.0)
    assert w.m.state is State.RUNNING
    w.feed(StopRequested())
    w.settle()
    (t1, pid1, s1), (t2, pid2, s2) = w.signals
    assert (s1, s2) == (SIGTERM, SIGKILL) and pid1 == pid2 and t2 - t1 == pytest.approx(5.0)
    assert w.m.state is State.STOPPED


def test_simulated_crash_loop_backs_off_then_fatal() -> None:
    crash = Behaviour(exit_after=0.2, exit_code=1)
    w = World(ProgramConfig("x", startsecs=1, startretries=3, backoff_max=60), [crash] * 10)
    w.feed(Start())
    w.settle()
    assert w.m.state is State.FATAL
    gaps = [b - a for a, b in zip(w.spawns, w.spawns[1:])]
    assert gaps == pytest.approx([0.2 + 1, 0.2 + 2, 0.2 + 4])
