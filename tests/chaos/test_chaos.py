"""``hotplane chaos`` in CI: a bounded seeded run over every process kind, replay, and a broken build that must fail.

* the CI run: ``--build ring`` (its own instance on ring ports, gen -> sink), a fixed seed,
  SIGKILL of worker, stats, primary and supervisor plus a SIGSTOP hang, ~45 s: exit 0,
  0 sessions lost, loss 0 where no data-path process died and within the ring capacity
  (everything lost refused by a full ring) where one did;
* replay: the same seed gives the same faults in the same order (the schedule's
  fingerprint, and the faults the run really injected, in order);
* a deliberately broken build -- a copy of this tree whose worker, taking over a queue,
  starts at the ring's head instead of the saved cursor -- makes the run exit 1 with
  the reason (packets that had entered the ring are lost).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CI_ARGS = ["--duration", "45", "--seed", "20251122", "--interval", "5", "--stop", "--kill", "worker,stats,primary,supervisor,candidate",
           "--upgrade-every", "20"]
#: Candidate kills only, one at each upgrade step (the steps cycle, seed-shuffled, before any repeats).
STEP_ARGS = ["--duration", "62", "--seed", "13", "--interval", "7", "--kill", "candidate"]


@pytest.fixture(scope="module")
def other_build(tmp_path_factory) -> str:
    """Another build to upgrade to: a copy of this tree with another version."""
    dst = tmp_path_factory.mktemp("build") / "hotplane"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "tests"))
    init = dst / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "chaos-', 1))
    return str(dst)


def chaos(inst, *args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", "chaos", *args], env=inst.env, capture_output=True, text=True, timeout=timeout)


def _kill_chaos_prefixes(inst) -> None:
    """Safety net: chaos takes its instance down itself; kill by pid whatever names a chaos prefix of this runtime dir."""
    import psutil

    from hotplane.supervisor.cleanup import main as cleanup

    prefixes = [d.name for d in inst.root.iterdir() if d.is_dir() and d.name.startswith("chaos")] if inst.root.exists() else []
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if any(pref in cmd for pref in prefixes):
                p.kill()
                procs.append(p)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    for pref in prefixes:
        cleanup(["-p", pref])


@pytest.fixture
def inst(instance):
    try:
        yield instance
    finally:
        _kill_chaos_prefixes(instance)


def test_schedule_is_a_function_of_the_seed(inst) -> None:
    from hotplane.supervisor.chaos import CANDIDATE_STEPS, KILL_KINDS, make_schedule

    def sched(*extra: str) -> dict:
        r = chaos(inst, "--schedule-only", "--json", *CI_ARGS, "--upgrade-to", str(REPO), *extra, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    a, b = sched(), sched()
    assert a == b and a["fingerprint"] == b["fingerprint"]
    kinds = [f["kind"] for f in a["schedule"]]
    assert {"worker", "stats", "primary", "supervisor", "stop", "candidate", "upgrade"} <= set(kinds), kinds
    # Candidate kills visit every upgrade step before any step twice.
    steps = [f["step"] for f in make_schedule_doc(inst, *STEP_ARGS)["schedule"]]
    assert sorted(steps[: len(CANDIDATE_STEPS)]) == sorted(CANDIDATE_STEPS), steps
    assert sched("--seed", "7")["schedule"] != a["schedule"], "another seed, another schedule"
    # Every requested kind appears before any appears twice (shuffled rounds), for any seed.
    for seed in range(20):
        s = make_schedule(seed, 300, list(KILL_KINDS), interval=2, rate=None, stop=True, upgrade_every=None, workers=2)
        first = [f.kind for f in s[:6]]
        assert sorted(first) == sorted([*KILL_KINDS, "stop"]), (seed, first)
    r = chaos(inst, "--kill", "worker,bogus", "--schedule-only")
    assert r.returncode == 2 and "unknown kind" in r.stderr
    r = chaos(inst, "--duration", "10")
    assert r.returncode == 2 and "-p PREFIX" in r.stderr


def make_schedule_doc(inst, *args: str) -> dict:
    r = chaos(inst, "--schedule-only", "--json", *args, "--upgrade-to", str(REPO), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.timeout(200)
def test_ci_chaos_run_every_process_kind(inst, other_build) -> None:
    r = chaos(inst, "--build", "ring", "--json", *CI_ARGS, "--upgrade-to", other_build)
    assert r.stdout.strip(), f"no report (exit {r.returncode}): {r.stderr[-2000:]}"
    doc = json.loads(r.stdout)
    print(r.stderr[-4000:])
    # Replay: the faults injected are the schedule, in its order, and the schedule is the seed's.
    replay = json.loads(chaos(inst, "--schedule-only", "--json", *CI_ARGS, "--upgrade-to", other_build, timeout=60).stdout)
    assert doc["fingerprint"] == replay["fingerprint"]
    injected = [(f["seq"], f["kind"], f["program"]) for f in doc["faults"]]
    assert injected == [(f["seq"], f["kind"], f["program"]) for f in replay["schedule"]][: len(injected)]
    assert {f["kind"] for f in doc["faults"]} >= {"worker", "stats", "primary", "supervisor", "stop", "candidate", "upgrade"}, injected
    t = doc["totals"]
    assert t["sessions_start"] > 0 and t["sessions_lost"] == 0, t
    assert all(f["sessions_lost"] == 0 for f in doc["faults"])
    assert t["corrupted"] == 0 and t["sink_packets"] > 1000, t
    assert doc["verdict"] == "PASS" and r.returncode == 0, "\n".join(doc["failures"])
    for f in doc["faults"]:
        assert f["recovery_s"] is not None and f["lost"] <= f["loss_bound"], f
    for kind, v in doc["by_kind"].items():
        assert v["p50_s"] <= v["p99_s"] <= v["max_s"], (kind, v)


BROKEN_FROM = "            self.owned[name] = claim(self.words[name], prefix=self.inst.prefix)\n"
BROKEN_TO = (BROKEN_FROM + "            self.queues[name].words[1] = int(self.queues[name].rx._peer[0])"
             "  # BROKEN (test): start at the ring's head, not the saved cursor\n")


@pytest.mark.timeout(200)
def test_a_worker_that_loses_its_cursor_fails_the_run(inst, tmp_path: Path) -> None:
    tree = tmp_path / "broken" / "hotplane"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "tests"))
    worker = tree / "secondary" / "worker.py"
    src = worker.read_text()
    assert src.count(BROKEN_FROM) == 1, "secondary/worker.py claim_queues changed: update the broken variant"
    worker.write_text(src.replace(BROKEN_FROM, BROKEN_TO))
    # A light load: no ring fills during a restart, so every frame the broken worker skips is a loss
    # no generator refusal can excuse.
    r = chaos(inst, "--build", "ring", "--tree", str(tree), "--json", "--duration", "14", "--seed", "5", "--interval", "4",
              "--kill", "worker", "--recovery-timeout", "10", "--traffic-rate", "200")
    assert r.stdout.strip(), f"no report (exit {r.returncode}): {r.stderr[-2000:]}"
    doc = json.loads(r.stdout)
    print("\n".join(doc["failures"]))
    assert r.returncode == 1 and doc["verdict"] == "FAIL"
    worker_faults = [f for f in doc["faults"] if f["kind"] == "worker"]
    # The run fails, and on a worker fault, for the reason: frames that entered a ring were lost.
    # (Not every fault need show it: a kill while its ring held nothing skips nothing.)
    assert worker_faults and any(f["failures"] for f in worker_faults), worker_faults
    assert any("lost" in x and "entered a ring" in x for f in worker_faults for x in f["failures"]), doc["failures"]


@pytest.mark.timeout(200)
def test_ci_chaos_kills_a_candidate_at_every_upgrade_step(inst, other_build) -> None:
    from hotplane.supervisor.chaos import CANDIDATE_STEPS

    r = chaos(inst, "--build", "ring", "--json", *STEP_ARGS, "--upgrade-to", other_build)
    assert r.stdout.strip(), f"no report (exit {r.returncode}): {r.stderr[-2000:]}"
    doc = json.loads(r.stdout)
    print(r.stderr[-4000:])
    assert doc["verdict"] == "PASS" and r.returncode == 0, "\n".join(doc["failures"])
    faults = [f for f in doc["faults"] if f["kind"] == "candidate"]
    # Each step was reached and the kill landed there or at the next step the poll saw.
    assert {f["step"] for f in faults} == set(CANDIDATE_STEPS), [f["step"] for f in faults]
    for f in faults:
        at = f["detail"]["step_at_kill"]
        assert CANDIDATE_STEPS.index(at) >= CANDIDATE_STEPS.index(f["step"]), f
        assert f["sessions_lost"] == 0 and f["duplicated"] == 0 and f["corrupted"] == 0 and f["lost"] <= f["loss_bound"], f
    assert doc["totals"]["sessions_lost"] == 0
