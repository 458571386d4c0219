"""Helpers of the NAT pipeline packet tests (tests/test_nat_*.py): a pipeline on a manual clock with
taught neighbours, a burst runner that checks the accounting invariant, and scapy checksum judges."""

from __future__ import annotations

import ipaddress
import importlib.util
import pathlib

import numpy as np
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import ARP, Ether
from scapy.utils import checksum as scapy_checksum

from hotplane.schema.counters import DROP_REASONS
from hotplane.secondary.nat_pipeline import NatPipeline
from hotplane.shared.nat_clock import ManualClock
from hotplane.shared.nat_config import parse_config

GW_IN_MAC = "02:68:70:00:00:01"
GW_OUT_MAC = "02:68:70:00:00:02"
HOST_MAC = "02:00:00:00:00:0a"
PEER_MAC = "02:00:00:00:00:0b"
POOL = [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.1.0")) + i)) for i in range(16)]

CFG = """
[gateway]
inside_port = "ring:in"
outside_port = "ring:out"
inside_address = "100.64.0.1/10"
outside_address = "198.18.0.1/15"
[nat]
pool = {pool}
workers = {workers}
port_lo = {port_lo}
filtering = "{filtering}"
per_host_sessions = {sessions}
per_host_ports = {ports}
icmp_on_limit = {icmp_on_limit}
max_sessions = {max_sessions}
[[nat.static]]
proto = "tcp"
inside = "100.64.0.10:22"
outside = "198.18.0.1:2222"
[[nat.static]]
inside = "100.64.0.20"
outside = "198.18.1.100"
"""

INSIDE_HOSTS = ["100.64.0.%d" % i for i in (2, 3, 4, 5, 10, 20)] + \
    ["100.64.%d.%d" % (a, b) for a in range(1, 3) for b in range(1, 3)]
OUTSIDE_HOSTS = ("198.18.0.2", "198.18.0.3", "198.18.0.4")


def load(name: str):
    """Import a helper module beside the tests (they are not a package)."""
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config_text(filtering="address-and-port-dependent", sessions=0, ports=0, pool=('198.18.1.0/28',),
                workers=1, port_lo=1024, icmp_on_limit=True, max_sessions=0) -> str:
    return CFG.format(max_sessions=max_sessions, filtering=filtering, sessions=sessions, ports=ports, workers=workers, port_lo=port_lo,
                      icmp_on_limit="true" if icmp_on_limit else "false",
                      pool="[" + ", ".join(f'"{p}"' for p in pool) + "]")


def teach(p: NatPipeline, inside=INSIDE_HOSTS, outside=OUTSIDE_HOSTS) -> None:
    """ARP requests from the hosts: the pipeline learns their MACs (HOST_MAC inside, PEER_MAC outside)."""
    for ip in inside:
        run(p, 0, [Ether(src=HOST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=ip, hwsrc=HOST_MAC, pdst="100.64.0.1")])
    for ip in outside:
        run(p, 1, [Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=ip, hwsrc=PEER_MAC, pdst="198.18.0.1")])
    p.emit.clear()


def make(filtering="address-and-port-dependent", sessions=0, ports=0, cap=1 << 12, *, worker=0, **kw):
    """A pipeline (worker ``worker``) on a ManualClock at 1000 s with every test host's neighbour known."""
    cfg = parse_config(config_text(filtering, sessions, ports, **kw))
    clk = ManualClock(1000)
    p = NatPipeline(cfg, worker, clock=clk, table_capacity=cap)
    teach(p)
    return p, clk


def run(p, direction, pkts, slot=2048):
    """Run scapy packets (or raw frames) as one burst; returns (sent to the other side, sent back, emitted)."""
    raw = [bytes(x) for x in pkts]
    frames = np.zeros((len(raw), slot), np.uint8)
    lengths = np.zeros(len(raw), np.uint32)
    for i, r in enumerate(raw):
        frames[i, : len(r)] = np.frombuffer(r, np.uint8)
        lengths[i] = len(r)
    valid = np.ones(len(raw), bool)
    before = p.drops.sum()
    to_other, to_same = p.process(direction, frames, lengths, valid)
    # Accounting invariant for every burst.
    assert p.forwarded + p.punted + (p.drops.sum() - before) == len(raw)
    out = [Ether(frames[i, : lengths[i]].tobytes()) for i in to_other]
    back = [Ether(frames[i, : lengths[i]].tobytes()) for i in to_same]
    em = [(s, Ether(f)) for s, f in p.emit]
    p.emit.clear()
    return out, back, em


def not_arp(em):
    """The emitted frames that are not ARP."""
    return [x for x in em if ARP not in x[1]]


def checks_ok(pkt):
    """Compare every checksum with scapy's recomputation."""
    ip = pkt[IP]
    c = IP(bytes(ip))
    del c.chksum
    assert IP(bytes(c)).chksum == ip.chksum, "IP checksum"
    for L in (TCP, UDP, ICMP):
        if L in ip:
            got = ip[L].chksum
            if L is UDP and got == 0:
                return
            re = ip.copy()
            del re[L].chksum
            assert IP(bytes(re))[L].chksum == got, f"{L.__name__} checksum"


def embedded_checks_ok(err) -> IP:
    """The packet an ICMP error quotes: its IPv4 header checksum right and, when the quote holds the
    whole datagram, its L4 checksum right too (a UDP 0 stays 0). Returns it as an IP packet."""
    raw = bytes(err[IPerror])
    ip = IP(raw)
    assert scapy_checksum(raw[: ip.ihl * 4]) == 0, "embedded IPv4 header checksum"
    if len(raw) >= ip.len:  # the whole datagram is quoted: its L4 checksum can be judged
        whole = IP(raw[: ip.len])
        for L in (TCP, UDP, ICMP):
            if L in whole:
                got = whole[L].chksum
                if not (L is UDP and got == 0):
                    re = whole.copy()
                    del re[L].chksum
                    assert IP(bytes(re))[L].chksum == got, f"embedded {L.__name__} checksum"
                break
    return ip


def drop(p, name):
    return int(p.drops[DROP_REASONS.index(name)])


def out_udp(src="100.64.0.2", sport=40000, dst="198.18.0.2", dport=53, ttl=64, payload=b"x" * 10, **kw):
    return Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src=src, dst=dst, ttl=ttl, **kw) / UDP(sport=sport, dport=dport) / payload


def in_udp(src, sport, dst, dport, ttl=64, payload=b"y" * 6, **kw):
    """A UDP packet arriving on the outside port (from a remote to a pool address)."""
    return Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src=src, dst=dst, ttl=ttl, **kw) / UDP(sport=sport, dport=dport) / payload


__all__ = ["GW_IN_MAC", "GW_OUT_MAC", "HOST_MAC", "PEER_MAC", "POOL", "CFG", "config_text", "teach", "make", "run",
           "not_arp", "checks_ok", "embedded_checks_ok", "drop", "out_udp", "in_udp", "IPerror", "TCPerror",
           "UDPerror"]
