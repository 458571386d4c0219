"""SIGSTOP a worker at a chosen moment: inside a pass (its ownership word busy) or between passes."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import psutil

from hotplane.schema.port import W_OWNER, owner_busy


def stop_when(pid: int, rows, want_busy: bool, feed: Callable[[], None] | None = None, attempts: int = 400) -> bool:
    """Stop ``pid`` while every one of its queues' ownership words (``rows``: queue-state rows, or
    one row) says busy (or idle); True once stopped so.

    A worker marks its queues one after the other, so "all busy" is inside a pass and "all idle"
    between passes; a stop between two marks is neither. The words are stable only once the
    process is stopped, so: wait for the wanted state, stop, confirm; if it moved in between,
    resume and try again (bounded in count and time).
    """
    rows = [rows] if getattr(rows, "ndim", 2) == 1 else list(rows)

    def state_is_wanted() -> bool:
        return all(owner_busy(int(r[W_OWNER])) == want_busy for r in rows)

    proc = psutil.Process(pid)
    for _ in range(attempts):
        if feed is not None:
            feed()
        deadline = time.monotonic() + 0.5
        while not state_is_wanted() and time.monotonic() < deadline:
            pass
        os.kill(pid, signal.SIGSTOP)
        end = time.monotonic() + 5
        while proc.status() != psutil.STATUS_STOPPED and time.monotonic() < end:
            time.sleep(0.0005)
        if state_is_wanted():
            return True
        os.kill(pid, signal.SIGCONT)
    return False
