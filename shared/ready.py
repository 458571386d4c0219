"""Reporting READY: to the supervisor over its IPC socket, or on stdout when run by hand.

Under a supervisor the report is also written down, as a *READY marker* beside the
process's identity record (``<runtime>/procs/<name>.ready``: pid, identity token,
the report). A READY sent while no supervisor listens (it was killed and its
successor is not up yet) is then not lost: the next supervisor adopts the process
and reads the marker instead of waiting for a READY that will never come again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SUPERVISOR_SOCKET_ENV = "HOTPLANE_SUPERVISOR_SOCKET"
PROGRAM_ENV = "HOTPLANE_PROGRAM"
TOKEN_ENV = "HOTPLANE_PROCESS_TOKEN"  # set by the supervisor's launcher, also kept in the identity record
READY_MARKER_SUFFIX = ".ready"


def program_name(default: str) -> str:
    """The name the supervisor knows this process by."""
    return os.environ.get(PROGRAM_ENV, default)


def ready_marker_path(instance_dir: str | os.PathLike, name: str) -> Path:
    """Where program ``name`` of the instance whose runtime directory is ``instance_dir`` leaves its READY."""
    return Path(instance_dir) / "procs" / f"{name}{READY_MARKER_SUFFIX}"


def write_ready_marker(instance_dir: str | os.PathLike, name: str, info: dict[str, Any]) -> Path:
    """Write this process's READY marker atomically (temp file, rename); raises OSError."""
    path = ready_marker_path(instance_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"name": name, "pid": os.getpid(), "token": os.environ.get(TOKEN_ENV, ""), "time": time.time(), "info": info}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, default=str))
    os.replace(tmp, path)
    return path


def report_ready(default_name: str, info: dict[str, Any], *, as_json: bool = False, timeout: float = 10.0) -> None:
    """Tell whoever started us that we are ready.

    Under the supervisor this is a request on its socket (the supervisor moves
    the program to READY only then, never after a timer), preceded by the READY
    marker (see the module docstring); otherwise one line on stdout that scripts
    and tests wait for.
    """
    name = program_name(default_name)
    payload = dict(info, name=name, pid=os.getpid())
    path = os.environ.get(SUPERVISOR_SOCKET_ENV)
    if path:
        from hotplane.shared.ipc import IpcError, request_sync

        try:
            write_ready_marker(Path(path).parent, name, payload)
        except OSError as e:
            print(f"{name}: could not write the READY marker ({e}); a restarted supervisor will not know this process is ready", file=sys.stderr)
        try:
            request_sync(path, "ready", payload, timeout=timeout)
        except IpcError as e:
            # The supervisor may be restarting: its successor adopts us and reads the marker.
            print(f"{name}: could not report READY to the supervisor ({e}); carrying on (the READY marker tells its successor)", file=sys.stderr)
    if as_json:
        print(json.dumps(dict(payload, event="ready")), flush=True)
    else:
        print(f"READY {name} pid {os.getpid()}", flush=True)
