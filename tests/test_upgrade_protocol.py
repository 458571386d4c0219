"""The drain-and-swap protocol machine: every (state, event), scripted failures, and random
event sequences with crash injection against a simulated world of processes and ownership words."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotplane.supervisor import upgrade_protocol as up
from hotplane.supervisor.upgrade_protocol import (
    Begin,
    CandidateReport,
    CandidateStarted,
    ClaimQueue,
    Done,
    KillProcess,
    Phase,
    ReleaseQueue,
    RestartOld,
    StartCandidate,
    UnitSpec,
    UpgradeConfig,
    UpgradeMachine,
)

STEPS = ["attached", "validated", "migrated", "warm", "ready"]


def specs(n_workers: int = 2) -> list[UnitSpec]:
    out = [UnitSpec(f"worker-{i}", "worker", 100 + i, (f"inside/{i}", f"outside/{i}")) for i in range(n_workers)]
    out.append(UnitSpec("stats", "stats", 200))
    return out


# --------------------------------------------------------------------------- a simulated world


class World:
    """Processes, ownership words and messages in flight, driven by the machine's actions.

    SIGKILL takes effect at once (the exit *report* comes later, as an event);
    a message to a dead process is lost. The world checks the safety rules the
    protocol must keep: never two live processes armed for / holding one word,
    never a forced claim while another live process may still claim.
    """

    def __init__(self, m: UpgradeMachine, *, migrate: bool = False) -> None:
        self.m = m
        self.migrate = migrate
        self.alive: dict[tuple[str, str], bool] = {}
        self.pid: dict[tuple[str, str], int] = {}
        self.holder: dict[tuple[str, str], str | None] = {}
        self.gen: dict[tuple[str, str], int] = {}
        self.armed: dict[tuple[str, str], set] = {}
        self.pending: list = []  # events in flight
        self.timers: dict[str, int] = {}
        self.done: list[Done] = []
        self.next_pid = 1000
        for u in m.units:
            self.alive[(u.name, "old")] = True
            self.pid[(u.name, "old")] = u.old_pid
            for q in u.queues:
                self.holder[(u.name, q)] = "old"
                self.gen[(u.name, q)] = 1
                self.armed[(u.name, q)] = set()

    # -- the machine's actions
    def run(self, actions) -> None:
        for a in actions:
            self.apply(a)
        self.check()

    def apply(self, a) -> None:
        if isinstance(a, StartCandidate):
            self.next_pid += 1
            self.pending.append(CandidateStarted(a.unit, self.next_pid))
        elif isinstance(a, ClaimQueue):
            self._claim(a)
        elif isinstance(a, ReleaseQueue):
            key = (a.unit, a.role)
            if not self.alive.get(key) or self.pid.get(key) != a.pid:
                return  # message lost: the process is dead
            w = (a.unit, a.queue)
            self.armed[w].discard(a.role)
            if self.holder[w] == a.role:
                self.holder[w] = None
            self.pending.append(up.QueueReleased(a.unit, a.queue, a.role))
            self._spin(w)
        elif isinstance(a, KillProcess):
            key = (a.unit, a.role)
            if a.pid is not None and self.pid.get(key) == a.pid and self.alive.get(key):
                self._die(key)
                self.pending.append(up.ProcessExited(a.unit, a.role, a.pid, "SIGKILL"))
        elif isinstance(a, RestartOld):
            key = (a.unit, "old")
            assert not self.alive.get(key), "RestartOld while the old process lives"
            self.next_pid += 1
            self.pid[key] = self.next_pid
            self.alive[key] = True
            for q in self.m.unit(a.unit).queues:
                w = (a.unit, q)
                self._assert_no_other_live(w, "old")
                self.holder[w] = "old"
                self.gen[w] += 1
        elif isinstance(a, up.ArmTimer):
            self.timers[a.name] = a.token
        elif isinstance(a, up.CancelTimer):
            self.timers.pop(a.name, None)
        elif isinstance(a, Done):
            self.done.append(a)

    def _assert_no_other_live(self, w, role: str) -> None:
        other = "new" if role == "old" else "old"
        okey = (w[0], other)
        if self.alive.get(okey):
            assert self.holder[w] != other, f"{w}: {role} claims while live {other} holds the word"
            assert other not in self.armed[w], f"{w}: {role} claims while live {other} is armed to claim"

    def _claim(self, a: ClaimQueue) -> None:
        key = (a.unit, a.role)
        if not self.alive.get(key) or self.pid.get(key) != a.pid:
            return
        w = (a.unit, a.queue)
        if a.force:
            self._assert_no_other_live(w, a.role)
            self.holder[w] = a.role
            self.gen[w] += 1
            self.armed[w].discard(a.role)
            self.pending.append(up.QueueClaimed(a.unit, a.queue, a.role))
            return
        if self.holder[w] == a.role:
            self.pending.append(up.QueueClaimed(a.unit, a.queue, a.role))
            return
        self.armed[w].add(a.role)
        live_armed = [r for r in self.armed[w] if self.alive.get((w[0], r))]
        assert len(live_armed) <= 1, f"{w}: both processes armed"
        self._spin(w)

    def _spin(self, w) -> None:
        """An armed live process claims the word as soon as it reads unowned."""
        if self.holder[w] is not None and self.alive.get((w[0], self.holder[w])):
            return
        if self.holder[w] is not None:
            return  # a dead holder is not "unowned": only a forced claim takes it
        for r in list(self.armed[w]):
            if self.alive.get((w[0], r)):
                self.holder[w] = r
                self.gen[w] += 1
                self.armed[w].discard(r)
                self.pending.append(up.QueueClaimed(w[0], w[1], r))
                return

    def _die(self, key) -> None:
        self.alive[key] = False
        for w, roles in self.armed.items():
            if w[0] == key[0]:
                roles.discard(key[1])

    def crash(self, unit: str, role: str) -> bool:
        key = (unit, role)
        if not self.alive.get(key):
            return False
        self._die(key)
        self.pending.append(up.ProcessExited(unit, role, self.pid[key], "crashed"))
        return True

    def observe(self) -> up.Resumed:
        """What a restarted supervisor sees: which recorded processes live, who holds each word."""
        alive = {u.name: {"old": bool(self.alive.get((u.name, "old"))), "new": bool(self.alive.get((u.name, "new"))) and self.pid.get((u.name, "new")) == u.cand_pid} for u in self.m.units}
        owners = {u.name: {q: self.holder[(u.name, q)] for q in u.queues} for u in self.m.units}
        return up.Resumed(alive, owners)

    # -- invariants at every point
    def check(self) -> None:
        for u in self.m.units:
            for q in u.queues:
                assert self.m.designated_owner(u.name, q) in ("old", "new")
        assert len(self.done) <= 1, "Done twice"

    # -- the candidate's autonomous reports
    def candidate_reports(self, unit: str) -> list:
        u = self.m.unit(unit)
        if not self.alive.get((unit, "new")) or u.cand_pid != self.pid.get((unit, "new")):
            return []
        nxt = {up.Step.SPAWNED: "attached", up.Step.ATTACHED: "validated", up.Step.VALIDATED: "migrated" if u.migrate else "warm", up.Step.MIGRATED: "warm", up.Step.WARM: "ready"}.get(u.step)
        if nxt is None:
            return []
        detail = {"zones": {"sessions.0": "needs migration" if self.migrate else "compatible", "counters": "compatible"}} if nxt == "validated" else {}
        return [CandidateReport(unit, nxt, detail)]

    def deliver(self, ev, now: float) -> None:
        u = self.m.unit(getattr(ev, "unit", "") or "")
        if isinstance(ev, CandidateStarted) and u is not None and u.step is up.Step.STARTING and self.m.phase is Phase.PREPARING:
            self.pid[(ev.unit, "new")] = ev.pid
            self.alive[(ev.unit, "new")] = True
        acts = self.m.handle(ev, now)
        if isinstance(ev, CandidateStarted) and self.pid.get((ev.unit, "new")) != ev.pid:
            # A candidate the machine did not ask for (or no longer wants) must be killed.
            assert any(isinstance(a, KillProcess) and a.pid == ev.pid for a in acts) or u is None
        self.run(acts)

    def settle(self, now: float, max_rounds: int = 2000) -> float:
        """No more failures: deliver everything, let candidates report, fire timers, until DONE."""
        for _ in range(max_rounds):
            if self.m.phase in (Phase.DONE, Phase.IDLE) and not self.pending:
                return now
            now += 0.001
            if self.pending:
                self.deliver(self.pending.pop(0), now)
                continue
            reps = [r for u in self.m.units for r in self.candidate_reports(u.name)]
            if reps:
                self.deliver(reps[0], now)
                continue
            if self.m.phase is Phase.SWAPPED:
                self.deliver(up.CommitRequested(), now)
                continue
            if self.timers:
                name = sorted(self.timers)[0]
                tok = self.timers.pop(name)
                now += 100.0
                self.deliver(up.TimerFired(name, tok), now)
                continue
            break
        raise AssertionError(f"did not settle: phase {self.m.phase}, pending {self.pending}, timers {self.timers}")

    def final_check(self) -> None:
        if self.m.phase is Phase.IDLE:  # never begun: nothing may have moved
            assert not self.done and all(h == "old" for h in self.holder.values())
            return
        assert self.m.phase is Phase.DONE
        assert len(self.done) == 1
        res = self.done[0].result
        for u in self.m.units:
            for q in u.queues:
                w = (u.name, q)
                if res in ("aborted", "rolled back", "dry run"):
                    assert self.m.designated_owner(u.name, q) == "old", (w, res)
                    # Held by the old version's process (if that one has died since, plain process
                    # supervision restarts the old version, which claims it over the dead owner).
                    assert self.holder[w] == "old", (w, res, self.holder[w])
                    assert not self.alive.get((u.name, "new")), f"{w}: candidate left running after {res}"
                else:
                    assert res == "committed"
                    assert self.m.designated_owner(u.name, q) == "new", w
                    assert self.holder[w] == "new", (w, self.holder[w])


def new_world(n_workers=2, *, migrate=False, **cfg) -> World:
    cfg.setdefault("canary", 1)
    m = UpgradeMachine.new(UpgradeConfig("/opt/hotplane-b", **cfg), specs(n_workers))
    return World(m, migrate=migrate)


# --------------------------------------------------------------------------- scripted runs


def test_happy_path_commits_and_new_owns_everything():
    w = new_world(migrate=True)
    w.run(w.m.handle(Begin(), 0.0))
    now = w.settle(0.0)
    w.final_check()
    assert w.done[0].result == "committed"
    lines = [h[1] for h in w.m.history]
    assert any("canary" in l for l in lines) and any("needs migration" in l for l in lines)


def test_dry_run_changes_nothing():
    w = new_world(dry_run=True)
    w.run(w.m.handle(Begin(), 0.0))
    w.settle(0.0)
    assert w.done[0].result == "dry run"
    w.final_check()
    assert all(g == 1 for g in w.gen.values()), "a dry run touched an ownership word"


def test_dry_run_candidates_leaving_after_validating_is_not_a_failure():
    """A dry-run candidate exits once it reported its zones, possibly before another unit's did."""
    w = new_world(canary=0, dry_run=True)
    now = 0.0
    w.run(w.m.handle(Begin(), now))
    for _ in range(3):  # every CandidateStarted
        w.deliver(w.pending.pop(0), now)
    w.deliver(CandidateReport("worker-0", "attached"), now)
    w.deliver(CandidateReport("worker-0", "validated", {"zones": {"counters": "compatible"}}), now)
    assert w.crash("worker-0", "new")  # it leaves, as a dry run's candidate does
    w.deliver(w.pending.pop(), now)
    assert w.m.phase is Phase.PREPARING, w.m.reason
    w.settle(now + 1)
    assert w.done[0].result == "dry run", w.done
    w.final_check()


def test_refused_zone_aborts_before_any_swap():
    w = new_world()
    w.run(w.m.handle(Begin(), 0.0))
    for ev in list(w.pending):
        w.deliver(ev, 0.1)
    w.pending.clear()
    w.run(w.m.handle(CandidateReport("worker-0", "attached"), 0.2))
    w.run(w.m.handle(CandidateReport("worker-0", "validated", {"zones": {"sessions.0": "refused: layout hash mismatch"}}), 0.3))
    assert w.m.phase is Phase.DONE and w.done[0].result == "aborted"
    w.settle(1.0)
    w.final_check()


def test_only_one_upgrade_at_a_time():
    w = new_world()
    w.run(w.m.handle(Begin(), 0.0))
    acts = w.m.handle(Begin(), 0.1)
    assert not any(isinstance(a, StartCandidate) for a in acts)
    assert w.m.busy


def test_stale_timer_token_is_ignored():
    w = new_world()
    w.run(w.m.handle(Begin(), 0.0))
    tok = w.timers["u:worker-0"]
    acts = w.m.handle(up.TimerFired("u:worker-0", tok + 999), 1.0)
    assert w.m.phase is Phase.PREPARING and not any(isinstance(a, KillProcess) for a in acts)
    w.run(w.m.handle(up.TimerFired("u:worker-0", tok), 1.0))
    assert w.m.phase is Phase.DONE and w.done[0].result == "aborted"


def _drive_until(w: World, pred, now=0.0, limit=500) -> float:
    w.run(w.m.handle(Begin(), now))
    for _ in range(limit):
        if pred(w):
            return now
        now += 0.001
        if w.pending:
            w.deliver(w.pending.pop(0), now)
            continue
        reps = [r for u in w.m.units for r in w.candidate_reports(u.name)]
        if reps:
            w.deliver(reps[0], now)
            continue
        if w.timers and w.m.phase is Phase.CANARY:
            w.deliver(up.TimerFired("canary", w.timers.pop("canary")), now)
            continue
        break
    assert pred(w), f"never reached: {w.m.phase}"
    return now


def test_canary_unhealthy_rolls_back_the_canary():
    w = new_world()
    now = _drive_until(w, lambda w: w.m.phase is Phase.CANARY)
    assert w.holder[("worker-0", "inside/0")] == "new" and w.holder[("worker-1", "inside/1")] == "old"
    w.run(w.m.handle(up.HealthSample("worker-0", 5, 0, 0.01), now))
    w.run(w.m.handle(up.HealthSample("worker-0", 9, 0, 0.01), now + 0.1))
    assert w.m.phase is Phase.REVERTING
    w.settle(now + 1)
    assert w.done[0].result == "rolled back" and "unhealthy" in w.done[0].reason
    w.final_check()


def test_rollback_after_commit_while_parked_restores_old_owners():
    w = new_world(canary=0, auto_commit=False)
    now = _drive_until(w, lambda w: w.m.phase is Phase.SWAPPED)
    w.run(w.m.handle(up.CommitRequested(), now))
    assert w.m.phase is Phase.COMMITTED
    w.run(w.m.handle(up.RollbackRequested(), now + 1))
    w.settle(now + 2)
    assert w.done[0].result == "rolled back"
    w.final_check()


def test_commit_then_park_expiry_kills_old_processes():
    w = new_world(canary=0, auto_commit=False)
    now = _drive_until(w, lambda w: w.m.phase is Phase.SWAPPED)
    w.run(w.m.handle(up.CommitRequested(), now))
    acts = w.m.handle(up.TimerFired("park", w.timers.pop("park")), now + 60)
    w.run(acts)
    assert sum(isinstance(a, KillProcess) and a.role == "old" for a in acts) == 3
    w.settle(now + 61)
    w.final_check()


@pytest.mark.parametrize("who", ["old", "new"])
@pytest.mark.parametrize("at", ["STARTING", "SPAWNED", "ATTACHED", "VALIDATED", "MIGRATED", "WARM", "READY", "SWAPPING", "SWAPPED", "CANARY"])
def test_crash_at_each_step_ends_with_old_in_charge(who, at):
    """A crash of the candidate or the old process of worker-0 at each step, before commit."""
    w = new_world(migrate=True)
    if at == "CANARY":
        pred = lambda w: w.m.phase is Phase.CANARY
    else:
        # SWAPPING: mid-swap, some queue still waiting for the candidate's claim.
        pred = lambda w: w.m.unit("worker-0").step.value == at and (at != "SWAPPING" or any(st is up.Stage.SWAP for st in w.m.unit("worker-0").stages.values()))
    now = _drive_until(w, pred)
    if who == "new" and at == "STARTING":
        # No candidate yet as far as the machine knows: its exit report overtakes CandidateStarted.
        i = next(i for i, ev in enumerate(w.pending) if isinstance(ev, CandidateStarted) and ev.unit == "worker-0")
        started = w.pending.pop(i)
        w.deliver(up.ProcessExited("worker-0", "new", started.pid, "exited at once"), now)
        assert w.m.phase is Phase.PREPARING, "an exit before the start report must not fail the upgrade yet"
        w.pid[("worker-0", "new")] = started.pid  # it existed, and is dead (never alive in the world)
        w.run(w.m.handle(started, now))
        assert w.m.phase in (Phase.REVERTING, Phase.DONE) and "before it was reported started" in w.m.reason, \
            "the start report of a dead candidate fails the upgrade at once, not at a deadline"
    else:
        assert w.crash("worker-0", who)
    w.settle(now + 1)
    w.final_check()
    if who == "new" or w.m.unit("worker-0").step is not up.Step.SWAPPED:
        assert w.done[0].result in ("aborted", "rolled back")


def test_swap_deadline_with_lost_ack_kills_candidate_before_old_reclaims():
    w = new_world(canary=0)
    now = _drive_until(w, lambda w: w.m.unit("worker-0").step is up.Step.SWAPPING)
    # The old worker's release and the candidate's claim happen, but every report is lost.
    w.pending.clear()
    w.run(w.m.handle(up.TimerFired("u:worker-0", w.timers.pop("u:worker-0")), now + 5))
    assert w.m.phase is Phase.REVERTING
    w.settle(now + 6)
    w.final_check()


def test_supervisor_restart_mid_swap_rolls_back():
    w = new_world(canary=0)
    now = _drive_until(w, lambda w: w.m.unit("worker-1").step is up.Step.SWAPPING)
    state = json.loads(json.dumps(w.m.to_dict()))
    w.m = UpgradeMachine.from_dict(state)
    w.pending.clear()  # reports to the dead supervisor are lost
    alive = {u.name: {"old": w.alive.get((u.name, "old"), False), "new": w.alive.get((u.name, "new"), False)} for u in w.m.units}
    owners = {u.name: {q: w.holder[(u.name, q)] for q in u.queues} for u in w.m.units}
    w.timers.clear()
    w.run(w.m.handle(w.observe(), now + 1))
    w.settle(now + 2)
    assert w.done[0].result == "rolled back"
    w.final_check()


def test_serialization_round_trip_is_exact():
    w = new_world(migrate=True)
    _drive_until(w, lambda w: w.m.phase is Phase.CANARY)
    d = w.m.to_dict()
    assert UpgradeMachine.from_dict(json.loads(json.dumps(d))).to_dict() == d


# --------------------------------------------------------------------------- every (state, event)


def _events_for(w: World) -> list:
    names = [u.name for u in w.m.units]
    n, u0 = names[0], w.m.units[0]
    q = u0.queues[0]
    evs = [Begin(), CandidateStarted(n, 4242), up.CandidateStartFailed(n, "exec failed")]
    evs += [CandidateReport(n, s, {"zones": {"z": "compatible"}}) for s in STEPS] + [CandidateReport(n, "bogus")]
    evs += [up.QueueReleased(n, q, r) for r in ("old", "new")] + [up.QueueClaimed(n, q, r) for r in ("old", "new")]
    evs += [up.QueueClaimed(n, "nope", "new")]
    evs += [up.ProcessExited(n, r, None, "x") for r in ("old", "new")] + [up.IpcLost(n, r) for r in ("old", "new")]
    evs += [up.HealthSample(n, 0, 0, 0.0), up.HealthSample(n, 100, 100, 100.0)]
    evs += [up.TimerFired(t, tok) for t, tok in w.timers.items()] + [up.TimerFired("u:" + n, None), up.TimerFired("canary", None), up.TimerFired("park", None), up.TimerFired("nope", None)]
    evs += [up.CommitRequested(), up.RollbackRequested(), up.AbortRequested(), up.Resumed({}, {}), CandidateStarted("ghost", 1)]
    return evs


CHECKPOINTS = {
    "IDLE": lambda w: w.m.phase is Phase.IDLE,
    "PREPARING/STARTING": lambda w: w.m.unit("worker-0").step is up.Step.STARTING,
    "PREPARING/ATTACHED": lambda w: w.m.unit("worker-0").step is up.Step.ATTACHED,
    "PREPARING/MIGRATED": lambda w: w.m.unit("worker-0").step is up.Step.MIGRATED,
    "PREPARING/READY": lambda w: w.m.unit("worker-0").step is up.Step.READY,
    "SWAPPING": lambda w: w.m.unit("worker-0").step is up.Step.SWAPPING,
    "CANARY": lambda w: w.m.phase is Phase.CANARY,
    "SWAPPING-rest": lambda w: w.m.unit("worker-1").step is up.Step.SWAPPING,
    "SWAPPED": lambda w: w.m.phase is Phase.SWAPPED,
}


@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS) + ["COMMITTED", "REVERTING", "DONE"])
def test_every_event_in_every_state(checkpoint):
    """Table: each event applied to a copy of the machine at each checkpoint; never raises,
    keeps exactly one designated owner per queue, stays serializable, and then still settles safely."""
    base = new_world(migrate=True, auto_commit=False)
    if checkpoint == "IDLE":
        pass
    elif checkpoint in CHECKPOINTS:
        _drive_until(base, CHECKPOINTS[checkpoint])
    else:
        _drive_until(base, CHECKPOINTS["SWAPPED"])
        base.run(base.m.handle(up.CommitRequested(), 1.0))
        if checkpoint == "REVERTING":
            base.run(base.m.handle(up.RollbackRequested(), 1.1))
            assert base.m.phase is Phase.REVERTING
        elif checkpoint == "DONE":
            base.settle(2.0)
    state = base.m.to_dict()
    for ev in _events_for(base):
        w = new_world(migrate=True, auto_commit=False)
        w.m = UpgradeMachine.from_dict(json.loads(json.dumps(state)))
        w.alive, w.pid, w.holder, w.gen = dict(base.alive), dict(base.pid), dict(base.holder), dict(base.gen)
        w.armed = {k: set(v) for k, v in base.armed.items()}
        w.timers, w.pending, w.done = dict(base.timers), list(base.pending), list(base.done)
        if isinstance(ev, up.ProcessExited):
            if not w.crash(ev.unit, ev.role):
                continue
            ev = w.pending.pop()
        if isinstance(ev, up.Resumed):
            ev = w.observe()
        w.deliver(ev, 5.0)
        assert UpgradeMachine.from_dict(json.loads(json.dumps(w.m.to_dict()))).to_dict() == w.m.to_dict()
        w.settle(6.0)
        w.final_check()


# --------------------------------------------------------------------------- random sequences


FAILURES = ["crash_new", "crash_old", "ipc_new", "ipc_old", "timer", "rollback", "abort", "commit", "restart", "unhealthy", "deliver", "report"]
REACHED: dict[str, int] = {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_ops=st.integers(5, 200),
    p_fail=st.sampled_from([0.0, 0.01, 0.03, 0.08, 0.2]),
    canary=st.integers(0, 2),
    migrate=st.booleans(),
)
def test_random_sequences_with_crash_injection(seed, n_ops, p_fail, canary, migrate):
    rnd = random.Random(seed)
    # Mostly progress (pending reports in any order, candidates' next steps), failures at rate p_fail.
    script = [rnd.choice(FAILURES) if rnd.random() < p_fail else "step" for _ in range(n_ops)]
    w = new_world(2, migrate=migrate, canary=canary, auto_commit=rnd.random() < 0.5)
    now = 0.0
    w.run(w.m.handle(Begin(), now))
    for op in script:
        now += 0.01
        units = [u.name for u in w.m.units]
        un = rnd.choice(units)
        REACHED[w.m.phase.value] = REACHED.get(w.m.phase.value, 0) + 1
        if op == "step":
            reps = [r for u in units for r in w.candidate_reports(u)]
            if w.pending and (not reps or rnd.random() < 0.7):
                w.deliver(w.pending.pop(rnd.randrange(len(w.pending))), now)
            elif reps:
                w.deliver(rnd.choice(reps), now)
            elif w.m.phase is Phase.CANARY and "canary" in w.timers and rnd.random() < 0.3:
                w.deliver(up.TimerFired("canary", w.timers.pop("canary")), now)
        elif op == "deliver" and w.pending:
            w.deliver(w.pending.pop(rnd.randrange(len(w.pending))), now)  # any order
        elif op == "report":
            reps = [r for u in units for r in w.candidate_reports(u)]
            if reps:
                w.deliver(rnd.choice(reps), now)
        elif op == "crash_new":
            w.crash(un, "new")
        elif op == "crash_old":
            w.crash(un, "old")
        elif op == "ipc_new":
            w.deliver(up.IpcLost(un, "new"), now)
        elif op == "ipc_old":
            w.deliver(up.IpcLost(un, "old"), now)
        elif op == "timer" and w.timers:
            name = rnd.choice(sorted(w.timers))
            now += 60
            w.deliver(up.TimerFired(name, w.timers.pop(name)), now)
        elif op == "rollback":
            w.deliver(up.RollbackRequested(), now)
        elif op == "abort":
            w.deliver(up.AbortRequested(), now)
        elif op == "commit":
            w.deliver(up.CommitRequested(), now)
        elif op == "unhealthy":
            w.deliver(up.HealthSample(un, rnd.randrange(3), 0, rnd.choice([0.0, 5.0])), now)
        elif op == "restart":
            # Supervisor restart: state through JSON, in-flight reports lost, world observed.
            w.m = UpgradeMachine.from_dict(json.loads(json.dumps(w.m.to_dict())))
            w.pending = [e for e in w.pending if isinstance(e, up.ProcessExited)]
            w.timers.clear()
            w.run(w.m.handle(w.observe(), now))
    w.settle(now)
    w.final_check()


def test_random_sequences_reached_every_phase():
    """The random test above is only as good as the states it reached (runs after it in file order)."""
    if not REACHED:
        pytest.skip("run together with test_random_sequences_with_crash_injection")
    for ph in ("PREPARING", "SWAPPING", "CANARY", "SWAPPED", "COMMITTED", "REVERTING", "DONE"):
        assert REACHED.get(ph, 0) > 0, (ph, REACHED)
    print("phases reached by the random sequences:", REACHED)


def test_a_timer_fired_by_hand_never_fires_again_into_a_later_upgrade() -> None:
    """``upgrade commit`` fires the park timer by hand; the loop's handle for it must be cancelled.
    Every upgrade's machine numbers its timers from 1, so a leftover handle of an earlier upgrade
    carries a token the next machine accepts: it ended that upgrade's park at once (a rollback
    then found nothing to roll back)."""
    import asyncio
    from types import SimpleNamespace

    from hotplane.supervisor import upgrade_protocol as uproto
    from hotplane.supervisor.upgrade import UpgradeShell

    async def scenario() -> list:
        fired: list = []
        shell = UpgradeShell(SimpleNamespace(loop=asyncio.get_running_loop(), say=lambda *a, **k: None))
        shell.feed = fired.append  # the machine's input: what the shell's timers deliver
        shell._do(uproto.ArmTimer("park", 0.05, 1))
        shell._timer("park", 1)  # commit_now: the park ends now
        await asyncio.sleep(0.2)  # past the original deadline
        return fired

    fired = asyncio.run(scenario())
    assert [(e.name, e.token) for e in fired] == [("park", 1)], fired
