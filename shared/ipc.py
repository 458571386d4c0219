"""The IPC channel between hotplane processes: a thin asyncio shell around
:class:`hotplane.shared.ipc_protocol.Connection`.

A unix stream socket in the instance's runtime directory (mode 0600) carries
length-prefixed msgpack frames: requests with ids and deadlines, responses,
notifications, heartbeats, and file descriptors (SCM_RIGHTS). Each accepted peer is
authenticated with SO_PEERCRED: same uid as the server, or root (plus ``allow_uids``);
a client checks the server the same way.

asyncio's stream transports cannot carry SCM_RIGHTS, so the shell drives a raw
non-blocking socket with ``loop.add_reader``/``add_writer`` and ``recvmsg``/``sendmsg``;
that works on the default loop and on uvloop alike.

Handshake: the server sends a hello right after accepting (or a close frame with
code ``"refused"``); the client waits for it, then sends its own. ``connect`` therefore
fails with a clear :class:`IpcRefused` instead of a later, puzzling EOF.

File descriptor ownership: fds you pass to ``request``/``notify`` stay yours (the
channel sends duplicates, so you may close yours as soon as the call returns). Fds you
receive (``Reply.fds``, ``request.fds``, ``notification.fds``) are yours to close. A
handler returning ``Reply(result, fds, close_fds=True)`` hands its fds over to be
closed once queued.
"""

from __future__ import annotations

import array
import asyncio
import inspect
import itertools
import logging
import os
import socket
import stat
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from hotplane.shared.ipc_protocol import (
    DEFAULT_MAX_FDS,
    DEFAULT_MAX_FRAME_SIZE,
    ConnectionClosed,
    Connection,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Notification,
    ProtocolError,
    Request,
    Response,
    State,
)

__all__ = [
    "Channel",
    "IpcClosed",
    "IpcError",
    "IpcRefused",
    "IpcTimeout",
    "Notification",
    "PeerCred",
    "RemoteError",
    "Reply",
    "Request",
    "Server",
    "connect",
    "peer_credentials",
    "request_sync",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_MISSED_HEARTBEATS = 3
RECV_SIZE = 256 * 1024
HIGH_WATER = 4 << 20  # notify() waits while more than this is queued for sending
MAX_IOV = 64  # buffers per sendmsg
DEADLINE_EXCEEDED = "DeadlineExceeded"  # error type of a handler stopped at the caller's deadline
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_PEERCRED = struct.Struct("3i")


# --------------------------------------------------------------------------- errors, records


class IpcError(Exception):
    """Any failure of the IPC channel."""


class IpcClosed(IpcError):
    """The channel is closed (by us, by the peer, or because the connection was lost)."""


class IpcTimeout(IpcError, TimeoutError):
    """A request or a connect did not finish before its deadline."""


class IpcRefused(IpcClosed):
    """The server refused us (e.g. our uid is not allowed)."""


class RemoteError(IpcError):
    """The peer's handler failed; ``type`` and ``message`` describe how.

    A handler may also raise it to choose the error type the caller sees.
    """

    def __init__(self, type: str, message: str, data: Any = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.data = data


@dataclass(frozen=True, slots=True)
class PeerCred:
    """Credentials of the process at the other end, from SO_PEERCRED."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A request's answer: ``result`` and the fds that came with it.

    Returned by handlers too; ``close_fds=True`` transfers the fds to the channel.
    """

    result: Any = None
    fds: tuple[int, ...] = ()
    close_fds: bool = False


Handler = Callable[["Channel", Request], Awaitable[Any]]
NotificationCallback = Callable[["Channel", Notification], Any]
SilenceCallback = Callable[["Channel", float], Any]


def peer_credentials(sock: socket.socket) -> PeerCred:
    """(pid, uid, gid) of the peer of a connected unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return PeerCred(*_PEERCRED.unpack(raw))


def _uid_allowed(uid: int, allow_uids: Iterable[int] | None) -> bool:
    return uid == os.geteuid() or uid == 0 or (allow_uids is not None and uid in allow_uids)


def _refusal(cred: PeerCred, allow_uids: Iterable[int] | None, what: str) -> str:
    extra = f", or one of {sorted(allow_uids)}" if allow_uids else ""
    return (
        f"{what} pid {cred.pid} runs as uid {cred.uid}: only uid {os.geteuid()} (ours) or root{extra} "
        "may use this IPC channel"
    )


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _rights(fds: tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def _dup_all(fds: Iterable[int]) -> tuple[int, ...]:
    """Duplicate the caller's fds so they may close theirs while ours wait to be sent."""
    dups: list[int] = []
    try:
        for fd in fds:
            if not isinstance(fd, int) or isinstance(fd, bool):
                raise IpcError(f"file descriptors must be integers, got {fd!r}")
            try:
                dups.append(os.dup(fd))
            except OSError as e:
                raise IpcError(f"cannot pass file descriptor {fd}: {e.strerror}") from None
    except BaseException:
        _close_quietly(dups)
        raise
    return tuple(dups)


def _close_quietly(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise IpcError(f"unix socket path is too long ({len(os.fsencode(path))} > {_SUN_PATH_MAX} bytes): {path}")
    return path


def _connect_error(path: str, e: OSError) -> IpcError:
    if isinstance(e, FileNotFoundError):
        return IpcClosed(f"no IPC server at {path}: the socket does not exist")
    if isinstance(e, ConnectionRefusedError):
        return IpcClosed(f"no IPC server listening at {path} (stale socket file)")
    if isinstance(e, PermissionError):
        return IpcRefused(f"permission denied connecting to {path} (the socket is mode 0600 for its owner): {e.strerror}")
    return IpcError(f"cannot connect to {path}: {e}")


# --------------------------------------------------------------------------- channel


class _Out:
    """A frame waiting to be written; ``fds`` go with its first byte."""

    __slots__ = ("view", "fds")

    def __init__(self, data: bytes, fds: tuple[int, ...]) -> None:
        self.view = memoryview(data)
        self.fds = fds


class _Job:
    __slots__ = ("started", "drop")

    def __init__(self, drop: Callable[[], None] | None) -> None:
        self.started = False
        self.drop = drop


def _discard(aw: Awaitable[Any], fds: Iterable[int]) -> None:
    """Release a callback's awaitable that will never be awaited, and its fds."""
    close = getattr(aw, "close", None)
    if close is not None:
        close()
    _close_quietly(fds)


class _Pending:
    __slots__ = ("future", "method", "timeout")

    def __init__(self, future: asyncio.Future, method: str, timeout: float | None) -> None:
        self.future = future
        self.method = method
        self.timeout = timeout


class Channel:
    """One connected end. Made by :func:`connect` or by a :class:`Server` per peer."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: PeerCred,
        handler: Handler | None = None,
        on_notification: NotificationCallback | None = None,
        on_peer_silent: SilenceCallback | None = None,
        heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
        missed_heartbeats: int = DEFAULT_MISSED_HEARTBEATS,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_fds: int = DEFAULT_MAX_FDS,
        name: str = "ipc",
    ) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0 or None")
        if missed_heartbeats < 1:
            raise ValueError("missed_heartbeats must be >= 1")
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        sock.setblocking(False)
        self.peer = peer
        self.name = name
        self._handler = handler
        self._on_notification = on_notification
        self._on_peer_silent = on_peer_silent
        self._hb_interval = heartbeat_interval
        self._missed = missed_heartbeats
        self._proto = Connection(max_frame_size=max_frame_size, max_fds=max_fds, now=self._loop.time())
        self._ancbufsize = socket.CMSG_SPACE(max_fds * 4) if max_fds else 0
        self._pending: dict[int, _Pending] = {}
        self._outq: deque[_Out] = deque()
        self._out_bytes = 0
        self._writing = False
        self._drain_waiters: list[asyncio.Future] = []
        self._tasks: dict[asyncio.Task, _Job] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._hb_task: asyncio.Task | None = None
        self._hello: asyncio.Future = self._loop.create_future()
        self._is_client = False
        self._closing = False
        self._closed = False
        self._close_exc: IpcError | None = None
        self._closed_event = asyncio.Event()
        self._silent_reported = False
        self._close_callbacks: list[Callable[[Channel], None]] = []
        self.heartbeats_received = 0

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        """True once the channel is closed (or closing)."""
        return self._closed or self._closing

    @property
    def close_reason(self) -> IpcError | None:
        """Why the channel closed (None while open)."""
        return self._close_exc

    @property
    def peer_hello(self) -> Hello | None:
        """The peer's announced protocol version and limits, once received."""
        return self._proto.peer_hello

    def peer_silent_for(self) -> float:
        """Seconds since anything arrived from the peer."""
        return self._proto.peer_silent_for(self._loop.time())

    async def request(
        self, method: str, params: Any = None, fds: Iterable[int] = (), timeout: float | None = DEFAULT_TIMEOUT
    ) -> Reply:
        """Call ``method`` on the peer and wait for its answer.

        Raises :class:`IpcTimeout` after ``timeout`` seconds (None: wait as long as the
        channel lives), :class:`RemoteError` if the peer's handler failed,
        :class:`IpcClosed` if the channel closes first, :class:`IpcError` if the request
        cannot be sent (unencodable params, too large, bad fds).
        """
        self._check_usable()
        now = self._loop.time()
        deadline = None if timeout is None else now + timeout
        dups = _dup_all(fds)
        try:
            rid, data, _ = self._proto.send_request(method, params, dups, deadline=deadline, now=now)
        except LocalProtocolError as e:
            _close_quietly(dups)
            raise IpcError(f"cannot send request {method!r}: {e}") from None
        fut = self._loop.create_future()
        self._pending[rid] = _Pending(fut, method, timeout)
        self._enqueue(data, dups)
        if not self._closed:
            self._arm_deadline_timer()
        try:
            return await fut
        except asyncio.CancelledError:
            self._proto.cancel(rid)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                _close_quietly(fut.result().fds)  # the answer came, but nobody will take its fds
            raise
        finally:
            self._pending.pop(rid, None)

    async def notify(self, method: str, params: Any = None, fds: Iterable[int] = ()) -> None:
        """Send a one-way notification (waits only if too much output is queued)."""
        self._check_usable()
        dups = _dup_all(fds)
        try:
            data, _ = self._proto.send_notification(method, params, dups)
        except LocalProtocolError as e:
            _close_quietly(dups)
            raise IpcError(f"cannot send notification {method!r}: {e}") from None
        self._enqueue(data, dups)
        if self._out_bytes > HIGH_WATER:
            await self._drain()

    async def close(self, reason: str = "closing", *, timeout: float = 1.0) -> None:
        """Tell the peer we hang up, flush what is queued (up to ``timeout``), and close.

        Pending requests fail with :class:`IpcClosed`; running handlers are cancelled.
        """
        if not self._closed and not self._closing:
            self._closing = True
            try:
                self._enqueue(self._proto.send_close(reason, "closing"), ())
            except (LocalProtocolError, IpcError):
                pass
            if not self._closed and self._outq:
                try:
                    async with asyncio.timeout(timeout):
                        await self._drain(0)
                except (TimeoutError, IpcError):
                    pass
            self._abort(IpcClosed(f"channel closed locally ({reason})"))
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the channel is closed and its handler tasks have finished."""
        await self._closed_event.wait()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Channel {self.name} peer pid={self.peer.pid} uid={self.peer.uid} {state}>"

    # ------------------------------------------------------------------ lifecycle

    def _start(self, *, is_client: bool) -> None:
        self._is_client = is_client
        self._loop.add_reader(self._fd, self._on_readable)
        if not is_client:
            # The server speaks first; the client answers once it knows it is accepted.
            self._enqueue(self._proto.send_hello(), ())
        if self._hb_interval is not None:
            self._hb_task = self._loop.create_task(self._heartbeat_loop())

    def _check_usable(self) -> None:
        if self._closed or self._closing:
            raise self._close_exc or IpcClosed("channel is closing")

    def _abort(self, exc: IpcError, *, tell_peer: tuple[str, str] | None = None) -> None:
        """Close now: best-effort close frame, fail pending requests, cancel tasks."""
        if self._closed:
            return
        if tell_peer is not None:
            try:
                self._enqueue(self._proto.send_close(*tell_peer), ())
            except (LocalProtocolError, IpcError):
                pass
        if self._closed:  # the enqueue above may have hit a dead socket and aborted already
            return
        self._closed = True
        self._close_exc = exc
        try:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        finally:
            self._writing = False
            self._sock.close()
        for out in self._outq:
            _close_quietly(out.fds)
        self._outq.clear()
        self._out_bytes = 0
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._hello.done():
            self._hello.set_exception(exc)
            self._hello.exception()  # retrieved: connect() may have stopped waiting
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(exc)
        self._drain_waiters.clear()
        current = asyncio.current_task()
        if self._hb_task is not None and self._hb_task is not current:
            self._hb_task.cancel()
        for t, job in list(self._tasks.items()):
            if t is not current:
                if not job.started and job.drop is not None:
                    job.drop()  # it will never run: release what it was given
                t.cancel()
        self._closed_event.set()
        for cb in self._close_callbacks:
            try:
                cb(self)
            except Exception:
                log.exception("IPC %s: close callback failed", self.name)

    def _spawn(self, start: Callable[[], Awaitable[Any]], drop: Callable[[], None] | None = None) -> None:
        """Run ``start()`` in a task; if the channel closes before the task gets to
        run, ``drop()`` releases its inputs (fds) instead."""
        job = _Job(drop)

        async def body() -> None:
            job.started = True
            await start()

        task = self._loop.create_task(body())
        self._tasks[task] = job
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    # ------------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        for _ in range(16):  # bounded, so one busy peer cannot starve the loop
            if self._closed:
                return
            try:
                data, anc, flags, _ = self._sock.recvmsg(RECV_SIZE, self._ancbufsize, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._abort(IpcClosed(f"connection to peer pid {self.peer.pid} lost: {e.strerror or e}"))
                return
            fds = _fds_from_ancdata(anc)
            self._proto.receive_data(data, fds, self._loop.time(), ctrunc=bool(flags & socket.MSG_CTRUNC))
            self._process_events()
            if not data:
                return

    def _process_events(self) -> None:
        while not self._closed:
            ev = self._proto.next_event()
            if ev is None:
                return
            if isinstance(ev, Response):
                self._on_response(ev)
            elif isinstance(ev, Request):
                self._on_request(ev)
            elif isinstance(ev, Notification):
                self._on_notify(ev)
            elif isinstance(ev, Heartbeat):
                self.heartbeats_received += 1
            elif isinstance(ev, Hello):
                if self._is_client:
                    self._enqueue(self._proto.send_hello(), ())
                if not self._hello.done():
                    self._hello.set_result(ev)
            elif isinstance(ev, ConnectionClosed):
                self._on_peer_closed(ev)
            elif isinstance(ev, ProtocolError):
                log.warning(
                    "IPC %s: protocol error from peer pid %d uid %d: %s; closing the connection",
                    self.name, self.peer.pid, self.peer.uid, ev.reason,
                )
                self._abort(IpcError(f"protocol error: {ev.reason}"), tell_peer=(f"protocol error: {ev.reason}", "protocol_error"))
        # Closed while events were queued: their fds have no taker.
        while (ev := self._proto.next_event()) is not None:
            _close_quietly(getattr(ev, "fds", ()))

    def _on_peer_closed(self, ev: ConnectionClosed) -> None:
        if ev.code == "refused":
            exc: IpcError = IpcRefused(f"the IPC server refused the connection: {ev.reason}")
        elif ev.reason:
            exc = IpcClosed(f"peer closed the connection ({ev.code}): {ev.reason}")
        else:
            exc = IpcClosed(f"peer pid {self.peer.pid} closed the connection")
        if ev.code == "protocol_error":
            log.warning("IPC %s: peer pid %d reports a protocol error on our side: %s", self.name, self.peer.pid, ev.reason)
        else:
            log.debug("IPC %s: %s", self.name, exc)
        self._abort(exc)

    def _on_response(self, ev: Response) -> None:
        p = self._pending.get(ev.id)
        if p is None or p.future.done():
            _close_quietly(ev.fds)
            return
        if ev.error is not None:
            _close_quietly(ev.fds)
            p.future.set_exception(_remote_error(ev.error, p.method))
        else:
            p.future.set_result(Reply(ev.result, ev.fds))

    def _on_request(self, ev: Request) -> None:
        if self._handler is None:
            _close_quietly(ev.fds)
            self._respond(ev.id, error={"type": "NoHandler", "message": f"this side does not serve requests ({ev.method!r})"})
            return
        self._spawn(lambda: self._run_handler(ev), lambda: _close_quietly(ev.fds))

    async def _run_handler(self, req: Request) -> None:
        assert self._handler is not None
        error: dict[str, Any] | None = None
        reply: Reply | None = None
        try:
            async with asyncio.timeout_at(req.deadline) as cm:
                out = await self._handler(self, req)
            reply = _as_reply(out)
        except asyncio.CancelledError:
            raise  # channel closing: nobody to answer
        except TimeoutError as e:
            if cm.expired():
                error = {"type": DEADLINE_EXCEEDED, "message": f"{req.method!r} did not finish before the caller's deadline"}
            else:
                error = {"type": type(e).__name__, "message": str(e)}
        except RemoteError as e:
            error = {"type": e.type, "message": e.message, "data": e.data}
        except Exception as e:  # noqa: BLE001 -- a handler's failure is the caller's answer
            log.debug("IPC %s: handler for %r raised", self.name, req.method, exc_info=True)
            error = {"type": type(e).__name__, "message": str(e)}
        if reply is not None:
            self._respond(req.id, reply.result, fds=reply.fds)
            if reply.close_fds:
                _close_quietly(reply.fds)
        else:
            self._respond(req.id, error=error)

    def _respond(self, rid: int, result: Any = None, *, error: dict[str, Any] | None = None, fds: tuple[int, ...] = ()) -> None:
        if self._closed:
            return
        try:
            dups = _dup_all(fds)
        except IpcError as e:
            result, error, dups = None, {"type": "BadFileDescriptor", "message": str(e)}, ()
        try:
            data, _ = self._proto.send_response(rid, result, error, dups)
        except LocalProtocolError as e:
            _close_quietly(dups)
            if self._proto.state is not State.OPEN:
                return
            try:
                data, dups = self._proto.send_response(rid, error={"type": "EncodeError", "message": str(e)})[0], ()
            except LocalProtocolError:
                return
        self._enqueue(data, dups)

    def _on_notify(self, ev: Notification) -> None:
        cb = self._on_notification
        if cb is None:
            _close_quietly(ev.fds)
            log.debug("IPC %s: dropping notification %r (no callback)", self.name, ev.method)
            return
        try:
            out = cb(self, ev)
        except Exception:
            log.exception("IPC %s: notification callback for %r failed", self.name, ev.method)
            return
        if inspect.isawaitable(out):
            self._spawn(lambda: self._guard(out, ev.method), lambda: _discard(out, ev.fds))

    async def _guard(self, aw: Awaitable[Any], what: str) -> None:
        try:
            await aw
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("IPC %s: callback for %r failed", self.name, what)

    # ------------------------------------------------------------------ writing

    def _enqueue(self, data: bytes, fds: tuple[int, ...]) -> None:
        if self._closed:
            _close_quietly(fds)
            raise self._close_exc or IpcClosed("channel is closed")
        self._outq.append(_Out(data, fds))
        self._out_bytes += len(data)
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        q = self._outq
        while q:
            head = q[0]
            fds = head.fds
            bufs = [head.view]
            # A frame with fds starts its own sendmsg (the receiver matches fds to the
            # frame whose first byte they arrive with); frames without fds may follow it.
            for out in itertools.islice(q, 1, MAX_IOV):
                if out.fds:
                    break
                bufs.append(out.view)
            try:
                sent = self._sock.sendmsg(bufs, _rights(fds), socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._loop.add_writer(self._fd, self._flush)
                    self._writing = True
                return
            except OSError as e:
                self._abort(IpcClosed(f"connection to peer pid {self.peer.pid} lost while sending: {e.strerror or e}"))
                return
            if fds:
                _close_quietly(fds)  # the kernel holds its own references now
                head.fds = ()
            self._out_bytes -= sent
            while sent:
                out = q[0]
                n = len(out.view)
                if sent >= n:
                    sent -= n
                    q.popleft()
                else:
                    out.view = out.view[sent:]
                    sent = 0
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    async def _drain(self, low: int = HIGH_WATER // 2) -> None:
        while self._outq and self._out_bytes > low:
            if self._closed:
                raise self._close_exc or IpcClosed("channel is closed")
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w

    # ------------------------------------------------------------------ timers

    def _arm_deadline_timer(self) -> None:
        nd = self._proto.next_deadline()
        if nd is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None:
            if self._timer_when is not None and self._timer_when <= nd:
                return  # fires first and re-arms for the rest (no timer churn per request)
            self._timer.cancel()
        self._timer = self._loop.call_at(nd, self._on_deadline)
        self._timer_when = nd

    def _on_deadline(self) -> None:
        self._timer = None
        # Some loops round timers to the millisecond and fire a little early; the
        # timer was armed for this deadline, so it counts as reached.
        now = max(self._loop.time(), self._timer_when or 0.0)
        for rid in self._proto.expired(now):
            p = self._pending.get(rid)
            if p is not None and not p.future.done():
                p.future.set_exception(IpcTimeout(f"request {p.method!r} (id {rid}) got no answer within {p.timeout}s"))
        if not self._closed:
            self._arm_deadline_timer()

    async def _heartbeat_loop(self) -> None:
        assert self._hb_interval is not None
        limit = self._hb_interval * self._missed
        while not self._closed:
            await asyncio.sleep(self._hb_interval)
            if self._closed or self._closing:
                return
            if self._proto.state is State.OPEN and self._hello.done():
                self._enqueue(self._proto.send_heartbeat(), ())
            silent = self._proto.peer_silent_for(self._loop.time())
            if silent > limit:
                # Read what is waiting first: after we were stopped or starved, the
                # peer's heartbeats may sit unread in the socket buffer.
                self._on_readable()
                if self._closed:
                    return
                silent = self._proto.peer_silent_for(self._loop.time())
            if silent <= limit:
                self._silent_reported = False
                continue
            if self._silent_reported:
                continue
            self._silent_reported = True
            if self._on_peer_silent is None:
                log.warning("IPC %s: peer pid %d silent for %.2fs (%d heartbeats missed); closing", self.name, self.peer.pid, silent, self._missed)
                self._abort(IpcClosed(f"peer pid {self.peer.pid} silent for {silent:.2f}s"), tell_peer=("no heartbeat from you", "silent"))
                return
            try:
                out = self._on_peer_silent(self, silent)
                if inspect.isawaitable(out):
                    await out
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("IPC %s: on_peer_silent callback failed", self.name)


def _remote_error(error: dict[str, Any], method: str) -> IpcError:
    if error["type"] == DEADLINE_EXCEEDED:
        # The handler ran out of the time we gave it: to the caller that is a timeout.
        return IpcTimeout(f"request {method!r} timed out: {error['message']}")
    return RemoteError(error["type"], error["message"], error.get("data"))


def _as_reply(out: Any) -> Reply:
    """A handler returns Reply, (result, fds), or None (no result, no fds)."""
    if isinstance(out, Reply):
        return out
    if out is None:
        return Reply()
    if isinstance(out, tuple) and len(out) == 2:
        result, fds = out
        return Reply(result, tuple(fds or ()))
    raise TypeError(f"handler must return (result, fds), Reply or None, not {type(out).__name__}")


# --------------------------------------------------------------------------- server


class Server:
    """A listening IPC socket; one :class:`Channel` per authenticated peer."""

    def __init__(self, sock: socket.socket, path: str, *, allow_uids: Iterable[int] | None, on_connect: Callable[[Channel], Any] | None, channel_kw: dict[str, Any]) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self.path = path
        self._allow_uids = frozenset(allow_uids) if allow_uids is not None else None
        self._on_connect = on_connect
        self._channel_kw = channel_kw
        self._ino = os.stat(path).st_ino
        self.channels: set[Channel] = set()
        self.refused = 0
        self._closed = False
        self._closed_event = asyncio.Event()
        self._loop.add_reader(sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(64):
            if self._closed:
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: keep serving the ones we have
                log.warning("IPC server %s: accept failed: %s", self.path, e)
                return
            try:
                self._admit(conn)
            except Exception:
                log.exception("IPC server %s: setting up a connection failed", self.path)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            cred = peer_credentials(conn)
        except OSError as e:
            log.warning("IPC server %s: cannot read peer credentials (%s); closing", self.path, e)
            conn.close()
            return
        if not _uid_allowed(cred.uid, self._allow_uids):
            self.refused += 1
            why = _refusal(cred, self._allow_uids, "client")
            log.warning("IPC server %s: refusing connection from pid %d uid %d gid %d: %s", self.path, cred.pid, cred.uid, cred.gid, why)
            try:  # tell the client why; it has sent nothing yet (it waits for our hello)
                conn.send(Connection().send_close(why, "refused"), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except OSError:
                pass
            conn.close()
            return
        ch = Channel(conn, peer=cred, name=f"{os.path.basename(self.path)}<-pid{cred.pid}", **self._channel_kw)
        self.channels.add(ch)
        ch._close_callbacks.append(self.channels.discard)
        ch._start(is_client=False)
        log.debug("IPC server %s: accepted pid %d uid %d", self.path, cred.pid, cred.uid)
        if self._on_connect is not None:
            try:
                out = self._on_connect(ch)
            except Exception:
                log.exception("IPC server %s: on_connect callback failed; dropping the connection", self.path)
                ch._abort(IpcClosed("on_connect failed"), tell_peer=("server error while admitting the connection", "error"))
                return
            if inspect.isawaitable(out):
                ch._spawn(lambda: ch._guard(out, "on_connect"), lambda: _discard(out, ()))

    async def close(self) -> None:
        """Stop accepting, remove the socket file, and close every channel."""
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            try:
                if os.stat(self.path).st_ino == self._ino:  # do not remove a successor's socket
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        await asyncio.gather(*(ch.close("server shutting down") for ch in list(self.channels)), return_exceptions=True)
        self._closed_event.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished (serve until then)."""
        await self._closed_event.wait()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise IpcError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left behind by a dead server
        return
    except OSError as e:
        raise IpcError(f"cannot tell whether {path} is in use: {e}") from None
    finally:
        probe.close()
    raise IpcError(f"another IPC server is already listening on {path}")


async def serve(
    path: str | os.PathLike,
    handler: Handler | None,
    *,
    allow_uids: Iterable[int] | None = None,
    on_connect: Callable[[Channel], Any] | None = None,
    on_notification: NotificationCallback | None = None,
    on_peer_silent: SilenceCallback | None = None,
    heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
    missed_heartbeats: int = DEFAULT_MISSED_HEARTBEATS,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_fds: int = DEFAULT_MAX_FDS,
    backlog: int = 128,
) -> Server:
    """Listen on the unix socket ``path`` (created mode 0600; a stale one is replaced).

    Every peer is checked with SO_PEERCRED: same uid as us, root, or in ``allow_uids``;
    anyone else gets a close frame saying why, a logged warning, and a closed socket.
    ``handler(channel, request)`` answers requests (return ``(result, fds)``,
    :class:`Reply` or None, or raise); ``on_connect(channel)`` sees each admitted peer.
    Without ``on_peer_silent``, a peer silent for ``missed_heartbeats`` intervals is
    disconnected.
    """
    path = _check_path(path)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The socket inode's mode, minus umask, becomes the file's mode at bind(): set
        # it first so the file never exists with a wider mode.
        os.fchmod(sock.fileno(), 0o600)
        try:
            sock.bind(path)
        except OSError as e:
            raise IpcError(f"cannot create IPC socket {path}: {e.strerror or e}") from None
        os.chmod(path, 0o600)
        sock.listen(backlog)
        sock.setblocking(False)
        channel_kw = dict(
            handler=handler,
            on_notification=on_notification,
            on_peer_silent=on_peer_silent,
            heartbeat_interval=heartbeat_interval,
            missed_heartbeats=missed_heartbeats,
            max_frame_size=max_frame_size,
            max_fds=max_fds,
        )
        return Server(sock, path, allow_uids=allow_uids, on_connect=on_connect, channel_kw=channel_kw)
    except BaseException:
        sock.close()
        raise


async def connect(
    path: str | os.PathLike,
    *,
    timeout: float = 5.0,
    handler: Handler | None = None,
    on_notification: NotificationCallback | None = None,
    on_peer_silent: SilenceCallback | None = None,
    heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
    missed_heartbeats: int = DEFAULT_MISSED_HEARTBEATS,
    allow_uids: Iterable[int] | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_fds: int = DEFAULT_MAX_FDS,
    name: str | None = None,
) -> Channel:
    """Connect to the server at ``path`` and complete the handshake within ``timeout``.

    The server must run as our uid, root, or a uid in ``allow_uids``. Raises
    :class:`IpcRefused` (refused by the server, or permission denied on the socket),
    :class:`IpcClosed` (nobody listening), :class:`IpcTimeout`, :class:`IpcError`.
    """
    path = _check_path(path)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    ch: Channel | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, path)
            except OSError as e:
                raise _connect_error(path, e) from None
            cred = peer_credentials(sock)
            if not _uid_allowed(cred.uid, allow_uids):
                why = _refusal(cred, allow_uids, "server")
                log.warning("IPC client: refusing server at %s: %s", path, why)
                raise IpcRefused(f"refusing the IPC server at {path}: {why}")
            ch = Channel(
                sock,
                peer=cred,
                handler=handler,
                on_notification=on_notification,
                on_peer_silent=on_peer_silent,
                heartbeat_interval=heartbeat_interval,
                missed_heartbeats=missed_heartbeats,
                max_frame_size=max_frame_size,
                max_fds=max_fds,
                name=name or f"{os.path.basename(path)}->pid{cred.pid}",
            )
            ch._start(is_client=True)
            await ch._hello
        return ch
    except TimeoutError:
        if ch is not None:
            ch._abort(IpcTimeout("connect timed out"))
        else:
            sock.close()
        raise IpcTimeout(f"connecting to the IPC server at {path} timed out after {timeout}s") from None
    except BaseException:
        if ch is not None:
            ch._abort(IpcClosed("connect failed"))
        else:
            sock.close()
        raise


# --------------------------------------------------------------------------- blocking client


def _sendmsg_all(sock: socket.socket, data: bytes, fds: tuple[int, ...]) -> None:
    view = memoryview(data)
    anc = _rights(fds)
    while view:
        sent = sock.sendmsg([view], anc, socket.MSG_NOSIGNAL)
        anc = []  # the fds went with the first byte
        view = view[sent:]


def request_sync(
    path: str | os.PathLike,
    method: str,
    params: Any = None,
    timeout: float = 5.0,
    *,
    fds: Iterable[int] = (),
    allow_uids: Iterable[int] | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_fds: int = DEFAULT_MAX_FDS,
) -> Reply:
    """One request over a fresh connection, blocking (for CLI tools); same protocol and
    errors as :meth:`Channel.request`. ``timeout`` bounds connect + handshake + answer."""
    path = _check_path(path)
    deadline = time.monotonic() + timeout
    fds = tuple(fds)
    proto = Connection(max_frame_size=max_frame_size, max_fds=max_fds, now=time.monotonic())
    ancbufsize = socket.CMSG_SPACE(max_fds * 4) if max_fds else 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise IpcTimeout(f"request {method!r} to {path} got no answer within {timeout}s")
        return left

    def next_event():
        while True:
            ev = proto.next_event()
            if ev is not None:
                return ev
            sock.settimeout(remaining())
            try:
                data, anc, flags, _ = sock.recvmsg(RECV_SIZE, ancbufsize, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                remaining()
                continue
            except OSError as e:
                raise IpcClosed(f"connection to {path} lost: {e.strerror or e}") from None
            proto.receive_data(data, _fds_from_ancdata(anc), time.monotonic(), ctrunc=bool(flags & socket.MSG_CTRUNC))

    def check_final(ev) -> None:
        if isinstance(ev, ConnectionClosed):
            if ev.code == "refused":
                raise IpcRefused(f"the IPC server refused the connection: {ev.reason}")
            raise IpcClosed(f"the IPC server at {path} closed the connection" + (f": {ev.reason}" if ev.reason else ""))
        if isinstance(ev, ProtocolError):
            raise IpcError(f"protocol error talking to {path}: {ev.reason}")

    try:
        sock.settimeout(remaining())
        try:
            sock.connect(path)
        except TimeoutError:
            raise IpcTimeout(f"connecting to {path} timed out after {timeout}s") from None
        except OSError as e:
            raise _connect_error(path, e) from None
        cred = peer_credentials(sock)
        if not _uid_allowed(cred.uid, allow_uids):
            raise IpcRefused(f"refusing the IPC server at {path}: {_refusal(cred, allow_uids, 'server')}")
        while True:  # handshake: the server speaks first
            ev = next_event()
            check_final(ev)
            _close_quietly(getattr(ev, "fds", ()))
            if isinstance(ev, Hello):
                break
        hello = proto.send_hello()
        try:
            rid, data, _ = proto.send_request(method, params, fds, deadline=deadline, now=time.monotonic())
        except LocalProtocolError as e:
            raise IpcError(f"cannot send request {method!r}: {e}") from None
        sock.settimeout(remaining())
        _sendmsg_all(sock, hello, ())
        _sendmsg_all(sock, data, fds)  # its own sendmsg: the fds go with its first byte
        while True:
            ev = next_event()
            check_final(ev)
            if isinstance(ev, Response) and ev.id == rid:
                if ev.error is not None:
                    _close_quietly(ev.fds)
                    raise _remote_error(ev.error, method)
                return Reply(ev.result, ev.fds)
            if isinstance(ev, Request):  # we serve nothing
                _close_quietly(ev.fds)
                out, _ = proto.send_response(ev.id, error={"type": "NoHandler", "message": "a blocking CLI client serves no requests"})
                _sendmsg_all(sock, out, ())
            else:
                _close_quietly(getattr(ev, "fds", ()))
    except TimeoutError as e:
        if isinstance(e, IpcTimeout):
            raise
        raise IpcTimeout(f"request {method!r} to {path} got no answer within {timeout}s") from None
    except OSError as e:
        raise IpcClosed(f"connection to {path} lost: {e.strerror or e}") from None
    finally:
        sock.close()
