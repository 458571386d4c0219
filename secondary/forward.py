"""The L3 forward pipeline: what a worker does to a burst when it routes without NAT.

Parse, drop what is not forwardable (by reason), decrement TTL with an
incremental checksum update, rewrite the MACs for the next hop. Whole bursts,
numpy only: no per-packet Python.
"""

from __future__ import annotations

import numpy as np

from hotplane.schema.counters import DROP_REASONS, N_REASONS
from hotplane.shared.packet import DropReason, ParsedBurst, decrement_ttl, parse_burst, rewrite_macs


def _reason_index(name: str) -> int:
    return DROP_REASONS.index(name) if name in DROP_REASONS else DROP_REASONS.index("other")


#: packet.DropReason code -> index in the workers' drop counters.
PACKET_TO_COUNTER = np.array(
    [_reason_index(n) for n in (
        "other",  # OK never counts as a drop
        "runt", "oversized", "not_ipv4", "truncated", "bad_ip_header", "bad_ip_checksum",
        "fragment", "ttl_expired", "unsupported_protocol", "malformed_l4",
    )],
    dtype=np.intp,
)
#: burst.RX_REASONS (runt, oversized, truncated, bad_descriptor) -> counter index.
RX_TO_COUNTER = np.array([_reason_index(n) for n in ("runt", "oversized", "truncated", "bad_descriptor")], np.intp)


class ForwardPipeline:
    """Route both directions: inside -> outside next hop and back, MACs from config."""

    def __init__(self, macs: dict[str, bytes], capacity: int = 512) -> None:
        # (src, dst) MACs for frames leaving on each side.
        self.out_macs = (macs["outside_gw"], macs["outside_peer"])
        self.in_macs = (macs["inside_gw"], macs["inside_peer"])
        self.pb = ParsedBurst(capacity)
        self.drops = np.zeros(N_REASONS, np.int64)
        self.forwarded = 0
        self.punted = 0
        self.emit: list[tuple[int, bytes]] = []
        self._none = np.zeros(0, np.intp)

    def tick(self, now: float) -> None:
        """Nothing ages in a plain forwarder."""

    def process(self, direction: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rewrite a burst in place; returns (to_other, to_same) row indices. Drops go to ``self.drops``.

        ``direction`` 0 = inside -> outside, 1 = outside -> inside.
        """
        idx = self._route(direction, frames, lengths, valid)
        self.forwarded = int(idx.size)
        return idx, self._none

    def _route(self, direction: int, frames: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> np.ndarray:
        pb = self.pb
        parse_burst(frames, lengths, pb)
        n = lengths.shape[0]
        ok = pb.valid[:n]
        ok &= valid
        if not ok.all():
            bad = ~ok & valid  # invalid descriptors were counted by the burst engine
            if bad.any():
                np.add.at(self.drops, PACKET_TO_COUNTER[pb.drop_reason[:n][bad]], 1)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return idx
        expired = decrement_ttl(frames, pb, idx)
        if expired.size:
            self.drops[_reason_index("ttl_expired")] += expired.size
            idx = np.flatnonzero(pb.valid[:n] & valid)
        src, dst = self.out_macs if direction == 0 else self.in_macs
        rewrite_macs(frames, pb, idx, src, dst)
        return idx
