"""The systemd notify protocol, client side (what ``sd_notify(3)`` does, in Python).

Under a ``Type=notify`` unit systemd sets ``$NOTIFY_SOCKET`` (a filesystem path, or
``@name`` for the abstract namespace) and the service sends it datagrams of
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once started, ``STATUS=...``
for ``systemctl status``, ``WATCHDOG=1`` at least every ``WatchdogSec`` (systemd
passes it as ``$WATCHDOG_USEC``), ``STOPPING=1`` when shutting down, ``MAINPID=``
and ``EXTEND_TIMEOUT_USEC=`` when needed.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op returning False,
so the supervisor calls these unconditionally. Sending never raises: if systemd has
gone away the datagram is lost, which is all sd_notify does too.

With ``NotifyAccess=main`` only the main process (the supervisor) may notify, so
:meth:`Notifier.from_environ` removes the variables from ``os.environ`` by default
(children must not inherit them; the launcher drops them as well).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Callable, Mapping

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value ('@' = abstract namespace)."""
    if not value:
        raise ValueError("empty NOTIFY_SOCKET")
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with '@': {value!r}")
    return value


def watchdog_usec(env: Mapping[str, str] | None = None, pid: int | None = None) -> int | None:
    """``$WATCHDOG_USEC`` if the watchdog is enabled for process ``pid`` (default: us), else None.

    Like ``sd_watchdog_enabled``: ignored if ``$WATCHDOG_PID`` names another process, or
    if the value is not a positive integer.
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec if usec > 0 else None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``WatchdogSec`` (systemd's advice), or None."""
    usec = watchdog_usec(env, pid)
    return None if usec is None else usec / 2e6


def _clean(value: object) -> str:
    # One assignment per line: a newline inside a value would start a bogus assignment.
    return str(value).replace("\n", " ").replace("\r", " ")


class Notifier:
    """A connection-less client of one notify socket (None: disabled, every call a no-op)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address_text = address or None
        self._addr = socket_address(address) if address else None
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self.sent = 0
        self.errors = 0
        self.last_error: OSError | None = None

    @classmethod
    def from_environ(cls, *, unset: bool = True, env: dict[str, str] | None = None) -> "Notifier":
        """The notifier systemd configured through the environment (``os.environ`` by default).

        ``unset`` removes ``NOTIFY_SOCKET``/``WATCHDOG_*`` from it, so no child inherits them.
        A malformed ``NOTIFY_SOCKET`` gives a disabled notifier.
        """
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET")
        usec = watchdog_usec(env)
        if unset:
            for k in ENV_VARS:
                env.pop(k, None)
        try:
            return cls(addr, watchdog_usec=usec)
        except ValueError:
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec), None if the watchdog is off."""
        return None if not self.watchdog_usec else self.watchdog_usec / 2e6

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def notify(self, *assignments: str, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines (positional strings as given, keywords as KEY=value).

        True if the datagram was sent; False when disabled or on a send error.
        """
        if self._addr is None:
            return False
        lines = [_clean(a) for a in assignments] + [f"{k}={_clean(v)}" for k, v in fields.items()]
        if not lines:
            return False
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self._addr)
        except OSError as e:
            self.errors += 1
            self.last_error = e
            return False
        self.sent += 1
        return True

    # The messages hotplane sends.

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (with a STATUS= line if given): startup is complete."""
        return self.notify("READY=1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """STATUS=text, shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: still alive."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutting down on purpose."""
        return self.notify("STOPPING=1", **({"STATUS": status} if status else {}))

    def reloading(self) -> bool:
        """RELOADING=1 (send READY=1 again when done)."""
        return self.notify("RELOADING=1")

    def mainpid(self, pid: int) -> bool:
        """MAINPID=pid: the service's main process is now ``pid``."""
        return self.notify(MAINPID=int(pid))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for ``seconds`` more before the start/stop timeout hits."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    async def watchdog_loop(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog every :attr:`watchdog_interval` while ``healthy()`` (if given) says so.

        Returns at once if the watchdog is off. Because the pings come from the event loop,
        a wedged loop stops them and systemd restarts the service, as intended.
        """
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return
        while True:
            if healthy is None or healthy():
                self.watchdog()
            await asyncio.sleep(interval)
