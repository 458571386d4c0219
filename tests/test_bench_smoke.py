"""Every README benchmark runs and prints the JSON shape scripts rely on (tiny sizes: seconds each).

No timing is asserted: only that each bench finishes, exits 0 and reports its rows and headline
figures, so a bench broken by a change elsewhere is caught by the suite, not by the next person
who runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "hotplane.supervisor.cli", "bench"]


def run_bench(tmp_path, *args: str, timeout: float = 90) -> dict:
    env = {**__import__("os").environ, "HOTPLANE_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir(exist_ok=True)
    r = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"hotplane bench {' '.join(args)}: rc {r.returncode}\n{r.stderr[-3000:]}"
    doc = json.loads(r.stdout)
    assert doc["bench"] == args[0] and doc["rows"] and isinstance(doc["summary"], dict)
    assert {"python", "cpus", "kernel"} <= set(doc["machine"])
    return doc


@pytest.mark.timeout(120)
def test_bench_attach(tmp_path):
    doc = run_bench(tmp_path, "attach", "-n", "5", "--processes", "1")
    assert {r["memory"] for r in doc["rows"]} >= {"4k"}
    for r in doc["rows"]:
        assert r["attach_us_p50"] > 0 and r["plain_mmap_us_p50"] > 0 and r["process_attach_ms_p50"] > 0
    assert doc["summary"]["secondary_attach_us_p50"] > 0 and doc["summary"]["ratio_vs_plain_mmap"] > 0


@pytest.mark.timeout(120)
def test_bench_table(tmp_path):
    doc = run_bench(tmp_path, "table", "--entries", "20000", "--seconds", "0.05", "--bursts", "32,256")
    ops = {(r["op"], r["burst"]) for r in doc["rows"]}
    assert {("insert", 512), ("lookup_hit", 32), ("lookup_hit", 256), ("lookup_miss", 256), ("reader_lookup_consistent", 256)} <= ops
    s = doc["summary"]
    assert s["entries"] == 20000 and s["insert_full"] == 0
    assert s["lookups_per_s_burst256"] > 0 and s["ratio_vs_dict"] > 0


@pytest.mark.timeout(120)
def test_bench_ring(tmp_path):
    doc = run_bench(tmp_path, "ring", "--bursts", "32", "--duration", "0.2", "--capacity", "1024")
    s = doc["summary"]
    assert s["errors"] == 0 and s["best_burst"] == 32 and s["ring_items_per_s_best"] > 0
    assert s["ring_vs_pipe_at_best"] > 0 and s["ring_vs_queue_at_best"] > 0


@pytest.mark.timeout(120)
def test_bench_fastpath_headline_is_the_worker(tmp_path):
    doc = run_bench(tmp_path, "fastpath", "--iters", "100", "--budget", "0.05", "--bursts", "32,256")
    got = {(r["variant"], r["burst"]) for r in doc["rows"]}
    assert got == {("worker", 32), ("worker", 256), ("local", 32), ("local", 256), ("python", 256)}
    s = doc["summary"]
    assert s["headline"].startswith("worker: Worker.poll_once")
    for k in ("worker_mpps_at_256", "worker_ns_per_packet", "worker_fixed_us_per_burst", "reference_local_mpps_at_256",
              "python_reference_mpps", "worker_speedup_vs_python"):
        assert isinstance(s[k], float), k
    assert s["worker_mpps_at_256"] > 0 and s["python_reference_mpps"] > 0
