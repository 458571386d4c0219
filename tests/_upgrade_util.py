"""Helpers for the hot-upgrade tests: builds to upgrade between, an instance under gen-to-sink load on
ring ports, and the figures the tests judge by -- read from the instance memory, not from a sample."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RATE = 800  # generator packets per second (2 workers, 1024-slot rings: ~2.5 s of buffering per queue)
RING_SLOTS = 1024


def _load(name: str):
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


u = _load("_supervisor_util")


def make_build(dst: Path, version_prefix: str, env: dict[str, str] | None = None, append: dict[str, str] | None = None) -> Path:
    """A copy of this tree as another build: ``version_prefix`` + our version, ``.hotplane-env``
    lines, and code appended to some of its files (``append``: relative path -> source)."""
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "tests"))
    init = dst / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', f'__version__ = "{version_prefix}', 1))
    if env:
        (dst / ".hotplane-env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for rel, code in (append or {}).items():
        f = dst / rel
        f.write_text(f.read_text() + "\n" + code)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(inst, *, rate: int = RATE, stats_port: int | None = None) -> str:
    """``hotplane up`` with the embedded default (NAT, ring ports, gen and sink), once traffic flows."""
    listen = f"127.0.0.1:{stats_port or 0}"
    r = u.hotplane(inst, "up", "-p", inst.prefix, "--daemon", "--no-huge", "--socket-mem", "192", "--rate", str(rate),
                   "--stats-listen", listen, "--stop-wait", "3")
    assert r.returncode == 0, r.stderr + r.stdout
    u.wait_for(lambda: (figures(inst.prefix)["sink"] or {}).get("packets", 0) > 200, 30, "traffic reaching the sink")
    return inst.prefix


def upgrade(inst, *args: str, timeout: float = 120) -> tuple[dict, list[str]]:
    """``supervisorctl --json upgrade ARGS``: (the final status, the progress lines streamed before it)."""
    r = u.ctl(inst, "--json", "upgrade", *args, timeout=timeout)
    out = [json.loads(x) for x in r.stdout.strip().splitlines() if x.strip()]
    assert out, r.stderr
    lines = [o["line"] for o in out[:-1] if "line" in o]
    return out[-1], lines


def rollback(inst) -> dict:
    r = u.ctl(inst, "--json", "rollback", timeout=90)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "result" not in res:  # an error object: say what supervisorctl said
        res["stderr"], res["exit"] = r.stderr[-2000:], r.returncode
    return res


def commit(inst) -> dict:
    u.call(inst.prefix, "upgrade_commit")  # in-process: a supervisorctl process per upgrade costs seconds on 2 cores
    return u.wait_for(lambda: (lambda s: s if s["phase"] == "DONE" else None)(u.call(inst.prefix, "upgrade_status")), 30, "the park window to end")


class Attached:
    """The instance memory, attached from the test process for one reading."""

    def __init__(self, prefix: str) -> None:
        from hotplane.shared.eal import EalOptions
        from hotplane.shared.instance import eal_init

        self.inst = eal_init(EalOptions(file_prefix=prefix, proc_type="secondary"))

    def __enter__(self):
        return self.inst

    def __exit__(self, *exc) -> None:
        self.inst.close()


def figures(prefix: str) -> dict[str, Any]:
    """Workers' counters, queue owners, gen and sink, read now (cumulative)."""
    from hotplane.secondary.stats import snapshot

    with Attached(prefix) as inst:
        snap = snapshot(inst.directory)
    tr = {t["name"]: t for t in snap["traffic"]}
    return {"workers": {w["id"]: w for w in snap["workers"]}, "queues": snap["queues"], "sink": tr.get("sink"), "gen": tr.get("gen"),
            "upgrade": snap["upgrade"], "sessions": snap["sessions"]}


def sessions(prefix: str) -> set[tuple[int, int, int, int, int]]:
    """Every session of every worker's live table: (worker, key0, key1, xaddr, xport)."""
    from hotplane.shared.session_migrate import attach_live

    out = set()
    with Attached(prefix) as inst:
        for w in range(16):
            t = attach_live(inst.directory, w)
            if t is None:
                break
            for k0, k1, r in t.items():
                out.add((w, k0, k1, int(r["xaddr"]), int(r["xport"])))
    return out


def live_versions(prefix: str) -> dict[int, int]:
    """Layout version of each worker's live session table."""
    from hotplane.shared.session_migrate import live_table_zone

    out = {}
    with Attached(prefix) as inst:
        for w in range(16):
            live = live_table_zone(inst.directory, w)
            if live is None:
                break
            out[w] = live[1]
    return out


def one_owner_each(prefix: str, workers: int = 2) -> dict:
    """Wait until each queue's ownership word names its worker program's live process."""
    def ok():
        ps = u.programs(prefix)
        own = {(q["port"], q["queue"]): q["owner_pid"] for q in figures(prefix)["queues"]}
        want = {(port, w): ps[f"worker-{w}"]["pid"] for port in ("in", "out") for w in range(workers)}
        return own if all(ps[f"worker-{w}"]["state"] in ("READY", "RUNNING") for w in range(workers)) and own == want else None

    return u.wait_for(ok, 30, "exactly one owner per queue: the worker program's process")


def versions(prefix: str) -> dict[str, str]:
    return {n: p["version"] for n, p in u.programs(prefix).items()}


def sink_settled(prefix: str, more_than: int) -> dict:
    """The sink's figures once it has counted more than ``more_than`` packets."""
    return u.wait_for(lambda: (lambda s: s if s and s["packets"] > more_than else None)(figures(prefix)["sink"]), 30, "traffic at the sink")


class Scraper(threading.Thread):
    """Scrapes the stats secondary's /metrics over and over; every failure is kept."""

    def __init__(self, port: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.ok = 0
        self.failures: list[str] = []
        self.disconnects: list[str] = []
        self.last = ""
        self.halt = threading.Event()

    def run(self) -> None:
        import http.client

        while not self.halt.is_set():
            for attempt in (1, 2):
                try:
                    with urllib.request.urlopen(self.url, timeout=5) as r:
                        self.last = r.read().decode()
                    self.ok += 1
                    break
                except http.client.RemoteDisconnected as e:
                    # A connection closed unanswered during a hand-over (a known, rare defect: see
                    # the closing note of stop 9); kept, and retried at once as Prometheus would at
                    # its next scrape. Anything else, or a second one in a row, is a failure.
                    self.disconnects.append(f"{time.strftime('%H:%M:%S')} {e}")
                    if attempt == 2:
                        self.failures.append(f"{time.strftime('%H:%M:%S')} RemoteDisconnected twice: {e}")
                except Exception as e:  # noqa: BLE001 - the test reports every one
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}")
                    break
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
