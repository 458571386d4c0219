"""TCP session tracking for the NAT (RFC 7857 section 3, RFC 6146 section 3.5.2), vectorized over a burst.

States (the ``tcp_state`` byte of a session). RFC 6146 is written for NAT64,
where the inside is IPv6: its "V6" side is our *inside* (in2out packets), its
"V4" side our *outside* (out2in packets)::

    value name           RFC 6146 name        timeout class
    0     CLOSED         CLOSED               (no session)
    1     IN_INIT        V6 INIT              transitory
    2     OUT_INIT       V4 INIT              transitory
    3     ESTABLISHED    ESTABLISHED          established
    4     IN_FIN_RCV     V6 FIN RCV           established
    5     OUT_FIN_RCV    V4 FIN RCV           established
    6     BOTH_FIN_RCV   V6 FIN + V4 FIN RCV  transitory
    7     TRANS          TRANS                transitory

Each packet is classified by its flags into one event, highest priority first:
RST, SYN, FIN, OTHER. Transitions (``refresh`` = the packet restarts the
session's timer, i.e. the caller sets ``last_seen = now``):

* CLOSED: SYN in2out -> IN_INIT, SYN out2in -> OUT_INIT (refresh); anything
  else stays CLOSED: no session is created for it.
* IN_INIT: SYN out2in -> ESTABLISHED (refresh); SYN in2out (retransmission)
  refreshes; other packets are translated but change nothing.
* OUT_INIT: the mirror image (SYN in2out establishes).
* ESTABLISHED: FIN in2out -> IN_FIN_RCV, FIN out2in -> OUT_FIN_RCV, RST -> TRANS;
  every packet refreshes.
* IN_FIN_RCV: FIN out2in -> BOTH_FIN_RCV, RST -> TRANS, else stays; refresh.
  OUT_FIN_RCV: the mirror image.
* BOTH_FIN_RCV: packets are translated without refreshing, so the session ends
  ``tcp_transitory`` after the second FIN, except that a SYN (the port pair
  being reused for a new connection, as Linux conntrack allows from TIME_WAIT)
  restarts it as IN_INIT / OUT_INIT with a refresh. (RFC 6146 keeps such SYNs
  in this state; we reopen so a quick reconnection is not cut 4 minutes later.)
* TRANS: an RST stays in TRANS without refreshing (an RST storm cannot keep a
  dead session alive); any other packet -> ESTABLISHED with a refresh.

The RST rule (RFC 7857 section 3.2, "TCP RST"): a matching RST never deletes the
session; from ESTABLISHED or a FIN state it moves it to TRANS with a refresh,
so the session is kept ``tcp_transitory`` (4 minutes) after the RST and revives
if the connection turns out to be alive. An RST in an INIT state changes
nothing (the transitory timer is already running).

Unknown state values (a corrupted entry) behave as TRANS: the packet is
translated, the session gets the transitory timeout and expires unless real
traffic revives it.

:func:`transition` is the vectorized step over independent packets;
:func:`advance` applies a burst to a state column in place, in packet order,
including bursts that carry several packets of one session.
:func:`reference_step` is the same machine written plainly, for the tests.
"""

from __future__ import annotations

import numpy as np

CLOSED, IN_INIT, OUT_INIT, ESTABLISHED, IN_FIN_RCV, OUT_FIN_RCV, BOTH_FIN_RCV, TRANS = range(8)
N_STATES = 8
STATE_NAMES = ("CLOSED", "IN_INIT", "OUT_INIT", "ESTABLISHED", "IN_FIN_RCV", "OUT_FIN_RCV",
               "BOTH_FIN_RCV", "TRANS")

IN2OUT, OUT2IN = 0, 1

EV_OTHER, EV_FIN, EV_SYN, EV_RST = range(4)

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

TIMEOUT_TRANSITORY, TIMEOUT_ESTABLISHED = 0, 1

# The transition table, written out by hand: (state, direction, event) -> (new state, refresh).
# Anything not listed keeps its state without refreshing.
_I, _O = IN2OUT, OUT2IN
_TRANSITIONS: dict[tuple[int, int, int], tuple[int, bool]] = {
    (CLOSED, _I, EV_SYN): (IN_INIT, True),
    (CLOSED, _O, EV_SYN): (OUT_INIT, True),

    (IN_INIT, _O, EV_SYN): (ESTABLISHED, True),
    (IN_INIT, _I, EV_SYN): (IN_INIT, True),

    (OUT_INIT, _I, EV_SYN): (ESTABLISHED, True),
    (OUT_INIT, _O, EV_SYN): (OUT_INIT, True),

    (ESTABLISHED, _I, EV_OTHER): (ESTABLISHED, True),
    (ESTABLISHED, _O, EV_OTHER): (ESTABLISHED, True),
    (ESTABLISHED, _I, EV_SYN): (ESTABLISHED, True),
    (ESTABLISHED, _O, EV_SYN): (ESTABLISHED, True),
    (ESTABLISHED, _I, EV_FIN): (IN_FIN_RCV, True),
    (ESTABLISHED, _O, EV_FIN): (OUT_FIN_RCV, True),
    (ESTABLISHED, _I, EV_RST): (TRANS, True),
    (ESTABLISHED, _O, EV_RST): (TRANS, True),

    (IN_FIN_RCV, _I, EV_OTHER): (IN_FIN_RCV, True),
    (IN_FIN_RCV, _O, EV_OTHER): (IN_FIN_RCV, True),
    (IN_FIN_RCV, _I, EV_SYN): (IN_FIN_RCV, True),
    (IN_FIN_RCV, _O, EV_SYN): (IN_FIN_RCV, True),
    (IN_FIN_RCV, _I, EV_FIN): (IN_FIN_RCV, True),
    (IN_FIN_RCV, _O, EV_FIN): (BOTH_FIN_RCV, True),
    (IN_FIN_RCV, _I, EV_RST): (TRANS, True),
    (IN_FIN_RCV, _O, EV_RST): (TRANS, True),

    (OUT_FIN_RCV, _I, EV_OTHER): (OUT_FIN_RCV, True),
    (OUT_FIN_RCV, _O, EV_OTHER): (OUT_FIN_RCV, True),
    (OUT_FIN_RCV, _I, EV_SYN): (OUT_FIN_RCV, True),
    (OUT_FIN_RCV, _O, EV_SYN): (OUT_FIN_RCV, True),
    (OUT_FIN_RCV, _I, EV_FIN): (BOTH_FIN_RCV, True),
    (OUT_FIN_RCV, _O, EV_FIN): (OUT_FIN_RCV, True),
    (OUT_FIN_RCV, _I, EV_RST): (TRANS, True),
    (OUT_FIN_RCV, _O, EV_RST): (TRANS, True),

    (BOTH_FIN_RCV, _I, EV_SYN): (IN_INIT, True),
    (BOTH_FIN_RCV, _O, EV_SYN): (OUT_INIT, True),

    (TRANS, _I, EV_OTHER): (ESTABLISHED, True),
    (TRANS, _O, EV_OTHER): (ESTABLISHED, True),
    (TRANS, _I, EV_SYN): (ESTABLISHED, True),
    (TRANS, _O, EV_SYN): (ESTABLISHED, True),
    (TRANS, _I, EV_FIN): (ESTABLISHED, True),
    (TRANS, _O, EV_FIN): (ESTABLISHED, True),
}


def _build_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Indexed by [state byte (all 256 values), direction, event].
    nxt = np.empty((256, 2, 4), dtype=np.uint8)
    ref = np.zeros((256, 2, 4), dtype=bool)
    for s in range(256):
        nxt[s] = s if s < N_STATES else TRANS
    for (s, d, e), (n, r) in _TRANSITIONS.items():
        nxt[s, d, e] = n
        ref[s, d, e] = r
    # Unknown state bytes act as TRANS.
    nxt[N_STATES:] = nxt[TRANS]
    ref[N_STATES:] = ref[TRANS]
    # flags byte -> event, priority RST > SYN > FIN > OTHER.
    flags = np.arange(256)
    ev = np.where(flags & TCP_RST, EV_RST,
                  np.where(flags & TCP_SYN, EV_SYN, np.where(flags & TCP_FIN, EV_FIN, EV_OTHER)))
    cls = np.full(256, TIMEOUT_TRANSITORY, dtype=np.uint8)
    cls[[ESTABLISHED, IN_FIN_RCV, OUT_FIN_RCV]] = TIMEOUT_ESTABLISHED
    return nxt, ref, ev.astype(np.uint8), cls


NEXT_STATE, REFRESH, EVENT_OF_FLAGS, TIMEOUT_CLASS = _build_tables()
for _a in (NEXT_STATE, REFRESH, EVENT_OF_FLAGS, TIMEOUT_CLASS):
    _a.setflags(write=False)


def timeout_class(state: np.ndarray) -> np.ndarray:
    """TIMEOUT_ESTABLISHED for ESTABLISHED / IN_FIN_RCV / OUT_FIN_RCV, else TIMEOUT_TRANSITORY."""
    return TIMEOUT_CLASS[np.asarray(state, dtype=np.uint8)]


def transition(state: np.ndarray, direction: np.ndarray, flags: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step for packets of *distinct* sessions: ``(new_state, timeout_class, refresh)``.

    ``state``, ``flags``: uint8 arrays; ``direction``: IN2OUT (0) / OUT2IN (1)
    (any nonzero value counts as OUT2IN). Use :func:`advance` when a burst may
    hold several packets of one session.
    """
    s = np.asarray(state, dtype=np.uint8)
    d = (np.asarray(direction) != 0).astype(np.uint8)
    e = EVENT_OF_FLAGS[np.asarray(flags, dtype=np.uint8)]
    new = NEXT_STATE[s, d, e]
    return new, TIMEOUT_CLASS[new], REFRESH[s, d, e]


def advance(states: np.ndarray, slots: np.ndarray, direction: np.ndarray, flags: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply a burst to the state column ``states`` in place, in packet order.

    Packet ``i`` belongs to the session at ``states[slots[i]]``. Packets of the
    same session are applied one after another, as if the burst were processed
    packet by packet; distinct sessions are processed together. Returns, per
    packet, ``(state after it, timeout class, refresh)``. The number of numpy
    rounds is the largest count of packets one session has in the burst.
    """
    slots = np.asarray(slots, dtype=np.int64)
    n = len(slots)
    d = (np.asarray(direction) != 0).astype(np.uint8)
    e = EVENT_OF_FLAGS[np.asarray(flags, dtype=np.uint8)]
    new = np.empty(n, dtype=np.uint8)
    refresh = np.empty(n, dtype=bool)
    if n == 0:
        return new, new.copy(), refresh
    # Rank of each packet among the packets of its session (0 for the first).
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    for r in range(int(rank.max()) + 1):
        idx = np.flatnonzero(rank == r)  # at most one packet per session in a round
        s = states[slots[idx]]
        ns = NEXT_STATE[s, d[idx], e[idx]]
        new[idx] = ns
        refresh[idx] = REFRESH[s, d[idx], e[idx]]
        states[slots[idx]] = ns
    return new, TIMEOUT_CLASS[new], refresh


def reference_step(state: int, direction: int, flags: int) -> tuple[int, bool]:
    """The state machine for one packet, written plainly (the tests' oracle): ``(new_state, refresh)``."""
    inbound = direction != IN2OUT
    rst, syn, fin = bool(flags & TCP_RST), bool(flags & TCP_SYN), bool(flags & TCP_FIN)
    if state >= N_STATES:
        state = TRANS
    if state == CLOSED:
        if syn and not rst:
            return (OUT_INIT if inbound else IN_INIT), True
        return CLOSED, False
    if state in (IN_INIT, OUT_INIT):
        if rst or not syn:
            return state, False
        own_side = (state == IN_INIT) != inbound  # a SYN from the side that opened
        return (state if own_side else ESTABLISHED), True
    if state == ESTABLISHED:
        if rst:
            return TRANS, True
        if fin and not syn:
            return (OUT_FIN_RCV if inbound else IN_FIN_RCV), True
        return ESTABLISHED, True
    if state in (IN_FIN_RCV, OUT_FIN_RCV):
        if rst:
            return TRANS, True
        waiting_for_outside = state == IN_FIN_RCV
        if fin and not syn and inbound == waiting_for_outside:
            return BOTH_FIN_RCV, True
        return state, True
    if state == BOTH_FIN_RCV:
        if syn and not rst:
            return (OUT_INIT if inbound else IN_INIT), True
        return BOTH_FIN_RCV, False
    # TRANS
    if rst:
        return TRANS, False
    return ESTABLISHED, True
