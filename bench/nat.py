"""``hotplane bench nat [--json] [--sessions N]``: the NAT pipeline's fast path and session setup rate.

(a) established sessions, 64-byte UDP frames, burst sweep 32..512: packets per
second through ``NatPipeline.process`` (in2out) on one core, against the plain
forward pipeline on the same bursts (reference, same run); (b) new sessions
per second (every packet a miss: slow path, allocation, publication);
memory per session from the session layout. Frames are numpy bursts in
process (the ring-port transport is measured by ``bench ring``); the lab
figure (c) is not measured here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hotplane.bench.report import emit
from hotplane.primary.nat_zones import memory_per_session
from hotplane.secondary.forward import ForwardPipeline
from hotplane.secondary.nat_pipeline import NatPipeline
from hotplane.shared.nat_clock import ManualClock
from hotplane.shared.nat_config import parse_config
from hotplane.shared.nat_neighbour import ARP_REPLY
from hotplane.shared.packet import build_ipv4_udp

CFG = """
[gateway]
inside_port = "ring:in"
outside_port = "ring:out"
inside_address = "100.64.0.1/10"
outside_address = "198.18.0.1/15"
[nat]
pool = ["198.18.1.0/24"]
workers = 1
per_host_sessions = 0
per_host_ports = 0
"""


def _frames(n: int, hosts: int, base_port: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    tmpl = np.frombuffer(build_ipv4_udp("02:00:00:00:00:0a", "02:68:70:00:00:01", "100.64.0.2", "198.18.0.2", 1, 53, b"x" * 18), np.uint8)
    frames = np.tile(tmpl, (n, 1))
    i = np.arange(n)
    src = (0x64400002 + (i % hosts)).astype(">u4").view(np.uint8).reshape(n, 4)
    frames[:, 26:30] = src
    sp = (base_port + i // hosts).astype(">u2").view(np.uint8).reshape(n, 2)
    frames[:, 34:36] = sp
    frames[:, 24:26] = 0  # IP checksum recomputed below
    w = frames[:, 14:34].astype(np.uint32).reshape(n, 10, 2)
    s = (w[:, :, 0] << 8 | w[:, :, 1]).sum(axis=1)
    while (s >> 16).any():
        s = (s & 0xFFFF) + (s >> 16)
    frames[:, 24:26] = (~s & 0xFFFF).astype(">u2").view(np.uint8).reshape(n, 2)
    frames[:, 40:42] = 0  # UDP checksum 0 (none): valid and untouched by translation
    return frames, np.full(n, len(tmpl), np.uint32)


def _pipeline(capacity: int) -> NatPipeline:
    cfg = parse_config(CFG)
    p = NatPipeline(cfg, 0, clock=ManualClock(10), table_capacity=capacity)
    p.neigh[1].send(0xC6120002, (1, bytearray(64)))
    p.neigh[1].handle_arp(ARP_REPLY, 0xC6120002, b"\x02\0\0\0\0\x0b", 0xC6120001)
    p.emit.clear()
    return p


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench nat")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sessions", type=int, default=100_000, help="established sessions (1000000 for the full figure)")
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    a = ap.parse_args(argv)
    n = a.sessions
    cap = 1 << max(12, int(np.ceil(np.log2(n * 2 / 0.6))))
    p = _pipeline(cap)
    hosts = max(1, n // 60000 + 1)
    frames, lengths = _frames(n, hosts)
    # (b) new sessions: the whole set, created burst by burst.
    t0 = time.perf_counter()
    for s in range(0, n, 256):
        f = frames[s:s + 256].copy()
        p.process(0, f, lengths[s:s + 256], np.ones(f.shape[0], bool))
    setup = n / (time.perf_counter() - t0)
    rows = [{"test": "new_sessions", "sessions": n, "per_s": round(setup)}]
    fwd = ForwardPipeline({"inside_gw": b"\x02\0\0\0\0\x01", "outside_gw": b"\x02\0\0\0\0\x02",
                           "inside_peer": b"\x02\0\0\0\0\x0a", "outside_peer": b"\x02\0\0\0\0\x0b"})
    rng = np.random.default_rng(1)
    best = {}
    for burst in (32, 64, 128, 256, 512):
        idx = rng.integers(0, n, size=(64, burst))
        res = {}
        for name, pipe in (("nat", p), ("forward", fwd)):
            k = 0
            pk = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < a.seconds / 2:
                f = frames[idx[k % 64]]  # a fresh copy: every packet is an untranslated inside frame
                out = pipe.process(0, f, lengths[:burst], np.ones(burst, bool))
                pk += burst
                k += 1
            res[name] = pk / (time.perf_counter() - t0)
        fast = p.forwarded
        rows.append({"test": "fast_path", "burst": burst, "nat_mpps": round(res["nat"] / 1e6, 3),
                     "forward_mpps": round(res["forward"] / 1e6, 3), "ratio": round(res["nat"] / res["forward"], 3),
                     "last_burst_fast": fast})
        best[burst] = res["nat"]
    mem = memory_per_session()
    summary = {"sessions": n, "mpps_burst256": round(best[256] / 1e6, 3), "target_mpps": 5, "floor_mpps": 2,
               "new_sessions_per_s": round(setup), "target_new_sessions_per_s": 200_000,
               "bytes_per_session": round(mem["bytes_per_session"], 1), "sessions_in_1GiB": mem["sessions_in_1GiB"],
               "10M_fit_1GiB": mem["sessions_in_1GiB"] >= 10_000_000, "lab": "not measured"}
    emit("nat", rows, as_json=a.json, summary=summary)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
