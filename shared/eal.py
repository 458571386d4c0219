"""EAL options, parsed the same way by every hotplane process.

As in DPDK, a command line is ``hotplane ROLE [EAL options] -- [application
options]``. Unknown or contradictory EAL options end the process with a
message and exit code 2 (argparse's usage-error code).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zlib
from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_PREFIX = "hotplane"
DEFAULT_SOCKET_MEM_MB = 256
# Fixed bases live far from the heap (0x55..) and from the kernel's mmap area
# (0x7f..); each prefix gets its own 64 GiB slot so two instances can even be
# attached by one process (a test, a sink reading two gateways).
BASE_REGION = 0x1000_0000_0000
BASE_SLOT = 0x10_0000_0000
BASE_SLOTS = 1024

PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class UsageError(Exception):
    """Bad or contradictory options: the process exits with code 2."""


@dataclass
class EalOptions:
    """The parsed EAL options of one process."""

    file_prefix: str = DEFAULT_PREFIX
    proc_type: str = "auto"
    huge_dir: str | None = None
    socket_mem_mb: int | None = None
    base_virtaddr: int | None = None
    no_huge: bool = False
    lcores: list[int] | None = None
    vdevs: list[str] = field(default_factory=list)
    app_args: list[str] = field(default_factory=list)
    # The one role the command can run as ('primary' | 'secondary'), None for a command
    # that can be either. With --proc-type auto, eal_init refuses a resolution that
    # contradicts it.
    role: str | None = None

    @property
    def memory_bytes(self) -> int:
        return (self.socket_mem_mb or DEFAULT_SOCKET_MEM_MB) << 20

    def default_base(self) -> int:
        """The base address this prefix maps at unless --base-virtaddr says otherwise."""
        return BASE_REGION + (zlib.crc32(self.file_prefix.encode()) % BASE_SLOTS) * BASE_SLOT

    def to_argv(self) -> list[str]:
        """The EAL part of a command line that reproduces these options (for child processes)."""
        argv = ["--file-prefix", self.file_prefix, "--proc-type", self.proc_type]
        if self.huge_dir:
            argv += ["--huge-dir", self.huge_dir]
        if self.socket_mem_mb is not None:
            argv += ["--socket-mem", str(self.socket_mem_mb)]
        if self.base_virtaddr is not None:
            argv += ["--base-virtaddr", hex(self.base_virtaddr)]
        if self.no_huge:
            argv.append("--no-huge")
        if self.lcores is not None:
            argv += ["--lcores", ",".join(map(str, self.lcores))]
        for v in self.vdevs:
            argv += ["--vdev", v]
        return argv


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _int_auto(s: str) -> int:
    try:
        return int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r} (use decimal or 0x hex)") from None


def _positive_mb(s: str) -> int:
    # DPDK allows a per-socket list "1024,1024"; we run on one socket and sum.
    try:
        total = sum(int(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--socket-mem takes megabytes, e.g. 256: got {s!r}") from None
    if total <= 0:
        raise argparse.ArgumentTypeError("--socket-mem must be a positive number of megabytes")
    return total


def parse_lcores(spec: str) -> list[int]:
    """Parse a CPU list like ``0-1,3`` (DPDK's --lcores/-l syntax without remapping)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(f"--lcores: cannot read {part!r}; use a CPU list such as 0-1,3")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"--lcores: range {part!r} runs backwards")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise UsageError("--lcores: empty CPU list")
    return sorted(cpus)


def _eal_parser(prog: str) -> _Parser:
    p = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    p.add_argument("--file-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--proc-type", choices=("primary", "secondary", "auto"), default=None)
    p.add_argument("--huge-dir")
    p.add_argument("--socket-mem", type=_positive_mb, dest="socket_mem_mb")
    p.add_argument("--base-virtaddr", type=_int_auto)
    p.add_argument("--no-huge", action="store_true")
    p.add_argument("--lcores", "-l")
    p.add_argument("--vdev", action="append", default=[])
    return p


EAL_HELP = """EAL options (before --):
  --file-prefix NAME      instance name: runtime dir, memory file and IPC names (default hotplane)
  --proc-type TYPE        primary | secondary | auto: auto is the primary if no primary of
                          the prefix runs, else a secondary (default: the command's own role,
                          or auto for a command that can be either)
  --huge-dir DIR          hugetlbfs mount to use (default: found from /proc/mounts)
  --socket-mem MB         shared memory size in MiB (primary only; default 256)
  --base-virtaddr ADDR    fixed virtual address of the shared memory (primary only)
  --no-huge               use 4 KiB shared memory instead of hugepages (primary only)
  --lcores LIST           CPU affinity, e.g. 0-1,3
  (DPDK's --vdev is refused: ports are the application's options, e.g. hotplane primary
   -- --inside ring:in --outside af_packet:eth1)"""


def parse_eal(argv: list[str], *, prog: str = "hotplane", role: str | None = None) -> EalOptions:
    """Parse ``[EAL options] [-- app options]``; raises UsageError on bad input.

    ``role`` ('primary' or 'secondary') is the one role of a command that can
    only be one of them: it is the default --proc-type, a contradicting explicit
    --proc-type is an error, and --proc-type auto is kept for ``eal_init`` to
    resolve (refusing, there, a resolution other than ``role``).
    """
    if "--" in argv:
        i = argv.index("--")
        eal_argv, app = argv[:i], argv[i + 1 :]
    else:
        eal_argv, app = argv, []
    ns, unknown = _eal_parser(prog).parse_known_args(eal_argv)
    if unknown:
        raise UsageError(f"unknown EAL option(s): {' '.join(unknown)} (application options go after --)")
    opts = EalOptions(
        file_prefix=ns.file_prefix,
        proc_type=ns.proc_type or role or "auto",
        huge_dir=ns.huge_dir,
        socket_mem_mb=ns.socket_mem_mb,
        base_virtaddr=ns.base_virtaddr,
        no_huge=ns.no_huge,
        lcores=parse_lcores(ns.lcores) if ns.lcores else None,
        vdevs=list(ns.vdev),
        app_args=app,
    )
    validate(opts, role=role)
    return opts


def validate(opts: EalOptions, *, role: str | None = None) -> None:
    """Reject contradictory combinations with a message saying which options clash."""
    if opts.vdevs:
        raise UsageError(f"--vdev {opts.vdevs[0]} is not supported: hotplane has no virtual devices; name ports in the application's options "
                         "(hotplane primary -- --inside SPEC --outside SPEC, with ring:NAME, af_packet:IFACE or pcap:FILE)")
    if not PREFIX_RE.match(opts.file_prefix):
        raise UsageError(f"--file-prefix {opts.file_prefix!r}: use 1-32 letters, digits, '.', '_' or '-'")
    if role is not None:
        if opts.proc_type not in ("auto", role):
            raise UsageError(f"--proc-type {opts.proc_type} contradicts this command, which always runs as "
                             f"{'the primary' if role == 'primary' else 'a secondary'}: drop --proc-type, or give {role} or auto")
        opts.role = role
    if opts.no_huge and opts.huge_dir:
        raise UsageError("--no-huge and --huge-dir contradict each other: pick one")
    if "secondary" in (opts.proc_type, opts.role):
        for flag, val in (("--socket-mem", opts.socket_mem_mb), ("--base-virtaddr", opts.base_virtaddr), ("--no-huge", opts.no_huge or None), ("--huge-dir", opts.huge_dir)):
            if val is not None:
                raise UsageError(f"{flag} is the primary's choice; a secondary takes it from the running primary: drop {flag}")
    if opts.base_virtaddr is not None:
        if opts.base_virtaddr % (2 << 20):
            raise UsageError(f"--base-virtaddr {opts.base_virtaddr:#x} must be 2 MiB aligned")
        if not (0x1_0000_0000 <= opts.base_virtaddr < 0x7000_0000_0000):
            raise UsageError(f"--base-virtaddr {opts.base_virtaddr:#x} is outside 0x100000000..0x700000000000")
    if opts.lcores is not None:
        avail = os.sched_getaffinity(0)
        bad = [c for c in opts.lcores if c not in avail]
        if bad:
            raise UsageError(f"--lcores: CPU(s) {bad} not available to this process (available: {sorted(avail)})")


def apply_affinity(opts: EalOptions) -> None:
    """Pin this process to --lcores, if given."""
    if opts.lcores is not None:
        os.sched_setaffinity(0, opts.lcores)


def parse_or_exit(argv: list[str], *, prog: str, role: str | None = None) -> EalOptions:
    """parse_eal for a process entry point: prints the message and exits 2 on bad options."""
    eal_part = argv[: argv.index("--")] if "--" in argv else argv
    if any(a in ("-h", "--help") for a in eal_part):
        print(f"usage: {prog} [EAL options] -- [application options]\n\n{EAL_HELP}")
        sys.exit(EXIT_OK)
    try:
        return parse_eal(argv, prog=prog, role=role)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        print(f"{prog}: run '{prog} --help' for the EAL options", file=sys.stderr)
        sys.exit(EXIT_USAGE)
