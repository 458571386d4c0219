"""The stats secondary's Prometheus endpoint, and its hand-over to another version without a gap.

The exporter serves on a listening socket it can share: a hot upgrade's stats
candidate asks the running stats process for it (``listener`` on its upgrade
control socket, the descriptor passed with SCM_RIGHTS), so both processes hold
the *same* socket -- one accept queue. The candidate starts accepting when told
to take over (``claim``), the old process stops accepting when told to release
(``release``) and stays parked with its descriptor open; a rollback is the same
in reverse. A connection arriving at any moment waits in the one queue for
whichever process is accepting: no refused connection, no gap.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler

SERVE_POLL = 0.05  # seconds: how quickly a paused exporter stops accepting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s


class Exporter:
    """A WSGI app served by a thread per request on ``sock``; accepting can be paused and resumed."""

    def __init__(self, sock: socket.socket, app: Callable) -> None:
        from prometheus_client.exposition import ThreadingWSGIServer

        self.active = 0  # requests being answered (a release waits for them: the process may be killed next)
        self.idle = threading.Condition()
        exporter = self

        class Server(ThreadingWSGIServer):
            address_family = sock.family

            # Counted from the accept, in the accepting thread: counted in the request's own
            # thread, a connection accepted just before a pause could look idle to it, and the
            # process exit that follows a release would cut that request off.
            def process_request(self, request: Any, client_address: Any) -> None:
                with exporter.idle:
                    exporter.active += 1
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    exporter._done()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    exporter._done()

        Handler = _QuietHandler

        srv = Server(sock.getsockname()[:2], Handler, bind_and_activate=False)
        srv.socket.close()
        srv.socket = sock
        srv.server_address = sock.getsockname()
        host, port = srv.server_address[:2]
        srv.server_name, srv.server_port = host, port  # what server_bind sets (without a DNS lookup)
        srv.setup_environ()
        srv.set_app(app)
        self.server = srv
        self.sock = sock
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def _done(self) -> None:
        with self.idle:
            self.active -= 1
            self.idle.notify_all()

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def serve(self) -> None:
        """Start accepting (idempotent)."""
        with self.lock:
            if not self.serving:
                self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": SERVE_POLL}, name="exporter", daemon=True)
                self._thread.start()

    def pause(self, drain: float = 5.0) -> None:
        """Stop accepting, then let the requests already accepted be answered (at most ``drain``
        seconds); the socket stays open (a new connection waits for whoever accepts next)."""
        with self.lock:
            if self.serving:
                self.server.shutdown()
                self._thread.join(5)
            self._thread = None
        with self.idle:
            self.idle.wait_for(lambda: self.active == 0, drain)

    def close(self) -> None:
        self.pause()
        self.server.server_close()


def fetch_listener(runtime_dir, pid: int) -> socket.socket:
    """The listening socket of the stats process ``pid`` (its ``listener`` answer), as our own socket."""
    from hotplane.shared.upgrade_agent import request

    reply = request(runtime_dir, pid, "listener", timeout=10.0)
    if len(reply.fds) != 1:
        raise OSError(f"stats pid {pid} sent {len(reply.fds)} descriptors for its listener")
    return socket.socket(fileno=reply.fds[0])


def agent_handlers(exporter: Exporter, stop: threading.Event, describe: Callable[[], dict]) -> dict[str, Callable]:
    """The upgrade control requests of a stats process serving through ``exporter``."""

    def take(params: dict) -> dict:
        exporter.serve()
        return {"claimed": True, "pid": os.getpid(), "listen": "%s:%d" % exporter.address}

    def release(params: dict) -> dict:
        exporter.pause()
        return {"released": params.get("queue"), "pid": os.getpid()}

    def leave(params: dict) -> dict:
        stop.set()
        return {"ok": True, "exiting": True}

    return {
        "listener": lambda params: ({"listen": "%s:%d" % exporter.address}, (exporter.sock.fileno(),)),
        "arm": lambda params: {"armed": True, "pid": os.getpid()},
        "claim": take,
        "release": release,
        "exit": leave,
        "status": lambda params: describe(),
    }
