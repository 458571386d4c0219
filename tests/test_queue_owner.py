"""Queue ownership: claims, fencing tokens, and a dead owner whose pid was reused."""

import os
import subprocess
import sys

import numpy as np

from hotplane.schema.port import W_OWNER, unpack_owner
from hotplane.shared.queue_owner import QueueBusy, claim, owner_alive, release, still_mine

import psutil
import pytest


def started(p: subprocess.Popen) -> subprocess.Popen:
    """Wait (bounded) until the child has exec'd: before that its cmdline is empty."""
    import time

    deadline = time.monotonic() + 10
    while not psutil.Process(p.pid).cmdline() and time.monotonic() < deadline:
        time.sleep(0.005)
    return p


def words():
    return np.zeros(16, np.uint64)


def test_claim_bumps_generation_and_release_keeps_it():
    w = words()
    t1 = claim(w)
    assert unpack_owner(t1) == (os.getpid(), 1) and still_mine(w, t1)
    assert release(w, t1)
    assert unpack_owner(int(w[W_OWNER])) == (0, 1)
    t2 = claim(w)
    assert unpack_owner(t2)[1] == 2
    assert not still_mine(w, t1), "an old token never matches again"
    assert not release(w, t1)


@pytest.mark.timeout(30)
def test_live_hotplane_owner_refuses_unrelated_pid_does_not():
    w = words()
    # A live process that is not hotplane (a pid reused by something else) does not hold the queue.
    other = started(subprocess.Popen(["sleep", "30"]))
    try:
        assert not owner_alive(other.pid)
        claim(w, pid=other.pid)
        assert unpack_owner(claim(w))[0] == os.getpid()
    finally:
        other.kill()
        other.wait()
    # A live hotplane process of this instance does.
    hp = started(subprocess.Popen([sys.executable, "-c", "import sys,time; time.sleep(30)", "hotplane", "worker", "--file-prefix", "pfx"]))
    try:
        assert owner_alive(hp.pid, "pfx") and not owner_alive(hp.pid, "other")
        claim(w, pid=hp.pid, force=True)
        with pytest.raises(QueueBusy, match=f"live pid {hp.pid}"):
            claim(w, prefix="pfx")
        claim(w, prefix="pfx", force=True)
    finally:
        hp.kill()
        hp.wait()


# ---------------------------------------------------------------------------- the busy bit and the fence

from hotplane.schema.port import OWNER_BUSY, pack_owner  # noqa: E402
from hotplane.shared.queue_owner import (  # noqa: E402
    FENCE_BUSY,
    FENCED,
    NOT_OWNER,
    enter,
    fence,
    hand_back,
    leave,
    owner_word,
    token_of,
)


def dead_pid() -> int:
    """A pid that names no process: a child that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_pass_marks_the_word_busy_and_a_fence_sees_it():
    w = words()
    ow = owner_word(w)
    t = claim(w)
    assert enter(ow, t) and int(w[W_OWNER]) == t | OWNER_BUSY
    assert still_mine(w, t) and token_of(int(w[W_OWNER])) == t
    assert unpack_owner(int(w[W_OWNER])) == unpack_owner(t), "the busy bit is part of neither pid nor generation"
    before = int(w[W_OWNER])
    assert fence(w, os.getpid()) == FENCE_BUSY and int(w[W_OWNER]) == before, "a busy word is left as it is"
    assert leave(ow, t) and int(w[W_OWNER]) == t
    assert fence(w, os.getpid()) == FENCED
    assert unpack_owner(int(w[W_OWNER])) == (os.getpid(), unpack_owner(t)[1] + 1), "fenced: new generation, owner kept"
    assert not enter(ow, t), "a fenced owner can never start another pass"
    assert not still_mine(w, t) and not release(w, t)
    assert fence(w, 12345) == NOT_OWNER
    assert hand_back(w, os.getpid()) and unpack_owner(int(w[W_OWNER])) == (0, unpack_owner(t)[1] + 1)


def test_release_from_inside_a_pass_and_claims_over_busy_words():
    w = words()
    t = claim(w)
    assert enter(owner_word(w), t) and release(w, t)
    assert unpack_owner(int(w[W_OWNER])) == (0, unpack_owner(t)[1])
    # A dead owner that died inside a pass: its word stays busy; a successor takes it anyway.
    gone = dead_pid()
    w[W_OWNER] = pack_owner(gone, 9) | OWNER_BUSY
    t2 = claim(w)
    assert int(w[W_OWNER]) == t2 == pack_owner(os.getpid(), 10)


@pytest.mark.timeout(30)
def test_even_a_forced_claim_leaves_a_live_owner_inside_a_pass_alone():
    w = words()
    hp = started(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "hotplane", "worker", "--file-prefix", "pfx"]))
    try:
        w[W_OWNER] = pack_owner(hp.pid, 4) | OWNER_BUSY
        with pytest.raises(QueueBusy, match="inside a pass"):
            claim(w, force=True)
        w[W_OWNER] = pack_owner(hp.pid, 4)
        assert unpack_owner(claim(w, force=True)) == (os.getpid(), 5), "idle, a forced claim fences it"
    finally:
        hp.kill()
        hp.wait()


# An exhaustive model of the race the busy bit closes. A worker runs passes of
# (guard, write, write, end); the supervisor's fence lands, atomically, between any
# two of its steps, while the worker is stopped there. Then the fence's outcome is
# acted on as supervisor/main.py does (FENCED: free the queue, a successor claims it;
# FENCE_BUSY: SIGKILL the worker, the successor claims a dead owner's queue), and the
# worker, if still alive, resumes. Property: the old worker never writes the queue
# once the successor has claimed it.

PASSES = 3


def _worker_steps():
    for _ in range(PASSES):
        yield "guard"
        yield "write"
        yield "write"
        yield "end"


def _run_model(stop_at: int, protocol: str) -> list[str]:
    """Returns the violations (empty when the old worker never wrote after the successor's claim)."""
    old = dead_pid()  # the hung worker's pid: dead by the time its successor checks (killed or gone)
    w = words()
    ow = owner_word(w)
    tok = claim(w, pid=old)
    steps = list(_worker_steps())
    state = {"inside": False, "exited": False}
    successor_owns = False
    violations: list[str] = []

    def step(s: str) -> None:
        if state["exited"]:
            return
        if s == "guard":
            ok = enter(ow, tok) if protocol == "cas" else still_mine(w, tok)
            state["inside"] = ok
            state["exited"] = not ok
        elif s == "write":
            if state["inside"] and successor_owns:
                violations.append(f"fence before step {stop_at}: old worker wrote after the successor's claim")
        elif s == "end":
            if protocol == "cas":
                leave(ow, tok)
            state["inside"] = False

    for s in steps[:stop_at]:
        step(s)
    # The worker is stopped here; the supervisor acts.
    if protocol == "cas":
        outcome = fence(w, old)
        if outcome == FENCED:
            assert hand_back(w, old)
        else:
            assert outcome == FENCE_BUSY
            state["exited"] = True  # SIGKILLed while stopped: it never runs again
    else:
        _, gen = unpack_owner(int(w[W_OWNER]))
        w[W_OWNER] = pack_owner(0, (gen + 1) & 0xFFFFFFFF)  # the generation-only fence
    claim(w)  # the successor
    successor_owns = True
    for s in steps[stop_at:]:
        step(s)
    return violations


@pytest.mark.parametrize("stop_at", range(4 * PASSES + 1))
def test_no_stop_point_lets_a_fenced_worker_write(stop_at):
    assert _run_model(stop_at, "cas") == []


def test_the_model_finds_the_race_in_a_check_then_write_fence():
    """The same model over the generation-only protocol (check the word, then write): it must fail."""
    bad = [i for i in range(4 * PASSES + 1) if _run_model(i, "check")]
    assert bad, "the model cannot tell a racy protocol from a safe one"
    assert all(steps % 4 in (1, 2) for steps in bad), bad  # stopped between the check and a write
