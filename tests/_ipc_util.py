"""Child process for tests/test_ipc.py: ``python tests/_ipc_util.py LOOP MODE PATH``.

LOOP is ``asyncio`` or ``uvloop``. Prints one JSON line with what it saw and exits 0,
or prints the error and exits 1. Modes:

- ``fdpass``: gets a pipe's write end from the server and writes through it; sends a
  memfd the server reads and writes into; reports what the server wrote.
- ``serve``: answers the server's requests (``child.echo``, ``child.write_fd``) until
  the server notifies ``bye``, then reports the notifications it received.
- ``idle``: connects with fast heartbeats, says ``connected`` and waits to be closed.
- ``sync``: one blocking ``request_sync`` call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from hotplane.shared import ipc


def say(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def fdpass(path: str) -> dict:
    ch = await ipc.connect(path, timeout=10)
    reply = await ch.request("make_pipe", timeout=10)
    (wfd,) = reply.fds
    os.write(wfd, f"written by child {os.getpid()}".encode())
    os.close(wfd)
    mfd = os.memfd_create("hotplane-ipc-test")
    try:
        os.write(mfd, b"memfd from child")
        reply = await ch.request("read_memfd", {"offset": 64}, fds=[mfd], timeout=10)
        server_wrote = os.pread(mfd, 64, 64).rstrip(b"\0").decode()
    finally:
        os.close(mfd)
    await ch.close()
    return {"server_read": reply.result, "server_wrote": server_wrote}


async def serve(path: str) -> dict:
    bye = asyncio.Event()
    seen: list = []

    async def handler(channel, req):
        if req.method == "child.echo":
            return {"pid": os.getpid(), "echo": req.params}, ()
        if req.method == "child.write_fd":
            (fd,) = req.fds
            os.write(fd, req.params.encode())
            os.close(fd)
            return "written", ()
        raise KeyError(req.method)

    def on_note(channel, note):
        seen.append(note.method)
        if note.method == "bye":
            bye.set()

    ch = await ipc.connect(path, timeout=10, handler=handler, on_notification=on_note)
    own = await ch.request("server.whoami", timeout=10)
    await asyncio.wait_for(bye.wait(), 20)
    await ch.close()
    return {"seen": seen, "server_said": own.result}


async def idle(path: str) -> dict:
    ch = await ipc.connect(path, timeout=10, heartbeat_interval=0.05, missed_heartbeats=10)
    say("connected")
    await asyncio.wait_for(ch.wait_closed(), 30)
    return {"closed": str(ch.close_reason)}


def main(argv: list[str]) -> int:
    loop_kind, mode, path = argv
    try:
        if mode == "sync":
            out = ipc.request_sync(path, "echo", {"from": "sync"}, 10).result
        else:
            coro = {"fdpass": fdpass, "serve": serve, "idle": idle}[mode](path)
            if loop_kind == "uvloop":
                import uvloop

                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                    out = r.run(coro)
            else:
                out = asyncio.run(coro)
    except Exception as e:  # report, the test asserts on it
        say({"error": f"{type(e).__name__}: {e}"})
        return 1
    say(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
