"""End to end in ``hotplane lab``: the kernels of hp-inside and hp-outside judge the NAT.

One module-scoped gateway (primary + 2 workers in hp-gw, af_packet ports,
``deploy/gateway.toml`` plus a route to 198.19.0.0/16 via the outside host, for
the TTL probe) serves every test; the lab and the processes are torn down even
when a test fails. Where the test asserts what the outside host sees, tcpdump
in hp-outside captures it and scapy reads the capture.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import selectors
import signal
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


def read_line(p: subprocess.Popen, timeout: float, stream=None) -> str:
    stream = p.stdout if stream is None else stream
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        return stream.readline() if sel.select(timeout) else ""
    finally:
        sel.close()


INSIDE_NET = ipaddress.ip_network("100.64.0.0/10")
POOL_NET = ipaddress.ip_network(lab.PUBLIC_POOL)
BEYOND = "198.19.0.5"  # behind the outside host (a dummy interface there), for TTL-limited probes


class Capture:
    """tcpdump on hp-outside's eth0 while the ``with`` block runs; ``packets`` (scapy) afterwards."""

    def __init__(self, path: Path, bpf: str, snaplen: int = 128) -> None:
        self.path, self.bpf, self.snaplen = path, bpf, snaplen
        self.packets: list = []

    def __enter__(self) -> "Capture":
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.NS_OUTSIDE, "tcpdump", "-i", lab.HOST_IF, "-n", "-U", "--immediate-mode",
                                   "-s", str(self.snaplen), "-w", str(self.path), self.bpf],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = read_line(self.p, 15, self.p.stderr)  # "tcpdump: listening on eth0 ...": capturing from here
        if "listening" not in line:
            self.p.kill()
            raise AssertionError(f"tcpdump did not start: {line}{self.p.stderr.read()}")
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)  # the last frames in flight reach the capture
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(timeout=10)
        if exc[0] is None:
            from scapy.layers.l2 import Ether  # noqa: F401 - registers the link type for rdpcap
            from scapy.utils import rdpcap

            tail = self.p.stderr.read()
            assert re.search(r"^0 packets dropped by kernel", tail, re.M), f"the capture lost packets: {tail}"
            self.packets = list(rdpcap(str(self.path)))

    def ip(self) -> list:
        from scapy.layers.inet import IP

        return [pk[IP] for pk in self.packets if IP in pk]


def assert_only_pool_addresses(cap: Capture) -> None:
    """No packet on the outside link carries an inside address, in either direction."""
    leaked = [(p.src, p.dst) for p in cap.ip()
              if ipaddress.ip_address(p.src) in INSIDE_NET or ipaddress.ip_address(p.dst) in INSIDE_NET]
    assert not leaked, f"inside addresses seen by the outside host: {leaked[:5]}"


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
        config = root / "gateway.toml"
        config.write_text((REPO / "deploy/gateway.toml").read_text() +
                          f'\n[[routes]]\nprefix = "198.19.0.0/16"\nvia = "{lab.OUTSIDE_HOSTS[0]}"\nport = "outside"\n')
        p = spawn(["primary", "--file-prefix", prefix, "--", "--json", "--config", str(config)])
        line = read_line(p, 60)
        assert line, f"primary not ready: {p.poll()} {p.stderr.read() if p.poll() is not None else ''}"
        for i in range(2):
            w = spawn(["worker", "--file-prefix", prefix, "--", "--id", str(i), "--json"])
            if not read_line(w, 60):
                w.kill()
                raise AssertionError(f"worker {i} not ready: {w.communicate(timeout=10)[1][-3000:]}")
        yield {"prefix": prefix, "procs": procs, "root": root}
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
def test_ping_through_nat(gateway, tmp_path):
    from scapy.layers.inet import ICMP

    with Capture(tmp_path / "ping.pcap", "icmp") as cap:
        r = nsrun(lab.NS_INSIDE, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "198.18.0.2")
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
    assert_only_pool_addresses(cap)
    req = [p for p in cap.ip() if ICMP in p and p[ICMP].type == 8]
    rep = [p for p in cap.ip() if ICMP in p and p[ICMP].type == 0]
    assert len(req) >= 3 and len(rep) >= 3
    assert all(ipaddress.ip_address(p.src) in POOL_NET and p.dst == "198.18.0.2" for p in req)
    assert all(ipaddress.ip_address(p.dst) in POOL_NET for p in rep)
    assert len({p.src for p in req}) == 1  # one outside address for the host (paired pooling)


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


#: A floor far below what the lab gives (hundreds of Mbit/s on a quiet machine), far above what a
#: gateway that drops or damages segments sustains: it tells a working stream from a broken one.
IPERF_FLOOR_BPS = 5e6


@pytest.mark.timeout(90)
def test_tcp_iperf3_10s(gateway, tmp_path):
    """iperf3 for 10 s through the NAT: a real throughput, no retransmission storm, no reset, and on
    the outside only the pool address (connection set-up and tear-down captured)."""
    from scapy.layers.inet import TCP

    srv = subprocess.Popen(["ip", "netns", "exec", lab.NS_OUTSIDE, "iperf3", "-s", "-1", "-B", "198.18.0.2", "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        bpf = "net 100.64.0.0/10 or (tcp port 5201 and tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0)"
        with Capture(tmp_path / "iperf.pcap", bpf) as cap:
            r = nsrun(lab.NS_INSIDE, "iperf3", "-c", "198.18.0.2", "-p", "5201", "-t", "10", "-J", timeout=60)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        res = json.loads(r.stdout)
        assert "error" not in res, res["error"]
        sent, recv = res["end"]["sum_sent"], res["end"]["sum_received"]
        segments = sent["bytes"] / 1448
        print(f"\n[nat lab] iperf3 {recv['seconds']:.1f} s: {recv['bits_per_second'] / 1e6:.0f} Mbit/s received, "
              f"{sent.get('retransmits', 0)} retransmits of ~{segments:,.0f} segments")
        assert recv["seconds"] >= 9.9
        assert recv["bits_per_second"] >= IPERF_FLOOR_BPS
        assert sent.get("retransmits", 0) <= 0.01 * segments, "retransmission storm"
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(timeout=10)
    assert_only_pool_addresses(cap)
    tcp = [pk for pk in cap.packets if TCP in pk]
    syns = [pk for pk in tcp if pk[TCP].flags & 0x02 and not pk[TCP].flags & 0x10 and pk[TCP].dport == 5201]
    assert len(syns) == 2  # the control and the data connection, each set up once
    assert all(ipaddress.ip_address(pk["IP"].src) in POOL_NET for pk in syns)
    # No reset while data flowed. When the 10 s are over the server closes the data socket; segments
    # still in flight then (the two connections may take different workers, so the end-of-test
    # message on the control connection can arrive first) draw resets, as they would anywhere.
    end = float(syns[-1].time) + 10.0
    early = [pk.summary() for pk in tcp if pk[TCP].flags & 0x04 and float(pk.time) < end]
    assert not early, f"a connection was reset during the transfer: {early[:3]}"
    control = syns[0][TCP].sport
    assert [pk for pk in tcp if pk[TCP].flags & 0x01 and control in (pk[TCP].sport, pk[TCP].dport)], \
        "the control connection was not closed in order"


_FLOW_SERVER = """
import json, socket, sys
s = socket.socket(2, 2); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(('198.18.0.2', 41000)); s.settimeout(20)  # the client says when it is done; this is the fallback
print('ready', flush=True)
seen = {}
try:
    while True:
        d, a = s.recvfrom(100)
        phase, i = d.decode().split()
        if phase == 'done':
            break
        seen.setdefault(i, {})[phase] = list(a)
        s.sendto(d, a)
except socket.timeout:
    pass
print(json.dumps(seen), flush=True)
"""

_FLOW_CLIENT = """
import json, select, socket, sys, time
n = int(sys.argv[1])
ss = [socket.socket(2, 2) for _ in range(n)]
for s in ss:
    s.setblocking(False)
    s.connect(('198.18.0.2', 41000))
def phase(name):
    for i, s in enumerate(ss):
        s.send(b'%s %d' % (name.encode(), i))
        if i % 200 == 199:
            time.sleep(0.005)
    got, pending, t = 0, {s.fileno(): s for s in ss}, time.time()
    ep = select.epoll()
    for fd in pending:
        ep.register(fd, select.EPOLLIN)
    while pending and time.time() - t < 10:
        for fd, _ in ep.poll(0.2):
            try:
                pending[fd].recv(100)
                got += 1
                ep.unregister(fd)
                del pending[fd]
            except BlockingIOError:
                pass
    ep.close()
    return got
first = phase('open')   # every flow gets its session ...
second = phase('again') # ... and all of them are used again while all exist
for _ in range(3):
    ss[0].send(b'done 0')
print(json.dumps({'first': first, 'second': second}), flush=True)
"""


@pytest.mark.timeout(90)
def test_thousands_of_concurrent_flows(gateway):
    """2000 UDP flows opened together (a mapping each), then every one used again while all are open:
    each keeps its mapping, every outside source is a pool address, and replies reach every socket."""
    n = 2000
    server = subprocess.Popen(["ip", "netns", "exec", lab.NS_OUTSIDE, sys.executable, "-c", _FLOW_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(server, 15).strip() == "ready"
        r = nsrun(lab.NS_INSIDE, sys.executable, "-c", _FLOW_CLIENT, str(n), timeout=60)
        got = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
        seen = json.loads(server.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()
    assert got.get("first", 0) >= 0.95 * n and got.get("second", 0) >= 0.95 * n, (got, r.stderr[-500:])
    both = [v for v in seen.values() if "open" in v and "again" in v]
    assert len(both) >= 0.95 * n
    assert all(v["open"] == v["again"] for v in both), "a flow changed its mapping while all were open"
    mappings = {tuple(v["open"]) for v in both}
    assert len(mappings) == len(both)  # one mapping per flow
    assert all(ipaddress.ip_address(a) in POOL_NET for a, _ in mappings)


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


_TTL_PROBE = """
import json, socket, struct, time
IP_RECVERR = 11
s = socket.socket(2, 2)
s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 2)  # the gateway takes one, the outside host the last
s.setblocking(False)
s.connect(('%s', 33434))
s.send(b'ttl-probe')
t = time.time()
while time.time() - t < 5:
    try:
        data, anc, flags, addr = s.recvmsg(64, 512, socket.MSG_ERRQUEUE)
    except BlockingIOError:
        time.sleep(0.02)
        continue
    for level, kind, raw in anc:
        if level == socket.IPPROTO_IP and kind == IP_RECVERR:
            errno_, origin, typ, code = struct.unpack_from('=IBBB', raw)
            offender = socket.inet_ntoa(raw[20:24])
            print(json.dumps(dict(origin=origin, type=typ, code=code, offender=offender, data=data.decode())))
            raise SystemExit
    break
print(json.dumps(None))
"""


@pytest.fixture
def router_beyond_outside():
    """The outside host forwards to 198.19.0.0/16 (a link of its own, a veth pair inside hp-outside),
    so it answers a packet arriving with TTL 1 with time exceeded."""
    cmds = [["ip", "link", "add", "hp-beyond", "type", "veth", "peer", "name", "hp-beyond1"],
            ["ip", "addr", "add", "198.19.255.1/16", "dev", "hp-beyond"],
            ["ip", "link", "set", "hp-beyond", "up"], ["ip", "link", "set", "hp-beyond1", "up"],
            ["sysctl", "-qw", "net.ipv4.ip_forward=1"], ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]]
    try:
        for c in cmds:
            r = nsrun(lab.NS_OUTSIDE, *c)
            assert r.returncode == 0, r.stderr
        yield
    finally:
        nsrun(lab.NS_OUTSIDE, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        nsrun(lab.NS_OUTSIDE, "ip", "link", "del", "hp-beyond")


@pytest.mark.timeout(60)
def test_time_exceeded_from_outside_reaches_the_inside_socket(gateway, router_beyond_outside, tmp_path):
    """A TTL-limited UDP probe and ping: the outside host's kernel sends time exceeded to the pool
    address; the inside kernel matches the translated error to the sending socket (its embedded
    addresses, ports / identifier and every checksum have to be right for that)."""
    with Capture(tmp_path / "ttl.pcap", "icmp or net 100.64.0.0/10") as cap:
        r = nsrun(lab.NS_INSIDE, sys.executable, "-c", _TTL_PROBE % BEYOND, timeout=30)
        ping = nsrun(lab.NS_INSIDE, "ping", "-n", "-c", "1", "-t", "2", "-W", "3", BEYOND)
    err = json.loads(r.stdout.strip().splitlines()[-1])
    assert err == {"origin": 2, "type": 11, "code": 0, "offender": lab.OUTSIDE_HOSTS[0], "data": "ttl-probe"}, \
        r.stdout + r.stderr
    assert "Time to live exceeded" in ping.stdout and f"From {lab.OUTSIDE_HOSTS[0]}" in ping.stdout, ping.stdout
    assert_only_pool_addresses(cap)
    from scapy.layers.inet import ICMP

    errors = [p for p in cap.ip() if ICMP in p and p[ICMP].type == 11]
    assert len(errors) >= 2 and all(ipaddress.ip_address(p.dst) in POOL_NET for p in errors)
