"""The hot-upgrade control socket of a process that is not a worker (the stats secondary, the primary).

``supervisor/upgrade.py`` drives every unit of an upgrade with the same requests
on ``<runtime>/upgrade/w<pid>.sock`` (the path workers use too,
:func:`control_socket_path`): ``arm`` / ``claim {queue, force}`` (take the
unit's pseudo-queue: start serving), ``release`` (stop serving, stay alive,
parked), ``park`` / ``commit`` (acknowledged), ``exit``, ``status``, plus what
the process adds (the stats secondary: ``listener``, its listening socket).

An :class:`UpgradeAgent` serves them on an asyncio loop: the caller's own
(``start_in_loop``) or a thread of its own (``start_thread``). Handlers are
plain callables ``handler(params) -> dict | (dict, fds)``; an exception becomes
an error answer. They may block (the agent's loop has nothing else to do).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Callable

Handler = Callable[[dict], Any]


def control_socket_path(runtime_dir, pid: int) -> Path:
    """Where process ``pid`` of an instance serves its upgrade control socket."""
    return Path(runtime_dir) / "upgrade" / f"w{pid}.sock"


class UpgradeAgent:
    """Serves the upgrade control requests of one process with ``handlers`` (op name -> callable)."""

    def __init__(self, runtime_dir, handlers: dict[str, Handler]) -> None:
        self.path = control_socket_path(runtime_dir, os.getpid())
        self.handlers = dict(handlers)
        self.handlers.setdefault("park", lambda p: {"ok": True, "op": "park"})
        self.handlers.setdefault("commit", lambda p: {"ok": True, "op": "commit"})
        self.server = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _handle(self, channel, request):
        from hotplane.shared.ipc import RemoteError

        fn = self.handlers.get(request.method)
        if fn is None:
            raise RemoteError("unknown_method", f"pid {os.getpid()}: unknown upgrade request {request.method!r} (have {', '.join(sorted(self.handlers))})")
        params = request.params if isinstance(request.params, dict) else {}
        try:
            res = fn(params)
            if asyncio.iscoroutine(res):
                res = await res
        except RemoteError:
            raise
        except Exception as e:  # an answer, never a dead process
            raise RemoteError("upgrade", f"pid {os.getpid()}: {request.method}: {e}") from None
        return res if isinstance(res, tuple) else (res, ())

    async def start_in_loop(self) -> None:
        """Serve on the running loop (a process whose main loop is asyncio)."""
        from hotplane.shared import ipc

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.server = await ipc.serve(self.path, self._handle, heartbeat_interval=None)

    async def close_in_loop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
        self._unlink()

    def start_thread(self, timeout: float = 10.0) -> None:
        """Serve from a thread with its own event loop (a process whose main thread blocks)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.start_in_loop()
            except BaseException as e:  # reported to start_thread's caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            await self._stop.wait()
            await self.close_in_loop()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), name="upgrade-agent", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop serving (thread mode) and remove the socket file."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            if self._thread is not None:
                self._thread.join(5)
        self._unlink()

    def _unlink(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


def request(runtime_dir, pid: int, op: str, params: dict | None = None, timeout: float = 10.0):
    """One request to process ``pid``'s upgrade control socket (the reply: ``.result``, ``.fds``)."""
    from hotplane.shared.ipc import request_sync

    return request_sync(str(control_socket_path(runtime_dir, pid)), op, params or {}, timeout=timeout)
