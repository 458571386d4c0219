"""End to end in ``hotplane lab``: the kernels of hp-inside and hp-outside judge the NAT.

One module-scoped gateway (primary + 2 workers in hp-gw, af_packet ports,
``deploy/gateway.toml``) serves every test; the lab and the processes are torn
down even when a test fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hotplane.deploy import lab

ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not ROOT, reason="the lab needs root (network namespaces)")


def nsrun(ns: str, *cmd: str, timeout: float = 20, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _py(ns: str, code: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return nsrun(ns, sys.executable, "-c", code, timeout=timeout)


def read_line(p: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        return p.stdout.readline() if sel.select(timeout) else ""
    finally:
        sel.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    lab.down()
    root = tmp_path_factory.mktemp("natlab")
    prefix = "n" + uuid.uuid4().hex[:9]
    env = dict(os.environ, HOTPLANE_RUNTIME_DIR=str(root), PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []

    def spawn(args):
        p = subprocess.Popen(["ip", "netns", "exec", lab.NS_GW, sys.executable, "-m", "hotplane.supervisor.cli", *args],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    try:
        r = subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", "lab", "up"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        p = spawn(["primary", "--file-prefix", prefix, "--", "--json", "--config", str(REPO / "deploy/gateway.toml")])
        line = read_line(p, 60)
        assert line, f"primary not ready: {p.poll()} {p.stderr.read() if p.poll() is not None else ''}"
        for i in range(2):
            w = spawn(["worker", "--file-prefix", prefix, "--", "--id", str(i), "--json"])
            if not read_line(w, 60):
                w.kill()
                raise AssertionError(f"worker {i} not ready: {w.communicate(timeout=10)[1][-3000:]}")
        yield {"prefix": prefix, "procs": procs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except Exception:
                pass
        lab.down()
        from hotplane.shared import memory

        try:
            path = memory.existing_memory_file(prefix)
            if path:
                memory.remove_file(path)
        except Exception:
            pass


@pytest.mark.timeout(60)
def test_ping_through_nat(gateway):
    r = nsrun(lab.NS_INSIDE, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "198.18.0.2")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(60)
def test_udp_outside_sees_only_pool_address(gateway):
    server = subprocess.Popen(["ip", "netns", "exec", lab.NS_OUTSIDE, sys.executable, "-c",
                               "import socket;s=socket.socket(2,2);s.bind(('198.18.0.2',40999));s.settimeout(15)\n"
                               "d,a=s.recvfrom(100);print(a[0],a[1],flush=True);s.sendto(b'pong',a)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        r = _py(lab.NS_INSIDE, "import socket;s=socket.socket(2,2);s.settimeout(5);s.sendto(b'ping',('198.18.0.2',40999));"
                               "print(s.recvfrom(100)[0])")
        assert "pong" in r.stdout, r.stderr
        seen = server.communicate(timeout=10)[0].split()
        assert seen[0].startswith("198.18.1."), seen  # a pool address, never 100.64.x
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.timeout(60)
def test_icmp_port_unreachable_reaches_inside_socket(gateway):
    r = _py(lab.NS_INSIDE, "import socket,time\ns=socket.socket(2,2);s.connect(('198.18.0.2',40123));s.settimeout(3)\n"
                           "s.send(b'x')\ntry:\n  s.recv(10); print('no-error')\nexcept ConnectionRefusedError: print('refused')\n"
                           "except socket.timeout: print('timeout')")
    assert "refused" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(60)
def test_tcp_iperf3_10s(gateway):
    srv = subprocess.Popen(["ip", "netns", "exec", lab.NS_OUTSIDE, "iperf3", "-s", "-1", "-B", "198.18.0.2", "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = nsrun(lab.NS_INSIDE, "iperf3", "-c", "198.18.0.2", "-p", "5201", "-t", "10", "-J", timeout=40)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        res = json.loads(r.stdout)
        assert "error" not in res
        assert res["end"]["sum_received"]["bytes"] > 0
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(timeout=10)


@pytest.mark.timeout(60)
def test_thousands_of_flows(gateway):
    n = 2000
    server = subprocess.Popen(["ip", "netns", "exec", lab.NS_OUTSIDE, sys.executable, "-c",
                               "import socket;s=socket.socket(2,2);s.bind(('198.18.0.2',41000));s.settimeout(3)\n"
                               "seen=set()\n"
                               "try:\n  while True:\n    d,a=s.recvfrom(100);seen.add(a);s.sendto(d,a)\n"
                               "except socket.timeout: pass\nprint(len(seen),flush=True)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        code = (f"import socket,select,time\nss=[socket.socket(2,2) for _ in range({n})]\n"
                "for s in ss: s.setblocking(False)\n"
                "for i,s in enumerate(ss):\n  s.sendto(b'%d'%i,('198.18.0.2',41000))\n  (i%100==99) and time.sleep(0.01)\n"
                "got=0;t=time.time()\n"
                "pending=set(ss)\n"
                "while pending and time.time()-t<8:\n"
                "  for s in list(pending):\n    try: s.recv(100); got+=1; pending.discard(s)\n    except BlockingIOError: pass\n"
                "  time.sleep(0.05)\n"
                "print(got)")
        r = _py(lab.NS_INSIDE, code, timeout=30)
        got = int(r.stdout.strip() or 0)
        seen = int(server.communicate(timeout=15)[0].strip() or 0)
        assert seen >= 0.95 * n and got >= 0.95 * n, (seen, got, r.stderr[-500:])
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.timeout(60)
def test_port_forward_from_outside(gateway):
    srv = subprocess.Popen(["ip", "netns", "exec", lab.NS_INSIDE, sys.executable, "-c",
                            "import socket;s=socket.socket();s.setsockopt(1,2,1);s.bind(('0.0.0.0',22));s.listen(1);s.settimeout(15)\n"
                            "c,a=s.accept();c.sendall(b'hello '+a[0].encode());c.close()"],
                           stdout=subprocess.PIPE, text=True)
    try:
        # The lab's inside host is 100.64.0.2; the forward in deploy/gateway.toml points at 100.64.0.10.
        nsrun(lab.NS_INSIDE, "ip", "addr", "add", "100.64.0.10/24", "dev", "eth0")
        time.sleep(0.3)
        r = _py(lab.NS_OUTSIDE, "import socket;s=socket.create_connection(('198.18.0.1',2222),timeout=5);print(s.recv(100))")
        assert "hello 198.18.0.2" in r.stdout, r.stdout + r.stderr
    finally:
        if srv.poll() is None:
            srv.kill()
