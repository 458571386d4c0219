"""The primary's role, handed to another version's primary while the workers keep forwarding.

The primary is not on the packet path of ring ports: it holds the memory (re-attached,
never lost), the IPC channel (``primary.sock``: a starting worker asks it for the
configuration and af_packet sockets), the primary lock, and the af_packet sockets
(the kernel's rings stay filled as long as one descriptor of each is open: every
worker holds its own). So the swap hands over exactly those:

* the candidate (``hotplane primary ... --candidate``, the new build) attaches as a
  secondary, validates every zone, takes copies of the af_packet sockets from the
  running primary (its ``af_packet_queue`` answers, as a worker does), leaves, reports
  READY and waits;
* ``release`` (the old primary): stop serving ``primary.sock``, release the primary
  lock, stay parked (memory mapped, sockets open);
* ``claim`` (the candidate): take the primary lock as soon as it is free, re-attach the
  memory as the primary (zones found as they are: nothing is re-created), serve
  ``primary.sock`` with the handed-over sockets. A worker asking meanwhile retries.

A rollback is the same in reverse (the parked old primary re-takes the lock and serves).
Ports played by the primary itself (``pcap:``) are refused: their player's position
would not survive the swap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from typing import Any

from hotplane import __version__


class PrimaryService:
    """The running primary's IPC channel and its upgrade control requests (old side and new side)."""

    def __init__(self, primary, *, parked: bool = False) -> None:
        self.primary = primary
        self.server = None
        self.parked = parked
        self.stop: asyncio.Event | None = None

    async def open(self) -> None:
        from hotplane.primary.main import ipc_path
        from hotplane.shared import ipc

        self.server = await ipc.serve(ipc_path(self.primary.inst), self.primary.handle)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def _plock(self):
        # The instance holds [primary lock, attach lock] (shared/instance.py _init_primary).
        return self.primary.inst._locks[0]

    async def release(self, params: dict) -> dict:
        """Stop serving and let go of the primary lock; stay parked."""
        if not self.parked:
            await self.close()
            self._plock().release()
            self.parked = True
        return {"released": params.get("queue"), "pid": os.getpid()}

    async def claim(self, params: dict) -> dict:
        """Take the primary lock back as soon as it is free, then serve again (a rollback)."""
        if self.parked:
            deadline = time.monotonic() + float(params.get("timeout", 5.0))
            lock = self._plock()
            while not lock.acquire(blocking=False):
                if time.monotonic() > deadline:
                    raise TimeoutError("the primary lock is still held by another primary")
                await asyncio.sleep(0.002)
            lock.write_pid()
            await self.open()
            self.parked = False
        return {"claimed": True, "pid": os.getpid()}

    def handlers(self) -> dict[str, Any]:
        def leave(params: dict) -> dict:
            if self.stop is not None:
                self.stop.set()
            return {"ok": True, "exiting": True}

        return {"arm": lambda p: {"armed": True, "pid": os.getpid()}, "claim": self.claim, "release": self.release, "exit": leave,
                "status": lambda p: {"pid": os.getpid(), "version": __version__, "parked": self.parked, "candidate": False}}


class _HandedQueue:
    """An af_packet queue socket copied from the previous primary (what Primary.afp_queues holds)."""

    def __init__(self, fd: int, params: dict, mac: str | None) -> None:
        self.fd = fd
        self._params = params
        self.mac = mac

    @property
    def params(self):
        return self

    def to_dict(self) -> dict:
        return dict(self._params)


def _warm(primary) -> None:
    """What the take-over runs, once, on private memory: its imports and the route table build
    (their first-call cost is ~1.5 s on a loaded machine; the swap should not pay it)."""
    if primary.app.pipeline != "nat":
        return
    import numpy as np

    from hotplane.primary import nat_zones  # noqa: F401 - the import is the point
    from hotplane.secondary.nat_pipeline import fill_lpm
    from hotplane.shared import ports  # noqa: F401
    from hotplane.shared.nat_config import parse_config
    from hotplane.shared.nat_lpm import Lpm

    raw = np.zeros(Lpm.zone_size(nat_zones.TBL8_GROUPS) + 64, np.uint8)
    scratch = raw[-raw.ctypes.data % 64:][: Lpm.zone_size(nat_zones.TBL8_GROUPS)]
    fill_lpm(Lpm.create(scratch, nat_zones.TBL8_GROUPS), parse_config(primary.config_toml, source=primary.config_path or "<primary config>"))
    np.array_equal(scratch, scratch)


def _report(step: str, detail: dict | None = None) -> None:
    from hotplane.secondary.worker import report_candidate

    report_candidate(os.environ.get("HOTPLANE_UPGRADE_UNIT", "primary"), step, detail)


def _handed_sockets(primary, runtime_dir) -> dict[str, list]:
    """Copies of every af_packet queue socket of the running primary (``af_packet_queue``, SCM_RIGHTS)."""
    from hotplane.shared.ipc import request_sync

    path = str(runtime_dir / "primary.sock")
    macs = request_sync(path, "config", timeout=10.0).result.get("macs") or {}
    out: dict[str, list] = {}
    for role, spec in (("inside", primary.inside), ("outside", primary.outside)):
        if spec.type != "af_packet":
            continue
        qs = []
        for q in range(spec.queues):
            reply = request_sync(path, "af_packet_queue", {"port": str(spec), "queue": q}, timeout=10.0)
            if len(reply.fds) != 1:
                raise OSError(f"the running primary sent {len(reply.fds)} descriptors for {spec}#{q}")
            qs.append(_HandedQueue(reply.fds[0], reply.result["ring_params"], macs.get(f"{role}_gw")))
        out[str(spec)] = qs
    return out


async def _candidate(opts, app, primary) -> int:
    from hotplane.secondary.worker import validate_zones
    from hotplane.shared.instance import InstanceError, eal_init
    from hotplane.shared.upgrade_agent import UpgradeAgent

    inst = eal_init(dataclasses.replace(opts, proc_type="secondary"))
    _report("attached", {"generation": inst.generation})
    zones = validate_zones(inst.directory, migrates=False)
    for spec in (primary.inside, primary.outside):
        if spec.type == "pcap":
            zones[f"port {spec}"] = "refused: a pcap port is played by the primary itself; its position would not survive a swap"
    _report("validated", {"zones": zones})
    runtime = inst.runtime_dir
    if app.dry_run or any(str(v).startswith("refused") for v in zones.values()):
        inst.close()
        return 0
    handed = _handed_sockets(primary, runtime)
    inst.close()  # the memory is mapped again, as the primary, once the old one lets go
    _warm(primary)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = PrimaryService(primary, parked=True)
    service.stop = stop
    took = asyncio.Event()

    async def claim(params: dict) -> dict:
        if service.parked and primary.inst is None:
            deadline = time.monotonic() + float(params.get("timeout", 5.0))
            while True:
                try:
                    primary.inst = eal_init(dataclasses.replace(opts, proc_type="primary"))
                    break
                except InstanceError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the primary lock is still held by the old primary") from None
                    await asyncio.sleep(0.002)
            primary.setup(afp_handed=handed)
            await service.open()
            service.parked = False
            took.set()
            return {"claimed": True, "pid": os.getpid(), "generation": primary.inst.generation}
        return await service.claim(params)

    handlers = service.handlers()
    handlers["claim"] = claim
    handlers["status"] = lambda p: {"pid": os.getpid(), "version": __version__, "parked": service.parked, "candidate": True}
    agent = UpgradeAgent(runtime, handlers)
    await agent.start_in_loop()
    try:
        _report("warm")
        _report("ready", {"control": str(agent.path)})
        await stop.wait()
    finally:
        await agent.close_in_loop()
        await service.close()
        if primary.inst is not None:
            print(f"primary pid {os.getpid()} (took over as primary): stopping", file=sys.stderr, flush=True)
    return 0


def run_candidate(opts, app, primary) -> int:
    """``hotplane primary ... --candidate``: the new build's primary, until it is told to take over and after."""
    try:
        import uvloop

        return uvloop.run(_candidate(opts, app, primary))
    finally:
        if primary.inst is not None:
            primary.inst.close()
