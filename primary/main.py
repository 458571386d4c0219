"""The primary process: creates (or re-attaches) the instance memory, the ports and tables.

``hotplane primary [EAL] -- [--inside SPEC] [--outside SPEC] [--workers N] [--json]``

SPEC is ``ring:NAME``, ``af_packet:IFACE`` or ``pcap:FILE``: a pcap port in
``mode=replay`` (the default) feeds FILE's frames to the workers (at the
recorded rate or ``rate=max``, never dropping) and discards what they send on
it; in ``mode=capture`` it writes what the workers send into FILE (readable
by tcpdump while it grows). A primary thread plays that port's "NIC".

It reserves every zone the instance needs (re-attaching them after a restart,
contents intact), opens af_packet sockets, serves the IPC channel that
secondaries ask for their configuration and queue file descriptors, and
reports READY. Its death loses nothing: the memory file stays, workers keep
their mappings and sockets, and a restarted primary re-attaches and bumps the
generation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from hotplane import __version__
from hotplane.schema.counters import WORKER_COUNTERS
from hotplane.schema.traffic import MAX_SLOTS, TRAFFIC_STATS
from hotplane.shared.counters import CounterBlocks
from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit
from hotplane.shared.instance import Instance, InstanceError, describe, eal_init
from hotplane.shared.ready import report_ready
from hotplane.shared.ring_port import parse_port_spec

MAX_WORKERS = 16
DEFAULT_MACS = {
    "inside_gw": "02:68:70:00:00:01",
    "outside_gw": "02:68:70:00:00:02",
    "inside_peer": "02:68:70:00:01:01",
    "outside_peer": "02:68:70:00:02:01",
}


def ipc_path(inst_or_dir) -> str:
    d = inst_or_dir.runtime_dir if isinstance(inst_or_dir, Instance) else inst_or_dir
    return str(d / "primary.sock")


def app_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hotplane primary [EAL] --", description="primary process options")
    ap.add_argument("--config", "-c", help="gateway configuration (TOML); implies --pipeline nat")
    ap.add_argument("--workers", type=int, default=None, help="worker slots (queues per port); default 2 or the config's")
    ap.add_argument("--inside", help="inside port spec (default ring:in,queues=WORKERS,steer=inside)")
    ap.add_argument("--outside", help="outside port spec (default ring:out,queues=WORKERS,steer=outside)")
    ap.add_argument("--pipeline", choices=("forward", "nat"), default=None, help="what workers do to packets (default: nat with a config, else forward)")
    ap.add_argument("--mac", action="append", default=[], metavar="KEY=MAC",
                    help="override a MAC the forward pipeline uses: inside_gw, outside_gw, inside_peer, outside_peer")
    ap.add_argument("--bare", action="store_true", help="hold the memory and directory only: no ports, no tables")
    ap.add_argument("--json", action="store_true", help="print the ready line as JSON")
    ap.add_argument("--candidate", action="store_true", help="hot-upgrade candidate: validate, take the af_packet sockets of the "
                    "running primary, become the primary once it lets go (primary/handover.py)")
    ap.add_argument("--dry-run", action="store_true", help="with --candidate: validate the zones, report, exit")
    return ap


def _interface_mac(iface: str) -> str | None:
    """The interface's MAC address as aa:bb:..., or None if it cannot be read."""
    import socket

    from hotplane.shared.af_packet import interface_info

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            mac = interface_info(s, iface).mac
    except Exception:
        return None
    return mac.hex(":") if isinstance(mac, (bytes, bytearray)) else str(mac)


class Primary:
    """What the primary holds: zones, af_packet sockets, and its answers to secondaries."""

    def __init__(self, inst: Instance, app: argparse.Namespace) -> None:
        self.inst = inst
        self.app = app
        self.config_toml: str | None = None
        self.config_path: str | None = None
        port_lo, block = 1024, None
        inside, outside = app.inside, app.outside
        if app.config or app.pipeline == "nat":
            from hotplane.shared.nat_config import DEFAULT_CONFIG_TOML, load_config, parse_config

            if app.config:
                self.config_path = os.path.abspath(app.config)
                self.config_toml = open(self.config_path).read()
                cfg = load_config(self.config_path)
            else:
                self.config_toml = DEFAULT_CONFIG_TOML
                cfg = parse_config(DEFAULT_CONFIG_TOML, source="<default config>")
            if app.workers is None:
                app.workers = cfg.nat.workers
            elif app.workers != cfg.nat.workers:
                raise ValueError(f"--workers {app.workers} contradicts the config's nat.workers = {cfg.nat.workers}")
            port_lo, block = cfg.nat.port_lo, cfg.nat.block
            inside = inside or f"{cfg.gateway.inside_port}"
            outside = outside or f"{cfg.gateway.outside_port}"
            app.pipeline = app.pipeline or "nat"
        app.workers = app.workers or 2
        app.pipeline = app.pipeline or "forward"
        # Both directions of a session must meet on one worker (DESIGN invariant 2): the
        # inside port steers by inside source, the outside by the worker's port block.
        self.inside = parse_port_spec(self._with_defaults(inside or "ring:in", app.workers, "inside", port_lo, block))
        self.outside = parse_port_spec(self._with_defaults(outside or "ring:out", app.workers, "outside", port_lo, block))
        self.macs = dict(DEFAULT_MACS)
        for kv in app.mac:
            k, _, v = kv.partition("=")
            if k not in DEFAULT_MACS or len(v.split(":")) != 6:
                raise ValueError(f"--mac {kv!r}: use KEY=xx:xx:xx:xx:xx:xx with KEY one of {', '.join(DEFAULT_MACS)}")
            self.macs[k] = v.lower()
        for role, spec in (("inside", self.inside), ("outside", self.outside)):
            if spec.type not in ("ring", "af_packet", "pcap"):
                raise ValueError(f"--{role} {spec}: the gateway's ports are ring:, af_packet: or pcap: ports")
            if spec.queues != app.workers:
                raise ValueError(f"--{role} {spec} has {spec.queues} queues but --workers is {app.workers}: each worker polls one queue of each port")
        if self.inside.type == self.outside.type == "pcap" and self.inside.name == self.outside.name:
            raise ValueError(f"--inside and --outside are both pcap:{self.inside.name}: replay one file and capture into another")
        self.afp_queues: dict[str, list] = {}
        self.pcap_ports: list = []  # PcapPort peers, run by a PcapPortRunner thread while serving
        self.nat_zones: dict | None = None

    @staticmethod
    def _with_defaults(spec: str, workers: int, mode: str, port_lo: int, block: int | None) -> str:
        opts = dict(o.split("=", 1) for o in spec.split(",")[1:] if "=" in o)
        extra = []
        if "queues" not in opts:
            extra.append(f"queues={workers}")
        if "steer" not in opts:
            extra.append(f"steer={mode}")
        if mode == "outside" and "port_lo" not in opts:
            extra.append(f"port_lo={port_lo}")
        if mode == "outside" and block is not None and "block" not in opts:
            extra.append(f"block={block}")
        return ",".join([spec, *extra])

    def setup(self, afp_handed: dict[str, list] | None = None) -> None:
        """Reserve (or re-attach) every zone; open af_packet sockets (``afp_handed``: the previous
        primary's, handed over in a hot upgrade, used instead of opening new ones)."""
        from hotplane.shared import ports

        d = self.inst.directory
        z, created = d.reserve_or_lookup("counters", CounterBlocks.zone_size(MAX_WORKERS), WORKER_COUNTERS)
        if created:
            CounterBlocks.create(z.view, MAX_WORKERS)
        else:
            CounterBlocks.attach(z.view)
        z, created = d.reserve_or_lookup("traffic", TRAFFIC_STATS.zone_size(MAX_SLOTS), TRAFFIC_STATS)
        if created:
            z.header(TRAFFIC_STATS)[0]["nslots"] = MAX_SLOTS
            from hotplane.schema.registry import stamp

            stamp(z.header(TRAFFIC_STATS), TRAFFIC_STATS)
        for spec in (self.inside, self.outside):
            if spec.type == "ring":
                ports.reserve_ring_port(d, spec)
            elif spec.type == "pcap":
                self.pcap_ports.append(ports.reserve_pcap_port(d, spec))
            elif afp_handed and str(spec) in afp_handed:
                ports.reserve_af_packet_state(d, spec)
                self.afp_queues[str(spec)] = afp_handed[str(spec)]
                role = "inside" if spec is self.inside else "outside"
                if afp_handed[str(spec)][0].mac and not any(m.startswith(f"{role}_gw=") for m in self.app.mac):
                    self.macs[f"{role}_gw"] = afp_handed[str(spec)][0].mac
            else:
                from hotplane.primary import afp_reclaim
                from hotplane.shared.af_packet import open_af_packet_queues

                state, created = ports.reserve_af_packet_state(d, spec)
                role = "inside" if spec is self.inside else "outside"
                # Restarted: the workers still hold the port's sockets; take copies back instead of
                # forming a second fanout group (primary/afp_reclaim.py).
                reclaimed = None if created else afp_reclaim.reclaim(self.inst.runtime_dir, spec, state, _interface_mac(spec.name))
                if reclaimed is not None:
                    self.afp_queues[str(spec)] = reclaimed
                    print(f"primary: {spec}: took its {len(reclaimed)} queue socket(s) back from the workers holding them", file=sys.stderr)
                    mac = reclaimed[0].mac
                else:
                    o = spec.options
                    self.afp_queues[str(spec)] = open_af_packet_queues(
                        spec.name, spec.queues, o["steer"], ports.ring_params_for(spec), port_lo=o.get("port_lo", 1024), block=o.get("block"))
                    mac = self.afp_queues[str(spec)][0].mac
                    if not created:
                        asked = afp_reclaim.retire_old_holders(self.inst.runtime_dir, spec)
                        if asked:
                            print(f"primary: ERROR: {spec}: some queue sockets of the running group have no live holder, so its "
                                  f"steering cannot be kept; opened a new group and asked pid(s) {asked} holding old sockets to "
                                  "exit (their supervisor restarts them on the new ones)", file=sys.stderr)
                if mac and not any(m.startswith(f"{role}_gw=") for m in self.app.mac):
                    self.macs[f"{role}_gw"] = mac.hex(":") if isinstance(mac, (bytes, bytearray)) else str(mac)
        if self.app.pipeline == "nat":
            from hotplane.primary.nat_zones import reserve_nat_zones
            from hotplane.shared.nat_config import parse_config

            self.nat_zones = reserve_nat_zones(d, parse_config(self.config_toml, source=self.config_path or "<default config>"), self.app.workers)

    def config(self) -> dict:
        return {
            "inside": str(self.inside),
            "outside": str(self.outside),
            "workers": self.app.workers,
            "pipeline": self.app.pipeline,
            "macs": self.macs,
            "config_toml": self.config_toml,
            "config_path": self.config_path,
            "generation": self.inst.generation,
            "version": __version__,
        }

    async def handle(self, channel, request):
        from hotplane.shared.ipc import RemoteError

        m, p = request.method, request.params or {}
        if m == "config":
            return self.config(), ()
        if m == "status":
            return describe(self.inst), ()
        if m == "af_packet_queue":
            qs = self.afp_queues.get(p.get("port"))
            q = int(p.get("queue", -1))
            if qs is None or not 0 <= q < len(qs):
                raise RemoteError("not_found", f"no af_packet queue {p.get('port')!r}#{q}")
            return {"ring_params": qs[q].params.to_dict()}, (qs[q].fd,)
        raise RemoteError("unknown_method", f"primary: unknown method {m!r}")


async def _serve(primary: Primary, app: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from hotplane.primary.handover import PrimaryService
    from hotplane.shared.upgrade_agent import UpgradeAgent

    service = PrimaryService(primary)
    service.stop = stop
    await service.open()
    agent = UpgradeAgent(primary.inst.runtime_dir, service.handlers())  # a hot upgrade hands the role over through it
    await agent.start_in_loop()
    runner = None
    if primary.pcap_ports:
        from hotplane.shared.pcap_port import PcapPortRunner

        runner = PcapPortRunner(primary.pcap_ports, log=lambda msg: print(f"primary: {msg}", file=sys.stderr, flush=True))
        runner.start()
    info = describe(primary.inst)
    info["created"] = primary.inst.created
    info["ipc"] = ipc_path(primary.inst)
    report_ready("primary", info, as_json=app.json)
    if not app.json:
        how = "hugepages" if primary.inst.memory.hugepages else "4 KiB pages"
        state = "created" if primary.inst.created else "re-attached"
        print(f"primary pid {os.getpid()} prefix {primary.inst.prefix} generation {primary.inst.generation}: {state} "
              f"{primary.inst.memory.size >> 20} MiB on {how} at {info['base']} ({len(info['zones'])} zones)", flush=True)
    await stop.wait()
    if runner is not None:
        runner.stop()  # the capture files get what the TX rings still hold, then close
    await agent.close_in_loop()
    await service.close()


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane primary", role="primary")
    try:
        app = app_parser().parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if app.workers is not None and not 1 <= app.workers <= MAX_WORKERS:
        print(f"hotplane primary: --workers must be 1..{MAX_WORKERS}", file=sys.stderr)
        return EXIT_USAGE
    try:
        primary = Primary(None, app)  # validate the configuration before touching any memory
    except OSError as e:
        print(f"hotplane primary: cannot read --config: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # ConfigError is a ValueError: its message lists every problem
        print(f"hotplane primary: {e}", file=sys.stderr)
        return EXIT_USAGE
    if app.candidate:
        from hotplane.primary.handover import run_candidate

        try:
            return run_candidate(opts, app, primary)
        except (InstanceError, OSError) as e:
            print(f"hotplane primary: candidate: {e}", file=sys.stderr)
            return EXIT_FAILURE
    try:
        inst = eal_init(opts)
    except InstanceError as e:
        print(f"hotplane primary: {e}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        primary.inst = inst
        if not app.bare:
            primary.setup()
    except Exception as e:  # a bad port or config is the operator's to fix, not a crash
        from hotplane.shared.af_packet import AfPacketError
        from hotplane.shared.memzone import MemzoneError
        from hotplane.schema.registry import SchemaError

        if not isinstance(e, (ValueError, AfPacketError, MemzoneError, SchemaError)):  # PcapError is a ValueError
            raise
        print(f"hotplane primary: {e}", file=sys.stderr)
        inst.close()
        return EXIT_FAILURE
    try:
        import uvloop

        uvloop.run(_serve(primary, app))
    finally:
        inst.close()
    return EXIT_OK
