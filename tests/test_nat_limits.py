"""Limits at pipeline level: a full session table and an exhausted port block drop the new flow (counted,
ICMP 3/13 to the sender where configured) and leave the established sessions alone."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_nat_util")


def _limit_error(em, sent):
    """The ICMP 3/13 the gateway sent back to the inside host about ``sent`` (None if none)."""
    em = u.not_arp(em)
    if not em:
        return None
    assert len(em) == 1 and em[0][0] == 0
    e = em[0][1]
    assert e[ICMP].type == 3 and e[ICMP].code == 13 and e[IP].src == "100.64.0.1" and e[IP].dst == sent[IP].src
    assert e.dst == u.HOST_MAC
    u.checks_ok(e)
    inner = u.embedded_checks_ok(e)
    assert inner.src == sent[IP].src and inner[UDP].sport == sent[UDP].sport
    return e


def _established_still_work(p, flows):
    """Packets of established flows, both directions, are still translated (on the fast path)."""
    fast0 = p.stats["fast"]
    out, _, _ = u.run(p, 0, [u.out_udp(sport=sp) for sp, _, _ in flows])
    assert [(o[IP].src, o[UDP].sport) for o in out] == [(x, xp) for _, x, xp in flows]
    back, _, _ = u.run(p, 1, [u.in_udp("198.18.0.2", 53, x, xp) for _, x, xp in flows])
    assert [(b[IP].dst, b[UDP].dport) for b in back] == [("100.64.0.2", sp) for sp, _, _ in flows]
    assert p.stats["fast"] - fast0 == 2 * len(flows)
    for e in out + back:
        u.checks_ok(e)


@pytest.mark.parametrize("icmp_on_limit", [True, False])
def test_table_full_drops_new_flows_keeps_established(icmp_on_limit):
    p, clk = u.make(cap=1 << 9, icmp_on_limit=icmp_on_limit)
    sport = 10000
    while u.drop(p, "table_full") == 0:
        assert sport < 12000, "the table never filled"
        u.run(p, 0, [u.out_udp(sport=sport + k) for k in range(32)])
        sport += 32
    d = u.drop(p, "table_full")
    while u.drop(p, "table_full") == d:  # single flows until one more is refused: the table is full now
        assert sport < 12000, "the table never filled"
        u.run(p, 0, [u.out_udp(sport=sport)])
        sport += 1
    flows = sorted((s["iport"], _ip(s["xaddr"]), s["xport"]) for s in p.sessions())
    assert p.in2out.count <= p.max_entries and len(flows) > 350
    # A new flow: dropped and counted, ICMP 3/13 only where configured.
    d0 = u.drop(p, "table_full")
    new = u.out_udp(sport=20000)
    out, _, em = u.run(p, 0, [new])
    assert out == [] and u.drop(p, "table_full") == d0 + 1
    err = _limit_error(em, new)
    assert (err is not None) == icmp_on_limit
    _established_still_work(p, flows[:64])
    # A flow from outside (a port forward) is refused the same way.
    syn = Ether(src=u.PEER_MAC, dst=u.GW_OUT_MAC) / IP(src="198.18.0.2", dst="198.18.0.1") / TCP(sport=5555, dport=2222, flags="S")
    b, _, _ = u.run(p, 1, [syn])
    assert b == [] and u.drop(p, "table_full") == d0 + 2
    # Room again once sessions expire.
    clk.advance(301)
    p.expire(clk.now(), rounds=64)
    u.teach(p)
    out, _, _ = u.run(p, 0, [new])
    assert len(out) == 1


def _ip(a: int) -> str:
    return ".".join(str((a >> s) & 255) for s in (24, 16, 8, 0))


@pytest.mark.parametrize("icmp_on_limit", [True, False])
def test_ports_exhausted_drops_new_flows_keeps_established(icmp_on_limit):
    """One pool address and a 65-port block: the 66th UDP mapping finds no port."""
    p, clk = u.make(pool=("198.18.1.1",), port_lo=65536 - 65, icmp_on_limit=icmp_on_limit)
    pk = [u.out_udp(sport=20000 + k) for k in range(65)]
    out, _, _ = u.run(p, 0, pk)
    assert len(out) == 65 and len({o[UDP].sport for o in out}) == 65
    assert all(o[IP].src == "198.18.1.1" and o[UDP].sport >= 65536 - 65 for o in out)
    flows = [(20000 + k, o[IP].src, o[UDP].sport) for k, o in enumerate(out)]
    new = u.out_udp(sport=30000)
    out, _, em = u.run(p, 0, [new])
    assert out == [] and u.drop(p, "ports_exhausted") == 1
    assert (_limit_error(em, new) is not None) == icmp_on_limit
    # Another inside host, paired to the same (only) address: exhausted too.
    other = u.out_udp(src="100.64.0.3", sport=30000)
    out, _, _ = u.run(p, 0, [other])
    assert out == [] and u.drop(p, "ports_exhausted") == 2
    # TCP has its own port space: unaffected.
    tcp = Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / TCP(sport=30000, dport=80, flags="S")
    out, _, _ = u.run(p, 0, [tcp])
    assert len(out) == 1 and out[0][IP].src == "198.18.1.1"
    # An existing mapping used toward a new destination needs no new port (EIM): still works.
    out, _, _ = u.run(p, 0, [u.out_udp(sport=20000, dst="198.18.0.3", dport=99)])
    assert len(out) == 1 and out[0][UDP].sport == flows[0][2]
    _established_still_work(p, flows)
    # Expired sessions free their ports only after the RFC 6888 hold (120 s).
    clk.advance(301)
    p.expire(clk.now(), rounds=64)
    u.teach(p)
    out, _, _ = u.run(p, 0, [new])
    assert out == [] and u.drop(p, "ports_exhausted") == 3
    clk.advance(121)
    out, _, _ = u.run(p, 0, [new])
    assert len(out) == 1 and out[0][UDP].sport >= 65536 - 64
