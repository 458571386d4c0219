"""Hairpinning (RFC 4787 REQ-9) under each filtering mode: the receiver's mapping filters a hairpinned
packet exactly as it filters one from outside, in the receiver's own worker or another one."""

from __future__ import annotations

import importlib.util
import ipaddress
import pathlib

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP

from hotplane.secondary.nat_pipeline import NatPipeline
from hotplane.shared.nat_clock import ManualClock
from hotplane.shared.nat_config import parse_config


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_nat_util")
A, B = "100.64.0.2", "100.64.0.3"


def _hairpin(p, src, sport, dst, dport):
    """Send src:sport -> dst:dport from inside; returns the hairpinned frame (or None) and A's mapping."""
    _, _, em = u.run(p, 0, [u.out_udp(src=src, sport=sport, dst=dst, dport=dport)])
    em = u.not_arp(em)
    assert all(s == 0 for s, _ in em)  # a hairpinned packet never leaves on the outside port
    return em[0][1] if em else None


def _mapping(p, iaddr, iport):
    for s in p.sessions():
        if s["iaddr"] == int(ipaddress.IPv4Address(iaddr)) and s["iport"] == iport:
            return str(ipaddress.IPv4Address(s["xaddr"])), s["xport"]
    raise AssertionError(f"no session of {iaddr}:{iport}")


@pytest.mark.parametrize("mode", ["endpoint-independent", "address-dependent", "address-and-port-dependent"])
def test_hairpin_obeys_the_filtering_mode(mode):
    p, _ = u.make(filtering=mode)
    # B has a mapping (from talking to an outside host).
    o, _, _ = u.run(p, 0, [u.out_udp(src=B, sport=6000)])
    xb, xbp = o[0][IP].src, o[0][UDP].sport
    # A, which B never contacted, sends to B's mapping.
    h = _hairpin(p, A, 7000, xb, xbp)
    xa, xap = _mapping(p, A, 7000)  # A's own mapping exists whatever the filter decided
    if mode == "endpoint-independent":
        assert h is not None and h[IP].dst == B and h[UDP].dport == 6000
        assert (h[IP].src, h[UDP].sport) == (xa, xap)  # B sees A's outside address and port
        u.checks_ok(h)
    else:
        assert h is None and u.drop(p, "filtered") == 1
    # B now sends to A's mapping: A has a session with B's mapping as its remote end, so any mode admits it.
    h = _hairpin(p, B, 6000, xa, xap)
    assert h is not None and h[IP].dst == A and h[UDP].dport == 7000 and (h[IP].src, h[UDP].sport) == (xb, xbp)
    u.checks_ok(h)
    # Now A -> B passes in every mode (B has a session to A's mapping).
    h = _hairpin(p, A, 7000, xb, xbp)
    assert h is not None and h[IP].dst == B and h[UDP].dport == 6000
    # A from another port (same outside address by paired pooling, another outside port): only
    # the modes that ignore the remote port admit it.
    f0 = u.drop(p, "filtered")
    h = _hairpin(p, A, 7001, xb, xbp)
    assert _mapping(p, A, 7001)[0] == xa
    if mode == "address-and-port-dependent":
        assert h is None and u.drop(p, "filtered") == f0 + 1
    else:
        assert h is not None and h[IP].dst == B and h[UDP].dport == 6000


def test_hairpin_to_a_port_forward_is_not_filtered():
    """Static mappings (port forwards, 1:1) admit anyone, hairpinned or not."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    p, _ = u.make()
    syn = Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC) / IP(src=A, dst="198.18.0.1") / TCP(sport=5555, dport=2222, flags="S")
    _, _, em = u.run(p, 0, [syn])
    em = u.not_arp(em)
    assert len(em) == 1 and em[0][1][IP].dst == "100.64.0.10" and em[0][1][TCP].dport == 22
    u.checks_ok(em[0][1])


def test_hairpin_filtering_across_workers(tmp_path):
    """The receiver's mapping and sessions live in another worker: the filter reads that worker's table."""
    from hotplane.primary.nat_zones import attach_nat_zones, reserve_nat_zones
    from hotplane.shared.memzone import Directory
    from hotplane.shared.runtime import FileLock

    cfg = parse_config(u.config_text("address-and-port-dependent", workers=2))
    raw = np.zeros((64 << 20) + 4096, np.uint8)
    mem = raw[(-raw.ctypes.data) % 4096:][: 64 << 20]
    d = Directory.format(mem, FileLock(tmp_path / "lock"), "t", base=mem.ctypes.data, hugepage_size=4096)
    clk = ManualClock(1000)
    reserve_nat_zones(d, cfg, 2, table_capacity=1 << 12, clock=clk)
    zones = [attach_nat_zones(d, w, cfg, clk) for w in range(2)]
    p0, p1 = (NatPipeline(cfg, w, zones[w], clock=clk) for w in range(2))
    for p in (p0, p1):
        u.teach(p)
    lo0, _ = cfg.nat.worker_port_range(0)
    lo1, _ = cfg.nat.worker_port_range(1)
    # B's flow is worker 0's (its port is in block 0), A's is worker 1's.
    o, _, _ = u.run(p0, 0, [u.out_udp(src=B, sport=lo0 + 6)])
    xb, xbp = o[0][IP].src, o[0][UDP].sport
    assert lo0 <= xbp < lo1
    assert _hairpin(p1, A, lo1 + 7, xb, xbp) is None and u.drop(p1, "filtered") == 1
    xa, xap = _mapping(p1, A, lo1 + 7)
    # B answers A's mapping (worker 0 hairpins into worker 1's mapping: A has a session to B's mapping).
    h = _hairpin(p0, B, lo0 + 6, xa, xap)
    assert h is not None and h[IP].dst == A and h[UDP].dport == lo1 + 7
    # Now worker 1 finds B's session to A's mapping in worker 0's table: admitted.
    h = _hairpin(p1, A, lo1 + 7, xb, xbp)
    assert h is not None and h[IP].dst == B and h[UDP].dport == lo0 + 6
    u.checks_ok(h)
