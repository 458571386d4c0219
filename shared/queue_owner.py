"""Queue ownership (DESIGN invariant 1): one poller per queue, fenced by a generation.

The ownership word in the queue-state record packs (owner pid, generation).
A claim writes a new word with the generation bumped; every burst the owner
re-reads the word and stops if it is no longer its own, so a stale or paused
worker (SIGSTOPped, then resumed after its replacement took over) can never
poll the queue again. numpy has no compare-and-swap, so claims must not race:
a queue is claimed only by the process the supervisor (or the drain-and-swap
protocol) designated, after the previous owner released it or was found dead.
"""

from __future__ import annotations

import os

import numpy as np
import psutil

from hotplane.schema.port import W_OWNER, pack_owner, unpack_owner


class QueueBusy(Exception):
    """The queue is owned by a live process that did not release it."""


def owner_of(words: np.ndarray) -> tuple[int, int]:
    """(pid, generation) of a queue's owner; pid 0 means unowned."""
    return unpack_owner(int(words[W_OWNER]))


def owner_alive(pid: int, prefix: str | None = None) -> bool:
    """Is ``pid`` a live hotplane process (of instance ``prefix``, when given)?

    A dead owner's pid may since belong to an unrelated process: only a live
    process whose command line is a hotplane one of this instance counts.
    """
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    if not cmd:
        return True  # between fork and exec: cannot tell yet, so do not take its queue
    if "hotplane" not in cmd:
        return False
    return prefix is None or prefix in cmd


def claim(words: np.ndarray, *, force: bool = False, pid: int | None = None, prefix: str | None = None) -> int:
    """Take a queue; returns this owner's token (the packed word).

    Refuses a queue whose owner is a live hotplane process other than us, unless
    ``force`` (the designated successor of a hung, fenced owner).
    """
    pid = os.getpid() if pid is None else pid
    old_pid, gen = owner_of(words)
    if old_pid and old_pid != pid and not force and owner_alive(old_pid, prefix):
        raise QueueBusy(f"queue is owned by live pid {old_pid} (generation {gen})")
    token = pack_owner(pid, (gen + 1) & 0xFFFFFFFF)
    words[W_OWNER] = token
    return token


def still_mine(words: np.ndarray, token: int) -> bool:
    """One load per burst: has nobody taken the queue from us?"""
    return int(words[W_OWNER]) == token


def release(words: np.ndarray, token: int) -> bool:
    """Give the queue up (keeping the generation); False if it was no longer ours."""
    if int(words[W_OWNER]) != token:
        return False
    _, gen = unpack_owner(token)
    words[W_OWNER] = pack_owner(0, gen)
    return True
