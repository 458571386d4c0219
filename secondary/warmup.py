"""Warm a worker's NAT code paths before it takes queues over (hot-upgrade candidate, standby).

The first burst a fresh process runs through the pipeline pays one-time costs:
lazy imports inside numpy (``np.unique`` imports ``numpy.ma``), first use of
structured dtypes, caches filled on first call. In a candidate those would land
in the swap gap (they measured ~20 ms). :func:`warm_nat` runs the same code --
ARP, new sessions (slow path), hits (fast path) both ways, the accounting flush
and a tick -- on a *private* pipeline of the same configuration and table
version, so nothing in shared memory is touched and nothing is sent.
"""

from __future__ import annotations

import numpy as np

from hotplane.shared.packet import build_arp_reply, build_ipv4_udp, parse_frame

WARM_FLOWS = 32
FRAME_WIDTH = 256  # a multiple of 4, wide enough for the fast path's header columns


def _burst(frames: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    buf = np.zeros((len(frames), FRAME_WIDTH), np.uint8)
    for i, f in enumerate(frames):
        buf[i, : len(f)] = np.frombuffer(f, np.uint8)
    return buf, np.array([len(f) for f in frames], np.uint32), np.ones(len(frames), bool)


def warm_nat(live) -> int:
    """Exercise ``live``'s (a NatPipeline) code paths on a private copy; returns packets processed."""
    from hotplane.secondary.nat_pipeline import OUTSIDE, INSIDE, NatPipeline, private_zones

    cfg, wid = live.config, live.worker
    zones = private_zones(cfg, wid, live.clock, table_capacity=1 << 12)
    cls = type(live.in2out)
    if cls is not type(zones["in2out"]):  # the same table version as the live pipeline writes
        cap = zones["in2out"].capacity
        raw = np.zeros(cls.zone_size(cap) + 64, np.uint8)
        zones["in2out"] = cls.create(raw[-raw.ctypes.data % 64:][: cls.zone_size(cap)], cap, seed=wid * 2 + 1)
    p = NatPipeline(cfg, wid, zones, live.clock, macs={"inside_gw": live.own_mac[0].hex(":"), "outside_gw": live.own_mac[1].hex(":")})
    gw_in, gw_out = p.own_mac
    host_mac, peer_mac = bytes.fromhex("020000aa0001"), bytes.fromhex("020000aa0002")
    inside_ip, inside_host = p.own_ip[0], p.own_ip[0] + 1
    outside_ip = p.own_ip[1]
    remote = outside_ip + 1
    arp = {OUTSIDE: build_arp_reply(peer_mac, remote, gw_out, outside_ip), INSIDE: build_arp_reply(host_mac, inside_host, gw_in, inside_ip)}
    lo = p.port_lo
    out = [build_ipv4_udp(host_mac, gw_in, inside_host, remote, 20000 + i, 5000, b"warm" * 4) for i in range(WARM_FLOWS)]
    n = 0
    translated: list[bytes] = []
    # First burst: slow path (new sessions; the next hop is resolved by ARP); second: fast path (hits).
    for k in range(2):
        frames, lengths, valid = _burst(out)
        to_other, _ = p.process(INSIDE, frames, lengths, valid)
        n += len(out)
        translated = [frames[i, : int(lengths[i])].tobytes() for i in to_other.tolist()]
        if k == 0:
            p.process(OUTSIDE, *_burst([arp[OUTSIDE]]))
    replies = []
    for f in translated:
        r = parse_frame(f)
        if r["valid"] and int(r["sport"]) >= lo:
            replies.append(build_ipv4_udp(peer_mac, gw_out, int(r["dst"]), int(r["src"]), int(r["dport"]), int(r["sport"]), b"warm" * 4))
    for k in range(2 if replies else 0):
        p.process(OUTSIDE, *_burst(replies))
        n += len(replies)
        if k == 0:
            p.process(INSIDE, *_burst([arp[INSIDE]]))
    p.flush()
    p.tick(0.0)
    p.emit.clear()
    return n if p.stats["fast"] else -n  # negative: the fast path was not reached


def prime_live(live) -> dict:
    """Get ``live`` (a candidate's NatPipeline, a reader of the tables) ready for its first burst.

    Without a write to shared memory: its neighbour tables learn every neighbour the
    shared mirror holds (else its first packets wait for ARP), and its private scratch
    arrays are written once (their pages faulted in now rather than in the first burst).
    Returns what it did.
    """
    from hotplane.shared.nat_neighbour import ARP_REQUEST, int_to_mac

    e = live.mirror.e
    learned = 0
    for s in np.flatnonzero(e["valid"]).tolist():
        a = int(e["seq"][s])
        rec = e[s].copy()
        if a & 1 or int(e["seq"][s]) != a or not rec["valid"]:
            continue  # being written: the mirror's next reader gets it
        side = int(rec["side"])
        if side in (0, 1):
            # Learned as a request to us would teach it (STALE: confirmed on use); the reply that
            # handle_arp asks for is dropped, nothing is sent.
            live.neigh[side].handle_arp(ARP_REQUEST, int(rec["ip"]), int_to_mac(int(rec["mac"])), live.own_ip[side])
            learned += 1
    touched = 0
    for obj in (live, live.pb):
        for arr in vars(obj).values():
            if isinstance(arr, np.ndarray) and arr.flags.owndata and arr.flags.writeable and arr.size:
                np.copyto(arr, arr)
                touched += arr.nbytes
    return {"neighbours": learned, "scratch_bytes": touched}
