"""The IPC channel's protocol as a pure state machine (sans-IO, in the manner of h11).

No sockets, no event loop and no clock live here: the caller feeds what it read
(``receive_data(data, fds, now)``), pulls events (``next_event()``), and gets the bytes
to write from the ``send_*`` methods. The asyncio shell (:mod:`hotplane.shared.ipc`)
and the blocking CLI client both drive this same object, so there is exactly one
implementation of framing, validation, id bookkeeping, deadlines and fd matching.

Wire format
-----------
A frame is a 4-byte big-endian payload length followed by a msgpack map with short
keys::

    t  frame type: 0 request, 1 response, 2 notification, 3 heartbeat, 4 hello, 5 close
    i  request id (request, response), 1 <= i < 2**63, strictly increasing per sender
    m  method name (request, notification)
    p  params (request, notification), any msgpack value, absent means None
    r  result (response)
    e  error (response): {"type": str, "message": str[, "data": any]}
    n  number of file descriptors passed with this frame (absent means 0)
    d  time budget of a request in seconds (relative: the two clocks need not agree)
    v, s, f  hello: protocol version, max frame size, max fds per frame
    x, c  close: human-readable reason and a short machine code ("closing", "refused",
          "protocol_error", ...)

Unknown keys are ignored (room for later versions); wrong types are protocol errors.

File descriptors
----------------
On a unix stream socket the kernel attaches SCM_RIGHTS data to the first byte of the
``sendmsg`` that carried it, and a ``recvmsg`` that picks fds up stops at the end of
that send's first buffer, so at most one batch of fds arrives per read, together with
the read that contains the first byte of the announcing frame (earlier bytes of other
sends may be glued in front of it). The sender's rule that makes this unambiguous: a
frame with fds starts a new ``sendmsg`` and that ``sendmsg`` carries only its fds.
The receiver remembers, for each batch, the range of stream offsets it arrived with;
a frame announcing ``n`` fds claims the batch whose range holds the frame's first
byte, and it must hold exactly ``n``. A batch nobody claims once the parser has moved
past it, a second claim, or a count mismatch is a protocol error.

Errors
------
Anything the peer can get wrong (oversized length prefix, undecodable msgpack, wrong
types, fd mismatch, truncated ancillary data, a response to an unknown id) becomes a
:class:`ProtocolError` event and the state becomes ``ERROR``; ``receive_data`` never
raises. Fds that cannot be handed to an event are closed (no leak). Misuse by the local
caller (sending in a closed state, unencodable params, a frame too large, too many
fds) raises :class:`LocalProtocolError` before any state changes.
"""

from __future__ import annotations

import enum
import heapq
import math
import os
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import msgpack

PROTOCOL_VERSION = 1
HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 1 << 20
DEFAULT_MAX_FDS = 64
# Linux refuses more than SCM_MAX_FD descriptors in one SCM_RIGHTS message.
SCM_MAX_FD = 253
MAX_REQUEST_ID = (1 << 63) - 1

T_REQUEST = 0
T_RESPONSE = 1
T_NOTIFICATION = 2
T_HEARTBEAT = 3
T_HELLO = 4
T_CLOSE = 5

_LEN = struct.Struct(">I")


class State(enum.Enum):
    """Connection state: OPEN until a clean close (CLOSED) or a protocol error (ERROR)."""

    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class LocalProtocolError(Exception):
    """The local caller asked for something the protocol cannot do (never peer input)."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Request:
    """The peer asks us to run ``method``; answer with ``send_response(id, ...)``.

    ``deadline`` is in the receiver's clock (the ``now`` given to ``receive_data`` plus
    the budget the peer announced), or None. The receiver owns ``fds``.
    """

    id: int
    method: str
    params: Any
    fds: tuple[int, ...]
    deadline: float | None


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to one of our requests: ``error`` is None or {"type", "message"[, "data"]}."""

    id: int
    result: Any
    error: dict[str, Any] | None
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Notification:
    """A one-way message; nothing is sent back. The receiver owns ``fds``."""

    method: str
    params: Any
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The peer is alive (any received byte also counts, see ``last_heard``)."""


@dataclass(frozen=True, slots=True)
class Hello:
    """The peer's protocol version and limits; sends are then kept within them."""

    version: int
    max_frame_size: int
    max_fds: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed cleanly: with a close frame (``reason``/``code`` set) or plain EOF."""

    reason: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer broke the protocol; the connection is unusable (state ERROR)."""

    reason: str


Event = Request | Response | Notification | Heartbeat | Hello | ConnectionClosed | ProtocolError


class _Bad(Exception):
    """Internal: the frame being handled is invalid (turned into a ProtocolError event)."""


class _FdBatch:
    """Fds that arrived with stream bytes [start, end)."""

    __slots__ = ("start", "end", "fds", "claimed")

    def __init__(self, start: int, end: int, fds: list[int]) -> None:
        self.start = start
        self.end = end
        self.fds = fds
        self.claimed = False


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------- connection


class Connection:
    """One end of an IPC connection: framing, validation, ids, deadlines, fd matching.

    ``close_fd`` is how fds that cannot be delivered are closed (``os.close``; tests
    pass a recorder). ``now`` starts the silence clock.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_fds: int = DEFAULT_MAX_FDS,
        now: float = 0.0,
        close_fd: Callable[[int], None] = os.close,
        remember_abandoned: int = 65536,
    ) -> None:
        if not 16 <= max_frame_size <= 0xFFFFFFFF:
            raise ValueError(f"max_frame_size must be in [16, 2**32-1], got {max_frame_size}")
        if not 0 <= max_fds <= SCM_MAX_FD:
            raise ValueError(f"max_fds must be in [0, {SCM_MAX_FD}], got {max_fds}")
        self.max_frame_size = max_frame_size
        self.max_fds = max_fds
        self.state = State.OPEN
        self.last_heard = now
        self.peer_hello: Hello | None = None
        self._close_fd = close_fd
        self._events: deque[Event] = deque()
        # Receive side.
        self._buf = bytearray()
        self._buf_offset = 0  # stream offset of _buf[0]
        self._rx_total = 0  # stream offset of the next byte to arrive
        self._batches: deque[_FdBatch] = deque()
        self._peer_last_id = 0
        self._awaiting_response: set[int] = set()  # peer request ids we still owe
        # Send side.
        self._next_id = 1
        self._outstanding: dict[int, float | None] = {}  # our request id -> deadline
        self._deadlines: list[tuple[float, int]] = []  # heap, lazily cleaned
        self._abandoned: OrderedDict[int, None] = OrderedDict()  # timed out / cancelled
        self._remember_abandoned = remember_abandoned
        self._close_sent = False
        # Counters, for diagnostics and tests.
        self.frames_received = 0
        self.frames_sent = 0
        self.late_responses = 0

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes, fds: Iterable[int], now: float, *, ctrunc: bool = False) -> None:
        """Feed what one ``recvmsg`` returned: bytes, the SCM_RIGHTS fds, and the time.

        ``data == b""`` means end of stream. ``ctrunc`` is the MSG_CTRUNC flag: the
        kernel dropped fds that did not fit, so the stream cannot be trusted any more.
        Never raises for anything in ``data``/``fds``; problems become events.
        """
        fds = list(fds)
        if self.state is not State.OPEN:
            self._close_all(fds)
            return
        if ctrunc:
            self._close_all(fds)
            self._fail(
                "ancillary data truncated (MSG_CTRUNC): the peer passed more file descriptors "
                f"than this side accepts in one message (max_fds={self.max_fds}); the extra ones were lost"
            )
            return
        if not data:
            if fds:
                self._close_all(fds)
                self._fail(f"{len(fds)} file descriptor(s) arrived without any data")
                return
            self._eof()
            return
        self.last_heard = now
        start = self._rx_total
        self._rx_total += len(data)
        if fds:
            if len(fds) > self.max_fds:
                self._close_all(fds)
                self._fail(f"{len(fds)} file descriptors arrived in one message, more than max_fds={self.max_fds}")
                return
            self._batches.append(_FdBatch(start, self._rx_total, fds))
        self._buf += data
        self._parse(now)

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed (or the connection is over)."""
        return self._events.popleft() if self._events else None

    def _parse(self, now: float) -> None:
        buf = self._buf
        pos = 0
        while self.state is State.OPEN:
            avail = len(buf) - pos
            if avail < HEADER_SIZE:
                break
            (length,) = _LEN.unpack_from(buf, pos)
            if length > self.max_frame_size:
                self._fail(f"frame of {length} bytes exceeds max_frame_size={self.max_frame_size}")
                return
            if length == 0:
                self._fail("empty frame (length 0)")
                return
            if avail < HEADER_SIZE + length:
                break
            frame_start = self._buf_offset + pos
            payload = bytes(buf[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
            pos += HEADER_SIZE + length
            self.frames_received += 1
            self._handle_frame(frame_start, payload, now)
            if self.state is State.OPEN:
                self._retire_batches(self._buf_offset + pos)
        if self.state is State.OPEN and pos:
            del buf[:pos]
            self._buf_offset += pos

    def _retire_batches(self, next_frame_start: int) -> None:
        """Drop batches the parser has moved past; an unclaimed one is an error."""
        while self._batches and self._batches[0].end <= next_frame_start:
            batch = self._batches.popleft()
            if not batch.claimed:
                n = len(batch.fds)
                self._close_all(batch.fds)
                self._fail(f"{n} file descriptor(s) arrived with frames that announced none")
                return

    def _claim_fds(self, frame_start: int, n: int) -> tuple[int, ...]:
        if n == 0:
            return ()
        for batch in self._batches:
            if batch.start > frame_start:
                break
            if frame_start < batch.end:
                if batch.claimed:
                    raise _Bad("two frames claim the file descriptors of one send")
                if len(batch.fds) != n:
                    raise _Bad(f"frame announces {n} file descriptor(s) but {len(batch.fds)} arrived with it")
                batch.claimed = True
                fds, batch.fds = tuple(batch.fds), []
                return fds
        raise _Bad(f"frame announces {n} file descriptor(s) but none arrived with its first byte")

    def _handle_frame(self, frame_start: int, payload: bytes, now: float) -> None:
        try:
            self._handle_frame_or_raise(frame_start, payload, now)
        except _Bad as e:
            self._fail(str(e))

    def _handle_frame_or_raise(self, frame_start: int, payload: bytes, now: float) -> None:
        try:
            msg = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=False, ext_hook=_reject_ext)
        except Exception as e:  # noqa: BLE001 -- decoding untrusted bytes: any failure is the peer's
            raise _Bad(f"undecodable frame ({type(e).__name__}: {e})") from None
        if not isinstance(msg, dict):
            raise _Bad(f"frame payload is a {type(msg).__name__}, not a map")
        t = msg.get("t")
        if not _is_int(t):
            raise _Bad(f"frame type 't' must be an integer, got {t!r:.40}")
        n = msg.get("n", 0)
        if not _is_int(n) or n < 0:
            raise _Bad(f"fd count 'n' must be a non-negative integer, got {n!r:.40}")
        if n > self.max_fds:
            raise _Bad(f"frame announces {n} file descriptors, more than max_fds={self.max_fds}")

        if t == T_REQUEST:
            rid = self._get_id(msg)
            method = self._get_method(msg)
            budget = msg.get("d")
            if budget is not None and (
                not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget) or budget < 0
            ):
                raise _Bad(f"request deadline budget 'd' must be a finite number >= 0, got {budget!r:.40}")
            if rid <= self._peer_last_id:
                raise _Bad(f"request id {rid} is not greater than the previous one ({self._peer_last_id}); ids must be unique")
            fds = self._claim_fds(frame_start, n)
            self._peer_last_id = rid
            self._awaiting_response.add(rid)
            deadline = None if budget is None else now + float(budget)
            self._events.append(Request(rid, method, msg.get("p"), fds, deadline))
        elif t == T_RESPONSE:
            rid = self._get_id(msg)
            error = msg.get("e")
            if error is not None:
                self._check_error(error, _Bad)
                if "r" in msg and msg["r"] is not None:
                    raise _Bad(f"response {rid} carries both a result and an error")
            fds = self._claim_fds(frame_start, n)
            if rid in self._outstanding:
                del self._outstanding[rid]
                self._events.append(Response(rid, msg.get("r"), error, fds))
            elif rid in self._abandoned:
                # We gave up on it (timeout/cancel); the answer is late, not wrong.
                del self._abandoned[rid]
                self.late_responses += 1
                self._close_all(fds)
            else:
                self._close_all(fds)
                raise _Bad(f"response to unknown or already answered request id {rid}")
        elif t == T_NOTIFICATION:
            method = self._get_method(msg)
            fds = self._claim_fds(frame_start, n)
            self._events.append(Notification(method, msg.get("p"), fds))
        elif t == T_HEARTBEAT:
            self._no_fds(n, "heartbeat")
            self._events.append(Heartbeat())
        elif t == T_HELLO:
            self._no_fds(n, "hello")
            if self.peer_hello is not None:
                raise _Bad("duplicate hello")
            v, s, f = msg.get("v"), msg.get("s"), msg.get("f")
            if not (_is_int(v) and _is_int(s) and _is_int(f)) or s < 16 or f < 0:
                raise _Bad(f"malformed hello (v={v!r:.20}, s={s!r:.20}, f={f!r:.20})")
            if v != PROTOCOL_VERSION:
                raise _Bad(f"peer speaks IPC protocol version {v}, this side speaks {PROTOCOL_VERSION}")
            self.peer_hello = Hello(v, s, f)
            self._events.append(self.peer_hello)
        elif t == T_CLOSE:
            self._no_fds(n, "close")
            reason, code = msg.get("x"), msg.get("c")
            if not isinstance(reason, (str, type(None))) or not isinstance(code, (str, type(None))):
                raise _Bad("malformed close frame")
            self._events.append(ConnectionClosed(reason, code))
            self._finish(State.CLOSED)
        else:
            raise _Bad(f"unknown frame type {t}")

    @staticmethod
    def _get_id(msg: dict) -> int:
        rid = msg.get("i")
        if not _is_int(rid) or not 1 <= rid <= MAX_REQUEST_ID:
            raise _Bad(f"request id 'i' must be an integer in [1, 2**63), got {rid!r:.40}")
        return rid

    @staticmethod
    def _get_method(msg: dict) -> str:
        method = msg.get("m")
        if not isinstance(method, str) or not method:
            raise _Bad(f"method 'm' must be a non-empty string, got {method!r:.40}")
        return method

    @staticmethod
    def _no_fds(n: int, what: str) -> None:
        if n:
            raise _Bad(f"a {what} frame cannot carry file descriptors")

    @staticmethod
    def _check_error(error: Any, exc: type[Exception]) -> None:
        if not isinstance(error, Mapping):
            raise exc(f"error must be a map, got {type(error).__name__}")
        if not isinstance(error.get("type"), str) or not isinstance(error.get("message"), str):
            raise exc("error map needs string 'type' and 'message'")

    def _eof(self) -> None:
        partial = len(self._buf)
        if partial:
            self._fail(f"peer closed the connection in the middle of a frame ({partial} bytes of it received)")
            return
        self._events.append(ConnectionClosed(None, None))
        self._finish(State.CLOSED)

    def _fail(self, reason: str) -> None:
        self._events.append(ProtocolError(reason))
        self._finish(State.ERROR)

    def _finish(self, state: State) -> None:
        """Enter a final state: drop buffered input and close every undelivered fd."""
        self.state = state
        for batch in self._batches:
            if not batch.claimed:
                self._close_all(batch.fds)
        self._batches.clear()
        self._buf = bytearray()

    def _close_all(self, fds: Iterable[int]) -> None:
        for fd in fds:
            try:
                self._close_fd(fd)
            except OSError:
                pass  # already closed: nothing left to leak

    # ------------------------------------------------------------------ deadlines, liveness

    def expired(self, now: float) -> list[int]:
        """Ids of our requests whose deadline is <= ``now``; they are forgotten (a late answer is dropped)."""
        out = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, rid = heapq.heappop(heap)
            if self._outstanding.get(rid, -math.inf) == deadline:
                del self._outstanding[rid]
                self._abandon(rid)
                out.append(rid)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline among our outstanding requests (for arming one timer)."""
        heap = self._deadlines
        while heap and self._outstanding.get(heap[0][1], -math.inf) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def cancel(self, request_id: int) -> bool:
        """Stop waiting for ``request_id`` (e.g. the caller was cancelled); a late answer is dropped."""
        if request_id in self._outstanding:
            del self._outstanding[request_id]
            self._abandon(request_id)
            return True
        return False

    def outstanding(self) -> list[int]:
        """Ids of our requests still waiting for an answer."""
        return list(self._outstanding)

    def peer_silent_for(self, now: float) -> float:
        """Seconds since anything arrived from the peer."""
        return now - self.last_heard

    def _abandon(self, rid: int) -> None:
        self._abandoned[rid] = None
        while len(self._abandoned) > self._remember_abandoned:
            self._abandoned.popitem(last=False)

    # ------------------------------------------------------------------ sending

    def send_request(
        self,
        method: str,
        params: Any = None,
        fds: Iterable[int] = (),
        *,
        deadline: float | None = None,
        now: float | None = None,
    ) -> tuple[int, bytes, tuple[int, ...]]:
        """Encode a request; returns (id, bytes, fds). ``deadline`` is absolute in the
        caller's clock and needs ``now`` (the peer is sent the remaining budget)."""
        self._check_open()
        self._check_method(method)
        fds = self._check_fds(fds)
        rid = self._next_id
        msg: dict[str, Any] = {"t": T_REQUEST, "i": rid, "m": method}
        if params is not None:
            msg["p"] = params
        if fds:
            msg["n"] = len(fds)
        if deadline is not None:
            if now is None:
                raise LocalProtocolError("a request deadline needs the current time (now=...)")
            if not math.isfinite(deadline):
                raise LocalProtocolError(f"deadline must be finite, got {deadline}")
            msg["d"] = max(0.0, float(deadline - now))
        data = self._encode(msg, f"request {method!r}")
        self._next_id += 1
        self._outstanding[rid] = deadline
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, rid))
        return rid, data, fds

    def send_response(
        self,
        request_id: int,
        result: Any = None,
        error: Mapping[str, Any] | None = None,
        fds: Iterable[int] = (),
    ) -> tuple[bytes, tuple[int, ...]]:
        """Encode the answer to the peer's request ``request_id``; returns (bytes, fds)."""
        self._check_open()
        if request_id not in self._awaiting_response:
            raise LocalProtocolError(f"no request with id {request_id} from the peer awaits a response")
        fds = self._check_fds(fds)
        msg: dict[str, Any] = {"t": T_RESPONSE, "i": request_id}
        if error is not None:
            self._check_error(error, LocalProtocolError)
            if result is not None:
                raise LocalProtocolError("a response carries a result or an error, not both")
            msg["e"] = dict(error)
        elif result is not None:
            msg["r"] = result
        if fds:
            msg["n"] = len(fds)
        data = self._encode(msg, f"response to request {request_id}")
        self._awaiting_response.discard(request_id)
        return data, fds

    def send_notification(self, method: str, params: Any = None, fds: Iterable[int] = ()) -> tuple[bytes, tuple[int, ...]]:
        """Encode a one-way notification; returns (bytes, fds)."""
        self._check_open()
        self._check_method(method)
        fds = self._check_fds(fds)
        msg: dict[str, Any] = {"t": T_NOTIFICATION, "m": method}
        if params is not None:
            msg["p"] = params
        if fds:
            msg["n"] = len(fds)
        return self._encode(msg, f"notification {method!r}"), fds

    def send_heartbeat(self) -> bytes:
        """Encode a heartbeat frame."""
        self._check_open()
        return self._encode({"t": T_HEARTBEAT}, "heartbeat")

    def send_hello(self) -> bytes:
        """Encode our hello: protocol version and the limits we accept."""
        self._check_open()
        return self._encode({"t": T_HELLO, "v": PROTOCOL_VERSION, "s": self.max_frame_size, "f": self.max_fds}, "hello")

    def send_close(self, reason: str, code: str = "closing") -> bytes:
        """Encode a close frame telling the peer why we hang up; no more sends after it.

        Allowed also in state ERROR, so the peer learns which protocol error we saw.
        """
        if self._close_sent:
            raise LocalProtocolError("close frame already sent")
        # Keep the reason small whatever the caller passed: it must fit any peer's limit.
        data = self._encode({"t": T_CLOSE, "x": str(reason)[:2000], "c": str(code)[:64]}, "close", check_state=False)
        self._close_sent = True
        if self.state is State.OPEN:
            self._finish(State.CLOSED)
        return data

    def _check_open(self) -> None:
        if self.state is not State.OPEN or self._close_sent:
            raise LocalProtocolError(f"cannot send: connection is {self.state.value}")

    @staticmethod
    def _check_method(method: Any) -> None:
        if not isinstance(method, str) or not method:
            raise LocalProtocolError(f"method must be a non-empty string, got {method!r}")

    def _send_limits(self) -> tuple[int, int]:
        frame, nfds = self.max_frame_size, self.max_fds
        if self.peer_hello is not None:
            frame = min(frame, self.peer_hello.max_frame_size)
            nfds = min(nfds, self.peer_hello.max_fds)
        return frame, nfds

    def _check_fds(self, fds: Iterable[int]) -> tuple[int, ...]:
        fds = tuple(fds)
        for fd in fds:
            if not _is_int(fd) or fd < 0:
                raise LocalProtocolError(f"file descriptors must be non-negative integers, got {fd!r}")
        limit = self._send_limits()[1]
        if len(fds) > limit:
            raise LocalProtocolError(f"cannot pass {len(fds)} file descriptors in one frame: the limit is {limit}")
        return fds

    def _encode(self, msg: dict, what: str, *, check_state: bool = True) -> bytes:
        try:
            payload = msgpack.packb(msg, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise LocalProtocolError(f"cannot encode {what}: {e}") from None
        limit = self._send_limits()[0]
        if len(payload) > limit:
            raise LocalProtocolError(f"{what} is {len(payload)} bytes encoded, over the frame size limit of {limit}")
        self.frames_sent += 1
        return _LEN.pack(len(payload)) + payload
