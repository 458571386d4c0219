"""Packet tests of the NAT pipeline: scapy builds the input and judges every output field."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror, TCPerror, ICMPerror, fragment
from scapy.layers.l2 import ARP, Ether

import importlib.util
import pathlib

from hotplane.secondary.nat_pipeline import NatPipeline
from hotplane.shared.nat_clock import ManualClock
from hotplane.shared.nat_config import parse_config
from hotplane.shared import nat_tcp


def _load(name: str):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


u = _load("_nat_util")
GW_IN_MAC, GW_OUT_MAC, HOST_MAC, PEER_MAC, POOL = u.GW_IN_MAC, u.GW_OUT_MAC, u.HOST_MAC, u.PEER_MAC, u.POOL
make, run, checks_ok, drop, out_udp, config_text = u.make, u.run, u.checks_ok, u.drop, u.out_udp, u.config_text


def test_udp_in_out_and_back():
    p, _ = make()
    out, _, _ = run(p, 0, [out_udp()])
    assert len(out) == 1
    o = out[0]
    assert o.src == GW_OUT_MAC and o.dst == PEER_MAC
    assert o[IP].src in POOL and o[IP].dst == "198.18.0.2" and o[IP].ttl == 63
    assert o[UDP].dport == 53 and o[UDP].sport == 40000 and o[UDP].sport % 2 == 0  # preserved
    checks_ok(o)
    reply = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=o[IP].src) / UDP(sport=53, dport=o[UDP].sport) / b"yy"
    back, _, _ = run(p, 1, [reply])
    assert len(back) == 1
    b = back[0]
    assert b[IP].dst == "100.64.0.2" and b[UDP].dport == 40000 and b.dst == HOST_MAC and b.src == GW_IN_MAC
    checks_ok(b)
    assert p.forwarded == 1  # the reply took the fast path


def test_udp_checksum_zero_stays_zero():
    p, _ = make()
    pkt = out_udp()
    raw = bytearray(bytes(pkt))
    raw[14 + 20 + 6: 14 + 20 + 8] = b"\0\0"
    out, _, _ = run(p, 0, [Ether(bytes(raw))])
    assert out[0][UDP].chksum == 0
    checks_ok(out[0])


def test_eim_same_mapping_any_destination_and_paired_pool():
    p, _ = make()
    a, _, _ = run(p, 0, [out_udp(dst="198.18.0.2", dport=1)])
    b, _, _ = run(p, 0, [out_udp(dst="198.18.0.3", dport=2)])
    c, _, _ = run(p, 0, [out_udp(sport=40001, dst="198.18.0.3", dport=2)])
    assert (a[0][IP].src, a[0][UDP].sport) == (b[0][IP].src, b[0][UDP].sport)
    assert c[0][IP].src == a[0][IP].src  # paired pooling: one outside address per host
    assert c[0][UDP].sport != a[0][UDP].sport


def _sports(p, pkts):
    out, _, _ = run(p, 0, pkts)
    assert len(out) == len(pkts)
    return [(o[IP].src, o[UDP].sport) for o in out]


def test_port_preservation_and_parity_when_taken():
    """One pool address, so every host shares it: the first to ask keeps its port, the next one gets
    another of the same parity and class (RFC 4787 REQ-3a, REQ-4)."""
    p, _ = make(pool=("198.18.1.1",))
    assert _sports(p, [out_udp(src="100.64.0.2", sport=5000), out_udp(src="100.64.0.2", sport=5001)]) == \
        [("198.18.1.1", 5000), ("198.18.1.1", 5001)]  # preserved
    got = _sports(p, [out_udp(src=h, sport=sp) for h in ("100.64.0.3", "100.64.0.4") for sp in (5000, 5001)])
    assert all(x == "198.18.1.1" for x, _ in got)
    ports = [xp for _, xp in got]
    assert len(set(ports)) == 4 and not {5000, 5001} & set(ports)
    assert [xp % 2 for xp in ports] == [0, 1, 0, 1]  # parity kept
    assert all(xp >= 1024 for xp in ports)  # class kept: never a well-known port
    # A port nobody holds is still preserved for the later host.
    assert _sports(p, [out_udp(src="100.64.0.3", sport=6001)]) == [("198.18.1.1", 6001)]
    # A well-known source port: this block (port_lo 1024) has none, so any port of the same parity.
    ((_, xp),) = _sports(p, [out_udp(src="100.64.0.5", sport=123)])
    assert xp >= 1024 and xp % 2 == 1


def test_port_class_kept_when_the_block_has_well_known_ports():
    p, _ = make(pool=("198.18.1.1",), port_lo=512)
    assert _sports(p, [out_udp(src="100.64.0.2", sport=600), out_udp(src="100.64.0.2", sport=5000)]) == \
        [("198.18.1.1", 600), ("198.18.1.1", 5000)]
    (_, a), (_, b) = _sports(p, [out_udp(src="100.64.0.3", sport=600), out_udp(src="100.64.0.3", sport=5000)])
    assert 512 <= a < 1024 and a != 600 and a % 2 == 0  # well-known class and parity kept
    assert b >= 1024 and b != 5000 and b % 2 == 0


@pytest.mark.parametrize("worker", [0, 1])
def test_port_preserved_only_inside_the_workers_block(worker):
    """With two workers each hands out only its own block (replies are steered by port range): an
    inside port of the other worker's block cannot be preserved; one of the same parity is taken."""
    p, _ = make(workers=2, worker=worker)
    lo, hi = p.nat.worker_port_range(worker)
    mine, theirs = (2000, 40000) if worker == 0 else (40000, 2000)
    got = _sports(p, [out_udp(sport=mine), out_udp(sport=theirs), out_udp(sport=theirs + 1)])
    assert got[0][1] == mine and lo <= mine < hi
    for (_, xp), want in zip(got[1:], (theirs, theirs + 1)):
        assert lo <= xp < hi and xp != want and xp % 2 == want % 2


@pytest.mark.parametrize("mode,same_addr_other_port,other_addr", [
    ("endpoint-independent", True, True),
    ("address-dependent", True, False),
    ("address-and-port-dependent", False, False),
])
def test_filtering(mode, same_addr_other_port, other_addr):
    p, _ = make(filtering=mode)
    o, _, _ = run(p, 0, [out_udp(dst="198.18.0.2", dport=53)])
    x, xp = o[0][IP].src, o[0][UDP].sport
    def inbound(src, sport):
        r, _, _ = run(p, 1, [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src=src, dst=x) / UDP(sport=sport, dport=xp)])
        return len(r) == 1 and r[0][IP].dst == "100.64.0.2" and r[0][UDP].dport == 40000
    assert inbound("198.18.0.2", 53)
    assert inbound("198.18.0.2", 54) == same_addr_other_port
    assert inbound("198.18.0.3", 53) == other_addr
    if not other_addr:
        assert drop(p, "filtered") >= 1


def test_tcp_states_rst_trans_and_expiry():
    p, clk = make()
    syn = Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / TCP(sport=33000, dport=80, flags="S", seq=1)
    o, _, _ = run(p, 0, [syn])
    checks_ok(o[0])
    x, xp = o[0][IP].src, o[0][TCP].sport
    sa = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=x) / TCP(sport=80, dport=xp, flags="SA", ack=2)
    b, _, _ = run(p, 1, [sa])
    checks_ok(b[0])
    assert b[0][TCP].dport == 33000 and b[0][TCP].flags == "SA"
    s = p.sessions()[0]
    assert s["tcp_state"] == nat_tcp.ESTABLISHED
    rst = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=x) / TCP(sport=80, dport=xp, flags="R")
    b, _, _ = run(p, 1, [rst])
    assert len(b) == 1 and b[0][TCP].flags == "R"  # a matching RST is translated
    assert p.sessions()[0]["tcp_state"] == nat_tcp.TRANS
    clk.advance(239)
    p.expire(clk.now(), rounds=64)
    assert len(p.sessions()) == 1
    clk.advance(2)
    p.expire(clk.now(), rounds=64)
    assert p.sessions() == []
    assert p.in2out.count == 0 and p.index.count == 0  # mapping and hints gone too
    assert p.alloc.port_state(6, int(ipaddress.IPv4Address(x)), xp) == "held"  # RFC 6888 hold


def test_udp_expiry_with_manual_clock_and_refresh():
    p, clk = make()
    run(p, 0, [out_udp()])
    clk.advance(200)
    run(p, 0, [out_udp()])  # refresh
    clk.advance(200)
    p.expire(clk.now(), rounds=64)
    assert len(p.sessions()) == 1
    clk.advance(101)
    p.expire(clk.now(), rounds=64)
    assert p.sessions() == []


def test_icmp_echo_identifier_as_port():
    p, _ = make()
    req = Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / ICMP(type=8, id=777, seq=1) / b"ping"
    o, _, _ = run(p, 0, [req])
    checks_ok(o[0])
    xid = o[0][ICMP].id
    rep = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=o[0][IP].src) / ICMP(type=0, id=xid, seq=1) / b"ping"
    b, _, _ = run(p, 1, [rep])
    assert b[0][ICMP].id == 777 and b[0][IP].dst == "100.64.0.2"
    checks_ok(b[0])


@pytest.mark.parametrize("l4", ["udp", "tcp", "icmp"])
def test_icmp_error_from_outside_translated(l4):
    p, _ = make()
    if l4 == "udp":
        pk = out_udp()
    elif l4 == "tcp":
        pk = Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / TCP(sport=40000, dport=80, flags="S")
    else:
        pk = Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / ICMP(type=8, id=40000) / b"abcd"
    o, _, _ = run(p, 0, [pk])
    sent = o[0][IP]
    before = p.sessions()[0]
    err = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.3", dst=sent.src) / ICMP(type=3, code=3) / bytes(sent)[:28 + (12 if l4 == "tcp" else 0)]
    _, _, em = run(p, 1, [err])
    em = [x for x in em if ARP not in x[1]]
    assert len(em) == 1 and em[0][0] == 0
    e = em[0][1]
    assert e.dst == HOST_MAC and e[IP].dst == "100.64.0.2" and e[IP].src == "198.18.0.3"
    checks_ok(e)
    inner = e[IPerror]
    assert inner.src == "100.64.0.2" and inner.dst == "198.18.0.2"
    ic = IP(bytes(inner)[:20])
    del ic.chksum
    assert IP(bytes(ic)).chksum == inner.chksum
    if l4 == "udp":
        assert inner[UDPerror].sport == 40000
    elif l4 == "tcp":
        assert inner[TCPerror].sport == 40000
    else:
        assert inner[ICMPerror].id == 40000
    after = p.sessions()[0]
    assert after["last_seen"] == before["last_seen"] and after["packets"] == before["packets"]  # never refreshes


def test_ttl_one_gets_time_exceeded():
    p, _ = make()
    out, _, em = run(p, 0, [out_udp(ttl=1)])
    em = [x for x in em if ARP not in x[1]]
    assert out == [] and drop(p, "ttl_expired") == 1
    e = em[0][1]
    assert em[0][0] == 0 and e[ICMP].type == 11 and e[IP].src == "100.64.0.1" and e[IP].dst == "100.64.0.2"
    assert e[IPerror].dst == "198.18.0.2"
    checks_ok(e)


def test_arp_replies_for_gateway_and_pool():
    p, _ = make()
    _, _, em = run(p, 1, [Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="198.18.0.2", hwsrc=PEER_MAC, pdst="198.18.1.5")])
    a = em[0][1][ARP]
    assert a.op == 2 and a.psrc == "198.18.1.5" and a.hwsrc == GW_OUT_MAC and a.pdst == "198.18.0.2"
    _, _, em = run(p, 0, [Ether(src=HOST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="100.64.0.2", hwsrc=HOST_MAC, pdst="100.64.0.1")])
    assert em[0][1][ARP].psrc == "100.64.0.1"


def test_arp_resolution_queues_then_releases():
    cfg = parse_config(config_text("endpoint-independent"))
    p = NatPipeline(cfg, 0, clock=ManualClock(5), table_capacity=1 << 10)
    out, _, em = run(p, 0, [out_udp(), out_udp(sport=40001)])
    assert out == [] and p.punted == 2
    req = [e for s, e in em if ARP in e]
    assert req and req[0][ARP].pdst == "198.18.0.2" and req[0].dst == "ff:ff:ff:ff:ff:ff"
    _, _, em = run(p, 1, [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / ARP(op=2, psrc="198.18.0.2", hwsrc=PEER_MAC, pdst="198.18.0.1", hwdst=GW_OUT_MAC)])
    sent = [e for s, e in em if s == 1 and UDP in e]
    assert len(sent) == 2 and all(e.dst == PEER_MAC for e in sent)
    for e in sent:
        checks_ok(e)


def test_echo_to_gateway():
    p, _ = make()
    _, _, em = run(p, 0, [Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="100.64.0.1") / ICMP(type=8, id=5, seq=9) / b"hi"])
    r = em[0][1]
    assert r[ICMP].type == 0 and r[ICMP].id == 5 and r[ICMP].seq == 9 and r[IP].src == "100.64.0.1" and bytes(r[ICMP].payload) == b"hi"
    checks_ok(r)


def test_non_ipv4_and_unsupported_dropped():
    p, _ = make()
    run(p, 0, [Ether(src=HOST_MAC, dst=GW_IN_MAC, type=0x86DD) / (b"\0" * 60),
               Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2", proto=47) / (b"\0" * 20)])
    assert drop(p, "not_ipv4") == 1 and drop(p, "unsupported_protocol") == 1


def test_static_port_forward_and_one_to_one():
    p, _ = make()
    syn = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst="198.18.0.1") / TCP(sport=5555, dport=2222, flags="S")
    b, _, _ = run(p, 1, [syn])
    assert b[0][IP].dst == "100.64.0.10" and b[0][TCP].dport == 22
    checks_ok(b[0])
    back = Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.10", dst="198.18.0.2") / TCP(sport=22, dport=5555, flags="SA")
    o, _, _ = run(p, 0, [back])
    assert o[0][IP].src == "198.18.0.1" and o[0][TCP].sport == 2222
    checks_ok(o[0])
    u = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst="198.18.1.100") / UDP(sport=1, dport=9999)
    b, _, _ = run(p, 1, [u])
    assert b[0][IP].dst == "100.64.0.20" and b[0][UDP].dport == 9999


def test_hairpin():
    p, _ = make(filtering="endpoint-independent")
    o, _, _ = run(p, 0, [out_udp(src="100.64.0.3", sport=6000)])
    xb, xbp = o[0][IP].src, o[0][UDP].sport
    _, _, em = run(p, 0, [out_udp(src="100.64.0.2", sport=7000, dst=xb, dport=xbp)])
    em = [x for x in em if ARP not in x[1]]
    h = em[0][1]
    assert em[0][0] == 0
    assert h[IP].dst == "100.64.0.3" and h[UDP].dport == 6000
    assert h[IP].src in POOL and h[IP].src != "100.64.0.2"
    checks_ok(h)


def test_limits_drop_new_flows_keep_established():
    p, _ = make(sessions=2)
    run(p, 0, [out_udp(sport=1000 + i) for i in range(2)])
    out, _, em = run(p, 0, [out_udp(sport=2000)])
    em = [x for x in em if ARP not in x[1]]
    assert out == [] and drop(p, "quota_exceeded") == 1
    assert em and em[0][1][ICMP].type == 3 and em[0][1][ICMP].code == 13
    out, _, _ = run(p, 0, [out_udp(sport=1000)])
    assert len(out) == 1


def test_port_quota():
    p, _ = make(ports=2)
    run(p, 0, [out_udp(sport=1000 + i) for i in range(2)])
    out, _, _ = run(p, 0, [out_udp(sport=3000)])
    assert out == [] and drop(p, "quota_exceeded") == 1


@pytest.mark.parametrize("order", ["in", "reverse"])
def test_fragments(order):
    p, _ = make()
    big = IP(src="100.64.0.2", dst="198.18.0.2", id=4242) / UDP(sport=40000, dport=53) / (b"z" * 3000)
    frags = [Ether(src=HOST_MAC, dst=GW_IN_MAC) / f for f in fragment(big, fragsize=1000)]
    if order == "reverse":
        frags = frags[::-1]
    sent = []
    for f in frags:
        out, _, em = run(p, 0, [f])
        sent += [e for s, e in em if s == 1 and ARP not in e]
    assert len(sent) == len(frags)
    for s in sent:
        assert s[IP].src in POOL and s.dst == PEER_MAC
        c = IP(bytes(s[IP]))
        del c.chksum
        assert IP(bytes(c)).chksum == s[IP].chksum
    # Reassembled: the UDP checksum over the whole translated datagram is right.
    parts = sorted(sent, key=lambda e: e[IP].frag)
    data = b"".join(bytes(e[IP].payload) for e in parts)
    ip0 = parts[0][IP]
    w = IP(src=ip0.src, dst=ip0.dst, proto=17) / UDP(data)
    assert w[UDP].sport == 40000 and len(data) == 3008
    re = w.copy()
    del re[UDP].chksum
    assert IP(bytes(re))[UDP].chksum == w[UDP].chksum


def _mirror(raw: bytes) -> bytes:
    """IPv4 packet ``raw`` as its peer answers it: addresses swapped, TCP/UDP ports swapped, an ICMP
    echo request made a reply (same identifier). A swap keeps every ones'-complement sum, so TCP and
    UDP checksums stay valid as they are (a UDP 0 stays 0); scapy recomputes the ICMP one."""
    b = bytearray(raw)
    ihl = (b[0] & 0x0F) * 4
    b[12:16], b[16:20] = raw[16:20], raw[12:16]
    if b[9] in (6, 17):
        b[ihl:ihl + 2], b[ihl + 2:ihl + 4] = raw[ihl + 2:ihl + 4], raw[ihl:ihl + 2]
        return bytes(b)
    pkt = IP(bytes(b))
    pkt[ICMP].type = 0 if pkt[ICMP].type == 8 else 8
    del pkt[ICMP].chksum
    return bytes(pkt)


def _with_ttl(raw: bytes, ttl: int) -> bytes:
    """``raw`` with another TTL and its IPv4 header checksum recomputed by scapy."""
    pkt = IP(raw)
    pkt.ttl = ttl
    del pkt.chksum
    return bytes(pkt)


def _translated(raw: bytes, which: str, addr: str, port: int, ttl: int) -> bytes:
    """What NAT should make of ``raw``, computed independently: scapy sets the address, port (ICMP:
    identifier) and TTL and recomputes every checksum (a UDP checksum of 0 stays 0)."""
    pkt = IP(raw)
    setattr(pkt, which, addr)
    pkt.ttl = ttl
    del pkt.chksum
    if ICMP in pkt:
        pkt[ICMP].id = port
        del pkt[ICMP].chksum
    else:
        L = TCP if TCP in pkt else UDP
        setattr(pkt[L], "sport" if which == "src" else "dport", port)
        if not (L is UDP and pkt[UDP].chksum == 0):
            del pkt[L].chksum
    return bytes(pkt)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    src=st.integers(int(ipaddress.IPv4Address("100.64.0.2")), int(ipaddress.IPv4Address("100.64.255.254"))),
    dst=st.integers(int(ipaddress.IPv4Address("198.18.2.0")), int(ipaddress.IPv4Address("198.19.255.254"))),
    sport=st.integers(1, 65535), dport=st.integers(1, 65535),
    proto=st.sampled_from(["udp", "tcp", "icmp"]), ttl=st.integers(3, 255),
    ip_id=st.integers(0, 65535), tos=st.integers(0, 255), df=st.booleans(),
    payload=st.binary(max_size=40), nocsum=st.booleans(),
    tcp_flags=st.sampled_from(["A", "PA", "S", "SA", "F", "FA", "R", "RA", ""]), mss=st.booleans(),
    seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1), window=st.integers(0, 65535),
)
def test_roundtrip_restores_original(src, dst, sport, dport, proto, ttl, ip_id, tos, df, payload, nocsum,
                                     tcp_flags, mss, seq, ack, window):
    """On an established session, random headers go in->out and the mirrored answer out->in, both on the
    fast path: each output is byte for byte what scapy computes independently, and the answer as it
    reaches the inside host is exactly the original packet mirrored (only the TTL is two lower)."""
    p, _ = _shared_pipeline()
    s, d = str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst))
    # Neighbours: learn the inside host and the remote as on-link (glean through ARP).
    run(p, 0, [Ether(src=HOST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=s, hwsrc=HOST_MAC, pdst="100.64.0.1")])
    run(p, 1, [Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=d, hwsrc=PEER_MAC, pdst="198.18.0.1")])
    p.emit.clear()

    def l4(**kw):
        if proto == "udp":
            return UDP(sport=sport, dport=dport)
        if proto == "tcp":
            return TCP(sport=sport, dport=dport, **kw)
        return ICMP(type=8, id=sport, **({"seq": kw["seq"] & 0xFFFF} if "seq" in kw else {}))

    # The session first (slow path), then the packet under test on it.
    setup = IP(src=s, dst=d) / l4(flags="S") / b"setup"
    o, _, _ = run(p, 0, [Ether(src=HOST_MAC, dst=GW_IN_MAC) / setup])
    assert len(o) == 1
    checks_ok(o[0])
    x = o[0][IP].src
    xp = o[0][ICMP].id if proto == "icmp" else o[0][TCP if proto == "tcp" else UDP].sport
    if proto == "tcp":
        hdr = l4(flags=tcp_flags, seq=seq, ack=ack, window=window, options=[("MSS", 1460)] if mss else [])
    else:
        hdr = l4(seq=seq)
    pkt = IP(src=s, dst=d, ttl=ttl, id=ip_id, tos=tos, flags="DF" if df else 0) / hdr / payload
    raw = bytearray(bytes(pkt))
    if proto == "udp" and nocsum:
        raw[26:28] = b"\0\0"
    raw = bytes(raw)

    fast0 = p.stats["fast"]
    o, _, _ = run(p, 0, [Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(raw)])
    assert len(o) == 1 and p.forwarded == 1 and p.stats["fast"] == fast0 + 1  # in->out on the fast path
    assert o[0].src == GW_OUT_MAC and o[0].dst == PEER_MAC
    out_ip = bytes(o[0][IP])
    assert out_ip == _translated(raw, "src", x, xp, ttl - 1)

    answer = _mirror(out_ip)
    b, _, _ = run(p, 1, [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(answer)])
    assert len(b) == 1 and p.forwarded == 1 and p.stats["fast"] == fast0 + 2  # out->in on the fast path
    assert b[0].src == GW_IN_MAC and b[0].dst == HOST_MAC
    back_ip = bytes(b[0][IP])
    assert back_ip == _translated(answer, "dst", s, sport, ttl - 2)
    # The round trip: what the inside host gets is its own packet mirrored, every other byte intact.
    assert back_ip == _with_ttl(_mirror(raw), ttl - 2)


def test_udp_checksum_zero_stays_zero_on_the_fast_path():
    p, _ = make()
    run(p, 0, [out_udp()])  # the session (slow path)
    raw = bytearray(bytes(out_udp(payload=b"no checksum")))
    raw[14 + 20 + 6: 14 + 20 + 8] = b"\0\0"
    fast0 = p.stats["fast"]
    o, _, _ = run(p, 0, [Ether(bytes(raw))])
    assert p.stats["fast"] == fast0 + 1 and o[0][UDP].chksum == 0
    checks_ok(o[0])
    rep = bytearray(bytes(u.in_udp("198.18.0.2", 53, o[0][IP].src, o[0][UDP].sport, payload=b"nor here")))
    rep[14 + 20 + 6: 14 + 20 + 8] = b"\0\0"
    b, _, _ = run(p, 1, [Ether(bytes(rep))])
    assert p.stats["fast"] == fast0 + 2 and b[0][UDP].chksum == 0 and b[0][UDP].dport == 40000
    checks_ok(b[0])


_SHARED = {}


def _shared_pipeline():
    if "p" not in _SHARED:
        _SHARED["p"] = make(filtering="address-and-port-dependent", cap=1 << 14)
    return _SHARED["p"]


# ----------------------------------------------------------------------------- fast path, batching, index

def _no_fast(p):
    """Make ``p`` take the general path for everything (the reference for the fast path)."""
    p._fast = lambda d, frames, lengths, valid, n: (np.zeros(0, np.intp), np.zeros(n, bool))
    return p


def _raw_run(p, direction, raws, slot=128):
    frames = np.zeros((len(raws), slot), np.uint8)
    lengths = np.zeros(len(raws), np.uint32)
    for i, r in enumerate(raws):
        frames[i, : len(r)] = np.frombuffer(r, np.uint8)
        lengths[i] = len(r)
    before = p.drops.copy()
    to_other, _ = p.process(direction, frames, lengths, np.ones(len(raws), bool))
    assert p.forwarded + p.punted + int((p.drops - before).sum()) == len(raws)
    return frames, sorted(to_other.tolist()), p.drops - before


def _burst_mix(rng, flows, direction, xmap=None):
    """Packets of ``flows`` (some repeated) with IP options, TCP/UDP/ICMP, plus malformed rows."""
    pkts = []
    for _ in range(48):
        proto, src, sport, dst, dport = flows[int(rng.integers(len(flows)))]
        opts = rng.random() < 0.25
        ip_kw = dict(options=[b"\x01\x01\x01\x00"]) if opts else {}  # NOP NOP NOP EOL: IHL 6
        if direction == 1:
            x, xp = xmap[(proto, src, sport, dst, dport)]
            s_, sp_, d_, dp_ = dst, dport, x, xp
            eth = Ether(src=PEER_MAC, dst=GW_OUT_MAC)
        else:
            s_, sp_, d_, dp_ = src, sport, dst, dport
            eth = Ether(src=HOST_MAC, dst=GW_IN_MAC)
        ip = IP(src=s_, dst=d_, ttl=int(rng.integers(2, 64)), **ip_kw)
        if proto == "udp":
            l4 = UDP(sport=sp_, dport=dp_) / (b"u" * int(rng.integers(0, 30)))
        elif proto == "tcp":
            l4 = TCP(sport=sp_, dport=dp_, flags="A") / b"t"
        else:
            l4 = ICMP(type=0 if direction == 1 else 8, id=dp_ if direction == 1 else sp_, seq=3) / b"i"
        pkts.append(bytes(eth / ip / l4))
    good = pkts[0]
    pkts.append(good[:30])  # truncated inside the IPv4 header
    bad = bytearray(good)
    bad[24] ^= 0xFF  # IPv4 header checksum
    pkts.append(bytes(bad))
    pkts.append(bytes(Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2", ttl=1) / UDP(sport=1, dport=2)))
    short_udp = bytearray(bytes(Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / UDP(sport=40000, dport=53) / b"abcd"))
    short_udp[38:40] = (200).to_bytes(2, "big")  # UDP length beyond the datagram: malformed
    pkts.append(bytes(short_udp))
    order = rng.permutation(len(pkts))
    return [pkts[i] for i in order]


@pytest.mark.parametrize("seed,cap", [(1, 1 << 12), (2, 1 << 12), (3, 3000)])
def test_fast_path_equals_general_path(seed, cap):
    """Mixed bursts (IHL 5 and IHL > 5, TCP/UDP/ICMP, repeated sessions, malformed rows) give the
    same frames, the same accounting and the same sessions with and without the fast path."""
    rng = np.random.default_rng(seed)
    fast, _ = make(filtering="endpoint-independent", cap=cap)
    slow, _ = make(filtering="endpoint-independent", cap=cap)
    _no_fast(slow)
    flows = [("udp", "100.64.0.2", 40000 + k, "198.18.0.2", 53) for k in range(6)] + \
            [("tcp", "100.64.0.3", 41000 + k, "198.18.0.3", 443) for k in range(4)] + \
            [("icmp", "100.64.0.4", 900 + k, "198.18.0.2", 900 + k) for k in range(3)]
    # Sessions first (slow path in both), with a SYN for TCP.
    first = []
    for proto, src, sport, dst, dport in flows:
        l4 = {"udp": UDP(sport=sport, dport=dport), "tcp": TCP(sport=sport, dport=dport, flags="S"),
              "icmp": ICMP(type=8, id=sport)}[proto]
        first.append(bytes(Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src=src, dst=dst) / l4))
    fa, ra, _ = _raw_run(fast, 0, first)
    fb, rb, _ = _raw_run(slow, 0, first)
    assert ra == rb and (fa == fb).all()
    xmap = {}
    for f, fl in zip(fa, flows):
        o = Ether(f.tobytes())
        xmap[fl] = (o[IP].src, o[UDP].sport if fl[0] == "udp" else o[TCP].sport if fl[0] == "tcp" else o[ICMP].id)
    for direction in (0, 1, 0, 1):
        raws = _burst_mix(rng, flows, direction, xmap)
        fa, ra, da = _raw_run(fast, direction, raws)
        fb, rb, db = _raw_run(slow, direction, raws)
        assert ra == rb and (da == db).all()
        assert (fa[ra] == fb[rb]).all()
        for i in ra:
            checks_ok(Ether(fa[i].tobytes()))
        assert fast.forwarded >= len(ra) // 2  # most rows took the fast path
    assert fast.stats["fast"] > 0 and slow.stats["fast"] == 0
    sa = {(s["iaddr"], s["iport"], s["raddr"], s["rport"]): (s["packets"], s["bytes"], s["tcp_state"], s["last_seen"])
          for s in fast.sessions()}
    sb = {(s["iaddr"], s["iport"], s["raddr"], s["rport"]): (s["packets"], s["bytes"], s["tcp_state"], s["last_seen"])
          for s in slow.sessions()}
    assert sa == sb


def test_fast_path_repeated_session_and_options_counted():
    p, clk = make()
    out, _, _ = run(p, 0, [out_udp()])
    x, xp = out[0][IP].src, out[0][UDP].sport
    clk.advance(5)
    pk = [out_udp(payload=b"a" * 4), out_udp(payload=b"b" * 8),
          out_udp(payload=b"c", options=[b"\x01\x01\x01\x00"]), out_udp(payload=b"d" * 2)]
    fast0 = p.stats["fast"]
    o, _, _ = run(p, 0, pk)
    assert len(o) == 4 and p.forwarded == 4 and p.stats["fast"] - fast0 == 3  # the IHL 6 one: general path
    for e in o:
        assert e[IP].src == x and e[UDP].sport == xp and e[IP].ttl == 63
        checks_ok(e)
    assert o[-1][IP].ihl == 6  # fast-path rows come first, then the general path's
    s = p.sessions()[0]
    assert s["packets"] == 5 and s["last_seen"] == clk.now()
    assert s["bytes"] == sum(len(bytes(k[IP])) for k in [out_udp()] + pk)


def test_fast_path_tcp_state_changes_written():
    p, _ = make()
    syn = Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / TCP(sport=33001, dport=80, flags="S")
    o, _, _ = run(p, 0, [syn])
    x, xp = o[0][IP].src, o[0][TCP].sport
    fast0 = p.stats["fast"]
    sa = Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=x) / TCP(sport=80, dport=xp, flags="SA")
    fin = Ether(src=HOST_MAC, dst=GW_IN_MAC) / IP(src="100.64.0.2", dst="198.18.0.2") / TCP(sport=33001, dport=80, flags="FA")
    run(p, 1, [sa])
    assert p.sessions()[0]["tcp_state"] == nat_tcp.ESTABLISHED
    run(p, 0, [fin, fin])  # two packets of one session in one burst, applied in order
    assert p.sessions()[0]["tcp_state"] == nat_tcp.IN_FIN_RCV
    assert p.stats["fast"] - fast0 == 3


def test_vlan_and_odd_frames_take_the_general_path():
    p, _ = make()
    run(p, 0, [out_udp()])
    from scapy.layers.l2 import Dot1Q
    tagged = Ether(src=HOST_MAC, dst=GW_IN_MAC) / Dot1Q(vlan=5) / IP(src="100.64.0.2", dst="198.18.0.2") / UDP(sport=40000, dport=53)
    runt = Ether(bytes(out_udp())[:20])
    out, _, _ = run(p, 0, [tagged, out_udp(), runt])
    assert p.stats["fast"] >= 1
    assert len(out) == 2  # the runt is dropped, never forwarded
    for e in out:
        checks_ok(e)


def test_shared_mapping_gets_a_map_entry_and_is_released():
    p, clk = make(filtering="endpoint-independent")
    a, _, _ = run(p, 0, [out_udp(dst="198.18.0.2", dport=1)])
    x, xp = a[0][IP].src, a[0][UDP].sport
    ent = p.in2out.entries
    from hotplane.secondary.nat_pipeline import FLAG_MAP
    assert int(np.count_nonzero((ent["state"] == 1) & (ent["flags"] == FLAG_MAP))) == 0  # a lone session holds it
    assert p.index.count == 3  # reply hint + FWD + REV
    b, _, _ = run(p, 0, [out_udp(dst="198.18.0.3", dport=2), out_udp(dst="198.18.0.4", dport=3)])
    assert all((e[IP].src, e[UDP].sport) == (x, xp) for e in b)
    maps = np.flatnonzero((ent["state"] == 1) & (ent["flags"] == FLAG_MAP))
    assert maps.size == 1 and int(ent["packets"][maps[0]]) == 3 and p.index.count == 5
    # Endpoint-independent filtering: a new remote reaches the inside host through the shared mapping.
    r, _, _ = run(p, 1, [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.3", dst=x) / UDP(sport=9, dport=xp)])
    assert r[0][IP].dst == "100.64.0.2" and r[0][UDP].dport == 40000
    assert int(ent["packets"][maps[0]]) == 4
    clk.advance(400)
    p.expire(clk.now(), rounds=64)
    assert p.sessions() == [] and p.in2out.count == 0 and p.index.count == 0
    assert p.alloc.port_state(17, int(ipaddress.IPv4Address(x)), xp) == "held"
    assert p.index.audit() == [] and p.in2out.audit() == []


def test_batched_creation_one_burst_many_flows_and_duplicates():
    p, _ = make()
    pk = [out_udp(sport=30000 + k) for k in range(40)] + [out_udp(sport=30000), out_udp(sport=30001)]
    ins0 = p.in2out.stats()["inserts"]
    out, _, _ = run(p, 0, pk)
    assert len(out) == 42 and p.stats["sessions_created"] == 40
    assert p.in2out.stats()["inserts"] - ins0 == 40  # one batch (no shared mapping: no MAP entries)
    assert len({e[UDP].sport for e in out[:40]}) == 40
    assert out[40][UDP].sport == out[0][UDP].sport and out[41][UDP].sport == out[1][UDP].sport
    assert p.index.count == 120
    # Replies find every session (through the index) on the fast path.
    rep = [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=e[IP].src) / UDP(sport=53, dport=e[UDP].sport)
           for e in out[:40]]
    back, _, _ = run(p, 1, rep)
    assert sorted(b[UDP].dport for b in back) == list(range(30000, 30040)) and p.forwarded == 40


def test_index_rebuilt_after_a_writer_died_mid_group():
    cfg = parse_config(config_text("endpoint-independent"))
    from hotplane.secondary.nat_pipeline import private_zones
    clk = ManualClock(1000)
    zones = private_zones(cfg, 0, clk, 1 << 12)
    p = NatPipeline(cfg, 0, zones, clock=clk)
    _teach_pipeline(p)
    out, _, _ = run(p, 0, [out_udp(sport=31000 + k) for k in range(10)])
    # A writer killed inside a group: wseq odd, hints half written (here: all lost).
    zones["index"].begin()
    zones["index"].entries[:] = 0
    q = NatPipeline(cfg, 0, zones, clock=clk)
    _teach_pipeline(q)
    assert q.stats["index_rebuilds"] == 1 and not q.index.needs_rebuild and q.index.count == 30
    rep = [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=e[IP].src) / UDP(sport=53, dport=e[UDP].sport)
           for e in out]
    back, _, _ = run(q, 1, rep)
    assert len(back) == 10 and q.forwarded == 10
    again, _, _ = run(q, 0, [out_udp(sport=31000, dst="198.18.0.3")])  # EIM still holds after the rebuild
    assert (again[0][IP].src, again[0][UDP].sport) == (out[0][IP].src, out[0][UDP].sport)


def _teach_pipeline(p):
    for side, (ip, mac, gw) in enumerate((("100.64.0.2", HOST_MAC, "100.64.0.1"), ("198.18.0.2", PEER_MAC, "198.18.0.1"))):
        run(p, side, [Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=ip, hwsrc=mac, pdst=gw)])
    run(p, 1, [Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="198.18.0.3", hwsrc=PEER_MAC, pdst="198.18.0.1")])
    p.emit.clear()


@pytest.mark.parametrize("cap", [1 << 12, 4000])  # wrapping and range-reduced table geometry
def test_lean_lookup_agrees_with_the_table(cap):
    p, _ = make(cap=cap)
    assert p._lean and p.in2out.wraps == (cap == 1 << 12)
    rng = np.random.default_rng(5)
    k0 = rng.integers(0, 2**63, 3200, dtype=np.uint64)
    k1 = rng.integers(0, 2**63, 3200, dtype=np.uint64)
    slots = p.in2out.insert_batch(k0, k1)  # load ~0.78
    for _ in range(3):
        p.in2out.delete_batch(k0[::7], k1[::7])  # tombstones in the chains
        p.in2out.insert_batch(k0[::7], k1[::7])
    q0 = np.concatenate([k0[:600], rng.integers(0, 2**63, 200, dtype=np.uint64)])
    q1 = np.concatenate([k1[:600], rng.integers(0, 2**63, 200, dtype=np.uint64)])
    ref = np.empty(q0.size, np.int64)
    p.in2out.lookup_batch(q0, q1, ref, np.empty(q0.size, bool))
    assert (p._t_lookup(q0, q1) == ref).all() and (ref[:600] >= 0).all() and (ref[600:] == -1).all()
    del slots


def test_memory_per_session_fits_10M_in_1GiB():
    from hotplane.secondary.nat_pipeline import memory_per_session
    m = memory_per_session(1 << 24)
    assert m["bytes_per_session"] <= 107.4 and m["sessions_in_1GiB"] >= 10_000_000


@pytest.mark.timeout(180)
def test_10M_configured_sessions_fit_in_1GiB_of_session_zones(tmp_path):
    """``max_sessions = 10_000_000`` (2 workers): the primary's session zones (in2out + index of every
    worker), as reserved and created, take at most 1 GiB, and admit at least 10M sessions."""
    from hotplane.primary.nat_zones import reserve_nat_zones
    from hotplane.secondary.nat_pipeline import INDEX_LOAD, MAX_LOAD, session_zone_bytes, table_capacity_for
    from hotplane.shared.memzone import Directory
    from hotplane.shared.runtime import FileLock

    cfg = parse_config(config_text(workers=2, max_sessions=10_000_000))
    cap = table_capacity_for(cfg)
    assert cap & (cap - 1), "sized exactly, not rounded to a power of two"
    size = (1 << 30) + (160 << 20)
    raw = np.zeros(size + 4096, np.uint8)  # pages come from the kernel as the zones are created
    mem = raw[(-raw.ctypes.data) % 4096:][:size]
    d = Directory.format(mem, FileLock(tmp_path / "lock"), "t", base=mem.ctypes.data, hugepage_size=4096)
    made = reserve_nat_zones(d, cfg, 2, clock=ManualClock(1))
    zones = {z.name: z for z in d.list()}
    names = [f"nat.w{w}.{k}" for w in range(2) for k in ("in2out", "index")]
    assert all(made[n] for n in names)
    total = sum(zones[n].length for n in names)
    print(f"\n[nat sizing] max_sessions=10M: table capacity {cap:,} per worker, session zones {total:,} bytes "
          f"({total / 2**30:.4f} GiB, {total / 10_000_000:.1f} B/session)")
    assert total <= 1 << 30
    assert total == session_zone_bytes(cfg)  # the figure bench nat reports
    from hotplane.shared.session_index import SessionIndex
    from hotplane.shared.session_table import SessionTable
    admitted = 0
    for w in range(2):
        t = SessionTable.attach(zones[f"nat.w{w}.in2out"].view)
        ix = SessionIndex.attach(zones[f"nat.w{w}.index"].view)
        assert not t.wraps and t.capacity == cap
        # What NatPipeline._full admits: MAX_LOAD of the entries, 3 hints each at INDEX_LOAD.
        admitted += min(int(t.capacity * MAX_LOAD), int(ix.capacity * INDEX_LOAD) // 3) - 512 - 3
    assert admitted >= 10_000_000
    del t, ix, zones, d, mem, raw


@pytest.mark.timeout(180)
def test_sizing_rule_at_full_load_keeps_probes_bounded():
    """The same sizing rule scaled down (max_sessions 200k, 2 workers): a worker's table filled to the
    load the pipeline admits (MAX_LOAD) and its index to INDEX_LOAD refuse (almost) nothing, every key
    stays within a short probe, and churn at that load changes neither."""
    from hotplane.secondary.nat_pipeline import INDEX_LOAD, MAX_LOAD, index_capacity_for, private_zones, \
        table_capacity_for

    cfg = parse_config(config_text(workers=2, max_sessions=200_000))
    cap = table_capacity_for(cfg)
    assert cap & (cap - 1) and cap >= 100_000 / MAX_LOAD
    z = private_zones(cfg, 0, ManualClock(1), cap)
    t, ix = z["in2out"], z["index"]
    assert not t.wraps and ix.capacity == index_capacity_for(cap)
    rng = np.random.default_rng(7)
    n = int(cap * MAX_LOAD)
    k0 = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    k1 = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    s = t.insert_batch(k0, k1)
    assert np.count_nonzero(s < 0) <= 1e-4 * n
    disp = s[s >= 0, None] - t.homes(k0[s >= 0], k1[s >= 0])
    best = np.where(disp >= 0, disp, 1 << 20).min(axis=1)
    # As in a power-of-two table at this load: half the keys at their home, 97 % within the first
    # lookup block (4 slots), 99.9 % within 16.
    assert best.mean() < 0.6 and np.mean(best < 4) > 0.95 and np.quantile(best, 0.999) <= 16
    print(f"\n[nat sizing] table {cap:,} at load {t.count / cap:.3f}: refused {np.count_nonzero(s < 0)}, "
          f"probe mean {best.mean():.3f} max {best.max()} (window {t.max_probe})")
    # Churn at full load: a tenth out, as many new in.
    gone = slice(0, n // 10)
    t.delete_batch(k0[gone], k1[gone])
    n0 = rng.integers(0, 2**64, n // 10, dtype=np.uint64, endpoint=False)
    s2 = t.insert_batch(n0, n0 ^ np.uint64(12345))
    assert np.count_nonzero(s2 < 0) <= 1e-4 * n
    assert t.audit() == []
    # The index at its bound: three hints per admitted session.
    m = int(ix.capacity * INDEX_LOAD)
    ka = rng.integers(0, 2**64, m, dtype=np.uint64, endpoint=False)
    ok = ix.insert_batch(ka, ka * np.uint64(3), np.arange(m, dtype=np.int64) % cap)
    assert np.count_nonzero(~ok) <= 1e-4 * m


def test_zones_reserve_attach_restart_and_peers(tmp_path):
    """The primary's zones: in2out + index per worker; a restarted worker re-attaches; peers hairpin."""
    from hotplane.primary.nat_zones import attach_nat_zones, reserve_nat_zones
    from hotplane.shared.memzone import Directory
    from hotplane.shared.runtime import FileLock

    cfg = parse_config(config_text("endpoint-independent", workers=2))
    raw = np.zeros((64 << 20) + 4096, np.uint8)
    mem = raw[(-raw.ctypes.data) % 4096:][: 64 << 20]
    d = Directory.format(mem, FileLock(tmp_path / "lock"), "t", base=mem.ctypes.data, hugepage_size=4096)
    clk = ManualClock(1000)
    made = reserve_nat_zones(d, cfg, 2, table_capacity=1 << 12, clock=clk)
    assert made["nat.w0.in2out"] and made["nat.w1.index"] and "nat.w0.out2in" not in made
    p0 = NatPipeline(cfg, 0, attach_nat_zones(d, 0, cfg, clk), clock=clk)
    _teach_pipeline(p0)
    lo, _ = cfg.nat.worker_port_range(0)
    out, _, _ = run(p0, 0, [out_udp(sport=lo + 10)])
    x, xp = out[0][IP].src, out[0][UDP].sport
    # Restart: a new pipeline on the same zones keeps the session and its hints.
    again = reserve_nat_zones(d, cfg, 2, table_capacity=1 << 12, clock=clk)
    assert not any(v for k, v in again.items() if k.startswith("nat.w"))
    p0b = NatPipeline(cfg, 0, attach_nat_zones(d, 0, cfg, clk), clock=clk)
    _teach_pipeline(p0b)
    assert p0b.stats["index_rebuilds"] == 0 and len(p0b.sessions()) == 1
    back, _, _ = run(p0b, 1, [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=x) / UDP(sport=53, dport=xp)])
    assert back[0][UDP].dport == lo + 10 and p0b.forwarded == 1
    # Worker 1 finds worker 0's mapping through its index and table (read with the seqlock).
    p1 = NatPipeline(cfg, 1, attach_nat_zones(d, 1, cfg, clk), clock=clk)
    assert p1._hairpin_target(int(ipaddress.IPv4Address(x)), 17, xp, 0, 0)[:2] == (int(ipaddress.IPv4Address("100.64.0.2")), lo + 10)


def test_suspend_and_resume_hand_over_the_writer_role():
    """Hot upgrade: the old pipeline suspends (log written, roles released), a reader-built one resumes."""
    from hotplane.secondary.nat_pipeline import private_zones
    from hotplane.shared.session_index import SessionIndex
    from hotplane.shared.session_table import SessionTable

    cfg = parse_config(config_text("endpoint-independent"))
    clk = ManualClock(1000)
    zones = private_zones(cfg, 0, clk, 1 << 12)
    old = NatPipeline(cfg, 0, zones, clock=clk)
    _teach_pipeline(old)
    out, _, _ = run(old, 0, [out_udp(sport=32000), out_udp(sport=32000)])
    assert old._log_n == 2
    # The candidate attaches read-only while the old one still writes.
    ro = dict(zones, in2out=SessionTable.attach(zones["in2out"]._buf), index=SessionIndex.attach(zones["index"].buf))
    new = NatPipeline(cfg, 0, ro, clock=clk)
    assert not new.in2out.is_writer and not new.index.writer
    old.suspend()
    assert old._log_n == 0 and not old.in2out.is_writer and not old.index.writer
    new.resume()
    _teach_pipeline(new)
    assert new.in2out.is_writer and new.index.writer and new.sessions()[0]["packets"] == 2
    back, _, _ = run(new, 1, [Ether(src=PEER_MAC, dst=GW_OUT_MAC) / IP(src="198.18.0.2", dst=out[0][IP].src)
                              / UDP(sport=53, dport=out[0][UDP].sport)])
    assert len(back) == 1 and new.forwarded == 1
