"""``hotplane chaos --build lab``: faults on af_packet ports, with a kernel TCP stream as a judge.

The gateway runs in the namespace lab (deploy/lab.py) on af_packet sockets; the
generator and the verifying sink run on the hosts' interfaces, and iperf3 keeps a
TCP connection from hp-inside to hp-outside through the NAT for the whole run.
The seed's schedule kills the primary before a worker is killed and another is
hung: a restarted primary must take its sockets back from the workers (not form a
second fanout group), or the worker faults after it lose and misroute packets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT or shutil.which("iperf3") is None, reason="the lab needs root and iperf3")

ARGS = ["--build", "lab", "--json", "--duration", "32", "--seed", "4", "--interval", "5", "--stop",
        "--kill", "worker,primary,supervisor,stats", "--traffic-rate", "300"]


@pytest.mark.timeout(240)
def test_chaos_in_the_lab_keeps_packets_sessions_and_the_tcp_stream(instance) -> None:
    from hotplane.deploy import lab

    try:
        r = subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", "chaos", *ARGS], env=instance.env,
                           capture_output=True, text=True, timeout=220)
        assert r.stdout.strip(), f"no report (exit {r.returncode}): {r.stderr[-3000:]}"
        doc = json.loads(r.stdout)
        print(r.stderr[-4000:])
        kinds = [f["kind"] for f in doc["faults"]]
        assert kinds.index("primary") < kinds.index("worker") and kinds.index("primary") < kinds.index("stop"), kinds
        t = doc["totals"]
        assert t["sink_packets"] > 3000 and t["lost"] == 0 and t["duplicated"] == 0 and t["corrupted"] == 0, t
        assert t["sessions_start"] > 0 and t["sessions_lost"] == 0, t
        assert doc["tcp"]["ok"] and doc["tcp"]["bytes"] > 0, doc["tcp"]
        assert doc["verdict"] == "PASS" and r.returncode == 0, "\n".join(doc["failures"])
    finally:
        lab.down()
