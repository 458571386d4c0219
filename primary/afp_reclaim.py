"""A restarted primary takes its af_packet sockets back from the processes that still hold them.

An af_packet port's queues are sockets in one PACKET_FANOUT group, opened by the
primary and passed to the workers (SCM_RIGHTS): each queue's socket stays open --
and its ring keeps filling -- as long as one process holds a descriptor of it. When
the primary dies its descriptors go, but every worker still holds its queue's
socket, so forwarding goes on (DESIGN: the primary's death stops no packet).

The restarted primary must not open new sockets then. A new group would receive
every packet a second time (each group gets its own copy), and the kernel picks a
group member by the steering program's index modulo the member count, in join order,
so when the old socket of a queue later closes (its worker restarting) the old group's
remaining members would take that queue's traffic. Instead the primary asks, queue by
queue, the processes that hold the sockets -- the queue's owner first, then any other
worker of the instance (a hot standby, a parked or candidate worker) -- for a copy over
their control sockets, and serves those: the group is exactly the one the kernel is
steering with.

Only when some queue has no holder left (its worker and the primary died together)
is the old group beyond repair: then :func:`reclaim` returns None, the caller opens a
new group, and :func:`retire_old_holders` asks the processes holding the old sockets
to exit so that the supervisor restarts them onto the new ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hotplane.primary.handover import _HandedQueue


def _control_sockets(runtime_dir: Path) -> dict[int, Path]:
    """pid -> control socket of every worker-like process of the instance that has one."""
    out: dict[int, Path] = {}
    for p in (runtime_dir / "upgrade").glob("w*.sock"):
        try:
            out[int(p.stem[1:])] = p
        except ValueError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ask(path: Path, port: str, queue: int):
    from hotplane.shared.ipc import request_sync

    reply = request_sync(str(path), "af_packet_socket", {"port": port, "queue": queue}, timeout=3.0)
    if len(reply.fds) != 1:
        for fd in reply.fds:
            os.close(fd)
        return None
    return reply.fds[0], reply.result["ring_params"]


def reclaim(runtime_dir: Path, spec, state, mac: str | None) -> list | None:
    """Copies of every queue socket of af_packet port ``spec`` from live holders, or None.

    ``state`` is the port's QueueState (its ownership words name each queue's owner).
    """
    from hotplane.shared.queue_owner import owner_of

    holders = {pid: p for pid, p in _control_sockets(runtime_dir).items() if _alive(pid)}
    if not holders:
        return None
    got: list = []
    for q in range(spec.queues):
        owner, _ = owner_of(state.words[q])
        order = ([owner] if owner in holders else []) + [pid for pid in holders if pid != owner]
        found = None
        for pid in order:
            try:
                found = _ask(holders[pid], str(spec), q)
            except Exception:  # a holder that does not answer (dying, another build): ask the next
                found = None
            if found is not None:
                break
        if found is None:
            for h in got:
                os.close(h.fd)
            return None
        got.append(_HandedQueue(found[0], found[1], mac))
    return got


def retire_old_holders(runtime_dir: Path, spec) -> list[int]:
    """Ask every process still holding a socket of ``spec``'s old group to exit (the supervisor restarts it)."""
    from hotplane.shared.ipc import request_sync

    asked = []
    for pid, path in _control_sockets(runtime_dir).items():
        if not _alive(pid):
            continue
        try:
            for q in range(spec.queues):
                found = _ask(path, str(spec), q)
                if found is not None:
                    os.close(found[0])
                    request_sync(str(path), "exit", {}, timeout=3.0)
                    asked.append(pid)
                    break
        except Exception as e:  # best effort: it is told, or it is gone
            print(f"primary: could not ask pid {pid} to leave {spec}'s old sockets: {e}", file=sys.stderr)
    return asked
