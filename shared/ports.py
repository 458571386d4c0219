"""Ports placed in the instance memory: ring ports' zones reserved by the primary, attached by others.

A ``pcap:FILE`` port is a ring port whose peer is the primary's
:class:`~hotplane.shared.pcap_port.PcapPortRunner` (it replays FILE into the
RX rings, or captures the TX rings into FILE). Its zones are those of a ring
port named after the file (:func:`pcap_ring_spec`), so workers poll it with
the same burst engine and never open the file themselves.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from hotplane.schema.port import FRAME_RING, QUEUE_STATE
from hotplane.shared.memzone import Directory, MemzoneError
from hotplane.shared.ring_port import PortSpec, RingPort, parse_port_spec, zone_names
from hotplane.shared.steering import Steering


def _layout_of(zone_name: str):
    return QUEUE_STATE if zone_name.endswith(".state") else FRAME_RING


def reserve_ring_port(directory: Directory, spec: PortSpec | str) -> tuple[RingPort, bool]:
    """The primary's side: the port's zones, created on first start and re-attached after.

    Returns (port, created). A restarted primary finds the zones and their
    contents (frames in flight, cursors) exactly as they were.
    """
    spec = parse_port_spec(spec) if isinstance(spec, str) else spec
    if spec.type != "ring":
        raise ValueError(f"{spec} is not a ring port")
    buffers: dict[str, np.ndarray] = {}
    created_any = existing_any = False
    for name, size in RingPort.layout_for(spec):
        z, created = directory.reserve_or_lookup(name, size, _layout_of(name), align=4096)
        buffers[name] = z.view[:size]
        created_any |= created
        existing_any |= not created
    if created_any and existing_any:
        raise MemzoneError(f"ring port {spec.name}: some of its zones exist and some do not: run 'hotplane cleanup --file-prefix {directory.prefix}'")
    return RingPort.from_spec(spec, buffers, create=created_any), created_any


def attach_ring_port(directory: Directory, spec: PortSpec | str, steering: Steering | None = None) -> RingPort:
    """A secondary's (worker, generator, sink) view of a ring port the primary created."""
    spec = parse_port_spec(spec) if isinstance(spec, str) else spec
    state = directory.lookup(zone_names(spec.name, 1)["state"])
    if state is None:
        known = sorted({z.name.split(".")[1] for z in directory.list() if z.name.startswith("ring.")})
        raise MemzoneError(f"instance {directory.prefix!r} has no ring port {spec.name!r} (it has: {', '.join(known) or 'none'})")
    buffers = {state.name: state.view}
    from hotplane.shared.burst import QueueState

    nq = QueueState.attach(state.view).nqueues
    for key, name in zone_names(spec.name, nq).items():
        if key == "state":
            continue
        z = directory.lookup_checked(name, FRAME_RING)
        buffers[name] = z.view
    port = RingPort.attach(spec.name, buffers, steering)
    if steering is None and "steer" in spec.options:
        port.steering = Steering(spec.options["steer"], port.nqueues, spec.options.get("port_lo", 1024), spec.options.get("block"))
    return port


_RING_OPTS = ("queues", "slots", "frame", "steer", "port_lo", "block")


def pcap_ring_spec(spec: PortSpec | str) -> PortSpec:
    """The ring port that carries a ``pcap:FILE`` port's frames: ``ring:pcap-<stem>-<hash of FILE>``.

    Derived from the spec's file name as written, so the primary and every
    worker (which only see the spec string) find the same zones.
    """
    spec = parse_port_spec(spec) if isinstance(spec, str) else spec
    if spec.type != "pcap":
        raise ValueError(f"{spec} is not a pcap port")
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(spec.name).rsplit(".", 1)[0])[:12] or "file"
    digest = hashlib.sha1(spec.name.encode()).hexdigest()[:10]
    opts = {k: spec.options[k] for k in _RING_OPTS if k in spec.options}
    return PortSpec("ring", f"pcap-{stem}-{digest}", opts)


def reserve_pcap_port(directory: Directory, spec: PortSpec | str):
    """The primary's side of a ``pcap:`` port: its ring zones and the peer that moves frames to and from FILE.

    Returns a :class:`~hotplane.shared.pcap_port.PcapPort` (run it with a
    ``PcapPortRunner``). Zones that outlived a previous primary mean a
    restart: the replay resumes after what the rings already took, the
    capture appends. Raises :class:`~hotplane.shared.pcap_port.PcapError` for
    a file that cannot be used (missing, truncated, not Ethernet, ...).
    """
    from hotplane.shared.pcap_port import PcapError, PcapPort

    spec = parse_port_spec(spec) if isinstance(spec, str) else spec
    if spec.options.get("mode") == "replay" and not os.path.isfile(spec.name):
        raise PcapError(f"pcap port {spec}: no file {spec.name!r} to replay (give an existing capture, e.g. one `tcpdump -w` or `hotplane gen --port pcap:FILE` wrote)")
    if spec.options.get("mode") == "capture":
        parent = os.path.dirname(os.path.abspath(spec.name))
        if not os.path.isdir(parent):
            raise PcapError(f"pcap port {spec}: directory {parent} does not exist: create it or capture elsewhere")
    port, created = reserve_ring_port(directory, pcap_ring_spec(spec))
    try:
        return PcapPort(spec, port, backpressure=True, resume=not created)
    except OSError as e:
        raise PcapError(f"pcap port {spec}: cannot open {spec.name!r}: {e.strerror or e}") from None


def af_packet_state_zone(spec: PortSpec) -> str:
    return f"afp.{spec.name}.state"


def reserve_af_packet_state(directory: Directory, spec: PortSpec):
    """The queue-state zone of an af_packet port (cursors and ownership outlive workers)."""
    from hotplane.shared.burst import QueueState

    name = af_packet_state_zone(spec)
    nq = spec.queues
    z, created = directory.reserve_or_lookup(name, QueueState.zone_size(nq), QUEUE_STATE)
    return (QueueState.create(z.view, nq) if created else QueueState.attach(z.view)), created


def ring_params_for(spec: PortSpec):
    from hotplane.shared.af_packet import RingParams

    return RingParams(frame_size=spec.options["frame"], frame_nr=spec.options["slots"])


def port_queue(directory: Directory, spec: PortSpec | str, qid: int, *, fds_from=None):
    """A worker's Queue ``qid`` of a port: (queue, keep) where ``keep`` must outlive the queue.

    Ring and pcap ports come from memzones (``keep`` is the RingPort), af_packet queues
    from a socket fd the primary passes (``keep`` is that fd: the rings stay
    mapped only while it is open).

    ``fds_from(spec_str, qid) -> (fd, ring_params_dict)`` fetches an af_packet
    queue's socket from the primary (over IPC).
    """
    from hotplane.shared.burst import Queue, QueueState
    from hotplane.shared.frame_ring import FrameRing

    spec = parse_port_spec(spec) if isinstance(spec, str) else spec
    if spec.type == "ring":
        port = attach_ring_port(directory, spec)
        if qid >= port.nqueues:
            raise ValueError(f"port {spec} has {port.nqueues} queues; queue {qid} does not exist")
        return port.queues[qid], port
    if spec.type == "pcap":
        port = attach_ring_port(directory, pcap_ring_spec(spec))
        if qid >= port.nqueues:
            raise ValueError(f"port {spec} has {port.nqueues} queues; queue {qid} does not exist")
        return port.queues[qid], port
    if spec.type == "af_packet":
        from hotplane.shared.af_packet import RingParams, map_af_packet_queue

        z = directory.lookup_checked(af_packet_state_zone(spec), QUEUE_STATE)
        state = QueueState.attach(z.view)
        if fds_from is None:
            raise ValueError("af_packet queues come from the primary: no IPC channel given")
        fd, params = fds_from(str(spec), qid)
        rx, tx, doorbell = map_af_packet_queue(fd, RingParams.from_dict(params))
        q = Queue(FrameRing.from_frames(rx), FrameRing.from_frames(tx), state.words[qid], doorbell, qid=qid)
        # The socket fd must stay open as long as the rings are mapped: the caller keeps it.
        return q, fd
    raise ValueError(f"port {spec}: a worker cannot poll {spec.type} ports")
