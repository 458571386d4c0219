"""Reporting READY: to the supervisor over its IPC socket, or on stdout when run by hand."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

SUPERVISOR_SOCKET_ENV = "HOTPLANE_SUPERVISOR_SOCKET"
PROGRAM_ENV = "HOTPLANE_PROGRAM"


def program_name(default: str) -> str:
    """The name the supervisor knows this process by."""
    return os.environ.get(PROGRAM_ENV, default)


def report_ready(default_name: str, info: dict[str, Any], *, as_json: bool = False, timeout: float = 10.0) -> None:
    """Tell whoever started us that we are ready.

    Under the supervisor this is a request on its socket (the supervisor moves
    the program to READY only then, never after a timer); otherwise one line
    on stdout that scripts and tests wait for.
    """
    name = program_name(default_name)
    payload = dict(info, name=name, pid=os.getpid())
    path = os.environ.get(SUPERVISOR_SOCKET_ENV)
    if path:
        from hotplane.shared.ipc import IpcError, request_sync

        try:
            request_sync(path, "ready", payload, timeout=timeout)
        except IpcError as e:
            # The supervisor may be restarting: it re-adopts us and asks again.
            print(f"{name}: could not report READY to the supervisor ({e}); carrying on", file=sys.stderr)
    if as_json:
        print(json.dumps(dict(payload, event="ready")), flush=True)
    else:
        print(f"READY {name} pid {os.getpid()}", flush=True)
