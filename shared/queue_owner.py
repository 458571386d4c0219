"""Queue ownership (DESIGN invariant 1): one poller per queue, fenced by a generation.

The ownership word in the queue-state record packs (busy, owner pid,
generation); see ``schema/port.py``. Every change to it is a compare-and-swap
(``shared/atomic.py``), because three parties write it: the owner, a
successor claiming the queue, and the supervisor fencing a hung owner.

Why a busy bit and not only a generation: checking "is the word still mine?"
and then writing the queue is a check-then-act. A worker SIGSTOPped between
the two, fenced and replaced while stopped, and resumed later would finish
its pass on a queue that is no longer its own (transmit into slots its
successor filled, hand back RX slots its successor has not read). No check
can close that window. So the owner marks the word busy for the whole pass,
by CAS from its token; the mark fails if the word changed, so a fenced owner
never starts another pass. And the fence, also by CAS, sees atomically
whether the owner is inside one:

* owner idle (busy clear): the fence bumps the generation; the owner's next
  :func:`enter` fails and it leaves without touching the queue. A successor
  may take the queue at once.
* owner busy: it may be between any two stores of its pass, and no word can
  stop a pass already running. The fence refuses (:data:`FENCE_BUSY`); the
  supervisor must kill the owner (SIGKILL reaches a stopped process too) and
  hand the queue on as a dead owner's, whose cursors the successor repairs
  (``burst.reconcile``).

Claims are made only by the process the supervisor (or the drain-and-swap
protocol) designated, after the previous owner released the queue, was
fenced, or was found dead.
"""

from __future__ import annotations

import os

import numpy as np
import psutil

from hotplane.schema.port import OWNER_BUSY, W_OWNER, pack_owner, unpack_owner
from hotplane.shared.atomic import AtomicWord

#: fence() outcomes
FENCED = "fenced"  #: the generation was bumped while the owner was idle: it can never pass again
FENCE_BUSY = "busy"  #: the owner is inside a pass: kill it before anyone takes the queue
NOT_OWNER = "not-owner"  #: the word names another owner (or none): nothing to fence


class QueueBusy(Exception):
    """The queue is owned by a live process that did not release it."""


def owner_word(words: np.ndarray) -> AtomicWord:
    """The ownership word of a queue-state record (``words``: its 16 u64 words)."""
    return AtomicWord(words, W_OWNER)


def _word(w: np.ndarray | AtomicWord) -> AtomicWord:
    return w if isinstance(w, AtomicWord) else owner_word(w)


def token_of(word: int) -> int:
    """The owner's token in a word: the word without its busy bit."""
    return int(word) & ~OWNER_BUSY


def owner_of(words: np.ndarray | AtomicWord) -> tuple[int, int]:
    """(pid, generation) of a queue's owner; pid 0 means unowned."""
    return unpack_owner(_word(words).load())


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


def claim(words: np.ndarray | AtomicWord, *, force: bool = False, pid: int | None = None, prefix: str | None = None) -> int:
    """Take a queue; returns this owner's token (the packed word, busy clear).

    Refuses a queue whose owner is a live hotplane process other than us, unless
    ``force`` (the designated successor of a hung owner already fenced or known
    to be dying). Even forced, a live owner inside a pass keeps its queue: it
    must be killed first.
    """
    ow = _word(words)
    pid = os.getpid() if pid is None else pid
    for _ in range(64):  # a CAS only fails when the word moved; the owner moves it twice per pass at most
        old = ow.load()
        old_pid, gen = unpack_owner(old)
        if old_pid and old_pid != pid and (not force or old & OWNER_BUSY) and owner_alive(old_pid, prefix):
            state = "inside a pass" if old & OWNER_BUSY else f"generation {gen}"
            raise QueueBusy(f"queue is owned by live pid {old_pid} ({state})")
        token = pack_owner(pid, (gen + 1) & 0xFFFFFFFF)
        if ow.cas(old, token):
            return token
    raise QueueBusy(f"queue ownership word keeps changing under the claim (owner pid {old_pid})")


def still_mine(words: np.ndarray | AtomicWord, token: int) -> bool:
    """One load: has nobody taken the queue from us?"""
    return token_of(_word(words).load()) == token


def enter(word: AtomicWord, token: int) -> bool:
    """The owner starts a pass: busy set by CAS from its token; False when fenced."""
    return word.cas(token, token | OWNER_BUSY)


def leave(word: AtomicWord, token: int) -> bool:
    """The owner ends a pass: busy cleared; False if the word was taken meanwhile."""
    return word.cas(token | OWNER_BUSY, token)


def release(words: np.ndarray | AtomicWord, token: int) -> bool:
    """Give the queue up (keeping the generation), inside a pass or not; False if it was no longer ours."""
    ow = _word(words)
    _, gen = unpack_owner(token)
    free = pack_owner(0, gen)
    return ow.cas(token, free) or ow.cas(token | OWNER_BUSY, free)


def fence(words: np.ndarray | AtomicWord, pid: int) -> str:
    """Make owner ``pid`` unable to pass over this queue again, if it is idle.

    Bumps the generation and keeps ``pid`` as the owner (so nobody mistakes
    the queue for a free one before :func:`hand_back`). Returns
    :data:`FENCED`, :data:`FENCE_BUSY` (the word is untouched: the owner must
    be killed) or :data:`NOT_OWNER`.
    """
    ow = _word(words)
    for _ in range(64):
        old = ow.load()
        opid, gen = unpack_owner(old)
        if opid != pid:
            return NOT_OWNER
        if old & OWNER_BUSY:
            return FENCE_BUSY
        if ow.cas(old, pack_owner(pid, (gen + 1) & 0xFFFFFFFF)):
            return FENCED
    return FENCE_BUSY  # it keeps entering and leaving passes: it is running, not hung


def hand_back(words: np.ndarray | AtomicWord, pid: int) -> bool:
    """Free a queue whose owner ``pid`` was fenced (idle) or is proven dead: owner 0, generation kept."""
    ow = _word(words)
    old = ow.load()
    opid, gen = unpack_owner(old)
    return opid == pid and ow.cas(old, pack_owner(0, gen))
