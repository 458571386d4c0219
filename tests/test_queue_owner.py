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
