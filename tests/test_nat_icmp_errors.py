"""ICMP error translation (RFC 5508 REQ-4/5): outer and embedded headers reverted, every checksum right
(scapy recomputes the outer IPv4, the ICMP, the embedded IPv4 and the embedded L4 checksum), the
error's own fields (type, code, next-hop MTU) kept; an error with a bad checksum is dropped, not
laundered; errors never refresh a session."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, ICMPerror, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import Ether


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_nat_util")
ROUTER = "198.18.0.3"  # an outside router reporting on a packet we sent


def _outbound(p, l4):
    """One packet of a new flow from the inside host; returns (original IP packet, translated IP packet)."""
    ip = IP(src="100.64.0.2", dst="198.18.0.2", ttl=20, id=321)
    if l4 == "udp":
        pkt = ip / UDP(sport=40000, dport=53) / b"query-bytes"
    elif l4 == "udp0":
        pkt = IP(bytes(ip / UDP(sport=40000, dport=53, chksum=0) / b"no-checksum"))
    elif l4 == "tcp":
        pkt = ip / TCP(sport=40000, dport=80, flags="S", seq=99) / b"syn-data"
    else:
        pkt = ip / ICMP(type=8, id=40000, seq=3) / b"echo-data"
    pkt = IP(bytes(pkt))
    o, _, _ = u.run(p, 0, [Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC) / pkt])
    assert len(o) == 1
    return pkt, o[0][IP]


def _error_in(p, icmp, quote: bytes):
    """An ICMP error from ROUTER to the translated source, quoting ``quote``; returns what reaches the inside."""
    sent_to = IP(quote).src
    err = Ether(src=u.PEER_MAC, dst=u.GW_OUT_MAC) / IP(src=ROUTER, dst=sent_to, ttl=50) / icmp / quote
    _, _, em = u.run(p, 1, [err])
    return [e for s, e in u.not_arp(em) if s == 0], [e for s, e in u.not_arp(em) if s == 1]


def _same_l4(inner: IP, original: IP) -> None:
    """The embedded packet is the original as the inside host sent it: every L4 byte, and the IPv4
    header but for the TTL the gateway decremented (and its checksum, judged separately)."""
    n = original.ihl * 4
    raw, want = bytes(inner), bytes(original)
    assert raw[n:] == want[n: len(raw)]  # ports, L4 checksum, payload: exactly restored
    hdr, orig = bytearray(raw[:n]), bytearray(want[:n])
    assert hdr[8] == orig[8] - 1
    hdr[8] = orig[8]
    hdr[10:12] = orig[10:12] = b"\0\0"
    assert hdr == orig


@pytest.mark.parametrize("l4", ["udp", "udp0", "tcp", "icmp"])
def test_time_exceeded_from_outside(l4):
    p, _ = u.make()
    orig, sent = _outbound(p, l4)
    before = p.sessions()[0]
    inside, outside = _error_in(p, ICMP(type=11, code=0), bytes(sent))  # the whole datagram quoted
    assert outside == [] and len(inside) == 1
    e = inside[0]
    assert e.dst == u.HOST_MAC and e.src == u.GW_IN_MAC
    assert e[IP].src == ROUTER and e[IP].dst == "100.64.0.2" and e[IP].ttl == 49
    assert e[ICMP].type == 11 and e[ICMP].code == 0
    u.checks_ok(e)  # outer IPv4 and ICMP checksums
    inner = u.embedded_checks_ok(e)  # embedded IPv4 and (whole quote) embedded L4 checksums
    _same_l4(inner, orig)
    if l4 == "udp0":
        assert inner[UDP].chksum == 0
    after = p.sessions()[0]
    assert (after["last_seen"], after["packets"], after["tcp_state"]) == \
        (before["last_seen"], before["packets"], before["tcp_state"])  # never refreshes
    assert p.stats["icmp_errors_translated"] == 1


@pytest.mark.parametrize("l4", ["udp", "tcp"])
def test_fragmentation_needed_keeps_the_mtu(l4):
    p, _ = u.make()
    orig, sent = _outbound(p, l4)
    quote = bytes(sent)[:28]  # the minimum quote (RFC 792): IPv4 header + 8 bytes
    inside, _ = _error_in(p, ICMP(type=3, code=4, nexthopmtu=1280), quote)
    assert len(inside) == 1
    e = inside[0]
    assert e[ICMP].type == 3 and e[ICMP].code == 4 and e[ICMP].nexthopmtu == 1280
    assert bytes(e[ICMP])[4:8] == (1280).to_bytes(4, "big")  # unused word 0, next-hop MTU as sent
    u.checks_ok(e)
    inner = u.embedded_checks_ok(e)
    assert inner.src == "100.64.0.2" and inner.dst == "198.18.0.2"
    _same_l4(IP(bytes(e[IPerror])), orig)
    if l4 == "udp":
        assert e[UDPerror].sport == 40000 and e[UDPerror].chksum == orig[UDP].chksum  # restored exactly
    else:
        assert e[TCPerror].sport == 40000 and e[TCPerror].seq == 99


def test_error_from_the_inside_host_goes_out_translated():
    """The inside host rejects a reply with port unreachable: the error leaves from the pool address and
    quotes the reply as the remote sent it (destination = the mapping)."""
    p, _ = u.make()
    _, sent = _outbound(p, "udp")
    x, xp = sent.src, sent[UDP].sport
    reply = IP(bytes(IP(src="198.18.0.2", dst=x, ttl=30, id=55) / UDP(sport=53, dport=xp) / b"late-answer"))
    b, _, _ = u.run(p, 1, [Ether(src=u.PEER_MAC, dst=u.GW_OUT_MAC) / reply])
    got = b[0][IP]  # what the inside host received
    assert got.dst == "100.64.0.2" and got[UDP].dport == 40000
    before = p.sessions()[0]
    err = Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2", ttl=64) / \
        ICMP(type=3, code=3) / bytes(got)
    _, _, em = u.run(p, 0, [err])
    out = [e for s, e in u.not_arp(em) if s == 1]
    assert len(out) == 1
    e = out[0]
    assert e.dst == u.PEER_MAC and e.src == u.GW_OUT_MAC
    assert e[IP].src == x and e[IP].dst == "198.18.0.2" and e[IP].ttl == 63
    assert e[ICMP].type == 3 and e[ICMP].code == 3
    u.checks_ok(e)
    inner = u.embedded_checks_ok(e)
    assert inner.src == "198.18.0.2" and inner.dst == x and inner[UDP].dport == xp and inner[UDP].sport == 53
    _same_l4(inner, reply)
    after = p.sessions()[0]
    assert (after["last_seen"], after["packets"]) == (before["last_seen"], before["packets"])


def test_time_exceeded_about_an_echo_request_restores_the_identifier():
    p, _ = u.make()
    orig, sent = _outbound(p, "icmp")
    inside, _ = _error_in(p, ICMP(type=11, code=0), bytes(sent)[:28])
    e = inside[0]
    assert e[ICMPerror].id == 40000 and e[ICMPerror].type == 8
    u.checks_ok(e)
    u.embedded_checks_ok(e)


@pytest.mark.parametrize("where", ["checksum", "quote"])
def test_error_with_a_bad_checksum_is_dropped(where):
    p, _ = u.make()
    _, sent = _outbound(p, "udp")
    err = bytearray(bytes(Ether(src=u.PEER_MAC, dst=u.GW_OUT_MAC) / IP(src=ROUTER, dst=sent.src) /
                          ICMP(type=11, code=0) / bytes(sent)))
    if where == "checksum":
        err[14 + 20 + 2] ^= 0x5A
    else:
        err[14 + 20 + 8 + 20 + 9] ^= 0x01  # a payload byte of the quoted datagram: the checksum no longer matches
    _, _, em = u.run(p, 1, [bytes(err)])
    assert u.not_arp(em) == []
    assert u.drop(p, "malformed_l4") == 1 and p.stats["icmp_bad_checksum"] == 1
    assert p.stats["icmp_errors_translated"] == 0
    # From the inside too.
    bad = bytearray(bytes(Ether(src=u.HOST_MAC, dst=u.GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") /
                          ICMP(type=3, code=3, chksum=0x1234) / bytes(sent)))
    _, _, em = u.run(p, 0, [bytes(bad)])
    assert u.not_arp(em) == [] and u.drop(p, "malformed_l4") == 2
