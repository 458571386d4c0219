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
    """Loss, duplication, reordering and corruption -- per flow and in total -- against a model.

    A damaged packet whose stamp is intact (a fill byte flipped) is a corrupted arrival of its
    flow, not a loss; one whose stamp is damaged (a sequence byte flipped) has no readable
    flow: corrupted in the total only, and its sequence number is lost."""
    nflows = data.draw(st.integers(1, 6))
    proto = data.draw(st.sampled_from(["udp", "tcp", "icmp"]))
    g = Generator(FlowSet.make(nflows, proto, 90), burst=64)
    flows = np.array(data.draw(st.lists(st.integers(0, nflows - 1), min_size=1, max_size=64)))
    fr, ln = g.fill(flows)
    fr, ln = fr.copy(), ln.copy()
    n = len(flows)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    # 0 intact, 1 fill byte flipped (stamp readable), 2 stamp's sequence byte flipped (unreadable)
    damage = np.array(data.draw(st.lists(st.sampled_from([0, 0, 1, 2]), min_size=n, max_size=n))) * keep
    dup_of = data.draw(st.lists(st.integers(0, n - 1), max_size=5))
    for i in np.flatnonzero(damage == 1):
        fr[i, 89] ^= 0x40  # the last fill byte: the L4 checksum catches it
    for i in np.flatnonzero(damage == 2):
        fr[i, g.stamp_off + 8] ^= 0x40  # the stamp's sequence number: the check word no longer agrees
    order = [i for i in range(n) if keep[i]] + [i for i in dup_of if keep[i] and damage[i] != 2]
    perm = data.draw(st.permutations(order))
    s = Sink()
    s.verify(fr[perm], ln[perm]) if perm else None
    r = s.report(g.sent())
    # The model, in arrival order: first arrival of a readable packet = received (intact) or corrupted.
    seqs: dict[int, int] = {}
    seen: set[int] = set()
    want = {f: {"received": 0, "lost": 0, "duplicated": 0, "reordered": 0, "corrupted": 0} for f in range(nflows)}
    for i in perm:
        f = int(flows[i])
        if damage[i] == 2:
            continue
        if damage[i] == 1:
            want[f]["corrupted"] += 1
        if i in seen:
            want[f]["duplicated"] += 1
            continue
        seen.add(i)
        rank = int((flows[:i] == f).sum())
        if damage[i] == 0:
            want[f]["received"] += 1
            if rank < seqs.get(f, -1):
                want[f]["reordered"] += 1
        seqs[f] = max(seqs.get(f, -1), rank)
    for f in range(nflows):
        want[f]["lost"] = int((flows == f).sum()) - want[f]["received"] - len([i for i in seen if flows[i] == f and damage[i] == 1])
    got = {x["flow"]: {k: x[k] for k in ("received", "lost", "duplicated", "reordered", "corrupted")} for x in r["flows"]}
    assert got == {f: w for f, w in want.items() if (flows == f).any()}
    assert r["corrupted"] == len([i for i in perm if damage[i] > 0])  # every damaged arrival, duplicates too
    assert r["corrupted_unattributed"] == int((damage == 2).sum())
    for k in ("received", "lost", "duplicated", "reordered"):
        assert r[k] == sum(w[k] for w in want.values())
    arrived_damaged = len([i for i in seen if damage[i] == 1])
    assert r["expected"] == n == r["received"] + r["lost"] + arrived_damaged


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
    # The stamp is intact: packet 1 arrived, damaged -- corrupted in flow 0, not lost.
    assert r["corrupted"] == 1 and r["corrupted_by_reason"]["ip_checksum"] == 1 and r["lost"] == 0
    assert r["flows"][0]["corrupted"] == 1 and r["flows"][0]["received"] == 3 and r["corrupted_unattributed"] == 0
    assert r["reordered"] == 0  # the damaged packet is accounted where it arrived, not before the others


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
