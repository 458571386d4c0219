"""The gateway clock: whole seconds as a wrapping uint32, real or test-controlled.

Every NAT timer (session timeouts, the port-reuse hold, ARP ageing, fragment
timeouts) counts whole seconds on one clock. Sessions store ``last_seen`` as a
``u4`` in shared memory, so the clock is a ``uint32`` that wraps after ~136
years; differences are always taken modulo 2**32 (:func:`elapsed`,
:func:`elapsed_array`) so code stays correct across the wrap.

* :class:`MonotonicClock` counts ``CLOCK_MONOTONIC`` seconds since an *epoch*.
  ``CLOCK_MONOTONIC`` is system-wide, so processes that share the epoch value
  (it will live in shared memory next to the tables) read the same time, and a
  restarted worker continues the same time line.
* :class:`ManualClock` only moves when a test calls :meth:`ManualClock.advance`.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import numpy as np

U32_MASK = 0xFFFFFFFF


@runtime_checkable
class Clock(Protocol):
    """Anything with ``now() -> int``: whole seconds, uint32, wrapping."""

    def now(self) -> int:
        """The current time in whole seconds modulo 2**32."""
        ...


class MonotonicClock:
    """Seconds of ``CLOCK_MONOTONIC`` elapsed since ``epoch`` (a monotonic timestamp, in seconds).

    With ``epoch=None`` the epoch is "now minus one second", so the first reading
    is 1, not 0 (0 is a handy "never" in zero-filled tables). Pass the epoch
    kept in shared memory to share one time line between processes.
    """

    def __init__(self, epoch: float | None = None) -> None:
        self.epoch = time.monotonic() - 1.0 if epoch is None else float(epoch)

    def now(self) -> int:
        return int(time.monotonic() - self.epoch) & U32_MASK

    def __repr__(self) -> str:
        return f"MonotonicClock(epoch={self.epoch!r})"


class ManualClock:
    """A clock for tests: starts at ``start`` and moves only with :meth:`advance` / :meth:`set`."""

    def __init__(self, start: int = 1) -> None:
        self._now = int(start) & U32_MASK

    def now(self) -> int:
        return self._now

    def advance(self, seconds: int) -> int:
        """Move forward by ``seconds`` (>= 0, whole seconds); returns the new time."""
        seconds = int(seconds)
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; advance({seconds}) is negative")
        self._now = (self._now + seconds) & U32_MASK
        return self._now

    def set(self, t: int) -> None:
        """Jump to ``t`` (modulo 2**32); meant for tests of the wrap-around."""
        self._now = int(t) & U32_MASK

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now})"


def elapsed(now: int, then: int) -> int:
    """Seconds from ``then`` to ``now`` on the wrapping clock, as a signed value.

    Negative when ``then`` is in the future (by less than 2**31 s).
    """
    d = (int(now) - int(then)) & U32_MASK
    return d - (1 << 32) if d & 0x80000000 else d


def elapsed_array(now: int, then: np.ndarray) -> np.ndarray:
    """Vectorized :func:`elapsed`: ``then`` is a uint32 array, the result an int32 array."""
    d = np.uint32(int(now) & U32_MASK) - then.astype(np.uint32, copy=False)
    return d.view(np.int32)
