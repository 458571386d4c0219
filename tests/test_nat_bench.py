"""``hotplane bench nat``: the rate search it shares with ``bench lab`` (against a modelled forwarder) and a
tiny run of the whole bench (its JSON shape and the memory figures; no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hotplane.bench.lab import search_rate


def forwarder(capacity: float, generator: float):
    """A modelled trial: the generator reaches at most ``generator`` pps; above ``capacity`` 2 % are lost."""
    calls = []

    def trial(rate: float) -> dict:
        offered = generator if rate == 0 else min(rate, generator)
        calls.append(rate)
        return {"target_pps": int(rate), "offered_pps": round(offered), "loss_pct": 0.0 if offered <= capacity else 2.0}

    return trial, calls


def test_search_finds_the_highest_rate_within_the_loss_bound():
    trial, calls = forwarder(100_000, 330_000)
    rows: list[dict] = []
    seen = []
    r = search_rate(trial, "x", rows, loss=0.001, steps=12, progress=seen.append)
    assert not r["gen_limited"] and 97_000 <= r["pps"] <= 100_000
    assert r["trial"]["loss_pct"] == 0.0 and r["trial"]["offered_pps"] == r["pps"]
    assert calls[0] == 0 and len(rows) == len(calls) == len(seen) <= 13  # the probe, then bisection
    assert rows[0]["step"] == "max" and all(t["mode"] == "x" for t in rows)


def test_search_reports_the_generator_ceiling_and_total_loss():
    trial, calls = forwarder(1e9, 50_000)
    r = search_rate(trial, "x", [], loss=0.001, steps=4)
    assert r == {"pps": 50_000, "gen_limited": True, "trial": r["trial"]} and calls == [0]
    trial, _ = forwarder(0, 50_000)  # loses at every rate
    r = search_rate(trial, "x", [], loss=0.001, steps=3)
    assert r["pps"] == 0 and r["trial"] is None and not r["gen_limited"]


def test_search_stops_when_the_generator_falls_short_of_its_target():
    """A starved generator (here: it offers a tenth of what it is asked for) passes every trial: the
    figure is the generator's, and the result says so instead of crediting the forwarder."""
    def trial(rate: float) -> dict:
        offered = 330_000 if rate == 0 else rate / 10
        return {"target_pps": int(rate), "offered_pps": round(offered), "loss_pct": 5.0 if rate == 0 else 0.0}

    rows: list[dict] = []
    r = search_rate(trial, "x", rows, loss=0.001, steps=6)
    assert r["gen_limited"] and r["pps"] == 19_800 and len(rows) == 2


@pytest.mark.timeout(240)
def test_bench_nat_runs_and_reports_memory(tmp_path):
    env = dict(os.environ, HOTPLANE_RUNTIME_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "hotplane.bench.nat", "--json", "--sessions", "5000", "--new-sessions", "2000",
                        "--bursts", "64", "--seconds", "0.05", "--lab", "off"],
                       capture_output=True, text=True, timeout=200, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    s = doc["summary"]
    tests = {row["test"] for row in doc["rows"]}
    assert {"new_sessions", "nat_in2out", "nat_out2in"} <= tests
    assert s["zone_bytes_10M_sessions"] <= 1 << 30 and s["10M_fit_1GiB"] is True
    assert s["sessions"] >= 0.999 * 5000 and s["lab"] == "not measured (--lab off)"
    assert all(row["fast_fraction"] == 1.0 for row in doc["rows"] if row["test"].startswith("nat_"))
