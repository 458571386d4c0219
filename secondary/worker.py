"""The worker: polls queue N of the inside and the outside port and runs the pipeline on bursts.

``hotplane worker [EAL] -- --id N [--busy-poll] [--json] [--candidate]``

Run to completion, as a DPDK lcore does: receive a burst, process it with
numpy, transmit it with one doorbell, hand the slots back. The queues'
cursors and ownership words live in shared memory, so a replacement worker
continues exactly where this one stopped, and a worker whose ownership word
was taken (fenced) stops polling at once and exits without touching the
queue again.

Hot upgrade (issue 6, ``supervisor/upgrade.py`` drives it)
---------------------------------------------------------
Every worker serves an upgrade control socket,
``<runtime>/upgrade/w<pid>.sock`` (a thread; the poll loop sees a command
with one load per iteration, at a burst boundary). Requests:

* ``release {queue}``: one last burst (what arrived meanwhile), stop polling
  and ticking (TX is already flushed: every burst rings its doorbell), give
  up the session tables' writer role, then release both ownership words (a
  unit's queues move together: the session tables do). Stamps
  ``old_last_burst_ns``, ``released_ns`` and ``old_token`` in
  ``upgrade_control``. The worker stays parked: alive, not polling, not
  beating, until told otherwise.
* ``arm {queue}``: start spinning on the word now and answer at once (the
  supervisor orders the old owner's release only once its successor spins).
* ``claim {queue, force}``: armed, spin on the ownership word and claim it
  the moment its owner pid reads 0 (``force``: claim now, the generation
  fences whoever held it). Once the worker holds all its queues it takes the
  session tables' writer role (finishing a migration first) and polls.
  Replies when the claim landed. Used by the candidate of an upgrade and by
  the parked old worker of a rollback.
* ``park`` / ``commit``: acknowledged; ``exit``: leave without touching the
  queues (or release them cleanly when still owned); ``status``.

``--candidate`` starts parked: attach, validate every zone against this
build's schema registry, migrate the session tables if this build's layout
differs (``HOTPLANE_SESSION_VERSION``), warm up, report each step to the
supervisor (``candidate_report``), then wait for ``claim``.

Session-table migration (``shared/session_migrate.TableHandover``): a
candidate whose build writes another layout version copies the old worker's
live table into its version's zone ahead of the swap (``migrated``), follows
the old writer's journal from its parked loop, runs the delta once the old
worker has let go of the table (before claiming: its words read free only
after that), and makes the copy the live table inside its first pass holding
both queues. A parked old worker told to claim while another version's table
is live (a rollback after a migration) copies it back into its own table
the same way. A worker starting while another version's table is live (its
writer gone) migrates it at start (``session_table_for``).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import threading
import time

import numpy as np

from hotplane import __version__
from hotplane.schema.counters import WORKER_COUNTERS
from hotplane.shared.af_packet import collect_kernel_drops
from hotplane.secondary.burst_pass import run_burst
from hotplane.shared import burst_journal
from hotplane.shared.burst import tx_burst
from hotplane.shared.counters import CounterBlocks
from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit
from hotplane.shared.instance import InstanceError, eal_init
from hotplane.shared.queue_owner import QueueBusy, claim, enter, leave, owner_word, release, still_mine
from hotplane.shared.ready import report_ready

EXIT_FENCED = 3  # another process owns our queue now: exit without touching it

MAX_BURST = 512  # --burst limit (the burst journal counts to 1023)
IDLE_SLEEP_MIN = 20e-6
LIGHT_PASS = 8  # frames in a pass below which the traffic counts as light (see Worker.run)
IDLE_SLEEP_MAX = 2e-3  # an idle worker wakes 500 times a second at most (a light one: about that)
TICK_INTERVAL = 0.01
PARKED_WAIT = 0.05  # longest sleep of a parked worker between looks at its stop flag


def _mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def primary_config(inst, timeout: float = 30.0) -> dict:
    """Ask the primary for the instance configuration, retrying while it (re)starts."""
    from hotplane.shared.ipc import IpcError, request_sync

    path = str(inst.runtime_dir / "primary.sock")
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return request_sync(path, "config", timeout=5.0).result
        except (IpcError, OSError) as e:
            if time.monotonic() > deadline:
                raise InstanceError(f"the primary of instance {inst.prefix!r} does not answer on {path}: {e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def af_packet_fds(inst):
    """A function fetching an af_packet queue's socket from the primary."""
    from hotplane.shared.ipc import request_sync

    def fetch(spec: str, qid: int):
        reply = request_sync(str(inst.runtime_dir / "primary.sock"), "af_packet_queue", {"port": spec, "queue": qid}, timeout=10.0)
        if len(reply.fds) != 1:
            raise InstanceError(f"primary sent {len(reply.fds)} fds for {spec}#{qid}")
        return reply.fds[0], reply.result["ring_params"]

    return fetch


def make_pipeline(cfg: dict, worker_id: int, inst, in2out=None):
    """The pipeline the instance is configured for (``in2out``: the NAT session table object to use)."""
    kind = cfg.get("pipeline", "forward")
    if kind == "forward":
        from hotplane.secondary.forward import ForwardPipeline

        return ForwardPipeline({k: _mac(v) for k, v in cfg["macs"].items()})
    if kind == "nat":
        from hotplane.secondary.nat_pipeline import build_pipeline

        return build_pipeline(cfg, worker_id, inst) if in2out is None else build_pipeline(cfg, worker_id, inst, in2out=in2out)
    raise InstanceError(f"unknown pipeline {kind!r}")


QUEUE_SIDES = ("inside", "outside")


def control_socket_path(runtime_dir, pid: int):
    """Where worker ``pid`` serves its upgrade control socket."""
    from pathlib import Path

    return Path(runtime_dir) / "upgrade" / f"w{pid}.sock"


class _ReadersOnly:
    """Build a pipeline without taking its session tables' writer role (a candidate's view).

    ``primary/nat_zones.attach_nat_zones`` attaches the tables as writer; a candidate
    may not write while the old worker runs (one writer per table). Until the pipeline
    offers ``suspend()``/``resume()`` and the zones a ``writer=False``, the tables that
    asked for the writer role are attached as readers and remembered, so that
    :meth:`Worker.resume_tables` takes the role at the swap.
    """

    def __enter__(self):
        from hotplane.shared.session_table import SessionTable

        self.cls = SessionTable
        self.orig = SessionTable.__dict__["attach"]
        self.wanted: list = []
        orig_fn = self.orig.__func__
        wanted = self.wanted

        def attach(cls, buf, *, writer=False, force=False, recover=True):
            t = orig_fn(cls, buf, writer=False)
            if writer:
                wanted.append(t)
            return t

        SessionTable.attach = classmethod(attach)
        return self

    def __exit__(self, *exc):
        self.cls.attach = self.orig
        return False


class Worker:
    """One worker's state: its two queues, its counter block, its pipeline, its upgrade role."""

    def __init__(self, inst, cfg: dict, worker_id: int, *, candidate: bool = False, handover=None) -> None:
        from hotplane.shared.ports import port_queue

        self.inst = inst
        self.id = worker_id
        self.candidate = candidate
        from_primary = af_packet_fds(inst)
        # (port, queue) -> (fd, ring params) of the af_packet sockets this worker holds: a
        # restarted primary takes copies back (primary/afp_reclaim.py), so the kernel keeps
        # steering into the same fanout group.
        self.afp_sockets: dict[tuple[str, int], tuple[int, dict]] = {}

        def fetch(spec: str, qid: int):
            fd, params = from_primary(spec, qid)
            self.afp_sockets[(spec, qid)] = (fd, params)
            return fd, params

        self.inq, self._keep_in = port_queue(inst.directory, cfg["inside"], worker_id, fds_from=fetch)
        self.outq, self._keep_out = port_queue(inst.directory, cfg["outside"], worker_id, fds_from=fetch)
        self.nq = int(cfg["workers"])
        z = inst.directory.lookup_checked("counters", WORKER_COUNTERS)
        self.counters = CounterBlocks.attach(z.view).block(worker_id)
        self.tables: list = []  # session tables whose writer role moves with the queues
        # A session-table migration (shared/session_migrate.TableHandover) this worker finishes
        # before it claims its queues: a candidate's copy of the live table of another layout version.
        self.handover = handover
        in2out = session_table_for(inst, cfg, worker_id, candidate=candidate, handover=handover)
        if candidate:
            with _ReadersOnly() as ro:
                self.pipeline = make_pipeline(cfg, worker_id, inst, in2out)
            self.tables = ro.wanted
        else:
            self.pipeline = make_pipeline(cfg, worker_id, inst, in2out)
            self.tables = [t for t in (getattr(self.pipeline, "in2out", None), getattr(self.pipeline, "out2in", None)) if t is not None and getattr(t, "is_writer", False)]
        self.stop = False
        # (ownership word, token) of every owned queue: a pass marks them busy (queue_owner.enter).
        self.tokens: list[tuple] = []
        # Upgrade role: queue name -> (queue, token) while owned; requests from the control thread.
        self.queues = {f"inside/{worker_id}": self.inq, f"outside/{worker_id}": self.outq}
        self.words = {name: owner_word(q.words) for name, q in self.queues.items()}
        # Private burst copies, one per direction, allocated once. Their rows are 8-byte multiples
        # (an RX slot's data view, frame_size - 66, is not), which the NAT fast path needs to view
        # headers as words: on the RX slots themselves it could never run.
        self.scratch = [np.empty((MAX_BURST, -(-q.rx.rx_data.shape[1] // 8) * 8), np.uint8) for q in (self.inq, self.outq)]
        self._taken_over: dict[str, int] = {}  # queue -> the pid it was taken from (dead, or fenced out)
        self._process = [lambda f, l, v, d=d: self.pipeline.process(d, f, l, v) for d in (0, 1)]
        self._books = np.zeros(6, np.uint64)  # one burst's figures, added to the counter block at once
        self.owned: dict[str, int] = {}
        self.parked = candidate
        self.inbox: collections.deque = collections.deque()
        self.wake = threading.Event()  # set by post(): a parked worker sleeps on it
        self.armed: dict[str, list] = {}  # queue -> [force, deadline, replies]
        self.release_replies: list = []
        self.last_pass_ns = 0
        self.first_burst_due = False
        self.exit_code = EXIT_OK
        self.ctl = None
        self.upc = None  # upgrade_control records (None until an upgrade created the zone)
        self._pending_claim_replies: list = []
        # Per-host session counts kept exact through the migration's copies (no O(table) rebuild at the swap).
        self.host_counts_tracked = False
        if handover is not None and hasattr(self.pipeline, "adjust_host_counts"):
            handover.mig.on_copy = self.pipeline.adjust_host_counts
            self.host_counts_tracked = True
        self.migrated: dict | None = None  # figures of the last migration this worker finished

    # ------------------------------------------------------------------ ownership

    def claim_queues(self) -> None:
        from hotplane.shared.queue_owner import owner_of

        taken_from: dict[str, int] = {}
        for name in self.queues:
            prev_pid, _ = owner_of(self.words[name])
            self.owned[name] = claim(self.words[name], prefix=self.inst.prefix)
            if prev_pid and prev_pid != os.getpid():
                taken_from[name] = prev_pid
        self._sync_tokens()
        if not taken_from:
            return
        # The previous owner died holding the queue: finish its burst and repair its cursors,
        # inside a pass like every write.
        if not self.enter_pass():
            raise QueueBusy("queues fenced right after the claim")
        try:
            self._repair(taken_from)
        finally:
            self.leave_pass()

    def _repair(self, taken_from: dict[str, int]) -> None:
        """As the new owner of both queues: finish the burst a previous owner journaled, then fix its cursors.

        Both journals are finished first: a burst received on one queue may have staged frames
        on the other's TX ring.
        """
        from hotplane.shared.burst import reconcile

        pairs = ((self.inq, self.outq), (self.outq, self.inq))
        for rxq, otherq in pairs:
            done = burst_journal.recover(rxq, otherq)
            if done["state"]:
                print(f"worker {self.id}: queue {rxq.qid}: finished the burst of {done['rx_released']} frame(s) a previous owner "
                      f"left in flight ({done['tx_published']} TX slot(s) published for it)", file=sys.stderr)
        for name, prev_pid in taken_from.items():
            q = self.queues[name]
            moved = reconcile(q)
            if moved["rx"] or moved["tx"]:
                print(f"worker {self.id}: queue {q.qid} taken over from pid {prev_pid}: cursors repaired {moved}", file=sys.stderr)

    def _sync_tokens(self) -> None:
        self.tokens = [(self.words[n], t) for n, t in self.owned.items()]

    def release_queues(self) -> None:
        for word, tok in self.tokens:
            release(word, tok)
        self.owned.clear()
        self._sync_tokens()

    def enter_pass(self) -> bool:
        """Mark every owned queue busy before touching any of them; False (nothing marked) when fenced.

        Everything the worker writes to shared memory -- TX and RX slots,
        cursors, counters, heartbeat, session tables -- happens between this
        and :meth:`leave_pass`. A fence that finds the mark kills us instead of
        handing the queues on, so a pass is never finished on a lost queue.
        """
        for i, (word, tok) in enumerate(self.tokens):
            if not enter(word, tok):
                for w, t in self.tokens[:i]:
                    leave(w, t)
                return False
        return True

    def leave_pass(self) -> bool:
        """Clear the busy marks; False if a queue was taken during the pass (only a forced claim over us can)."""
        ok = True
        for word, tok in self.tokens:
            ok = leave(word, tok) and ok
        return ok

    # ------------------------------------------------------------------ upgrade control

    def _upc_record(self, qname: str):
        """This queue's upgrade_control record (None without the zone)."""
        if self.upc is None:
            z = self.inst.directory.lookup("upgrade_control")
            if z is None:
                return None
            from hotplane.schema import upgrade as up

            try:
                self.upc = up.attach(z.view)[1]
            except Exception:
                return None
        side, q = qname.split("/")
        i = QUEUE_SIDES.index(side) * self.nq + int(q)
        return self.upc[i] if i < len(self.upc) else None

    def _stamp(self, qname: str, **fields) -> None:
        r = self._upc_record(qname)
        if r is not None:
            for k, v in fields.items():
                r[k] = v

    def post(self, op: str, params: dict, reply) -> None:
        """From the control thread: queue a request; ``reply(result_or_exception)`` answers it."""
        self.inbox.append((op, params, reply))
        self.wake.set()

    def _service(self) -> None:
        """Handle the queued control requests (called at a burst boundary)."""
        while self.inbox:
            op, params, reply = self.inbox.popleft()
            try:
                if op == "release":
                    if self.owned:
                        self.park()
                    reply({"released": params.get("queue"), "pid": os.getpid()})
                elif op in ("claim", "arm"):
                    # arm: spin on the word from now on and answer at once (the supervisor orders the
                    # old owner's release only then); claim: answer when the claim has landed.
                    q = params.get("queue")
                    if q not in self.queues:
                        raise ValueError(f"no queue {q!r} here (have {', '.join(self.queues)})")
                    if q in self.owned and still_mine(self.words[q], self.owned[q]):
                        reply({"claimed": q, "pid": os.getpid(), "already": True})
                        continue
                    if self.parked:
                        self._prepare_takeover()
                        self._upc_record(q)  # attached now, not in the swap
                    deadline = time.monotonic() + float(params.get("timeout", 5.0))
                    ent = self.armed.setdefault(q, [False, deadline, []])
                    ent[0] = ent[0] or bool(params.get("force"))
                    ent[1] = max(ent[1], deadline)
                    if op == "arm":
                        reply({"armed": q, "pid": os.getpid()})
                    else:
                        ent[2].append(reply)
                elif op in ("park", "commit"):
                    reply({"ok": True, "op": op, "parked": self.parked})
                elif op == "exit":
                    self.stop = True
                    reply({"ok": True, "exiting": True})
                elif op == "status":
                    reply(self.describe())
                else:
                    raise ValueError(f"unknown op {op!r}")
            except Exception as e:  # an answer, never a dead worker
                reply(e)

    def describe(self) -> dict:
        return {"pid": os.getpid(), "worker": self.id, "version": __version__, "candidate": self.candidate, "parked": self.parked,
                "owned": sorted(self.owned), "armed": sorted(self.armed)}

    def suspend_tables(self) -> None:
        """Stop writing the session tables and give up their writer role."""
        p = self.pipeline
        if hasattr(p, "suspend"):
            p.suspend()
            return
        zh = getattr(p, "zone_header", None)
        if zh is not None and hasattr(p, "sweeper"):
            zh["expiry_cursor"] = p.sweeper.cursor  # the successor continues the expiry sweep here
        for t in self.tables:
            t.release()

    def resume_tables(self) -> None:
        """Take the session tables' writer role back (after the previous writer released it)."""
        p = self.pipeline
        if hasattr(p, "resume"):
            p.resume(rebuild_host_counts=False) if self.host_counts_tracked else p.resume()
            return
        for t in self.tables:
            if not t.is_writer:
                t._take_writer(False)
                t.recovered = t.recover()
        zh = getattr(p, "zone_header", None)
        if zh is not None and hasattr(p, "sweeper"):
            p.sweeper.cursor = int(zh["expiry_cursor"][0]) % p.sweeper.capacity

    def park(self) -> None:
        """The old side of a swap: one last burst, then release tables then queues (one pass).

        The last burst takes what arrived since the previous pass (the release order waited
        in the inbox meanwhile), so the queues are handed over drained and the swap gap runs
        from this burst, not from an idle sleep before it.
        """
        for name in self.owned:
            self._upc_record(name)  # attached now, not between the last burst and the release
        if not self.enter_pass():
            raise QueueBusy("this worker's queues were fenced: nothing to release")
        try:
            self.poll_once(MAX_BURST)
        except BaseException:
            self.leave_pass()  # still the owner: the loop goes on as if no release was asked
            raise
        last = time.monotonic_ns()
        self.suspend_tables()
        for name, tok in list(self.owned.items()):
            self._stamp(name, old_last_burst_ns=last, old_token=tok)
            release(self.words[name], tok)
            self._stamp(name, released_ns=time.monotonic_ns())
        self.owned.clear()
        self._sync_tokens()
        self.parked = True

    def _spin_claims(self) -> None:
        """Armed: claim each armed queue the moment its word reads unowned (or now, if forced)."""
        from hotplane.shared.queue_owner import owner_of

        now = time.monotonic()
        for name in list(self.armed):
            force, deadline, replies = self.armed[name]
            pid, _ = owner_of(self.words[name])
            if pid == 0 or force or pid == os.getpid():
                if not self._sessions_ready():
                    continue  # the live table's writer has not let go of it yet
                try:
                    tok = claim(self.words[name], force=True)
                except QueueBusy:
                    # Its owner is alive inside a pass (a dying process not reaped yet): keep spinning.
                    if now > deadline:
                        del self.armed[name]
                        for r in replies:
                            r(TimeoutError(f"{name}: still owned by pid {pid}, inside a pass, after the claim deadline"))
                    continue
                if not enter(self.words[name], tok):
                    continue  # fenced between the claim and the mark: it is not ours after all
                self._stamp(name, claimed_ns=time.monotonic_ns(), new_token=tok)
                leave(self.words[name], tok)
                if pid and pid != os.getpid():
                    self._taken_over[name] = pid  # a forced claim over a dead owner: repaired once both are ours
                self.owned[name] = tok
                del self.armed[name]
                self._sync_tokens()
                self._pending_claim_replies.extend(replies)
            elif now > deadline:
                del self.armed[name]
                for r in replies:
                    r(TimeoutError(f"{name}: still owned by pid {pid} after the claim deadline"))
        if len(self.owned) == len(self.queues) and self.parked and self.enter_pass():
            try:
                if self._taken_over:
                    self._repair(self._taken_over)
                    self._taken_over = {}
                if self.handover is not None:
                    self._activate_sessions()
                self.resume_tables()
                self.parked = False
                # Counters continue (no reset, no restart counted); the block shows who writes it now.
                self.counters.start(__version__, self.inst.generation, count_restart=False)
                self.first_burst_due = True
            finally:
                self.leave_pass()
        if self._pending_claim_replies and not self.parked and not self.first_burst_due:
            self._answer_claims()

    def _answer_claims(self) -> None:
        """Tell whoever asked that the claims landed (after the first burst: the answers wake the
        control thread, which must not compete with that burst for the interpreter)."""
        if self._pending_claim_replies:
            for r in self._pending_claim_replies:
                r({"claimed": True, "pid": os.getpid()})
            self._pending_claim_replies.clear()

    # ------------------------------------------------------------------ session-table migration

    def _prepare_takeover(self) -> None:
        """A claim reached this parked worker: if another layout version's table is live now (a
        rollback after a migration), copy it back into this worker's own table ahead of the swap."""
        if self.handover is not None or getattr(self.pipeline, "in2out", None) is None:
            return
        from hotplane.shared.session_migrate import TableHandover

        if needs_migration(self.inst.directory, self.id):
            h = TableHandover(self.inst.directory, self.id, session_version(), reuse=True)
            h.copy_ahead()  # parked, not forwarding: the full pass costs nobody a packet
            h.mig.catch_up()  # the delta's code path once, before the swap needs it
            self.handover = h

    def _sessions_ready(self) -> bool:
        """Before a claim: the table this worker writes holds every session (the migration's delta ran).

        False while the live table's writer still runs (it releases the table before
        its queues, so this passes as soon as a word reads free). A migration that
        fails answers the armed claims with the error: the swap does not happen.
        """
        h = self.handover
        if h is None or h.result is not None:
            return True
        from hotplane.shared.session_migrate import NotQuiescent

        try:
            h.finish(recover=True)
            return True
        except NotQuiescent:
            return False
        except Exception as e:  # noqa: BLE001 - the upgrade machine decides what follows
            print(f"worker {self.id}: session table migration {h.describe} failed: {e}", file=sys.stderr)
            for _, _, replies in self.armed.values():
                for r in replies:
                    r(RuntimeError(f"session table migration {h.describe} failed: {e}"))
            self.armed.clear()
            self.handover = None
            self.host_counts_tracked = False
            return False

    def _activate_sessions(self) -> None:
        """Holding both queues (inside the pass): the migrated table becomes the live one."""
        h = self.handover
        h.activate()
        r = h.result
        for name in self.owned:
            self._stamp(name, delta_entries=min(r.copied, 0xFFFFFFFF), delta_us=min(r.pause_ns // 1000, 0xFFFFFFFF))
        self.migrated = {"handover": h}  # summarised after the first burst (never in the swap gap)
        self.handover = None

    def _log_migration(self) -> None:
        """After the first burst (never in the swap gap): what the migration did."""
        d = self.migrated = self.migrated.pop("handover").summary()
        d["logged"] = True
        print(f"worker {self.id}: sessions moved {d['from']} -> {d['to']}: {d.get('sessions')} sessions, {d.get('copied_ahead')} copied ahead, "
              f"delta {d.get('delta_copied')} ({d.get('mode')}, {d.get('pause_us')} us)", file=sys.stderr)

    def _send_emitted(self) -> None:
        p = self.pipeline
        for side in (0, 1):
            frames = [f for s, f in p.emit if s == side]
            if not frames:
                continue
            width = max(len(f) for f in frames)
            buf = np.zeros((len(frames), width), np.uint8)
            for i, f in enumerate(frames):
                buf[i, : len(f)] = np.frombuffer(f, np.uint8)
            lengths = np.array([len(f) for f in frames], np.uint32)
            sent = tx_burst(self.inq if side == 0 else self.outq, buf, lengths)
            self.counters.count_tx(sent, int(lengths[:sent].sum()))
        p.emit.clear()

    def poll_once(self, max_burst: int) -> int:
        """One pass over both directions (inside enter_pass/leave_pass); returns how many packets were received."""
        total = 0
        p = self.pipeline
        c = self.counters
        for direction, rxq, otherq in ((0, self.inq, self.outq), (1, self.outq, self.inq)):
            done = run_burst(rxq, otherq, self._process[direction], self.scratch[direction], max_burst)
            if done is None:
                continue
            b, to_other, to_same, ko, ks, rx_bytes = done
            n, lengths = b.n, b.lengths
            total += n
            # The books, once the burst is done: one vectorized add for the six figures.
            if not b.all_valid:
                from hotplane.secondary.forward import RX_TO_COUNTER

                for reason, cnt in zip(RX_TO_COUNTER, b.drops.tolist()):
                    if cnt:
                        c.count_drop(int(reason), cnt)
            sent = ko + ks
            if ko == n:
                sent_bytes = int(_sum(lengths))
            else:
                sent_bytes = (int(_sum(lengths[to_other[:ko]])) if ko else 0) + (int(_sum(lengths[to_same[:ks]])) if ks else 0)
            if ko < to_other.size:
                c.count_drop(_TX_FULL, to_other.size - ko)
            if ks < to_same.size:
                c.count_drop(_TX_FULL, to_same.size - ks)
            # A frame that found no TX slot was counted as forwarded by the pipeline and
            # as a tx_ring_full drop above: take it out of forwarded so the books balance.
            lost_tx = (to_other.size + to_same.size) - sent
            books = self._books
            books[0], books[1], books[2], books[3] = n, rx_bytes, sent, sent_bytes
            books[4] = p.forwarded - lost_tx if p.forwarded >= lost_tx else 0
            books[5] = p.punted - max(0, lost_tx - p.forwarded)
            c.count_burst(books)
            if p.drops.any():
                c.add_drop_counts(p.drops)
                p.drops[:] = 0
        if p.emit:
            self._send_emitted()
        return total

    def run(self, max_burst: int, busy_poll: bool) -> int:
        """The poll loop; returns the exit code."""
        idle_sleep = IDLE_SLEEP_MIN
        next_tick = time.monotonic()
        c = self.counters
        while not self.stop:
            if self.inbox:
                self._service()
            if self.armed:
                self._spin_claims()
            if self.parked:
                # Not polling, not ticking, not beating (the block's writer is the successor).
                if self.handover is not None:
                    self.handover.poll(armed=bool(self.armed))  # the migration follows the live table's writer
                if self.armed:
                    os.sched_yield()  # spinning on the ownership word: take over within microseconds
                elif self.handover is None:
                    # Parked with nothing to follow (e.g. a hot standby, for hours): asleep until a
                    # control request arrives (post() sets wake; the inbox is checked after clear()).
                    self.wake.wait(PARKED_WAIT)
                    self.wake.clear()
                else:
                    time.sleep(IDLE_SLEEP_MIN * 10)
                continue
            if not self.enter_pass():
                print(f"worker {self.id}: queue ownership taken by another process: stopping without touching the queues", file=sys.stderr)
                return EXIT_FENCED
            try:
                n = self.poll_once(max_burst)
                now_ns = time.monotonic_ns()
                self.last_pass_ns = now_ns
                if self.first_burst_due:
                    self.first_burst_due = False
                    for name in self.owned:
                        self._stamp(name, new_first_burst_ns=now_ns)
                    self._answer_claims()
                    if hasattr(self.pipeline, "_rebuild_host_counts") and not self.host_counts_tracked:
                        self.pipeline._rebuild_host_counts()  # per-host limits from the table as handed over
                    if self.migrated is not None and not self.migrated.get("logged"):
                        self._log_migration()
                now = now_ns / 1e9
                c.beat(now_ns)
                if now >= next_tick:
                    collect_kernel_drops(self.inq, self.outq)  # af_packet: PACKET_STATISTICS -> kernel_drops (owner only)
                    self.pipeline.tick(now)
                    if self.pipeline.emit:
                        self._send_emitted()
                    next_tick = now + TICK_INTERVAL
            finally:
                left = self.leave_pass()
            if not left:
                print(f"worker {self.id}: queue ownership taken by another process during a pass: stopping", file=sys.stderr)
                return EXIT_FENCED
            # Between passes nothing is marked busy: a stop here can be fenced without a kill.
            if busy_poll or self.inbox or n >= LIGHT_PASS:
                idle_sleep = IDLE_SLEEP_MIN
            elif n == 0:
                # Two cores are shared by every process here: back off while idle
                # (DPDK's power-management idea) instead of spinning.
                time.sleep(idle_sleep)
                idle_sleep = min(idle_sleep * 2, IDLE_SLEEP_MAX)
            else:
                # Light traffic: a pass costs mostly per burst, so keep the current sleep and take
                # a few frames per pass instead of waking for each (at most IDLE_SLEEP_MAX of
                # added latency, only below LIGHT_PASS frames a pass).
                time.sleep(idle_sleep)
        if self.owned:
            if not self.enter_pass():
                print(f"worker {self.id}: queue ownership taken by another process: stopping without touching the queues", file=sys.stderr)
                return EXIT_FENCED
            flush = getattr(self.pipeline, "flush", None)
            if flush is not None:
                flush()  # per-session counters batched in this process reach shared memory
            self.suspend_tables()
            self.release_queues()  # from busy straight to unowned
        return self.exit_code


class ControlServer:
    """The upgrade control socket, served by a thread with its own event loop."""

    def __init__(self, worker: Worker, path) -> None:
        self.worker = worker
        self.path = path
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._main, name="upgrade-control", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.thread.start()
        self.ready.wait(10)
        if self.error is not None:
            raise InstanceError(f"cannot serve the upgrade control socket {self.path}: {self.error}")

    def _main(self) -> None:
        import asyncio

        try:
            asyncio.run(self._serve())
        except Exception as e:  # noqa: BLE001 - reported through start()
            self.error = e
            self.ready.set()

    async def _serve(self) -> None:
        import asyncio

        from hotplane.shared import ipc

        loop = asyncio.get_running_loop()

        async def handle(channel, request):
            params = request.params if isinstance(request.params, dict) else {}
            if request.method == "af_packet_socket":
                # A copy of a socket we hold, for a restarted primary: nothing of the poll loop's.
                held = self.worker.afp_sockets.get((str(params.get("port")), int(params.get("queue", -1))))
                if held is None:
                    raise ipc.RemoteError("not_found", f"worker {self.worker.id} holds no socket of {params.get('port')}#{params.get('queue')}")
                return {"ring_params": held[1]}, (held[0],)
            fut = loop.create_future()

            def reply(res, fut=fut):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(res))

            self.worker.post(request.method, params, reply)
            res = await asyncio.wait_for(fut, float(params.get("timeout", 5.0)) + 5.0)
            if isinstance(res, Exception):
                raise ipc.RemoteError("upgrade", f"worker {self.worker.id} pid {os.getpid()}: {res}")
            return res, ()

        server = await ipc.serve(self.path, handle, heartbeat_interval=None)
        self.ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()

    def close(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


def report_candidate(name: str, step: str, detail: dict | None = None) -> None:
    """A candidate's progress, to the supervisor running the upgrade (stdout without one)."""
    payload = {"unit": name, "pid": os.getpid(), "step": step, "detail": detail or {}, "version": __version__}
    path = os.environ.get("HOTPLANE_SUPERVISOR_SOCKET")
    if path:
        from hotplane.shared.ipc import IpcError, request_sync

        try:
            request_sync(path, "candidate_report", payload, timeout=10.0)
        except IpcError as e:
            print(f"candidate {name}: could not report {step!r} to the supervisor: {e}", file=sys.stderr)
    print(f"CANDIDATE {name} {step}", flush=True)


def validate_zones(directory, *, migrates: bool = True) -> dict[str, str]:
    """Every zone as this build sees it: compatible / needs migration / refused: why.

    Session tables (schema id 4): the live one of each worker against the version
    this build writes (``migrates=False``: a process that only reads them); a
    superseded one is reported as not in use.
    """
    from hotplane.schema import registry
    from hotplane.shared.session_migrate import table_verdicts

    tables = table_verdicts(directory, session_version(), migrates=migrates)
    out = {}
    for z in directory.list():
        out[z.name] = tables.get(z.name) or registry.compatibility(z.schema_id, z.version, z.layout_hash, None)
    return out


def start_migration(inst, cfg: dict, worker_id: int):
    """A candidate's copy-ahead of its worker's live session table into this build's version
    (the old worker keeps forwarding); None if the table is already at this version."""
    if cfg.get("pipeline") != "nat" or not needs_migration(inst.directory, worker_id):
        return None
    from hotplane.schema.registry import SchemaError
    from hotplane.shared.memzone import MemzoneError
    from hotplane.shared.session_migrate import NotQuiescent, TableHandover

    try:
        h = TableHandover(inst.directory, worker_id, session_version())
        h.copy_ahead()
    except (NotQuiescent, SchemaError, MemzoneError) as e:
        raise InstanceError(f"worker {worker_id}: session table migration: {e}") from None
    return h


def needs_migration(directory, worker_id: int) -> bool:
    """Is worker ``worker_id``'s live session table of another layout version than this build writes?"""
    from hotplane.shared.session_migrate import live_table_zone

    live = live_table_zone(directory, worker_id)
    return live is not None and live[1] != session_version()


def session_table_for(inst, cfg: dict, worker_id: int, *, candidate: bool, handover=None):
    """The NAT session table object the pipeline of this worker uses (None: not a NAT instance).

    A candidate reads (the writer role moves at the swap): the migration's destination
    if it migrates, else the live table. A worker starting takes the live table as
    writer, migrating it first when it is of another version (its writer must be gone).
    """
    if cfg.get("pipeline") != "nat":
        return None
    if handover is not None:
        return handover.reader()
    from hotplane.schema.registry import SchemaError
    from hotplane.shared.memzone import MemzoneError
    from hotplane.shared.session_migrate import NotQuiescent, worker_table

    try:
        return worker_table(inst.directory, worker_id, session_version(), writer=not candidate)
    except (NotQuiescent, SchemaError, MemzoneError) as e:
        raise InstanceError(f"worker {worker_id}: session table: {e}") from None


def session_version() -> int:
    """The session-table layout this build writes (``HOTPLANE_SESSION_VERSION``, default 1)."""
    try:
        return int(os.environ.get("HOTPLANE_SESSION_VERSION", "1"))
    except ValueError:
        return 1


def warm_up(w: Worker) -> None:
    """Touch what the first burst will touch: table pages (read-only lookups), numpy paths."""
    for t in w.tables:
        k = np.arange(1, 257, dtype=np.uint64)
        try:
            t.lookup_batch(k, k)
        except Exception:
            pass
    if hasattr(w.pipeline, "in2out"):
        # The NAT code paths once on a private copy: their first-call costs stay out of the swap gap.
        from hotplane.secondary.warmup import prime_live, warm_nat

        warm_nat(w.pipeline)
        prime_live(w.pipeline)
    if w.handover is not None:
        w.handover.mig.catch_up()  # the swap-time delta's code path, once, ahead of the swap


from hotplane.schema.counters import DROP_REASONS  # noqa: E402

_TX_FULL = DROP_REASONS.index("tx_ring_full")
_sum = np.add.reduce


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane worker", role="secondary")
    ap = argparse.ArgumentParser(prog="hotplane worker [EAL] --")
    ap.add_argument("--id", type=int, required=True, help="worker slot: polls queue ID of each port")
    ap.add_argument("--burst", type=int, default=256, help="maximum burst size (default 256)")
    ap.add_argument("--busy-poll", action="store_true", help="never sleep when idle (benchmarks, dedicated cores)")
    ap.add_argument("--candidate", action="store_true", help="hot-upgrade candidate: attach, validate, warm up, wait for the swap")
    ap.add_argument("--dry-run", action="store_true", help="with --candidate: validate the zones, report, exit")
    ap.add_argument("--json", action="store_true")
    try:
        app = ap.parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if not 1 <= app.burst <= 512:
        print("hotplane worker: --burst must be 1..512", file=sys.stderr)
        return EXIT_USAGE
    name = os.environ.get("HOTPLANE_UPGRADE_UNIT", f"worker-{app.id}")
    try:
        inst = eal_init(opts)
        cfg = primary_config(inst)
        if not 0 <= app.id < int(cfg["workers"]):
            print(f"hotplane worker: --id {app.id} out of range: the instance has {cfg['workers']} worker slots", file=sys.stderr)
            return EXIT_USAGE
        if app.candidate:
            report_candidate(name, "attached", {"generation": inst.generation})
            zones = validate_zones(inst.directory)
            report_candidate(name, "validated", {"zones": zones})
            if app.dry_run or any(v.startswith("refused") for v in zones.values()):
                return EXIT_OK
            handover = None
            # Only an upgrade's candidate migrates (the shell names the process it replaces); a hot
            # standby of another build than the live table's cannot stand by, and says so below.
            if any(v == "needs migration" for v in zones.values()) and os.environ.get("HOTPLANE_UPGRADE_OLD_PID"):
                handover = start_migration(inst, cfg, app.id)
                report_candidate(name, "migrated", handover.summary() if handover is not None else {"table": "already at this build's version"})
        w = Worker(inst, cfg, app.id, candidate=app.candidate, handover=handover if app.candidate else None)
        w.ctl = ControlServer(w, control_socket_path(inst.runtime_dir, os.getpid()))
        w.ctl.start()
        if not app.candidate:
            w.claim_queues()
    except (InstanceError, QueueBusy, ValueError) as e:
        print(f"hotplane worker: {e}", file=sys.stderr)
        return EXIT_FAILURE

    def on_term(*_):
        w.stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        if app.candidate:
            warm_up(w)
            if w.handover is not None:
                # The writer went on while we warmed up: follow it until the copy is current and every
                # batch since is tracked, so the swap-time delta compares tracked slots only.
                deadline = time.monotonic() + 300
                w.handover.mig.track()  # notices any batch the warm-up missed
                while not w.handover.mig.covered and time.monotonic() < deadline:
                    w.handover.poll()
            report_candidate(name, "warm")
            report_candidate(name, "ready", {"control": str(w.ctl.path)})
        else:
            w.counters.start(f"{__version__}", inst.generation)
            report_ready(f"worker-{app.id}", {"worker": app.id, "version": __version__, "pipeline": cfg.get("pipeline"), "control": str(w.ctl.path)}, as_json=app.json)
        return w.run(app.burst, app.busy_poll)
    finally:
        w.ctl.close()
