"""TCP session tracking: the vectorized machine against a plainly written reference, and RFC scenarios."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplane.shared import nat_tcp as t
from hotplane.shared.nat_tcp import (
    BOTH_FIN_RCV, CLOSED, ESTABLISHED, IN2OUT, IN_FIN_RCV, IN_INIT, OUT2IN, OUT_FIN_RCV, OUT_INIT, TRANS,
    TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TIMEOUT_ESTABLISHED, TIMEOUT_TRANSITORY,
    advance, reference_step, timeout_class, transition,
)

SYN, SYNACK, ACK, FIN, RST = TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST | TCP_ACK


def step(state: int, direction: int, flags: int) -> tuple[int, int, bool]:
    n, c, r = transition(np.array([state], np.uint8), np.array([direction], np.uint8), np.array([flags], np.uint8))
    return int(n[0]), int(c[0]), bool(r[0])


def walk(packets: list[tuple[int, int]], state: int = CLOSED) -> list[tuple[int, bool]]:
    out = []
    for d, f in packets:
        state, _, r = step(state, d, f)
        out.append((state, r))
    return out


def test_exhaustive_against_reference() -> None:
    s, d, f = np.meshgrid(np.arange(256), np.arange(2), np.arange(256), indexing="ij")
    s, d, f = s.ravel().astype(np.uint8), d.ravel().astype(np.uint8), f.ravel().astype(np.uint8)
    new, cls, ref = transition(s, d, f)
    for i in range(len(s)):
        exp_state, exp_refresh = reference_step(int(s[i]), int(d[i]), int(f[i]))
        assert (int(new[i]), bool(ref[i])) == (exp_state, exp_refresh), (s[i], d[i], f[i])
    assert np.array_equal(cls, timeout_class(new))


def test_outbound_connection_lifecycle() -> None:
    states = walk([(IN2OUT, SYN), (OUT2IN, SYNACK), (IN2OUT, ACK), (IN2OUT, TCP_PSH | ACK),
                   (IN2OUT, FIN), (OUT2IN, ACK), (OUT2IN, FIN), (IN2OUT, ACK)])
    assert [s for s, _ in states] == [IN_INIT, ESTABLISHED, ESTABLISHED, ESTABLISHED,
                                      IN_FIN_RCV, IN_FIN_RCV, BOTH_FIN_RCV, BOTH_FIN_RCV]
    assert [r for _, r in states] == [True] * 7 + [False]  # after both FINs the 4-minute clock runs out


def test_inbound_connection_and_simultaneous_close() -> None:
    states = walk([(OUT2IN, SYN), (IN2OUT, SYNACK), (OUT2IN, FIN), (IN2OUT, FIN)])
    assert [s for s, _ in states] == [OUT_INIT, ESTABLISHED, OUT_FIN_RCV, BOTH_FIN_RCV]


def test_timeout_classes() -> None:
    est = [ESTABLISHED, IN_FIN_RCV, OUT_FIN_RCV]
    for s in range(256):
        expected = TIMEOUT_ESTABLISHED if s in est else TIMEOUT_TRANSITORY
        assert int(timeout_class(np.array([s]))[0]) == expected


def test_rst_keeps_session_in_trans_and_traffic_revives_it() -> None:
    assert step(ESTABLISHED, OUT2IN, RST) == (TRANS, TIMEOUT_TRANSITORY, True)  # kept, 4 min from the RST
    assert step(IN_FIN_RCV, IN2OUT, TCP_RST) == (TRANS, TIMEOUT_TRANSITORY, True)
    assert step(TRANS, IN2OUT, RST) == (TRANS, TIMEOUT_TRANSITORY, False)       # RST storm: no refresh
    assert step(TRANS, OUT2IN, ACK) == (ESTABLISHED, TIMEOUT_ESTABLISHED, True)
    assert step(IN_INIT, OUT2IN, RST) == (IN_INIT, TIMEOUT_TRANSITORY, False)   # refused connect
    assert step(BOTH_FIN_RCV, OUT2IN, RST) == (BOTH_FIN_RCV, TIMEOUT_TRANSITORY, False)


def test_closed_and_init_rules() -> None:
    assert step(CLOSED, IN2OUT, ACK) == (CLOSED, TIMEOUT_TRANSITORY, False)  # no session for a stray ACK
    assert step(CLOSED, IN2OUT, TCP_SYN | TCP_RST)[0] == CLOSED
    assert step(IN_INIT, IN2OUT, SYN) == (IN_INIT, TIMEOUT_TRANSITORY, True)  # SYN retransmission
    assert step(IN_INIT, IN2OUT, ACK) == (IN_INIT, TIMEOUT_TRANSITORY, False)
    assert step(OUT_INIT, IN2OUT, SYNACK) == (ESTABLISHED, TIMEOUT_ESTABLISHED, True)
    assert step(BOTH_FIN_RCV, IN2OUT, SYN) == (IN_INIT, TIMEOUT_TRANSITORY, True)  # port pair reused


def test_unknown_state_bytes_act_as_trans() -> None:
    for s in (8, 100, 255):
        assert step(s, IN2OUT, ACK) == (ESTABLISHED, TIMEOUT_ESTABLISHED, True)
        assert step(s, IN2OUT, RST) == (TRANS, TIMEOUT_TRANSITORY, False)


def test_tables_are_read_only() -> None:
    for tbl in (t.NEXT_STATE, t.REFRESH, t.EVENT_OF_FLAGS, t.TIMEOUT_CLASS):
        assert not tbl.flags.writeable


def test_advance_empty_burst() -> None:
    col = np.zeros(4, np.uint8)
    new, cls, ref = advance(col, np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.uint8))
    assert len(new) == len(cls) == len(ref) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1),
                          st.sampled_from([SYN, SYNACK, ACK, FIN, RST, TCP_RST, TCP_PSH | ACK, 0, 0xFF])),
                max_size=64),
       st.lists(st.integers(0, 9), min_size=6, max_size=6))
def test_advance_burst_equals_packet_by_packet(burst: list, initial: list) -> None:
    col = np.array(initial, dtype=np.uint8)
    expected_col = [int(x) if x < t.N_STATES else x for x in initial]
    expected = []
    for slot, d, f in burst:
        s, r = reference_step(expected_col[slot], d, f)
        expected_col[slot] = s
        expected.append((s, r))
    slots = np.array([b[0] for b in burst], dtype=np.int64)
    dirs = np.array([b[1] for b in burst], dtype=np.uint8)
    flags = np.array([b[2] for b in burst], dtype=np.uint8)
    new, cls, ref = advance(col, slots, dirs, flags)
    assert [(int(a), bool(b)) for a, b in zip(new, ref)] == expected
    assert np.array_equal(cls, timeout_class(new))
    touched = set(slots.tolist())
    for i in range(6):
        assert int(col[i]) == (expected_col[i] if i in touched else initial[i])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 255)), max_size=40), st.integers(0, 7))
def test_sequence_against_reference(packets: list, start: int) -> None:
    state = start
    for (d, f), (got, refreshed) in zip(packets, walk(packets, start)):
        state, r = reference_step(state, d, f)
        assert (got, refreshed) == (state, r)
