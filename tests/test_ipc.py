"""The IPC channel over real unix sockets and real processes, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import pytest
import uvloop

from hotplane.shared import ipc
from hotplane.shared.ipc_protocol import Connection, ConnectionClosed, Hello

pytestmark = pytest.mark.timeout(60)

CHILD = str(Path(__file__).with_name("_ipc_util.py"))
LOGGER = "hotplane.shared.ipc"


# --------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run ``body()`` to completion on the parametrized loop, bounded in time."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def _run(body, timeout: float = 30.0):
        async def main():
            async with asyncio.timeout(timeout):
                return await body()

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())

    _run.kind = request.param
    return _run


@pytest.fixture
def sockdir():
    """A short-pathed directory (AF_UNIX paths are limited) other uids can traverse."""
    d = tempfile.mkdtemp(prefix="hp-ipc-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def children():
    """Child processes started by a test; killed at teardown whatever happened."""
    procs: list[subprocess.Popen] = []
    pids: list[int] = []

    class C:
        def spawn(self, kind: str, mode: str, path: str) -> subprocess.Popen:
            p = subprocess.Popen([sys.executable, CHILD, kind, mode, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            return p

        def track(self, pid: int) -> None:
            pids.append(pid)

    try:
        yield C()
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait(10)
            for f in (p.stdout, p.stderr):
                f.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


async def finish(p: subprocess.Popen, timeout: float = 30.0) -> dict:
    """Wait for a child and return the JSON it printed last."""
    out, err = await asyncio.to_thread(p.communicate, timeout=timeout)
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"child printed nothing (rc={p.returncode}); stderr:\n{err}"
    result = json.loads(lines[-1])
    assert p.returncode == 0, f"child failed: {result}; stderr:\n{err}"
    return result


async def until(cond, timeout: float = 5.0, step: float = 0.01) -> None:
    """Poll ``cond`` (for state that has no event to wait on), bounded in time."""
    for _ in range(int(timeout / step)):
        if cond():
            return
        await asyncio.sleep(step)
    assert cond(), "condition not reached in time"


async def echo_handler(channel, req):
    if req.method == "echo":
        return req.params, ()
    if req.method == "server.whoami":
        return {"pid": os.getpid()}, ()
    raise KeyError(f"no method {req.method}")


def frame(obj=None, raw: bytes | None = None) -> bytes:
    payload = raw if raw is not None else msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


class RawPeer:
    """A hand-driven client on a bare socket, for feeding the server bad input."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.proto = Connection()
        self.events: list = []

    @classmethod
    async def connect(cls, path: str) -> "RawPeer":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, path)
        peer = cls(s)
        while not any(isinstance(e, Hello) for e in peer.events):
            assert await peer._read_some(), "server closed before its hello"
        s.sendall(peer.proto.send_hello())
        return peer

    async def _read_some(self) -> bool:
        try:
            data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        except ConnectionResetError:
            data = b""
        self.proto.receive_data(data, [], 0.0)
        while (ev := self.proto.next_event()) is not None:
            self.events.append(ev)
        return bool(data)

    async def until_closed(self) -> list:
        while await self._read_some():
            pass
        return self.events

    def close(self) -> None:
        self.sock.close()


def fork_other_uid_client(path: str, uid: int = 65534) -> tuple[int, int, int]:
    """Fork a child that drops to ``uid``, waits for a byte on the go pipe, then tries a
    blocking request; it writes the outcome as JSON to the result pipe."""
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no event loop, no pytest, only the already imported ipc module
        code = 2
        try:
            os.close(go_w)
            os.close(res_r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.read(go_r, 1)
            try:
                out = {"ok": ipc.request_sync(path, "echo", "hi", 5).result, "uid": os.getuid()}
            except Exception as e:
                out = {"error": type(e).__name__, "message": str(e), "uid": os.getuid()}
            os.write(res_w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(res_w)
    return pid, go_w, res_r


def read_all(fd: int, *, block: bool = False) -> bytes:
    """Read ``fd`` to EOF and close it. Non-blocking by default: if a writer is still
    open somewhere (a leaked fd), this raises BlockingIOError instead of hanging."""
    os.set_blocking(fd, block)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


# --------------------------------------------------------------------------- the socket file


def test_socket_file_is_0600_even_with_open_umask(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        old = os.umask(0)
        try:
            srv = await ipc.serve(path, echo_handler)
        finally:
            os.umask(old)
        try:
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            with pytest.raises(ipc.IpcError, match="already listening"):
                await ipc.serve(path, echo_handler)
        finally:
            await srv.close()
        assert not os.path.exists(path)

    run(body)


def test_stale_socket_replaced_and_non_socket_refused(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a server that died without unlinking
    dead.close()
    other = os.path.join(sockdir, "plain")
    Path(other).write_text("not a socket")

    async def body():
        async with await ipc.serve(path, echo_handler) as srv:
            async with await ipc.connect(path, timeout=5) as ch:
                assert (await ch.request("echo", 1)).result == 1
            assert srv.path == path
        with pytest.raises(ipc.IpcError, match="not a socket"):
            await ipc.serve(other, echo_handler)
        with pytest.raises(ipc.IpcError, match="too long"):
            await ipc.serve(os.path.join(sockdir, "x" * 120), echo_handler)
        with pytest.raises(ipc.IpcClosed, match="does not exist"):
            await ipc.connect(os.path.join(sockdir, "nobody.sock"), timeout=5)

    run(body)


# --------------------------------------------------------------------------- requests, notifications


def test_requests_both_directions(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        server_side: asyncio.Queue = asyncio.Queue()

        async def client_handler(channel, req):
            return {"client_got": req.params, "deadline_set": req.deadline is not None}, ()

        async with await ipc.serve(path, echo_handler, on_connect=server_side.put_nowait) as srv:
            async with await ipc.connect(path, timeout=5, handler=client_handler) as cli:
                assert cli.peer.pid == os.getpid() and cli.peer.uid == os.geteuid()
                sch = await server_side.get()
                assert sch.peer.pid == os.getpid() and srv.channels == {sch}
                # client -> server, many at once, answers matched by id
                replies = await asyncio.gather(*(cli.request("echo", {"i": i, "b": bytes([i % 256]) * i}) for i in range(200)))
                assert [r.result for r in replies] == [{"i": i, "b": bytes([i % 256]) * i} for i in range(200)]
                # server -> client
                r = await sch.request("anything", [1, 2], timeout=5)
                assert r.result == {"client_got": [1, 2], "deadline_set": True}
                r = await sch.request("anything", None, timeout=None)
                assert r.result == {"client_got": None, "deadline_set": False}
                assert cli.peer_hello is not None and sch.peer_hello is not None

    run(body)


def test_errors_timeouts_and_cancellation(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        release = asyncio.Event()
        slow_started = asyncio.Event()

        async def handler(channel, req):
            if req.method == "raise":
                raise ValueError("no such queue")
            if req.method == "custom":
                raise ipc.RemoteError("QueueBusy", "queue 3 is owned by pid 42", {"queue": 3})
            if req.method == "bad_return":
                return "just a result"
            if req.method == "slow":
                slow_started.set()
                await release.wait()
                return "finally", ()
            if req.method == "unencodable":
                return object(), ()
            return req.params, ()

        async with await ipc.serve(path, handler) as srv, await ipc.connect(path, timeout=5) as cli:
            with pytest.raises(ipc.RemoteError) as ei:
                await cli.request("raise")
            assert ei.value.type == "ValueError" and ei.value.message == "no such queue"
            with pytest.raises(ipc.RemoteError) as ei:
                await cli.request("custom")
            assert (ei.value.type, ei.value.data) == ("QueueBusy", {"queue": 3})
            with pytest.raises(ipc.RemoteError, match="TypeError.*result, fds"):
                await cli.request("bad_return")
            with pytest.raises(ipc.RemoteError, match="EncodeError"):
                await cli.request("unencodable")
            # A timeout fails the caller; the handler is stopped at the same deadline.
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(ipc.IpcTimeout, match="slow"):
                await cli.request("slow", timeout=0.2)
            assert asyncio.get_running_loop().time() - t0 < 2.0
            # Cancelling a caller: the late answer is dropped, the channel keeps working.
            slow_started.clear()
            task = asyncio.create_task(cli.request("slow", timeout=None))
            await slow_started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            assert (await cli.request("echo", "still fine")).result == "still fine"
            # Local problems are the caller's, and leave the channel usable.
            with pytest.raises(ipc.IpcError, match="cannot encode"):
                await cli.request("echo", {"x": object()})
            with pytest.raises(ipc.IpcError, match="frame size limit"):
                await cli.request("echo", b"x" * (2 << 20))
            with pytest.raises(ipc.IpcError, match="cannot pass file descriptor"):
                await cli.request("echo", fds=[987654])
            assert (await cli.request("echo", 7)).result == 7
            # A side without a handler answers with an error instead of hanging.
            (sch,) = srv.channels
            with pytest.raises(ipc.RemoteError, match="NoHandler"):
                await sch.request("x", timeout=5)

    run(body)


def test_each_request_times_out_at_its_own_deadline(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        async def handler(channel, req):
            if req.params == "answer":
                return "answered", ()
            await asyncio.Event().wait()

        async with await ipc.serve(path, handler), await ipc.connect(path, timeout=5) as cli:
            loop = asyncio.get_running_loop()
            finished: list = []

            async def call(timeout, params=None):
                t0 = loop.time()
                try:
                    r = await cli.request("m", params, timeout=timeout)
                    finished.append(("ok", timeout, r.result))
                except ipc.IpcTimeout:
                    finished.append(("timeout", timeout, loop.time() - t0))

            await asyncio.gather(call(0.6), call(0.1), call(None, "answer"), call(0.3), call(5, "answer"))
            assert [f[:2] for f in finished] == [("ok", None), ("ok", 5), ("timeout", 0.1), ("timeout", 0.3), ("timeout", 0.6)]
            for kind, timeout, elapsed in finished:
                if kind == "timeout":
                    assert timeout - 0.01 <= elapsed < timeout + 1.0  # loops may round timers to 1 ms

    run(body)


def test_notifications_in_order_sync_and_async_callbacks(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        got: list = []
        done = asyncio.Event()
        fd_contents: list = []

        def on_note(channel, note):
            got.append((note.method, note.params))
            for fd in note.fds:
                fd_contents.append(os.read(fd, 100))
                os.close(fd)
            if note.method == "last":
                done.set()

        async def on_note_async(channel, note):
            await asyncio.sleep(0)
            on_note(channel, note)

        for cb in (on_note, on_note_async):
            got.clear()
            done.clear()
            async with await ipc.serve(path, None, on_notification=cb), await ipc.connect(path, timeout=5) as cli:
                r, w = os.pipe()
                os.write(w, b"via notification")
                os.close(w)
                for i in range(100):
                    await cli.notify("tick", i)
                await cli.notify("with_fd", None, fds=[r])
                os.close(r)  # ours; the channel sent a duplicate
                await cli.notify("last")
                await asyncio.wait_for(done.wait(), 10)
            assert got == [("tick", i) for i in range(100)] + [("with_fd", None), ("last", None)]
            assert fd_contents[-1] == b"via notification"

    run(body)


def test_big_frames_and_fds_under_partial_writes(run, sockdir):
    """Large pipelined frames (many partial sendmsg) interleaved with fd-carrying ones."""
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        async def handler(channel, req):
            i, blob = req.params["i"], req.params["blob"]
            for fd in req.fds:
                os.write(fd, f"req {i}".encode())
                os.close(fd)
            if i % 4 == 0:  # answer with a fresh memfd, handed over to the channel
                m = os.memfd_create("ans")
                os.write(m, f"answer {i}".encode())
                return ipc.Reply(len(blob), (m,), close_fds=True)
            return len(blob), ()

        async with await ipc.serve(path, handler), await ipc.connect(path, timeout=5) as cli:
            pipes = {}

            async def one(i):
                fds = ()
                if i % 3 == 0:
                    r, w = os.pipe()
                    pipes[i] = r
                    fds = (w,)
                try:
                    return await cli.request("big", {"i": i, "blob": bytes(i * 23456 % 900_000)}, fds=fds, timeout=20)
                finally:
                    for fd in fds:
                        os.close(fd)

            replies = await asyncio.gather(*(one(i) for i in range(40)))
            for i, rep in enumerate(replies):
                assert rep.result == i * 23456 % 900_000
                if i % 4 == 0:
                    (m,) = rep.fds
                    assert os.pread(m, 100, 0) == f"answer {i}".encode()
                    os.close(m)
                else:
                    assert rep.fds == ()
            for i, r in pipes.items():
                assert os.read(r, 100) == f"req {i}".encode()
                os.close(r)

    run(body)


# --------------------------------------------------------------------------- closing


def test_close_fails_pending_and_reaches_the_peer(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        started = asyncio.Event()

        async def handler(channel, req):
            started.set()
            await asyncio.Event().wait()  # never answers

        srv = await ipc.serve(path, handler)
        cli = await ipc.connect(path, timeout=5)
        pending = asyncio.create_task(cli.request("hang", timeout=None))
        await started.wait()
        await srv.close()  # closes every channel, cancels the handler
        with pytest.raises(ipc.IpcClosed, match="server shutting down"):
            await pending
        await cli.wait_closed()
        assert cli.closed and isinstance(cli.close_reason, ipc.IpcClosed)
        with pytest.raises(ipc.IpcClosed):
            await cli.request("again")
        with pytest.raises(ipc.IpcClosed):
            await cli.notify("again")
        assert not srv.channels and not os.path.exists(path)
        with pytest.raises(ipc.IpcClosed, match="does not exist"):
            await ipc.connect(path, timeout=5)

        # The client hanging up removes the server's channel.
        async with await ipc.serve(path, echo_handler) as srv2:
            c2 = await ipc.connect(path, timeout=5)
            await until(lambda: len(srv2.channels) == 1)
            (sch,) = srv2.channels
            await c2.close()
            await asyncio.wait_for(sch.wait_closed(), 5)
            assert "closing" in str(sch.close_reason) and not srv2.channels

    run(body)


# --------------------------------------------------------------------------- heartbeats


def test_heartbeats_keep_idle_channel_and_silent_peer_is_dropped(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        silent: list = []
        kw = dict(heartbeat_interval=0.05, missed_heartbeats=3)
        # Generous limits here (0.5 s): both ends share one loop, so a stall of this
        # busy machine must not look like silence.
        calm = dict(heartbeat_interval=0.1, missed_heartbeats=5)
        async with await ipc.serve(path, echo_handler, on_peer_silent=lambda ch, s: silent.append(s), **calm) as srv:
            async with await ipc.connect(path, timeout=5, **calm) as cli:
                await until(lambda: len(srv.channels) == 1)
                (sch,) = srv.channels
                await until(lambda: cli.heartbeats_received >= 8 and sch.heartbeats_received >= 8)
                assert silent == [] and not cli.closed and not sch.closed
                assert cli.peer_silent_for() < 0.5
        # A peer that sends no heartbeats is, without an on_peer_silent callback, dropped.
        async with await ipc.serve(path, echo_handler, **kw) as srv:
            mute = await ipc.connect(path, timeout=5, heartbeat_interval=None)
            await asyncio.wait_for(mute.wait_closed(), 5)
            assert "no heartbeat" in str(mute.close_reason)
            assert not srv.channels

    run(body)


def test_stopped_peer_process_detected_as_silent(run, sockdir, children):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        silent = asyncio.Event()
        silence: list = []

        def on_silent(ch, seconds):
            silence.append(seconds)
            silent.set()

        async with await ipc.serve(path, echo_handler, on_peer_silent=on_silent, heartbeat_interval=0.1, missed_heartbeats=4) as srv:
            p = children.spawn(run.kind, "idle", path)
            line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 20)
            assert json.loads(line) == "connected"
            (sch,) = srv.channels
            assert sch.peer.pid == p.pid
            await until(lambda: sch.heartbeats_received >= 3)
            os.kill(p.pid, signal.SIGSTOP)
            try:
                await asyncio.wait_for(silent.wait(), 10)
                assert silence[0] > 0.4 and len(silence) == 1
            finally:
                os.kill(p.pid, signal.SIGCONT)
            seen = sch.heartbeats_received
            await until(lambda: sch.heartbeats_received > seen + 2)  # alive again
            await sch.close("test over")
            result = await finish(p)
            assert "test over" in result["closed"]

    run(body)


# --------------------------------------------------------------------------- other processes, fds


def test_fd_passing_to_another_process(run, sockdir, children):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        pipe_read: list = []

        async def handler(channel, req):
            if req.method == "make_pipe":
                r, w = os.pipe()
                pipe_read.append(r)
                return ipc.Reply("here", (w,), close_fds=True)
            if req.method == "read_memfd":
                (m,) = req.fds
                try:
                    content = os.pread(m, 100, 0).rstrip(b"\0").decode()
                    os.pwrite(m, b"server was here", req.params["offset"])
                finally:
                    os.close(m)
                return content, ()
            raise KeyError(req.method)

        async with await ipc.serve(path, handler):
            p = children.spawn(run.kind, "fdpass", path)
            result = await finish(p)
            assert result == {"server_read": "memfd from child", "server_wrote": "server was here"}
            (r,) = pipe_read
            assert read_all(r) == f"written by child {p.pid}".encode()  # EOF: every copy of the write end closed

    run(body)


def test_requests_both_directions_with_a_child_process(run, sockdir, children):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        connected: asyncio.Queue = asyncio.Queue()
        async with await ipc.serve(path, echo_handler, on_connect=connected.put_nowait):
            p = children.spawn(run.kind, "serve", path)
            sch = await asyncio.wait_for(connected.get(), 20)
            assert sch.peer.pid == p.pid
            r = await sch.request("child.echo", {"x": [1, "two"]}, timeout=10)
            assert r.result == {"pid": p.pid, "echo": {"x": [1, "two"]}}
            rfd, wfd = os.pipe()
            try:
                r = await sch.request("child.write_fd", "child wrote this", fds=[wfd], timeout=10)
            finally:
                os.close(wfd)
            assert r.result == "written" and read_all(rfd) == b"child wrote this"
            with pytest.raises(ipc.RemoteError, match="KeyError"):
                await sch.request("child.nope", timeout=10)
            await sch.notify("hello")
            await sch.notify("bye")
            result = await finish(p)
            assert result == {"seen": ["hello", "bye"], "server_said": {"pid": os.getpid()}}

    run(body)


def test_request_sync_cli_client(run, sockdir, children):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        async def handler(channel, req):
            if req.method == "fd":
                r, w = os.pipe()
                os.write(w, b"cli")
                os.close(w)
                return ipc.Reply(None, (r,), close_fds=True)
            if req.method == "hang":
                await asyncio.Event().wait()
            if req.method == "fail":
                raise RuntimeError("boom")
            return req.params, ()

        async with await ipc.serve(path, handler):
            assert await asyncio.to_thread(ipc.request_sync, path, "echo", [1, "a"], 5) == ipc.Reply([1, "a"], ())
            rep = await asyncio.to_thread(ipc.request_sync, path, "fd", None, 5)
            assert read_all(rep.fds[0]) == b"cli"
            with pytest.raises(ipc.RemoteError, match="RuntimeError: boom"):
                await asyncio.to_thread(ipc.request_sync, path, "fail", None, 5)
            with pytest.raises(ipc.IpcTimeout):
                await asyncio.to_thread(ipc.request_sync, path, "hang", None, 0.3)
            assert await finish(children.spawn(run.kind, "sync", path)) == {"from": "sync"}
        with pytest.raises(ipc.IpcClosed, match="does not exist"):
            ipc.request_sync(path, "echo", None, 1)

    run(body)


# --------------------------------------------------------------------------- bad input


GARBAGE = {
    "oversized length": (b"\xff\xff\xff\xff", "exceeds max_frame_size"),
    "undecodable msgpack": (frame(raw=b"\xc1\xc1\xc1"), "undecodable"),
    "trailing junk in frame": (frame(raw=b"hello"), "undecodable"),
    "wrong types": (frame({"t": "request", "i": "one"}), "frame type"),
    "fds announced, none sent": (frame({"t": 2, "m": "x", "n": 2}), "none arrived"),
    "response to unknown id": (frame({"t": 1, "i": 77, "r": 1}), "unknown or already answered"),
    "not a map": (frame([1, 2, 3]), "not a map"),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_closes_only_that_connection(run, sockdir, caplog, kind):
    path = os.path.join(sockdir, "ctl.sock")
    data, needle = GARBAGE[kind]
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def body():
        async with await ipc.serve(path, echo_handler) as srv, await ipc.connect(path, timeout=5) as good:
            assert (await good.request("echo", "before")).result == "before"
            raw = await RawPeer.connect(path)
            try:
                raw.sock.sendall(data)
                evs = await raw.until_closed()
            finally:
                raw.close()
            closed = [e for e in evs if isinstance(e, ConnectionClosed)]
            assert closed and closed[0].code == "protocol_error" and needle in closed[0].reason
            assert (await good.request("echo", "after")).result == "after"
            await until(lambda: len(srv.channels) == 1)
        assert any(needle in r.getMessage() and "protocol error" in r.getMessage() for r in caplog.records)

    run(body)


def test_eof_mid_frame_and_abrupt_death_do_not_hurt_the_server(run, sockdir, caplog):
    path = os.path.join(sockdir, "ctl.sock")
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def body():
        async with await ipc.serve(path, echo_handler) as srv:
            raw = await RawPeer.connect(path)
            raw.sock.sendall(frame({"t": 2, "m": "x", "p": "y" * 50})[:20])
            raw.close()
            await until(lambda: not srv.channels)
            async with await ipc.connect(path, timeout=5) as good:
                assert (await good.request("echo", 1)).result == 1
        assert any("middle of a frame" in r.getMessage() for r in caplog.records)

    run(body)


def test_truncated_ancillary_data_detected_and_fds_closed(run, sockdir, caplog):
    path = os.path.join(sockdir, "ctl.sock")
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def body():
        async with await ipc.serve(path, echo_handler, max_fds=2) as srv, await ipc.connect(path, timeout=5) as good:
            # The channel knows the server's limit from its hello and refuses locally.
            r, w = os.pipe()
            with pytest.raises(ipc.IpcError, match="limit is 2"):
                await good.request("echo", fds=[w, w, w])
            os.close(r)
            os.close(w)
            # A peer that ignores the limit: 4 fds into a buffer with room for 2.
            raw = await RawPeer.connect(path)
            pipes = [os.pipe() for _ in range(4)]
            try:
                data = Connection(max_fds=8).send_notification("take", None, [w for _, w in pipes])[0]
                raw.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("4i", *(w for _, w in pipes)))])
                for _, w in pipes:
                    os.close(w)
                evs = await raw.until_closed()
            finally:
                raw.close()
            closed = [e for e in evs if isinstance(e, ConnectionClosed)]
            assert closed and closed[0].code == "protocol_error" and "MSG_CTRUNC" in closed[0].reason
            # Every write end is gone: the 2 the server received were closed, the rest dropped.
            for rd, _ in pipes:
                assert read_all(rd) == b""
            assert (await good.request("echo", "ok")).result == "ok"
            await until(lambda: len(srv.channels) == 1)
        assert any("MSG_CTRUNC" in r.getMessage() for r in caplog.records)

    run(body)


def test_fds_with_a_bad_frame_are_closed(run, sockdir):
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        async with await ipc.serve(path, echo_handler):
            raw = await RawPeer.connect(path)
            rd, wr = os.pipe()
            try:
                bad = frame({"t": 2, "m": "x", "n": 3})  # announces 3, carries 1
                raw.sock.sendmsg([bad], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", wr))])
                os.close(wr)
                evs = await raw.until_closed()
            finally:
                raw.close()
            assert any(isinstance(e, ConnectionClosed) and "announces 3" in e.reason for e in evs)
            assert read_all(rd) == b""  # the server closed the one it got

    run(body)


def test_fds_of_a_request_that_never_ran_are_closed(run, sockdir):
    """A request with fds is followed, in the same read, by garbage: its handler never
    runs, and the fds it was given are closed rather than leaked."""
    path = os.path.join(sockdir, "ctl.sock")

    async def body():
        calls: list = []

        async def handler(channel, req):
            calls.append(req.method)
            return None, ()

        async with await ipc.serve(path, handler):
            raw = await RawPeer.connect(path)
            rd, wr = os.pipe()
            try:
                _, req, _ = raw.proto.send_request("take", None, [wr])
                raw.sock.sendmsg([req + b"\xff\xff\xff\xff"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", wr))])
                os.close(wr)
                evs = await raw.until_closed()
            finally:
                raw.close()
            assert any(isinstance(e, ConnectionClosed) and "exceeds" in e.reason for e in evs)
            assert read_all(rd) == b"" and calls == []

    run(body)


def test_client_survives_a_garbage_server(run, sockdir):
    """The client side validates too: a bogus 'server' cannot crash it."""
    path = os.path.join(sockdir, "fake.sock")

    async def body():
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(path)
        lst.listen()
        lst.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            connecting = asyncio.create_task(ipc.connect(path, timeout=5))
            conn, _ = await loop.sock_accept(lst)
            conn.sendall(Connection().send_hello())
            cli = await connecting
            pending = asyncio.create_task(cli.request("x", timeout=5))
            await loop.sock_recv(conn, 4096)  # client's hello and request
            conn.sendall(frame(raw=b"\x93\x01\x02\x03"))
            with pytest.raises(ipc.IpcError, match="protocol error: frame payload is a list"):
                await pending
            await cli.wait_closed()
            conn.close()
        finally:
            lst.close()

    run(body)


# --------------------------------------------------------------------------- authentication


def test_peer_of_another_uid_is_refused(run, sockdir, children, caplog):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another uid")
    path = os.path.join(sockdir, "ctl.sock")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # Fork the children before any event loop exists; each waits for its go byte.
    forks = [fork_other_uid_client(path) for _ in range(3)]
    for pid, _, _ in forks:
        children.track(pid)

    async def outcome(fork) -> dict:
        pid, go, res = fork
        os.write(go, b"g")
        os.close(go)
        out = await asyncio.to_thread(read_all, res, block=True)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return json.loads(out)

    async def body():
        async with await ipc.serve(path, echo_handler) as srv:
            # 1. The socket file's mode already keeps uid 65534 out.
            got = await outcome(forks[0])
            assert got["uid"] == 65534 and got["error"] == "IpcRefused" and "permission denied" in got["message"]
            assert srv.refused == 0
            # 2. With the file opened up, SO_PEERCRED is what refuses it.
            os.chmod(path, 0o666)
            got = await outcome(forks[1])
            assert got["error"] == "IpcRefused" and "uid 65534" in got["message"] and "refused" in got["message"]
            assert srv.refused == 1 and not srv.channels
            # The server is unharmed.
            async with await ipc.connect(path, timeout=5) as ch:
                assert (await ch.request("echo", "root ok")).result == "root ok"
        refusals = [r.getMessage() for r in caplog.records if "refusing connection" in r.getMessage()]
        assert len(refusals) == 1 and f"pid {forks[1][0]} uid 65534" in refusals[0]
        # 3. An explicitly allowed uid gets in.
        async with await ipc.serve(path, echo_handler, allow_uids=[65534]):
            os.chmod(path, 0o666)
            got = await outcome(forks[2])
            assert got == {"ok": "hi", "uid": 65534}

    run(body)
