"""Online v1 -> v2 session-table migration under a live writer process, the swap-time
delta, and rollback v2 -> v1 after more writes in v2."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from hotplane.schema import registry
from hotplane.schema.session import LAYOUT, LAYOUT_V2, USED, VALUE_DTYPE, VALUE_DTYPE_V2
from hotplane.schema.session_migrations import migrate_v1_to_v2, v1_to_v2_records, v2_to_v1_records
from hotplane.shared.session_migrate import NotQuiescent, OnlineMigration, SessionTableV2, attach_any
from hotplane.shared.session_table import SessionTable

CTX = mp.get_context("fork")
# control words: 0 stop, 1 stopped (ack), 2 batches written, 3 error
STOP, ACK, BATCHES, ERR = 0, 1, 2, 3


def shared(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    mm = mmap.mmap(-1, nbytes)  # anonymous MAP_SHARED, page aligned: survives fork
    return mm, np.frombuffer(mm, np.uint8)


def keys(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 2**63, n, dtype=np.uint64), rng.integers(1, 2**63, n, dtype=np.uint64)


def _writer(buf: np.ndarray, ctl: np.ndarray, universe: int, seed: int, pause: float) -> None:
    """The old worker: inserts, updates (touch), deletes on the v1 table until told to stop."""
    try:
        t = attach_any(buf, writer=True)  # a v1 or a v2 table
        k0, k1 = keys(universe, 1)
        rng = np.random.default_rng(seed)
        v = np.zeros(64, VALUE_DTYPE)
        while not ctl[STOP]:
            pick = rng.integers(0, universe, 64)
            op = rng.integers(0, 3)
            if op == 0:
                v["packets"] = rng.integers(1, 100, 64)
                v["bytes"] = rng.integers(60, 1500, 64)
                v["xport"] = rng.integers(1024, 65535, 64)
                t.insert_batch(k0[pick], k1[pick], v)
            elif op == 1:
                slots = np.empty(64, np.int64)
                hits = t.lookup_batch(k0[pick], k1[pick], slots, np.empty(64, np.bool_))
                t.touch_batch(np.where(hits, slots, -1), int(time.time()), 100)
            else:
                t.delete_batch(k0[pick[:16]], k1[pick[:16]])
            ctl[BATCHES] += 1
            if pause:
                time.sleep(pause)
        t.release()
        ctl[ACK] = 1
    except BaseException:  # pragma: no cover - reported to the test
        ctl[ERR] = 1
        ctl[ACK] = 1
        raise


@pytest.fixture
def writer_proc(request):
    procs = []

    def start(buf, ctl, universe, seed=5, pause=0.0002):
        p = CTX.Process(target=_writer, args=(buf, ctl, universe, seed, pause), daemon=True)
        p.start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)


def _prefill(t: SessionTable, n: int) -> tuple[np.ndarray, np.ndarray]:
    k0, k1 = keys(n, 1)
    v = np.zeros(n, VALUE_DTYPE)
    v["packets"] = 1
    v["bytes"] = np.arange(n) % 1500 + 60
    v["xaddr"] = 0xC6120001
    t.insert_batch(k0, k1, v)
    return k0, k1


def _stop_writer(mig: OnlineMigration, ctl: np.ndarray, p, timeout: float = 20.0) -> None:
    """Like the swap: the old worker stops at a burst boundary while the candidate keeps tracking."""
    ctl[STOP] = 1
    t_end = time.monotonic() + timeout
    while not ctl[ACK]:
        mig.track()
        assert time.monotonic() < t_end, "writer did not stop"
    p.join(10)
    assert ctl[ERR] == 0, "writer process failed"


def run_migration(n: int, writer_proc, *, track_for: float = 0.3):
    cap = 1 << max(10, int(np.ceil(np.log2(n / 0.5))))  # load <= 0.5
    mm1, b1 = shared(SessionTable.zone_size(cap))
    mm2, b2 = shared(SessionTableV2.zone_size(cap))
    mmc, cb = shared(4096)
    ctl = cb[:64].view(np.uint64)
    t = SessionTable.create(b1, cap, seed=11)
    k0, k1 = _prefill(t, n)
    t.release()
    p = writer_proc(b1, ctl, universe=int(n * 1.2))
    while ctl[BATCHES] < 5:
        time.sleep(0.001)
    before = int(ctl[BATCHES])
    mig = OnlineMigration(b1, b2, to_version=2, create=True)
    ahead = mig.copy_ahead()
    during = int(ctl[BATCHES]) - before
    t_end = time.monotonic() + track_for
    while time.monotonic() < t_end:  # the candidate spins on the ownership word
        mig.track()
        if mig.covered:
            mig.catch_up()
        else:
            mig.copy_ahead(max_passes=1)  # a missed batch: a new full pass re-establishes coverage
    _stop_writer(mig, ctl, p)
    res = mig.finish()
    return mig, res, ahead, during, (mm1, b1, mm2, b2, mmc, ctl, k0, k1)


def test_records_round_trip_and_layouts_differ():
    assert LAYOUT.layout_hash != LAYOUT_V2.layout_hash and LAYOUT_V2.version == 2 and LAYOUT_V2.schema_id == 4
    assert registry.compatibility(4, 1, LAYOUT.layout_hash) == "needs migration"
    assert registry.compatibility(4, 2, LAYOUT_V2.layout_hash) == "compatible"
    assert registry.migration(4, 1, 2) is migrate_v1_to_v2 and registry.migration(4, 2, 1)
    from hotplane.schema.session import ELEMENT

    a = np.zeros(100, ELEMENT)
    a["seq"] = np.arange(100) * 2
    a["state"] = USED
    a["key0"] = np.arange(100) + 7
    a["bytes"] = 1234
    b = v1_to_v2_records(a)
    assert (b["bytes_in"] == 0).all() and (b["qos_class"] == 0).all() and (b["bytes"] == 1234).all() and (b["seq"] == a["seq"]).all()
    b["bytes_in"] = 5
    b["qos_class"] = 3
    back = v2_to_v1_records(b)
    assert back.tobytes() == a.tobytes()


def test_whole_zone_migration_of_a_quiescent_table():
    cap = 1 << 12
    mm1, b1 = shared(SessionTable.zone_size(cap))
    mm2, b2 = shared(SessionTableV2.zone_size(cap))
    t = SessionTable.create(b1, cap, seed=3)
    k0, k1 = _prefill(t, 2000)
    t.delete_batch(k0[:300], k1[:300])
    n = registry.migration(4, 1, 2)(b1, b2)
    assert n == t.count == 1700
    t2 = attach_any(b2, writer=True)
    assert isinstance(t2, SessionTableV2) and t2.audit() == []
    idx, rec, hits = t2.lookup_consistent(k0[300:], k1[300:])
    assert hits.all() and (rec["bytes"] == (np.arange(300, 2000) % 1500 + 60)).all()


def test_v2_table_counts_bytes_in_per_direction():
    cap = 1 << 10
    mm, b = shared(SessionTableV2.zone_size(cap))
    t = SessionTableV2.create(b, cap)
    k0, k1 = keys(10, 2)
    v = np.zeros(10, VALUE_DTYPE_V2)
    v["qos_class"] = 2
    idx = t.insert_batch(k0, k1, v)
    t.touch_batch(np.concatenate([idx, idx]), 5, 100, inbound=np.r_[np.zeros(10, bool), np.ones(10, bool)])
    _, rec, hits = t.lookup_consistent(k0, k1)
    assert hits.all() and (rec["bytes"] == 200).all() and (rec["bytes_in"] == 100).all() and (rec["qos_class"] == 2).all()
    assert t.audit() == []


def test_finish_refuses_while_the_source_writer_runs(writer_proc):
    cap = 1 << 12
    mm1, b1 = shared(SessionTable.zone_size(cap))
    mm2, b2 = shared(SessionTableV2.zone_size(cap))
    mmc, cb = shared(4096)
    ctl = cb[:64].view(np.uint64)
    t = SessionTable.create(b1, cap)
    _prefill(t, 1000)
    t.release()
    p = writer_proc(b1, ctl, 1200)
    while ctl[BATCHES] < 2:
        time.sleep(0.001)
    mig = OnlineMigration(b1, b2, to_version=2, create=True)
    mig.copy_ahead()
    with pytest.raises(NotQuiescent):
        mig.finish()
    _stop_writer(mig, ctl, p)
    mig.finish()
    assert mig.differences() == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [10_000, 100_000, 1_000_000])
def test_live_migration_delta_and_rollback(n, writer_proc):
    mig, res, ahead, during, (mm1, b1, mm2, b2, mmc, ctl, k0, k1) = run_migration(n, writer_proc)
    assert during > 0, "the writer made no writes while the copy ran ahead: the test proves nothing"
    assert mig.differences() == []
    t1 = SessionTable.attach(b1)
    assert res.count == t1.count
    print(f"\n[session_migrate] n={n:>9,} capacity={mig.capacity:>9,} ahead={ahead['copied']:,} copied in {ahead['passes']} pass(es), "
          f"writer batches during copy-ahead={during}, delta mode={res.mode} compared={res.compared:,} copied={res.copied:,} pause={res.pause_ns / 1e6:.3f} ms")

    # The candidate now writes v2 (it owns the queues); then a rollback copies back into v1.
    t2 = mig.table()
    nk0, nk1 = keys(500, 99)
    v = np.zeros(500, VALUE_DTYPE_V2)
    v["bytes"] = 777
    v["qos_class"] = 1
    t2.insert_batch(nk0, nk1, v)
    t2.delete_batch(k0[:200], k1[:200])
    idx, _, hits = t2.lookup_consistent(k0[200:400], k1[200:400])
    t2.touch_batch(idx[hits], 9, 64, inbound=True)
    t2.release()
    rev = OnlineMigration(b2, b1, to_version=1, create=False)
    rev.copy_ahead()
    back = rev.finish()
    assert rev.differences() == []
    t1w = SessionTable.attach(b1, writer=True)
    assert t1w.audit() == []
    assert t1w.count == t2.count
    _, rec, hits = t1w.lookup_consistent(nk0, nk1)
    assert hits.all() and (rec["bytes"] == 777).all()
    _, _, gone = t1w.lookup_consistent(k0[:200], k1[:200])
    assert not gone.any()
    print(f"[session_migrate] rollback n={n:,}: mode={back.mode} copied ahead={back.ahead_copied:,} delta={back.copied:,} pause={back.pause_ns / 1e6:.3f} ms")
    del t1, t2, t1w, mig, rev
    for m in (mm1, mm2, mmc):
        try:
            m.close()
        except BufferError:
            pass


def test_dead_writer_mid_batch_is_recovered_before_the_delta():
    cap = 1 << 12
    mm1, b1 = shared(SessionTable.zone_size(cap))
    mm2, b2 = shared(SessionTableV2.zone_size(cap))
    t = SessionTable.create(b1, cap)
    k0, k1 = _prefill(t, 1000)
    t.release()
    mig = OnlineMigration(b1, b2, to_version=2, create=True)
    mig.copy_ahead()

    def die_mid_write():
        w = SessionTable.attach(b1, writer=True)

        def hook(stage):
            if stage == "field:bytes":
                os._exit(0)  # SIGKILL-like: no cleanup, entries left odd

        w._pause_hook = hook
        v = np.zeros(10, VALUE_DTYPE)
        v["bytes"] = 5
        w.insert_batch(k0[:10], k1[:10], v)

    p = CTX.Process(target=die_mid_write)
    p.start()
    p.join(20)
    assert p.exitcode == 0
    with pytest.raises(NotQuiescent):
        mig.finish(recover=False)
    res = mig.finish()
    assert res.mode == "full" and res.recovered > 0
    assert mig.differences() == []


# --------------------------------------------------------------------------- a worker's zones: live table, hand-over


class _Zone:
    def __init__(self, name, layout, view):
        self.name, self.schema_id, self.version, self.layout_hash, self.view = name, layout.schema_id, layout.version, layout.layout_hash, view


class _Directory:
    """The memzone directory calls the zone code uses (lookup, list, reserve_or_lookup), over shared buffers."""

    def __init__(self) -> None:
        self.zones: dict[str, _Zone] = {}
        self.maps: list = []

    def lookup(self, name):
        return self.zones.get(name)

    def list(self):
        return list(self.zones.values())

    def reserve_or_lookup(self, name, length, layout):
        if name in self.zones:
            return self.zones[name], False
        mm, buf = shared(length)
        self.maps.append(mm)
        z = self.zones[name] = _Zone(name, layout, buf)
        return z, True


def _worker_zone(d: _Directory, n: int, cap: int = 1 << 13):
    z, _ = d.reserve_or_lookup("nat.w0.in2out", SessionTable.zone_size(cap), LAYOUT)
    t = SessionTable.create(z.view, cap, seed=5)
    k = _prefill(t, n)
    t.release()
    return z, k


def test_the_live_table_is_the_last_activated_and_readers_follow_it():
    from hotplane.shared.session_migrate import TableHandover, activation, attach_live, live_table_zone, table_verdicts

    d = _Directory()
    z1, (k0, k1) = _worker_zone(d, 300)
    assert live_table_zone(d, 0) == (z1, 1) and activation(z1.view) == 0
    assert table_verdicts(d, 2) == {"nat.w0.in2out": "needs migration"}
    assert table_verdicts(d, 2, migrates=False) == {"nat.w0.in2out": "compatible"}  # a reader of both versions
    h = TableHandover(d, 0, 2)
    h.copy_ahead()
    h.finish()
    # Filled and finished, not yet activated: nothing anyone reads has changed.
    assert live_table_zone(d, 0)[0] is z1
    h.activate()
    z2, v = live_table_zone(d, 0)
    assert (z2.name, v, activation(z2.view)) == ("nat.w0.in2out.v2", 2, 1)
    assert isinstance(attach_live(d, 0), SessionTableV2) and attach_live(d, 0).count == 300
    verdicts = table_verdicts(d, 2)
    assert verdicts["nat.w0.in2out.v2"] == "compatible" and verdicts["nat.w0.in2out"].startswith("superseded: not in use")
    assert table_verdicts(d, 1)["nat.w0.in2out.v2"] == "needs migration"
    # Back (a rollback, or a later upgrade to a version-1 build): the v1 zone becomes live again.
    back = TableHandover(d, 0, 1, reuse=True)
    assert not back.created  # a past image of the same sessions: only the delta moves
    back.copy_ahead()
    back.finish()
    back.activate()
    assert live_table_zone(d, 0) == (z1, 1) and activation(z1.view) == 2


def test_forward_handover_under_a_live_writer_then_reverse_moves_only_the_delta(writer_proc):
    from hotplane.shared.session_migrate import TableHandover, live_table_zone

    d = _Directory()
    z1, (k0, k1) = _worker_zone(d, 3000)
    mmc, cb = shared(4096)
    ctl = cb[:64].view(np.uint64)
    p = writer_proc(z1.view, ctl, 3600)  # the old worker, forwarding
    while ctl[BATCHES] < 3:
        time.sleep(0.001)
    h = TableHandover(d, 0, 2)
    h.copy_ahead()
    # The candidate's pipeline on the copy: its per-host session counts follow every later copy.
    from hotplane.secondary.nat_pipeline import NatPipeline, private_zones
    from hotplane.shared.nat_clock import ManualClock
    from hotplane.shared.nat_config import default_config

    zones = private_zones(default_config(), 0, ManualClock(1), table_capacity=1 << 10)
    zones["in2out"] = h.reader()
    pipe = NatPipeline(default_config(), 0, zones, ManualClock(1))
    seen = []

    def on_copy(old, new):
        seen.append(len(new))
        pipe.adjust_host_counts(old, new)

    h.mig.on_copy = on_copy
    t_end = time.monotonic() + 0.3
    while time.monotonic() < t_end:  # the candidate's poll loop
        h.poll()
    h.poll(armed=True)
    _stop_writer(h.mig, ctl, p)  # the swap: the old worker releases the table
    res = h.finish()
    assert h.mig.differences() == [] and res.count == SessionTable.attach(z1.view).count
    assert seen, "the copies made after copy_ahead were reported (the per-host counts follow them)"
    tracked = dict(pipe._host_sessions)
    pipe._rebuild_host_counts()
    assert tracked == pipe._host_sessions and tracked, "counts kept through the copies == a recount of the table"
    h.activate()
    # The candidate writes the v2 table for a while, then a rollback copies back only what changed.
    t2 = SessionTableV2.attach(h.dst_zone.view, writer=True)
    nk0, nk1 = keys(40, 77)
    t2.insert_batch(nk0, nk1, np.zeros(40, VALUE_DTYPE_V2))
    t2.release()
    e1, e2 = SessionTable.attach(z1.view).entries, t2.entries
    changed = int(np.count_nonzero((e1["seq"] != e2["seq"]) | (e1["state"] != e2["state"])))
    assert 0 < changed <= 40
    back = TableHandover(d, 0, 1, reuse=True)
    back.copy_ahead()
    r = back.finish()
    assert back.mig.ahead_copied + r.copied == changed, (back.mig.ahead_copied, r.copied, changed)
    assert back.mig.differences() == []
    back.activate()
    assert live_table_zone(d, 0)[1] == 1
    _, _, hits = SessionTable.attach(z1.view).lookup_consistent(nk0, nk1)
    assert hits.all()


def test_a_worker_starting_migrates_a_stopped_tables_sessions_and_refuses_a_live_writer(writer_proc):
    from hotplane.shared.session_migrate import live_table_zone, worker_table

    d = _Directory()
    z1, (k0, k1) = _worker_zone(d, 500)
    t = worker_table(d, 0, 2, writer=True)  # a v2 worker starting on a v1 instance
    assert isinstance(t, SessionTableV2) and t.is_writer and t.count == 500 and live_table_zone(d, 0)[1] == 2
    _, _, hits = t.lookup_consistent(k0, k1)
    assert hits.all()
    with pytest.raises(registry.SchemaError):
        worker_table(d, 0, 1, writer=False)  # a v1 candidate never reads a v2 table as its own
    # A v1 worker starting while the v2 writer is alive (it must have stopped first): refused.
    mmc, cb = shared(4096)
    ctl = cb[:64].view(np.uint64)
    t.release()
    p = writer_proc(live_table_zone(d, 0)[0].view, ctl, 600)
    while ctl[BATCHES] < 1:
        time.sleep(0.001)
    # The v1 zone is this worker's own (a past image), the v2 writer still runs.
    with pytest.raises(NotQuiescent):
        worker_table(d, 0, 1, writer=True).release()
    ctl[STOP] = 1
    p.join(10)
    t1 = worker_table(d, 0, 1, writer=True)
    assert live_table_zone(d, 0)[1] == 1 and t1.count == SessionTableV2.attach(d.lookup("nat.w0.in2out.v2").view).count
    assert t1.audit() == []


def test_a_v2_pipeline_counts_the_reply_directions_bytes_per_session():
    """NAT on a version-2 table keeps ``bytes_in`` for real: bytes received on the outside port."""
    from hotplane.secondary.nat_pipeline import INSIDE, OUTSIDE, NatPipeline, private_zones
    from hotplane.shared.nat_clock import ManualClock
    from hotplane.shared.nat_config import default_config
    from hotplane.shared.packet import build_arp_reply, build_ipv4_udp, parse_frame

    cfg = default_config()
    clock = ManualClock(100)
    zones = private_zones(cfg, 0, clock, table_capacity=1 << 12)
    cap = 1 << 12
    mm, b = shared(SessionTableV2.zone_size(cap))
    zones["in2out"] = SessionTableV2.create(b, cap, seed=1)
    p = NatPipeline(cfg, 0, zones, clock)
    gw_in, gw_out = p.own_mac
    host, peer = bytes.fromhex("020000aa0001"), bytes.fromhex("020000aa0002")
    inside, remote = p.own_ip[0] + 1, p.own_ip[1] + 1

    def burst(frames):
        buf = np.zeros((len(frames), 256), np.uint8)
        for i, f in enumerate(frames):
            buf[i, : len(f)] = np.frombuffer(f, np.uint8)
        return buf, np.array([len(f) for f in frames], np.uint32), np.ones(len(frames), bool)

    out = [build_ipv4_udp(host, gw_in, inside, remote, 30000 + i, 53, b"q" * 10) for i in range(4)]
    frames, lengths, valid = burst(out)
    p.process(INSIDE, frames, lengths, valid)
    p.process(OUTSIDE, *burst([build_arp_reply(peer, remote, gw_out, p.own_ip[1])]))
    frames, lengths, valid = burst(out)
    sent, _ = p.process(INSIDE, frames, lengths, valid)
    replies = []
    for i in sent.tolist():
        r = parse_frame(frames[i, : int(lengths[i])].tobytes())
        replies.append(build_ipv4_udp(peer, gw_out, int(r["dst"]), int(r["src"]), int(r["dport"]), int(r["sport"]), b"r" * 100))
    assert len(replies) == 4
    p.process(OUTSIDE, *burst(replies))
    p.process(INSIDE, *burst([build_arp_reply(host, inside, gw_in, p.own_ip[0])]))
    p.process(OUTSIDE, *burst(replies))
    p.flush()
    e = p.in2out.entries
    live = (e["state"] == USED) & (e["flags"] == 0)
    assert live.sum() == 4
    out_ip, in_ip = 20 + 8 + 10, 20 + 8 + 100  # IPv4 total lengths
    assert (e["bytes_in"][live] == 2 * in_ip).all(), e["bytes_in"][live]
    assert (e["bytes"][live] - e["bytes_in"][live] == 2 * out_ip).all(), (e["bytes"][live], e["bytes_in"][live])
