"""Test traffic: the generator's frames and the verifying sink's accounting.

Every generated packet carries, right after its L4 header, a 20-byte stamp:
magic, flow id, sequence number and a check word derived from both, then a
fill pattern derived from the flow. The sink verifies the IPv4 and L4
checksums, the stamp and the fill, and counts per flow what it received,
lost, duplicated, reordered and corrupted. Both sides are vectorized over
bursts: the generator copies a per-flow template and patches the stamp and
checksums; the sink checks a whole burst with numpy.

How the sink classifies an arrival (per flow, and summed for the totals):

* a packet whose stamp is *readable* -- magic and check word agree, so flow
  and sequence number are known (the check word mixes both: a damaged stamp
  keeps a matching one with probability 2**-32) -- is an arrival of
  (flow, seq). Its first arrival is *received* when the packet is intact and
  *corrupted* when an IP or L4 checksum or the fill is wrong; a later arrival
  of the same (flow, seq) is *duplicated* (intact or not). An intact first
  arrival below the highest seq its flow had seen is also *reordered*.
* a damaged packet whose stamp is not readable is *corrupted* in the total
  only (``corrupted_unattributed``): its flow is unknown, and its sequence
  number stays missing, so it also shows as *lost*.
* ``lost`` per flow = expected - received - corrupted first arrivals: a
  packet that arrived damaged was delivered, badly, not lost.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import numpy as np

from hotplane.shared.checksum import fold16, pseudo_header_sum, sum16_rows
from hotplane.shared.packet import ParsedBurst, build_icmp_echo, build_ipv4_tcp, build_ipv4_udp, parse_burst

MAGIC = 0x4E475048  # "HPGN" little-endian
STAMP_LEN = 20  # magic u32, flow u32, seq u64, check u32 (little-endian)
PROTOS = {"udp": 17, "tcp": 6, "icmp": 1}
L4_HDR = {17: 8, 6: 20, 1: 8}
ETH_IP = 14 + 20
MIN_FRAME = 64 - 4  # without the FCS the kernel never shows us

TCP_SYN, TCP_ACK = 0x02, 0x10


def check_word(flow: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """The stamp's check word: a mix of flow and seq a corrupted stamp is unlikely to keep."""
    f = flow.astype(np.uint64)
    s = seq.astype(np.uint64)
    x = (f * np.uint64(0x9E3779B1)) ^ (s * np.uint64(0x85EBCA77)) ^ (s >> np.uint64(29))
    return (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _ip(a) -> int:
    return int(ipaddress.IPv4Address(a))


@dataclass
class FlowSet:
    """N flows of one protocol and frame size; flow i has id ``first_id + i``."""

    proto: int
    size: int  # frame length without FCS
    src: np.ndarray  # uint32 host order
    dst: np.ndarray
    sport: np.ndarray  # uint16 (ICMP: identifier)
    dport: np.ndarray
    src_mac: bytes = b"\x02\x00\x00\x00\x00\x01"
    dst_mac: bytes = b"\x02\x00\x00\x00\x00\x02"
    first_id: int = 0

    @property
    def n(self) -> int:
        return int(self.src.size)

    @classmethod
    def make(cls, n: int, proto: str = "udp", size: int = 64, *, src: str = "100.64.0.2", dst: str = "198.18.0.2",
             sport: int = 10000, dport: int = 5201, src_hosts: int = 1, first_id: int = 0,
             src_mac: bytes | None = None, dst_mac: bytes | None = None) -> "FlowSet":
        """``n`` flows from ``src_hosts`` consecutive inside addresses, consecutive source ports."""
        if proto not in PROTOS:
            raise ValueError(f"protocol {proto!r}: use udp, tcp or icmp")
        p = PROTOS[proto]
        min_size = ETH_IP + L4_HDR[p] + STAMP_LEN
        if not (max(min_size, MIN_FRAME) <= size <= 1514):
            raise ValueError(f"frame size {size}: {proto} frames need {max(min_size, MIN_FRAME)}..1514 bytes")
        if n < 1 or n > 1 << 20:
            raise ValueError("flow count must be 1..1048576")
        i = np.arange(n, dtype=np.uint64)
        hosts = max(1, min(src_hosts, n))
        s = (np.uint64(_ip(src)) + (i % np.uint64(hosts))).astype(np.uint32)
        per_host = (i // np.uint64(hosts))
        sp = ((np.uint64(sport) + per_host) % np.uint64(65536)).astype(np.uint16)
        d = np.full(n, _ip(dst), np.uint32)
        dp = np.full(n, dport, np.uint16)
        fs = cls(p, size, s, d, sp, dp, first_id=first_id)
        if src_mac:
            fs.src_mac = src_mac
        if dst_mac:
            fs.dst_mac = dst_mac
        return fs


class Generator:
    """Builds bursts of stamped frames for a FlowSet, vectorized."""

    def __init__(self, flows: FlowSet, burst: int = 256) -> None:
        self.flows = flows
        self.size = flows.size
        self.l4_off = ETH_IP
        self.stamp_off = ETH_IP + L4_HDR[flows.proto]
        # Two templates per flow: [0] the first packet (TCP: SYN), [1] the rest.
        self.templates = np.zeros((2, flows.n, self.size), np.uint8)
        self.base_sum = np.zeros((2, flows.n), np.uint64)
        for v in range(2):
            for i in range(flows.n):
                self.templates[v, i] = np.frombuffer(self._template(i, first=(v == 0)), np.uint8)
        # Unfolded L4 sums without the stamp's variable words (seq, check) and the checksum.
        for v in range(2):
            t = self.templates[v].copy()
            t[:, self.csum_col : self.csum_col + 2] = 0
            l4_len = self.size - self.l4_off
            s = sum16_rows(t, self.l4_off, l4_len)
            if flows.proto != 1:
                s += pseudo_header_sum(flows.src, flows.dst, flows.proto, l4_len)
            self.base_sum[v] = s
        self.seq = np.zeros(flows.n, np.uint64)  # next seq per flow
        self._buf = np.zeros((burst, self.size), np.uint8)
        self._len = np.full(burst, self.size, np.uint32)

    @property
    def csum_col(self) -> int:
        return self.l4_off + {17: 6, 6: 16, 1: 2}[self.flows.proto]

    def _template(self, i: int, first: bool) -> bytes:
        f = self.flows
        payload_len = self.size - self.stamp_off
        fill = ((np.arange(payload_len, dtype=np.uint32) + (f.first_id + i) * 7) & 0xFF).astype(np.uint8)
        fill[:STAMP_LEN] = 0
        stamp = np.frombuffer(np.array([MAGIC, f.first_id + i], "<u4").tobytes(), np.uint8)
        fill[:8] = stamp
        payload = fill.tobytes()
        src, dst = int(f.src[i]), int(f.dst[i])
        sp, dp = int(f.sport[i]), int(f.dport[i])
        macs = (f.src_mac, f.dst_mac)
        if f.proto == 17:
            return build_ipv4_udp(*macs, src, dst, sp, dp, payload, ttl=64)
        if f.proto == 6:
            return build_ipv4_tcp(*macs, src, dst, sp, dp, payload=payload, flags=(TCP_SYN if first else TCP_ACK), seq=1000, ack=0 if first else 1, ttl=64, df=False)
        return build_icmp_echo(*macs, src, dst, sp, 0, payload, ttl=64)

    def fill(self, flow_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frames for one packet of each listed flow (indices into the FlowSet), seqs advanced.

        Returns views (frames[n, size], lengths[n]) of scratch reused by the next call.
        """
        n = flow_idx.size
        if n > self._buf.shape[0]:  # a bigger burst than planned: grow the scratch once
            self._buf = np.zeros((n, self.size), np.uint8)
            self._len = np.full(n, self.size, np.uint32)
        out = self._buf[:n]
        seq = self.seq[flow_idx]
        # A flow listed twice in one burst gets consecutive seqs.
        if n > 1:
            order = np.argsort(flow_idx, kind="stable")
            sf = flow_idx[order]
            starts = np.r_[0, np.flatnonzero(np.diff(sf)) + 1]
            rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
            seq_sorted = seq[order] + rank.astype(np.uint64)
            seq = np.empty_like(seq)
            seq[order] = seq_sorted
        variant = (seq > 0).astype(np.intp)
        out[:] = self.templates[variant, flow_idx]
        fid = (flow_idx + self.flows.first_id).astype(np.uint32)
        chk = check_word(fid, seq)
        so = self.stamp_off
        out[:, so + 8 : so + 16] = seq.astype("<u8").view(np.uint8).reshape(n, 8)
        out[:, so + 16 : so + 20] = chk.astype("<u4").view(np.uint8).reshape(n, 4)
        # L4 checksum: the template's sum plus the stamp's variable 16-bit words.
        s = self.base_sum[variant, flow_idx].copy()
        s += sum16_rows(out, so + 8, 12)
        if self.flows.proto == 1:  # ICMP echo sequence field = low 16 bits of seq
            icmp_seq = (seq & np.uint64(0xFFFF)).astype(np.uint16)
            out[:, self.l4_off + 6] = (icmp_seq >> 8).astype(np.uint8)
            out[:, self.l4_off + 7] = (icmp_seq & 0xFF).astype(np.uint8)
            s += icmp_seq.astype(np.uint64)
        c = ~fold16(s)
        if self.flows.proto == 17:
            c[c == 0] = 0xFFFF
        cc = self.csum_col
        out[:, cc] = (c >> 8).astype(np.uint8)
        out[:, cc + 1] = (c & 0xFF).astype(np.uint8)
        np.add.at(self.seq, flow_idx, 1)
        return out, self._len[:n]

    def sent(self) -> np.ndarray:
        """Packets generated per flow so far."""
        return self.seq.copy()


def _read_stamps(frames: np.ndarray, lengths: np.ndarray, so: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stamps at byte offsets ``so``: (ours: fits and magic, flow, seq, check word agrees)."""
    fits = so + STAMP_LEN <= lengths
    cols = np.clip(so[:, None] + np.arange(STAMP_LEN)[None, :], 0, frames.shape[1] - 1)
    st = np.take_along_axis(frames, cols, axis=1)
    magic = st[:, 0:4].copy().view("<u4")[:, 0]
    ours = fits & (magic == MAGIC)
    flow = st[:, 4:8].copy().view("<u4")[:, 0].astype(np.int64)
    seq_u = st[:, 8:16].copy().view("<u8")[:, 0]
    chk = st[:, 16:20].copy().view("<u4")[:, 0]
    stamp_ok = ours & (chk == check_word(flow, seq_u)) & (seq_u < np.uint64(1 << 40))
    return ours, flow, seq_u.astype(np.int64), stamp_ok


def _raw_stamp_offsets(frames: np.ndarray) -> np.ndarray:
    """Where the stamp sits by the raw header bytes (IHL, protocol, TCP data offset), for frames the parser refused."""
    last = frames.shape[1] - 1
    rows = np.arange(frames.shape[0])
    ihl = (frames[:, min(14, last)] & 0x0F).astype(np.int64) * 4
    proto = frames[:, min(23, last)]
    l4 = 14 + ihl
    tcp_hdr = (frames[rows, np.minimum(l4 + 12, last)] >> 4).astype(np.int64) * 4
    return l4 + np.where(proto == 6, tcp_hdr, 8)


@dataclass
class FlowReport:
    received: int
    lost: int
    duplicated: int
    reordered: int
    corrupted: int


@dataclass
class Sink:
    """Per-flow accounting of stamped packets: exact, with a bitmap of seen sequence numbers."""

    max_flows: int = 1 << 16
    cap_bits: int = 1 << 12
    parsed: ParsedBurst = field(default_factory=lambda: ParsedBurst(512))

    def __post_init__(self) -> None:
        self.seen = np.zeros((0, self.cap_bits // 8), np.uint8)
        self.received = np.zeros(0, np.int64)
        self.dups = np.zeros(0, np.int64)
        self.reord = np.zeros(0, np.int64)
        self.max_seq = np.zeros(0, np.int64)
        self.corrupt = np.zeros(0, np.int64)  # damaged arrivals with a readable stamp, per flow
        self.corrupt_first = np.zeros(0, np.int64)  # ... of those, first arrivals of their seq (not lost)
        self.corrupted = 0  # every damaged packet, attributed to a flow or not
        self.not_ours = 0  # frames without our stamp (ARP, stray traffic)
        self.beyond_max_flows = 0  # stamped packets of a flow id >= max_flows (not counted per flow)
        self.corrupt_by_reason: dict[str, int] = {"ip_header": 0, "ip_checksum": 0, "l4_checksum": 0, "stamp": 0, "fill": 0}

    # -- growth ------------------------------------------------------------------------------
    def _ensure(self, max_flow: int, max_seq: int) -> None:
        nf = self.received.size
        if max_flow >= nf:
            if max_flow >= self.max_flows:
                raise ValueError(f"flow id {max_flow} beyond the sink's {self.max_flows} flows")
            new = max(max_flow + 1, nf * 2, 16)
            grow = new - nf
            self.seen = np.vstack([self.seen, np.zeros((grow, self.seen.shape[1]), np.uint8)])
            self.received = np.r_[self.received, np.zeros(grow, np.int64)]
            self.dups = np.r_[self.dups, np.zeros(grow, np.int64)]
            self.reord = np.r_[self.reord, np.zeros(grow, np.int64)]
            self.corrupt = np.r_[self.corrupt, np.zeros(grow, np.int64)]
            self.corrupt_first = np.r_[self.corrupt_first, np.zeros(grow, np.int64)]
            self.max_seq = np.r_[self.max_seq, np.full(grow, -1, np.int64)]
        if max_seq >= self.seen.shape[1] * 8:
            cols = self.seen.shape[1]
            while cols * 8 <= max_seq:
                cols *= 2
            wider = np.zeros((self.seen.shape[0], cols), np.uint8)
            wider[:, : self.seen.shape[1]] = self.seen
            self.seen = wider

    # -- one burst ---------------------------------------------------------------------------
    def verify(self, frames: np.ndarray, lengths: np.ndarray) -> int:
        """Check and count a burst; returns how many packets carried a valid stamp."""
        n = frames.shape[0]
        if n == 0:
            return 0
        pb = self.parsed
        done = 0
        # parse in chunks of the parser's capacity
        while done < n:
            m = min(pb.capacity, n - done)
            self._verify_chunk(frames[done : done + m], lengths[done : done + m])
            done += m
        return n

    def _verify_chunk(self, frames: np.ndarray, lengths: np.ndarray) -> None:
        pb = self.parsed
        n = frames.shape[0]
        parse_burst(frames, lengths, pb, min_ttl=0)
        valid = pb.valid[:n].copy()
        reason = pb.drop_reason[:n]
        # Frames that are not IPv4 or not a protocol we send are strays, not corruption.
        stray = (reason == 3) | (reason == 9) | (reason == 1)
        self.not_ours += int(stray.sum())
        ipbad = ~valid & ~stray
        self.corrupt_by_reason["ip_checksum"] += int((reason == 6).sum())
        self.corrupt_by_reason["ip_header"] += int((ipbad & (reason != 6)).sum())
        self.corrupted += int(ipbad.sum())
        bad_rows = np.flatnonzero(ipbad)
        late_rows = None
        if bad_rows.size:
            # A bad IP header does not make the stamp unreadable: the stamp sits where the raw
            # header bytes say, and the check word decides whether it is still what was sent.
            b_ours, b_flow, b_seq, b_ok = _read_stamps(frames[bad_rows], lengths[bad_rows].astype(np.int64), _raw_stamp_offsets(frames[bad_rows]))
            if b_ok.any():
                late_rows = (bad_rows[b_ok], b_flow[b_ok], b_seq[b_ok])
        idx = np.flatnonzero(valid)
        if idx.size == 0:
            if late_rows is not None:
                self._account(late_rows[1], late_rows[2], np.ones(late_rows[0].size, bool))
            return
        fr = frames[idx]
        proto = pb.proto[idx]
        l4_off = pb.l4_off[idx].astype(np.int64)
        l4_len = pb.l4_len[idx].astype(np.int64)
        s = sum16_rows(fr, l4_off, l4_len)
        not_icmp = proto != 1
        s += np.where(not_icmp, pseudo_header_sum(pb.src[idx], pb.dst[idx], proto, l4_len), 0).astype(np.uint64)
        folded = fold16(s)
        # UDP checksum 0 means "not computed": accept it.
        csum_col = l4_off + np.where(proto == 17, 6, np.where(proto == 6, 16, 2))
        rows = np.arange(idx.size)
        wire_csum = (fr[rows, np.minimum(csum_col, fr.shape[1] - 2)].astype(np.uint16) << 8) | fr[rows, np.minimum(csum_col + 1, fr.shape[1] - 1)]
        l4_ok = (folded == 0xFFFF) | ((proto == 17) & (wire_csum == 0))
        hdr = np.where(proto == 17, 8, np.where(proto == 6, (fr[rows, np.minimum(l4_off + 12, fr.shape[1] - 1)] >> 4).astype(np.int64) * 4, 8))
        so = l4_off + hdr
        lens = lengths[idx].astype(np.int64)
        ours, flow, seq, stamp_ok = _read_stamps(fr, lens, so)
        if not ours.all():
            # A valid packet without our stamp is a stray unless its checksum is bad.
            stray2 = ~ours & l4_ok
            self.not_ours += int(stray2.sum())
            bad_stamp = ~ours & ~l4_ok
            self.corrupted += int(bad_stamp.sum())
            self.corrupt_by_reason["l4_checksum"] += int(bad_stamp.sum())
            keep = ours
            fr, l4_ok, so, lens, flow, seq, stamp_ok, idx = fr[keep], l4_ok[keep], so[keep], lens[keep], flow[keep], seq[keep], stamp_ok[keep], idx[keep]
            if flow.size == 0:
                if late_rows is not None:
                    self._account(late_rows[1], late_rows[2], np.ones(late_rows[0].size, bool))
                return
        # Fill pattern after the stamp: (flow*7 + offset-in-payload) & 0xFF.
        plen = lens - so
        width = int(plen.max())
        k = np.arange(STAMP_LEN, width)
        fcols = np.minimum(so[:, None] + k[None, :], fr.shape[1] - 1)
        fill = np.take_along_axis(fr, fcols, axis=1)
        expect = ((k[None, :] + flow[:, None] * 7) & 0xFF).astype(np.uint8)
        in_len = k[None, :] < plen[:, None]
        fill_ok = ((fill == expect) | ~in_len).all(axis=1)
        good = l4_ok & stamp_ok & fill_ok
        nbad = int((~good).sum())
        if nbad:
            self.corrupted += nbad
            self.corrupt_by_reason["l4_checksum"] += int((~l4_ok).sum())
            self.corrupt_by_reason["stamp"] += int((l4_ok & ~stamp_ok).sum())
            self.corrupt_by_reason["fill"] += int((l4_ok & stamp_ok & ~fill_ok).sum())
        # Every readable stamp is an arrival; the damaged ones count as corrupted, not received.
        rows, flow, seq, damaged = idx[stamp_ok], flow[stamp_ok], seq[stamp_ok], ~good[stamp_ok]
        if late_rows is not None:
            # Merge the readable packets with bad IP headers back in arrival order (reordering depends on it).
            rows = np.r_[rows, late_rows[0]]
            order = np.argsort(rows, kind="stable")
            flow = np.r_[flow, late_rows[1]][order]
            seq = np.r_[seq, late_rows[2]][order]
            damaged = np.r_[damaged, np.ones(late_rows[0].size, bool)][order]
        self._account(flow, seq, damaged)

    def _account(self, flow: np.ndarray, seq: np.ndarray, damaged: np.ndarray | None = None) -> None:
        """Count arrivals of (flow, seq); ``damaged`` marks corrupted ones (default: all intact)."""
        if flow.size == 0:
            return
        beyond = flow >= self.max_flows
        if beyond.any():
            # A stamp of a flow this sink was not sized for: say so instead of failing the run.
            self.beyond_max_flows += int(beyond.sum())
            keep = ~beyond
            flow, seq = flow[keep], seq[keep]
            damaged = None if damaged is None else damaged[keep]
            if flow.size == 0:
                return
        self._ensure(int(flow.max()), int(seq.max()))
        n = flow.size
        intact = np.ones(n, bool) if damaged is None else ~damaged
        byte = seq >> 3
        bit = (1 << (seq & 7)).astype(np.uint8)
        # Duplicates: already seen, or repeated within this burst.
        already = (self.seen[flow, byte] & bit) != 0
        key = flow * (1 << 40) + seq
        order = np.argsort(key, kind="stable")
        sk = key[order]
        rep = np.zeros(n, bool)
        rep[order[1:]] = sk[1:] == sk[:-1]
        dup = already | rep
        # Reordered: below the highest seq this flow had seen before it (in arrival order).
        forder = np.argsort(flow, kind="stable")
        fk = key[forder]
        prior = np.maximum.accumulate(fk)
        prior_shift = np.r_[-1, prior[:-1]]
        prev_key = flow[forder] * (1 << 40) + self.max_seq[flow[forder]]
        prior_best = np.maximum(prior_shift, prev_key)
        late = np.zeros(n, bool)
        late[forder] = fk < prior_best
        fresh = ~dup
        np.add.at(self.dups, flow[dup], 1)
        np.add.at(self.reord, flow[late & fresh & intact], 1)
        np.add.at(self.received, flow[fresh & intact], 1)
        if damaged is not None and damaged.any():
            np.add.at(self.corrupt, flow[damaged], 1)
            np.add.at(self.corrupt_first, flow[fresh & damaged], 1)
        np.bitwise_or.at(self.seen, (flow[fresh], byte[fresh]), bit[fresh])
        np.maximum.at(self.max_seq, flow, seq)

    def lost_so_far(self) -> int:
        """Sequence gaps below each flow's highest seq seen (the live figure; ``report`` is exact)."""
        if self.received.size == 0:
            return 0
        return int(np.maximum(self.max_seq + 1 - self.received - self.corrupt_first, 0).sum())

    # -- results -----------------------------------------------------------------------------
    def report(self, sent: np.ndarray | None = None, first_id: int = 0) -> dict:
        """Totals and per-flow figures; ``sent`` (per flow, from the generator) makes loss exact."""
        nf = self.received.size
        if sent is not None:
            sent = np.asarray(sent, np.int64)
            total_flows = max(nf, first_id + sent.size)
            exp = np.zeros(total_flows, np.int64)
            exp[first_id : first_id + sent.size] = sent
        else:
            total_flows = nf
            exp = self.max_seq + 1
        rec = np.zeros(total_flows, np.int64)
        rec[:nf] = self.received
        arrived_bad = np.zeros(total_flows, np.int64)
        arrived_bad[:nf] = self.corrupt_first
        corrupt = np.zeros(total_flows, np.int64)
        corrupt[:nf] = self.corrupt
        lost = np.maximum(exp - rec - arrived_bad, 0)
        flows = []
        for f in np.flatnonzero((exp > 0) | (rec > 0) | (corrupt > 0)):
            f = int(f)
            flows.append({"flow": f, "expected": int(exp[f]), "received": int(rec[f]), "lost": int(lost[f]),
                          "duplicated": int(self.dups[f]) if f < nf else 0, "reordered": int(self.reord[f]) if f < nf else 0,
                          "corrupted": int(corrupt[f])})
        attributed = int(corrupt.sum())
        return {
            "received": int(rec.sum()),
            "expected": int(exp.sum()),
            "lost": int(lost.sum()),
            "duplicated": int(self.dups.sum()),
            "reordered": int(self.reord.sum()),
            "corrupted": int(self.corrupted),
            "corrupted_unattributed": int(self.corrupted) - attributed,
            "corrupted_by_reason": dict(self.corrupt_by_reason),
            "not_ours": int(self.not_ours),
            "beyond_max_flows": int(self.beyond_max_flows),
            "exact_loss": sent is not None,
            "flows": flows,
        }
