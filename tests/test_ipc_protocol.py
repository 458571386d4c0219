"""Unit and property tests of the sans-IO IPC state machine (no sockets, fake fds)."""

from __future__ import annotations

import itertools
import math
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotplane.shared.ipc_protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    SCM_MAX_FD,
    Connection,
    ConnectionClosed,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Notification,
    ProtocolError,
    Request,
    Response,
    State,
)


class Fds:
    """Fake fd numbers plus a recorder standing in for os.close."""

    def __init__(self) -> None:
        self._next = itertools.count(1000)
        self.closed: list[int] = []

    def new(self, n: int) -> list[int]:
        return [next(self._next) for _ in range(n)]

    def close(self, fd: int) -> None:
        assert fd not in self.closed, f"fd {fd} closed twice"
        self.closed.append(fd)


def conn(fds: Fds | None = None, **kw) -> Connection:
    return Connection(close_fd=(fds or Fds()).close, **kw)


def events(c: Connection) -> list:
    out = []
    while (ev := c.next_event()) is not None:
        out.append(ev)
    return out


def frame(obj, *, raw: bytes | None = None) -> bytes:
    payload = raw if raw is not None else msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def only_error(c: Connection) -> str:
    evs = events(c)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError), evs
    assert c.state is State.ERROR
    return evs[0].reason


def delivered_fds(evs) -> list[int]:
    return [fd for ev in evs for fd in getattr(ev, "fds", ())]


# --------------------------------------------------------------------------- basics


def test_request_response_round_trip():
    a, b = conn(), conn()
    rid, data, fds = a.send_request("ping", {"x": [1, 2.5, "s", b"b", None, True]})
    assert rid == 1 and fds == ()
    b.receive_data(data, [], 10.0)
    assert events(b) == [Request(1, "ping", {"x": [1, 2.5, "s", b"b", None, True]}, (), None)]
    out, fds = b.send_response(1, {"ok": True})
    a.receive_data(out, [], 11.0)
    assert events(a) == [Response(1, {"ok": True}, None, ())]
    assert a.outstanding() == []
    assert a.state is b.state is State.OPEN


def test_error_response():
    a, b = conn(), conn()
    b.receive_data(a.send_request("boom")[1], [], 0)
    events(b)
    out, _ = b.send_response(1, error={"type": "ValueError", "message": "bad", "data": [1]})
    a.receive_data(out, [], 0)
    assert events(a) == [Response(1, None, {"type": "ValueError", "message": "bad", "data": [1]}, ())]


def test_ids_unique_and_increasing():
    a = conn()
    ids = [a.send_request("m")[0] for _ in range(50)]
    assert ids == list(range(1, 51))


def test_notification_heartbeat_hello_close():
    a, b = conn(max_frame_size=4096, max_fds=7), conn()
    stream = a.send_hello() + a.send_notification("tick", [1])[0] + a.send_heartbeat() + a.send_close("bye", "closing")
    b.receive_data(stream, [], 0)
    assert events(b) == [Hello(PROTOCOL_VERSION, 4096, 7), Notification("tick", [1], ()), Heartbeat(), ConnectionClosed("bye", "closing")]
    assert b.state is State.CLOSED and a.state is State.CLOSED
    assert b.peer_hello == Hello(PROTOCOL_VERSION, 4096, 7)


def test_params_none_and_int_keys_round_trip():
    a, b = conn(), conn()
    b.receive_data(a.send_notification("n")[0] + a.send_notification("m", {1: "one", "k": {2: 3}})[0], [], 0)
    assert events(b) == [Notification("n", None, ()), Notification("m", {1: "one", "k": {2: 3}}, ())]


def test_many_frames_in_one_chunk_and_byte_by_byte():
    a = conn()
    stream = b"".join(a.send_notification("n", i)[0] for i in range(20))
    b = conn()
    b.receive_data(stream, [], 0)
    want = [Notification("n", i, ()) for i in range(20)]
    assert events(b) == want
    c = conn()
    got = []
    for i in range(len(stream)):
        c.receive_data(stream[i : i + 1], [], 0)
        got += events(c)
    assert got == want


def test_clean_eof_and_eof_mid_frame():
    b = conn()
    b.receive_data(b"", [], 0)
    assert events(b) == [ConnectionClosed(None, None)] and b.state is State.CLOSED
    a = conn()
    data = a.send_notification("n", "x" * 100)[0]
    c = conn()
    c.receive_data(data[:50], [], 0)
    c.receive_data(b"", [], 0)
    assert "middle of a frame" in only_error(c)


def test_no_events_after_close_and_input_fds_closed():
    f = Fds()
    b = conn(f)
    b.receive_data(frame({"t": 5, "x": "done", "c": "closing"}), [], 0)
    assert events(b) == [ConnectionClosed("done", "closing")]
    late = f.new(2)
    b.receive_data(frame({"t": 3}), late, 1)
    assert events(b) == [] and f.closed == late


# --------------------------------------------------------------------------- deadlines, liveness


def test_deadline_budget_and_expiry():
    f = Fds()
    a, b = conn(f), conn()
    r1, d1, _ = a.send_request("slow", deadline=105.0, now=100.0)
    r2, d2, _ = a.send_request("slower", deadline=110.0, now=100.0)
    r3, d3, _ = a.send_request("forever")
    b.receive_data(d1 + d2 + d3, [], 7.0)  # the receiver's clock differs: only the budget travels
    reqs = events(b)
    assert [r.deadline for r in reqs] == [12.0, 17.0, None]
    assert a.next_deadline() == 105.0
    assert a.expired(104.999) == []
    assert a.expired(105.0) == [r1]
    assert a.expired(105.0) == []
    assert a.next_deadline() == 110.0
    assert a.expired(1e9) == [r2]
    assert a.next_deadline() is None and a.outstanding() == [r3]
    # The answer to r1 arrives late: dropped quietly, its fds closed, connection fine.
    out, _ = b.send_response(r1, "late", fds=[5, 6])
    a.receive_data(out, [5, 6], 200.0)
    assert events(a) == [] and a.late_responses == 1 and f.closed == [5, 6] and a.state is State.OPEN
    # A second answer to it is a protocol error, not a crash.
    a.receive_data(frame({"t": 1, "i": r1, "r": 1}), [], 200.0)
    assert "unknown or already answered" in only_error(a)


def test_deadline_in_the_past_sends_zero_budget():
    a, b = conn(), conn()
    _, data, _ = a.send_request("m", deadline=5.0, now=9.0)
    b.receive_data(data, [], 1.0)
    assert events(b)[0].deadline == 1.0


def test_cancel_drops_late_answer():
    a, b = conn(), conn()
    rid, data, _ = a.send_request("m", deadline=50.0, now=0.0)
    b.receive_data(data, [], 0)
    events(b)
    assert a.cancel(rid) and not a.cancel(rid)
    assert a.next_deadline() is None and a.expired(100.0) == []
    a.receive_data(b.send_response(rid, 1)[0], [], 1)
    assert events(a) == [] and a.state is State.OPEN


def test_deadline_needs_now():
    with pytest.raises(LocalProtocolError, match="now"):
        conn().send_request("m", deadline=1.0)


def test_peer_silence():
    a, b = conn(now=100.0), conn()
    assert a.peer_silent_for(103.5) == 3.5
    a.receive_data(b.send_heartbeat(), [], 110.0)
    assert events(a) == [Heartbeat()]
    assert a.last_heard == 110.0 and a.peer_silent_for(111.0) == 1.0
    # Half a frame also proves the peer is alive.
    a.receive_data(b.send_heartbeat()[:2], [], 120.0)
    assert a.peer_silent_for(120.0) == 0.0


# --------------------------------------------------------------------------- fds


def test_fds_go_to_the_frame_that_announced_them():
    f = Fds()
    a, b = conn(), conn(f)
    pre = a.send_notification("before")[0]
    _, with_fds, sent = a.send_request("take", None, [3, 4])
    post = a.send_notification("after")[0]
    # One recv carries the end of another send, the whole fd frame and the next frame.
    b.receive_data(pre + with_fds + post, [70, 71], 0)
    evs = events(b)
    assert evs == [Notification("before", None, ()), Request(1, "take", None, (70, 71), None), Notification("after", None, ())]
    assert sent == (3, 4) and f.closed == []


def test_fds_arrive_with_first_byte_rest_of_frame_later():
    f = Fds()
    a, b = conn(), conn(f)
    data = a.send_notification("big", "x" * 5000, [1])[0]
    b.receive_data(data[:1], [40], 0)
    b.receive_data(data[1:3000], [], 0)
    assert events(b) == []
    b.receive_data(data[3000:], [], 0)
    assert events(b) == [Notification("big", "x" * 5000, (40,))]


def test_fds_not_with_first_byte_is_error_and_closed():
    f = Fds()
    a, b = conn(), conn(f)
    data = a.send_notification("n", "x" * 100, [1])[0]
    b.receive_data(data[:10], [], 0)
    b.receive_data(data[10:], [41], 0)
    assert "none arrived with its first byte" in only_error(b)
    assert f.closed == [41]


def test_fd_count_mismatch():
    f = Fds()
    a, b = conn(), conn(f)
    data = a.send_notification("n", None, [1, 2, 3])[0]
    b.receive_data(data, [50, 51], 0)
    assert "announces 3" in only_error(b) and sorted(f.closed) == [50, 51]


def test_unannounced_fds_are_an_error():
    f = Fds()
    a, b = conn(), conn(f)
    b.receive_data(a.send_notification("n")[0], [60], 0)
    evs = events(b)
    assert evs[0] == Notification("n", None, ())  # the frame itself was fine
    assert isinstance(evs[1], ProtocolError) and "announced none" in evs[1].reason
    assert b.state is State.ERROR and f.closed == [60]


def test_unannounced_fds_detected_with_partial_next_frame():
    f = Fds()
    a, b = conn(), conn(f)
    n1 = a.send_notification("one")[0]
    n2 = a.send_notification("two")[0]
    # The batch holds the first byte of "two", which might still claim it...
    b.receive_data(n1 + n2[:3], [61], 0)
    assert events(b) == [Notification("one", None, ())] and f.closed == []
    # ...until "two" turns out to announce none.
    b.receive_data(n2[3:], [], 0)
    evs = events(b)
    assert evs[0] == Notification("two", None, ()) and "announced none" in evs[1].reason
    assert f.closed == [61]


def test_two_frames_cannot_share_one_batch():
    f = Fds()
    a, b = conn(), conn(f)
    d1 = a.send_notification("one", None, [1])[0]
    d2 = a.send_notification("two", None, [1])[0]
    b.receive_data(d1 + d2, [62], 0)
    evs = events(b)
    assert evs[0] == Notification("one", None, (62,))
    assert isinstance(evs[1], ProtocolError) and "two frames claim" in evs[1].reason
    assert f.closed == []  # 62 belongs to the delivered event


def test_fds_without_data_and_too_many_fds():
    f = Fds()
    b = conn(f)
    b.receive_data(b"", [1, 2], 0)
    assert "without any data" in only_error(b) and f.closed == [1, 2]
    f2 = Fds()
    c = conn(f2, max_fds=2)
    c.receive_data(b"\0", [5, 6, 7], 0)
    assert "max_fds=2" in only_error(c) and f2.closed == [5, 6, 7]


def test_ctrunc_is_an_error_and_closes_what_arrived():
    f = Fds()
    a, b = conn(), conn(f)
    b.receive_data(a.send_notification("n", None, [1, 2])[0], [80, 81], 0, ctrunc=True)
    assert "MSG_CTRUNC" in only_error(b) and f.closed == [80, 81]


def test_response_fds_to_unknown_id_are_closed():
    f = Fds()
    b = conn(f)
    b.receive_data(frame({"t": 1, "i": 9, "r": 1, "n": 1}), [90], 0)
    assert "unknown" in only_error(b) and f.closed == [90]


def test_bad_frame_with_fds_closes_them_but_keeps_earlier_events():
    f = Fds()
    a, b = conn(), conn(f)
    good = a.send_notification("good", None, [1])[0]
    bad = frame(None, raw=b"\xc1")  # 0xc1 is never valid msgpack
    b.receive_data(good, [10], 0)
    b.receive_data(bad, [11], 0)
    evs = events(b)
    assert evs[0] == Notification("good", None, (10,)) and isinstance(evs[1], ProtocolError)
    assert f.closed == [11]


def test_after_error_everything_is_closed_and_sends_refused():
    f = Fds()
    b = conn(f)
    b.receive_data(b"\xff\xff\xff\xff", [], 0)
    assert "exceeds max_frame_size" in only_error(b)
    b.receive_data(frame({"t": 3}), [7, 8], 1)
    assert events(b) == [] and f.closed == [7, 8]
    for send in (b.send_heartbeat, b.send_hello, lambda: b.send_request("m"), lambda: b.send_notification("m")):
        with pytest.raises(LocalProtocolError, match="error"):
            send()
    # ...but it may still say goodbye, once.
    assert b.send_close("protocol error", "protocol_error")
    with pytest.raises(LocalProtocolError):
        b.send_close("again")


# --------------------------------------------------------------------------- frame validation


def test_oversized_length_rejected_before_body_arrives():
    b = conn(max_frame_size=1024)
    b.receive_data(struct.pack(">I", 1025), [], 0)
    assert "1025 bytes exceeds max_frame_size=1024" in only_error(b)
    c = conn(max_frame_size=1024)
    payload = msgpack.packb({"t": 2, "m": "n", "p": "x" * 1000})
    assert len(payload) <= 1024
    c.receive_data(frame(None, raw=payload), [], 0)
    assert events(c)[0].method == "n"


def test_default_max_frame_size():
    b = conn()
    b.receive_data(struct.pack(">I", DEFAULT_MAX_FRAME_SIZE + 1), [], 0)
    assert "exceeds" in only_error(b)


BAD_FRAMES = [
    ("garbage", frame(None, raw=b"\xc1\xc1"), "undecodable"),
    ("truncated msgpack", frame(None, raw=b"\x92\x01"), "undecodable"),
    ("extra data", frame(None, raw=msgpack.packb({"t": 3}) + b"\x01"), "undecodable"),
    ("bad utf-8", frame(None, raw=b"\x81\xa1t\xa2\xff\xfe"), "undecodable"),
    ("ext type", frame(None, raw=msgpack.packb({"t": 2, "m": "n", "p": msgpack.ExtType(5, b"x")})), "undecodable"),
    ("empty frame", b"\0\0\0\0", "empty frame"),
    ("not a map", frame([3]), "not a map"),
    ("no type", frame({"m": "x"}), "frame type"),
    ("str type", frame({"t": "3"}), "frame type"),
    ("bool type", frame({"t": True}), "frame type"),
    ("unknown type", frame({"t": 42}), "unknown frame type"),
    ("negative n", frame({"t": 2, "m": "x", "n": -1}), "fd count"),
    ("str n", frame({"t": 2, "m": "x", "n": "1"}), "fd count"),
    ("n over max", frame({"t": 2, "m": "x", "n": 65}), "max_fds"),
    ("request no id", frame({"t": 0, "m": "x"}), "request id"),
    ("request id 0", frame({"t": 0, "i": 0, "m": "x"}), "request id"),
    ("request id float", frame({"t": 0, "i": 1.0, "m": "x"}), "request id"),
    ("request id huge", frame({"t": 0, "i": 2**64 - 1, "m": "x"}), "request id"),
    ("request no method", frame({"t": 0, "i": 1}), "method"),
    ("request empty method", frame({"t": 0, "i": 1, "m": ""}), "method"),
    ("request int method", frame({"t": 0, "i": 1, "m": 5}), "method"),
    ("negative budget", frame({"t": 0, "i": 1, "m": "x", "d": -1}), "budget"),
    ("nan budget", frame({"t": 0, "i": 1, "m": "x", "d": math.nan}), "budget"),
    ("inf budget", frame({"t": 0, "i": 1, "m": "x", "d": math.inf}), "budget"),
    ("str budget", frame({"t": 0, "i": 1, "m": "x", "d": "1"}), "budget"),
    ("notification no method", frame({"t": 2, "p": 1}), "method"),
    ("response bad id", frame({"t": 1, "i": "1"}), "request id"),
    ("response error not a map", frame({"t": 1, "i": 1, "e": "bad"}), "error must be a map"),
    ("response error no message", frame({"t": 1, "i": 1, "e": {"type": "X"}}), "'type' and 'message'"),
    ("heartbeat with fds", frame({"t": 3, "n": 1}), "cannot carry"),
    ("hello malformed", frame({"t": 4, "v": 1, "s": "big", "f": 1}), "malformed hello"),
    ("hello tiny frame", frame({"t": 4, "v": 1, "s": 1, "f": 1}), "malformed hello"),
    ("hello version", frame({"t": 4, "v": 99, "s": 4096, "f": 1}), "version 99"),
    ("close bad reason", frame({"t": 5, "x": 5}), "malformed close"),
    ("close with fds", frame({"t": 5, "x": "r", "n": 2}), "cannot carry"),
]


@pytest.mark.parametrize("name,data,needle", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frames_become_protocol_errors(name, data, needle):
    f = Fds()
    b = conn(f)
    b.receive_data(data, [], 0)
    assert needle in only_error(b)
    b.receive_data(frame({"t": 3}), [], 0)  # dead connections stay dead
    assert events(b) == []


def test_unknown_keys_are_ignored():
    b = conn()
    b.receive_data(frame({"t": 2, "m": "n", "zz": [1, 2], "future": {"x": 1}}), [], 0)
    assert events(b) == [Notification("n", None, ())]


def test_response_with_both_result_and_error():
    a, b = conn(), conn()
    a.send_request("m")
    a.receive_data(frame({"t": 1, "i": 1, "r": 1, "e": {"type": "X", "message": "y"}}), [], 0)
    assert "both a result and an error" in only_error(a)


def test_request_ids_must_increase():
    b = conn()
    b.receive_data(frame({"t": 0, "i": 5, "m": "x"}) + frame({"t": 0, "i": 5, "m": "y"}), [], 0)
    evs = events(b)
    assert evs[0].id == 5 and isinstance(evs[1], ProtocolError) and "not greater" in evs[1].reason


def test_duplicate_hello():
    a, b = conn(), conn()
    b.receive_data(a.send_hello() + frame({"t": 4, "v": PROTOCOL_VERSION, "s": 4096, "f": 1}), [], 0)
    evs = events(b)
    assert isinstance(evs[0], Hello) and "duplicate hello" in evs[1].reason


# --------------------------------------------------------------------------- local misuse


def test_local_errors_do_not_change_state():
    a = conn(max_frame_size=1024, max_fds=2)
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        a.send_request("m", {"x": object()})
    with pytest.raises(LocalProtocolError, match="frame size limit"):
        a.send_request("m", "x" * 2000)
    with pytest.raises(LocalProtocolError, match="3 file descriptors"):
        a.send_notification("m", None, [1, 2, 3])
    with pytest.raises(LocalProtocolError, match="non-negative integers"):
        a.send_notification("m", None, [-1])
    with pytest.raises(LocalProtocolError, match="method"):
        a.send_request("")
    with pytest.raises(LocalProtocolError, match="awaits a response"):
        a.send_response(1, "x")
    assert a.send_request("m")[0] == 1  # failed attempts used no id
    assert a.state is State.OPEN and a.outstanding() == [1]


def test_response_rules():
    a, b = conn(), conn()
    b.receive_data(a.send_request("m")[1], [], 0)
    events(b)
    with pytest.raises(LocalProtocolError, match="not both"):
        b.send_response(1, 1, {"type": "X", "message": "y"})
    with pytest.raises(LocalProtocolError, match="'type' and 'message'"):
        b.send_response(1, error={"type": "X"})
    b.send_response(1, "ok")
    with pytest.raises(LocalProtocolError, match="awaits a response"):
        b.send_response(1, "again")


def test_sends_respect_peer_limits():
    a, b = conn(), conn(max_frame_size=256, max_fds=1)
    a.receive_data(b.send_hello(), [], 0)
    assert events(a) == [Hello(PROTOCOL_VERSION, 256, 1)]
    with pytest.raises(LocalProtocolError, match="limit is 1"):
        a.send_notification("n", None, [1, 2])
    with pytest.raises(LocalProtocolError, match="limit of 256"):
        a.send_notification("n", "x" * 300)
    a.send_notification("n", "x" * 100, [1])


def test_constructor_limits():
    with pytest.raises(ValueError):
        Connection(max_fds=SCM_MAX_FD + 1)
    with pytest.raises(ValueError):
        Connection(max_frame_size=2**32)


# --------------------------------------------------------------------------- properties

msg_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4),
    max_leaves=12,
)

op = st.one_of(
    st.tuples(st.just("req"), st.text(min_size=1, max_size=10), msg_values, st.integers(0, 3), st.none() | st.floats(0, 100)),
    st.tuples(st.just("note"), st.text(min_size=1, max_size=10), msg_values, st.integers(0, 3)),
    st.tuples(st.just("resp"), msg_values, st.integers(0, 3), st.booleans()),
    st.tuples(st.just("hb")),
)


def build_stream(ops, coalesce):
    """Encode ``ops`` as the sender would; return the receiver (with outstanding
    requests for the responses), the send units [(bytes, fds)], and fake fd numbers."""
    fdgen = itertools.count(500)
    receiver_side = conn()
    sender = conn()
    n_resp = sum(1 for o in ops if o[0] == "resp")
    for _ in range(n_resp):  # the receiver asked first, so the sender has something to answer
        _, data, _ = receiver_side.send_request("q")
        sender.receive_data(data, [], 0)
    events(sender)
    units: list[tuple[bytes, list[int]]] = []
    resp_id = itertools.count(1)
    for o, glue in zip(ops, itertools.chain(coalesce, itertools.repeat(False))):
        kind = o[0]
        if kind == "req":
            fds = [next(fdgen) for _ in range(o[3])]
            _, data, _ = sender.send_request(o[1], o[2], fds, deadline=None if o[4] is None else 1000 + o[4], now=1000)
        elif kind == "note":
            fds = [next(fdgen) for _ in range(o[3])]
            data, _ = sender.send_notification(o[1], o[2], fds)
        elif kind == "resp":
            fds = [next(fdgen) for _ in range(o[2])]
            if o[3]:
                data, _ = sender.send_response(next(resp_id), error={"type": "E", "message": str(o[1])[:50]}, fds=fds)
            else:
                data, _ = sender.send_response(next(resp_id), o[1], fds=fds)
        else:
            fds = []
            data = sender.send_heartbeat()
        if glue and not fds and units:  # frames without fds may ride in the previous sendmsg
            units[-1] = (units[-1][0] + data, units[-1][1])
        else:
            units.append((data, fds))
    return receiver_side, units


def chunks_for(units, cuts):
    """Split the stream the way recvmsg may: anywhere, except that a read that picks up
    fds contains the first byte of their send and ends by the end of that send."""
    stream = b"".join(u[0] for u in units)
    cut_points = {c % (len(stream) + 1) for c in cuts} | {0, len(stream)}
    fd_at: dict[int, list[int]] = {}
    pos = 0
    for data, fds in units:
        if fds:
            fd_at[pos] = fds
            cut_points.add(pos + len(data))
        pos += len(data)
    cps = sorted(cut_points)
    out = []
    for a, b in zip(cps, cps[1:]):
        fds = [fd for start, f in fd_at.items() if a <= start < b for fd in f]
        out.append((stream[a:b], fds))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=12), coalesce=st.lists(st.booleans(), max_size=12), cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_any_split_yields_the_same_events(ops, coalesce, cuts):
    ref_recv, units = build_stream(ops, coalesce)
    for data, fds in units:
        ref_recv.receive_data(data, fds, 5.0)
    want = events(ref_recv)
    assert not any(isinstance(e, ProtocolError) for e in want), want
    assert len(want) == len(ops)

    recv, units2 = build_stream(ops, coalesce)
    got = []
    for data, fds in chunks_for(units2, cuts):
        recv.receive_data(data, fds, 5.0)
        got += events(recv)
    assert got == want
    assert recv.state is State.OPEN


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.tuples(st.binary(max_size=64), st.integers(0, 3), st.booleans()), max_size=20), prefix=st.booleans())
def test_garbage_never_raises_and_never_leaks_fds(chunks, prefix):
    f = Fds()
    b = conn(f, max_frame_size=512)
    fed: list[int] = []
    evs = []
    if prefix:  # a length prefix that is plausible, so the decoder really runs
        b.receive_data(b"\x00\x00\x00\x10", [], 0)
    for data, nfds, trunc in chunks:
        fds = f.new(nfds)
        fed += fds
        b.receive_data(data, fds, 1.0, ctrunc=trunc and nfds > 0)
        evs += events(b)
    b.receive_data(b"", [], 2.0)
    evs += events(b)
    assert b.state in (State.CLOSED, State.ERROR)
    got = delivered_fds(evs)
    # Every fd is either handed out in an event or closed, never both, never lost.
    assert sorted(got + f.closed) == sorted(fed)
    assert sum(isinstance(e, (ProtocolError, ConnectionClosed)) for e in evs) == 1
    assert isinstance(evs[-1], (ProtocolError, ConnectionClosed))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=8), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_corrupted_valid_streams_never_raise_or_leak(ops, flips, cuts):
    recv, units = build_stream(ops, [])
    f = Fds()
    recv._close_fd = f.close  # the receiver was built with its own recorder; use ours
    stream = bytearray(b"".join(u[0] for u in units))
    for pos, val in flips:
        stream[pos % len(stream)] = val
    pos = 0
    bad_units = []
    for data, fds in units:
        bad_units.append((bytes(stream[pos : pos + len(data)]), fds))
        pos += len(data)
    fed = [fd for _, fds in units for fd in fds]
    evs = []
    for data, fds in chunks_for(bad_units, cuts):
        recv.receive_data(data, fds, 1.0)
        evs += events(recv)
    recv.receive_data(b"", [], 2.0)
    evs += events(recv)
    assert sorted(delivered_fds(evs) + f.closed) == sorted(fed)


@settings(max_examples=100, deadline=None)
@given(deadlines=st.lists(st.none() | st.floats(0, 100), max_size=30), checks=st.lists(st.floats(0, 120), max_size=10))
def test_expired_returns_each_passed_deadline_once(deadlines, checks):
    a = conn()
    ids = {a.send_request("m", deadline=d, now=0.0 if d is not None else None)[0]: d for d in deadlines}
    seen: list[int] = []
    for t in sorted(checks):
        got = a.expired(t)
        assert all(ids[i] is not None and ids[i] <= t for i in got)
        seen += got
        nd = a.next_deadline()
        assert nd is None or nd > t
    last = max(checks, default=-1.0)
    assert sorted(seen) == sorted(i for i, d in ids.items() if d is not None and d <= last)
    assert set(a.outstanding()) == set(ids) - set(seen)
