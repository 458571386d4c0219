"""Fragmented traffic is traffic of its session: it refreshes it, counts in it and moves the TCP state."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.l2 import Ether

from hotplane.shared import nat_tcp


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_nat_util")


def _frags(pkt, eth, order="in", size=600):
    fs = [eth / f for f in fragment(pkt, fragsize=size)]
    return fs[::-1] if order == "reverse" else fs


def _send_frags(p, direction, frags):
    """Each fragment in its own burst; returns the frames the pipeline sent on the other side."""
    sent = []
    other = 1 - direction
    for f in frags:
        _, _, em = u.run(p, direction, [f])
        sent += [e for s, e in u.not_arp(em) if s == other]
    return sent


def _in_frags(ident, order="in", sport=40000):
    big = IP(src="100.64.0.2", dst="198.18.0.2", id=ident) / UDP(sport=sport, dport=53) / (b"z" * 1500)
    return _frags(big, Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC), order)


@pytest.mark.parametrize("order", ["in", "reverse"])
def test_fragmented_flow_refreshes_its_session_and_keeps_its_mapping(order):
    """A flow that only ever sends fragmented datagrams, one every 200 s, outlives the 300 s UDP timeout
    many times over with one mapping; every fragment counts as a packet of the session."""
    p, clk = u.make()
    sent = _send_frags(p, 0, _in_frags(1, order))
    assert len(sent) == 3
    first = min(sent, key=lambda e: e[IP].frag)
    mapping = (first[IP].src, first[UDP].sport)
    (s,) = p.sessions()
    assert s["packets"] == 3 and s["bytes"] == sum(e[IP].len for e in sent)
    for k in range(2, 6):  # 800 s in all
        clk.advance(200)
        p.tick()
        p.expire(clk.now(), rounds=64)
        assert len(p.sessions()) == 1, f"session expired while its fragments kept coming (round {k})"
        u.teach(p)  # the neighbours aged meanwhile
        sent = _send_frags(p, 0, _in_frags(k, order))
        assert len(sent) == 3
        first = min(sent, key=lambda e: e[IP].frag)
        assert (first[IP].src, first[UDP].sport) == mapping  # EIM: never a new mapping
        (s,) = p.sessions()
        assert s["last_seen"] == clk.now() and s["packets"] == 3 * k
    # Replies come back as fragments too and refresh the same session.
    clk.advance(200)
    u.teach(p)
    reply = IP(src="198.18.0.2", dst=mapping[0], id=77) / UDP(sport=53, dport=mapping[1]) / (b"r" * 1500)
    back = _send_frags(p, 1, _frags(reply, Ether(src=u.PEER_MAC, dst=u.GW_OUT_MAC), order))
    assert len(back) == 3 and all(e[IP].dst == "100.64.0.2" for e in back)
    (s,) = p.sessions()
    assert s["last_seen"] == clk.now() and s["packets"] == 18
    # Without traffic it still expires on time.
    clk.advance(301)
    p.expire(clk.now(), rounds=64)
    assert p.sessions() == []


def test_fragmented_tcp_moves_the_state_machine():
    """A SYN and a SYN-ACK that both arrive fragmented establish the session (the first fragment
    carries the flags); later fragmented segments refresh it."""
    p, clk = u.make()
    syn = IP(src="100.64.0.2", dst="198.18.0.2", id=5) / TCP(sport=33000, dport=80, flags="S") / (b"s" * 1200)
    out = _send_frags(p, 0, _frags(syn, Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC)))
    assert len(out) == 3
    (s,) = p.sessions()
    assert s["tcp_state"] == nat_tcp.IN_INIT
    first = min(out, key=lambda e: e[IP].frag)
    x, xp = first[IP].src, first[TCP].sport
    sa = IP(src="198.18.0.2", dst=x, id=6) / TCP(sport=80, dport=xp, flags="SA") / (b"a" * 1200)
    back = _send_frags(p, 1, _frags(sa, Ether(src=u.PEER_MAC, dst=u.GW_OUT_MAC), "reverse"))
    assert len(back) == 3
    (s,) = p.sessions()
    assert s["tcp_state"] == nat_tcp.ESTABLISHED and s["packets"] == 6
    # Established: 300 s later (beyond the 240 s transitory timeout) a fragmented segment refreshes it.
    clk.advance(300)
    p.expire(clk.now(), rounds=64)
    assert len(p.sessions()) == 1
    u.teach(p)
    data = IP(src="100.64.0.2", dst="198.18.0.2", id=7) / TCP(sport=33000, dport=80, flags="A") / (b"d" * 1200)
    _send_frags(p, 0, _frags(data, Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC)))
    (s,) = p.sessions()
    assert s["last_seen"] == clk.now() and s["tcp_state"] == nat_tcp.ESTABLISHED
    # A fragmented FIN from each side: the state follows.
    fin = IP(src="100.64.0.2", dst="198.18.0.2", id=8) / TCP(sport=33000, dport=80, flags="FA") / (b"f" * 1200)
    _send_frags(p, 0, _frags(fin, Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC)))
    assert p.sessions()[0]["tcp_state"] == nat_tcp.IN_FIN_RCV


def test_expiring_fragment_gets_time_exceeded_and_creates_nothing():
    p, _ = u.make()
    big = IP(src="100.64.0.2", dst="198.18.0.2", id=9, ttl=1) / UDP(sport=40000, dport=53) / (b"z" * 1500)
    frags = _frags(big, Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC))
    _, _, em = u.run(p, 0, [frags[0]])
    em = u.not_arp(em)
    assert u.drop(p, "ttl_expired") == 1 and p.sessions() == []
    assert len(em) == 1 and em[0][1]["ICMP"].type == 11 and em[0][1][IP].dst == "100.64.0.2"
    u.checks_ok(em[0][1])
    _, _, em = u.run(p, 0, [frags[1]])  # a non-first fragment gets no ICMP error (RFC 1812 4.3.2.7)
    assert u.drop(p, "ttl_expired") == 2 and u.not_arp(em) == []
