"""The ``hotplane`` command: one entry point, a subcommand per role or tool.

Each subcommand's module is imported only when used, so a worker does not
pay for the supervisor's imports and vice versa.
"""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys

from hotplane import __version__

# name -> (module, help). Every module has main(argv) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("hotplane.supervisor.up", "start an instance under the supervisor (embedded default without -c)"),
    "down": ("hotplane.supervisor.down", "stop an instance cleanly"),
    "supervisor": ("hotplane.supervisor.main", "run the supervisor process in the foreground"),
    "primary": ("hotplane.primary.main", "run the primary process (creates/re-attaches the shared memory)"),
    "worker": ("hotplane.secondary.worker", "run a worker: polls one queue of each port through the pipeline"),
    "stats": ("hotplane.secondary.stats", "run the stats secondary (Prometheus exposition)"),
    "gen": ("hotplane.secondary.gen", "traffic generator: stamped flows into a ring or af_packet port"),
    "sink": ("hotplane.secondary.sink", "verifying sink: counts lost, duplicated, reordered, corrupted"),
    "chaos": ("hotplane.supervisor.chaos", "inject faults into a live instance and report recovery"),
    "memzones": ("hotplane.secondary.memzones", "attach as a secondary and list the instance's memzones"),
    "cleanup": ("hotplane.supervisor.cleanup", "remove a stopped instance's memory and runtime files"),
    "bench": ("hotplane.bench.main", "run a benchmark (ring, table, attach, fastpath, ...)"),
    "lab": ("hotplane.deploy.lab", "network namespace lab: up | down | status"),
}


def usage() -> str:
    lines = [f"hotplane {__version__}", "usage: hotplane COMMAND [EAL options] -- [options]", "", "commands:"]
    for name, (mod, text) in COMMANDS.items():
        if _available(mod):
            lines.append(f"  {name:10s} {text}")
    lines.append("\n'hotplane COMMAND --help' for a command's options")
    return "\n".join(lines)


def _available(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Output piped into head(1) ends quietly, as for any Unix tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"hotplane {__version__}")
        return 0
    cmd = argv[0]
    entry = COMMANDS.get(cmd)
    if entry is None or not _available(entry[0]):
        print(f"hotplane: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(entry[0])
    try:
        return int(mod.main(argv[1:]) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
