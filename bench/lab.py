"""``hotplane bench lab [--json]``: af_packet forwarding through the namespace lab, gateway vs the kernel.

The same generator and sink measure both forwarders on the same lab
(``deploy/lab.py``): ``hotplane gen`` on ``af_packet:eth0`` in hp-inside sends
stamped UDP flows to 198.18.0.2 with the gateway's hp-in0 MAC as destination;
``hotplane sink`` on ``af_packet:eth0`` in hp-outside counts them exactly
(``--expect``: the generator's per-flow sent counts).

* kernel: the hp-gw kernel routes (``lab.kernel_forwarding(True)``: addresses
  on hp-in0/hp-out0, ``ip_forward=1``).
* gateway: the kernel stops forwarding; the primary runs in hp-gw with
  ``--inside af_packet:hp-in0,queues=1 --outside af_packet:hp-out0,queues=1
  --workers 1`` (forward pipeline; next-hop MACs given with ``--mac``) and one
  busy-polling worker; both pinned to one core (``--gw-cpu``).

Pinning (default on 2 CPUs): the generator on CPU 0, the sink on CPU 1, the
gateway on CPU 1. A veth transmit runs the receiving side's softirq on the
sending CPU, so the kernel forwards on the generator's CPU and the hp-outside
receive path runs on the forwarder's CPU: each forwarder shares one core with
one measuring tool.

For each forwarder a short rate search (:func:`search_rate`, shared with
``hotplane bench nat``'s lab part) finds the highest offered rate with
<= ``--loss`` (default 0.1 %) loss: a max-rate probe, then bisection. When
even the max-rate probe stays within the bound, the figure is the
generator's ceiling and the result says so (``gen_limited``).

:class:`Lab` also runs the NAT pipeline (``gateway_mode(config=...)``) and the
kernel's own nft masquerade (``kernel_snat_mode``), for ``bench nat``.

Needs root; brings the lab up if it is not and down again afterwards (unless
``--keep-lab``); leaves an existing lab in dataplane mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from hotplane.bench.report import emit

CLI = [sys.executable, "-m", "hotplane.supervisor.cli"]
PEER = "198.18.0.2"


class BenchError(RuntimeError):
    pass


def _ns(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def _wait_line(stream, pred, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return ""
            line = stream.readline()
            if not line:
                return ""
            if pred(line):
                return line
    finally:
        sel.close()


def _stop(p: subprocess.Popen | None, timeout: float = 10) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=timeout)


def search_rate(trial: Callable[[float], dict], mode: str, rows: list[dict], *, loss: float, steps: int,
                progress: Callable[[dict], None] | None = None) -> dict:
    """Highest offered rate with loss <= ``loss`` (a fraction) through one forwarder.

    ``trial(rate)`` runs the generator at ``rate`` pps (0: as fast as it can) and returns a row
    with ``offered_pps`` and ``loss_pct``. A max-rate probe first: within the bound, the figure is
    the generator's ceiling (``gen_limited``). Otherwise up to ``steps`` bisection trials between 0
    and the probe's offered rate (the first at 60 % of it), stopping once the bracket is within 3 %.
    A trial within the bound whose generator fell short of its target (< 97 %) ends the search
    too: the generator, not the forwarder, set that figure (``gen_limited``).
    Every trial is appended to ``rows`` (tagged ``mode`` and ``step``) and passed to ``progress``.
    Returns ``{"pps", "gen_limited", "trial"}`` (pps 0 when no trial met the bound).
    """
    def run(rate: float, step: str) -> dict:
        t = trial(rate)
        t.update(mode=mode, step=step)
        rows.append(t)
        if progress is not None:
            progress(t)
        return t

    probe = run(0, "max")
    ceiling = probe["offered_pps"]
    if probe["loss_pct"] <= loss * 100:
        return {"pps": ceiling, "gen_limited": True, "trial": probe}
    ok_best: dict | None = None
    lo, hi = 0.0, float(ceiling)
    for i in range(steps):
        mid = (lo + hi) / 2 if lo else hi * 0.6
        t = run(mid, f"search{i + 1}")
        if t["loss_pct"] <= loss * 100:
            if t["offered_pps"] < 0.97 * mid:
                best = t if ok_best is None or t["offered_pps"] > ok_best["offered_pps"] else ok_best
                return {"pps": best["offered_pps"], "gen_limited": True, "trial": best}
            lo = max(lo, float(t["offered_pps"]))
            if ok_best is None or t["offered_pps"] > ok_best["offered_pps"]:
                ok_best = t
        else:
            hi = mid
        if hi - lo < 0.03 * hi:
            break
    if ok_best is None:
        return {"pps": 0, "gen_limited": False, "trial": None}
    return {"pps": ok_best["offered_pps"], "gen_limited": False, "trial": ok_best}


class Lab:
    """The lab, a generator and a sink, and the forwarders a benchmark compares (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from hotplane.deploy import lab

        self.lab = lab
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hp-bench-lab-"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HOTPLANE_RUNTIME_DIR=str(self.tmp / "run"))
        (self.tmp / "run").mkdir()
        self.prefix = f"benchlab{os.getpid()}"
        self.made_lab = False
        self.gw: list[subprocess.Popen] = []

    # -- lab ---------------------------------------------------------------------------
    def setup(self) -> None:
        st = self.lab.status()
        if st["state"] != "up":
            self.made_lab = st["state"] == "down"
            self.lab.up()
            st = self.lab.status()
        links = st["links"]
        self.in_gw_mac = links[self.lab.GW_IN]["gateway_mac"]
        self.in_host_mac = links[self.lab.GW_IN]["host_mac"]
        self.out_gw_mac = links[self.lab.GW_OUT]["gateway_mac"]
        self.out_host_mac = links[self.lab.GW_OUT]["host_mac"]
        if self.args.rps:
            self.set_rps(self.args.gw_cpu)

    def set_rps(self, cpu: int | None) -> None:
        """Receive packet steering of hp-in0: its receive softirq on ``cpu`` (None: off, the sender's CPU)."""
        mask = "0" if cpu is None else format(1 << cpu, "x")
        path = f"/sys/class/net/{self.lab.GW_IN}/queues/rx-0/rps_cpus"
        subprocess.run([*_ns(self.lab.NS_GW), "sh", "-c", f"echo {mask} > {path}"], capture_output=True, timeout=30)

    def teardown(self) -> None:
        if self.args.rps:
            self.set_rps(None)
        for p in reversed(self.gw):
            _stop(p)
        self.gw = []
        subprocess.run([*CLI, "cleanup", "--file-prefix", self.prefix], env=self.env, capture_output=True, timeout=30)
        with contextlib.suppress(Exception):
            self.lab.kernel_forwarding(False)
        if self.made_lab and not self.args.keep_lab:
            with contextlib.suppress(Exception):
                self.lab.down()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- forwarders --------------------------------------------------------------------------
    def kernel_mode(self) -> None:
        self.lab.kernel_forwarding(True)

    def kernel_snat_mode(self) -> None:
        """The hp-gw kernel forwards and masquerades toward the outside (nft, ``deploy/lab.py``)."""
        self.lab.kernel_snat(True)
        if not self.lab.status()["kernel_snat"]:
            raise BenchError("the nft masquerade rule did not take effect in hp-gw")

    def gateway_mode(self, config: Path | None = None, socket_mem: int = 64) -> None:
        """hotplane in hp-gw, one worker pinned to ``--gw-cpu``: the forward pipeline, or with ``config``
        (a one-worker gateway TOML) the NAT pipeline."""
        self.lab.kernel_forwarding(False)
        a = self.args
        eal = ["--file-prefix", self.prefix, "--no-huge", "--socket-mem", str(socket_mem), "--lcores", str(a.gw_cpu)]
        what = ["--config", str(config)] if config is not None else \
            ["--workers", "1", "--mac", f"inside_peer={self.in_host_mac}", "--mac", f"outside_peer={self.out_host_mac}"]
        prim = subprocess.Popen([*_ns(self.lab.NS_GW), *CLI, "primary", *eal, "--", *what,
                                 "--inside", f"af_packet:{self.lab.GW_IN},queues=1,slots={a.gw_slots}",
                                 "--outside", f"af_packet:{self.lab.GW_OUT},queues=1,slots={a.gw_slots}", "--json"],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.gw.append(prim)
        if not _wait_line(prim.stdout, lambda s: s.startswith("{"), 60):
            _stop(prim)
            raise BenchError(f"the primary did not start in {self.lab.NS_GW}: {prim.stderr.read()[-2000:]}")
        wk = subprocess.Popen([*_ns(self.lab.NS_GW), *CLI, "worker", "--file-prefix", self.prefix, "--lcores", str(a.gw_cpu), "--",
                               "--id", "0", "--busy-poll", "--burst", str(a.gw_burst), "--json"],
                              env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.gw.append(wk)
        if not _wait_line(wk.stdout, lambda s: "ready" in s.lower(), 60):
            _stop(wk)
            raise BenchError(f"the worker did not start: {wk.stderr.read()[-2000:]}")

    def stop_gateway(self) -> None:
        for p in reversed(self.gw):
            _stop(p)
        self.gw = []
        subprocess.run([*CLI, "cleanup", "--file-prefix", self.prefix], env=self.env, capture_output=True, timeout=30)

    # -- one trial ----------------------------------------------------------------------------
    def trial(self, rate: float) -> dict:
        a = self.args
        rep = self.tmp / f"gen-{time.monotonic_ns()}.json"
        sink = subprocess.Popen([*_ns(self.lab.NS_OUTSIDE), *CLI, "sink", "--lcores", str(a.sink_cpu), "--", "--port", f"af_packet:{self.lab.HOST_IF}",
                                 "--duration", str(a.trial + 30), "--idle-exit", "0.5", "--expect", str(rep), "--json", "--quiet"],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if not _wait_line(sink.stderr, lambda s: s.startswith("sink: ready"), 60):
                raise BenchError(f"the sink did not start: {sink.stderr.read()[-2000:]}")
            g = subprocess.run([*_ns(self.lab.NS_INSIDE), *CLI, "gen", "--lcores", str(a.gen_cpu), "--", "--port", f"af_packet:{self.lab.HOST_IF}",
                                "--dst", PEER, "--dst-mac", self.in_gw_mac, "--flows", str(a.flows), "--size", str(a.size),
                                "--rate", str(int(rate)), "--duration", str(a.trial), "--burst", str(a.burst),
                                "--report", str(rep), "--json", "--quiet"],
                               env=self.env, capture_output=True, text=True, timeout=a.trial + 60)
            if g.returncode != 0:
                raise BenchError(f"the generator failed: {g.stderr[-2000:]}")
            gdoc = json.loads(g.stdout.strip().splitlines()[-1])
            out, err = sink.communicate(timeout=a.trial + 90)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if not lines:
                raise BenchError(f"the sink gave no report: {err[-2000:]}")
            sdoc = json.loads(lines[-1])
        finally:
            if sink.poll() is None:
                sink.kill()
                sink.wait(timeout=10)
            with contextlib.suppress(OSError):
                rep.unlink()
        expected = max(1, sdoc["expected"])
        return {
            "target_pps": int(rate),
            "offered_pps": round(gdoc["pps"]),
            "received": sdoc["received"],
            "expected": sdoc["expected"],
            "lost": sdoc["lost"],
            "loss_pct": round(100.0 * sdoc["lost"] / expected, 4),
            "corrupted": sdoc["corrupted"],
            "duplicated": sdoc["duplicated"],
            "sink_kernel_drops": sdoc.get("kernel_drops", 0),
        }

    def search(self, mode: str, rows: list[dict]) -> dict:
        """Highest offered rate with loss <= the bound through the forwarder now in place (:func:`search_rate`)."""
        return search_rate(self.trial, mode, rows, loss=self.args.loss, steps=self.args.steps, progress=self._progress)

    def _progress(self, t: dict) -> None:
        if not self.args.json or self.args.verbose:
            print(f"  {t['mode']:12s} {t['step']:9s} target {t['target_pps']:>9,} offered {t['offered_pps']:>9,} pps  "
                  f"loss {t['loss_pct']:.3f} %", file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    cpus = sorted(os.sched_getaffinity(0))
    last = cpus[-1]
    ap = argparse.ArgumentParser(prog="hotplane bench lab", description="af_packet forwarding through the lab: gateway vs kernel")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--size", type=int, default=64, help="frame size (default 64)")
    ap.add_argument("--flows", type=int, default=16, help="flows (default 16)")
    ap.add_argument("--trial", type=float, default=1.0, help="seconds per trial (default 1)")
    ap.add_argument("--steps", type=int, default=4, help="bisection steps after the max-rate probe (default 4)")
    ap.add_argument("--loss", type=float, default=0.001, help="loss bound as a fraction (default 0.001 = 0.1 %%)")
    ap.add_argument("--burst", type=int, default=256, help="generator burst (default 256)")
    ap.add_argument("--gw-burst", type=int, default=256, help="worker burst (default 256)")
    ap.add_argument("--gw-slots", type=int, default=4096, help="gateway af_packet ring slots (default 4096)")
    ap.add_argument("--gen-cpu", type=int, default=cpus[0])
    ap.add_argument("--sink-cpu", type=int, default=last)
    ap.add_argument("--gw-cpu", type=int, default=last)
    ap.add_argument("--rps", action="store_true", help="steer hp-in0's receive softirq to --gw-cpu in both modes (the kernel then forwards on that core instead of the generator's)")
    ap.add_argument("--only", choices=("kernel", "gateway"), help="measure one forwarder only (no ratio)")
    ap.add_argument("--keep-lab", action="store_true", help="leave the lab up if this run created it")
    ap.add_argument("--verbose", action="store_true", help="progress lines also with --json")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        print("hotplane bench lab: needs root (network namespaces, AF_PACKET)", file=sys.stderr)
        return 1
    lab = Lab(args)
    rows: list[dict] = []
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    try:
        lab.setup()
        if args.only in (None, "kernel"):
            lab.kernel_mode()
            results["kernel"] = lab.search("kernel", rows)
            lab.lab.kernel_forwarding(False)
        if args.only in (None, "gateway"):
            try:
                lab.gateway_mode()
                results["gateway"] = lab.search("gateway", rows)
            except BenchError as e:
                # Still report the kernel's figure; the error says what stopped the gateway.
                errors["gateway"] = str(e)
                print(f"hotplane bench lab: gateway: {e}", file=sys.stderr)
            lab.stop_gateway()
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"hotplane bench lab: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from hotplane.deploy.lab import LabError

        if not isinstance(e, LabError):
            raise
        print(f"hotplane bench lab: {e}", file=sys.stderr)
        return 1
    finally:
        lab.teardown()
    summary: dict = {
        "frame_size": args.size,
        "flows": args.flows,
        "loss_bound_pct": args.loss * 100,
        "pinning": {"gen_cpu": args.gen_cpu, "sink_cpu": args.sink_cpu, "gateway_cpu": args.gw_cpu, "hp_in0_rps_cpu": args.gw_cpu if args.rps else None},
    }
    for mode, r in results.items():
        summary[f"{mode}_pps"] = r["pps"]
        summary[f"{mode}_gen_limited"] = r["gen_limited"]
    if "kernel" in results and "gateway" in results:
        k = results["kernel"]["pps"]
        summary["ratio_gateway_vs_kernel"] = round(results["gateway"]["pps"] / k, 3) if k else None
        summary["target_ratio"] = 1.0
    if errors:
        summary["errors"] = errors
    emit("lab", rows, as_json=args.json, summary=summary)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
