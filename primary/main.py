"""The primary process: creates (or re-attaches) the instance memory and holds it.

``hotplane primary [EAL] -- [--json]``. On start it prints one ready line
(JSON with ``--json``) once the memory and directory are valid, then waits
until SIGTERM/SIGINT. Its death loses nothing: the memory file stays, and a
restarted primary re-attaches it and bumps the generation.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit
from hotplane.shared.instance import InstanceError, describe, eal_init


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane primary", role="primary")
    ap = argparse.ArgumentParser(prog="hotplane primary ... --", add_help=True)
    ap.add_argument("--json", action="store_true", help="print the ready line as JSON")
    try:
        app = ap.parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        inst = eal_init(opts)
    except InstanceError as e:
        print(f"hotplane primary: {e}", file=sys.stderr)
        return EXIT_FAILURE
    info = describe(inst)
    info["event"] = "ready"
    info["created"] = inst.created
    if app.json:
        print(json.dumps(info), flush=True)
    else:
        how = "hugepages" if inst.memory.hugepages else "4 KiB pages"
        state = "created" if inst.created else "re-attached"
        print(f"READY primary pid {info['pid']} prefix {inst.prefix} generation {inst.generation}: {state} {inst.memory.size >> 20} MiB on {how} at {info['base']} ({len(info['zones'])} zones)", flush=True)
    stop.wait()
    inst.close()
    return EXIT_OK
