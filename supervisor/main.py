"""The supervisor: the process tree of one instance, kept alive and answerable.

``hotplane supervisor [EAL] -- [-c CONFIG] [--daemon] [options]``

What it does
------------
* Builds the *plan* from the configuration (``-c FILE`` or the embedded default,
  :func:`hotplane.shared.nat_config.default_config`): ``primary``; ``worker-0`` ..
  ``worker-N-1``; ``stats``; with ``[supervisor] hot_standby`` (or ``--hot-standby``)
  a standby ``standby-0`` .. ``standby-N-1`` per worker; and, with ring ports and no
  config file (the embedded default), the traffic generator ``gen`` feeding
  ``ring:in`` and the verifying ``sink`` reading ``ring:out``.
* Starts the plan in *stages*: the primary; once it reported READY, the workers,
  stats and the sink; once those reported READY, the generator (so the sink and
  the workers are there before the first packet). READY always comes from the
  process itself, as a ``ready`` request on the control socket
  (:mod:`hotplane.shared.ready`), never from a timer.
* Drives one :class:`~hotplane.supervisor.process_state.ProcessMachine` per program
  (the states, autorestart with backoff, retry limits, SIGTERM then SIGKILL) and
  performs its actions: fork+exec through :mod:`hotplane.supervisor.launcher`,
  pidfd exit watches, timers, identity records in ``<runtime>/procs``.
* Hot standby: ``standby-N`` is a worker started in the hot-upgrade candidate mode
  (``hotplane worker --candidate``: attached, zones validated, tables attached as a
  reader, warmed up, parked), READY once it reported the candidate step ``ready``.
  When ``worker-N`` must be started again (it died, hung, or was restarted) and its
  standby is READY, the standby's process *is* the new ``worker-N``: the supervisor
  sends it ``claim {queue, force}`` for both queues over its control socket (the
  forced claim takes them over from the dead owner; the worker repairs the cursors
  with ``burst.reconcile`` and takes the session tables' writer role), feeds READY
  when the claims landed, and then starts a new standby. Without a READY standby
  the worker is started afresh as before.
* Watches the workers' heartbeats in the ``counters`` zone: a worker whose
  heartbeat is older than ``--heartbeat-misses`` x ``--heartbeat-interval`` hangs,
  and is stopped and restarted (HeartbeatMissed).
* On start, adopts the processes a previous (killed) supervisor left running when
  their records prove they are the same processes (:func:`launcher.adopt`: pid,
  start time, boot, command line, identity token), so the packet path never pauses;
  a record whose pid now belongs to another process is discarded and the program
  started afresh. An adopted process counts as READY if its record says so, if it
  left a READY marker (it reported READY while no supervisor listened, see
  :mod:`hotplane.shared.ready`), or, for a worker or standby, if its control socket
  says it holds its queues (or is parked). Restart counts live in the records too,
  so ``status`` and ``stats`` keep them across supervisor restarts.
* Serves the control socket ``<runtime>/supervisor.sock`` (0600, SO_PEERCRED) for
  ``supervisorctl`` and the children (methods below).
* Speaks the systemd notify protocol: READY=1 once every program is up, STATUS=
  on changes, WATCHDOG=1 from the event loop, STOPPING=1 on shutdown.
* Holds ``<runtime>/supervisor.lock`` (flock, with its pid) for its life: a second
  supervisor for the prefix refuses to start and names the first one's pid.
* SIGTERM / SIGINT (and ``shutdown``) stop the tree in reverse stage order and exit
  0. Killing the supervisor (SIGKILL) stops nothing.

Control socket methods (msgpack requests, see :mod:`hotplane.shared.ipc`)
-------------------------------------------------------------------------
``ready {name, pid, ...}`` (from a child), ``status {names?}``, ``start {names}``,
``stop {names}``, ``restart {names}``, ``signal {names, signal}``, ``pid {name?}``,
``tail {name, lines}``, ``stats``, ``sessions``, ``version``, ``shutdown``; hot upgrade
(:mod:`hotplane.supervisor.upgrade`): ``upgrade {to, dry_run?, canary?, park_time?, wait?}``,
``upgrade_status``, ``upgrade_history``, ``upgrade_commit``, ``upgrade_resume`` (ends a test's
``pause_at`` hold), ``rollback``, and
``candidate_report {unit, pid, step, detail}`` (from a candidate).
``names`` is a list of program names or ``["all"]``; an unknown name is a
``RemoteError`` of type ``unknown_program`` (supervisorctl exits 4).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hotplane import __version__
from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, EalOptions, UsageError, parse_eal
from hotplane.shared.runtime import FileLock, running_primary_pid, runtime_dir, runtime_root
from hotplane.supervisor import launcher
from hotplane.supervisor.logs import LogFile, rotate_periodically, tail_lines
from hotplane.supervisor.process_state import (
    IDLE_STATES,
    Adopted,
    ArmTimer,
    CancelTimer,
    ClearRecord,
    Exited,
    HeartbeatMissed,
    Log,
    Notify,
    ProcessMachine,
    ProgramConfig,
    Ready,
    Record,
    SendSignal,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    State,
    StopRequested,
    timer_event,
)
from hotplane.supervisor.sdnotify import Notifier

SOCKET_NAME = "supervisor.sock"
LOCK_NAME = "supervisor.lock"
EXIT_NOT_RUNNING = 3  # LSB: program is not running
EXIT_UNKNOWN = 4  # LSB: program or service status is unknown

RESTART_POLICY = {"always": True, "on-failure": "unexpected", "never": False}


def control_socket(prefix: str) -> Path:
    """``<runtime>/supervisor.sock`` of instance ``prefix``."""
    return runtime_dir(prefix) / SOCKET_NAME


def supervisor_lock(prefix: str) -> FileLock:
    return FileLock(runtime_dir(prefix, create=True) / LOCK_NAME)


def running_supervisor_pid(prefix: str) -> int | None:
    """The pid of the supervisor holding ``prefix``'s lock, or None if there is none."""
    path = runtime_dir(prefix) / LOCK_NAME
    if not path.exists():
        return None
    lock = FileLock(path)
    try:
        if lock.acquire(blocking=False):
            return None
        return lock.read_pid() or -1
    finally:
        lock.release()


def default_log_dir(prefix: str) -> Path:
    """systemd's ``$LOGS_DIRECTORY/<prefix>`` under the unit, else ``<runtime>/logs``."""
    base = os.environ.get("LOGS_DIRECTORY")
    if base:
        return Path(base.split(":")[0]) / prefix
    return runtime_dir(prefix) / "logs"


#: How long a fenced (hung) worker may stay before it is SIGKILLed.
FENCED_GRACE_S = 60.0


class _Notifier(Notifier):
    """sd_notify from an event loop must never block: a full notify socket queue (a slow or
    stopped reader) drops the datagram (counted in ``errors``) instead of stalling the loop."""

    def notify(self, *assignments: str, **fields: object) -> bool:
        if self._addr is not None and self._sock is None:
            import socket

            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        return super().notify(*assignments, **fields)


# --------------------------------------------------------------------------- the plan


@dataclass
class Program:
    """One supervised program: its command, its state machine and the live bits the shell keeps."""

    name: str
    kind: str  # primary | worker | stats | gen | sink
    argv: list[str]
    config: ProgramConfig
    stage: float
    worker_id: int | None = None
    machine: ProcessMachine = field(init=False)
    child: launcher.Child | None = None
    log: LogFile | None = None
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    wanted: bool = True  # the operator has not stopped it
    launched: bool = False  # started or adopted at least once by this supervisor
    spawns: int = 0
    adopted: bool = False
    ready_info: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    extra_env: dict[str, str] = field(default_factory=dict)  # the build it runs (set by a hot upgrade)
    restarts: int = 0  # processes started after the first one, by any supervisor (kept in the record)
    had_process: bool = False  # a process of this program ran before (spawned, adopted or promoted)

    def __post_init__(self) -> None:
        self.machine = ProcessMachine(self.config)

    @property
    def state(self) -> State:
        return self.machine.state

    def count_start(self) -> None:
        """A new process of this program: every one after the first is a restart."""
        if self.had_process:
            self.restarts += 1
        self.had_process = True


def standby_name(worker_id: int) -> str:
    """The hot standby program of worker slot ``worker_id``."""
    return f"standby-{worker_id}"


#: How long a promoted standby may take to hold both its queues.
STANDBY_CLAIM_TIMEOUT = 5.0


def _hotplane_cmd(role: str, eal: list[str], app: list[str]) -> list[str]:
    return [sys.executable, "-m", "hotplane.supervisor.cli", role, *eal, "--", *app]


def _primary_accepts(option: str, value: str | None = None) -> bool:
    """Does this build's primary take ``option`` (with ``value`` among its choices)?"""
    try:
        from hotplane.primary.main import app_parser

        act = app_parser()._option_string_actions.get(option)
    except Exception:
        return False
    if act is None:
        return False
    return value is None or act.choices is None or value in act.choices


def port_arg(spec, role: str, workers: int, port_lo: int) -> str:
    """A config port (``ring:in``) as the primary's port spec (queues, steering)."""
    text = f"{spec.kind}:{spec.name},queues={workers},steer={role}"
    if role == "outside":
        text += f",port_lo={port_lo}"
    return text


def check_ports(cfg) -> list[str]:
    """Problems with the configured ports that would only show up as a crashing primary."""
    problems = []
    for role, spec in (("inside_port", cfg.gateway.inside_port), ("outside_port", cfg.gateway.outside_port)):
        if spec.kind == "pcap":
            problems.append(f"gateway.{role} = \"{spec}\": the gateway's ports are ring: or af_packet: ports (pcap ports are for replay and capture tools)")
        elif spec.kind == "af_packet":
            if not Path("/sys/class/net", spec.name).exists():
                problems.append(f"gateway.{role} = \"{spec}\": there is no network interface {spec.name!r} (see 'ip link'; for the lab: 'hotplane lab up')")
    return problems


def check_privileges(opts: EalOptions, app: argparse.Namespace, cfg) -> list[str]:
    """What this user lacks to run the instance (without root or the capabilities): one line each, naming it.

    Checked before anything starts, so a user without them gets the list instead of
    a primary that dies half-way with a traceback in its log.
    """
    from hotplane.shared import memory

    problems = []
    uid = os.geteuid()
    rdir = runtime_dir(opts.file_prefix)
    why = _not_writable(rdir)
    if why:
        problems.append(f"runtime directory {rdir} {why}; run as root (or as its owner), or set HOTPLANE_RUNTIME_DIR to a directory you own")
    log_dir = Path(app.log_dir) if app.log_dir else default_log_dir(opts.file_prefix)
    why = None if _within(log_dir, rdir) else _not_writable(log_dir)
    if why:
        problems.append(f"log directory {log_dir} {why}; pick another with --log-dir")
    existing = memory.existing_memory_file(opts.file_prefix)
    if existing is not None:
        if not os.access(existing, os.R_OK | os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            owner = _owner(Path(existing))
            problems.append(f"the instance memory {existing} belongs to uid {owner}, not uid {uid}: run as that user or root, or pick another --file-prefix")
    elif opts.no_huge:
        why = _not_writable(Path("/dev/shm"))
        if why:
            problems.append(f"4 KiB shared memory (--no-huge): /dev/shm {why}")
    else:
        try:
            mount = memory.find_huge_dir(opts.huge_dir)
        except memory.MemoryError_:
            mount = None  # a bad --huge-dir: the primary names the problem
        why = _not_writable(Path(mount.path)) if mount is not None else None
        if why:
            problems.append(f"hugepages: the hugetlbfs mount {mount.path} {why}; run as root, mount one for this user "
                            f"('mount -t hugetlbfs -o uid={uid},gid={os.getegid()} nodev DIR', then --huge-dir DIR), or use --no-huge (4 KiB pages)")
    for role, spec in (("inside_port", cfg.gateway.inside_port), ("outside_port", cfg.gateway.outside_port)):
        if spec.kind == "af_packet" and Path("/sys/class/net", spec.name).exists() and not _has_cap_net_raw():
            problems.append(f"gateway.{role} = \"{spec}\": af_packet ports need root or CAP_NET_RAW, which uid {uid} does not have "
                            "(run with sudo, or grant it: AmbientCapabilities in deploy/hotplane.service)")
    return problems


def _within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _owner(path: Path) -> str:
    try:
        return str(os.stat(path).st_uid)
    except OSError:
        return "?"


def _not_writable(path: Path) -> str | None:
    """Why this user cannot create or write ``path`` (a directory), or None if it can.

    ``os.path.lexists`` is False for a path hidden behind a directory we may not
    search, so the walk stops at the nearest directory we can see, which is the
    one that refuses us.
    """
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return None
    try:
        st = os.stat(probe)
        mode = f"owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}"
    except OSError as e:
        mode = e.strerror or str(e)
    if probe == path:
        return f"is not writable by uid {os.geteuid()} ({mode})"
    return f"cannot be created: {probe} ({mode}) is not writable by uid {os.geteuid()}"


def _has_cap_net_raw() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 13))
    except (OSError, ValueError):
        pass
    return False


def build_plan(opts: EalOptions, app: argparse.Namespace, cfg, *, traffic: bool) -> list[Program]:
    """The programs of this instance, in stage order, from the configuration."""
    sup = cfg.supervisor
    n = cfg.nat.workers
    base = dict(
        startsecs=1.0,
        startretries=3,
        autorestart=RESTART_POLICY[sup.restart],
        stopwaitsecs=app.stop_wait,
        backoff_base=sup.backoff_initial,
        backoff_max=sup.backoff_max,
        ready_required=True,
        ready_timeout=sup.ready_timeout,
        max_restarts=sup.max_restarts,
        restart_window=sup.restart_window,
    )
    prefix = opts.file_prefix
    primary_eal = opts.to_argv()
    primary_eal[primary_eal.index("--proc-type") + 1] = "primary"
    sec_eal = ["--file-prefix", prefix, "--proc-type", "secondary"]
    if opts.lcores is not None:
        sec_eal += ["--lcores", ",".join(map(str, opts.lcores))]
    pipeline = app.pipeline
    if pipeline is None:
        pipeline = "nat" if _primary_accepts("--pipeline", "nat") else "forward"
    papp = ["--workers", str(n),
            "--inside", port_arg(cfg.gateway.inside_port, "inside", n, cfg.nat.port_lo),
            "--outside", port_arg(cfg.gateway.outside_port, "outside", n, cfg.nat.port_lo)]
    if _primary_accepts("--pipeline", pipeline):
        papp += ["--pipeline", pipeline]
    if app.config and _primary_accepts("--config"):
        papp += ["--config", str(Path(app.config).resolve())]
    plan = [Program("primary", "primary", _hotplane_cmd("primary", primary_eal, papp), ProgramConfig("primary", **base), 0)]
    for i in range(n):
        name = f"worker-{i}"
        plan.append(Program(name, "worker", _hotplane_cmd("worker", sec_eal, ["--id", str(i)]), ProgramConfig(name, **base), 1, worker_id=i))
    hot_standby = app.hot_standby if getattr(app, "hot_standby", None) is not None else sup.hot_standby
    if hot_standby:
        for i in range(n):
            name = standby_name(i)
            plan.append(Program(name, "standby", _hotplane_cmd("worker", sec_eal, ["--id", str(i), "--candidate"]), ProgramConfig(name, **base), 1.5, worker_id=i))
    plan.append(Program("stats", "stats", _hotplane_cmd("stats", sec_eal, ["--listen", app.stats_listen or cfg.stats.listen]), ProgramConfig("stats", **base), 1))
    if traffic:
        inside, outside = cfg.gateway.inside_port, cfg.gateway.outside_port
        # gen and sink run "forever": a duration of 100 years (they take no 0 for unbounded).
        forever = ["--duration", str(UNBOUNDED_SECONDS), "--name"]
        # The sink plays the outside host the generator's flows go to: it answers the
        # gateway's ARP for it, as a host on a real port would.
        sink_app = ["--port", f"ring:{outside.name}", *forever, "sink", "--quiet", "--arp", "198.18.0.2"]
        plan.append(Program("sink", "sink", _hotplane_cmd("sink", sec_eal, sink_app), _traffic_config("sink", base), 0.5))
        gen_app = ["--port", f"ring:{inside.name}", *forever, "gen", "--quiet", "--flows", str(app.flows), "--rate", str(app.rate)]
        plan.append(Program("gen", "gen", _hotplane_cmd("gen", sec_eal, gen_app), _traffic_config("gen", base), 2))
    # Stages: 0 primary; 0.5 sink (there before the workers transmit); 1 workers and stats;
    # 1.5 the standbys (they attach to what the workers made); 2 the generator, once
    # everything downstream is READY. Shutdown runs them backwards.
    return plan


UNBOUNDED_SECONDS = 100 * 365 * 86400


def _traffic_config(name: str, base: dict) -> ProgramConfig:
    """gen and sink are supervised like every program: up only once they reported READY
    over the control socket (shared/ready.py), never after a timer."""
    return ProgramConfig(name, **dict(base, ready_required=True))


# --------------------------------------------------------------------------- the supervisor


class StartupFailed(Exception):
    """A program could not be brought up during the initial start; the message says which and why."""


class Supervisor:
    """The asyncio shell around the programs' state machines, plus the control socket."""

    def __init__(self, opts: EalOptions, app: argparse.Namespace, cfg, plan: list[Program], *, echo: bool, notifier: Notifier,
                 on_tick: Callable[["Supervisor"], None] | None = None) -> None:
        self.opts = opts
        self.prefix = opts.file_prefix
        self.app = app
        self.cfg = cfg
        self.programs: dict[str, Program] = {p.name: p for p in plan}
        self.rundir = runtime_dir(self.prefix, create=True)
        self.log_dir = Path(app.log_dir) if app.log_dir else default_log_dir(self.prefix)
        self.echo = echo
        self.notifier = notifier
        self.on_tick = on_tick
        self.loop: asyncio.AbstractEventLoop | None = None
        self.log: LogFile | None = None
        self.server = None
        self.inst = None  # the instance memory, attached once the primary is up (heartbeats, stats)
        self.started_at = time.monotonic()
        self.stats: dict[str, Any] | None = None
        self._prev_snap: dict[str, Any] | None = None
        self.shutting_down = False
        self.all_ready_once = False
        self.exit_code = EXIT_OK
        self.failure: str | None = None
        self._done: asyncio.Event | None = None
        self._advance_pending = False
        self._waiters: list[asyncio.Future] = []
        self._tasks: list[asyncio.Task] = []
        self._hb_stale: dict[str, int] = {}
        self._last_status = ""
        self.fresh_instance = False
        self.upgrade = None  # the hot-upgrade shell (supervisor/upgrade.py), made in run()
        self.worker_build = None  # the build workers run after a committed upgrade (None: ours)

    # ------------------------------------------------------------------ messages

    def say(self, text: str, level: str = "info") -> None:
        """A supervisor log line (and on stderr in the foreground)."""
        if self.log is not None:
            self.log.write_line(f"{level}: {text}" if level != "info" else text)
        if self.echo:
            try:
                print(f"{time.strftime('%H:%M:%S')} hotplane: {text}", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------ machine shell

    def feed(self, prog: Program, event) -> None:
        assert self.loop is not None
        if isinstance(event, Exited) and prog.kind in ("worker", "stats", "primary") and self.upgrade is not None:
            self.upgrade.on_program_exit(prog, event.pid, f"code {event.code} signal {event.signal}")
        for action in prog.machine.handle(event, self.loop.time()):
            self._do(prog, action)

    def _do(self, prog: Program, a) -> None:
        loop = self.loop
        assert loop is not None
        if isinstance(a, Spawn):
            standby = self.standby_for(prog)
            if standby is not None:
                self._promote(prog, standby)
            else:
                self._spawn(prog)
        elif isinstance(a, SendSignal):
            if prog.child is not None and prog.child.pid == a.pid:
                prog.child.send_signal(a.signal)
            else:
                self.say(f"{prog.name}: not signalling pid {a.pid}: not a process this supervisor holds a pidfd for", "warning")
        elif isinstance(a, ArmTimer):
            old = prog.timers.pop(a.name, None)
            if old is not None:
                old.cancel()
            prog.timers[a.name] = loop.call_later(a.seconds, self._timer_fired, prog, a.name, a.token)
        elif isinstance(a, CancelTimer):
            h = prog.timers.pop(a.name, None)
            if h is not None:
                h.cancel()
        elif isinstance(a, Record):
            if prog.child is not None and prog.child.pid == a.pid:
                try:
                    launcher.save_record(self.rundir, prog.child.record(ready=a.ready, restarts=prog.restarts))
                except OSError as e:
                    self.say(f"{prog.name}: cannot save its process record: {e} (a restarted supervisor will not adopt it)", "error")
        elif isinstance(a, ClearRecord):
            launcher.remove_record(self.rundir, prog.name)
        elif isinstance(a, Log):
            self.say(a.message, a.level)
            if prog.log is not None and a.level != "debug":
                prog.log.write_line(a.message)
        elif isinstance(a, Notify):
            self.say(f"{prog.name}: {a.old.value} -> {a.new.value}" + (f" (pid {a.pid})" if a.pid else "") + (f": {a.reason}" if a.reason else ""))
            self._changed(prog)

    def _timer_fired(self, prog: Program, name: str, token: int) -> None:
        prog.timers.pop(name, None)
        self.feed(prog, timer_event(name, token))

    def _spawn(self, prog: Program) -> None:
        if prog.child is not None:
            prog.child.close()
            prog.child = None
        env = dict(os.environ)
        env.update({
            "HOTPLANE_SUPERVISOR_SOCKET": str(self.rundir / SOCKET_NAME),
            "HOTPLANE_PROGRAM": prog.name,
            "HOTPLANE_RUNTIME_DIR": str(runtime_root()),
            "PYTHONUNBUFFERED": "1",
        })
        if prog.kind == "standby":
            env["HOTPLANE_UPGRADE_UNIT"] = prog.name  # the name its candidate reports carry
        if prog.extra_env:  # a hot upgrade moved the program to another build
            env.pop("PYTHONPATH", None)
            env.pop("HOTPLANE_SESSION_VERSION", None)
            env.update(prog.extra_env)
        spec = launcher.LaunchSpec(prog.name, prog.argv, env=env, version=prog.version)
        if prog.log is None:
            prog.log = LogFile(self.log_dir / f"{prog.name}.log", name=prog.name, report=lambda m: self.say(m, "warning"))
        prog.log.write_line(f"starting: {' '.join(prog.argv)}")
        try:
            child = launcher.spawn(spec, prog.log)
        except launcher.SpawnError as e:
            self.feed(prog, SpawnFailed(str(e)))
            return
        prog.child = child
        prog.spawns += 1
        prog.count_start()
        prog.launched = True
        prog.adopted = False
        prog.version = child.version
        prog.ready_info = {}
        child.watch(self.loop, lambda c, ex, prog=prog: self.feed(prog, ex))
        self.feed(prog, Spawned(child.pid, child.start_time))

    # ------------------------------------------------------------------ hot standby

    def standby_for(self, prog: Program) -> Program | None:
        """Worker ``prog``'s hot standby if it can take over right now, else None."""
        if prog.kind != "worker" or prog.worker_id is None or self.shutting_down:
            return None
        if self.upgrade is not None and self.upgrade.busy:
            return None  # the drain-and-swap protocol moves the worker slots meanwhile
        sb = self.programs.get(standby_name(prog.worker_id))
        if sb is None or sb.kind != "standby" or sb.state is not State.READY or sb.child is None or not sb.child.alive:
            return None
        if sb.version != prog.version or sb.extra_env != prog.extra_env:
            return None  # a standby of another build would take the slot back to that build
        return sb

    def _promote(self, prog: Program, sb: Program) -> None:
        """Answer worker ``prog``'s Spawn with its standby's process: hand it over, claim the queues.

        The worker's machine sees an ordinary start (Spawned, then READY once both
        claims landed), so restart counting, backoff and retry limits stay its own.
        The standby program starts from scratch (a new parked process) once the
        claims are answered: spawning it earlier would compete for the CPU with
        the take-over.
        """
        child = sb.child
        assert child is not None and self.loop is not None
        child.unwatch()
        for h in sb.timers.values():
            h.cancel()
        sb.timers.clear()
        sb.child = None
        sb.machine = ProcessMachine(sb.config)
        sb.ready_info = {}
        launcher.remove_record(self.rundir, sb.name)
        self.say(f"{prog.name}: promoting {sb.name} pid {child.pid} (parked, attached, warm) in its place")
        if prog.child is not None:
            prog.child.close()
        child.name = prog.name
        prog.child = child
        prog.spawns += 1
        prog.count_start()
        prog.launched = True
        prog.adopted = False
        prog.version = child.version
        prog.ready_info = {"promoted_from": sb.name}
        if prog.log is None:
            prog.log = LogFile(self.log_dir / f"{prog.name}.log", name=prog.name, report=lambda m: self.say(m, "warning"))
        prog.log.write_line(f"standby {sb.name} pid {child.pid} promoted to {prog.name} (its output goes on in {sb.name}.log)")
        child.watch(self.loop, lambda c, ex, prog=prog: self.feed(prog, ex))
        self.feed(prog, Spawned(child.pid, child.start_time))
        self._changed(sb)
        self._spawn_task(self._claim_for(prog, sb, child))

    async def _claim_for(self, prog: Program, sb: Program, child: launcher.Child) -> None:
        """Both queues of ``prog``'s slot to the promoted ``child`` (forced claims), then READY; a new standby."""
        from hotplane.secondary.worker import control_socket_path
        from hotplane.shared import ipc

        path = control_socket_path(self.rundir, child.pid)
        t0 = time.monotonic()

        async def claim(queue: str) -> None:
            params = {"queue": queue, "force": True, "timeout": STANDBY_CLAIM_TIMEOUT}
            async with await ipc.connect(path, heartbeat_interval=None) as ch:
                await ch.request("claim", params, timeout=STANDBY_CLAIM_TIMEOUT + 5.0)

        wid = prog.worker_id
        # Both at once: the worker answers a claim only when it holds all its queues.
        results = await asyncio.gather(claim(f"inside/{wid}"), claim(f"outside/{wid}"), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.say(f"{prog.name}: promoted standby pid {child.pid} could not claim its queues ({failed[0]}); killing it, a fresh worker follows", "error")
            child.send_signal(signal.SIGKILL)
        else:
            if prog.child is child and prog.machine.pid == child.pid:
                prog.ready_info.update({"worker": wid, "version": child.version, "claimed_in_ms": round((time.monotonic() - t0) * 1e3, 3)})
                self.feed(prog, Ready())
        if sb.wanted and not self.shutting_down and sb.state in IDLE_STATES:
            sb.launched = True
            self.feed(sb, Start())

    def _spawn_task(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.append(t)
        t.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _on_standby_report(self, channel, prog: Program, params: dict) -> dict:
        """A standby's candidate steps (``attached``, ``validated``, ``warm``, ``ready``): ``ready`` is its READY."""
        from hotplane.shared.ipc import RemoteError

        pid = channel.peer.pid
        if prog.machine.pid != pid:
            raise RemoteError("not_current", f"{prog.name}: pid {pid} is not the supervised process (pid {prog.machine.pid})")
        step = str(params.get("step"))
        detail = params.get("detail") if isinstance(params.get("detail"), dict) else {}
        if step == "validated":
            refused = {z: v for z, v in (detail.get("zones") or {}).items() if str(v).startswith("refused")}
            if refused:
                self.say(f"{prog.name}: pid {pid} cannot stand by: " + "; ".join(f"{z}: {v}" for z, v in refused.items()), "error")
        elif step == "ready":
            prog.ready_info = dict(detail, version=params.get("version") or prog.version, standby=True)
            self.feed(prog, Ready())
        return {"ok": True, "state": prog.state.value}

    async def _ask_adopted(self, prog: Program, child: launcher.Child) -> None:
        """An adopted worker or standby whose READY is not on record: its control socket tells.

        A worker holding both its queues and polling, or a standby parked with none,
        is up; anything else (or no answer) leaves it to report READY itself or to
        the ready timeout.
        """
        from hotplane.secondary.worker import control_socket_path
        from hotplane.shared import ipc

        try:
            async with await ipc.connect(control_socket_path(self.rundir, child.pid), heartbeat_interval=None) as ch:
                st = (await ch.request("status", {}, timeout=5.0)).result
        except (ipc.IpcError, OSError, asyncio.TimeoutError):
            return
        if not isinstance(st, dict) or prog.child is not child or prog.state is not State.STARTING:
            return
        wid = prog.worker_id
        holds = set(st.get("owned") or []) == {f"inside/{wid}", f"outside/{wid}"} and not st.get("parked")
        parked = bool(st.get("parked")) and not st.get("owned") and prog.kind == "standby"
        if holds or parked:
            prog.ready_info = {"worker": wid, "version": st.get("version"), "asked": True}
            self.say(f"{prog.name}: adopted pid {child.pid} says it is {'parked' if parked else 'polling its queues'}: READY")
            self.feed(prog, Ready())

    def _changed(self, prog: Program | None = None) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()
        if prog is not None and prog.kind == "primary" and prog.machine.is_up:
            self._attach_memory()
        if not self._advance_pending and self.loop is not None:
            self._advance_pending = True
            self.loop.call_soon(self._advance)

    async def wait_until(self, pred: Callable[[], bool], timeout: float | None) -> bool:
        """Wait (on state changes, not polling) until ``pred()``; False on timeout."""
        assert self.loop is not None
        deadline = None if timeout is None else self.loop.time() + timeout
        while not pred():
            fut = self.loop.create_future()
            self._waiters.append(fut)
            left = None if deadline is None else deadline - self.loop.time()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                return pred()
        return True

    # ------------------------------------------------------------------ the plan, in stages

    def _advance(self) -> None:
        """Start what the stages allow; detect 'all up' and start-up failures; tell systemd."""
        self._advance_pending = False
        if self.shutting_down:
            return
        progs = list(self.programs.values())
        for stage in sorted({p.stage for p in progs}):
            before = [p for p in progs if p.stage < stage and p.wanted]
            if not all(p.machine.is_up for p in before):
                break
            for p in progs:
                if p.stage == stage and p.wanted and not p.launched and p.state in IDLE_STATES:
                    p.launched = True
                    self.feed(p, Start())
        wanted = [p for p in progs if p.wanted]
        if not self.all_ready_once:
            failed = [p for p in wanted if p.state is State.FATAL]
            if failed:
                p = failed[0]
                why = p.machine.fatal_reason or p.machine.describe(self.loop.time())
                tail = tail_lines(p.log.path, 8) if p.log is not None and p.log.path.exists() else []
                self.failure = f"{p.name} could not be started: {why}" + ("\n  last lines of its log " + str(p.log.path) + ":\n    " + "\n    ".join(tail) if tail else "")
                self.say(self.failure, "error")
                self.exit_code = EXIT_FAILURE
                self.request_shutdown("start-up failed")
                return
            if wanted and all(p.machine.is_up for p in wanted):
                self.all_ready_once = True
                msg = f"all {len(wanted)} programs up: " + ", ".join(f"{p.name} pid {p.machine.pid}" for p in wanted)
                self.say(msg)
                self.notifier.ready(self._status_line())
        self._send_status()

    def _status_line(self) -> str:
        progs = [p for p in self.programs.values() if p.wanted]
        up = sum(p.machine.is_up for p in progs)
        bad = [f"{p.name} {p.state.value}" for p in progs if not p.machine.is_up]
        return f"{up}/{len(progs)} programs up" + (f"; {', '.join(bad)}" if bad else "")

    def _send_status(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    # ------------------------------------------------------------------ adoption

    def adopt_survivors(self) -> int:
        """Adopt the programs a previous supervisor left running; returns how many."""
        errors: list[str] = []
        records = launcher.load_records(self.rundir, errors)
        for e in errors:
            self.say(f"ignoring an unreadable process record: {e}", "warning")
        n = 0
        dead: dict[int, str] = {}
        for name, rec in records.items():
            prog = self.programs.get(name)
            child, why = launcher.adopt(rec)
            if child is None:
                self.say(f"not adopting {name} (pid {rec.pid}): {why}; its record is discarded", "warning")
                launcher.remove_record(self.rundir, name)
                dead[rec.pid] = name
                continue
            if prog is None:
                # Left over from another configuration: it must not run unsupervised.
                self.say(f"{name} (pid {rec.pid}) runs but is not in this configuration: stopping it", "warning")
                child.send_signal(signal.SIGTERM)
                child.close()
                launcher.remove_record(self.rundir, name)
                continue
            if prog.log is None:
                prog.log = LogFile(self.log_dir / f"{prog.name}.log", name=prog.name, report=lambda m: self.say(m, "warning"))
            prog.child = child
            prog.launched = True
            prog.adopted = True
            prog.version = rec.version
            prog.restarts = rec.restarts
            prog.had_process = True
            ready = rec.ready
            if not ready:
                marker = launcher.ready_marker(self.rundir, rec)
                if marker is not None:
                    ready = True
                    prog.ready_info = marker
                    self.say(f"{name}: pid {rec.pid} reported READY while no supervisor was listening (its READY marker says so)")
            child.watch(self.loop, lambda c, ex, prog=prog: self.feed(prog, ex))
            self.feed(prog, Adopted(rec.pid, rec.start_time, ready=ready))
            prog.log.write_line(f"adopted by supervisor pid {os.getpid()}")
            if not ready and prog.kind in ("worker", "standby") and prog.state is State.STARTING:
                self._spawn_task(self._ask_adopted(prog, child))
            n += 1
        if dead:
            self._release_dead_owners(dead)
        return n

    def _release_dead_owners(self, dead: dict[int, str]) -> None:
        """Release the queues still owned by recorded processes proven gone.

        queue_owner.claim refuses a queue whose owner pid is alive, and knows pids only: if
        the dead worker's pid now belongs to an unrelated process, its successor could
        never claim the queue. The supervisor designates successors (shared/queue_owner.py),
        and it has just proven (pid + start time + token) that the owner is gone, so it
        hands the queue back: owner 0, generation kept.
        """
        from hotplane.shared.burst import QueueState
        from hotplane.shared.queue_owner import hand_back, owner_of

        self._attach_memory()
        if self.inst is None:
            return
        for z in self.inst.directory.list():
            if z.schema_id != 6 or not z.name.endswith(".state"):
                continue
            qs = QueueState.attach(z.view)
            for i in range(qs.nqueues):
                pid, _ = owner_of(qs.words[i])
                if pid in dead and hand_back(qs.words[i], pid):
                    self.say(f"{z.name[:-6]} queue {i}: released for a successor (owner {dead[pid]} pid {pid} is gone)")

    # ------------------------------------------------------------------ memory: heartbeats and figures

    def _attach_memory(self) -> None:
        if self.inst is not None:
            return
        from hotplane.shared.instance import InstanceError, eal_init

        try:
            self.inst = eal_init(EalOptions(file_prefix=self.prefix, proc_type="secondary"))
        except (InstanceError, OSError) as e:
            self.say(f"cannot attach the instance memory (no heartbeat watch, no figures yet): {e}", "warning")
            self.inst = None

    def sample(self) -> dict[str, Any] | None:
        """Read the figures now (cumulative, with rates since the previous sample)."""
        if self.inst is None:
            return None
        from hotplane.secondary.stats import snapshot, with_rates

        try:
            cur = snapshot(self.inst.directory)
        except Exception as e:  # a zone with a layout we do not know: say so, keep supervising
            self.say(f"reading the figures failed: {e}", "warning")
            return self.stats
        self.stats = with_rates(cur, self._prev_snap)
        self._prev_snap = cur
        return self.stats

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sample()
            if self.on_tick is not None:
                try:
                    self.on_tick(self)
                except Exception as e:  # the live display must never take the supervisor down
                    self.say(f"live display failed: {e}", "warning")

    async def _heartbeat_watch(self) -> None:
        interval, misses = self.app.heartbeat_interval, self.app.heartbeat_misses
        limit_ns = int(interval * misses * 1e9)
        while True:
            await asyncio.sleep(interval)
            if self.inst is None or self.shutting_down:
                continue
            z = self.inst.directory.lookup("counters")
            if z is None:
                continue
            from hotplane.shared.counters import CounterBlocks

            beats = CounterBlocks.attach(z.view).heartbeats()
            now_ns = time.monotonic_ns()
            for p in self.programs.values():
                # A standby is parked: it does not beat (the block's writer is the active worker).
                if p.kind != "worker" or p.worker_id is None or not p.machine.is_up or p.worker_id >= len(beats):
                    continue
                up = p.machine.uptime(self.loop.time()) or 0.0
                hb = int(beats[p.worker_id])
                if up * 1e9 < limit_ns or (hb and now_ns - hb < limit_ns):
                    continue
                age = "never" if not hb else f"{(now_ns - hb) / 1e9:.1f}s ago"
                self.say(f"{p.name}: pid {p.machine.pid} missed its heartbeats (last heartbeat {age}, limit {misses} x {interval:g}s): it hangs", "error")
                if not self._fence_hung(p):
                    self.feed(p, HeartbeatMissed())

    def _fence_hung(self, p: Program) -> bool:
        """Fence a hung worker by generation and start its replacement now (DESIGN invariant 1).

        Each of its queues' ownership words gets a new generation while the worker is
        idle (queue_owner.fence); then the words are freed and the writer role of its
        session tables is cleared, and the replacement claims both at once while the
        hung process is still stopped. If it ever resumes, its next pass cannot start
        and it exits without touching the queues. It is SIGKILLed after a grace period
        in case it is stuck in a loop instead.

        A worker hung *inside* a pass (its words marked busy) cannot be fenced: no
        word stops a pass already running. It is SIGKILLed at once and its queues
        are taken over as a dead owner's (cursors repaired); returns True then too.
        Returns False when nothing was fenced (the normal stop path applies).
        """
        from hotplane.schema.port import QUEUE_STATE
        from hotplane.shared.burst import QueueState
        from hotplane.shared.queue_owner import FENCE_BUSY, FENCED, fence, hand_back

        pid, wid = p.machine.pid, p.worker_id
        if self.inst is None or pid is None or wid is None:
            return False
        rows, tables = [], []
        try:
            for z in self.inst.directory.list():
                if z.schema_id == QUEUE_STATE.schema_id:
                    qs = QueueState.attach(z.view)
                    if wid < qs.nqueues:
                        rows.append(qs.words[wid])
                elif z.name.startswith(f"nat.w{wid}."):
                    lay = z.layout
                    if lay.header is not None and "writer_pid" in lay.header.names:
                        tables.append(z.header(lay))
        except Exception as e:  # a zone this build cannot read: fall back to stopping the worker
            self.say(f"{p.name}: cannot fence through the queue-state zones: {e}", "warning")
            return False
        outcomes = [fence(w, pid) for w in rows]
        if FENCE_BUSY in outcomes:
            self.say(f"{p.name}: hung pid {pid} is inside a pass (queue marked busy): a generation cannot stop it; killing it now, "
                     "its successor repairs the cursors it left", "warning")
            self.feed(p, HeartbeatMissed(kill_now=True))
            return True
        fenced = [w for w, o in zip(rows, outcomes) if o == FENCED]
        if not fenced:
            return False
        for w in fenced:
            hand_back(w, pid)
        for h in tables:
            if int(h[0]["writer_pid"]) == pid:
                h[0]["writer_pid"] = 0
        child = p.child
        self.say(f"{p.name}: fenced hung pid {pid} ({len(fenced)} queue(s), new generation); starting its replacement now", "warning")
        if child is not None:
            def reap_or_kill() -> None:
                if getattr(child, "exit", None) is None:
                    try:
                        child.send_signal(signal.SIGKILL)
                    except (ProcessLookupError, OSError):
                        pass
            self.loop.call_later(FENCED_GRACE_S, reap_or_kill)
        self.feed(p, Exited(None, None, pid=pid))
        return True

    # ------------------------------------------------------------------ views

    def program_row(self, p: Program) -> dict[str, Any]:
        now = self.loop.time()
        m = p.machine
        up = m.uptime(now)
        if up is not None and m.start_time:
            up = max(0.0, time.time() - m.start_time)  # from the process's own start (also when adopted)
        ex = m.last_exit
        return {
            "name": p.name,
            "kind": p.kind,
            "state": p.state.value,
            "pid": m.pid,
            "uptime": up,
            "since": time.time() - (now - m.since) if m.since is not None else None,
            "description": m.describe(now),
            "restarts": p.restarts,
            "version": p.ready_info.get("version") or p.version,
            "adopted": p.adopted,
            "wanted": p.wanted,
            "last_exit": ex.describe() if ex is not None else None,
            "log": str(p.log.path) if p.log is not None else str(self.log_dir / f"{p.name}.log"),
            "ready_info": {k: v for k, v in p.ready_info.items() if isinstance(v, (str, int, float, bool)) or v is None},
        }

    def status(self) -> dict[str, Any]:
        return {
            "supervisor": {"pid": os.getpid(), "prefix": self.prefix, "version": __version__, "uptime": time.monotonic() - self.started_at,
                           "config": self.cfg.source, "all_ready": self.all_ready_once, "shutting_down": self.shutting_down,
                           "socket": str(self.rundir / SOCKET_NAME), "log_dir": str(self.log_dir)},
            "programs": [self.program_row(p) for p in self.programs.values()],
        }

    # ------------------------------------------------------------------ control socket

    def _names(self, params: dict) -> list[Program]:
        from hotplane.shared.ipc import RemoteError

        names = params.get("names") or []
        if isinstance(names, str):
            names = [names]
        if not names:
            raise RemoteError("usage", "name at least one program (or 'all')")
        out: list[Program] = []
        for n in names:
            if n == "all":
                out.extend(p for p in self.programs.values() if p not in out)
                continue
            group = [p for p in self.programs.values() if p.name == n or (n.endswith("*") and p.name.startswith(n[:-1]))]
            if not group:
                raise RemoteError("unknown_program", f"no program {n!r}; programs: {', '.join(self.programs)}")
            out.extend(p for p in group if p not in out)
        return out

    async def handle(self, channel, request):
        from hotplane.shared.ipc import RemoteError

        m = request.method
        params = request.params if isinstance(request.params, dict) else {}
        if m == "ready":
            return self._on_ready(channel, params), ()
        if m == "status":
            st = self.status()
            if params.get("names"):
                keep = {p.name for p in self._names(params)}
                st["programs"] = [r for r in st["programs"] if r["name"] in keep]
            return st, ()
        if m in ("start", "stop", "restart"):
            if self.shutting_down:
                raise RemoteError("shutting_down", "the supervisor is shutting down")
            progs = self._names(params)
            return await self._control(m, progs, float(params.get("timeout", 60.0)), bool(params.get("wait", True))), ()
        if m == "signal":
            progs = self._names(params)
            sig = _parse_signal(params.get("signal"))
            res = []
            for p in progs:
                ok = p.child is not None and p.machine.pid is not None and p.child.send_signal(sig)
                res.append({"name": p.name, "ok": bool(ok), "pid": p.machine.pid, "message": f"sent {signal.Signals(sig).name}" if ok else "not running"})
            return {"results": res}, ()
        if m == "pid":
            name = params.get("name")
            if not name or name == "supervisor":
                return {"name": "supervisor", "pid": os.getpid()}, ()
            p = self._names({"names": [name]})[0]
            return {"name": p.name, "pid": p.machine.pid}, ()
        if m == "tail":
            name = params.get("name") or "supervisor"
            n = int(params.get("lines", 10))
            if name == "supervisor":
                path = self.log.path if self.log is not None else self.log_dir / "supervisor.log"
            else:
                p = self._names({"names": [name]})[0]
                path = p.log.path if p.log is not None else self.log_dir / f"{p.name}.log"
            lines = tail_lines(path, n) if path.exists() else []
            return {"name": name, "path": str(path), "lines": lines}, ()
        if m == "stats":
            st = self.stats if self.stats is not None else self.sample()
            out = dict(st or {"available": False, "workers": [], "queues": [], "traffic": [], "sessions": {"available": False}})
            out["processes"] = self.status()["programs"]
            out["prefix"] = self.prefix
            return out, ()
        if m == "sessions":
            st = self.stats if self.stats is not None else self.sample()
            return dict((st or {}).get("sessions") or {"available": False, "total": 0, "by_protocol": {}, "per_worker": {}}), ()
        if m == "version":
            return {"version": __version__, "pid": os.getpid(), "programs": {p.name: self.program_row(p)["version"] for p in self.programs.values()}}, ()
        if m == "candidate_report":
            from hotplane.supervisor import upgrade_protocol as upp

            unit = self.programs.get(str(params.get("unit")))
            if unit is not None and unit.kind == "standby":
                return self._on_standby_report(channel, unit, params), ()
            if self.upgrade is None or self.upgrade.machine is None:
                raise RemoteError("not_running", "no upgrade is running")
            self.upgrade.feed(upp.CandidateReport(str(params.get("unit")), str(params.get("step")), dict(params.get("detail") or {})))
            return {"ok": True}, ()
        if m == "upgrade":
            if self.shutting_down:
                raise RemoteError("shutting_down", "the supervisor is shutting down")
            return await self.upgrade.start(params), ()
        if m == "upgrade_status":
            return self.upgrade.status(), ()
        if m == "upgrade_history":
            return {"history": self.upgrade.history()}, ()
        if m == "upgrade_resume":
            return self.upgrade.resume_paused(), ()
        if m == "upgrade_commit":
            self.upgrade.commit_now()
            return self.upgrade.status(), ()
        if m == "rollback":
            return await self.upgrade.rollback(params), ()
        if m == "shutdown":
            self.request_shutdown(f"requested by pid {channel.peer.pid}")
            return {"pid": os.getpid(), "shutting_down": True}, ()
        raise RemoteError("unknown_method", f"supervisor: unknown method {m!r}")

    def _on_ready(self, channel, params: dict) -> dict:
        from hotplane.shared.ipc import RemoteError

        name = params.get("name")
        p = self.programs.get(name) if isinstance(name, str) else None
        if p is None:
            raise RemoteError("unknown_program", f"no program {name!r} in this supervisor")
        pid = channel.peer.pid
        if p.machine.pid != pid:
            raise RemoteError("not_current", f"{name}: pid {pid} is not the supervised process (pid {p.machine.pid})")
        p.ready_info = {k: v for k, v in params.items() if isinstance(k, str)}
        self.feed(p, Ready())
        return {"ok": True, "state": p.state.value}

    async def _control(self, what: str, progs: list[Program], timeout: float, wait: bool) -> dict:
        for p in progs:
            if what == "stop":
                p.wanted = False
                self.feed(p, StopRequested())
            elif what == "start":
                p.wanted = True
                p.launched = True
                self.feed(p, Start())
            else:
                p.wanted = True
                p.launched = True
                if p.state in IDLE_STATES or p.state is State.BACKOFF:
                    self.feed(p, Start())
                else:
                    self.feed(p, StopRequested())
                    self.feed(p, Start())  # remembered until the process is gone
        if what == "stop":
            done = lambda p: p.state in IDLE_STATES  # noqa: E731
        else:
            done = lambda p: p.machine.is_up or p.state is State.FATAL  # noqa: E731
        if wait:
            await self.wait_until(lambda: all(done(p) for p in progs), timeout)
        res = []
        for p in progs:
            ok = p.state in IDLE_STATES if what == "stop" else p.machine.is_up
            res.append({"name": p.name, "ok": bool(ok or not wait), "state": p.state.value, "pid": p.machine.pid, "description": p.machine.describe(self.loop.time())})
        return {"results": res}

    # ------------------------------------------------------------------ shutdown

    def request_shutdown(self, why: str) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        self.say(f"shutting down ({why})")
        self.notifier.stopping(f"stopping ({why})")
        self._tasks.append(asyncio.ensure_future(self._shutdown()))

    async def _shutdown(self) -> None:
        progs = list(self.programs.values())
        for stage in sorted({p.stage for p in progs}, reverse=True):
            group = [p for p in progs if p.stage == stage]
            if any(p.kind == "worker" for p in group):
                await self._drain("inside")  # what the generator queued gets through first
            if any(p.kind == "sink" for p in group):
                await self._drain("outside")  # and what the workers transmitted reaches the sink
            for p in group:
                p.wanted = False
                self.feed(p, StopRequested())
            bound = max(p.config.stopwaitsecs for p in group) * 3 + 5
            if not await self.wait_until(lambda: all(p.state in IDLE_STATES for p in group), bound):
                left = [f"{p.name} pid {p.machine.pid}" for p in group if p.state not in IDLE_STATES]
                self.say(f"still running after {bound:g}s despite SIGKILL: {', '.join(left)}", "error")
        assert self._done is not None
        self._done.set()

    def ring_backlog(self, side: str) -> int | None:
        """Frames queued on a ring port and not yet consumed: the inside port's RX rings
        (generator -> workers) or the outside port's TX rings (workers -> sink). None if unknown."""
        if self.inst is None:
            return None
        from hotplane.schema.port import W_RX_CURSOR, W_TX_CURSOR
        from hotplane.shared.ports import attach_ring_port

        spec = self.cfg.gateway.inside_port if side == "inside" else self.cfg.gateway.outside_port
        if spec.kind != "ring":
            return None
        try:
            port = attach_ring_port(self.inst.directory, f"ring:{spec.name}")
        except Exception:
            return None
        total = 0
        for i in range(port.nqueues):
            words = port.state.words[i]
            if side == "inside":
                total += port.rx_rings[i].peer_counters()["cursor"] - int(words[W_RX_CURSOR])
            else:
                total += int(words[W_TX_CURSOR]) - port.tx_rings[i].peer_counters()["cursor"]
        return max(0, total)

    async def _drain(self, side: str, timeout: float = 3.0) -> None:
        """Bounded wait for a ring port's backlog to reach zero (clean stop, no stale frames)."""
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            left = self.ring_backlog(side)
            if not left:
                return
            await asyncio.sleep(0.01)
        self.say(f"{side} rings still hold {self.ring_backlog(side)} frame(s) after {timeout:g}s; stopping anyway", "warning")

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        from hotplane.shared import ipc

        self.loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.log = LogFile(self.log_dir / "supervisor.log", name="supervisor")
        self.say(f"supervisor {__version__} pid {os.getpid()} for instance {self.prefix!r} ({self.cfg.source}); runtime {self.rundir}, logs {self.log_dir}")
        try:
            # No channel heartbeats: supervisorctl's blocking client sends none, and a
            # restart or an upgrade it waits for may take longer than a heartbeat limit.
            # A client that dies closes its socket, which is all the supervisor needs.
            self.server = await ipc.serve(self.rundir / SOCKET_NAME, self.handle, heartbeat_interval=None)
        except ipc.IpcError as e:
            self.failure = f"cannot serve the control socket: {e}"
            self.say(self.failure, "error")
            return EXIT_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_shutdown, signal.Signals(sig).name)
        if self.app.hup_stops:
            self.loop.add_signal_handler(signal.SIGHUP, self.request_shutdown, "SIGHUP")
        else:
            self.loop.add_signal_handler(signal.SIGHUP, self.say, "SIGHUP ignored (use supervisorctl restart or shutdown)")
        n = self.adopt_survivors()
        if n:
            self.say(f"adopted {n} running program(s) from the previous supervisor")
        elif running_primary_pid(self.prefix) is not None and self.programs["primary"].machine.pid is None:
            pid = running_primary_pid(self.prefix)
            self.failure = (f"a primary for --file-prefix {self.prefix} is already running (pid {pid}) but no supervisor record describes it; "
                            f"stop it (kill {pid}) or pick another prefix")
            self.say(self.failure, "error")
            await self.server.close()
            return EXIT_FAILURE
        if self.programs["primary"].machine.is_up:
            self._attach_memory()
        from hotplane.supervisor.upgrade import UpgradeShell

        self.upgrade = UpgradeShell(self)
        try:
            self.upgrade.resume_after_restart()
        except Exception as e:  # noqa: BLE001 - a broken record must not stop supervision
            self.say(f"upgrade: cannot resume the interrupted upgrade: {e}", "error")
        self._tasks += [
            asyncio.ensure_future(self._sampler()),
            asyncio.ensure_future(self._heartbeat_watch()),
            asyncio.ensure_future(rotate_periodically(lambda: [lf for lf in [self.log, *(p.log for p in self.programs.values())] if lf is not None], 5.0)),
            asyncio.ensure_future(self.notifier.watchdog_loop()),
        ]
        self._changed()
        await self._done.wait()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.close()
        for p in self.programs.values():
            for h in p.timers.values():
                h.cancel()
            if p.child is not None:
                p.child.close()
            if p.log is not None:
                p.log.close()
        if self.inst is not None:
            self.inst.close()
            self.inst = None
        if self.failure and self.fresh_instance:
            self._remove_fresh_memory()
        self.say("supervisor exiting" + (f" with status {self.exit_code}" if self.exit_code else ""))
        return self.exit_code

    def _remove_fresh_memory(self) -> None:
        """A start that failed on a brand-new instance leaves no memory behind (logs are kept)."""
        from hotplane.shared import memory

        try:
            path = memory.existing_memory_file(self.prefix)
            if path:
                memory.remove_file(path)
                self.say(f"removed the memory of the instance that failed to start ({path})")
            (self.rundir / "memory.json").unlink(missing_ok=True)
        except OSError as e:
            self.say(f"could not remove the memory of the failed instance: {e}", "warning")


def _parse_signal(value: Any) -> int:
    from hotplane.shared.ipc import RemoteError

    if isinstance(value, int):
        sig = value
    else:
        text = str(value or "").upper()
        if text.isdigit():
            sig = int(text)
        else:
            text = text if text.startswith("SIG") else "SIG" + text
            try:
                sig = int(signal.Signals[text])
            except KeyError:
                raise RemoteError("usage", f"unknown signal {value!r}") from None
    try:
        signal.Signals(sig)
    except ValueError:
        raise RemoteError("usage", f"unknown signal {value!r}") from None
    return sig


# --------------------------------------------------------------------------- command line


def app_parser(prog: str = "hotplane supervisor [EAL] --") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="run the supervisor of one instance (the process tree)")
    add_app_options(ap)
    return ap


def add_app_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-c", "--config", help="gateway TOML configuration (default: the embedded default, ring ports with generated traffic)")
    ap.add_argument("--daemon", action="store_true", help="detach; return once every program is READY")
    ap.add_argument("--pipeline", choices=("forward", "nat"), help="what workers do (default: forward for the embedded default, nat with a config if supported)")
    ap.add_argument("--traffic", dest="traffic", action="store_true", default=None, help="run the generator and sink on the ring ports")
    ap.add_argument("--no-traffic", dest="traffic", action="store_false", help="no generator and sink")
    ap.add_argument("--rate", type=int, default=20000, help="generator packets per second, 0 = flat out (default 20000)")
    ap.add_argument("--flows", type=int, default=64, help="generator flows (spread over the workers; default 64)")
    ap.add_argument("--stats-listen", help="override [stats] listen (address:port; port 0 picks a free one)")
    ap.add_argument("--hot-standby", dest="hot_standby", action="store_true", default=None,
                    help="a parked, attached standby per worker, promoted when the worker dies (overrides [supervisor] hot_standby)")
    ap.add_argument("--no-hot-standby", dest="hot_standby", action="store_false", help="no standbys whatever the configuration says")
    ap.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between heartbeat checks (default 0.5)")
    ap.add_argument("--heartbeat-misses", type=int, default=10, help="missed intervals before a worker counts as hung (default 10)")
    ap.add_argument("--stop-wait", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    ap.add_argument("--log-dir", help="where the programs' logs go (default <runtime>/logs, or $LOGS_DIRECTORY/<prefix>)")
    ap.add_argument("--live", dest="live", action="store_true", default=None, help="print live figures every second")
    ap.add_argument("--quiet", dest="live", action="store_false", help="no live figures")
    ap.add_argument("--daemonized", action="store_true", help=argparse.SUPPRESS)


def load(app: argparse.Namespace):
    """The configuration: the file named by -c, or the embedded default. Raises ConfigError."""
    from hotplane.shared.nat_config import default_config, load_config

    return load_config(app.config) if app.config else default_config()


def preflight(opts: EalOptions, app: argparse.Namespace, prog: str) -> tuple[Any, int]:
    """Everything checked before anything starts: (config, 0) or (None, exit code) with a message printed."""
    from hotplane.shared.nat_config import ConfigError

    try:
        cfg = load(app)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        print(f"{prog}: fix the configuration (every key is documented in shared/nat_config.py and deploy/gateway.toml); nothing was started", file=sys.stderr)
        return None, EXIT_USAGE
    problems = check_ports(cfg)
    if problems:
        print(f"{prog}: {cfg.source}: {len(problems)} port problem(s); nothing was started:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return None, EXIT_USAGE
    problems = check_privileges(opts, app, cfg)
    if problems:
        print(f"{prog}: uid {os.geteuid()} lacks what instance {opts.file_prefix!r} needs ({len(problems)} problem(s)); nothing was started:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return None, EXIT_FAILURE
    if app.stats_listen:
        from hotplane.secondary.stats import parse_listen

        try:
            parse_listen(app.stats_listen)
        except ValueError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return None, EXIT_USAGE
    pid = running_supervisor_pid(opts.file_prefix)
    if pid is not None:
        print(f"{prog}: instance {opts.file_prefix!r} is already running under supervisor pid {pid}; "
              f"use 'supervisorctl -p {opts.file_prefix} status', or 'hotplane down -p {opts.file_prefix}' first", file=sys.stderr)
        return None, EXIT_FAILURE
    return cfg, EXIT_OK


def run_supervisor(opts: EalOptions, app: argparse.Namespace, cfg, *, on_tick=None, echo: bool = True) -> int:
    """Run the supervisor in this process until shutdown; returns the exit code."""
    prefix = opts.file_prefix
    traffic = app.traffic if app.traffic is not None else (app.config is None and cfg.gateway.inside_port.kind == "ring" and cfg.gateway.outside_port.kind == "ring")
    if traffic and (cfg.gateway.inside_port.kind != "ring" or cfg.gateway.outside_port.kind != "ring"):
        print("hotplane supervisor: --traffic needs ring: ports (the generator and sink are peers of ring ports)", file=sys.stderr)
        return EXIT_USAGE
    lock = supervisor_lock(prefix)
    if not lock.acquire(blocking=False):
        pid = lock.read_pid()
        lock.release()
        print(f"hotplane: instance {prefix!r} is already running under supervisor pid {pid}; use 'supervisorctl -p {prefix} status'", file=sys.stderr)
        return EXIT_FAILURE
    try:
        lock.write_pid()
        from hotplane.shared import memory

        fresh = memory.existing_memory_file(prefix) is None and not launcher.load_records(runtime_dir(prefix))
        notifier = _Notifier.from_environ()
        plan = build_plan(opts, app, cfg, traffic=traffic)
        sup = Supervisor(opts, app, cfg, plan, echo=echo, notifier=notifier, on_tick=on_tick)
        sup.fresh_instance = fresh
        try:
            import uvloop

            code = uvloop.run(sup.run())
        finally:
            notifier.close()
        if sup.failure:
            print(f"hotplane: {sup.failure}", file=sys.stderr)
        return code
    finally:
        lock.release()


def daemonize(argv_after: list[str], opts: EalOptions, app: argparse.Namespace, cfg, *, timeout: float, prog: str) -> int:
    """Start the supervisor detached (own session, output to its log) and wait for its READY=1.

    The wait is on events: a private notify socket the child reports READY=1 to
    (the systemd protocol), and the child's pidfd (it exited: start-up failed).
    """
    import secrets
    import select
    import socket
    import subprocess

    prefix = opts.file_prefix
    log_dir = Path(app.log_dir) if app.log_dir else default_log_dir(prefix)
    log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    logpath = log_dir / "supervisor.log"
    addr = f"\0hotplane-up-{os.getpid()}-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(addr)
    env = dict(os.environ, NOTIFY_SOCKET="@" + addr[1:], PYTHONUNBUFFERED="1", HOTPLANE_RUNTIME_DIR=str(runtime_root()))
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    cmd = [sys.executable, "-m", "hotplane.supervisor.cli", "supervisor", *argv_after, "--daemonized", "--quiet"]
    with open(logpath, "ab") as out:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True, close_fds=True)
    pidfd = os.pidfd_open(child.pid)
    deadline = time.monotonic() + timeout
    status = ""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"{prog}: the supervisor (pid {child.pid}) is not READY after {timeout:g}s ({status or 'no status'}); "
                      f"it keeps trying: 'supervisorctl -p {prefix} status', log {logpath}", file=sys.stderr)
                return EXIT_FAILURE
            r, _, _ = select.select([sock, pidfd], [], [], left)
            if sock in r:
                msg = sock.recv(4096).decode("utf-8", "replace")
                fields = dict(line.split("=", 1) for line in msg.splitlines() if "=" in line)
                status = fields.get("STATUS", status)
                if fields.get("READY") == "1":
                    print(f"hotplane: instance {prefix!r} is up: supervisor pid {child.pid}; {status}")
                    print(f"hotplane: 'supervisorctl -p {prefix} status' to look, 'hotplane down -p {prefix}' to stop; log {logpath}")
                    return EXIT_OK
            if pidfd in r:
                code = child.wait()
                tail = tail_lines(logpath, 12) if logpath.exists() else []
                print(f"{prog}: the supervisor exited with status {code} before everything was READY; last lines of {logpath}:", file=sys.stderr)
                for line in tail:
                    print(f"  {line}", file=sys.stderr)
                return code or EXIT_FAILURE
    finally:
        os.close(pidfd)
        sock.close()


def main(argv: list[str]) -> int:
    try:
        opts = parse_eal(argv, prog="hotplane supervisor")
    except UsageError as e:
        print(f"hotplane supervisor: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if opts.proc_type == "secondary":
        print("hotplane supervisor: --proc-type secondary makes no sense for the supervisor (it starts the primary)", file=sys.stderr)
        return EXIT_USAGE
    try:
        app = app_parser().parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    return start(opts, app, [a for a in opts.app_args if a != "--daemon"], prog="hotplane supervisor")


def start(opts: EalOptions, app: argparse.Namespace, app_argv: list[str], *, prog: str, on_tick=None) -> int:
    """Preflight, then run in the foreground or as a daemon (shared by ``hotplane up``).

    ``app_argv``: the supervisor's own options (without --daemon), for the detached copy.
    """
    if app.heartbeat_interval <= 0 or app.heartbeat_misses < 1 or app.stop_wait <= 0:
        print(f"{prog}: --heartbeat-interval and --stop-wait must be > 0, --heartbeat-misses >= 1", file=sys.stderr)
        return EXIT_USAGE
    cfg, code = preflight(opts, app, prog)
    if cfg is None:
        return code
    if app.daemon:
        return daemonize([*opts.to_argv(), "--", *app_argv], opts, app, cfg, timeout=max(60.0, cfg.supervisor.ready_timeout * 3), prog=prog)
    app.hup_stops = not app.daemonized and not os.environ.get("NOTIFY_SOCKET")
    return run_supervisor(opts, app, cfg, on_tick=on_tick, echo=not app.daemonized)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
