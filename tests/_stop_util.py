"""SIGSTOP a worker at a chosen moment: inside a pass (its ownership word busy) or between passes."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import psutil

from hotplane.schema.port import W_OWNER, owner_busy


def stop_when(pid: int, words, want_busy: bool, feed: Callable[[], None] | None = None, attempts: int = 400) -> bool:
    """Stop ``pid`` while ``words`` (its queue-state row) says busy (or idle); True once stopped so.

    The word is stable only once the process is stopped, so: wait for the wanted state, stop,
    confirm; if it moved in between, resume and try again (bounded in count and time).
    """
    proc = psutil.Process(pid)
    for _ in range(attempts):
        if feed is not None:
            feed()
        deadline = time.monotonic() + 0.5
        while owner_busy(int(words[W_OWNER])) != want_busy and time.monotonic() < deadline:
            pass
        os.kill(pid, signal.SIGSTOP)
        end = time.monotonic() + 5
        while proc.status() != psutil.STATUS_STOPPED and time.monotonic() < end:
            time.sleep(0.0005)
        if owner_busy(int(words[W_OWNER])) == want_busy:
            return True
        os.kill(pid, signal.SIGCONT)
    return False
