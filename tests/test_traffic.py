"""Generator and verifying sink: exact counts of loss, duplication, reordering and corruption."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import ICMP, IP, TCP, UDP, Ether

from hotplane.shared.traffic import FlowSet, Generator, Sink


@pytest.mark.parametrize("proto,layer", [("udp", UDP), ("tcp", TCP), ("icmp", ICMP)])
@pytest.mark.parametrize("size", [64, 200, 1514])
def test_generated_frames_are_valid_for_scapy(proto, layer, size):
    size = max(size, 74) if proto == "tcp" else size
    g = Generator(FlowSet.make(5, proto, size), burst=16)
    fr, ln = g.fill(np.arange(16) % 5)
    for i in range(16):
        raw = bytes(fr[i, : ln[i]])
        assert len(raw) == size
        p = Ether(raw)
        assert layer in p
        q = p.copy()
        del q[IP].chksum
        del q[layer].chksum
        assert bytes(Ether(bytes(q))) == raw, "checksum differs from scapy's"
    if proto == "tcp":
        flags = [Ether(bytes(fr[i, : ln[i]]))[TCP].flags for i in range(10)]
        assert str(flags[0]) == "S" and str(flags[5]) == "A"


def test_clean_run_counts_nothing_wrong():
    g = Generator(FlowSet.make(50, "udp", 80), burst=256)
    s = Sink()
    rng = np.random.default_rng(0)
    for _ in range(40):
        fr, ln = g.fill(rng.integers(0, 50, 256))
        s.verify(fr, ln)
    r = s.report(g.sent())
    assert r["received"] == r["expected"] == 40 * 256
    assert r["lost"] == r["duplicated"] == r["reordered"] == r["corrupted"] == 0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_injected_faults_are_counted_exactly(data):
    nflows = data.draw(st.integers(1, 6))
    proto = data.draw(st.sampled_from(["udp", "tcp", "icmp"]))
    g = Generator(FlowSet.make(nflows, proto, 90), burst=64)
    flows = np.array(data.draw(st.lists(st.integers(0, nflows - 1), min_size=1, max_size=64)))
    fr, ln = g.fill(flows)
    fr, ln = fr.copy(), ln.copy()
    n = len(flows)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    corrupt = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n))) & keep
    dup_of = data.draw(st.lists(st.integers(0, n - 1), max_size=5))
    for i in np.flatnonzero(corrupt):
        fr[i, 50] ^= 0x40  # inside the payload stamp/fill
    order = [i for i in range(n) if keep[i]] + [i for i in dup_of if keep[i] and not corrupt[i]]
    perm = data.draw(st.permutations(order))
    s = Sink()
    s.verify(fr[perm], ln[perm]) if perm else None
    r = s.report(g.sent())
    ok = keep & ~corrupt
    assert r["corrupted"] == int(corrupt.sum())
    assert r["lost"] == n - int(ok.sum())
    assert r["duplicated"] == len([i for i in dup_of if ok[i]])
    assert r["received"] == int(ok.sum())
    # Reordered: fresh arrivals below their flow's highest seq seen so far.
    seqs = {}
    seen = set()
    expect_reord = 0
    for i in perm:
        if not ok[i] or i in seen:
            continue
        seen.add(i)
        f = int(flows[i])
        rank = int((flows[:i] == f).sum())
        if rank < seqs.get(f, -1):
            expect_reord += 1
        seqs[f] = max(seqs.get(f, -1), rank)
    assert r["reordered"] == expect_reord


def test_strays_are_not_corruption():
    s = Sink()
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", type=0x0806) / (b"\x00" * 46))
    other = bytes(Ether() / IP(src="100.64.0.9", dst="198.18.0.2") / UDP(sport=1, dport=2) / (b"x" * 30))
    frames = np.zeros((2, 128), np.uint8)
    frames[0, : len(arp)] = np.frombuffer(arp, np.uint8)
    frames[1, : len(other)] = np.frombuffer(other, np.uint8)
    s.verify(frames, np.array([len(arp), len(other)], np.uint32))
    r = s.report()
    assert r["not_ours"] == 2 and r["corrupted"] == 0 and r["received"] == 0


def test_bad_ip_checksum_is_corruption():
    g = Generator(FlowSet.make(1, "udp", 64), burst=4)
    fr, ln = g.fill(np.zeros(4, np.intp))
    fr = fr.copy()
    fr[1, 24] ^= 0xFF  # IPv4 header checksum
    s = Sink()
    s.verify(fr, ln)
    r = s.report(g.sent())
    assert r["corrupted"] == 1 and r["corrupted_by_reason"]["ip_checksum"] == 1 and r["lost"] == 1


def test_sink_grows_for_many_seqs_and_flows():
    g = Generator(FlowSet.make(3, "udp", 64), burst=512)
    s = Sink(cap_bits=64)
    for _ in range(100):
        fr, ln = g.fill(np.arange(512) % 3)
        s.verify(fr, ln)
    r = s.report(g.sent())
    assert r["received"] == 51200 and r["lost"] == 0 and r["duplicated"] == 0


def test_bad_flowset_arguments():
    with pytest.raises(ValueError, match="frame size"):
        FlowSet.make(1, "udp", 20)
    with pytest.raises(ValueError, match="protocol"):
        FlowSet.make(1, "sctp", 64)
