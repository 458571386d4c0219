"""Incremental session expiry: a cursor sweeps a bounded slice of the session table per poll.

Why a sweep and not a timer wheel: the fast path refreshes a session by
storing ``last_seen = now`` in its entry and nothing else. A timer wheel would
have to move the session to another bucket on every refresh (or keep stale
wheel entries and re-check them), which is per-packet bookkeeping on the hot
path and a second structure to keep consistent in shared memory across worker
restarts. A sweep reads only the columns the table already has (``state``,
``protocol``, ``tcp_state``, ``last_seen``), keeps a single integer of its own
(the cursor, which the caller may store in shared memory so a replacement
worker resumes where the last stopped), and its work per poll is fixed:
``slice_size`` entries, one vectorized comparison, whatever the table holds.

Worst-case lag: every slot is visited once per ``ceil(capacity / slice_size)``
polls, so a session is deleted at most that many polls after its timeout has
passed (:meth:`ExpirySweeper.worst_case_lag` gives it in seconds for a poll
interval). Example: a 1 Mi-entry table, 4096 slots per poll, one poll per
millisecond: 256 polls, so at most 0.26 s late. For a busy worker that only
sweeps between bursts the same bound holds in polls.

A session is expired when ``now - last_seen > timeout``, with the difference
taken on the wrapping uint32 clock and read as signed, so a ``last_seen``
slightly in the future (a clock reading from another process) is never expired.

Timeouts by protocol and TCP state (:func:`timeout_table`): TCP in ESTABLISHED,
IN_FIN_RCV or OUT_FIN_RCV -> ``tcp_established``; TCP in any other state
(INIT, BOTH_FIN_RCV, TRANS, unknown) -> ``tcp_transitory``; UDP -> ``udp``; ICMP
-> ``icmp``; any other protocol -> ``udp`` (RFC 4787's UDP rules are the
closest thing to a default for a connectionless flow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hotplane.shared import nat_tcp

if TYPE_CHECKING:
    from hotplane.shared.nat_config import Timeouts

USED = 1  # the session table's state value of a live entry (schema/session.py: USED)


def timeout_table(timeouts: "Timeouts") -> np.ndarray:
    """A read-only ``uint32[256, 256]`` table: ``[protocol, tcp_state] -> timeout in seconds``."""
    tbl = np.full((256, 256), timeouts.udp, dtype=np.uint32)
    tbl[1, :] = timeouts.icmp
    tbl[17, :] = timeouts.udp
    tcp_cls = nat_tcp.TIMEOUT_CLASS  # indexed by every state byte
    tbl[6, :] = np.where(tcp_cls == nat_tcp.TIMEOUT_ESTABLISHED, timeouts.tcp_established,
                         timeouts.tcp_transitory)
    tbl.setflags(write=False)
    return tbl


def expired_mask(now: int, last_seen: np.ndarray, proto: np.ndarray, tcp_state: np.ndarray,
                 state: np.ndarray, table: np.ndarray, used: int = USED) -> np.ndarray:
    """Which of the given entries are live (``state == used``) and idle longer than their timeout."""
    idle = (np.uint32(int(now) & 0xFFFFFFFF) - last_seen.astype(np.uint32, copy=False)).view(np.int32)
    limit = table[proto, tcp_state]
    # Timeouts are < 2**31 (config-checked), so comparing in int64 is exact; negative idle is never expired.
    return (state == used) & (idle.astype(np.int64) > limit.astype(np.int64))


class ExpirySweeper:
    """Walks ``slice_size`` slots of a ``capacity``-slot table per :meth:`poll`, wrapping around.

    ``cursor`` is the next slot to examine (read it to persist, pass it back to resume).
    """

    def __init__(self, capacity: int, slice_size: int, timeouts: "Timeouts", cursor: int = 0) -> None:
        if capacity < 1 or slice_size < 1:
            raise ValueError("capacity and slice_size must be at least 1")
        self.capacity = int(capacity)
        self.slice_size = min(int(slice_size), self.capacity)
        self.table = timeout_table(timeouts)
        self.cursor = int(cursor) % self.capacity
        self.examined = 0  # slots examined since creation
        self.expired = 0   # slots reported expired since creation

    def polls_per_round(self) -> int:
        """Polls needed to visit every slot once."""
        return -(-self.capacity // self.slice_size)

    def worst_case_lag(self, poll_interval: float) -> float:
        """Upper bound, in seconds, on how late after its timeout a session is reported."""
        return self.polls_per_round() * poll_interval

    def poll(self, now: int, last_seen: np.ndarray, proto: np.ndarray, tcp_state: np.ndarray,
             state: np.ndarray, used: int = USED) -> np.ndarray:
        """Examine the next slice; returns the expired slot indices (int64, ascending within the slice walk).

        The columns are equally long arrays (plain arrays or fields of a
        structured session array). Deleting the slots is the caller's job.
        """
        if len(last_seen) != self.capacity:
            raise ValueError(f"columns have {len(last_seen)} slots; the sweeper was made for {self.capacity}")
        lo = self.cursor
        hi = lo + self.slice_size
        if hi <= self.capacity:
            pieces = [(lo, hi)]
        else:
            pieces = [(lo, self.capacity), (0, hi - self.capacity)]
        found = []
        for a, b in pieces:
            m = expired_mask(now, last_seen[a:b], proto[a:b], tcp_state[a:b], state[a:b], self.table, used)
            found.append(np.flatnonzero(m) + a)
        self.cursor = hi % self.capacity
        self.examined += self.slice_size
        out = found[0] if len(found) == 1 else np.concatenate(found)
        self.expired += len(out)
        return out.astype(np.int64, copy=False)
