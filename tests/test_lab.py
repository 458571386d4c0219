"""``hotplane lab``: up, status, traffic, down -- twice in a row, after partial setups and failed tests.

The lab has fixed names (hp-inside, hp-outside, hp-gw); every test starts and
ends with ``lab.down()`` so a failure leaves nothing behind. Traffic stays
between 100.64.0.0/10 and 198.18.0.0/15 inside the lab's namespaces.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess

import pytest

from hotplane.deploy import lab
from hotplane.shared.af_packet import netns_scope

ROOT = os.geteuid() == 0


@pytest.fixture
def clean_lab(request):
    if not ROOT:
        print("skipping: the lab needs root (network namespaces)")
        pytest.skip("the lab needs root (network namespaces): run the tests as root")
    lab.down()
    request.addfinalizer(lab.down)


def ping(ns: str, addr: str, *, wait: float = 2) -> bool:
    p = subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", str(wait), addr], capture_output=True, timeout=10)
    return p.returncode == 0


def udp_peer_seen(dst: str = lab.OUTSIDE_HOSTS[0], port: int = 40999) -> str:
    """Send one UDP datagram hp-inside -> outside host; return the source the outside host saw."""
    with netns_scope(lab.NS_OUTSIDE):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns_scope(lab.NS_INSIDE):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.bind((dst, port))
        srv.settimeout(5)
        cli.sendto(b"hello", (dst, port))
        data, (peer, _) = srv.recvfrom(100)
        assert data == b"hello"
        return peer
    finally:
        srv.close()
        cli.close()


def lab_links_left() -> list[str]:
    """Lab namespaces still present, and hp-* links in the machine's own namespace (there must be none)."""
    left = [ns for ns in lab.NAMESPACES if ns in lab.netns_list()]
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    left += [link["ifname"] for link in json.loads(out or "[]") if link["ifname"].startswith(("hp-in", "hp-out"))]
    return left


def test_cli_usage_exit_codes(capsys):
    assert lab.main(["bogus"]) == 2
    assert lab.main([]) == 2
    assert lab.main(["up", "--colour"]) == 2
    assert lab.main(["--help"]) == 0
    assert "hp-inside" in capsys.readouterr().out


def _status_as_nobody(q) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    try:
        lab.status()
        q.put("no error?!")
    except lab.LabError as e:
        q.put(str(e))
    q.put(str(lab.main(["up"])))


@pytest.mark.skipif(not ROOT, reason="needs root to drop privileges in a child")
def test_not_root_is_a_clear_failure():
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_status_as_nobody, args=(q,))
    p.start()
    try:
        msg, rc = q.get(timeout=20), q.get(timeout=20)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert "needs root" in msg and "sudo" in msg
    assert rc == "1"


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_up_status_traffic_down_twice(clean_lab, capsys):
    for _round in range(2):
        doc = lab.up()
        assert doc["state"] == "up" and doc["mode"] == "dataplane", doc["problems"]
        assert doc["actions"], "a fresh lab must report what it created"
        assert lab.up()["actions"] == []  # idempotent: nothing left to do
        assert lab.main(["status", "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["state"] == "up" and st["links"]["hp-in0"]["mtu"] == 1500
        assert st["links"]["hp-out0"]["host_addresses"] == ["198.18.0.2/24", "198.18.0.3/24"]
        assert any("ping" in line for line in st["how_to"]) and any("iperf3" in line for line in st["how_to"])
        assert lab.main(["status"]) == 0
        assert "send traffic" in capsys.readouterr().out
        # dataplane mode: the hp-gw kernel owns no address, so nothing answers without a gateway
        assert not ping(lab.NS_INSIDE, lab.GW_INSIDE, wait=1)
        # kernel reference mode: the gateway address answers and the kernel forwards
        assert lab.kernel_forwarding(True)
        assert lab.status()["mode"] == "kernel"
        assert ping(lab.NS_INSIDE, lab.GW_INSIDE)
        assert ping(lab.NS_OUTSIDE, lab.GW_OUTSIDE)
        assert ping(lab.NS_INSIDE, lab.OUTSIDE_HOSTS[0]) and ping(lab.NS_INSIDE, lab.OUTSIDE_HOSTS[1])
        assert udp_peer_seen() == lab.INSIDE_HOST  # routed, not translated
        lab.kernel_snat(True)
        assert lab.status()["mode"] == "kernel+snat"
        assert udp_peer_seen(port=41000) == lab.GW_OUTSIDE  # masqueraded
        lab.kernel_forwarding(False)
        doc = lab.status()
        assert doc["mode"] == "dataplane" and not doc["kernel_snat"] and not doc["kernel_forwarding"]
        assert lab.main(["down"]) == 0
        assert "removed hp-inside, hp-outside, hp-gw" in capsys.readouterr().out
        assert lab_links_left() == []
        assert lab.status()["state"] == "down"
        assert lab.down()["removed"] == []  # down twice is fine too


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_up_repairs_a_partial_setup(clean_lab):
    # a setup that died half way: one namespace, a veth half, a wrong MTU, a missing address
    lab.up()
    subprocess.run(["ip", "netns", "del", lab.NS_OUTSIDE], check=True)  # takes hp-out0's peer with it
    subprocess.run(["ip", "-n", lab.NS_GW, "link", "set", lab.GW_IN, "mtu", "1400"], check=True)
    subprocess.run(["ip", "-n", lab.NS_INSIDE, "route", "del", "default"], check=True)
    doc = lab.status()
    assert doc["state"] == "partial"
    assert any("hp-outside missing" in p for p in doc["problems"])
    assert any("MTU 1400" in p for p in doc["problems"])
    assert any("default route" in p for p in doc["problems"])
    assert lab.main(["status"]) == 0
    doc = lab.up(kernel=True)
    assert doc["state"] == "up" and doc["mode"] == "kernel"
    assert "created namespace hp-outside" in doc["actions"]
    assert ping(lab.NS_INSIDE, lab.OUTSIDE_HOSTS[1])
    # only a bare namespace left from a crashed run, plus a stray link name where eth0 belongs
    lab.down()
    subprocess.run(["ip", "netns", "add", lab.NS_GW], check=True)
    subprocess.run(["ip", "netns", "add", lab.NS_INSIDE], check=True)
    subprocess.run(["ip", "-n", lab.NS_INSIDE, "link", "add", "name", "eth0", "type", "veth", "peer", "name", "stray0"], check=True)
    doc = lab.up(kernel=True)
    assert doc["state"] == "up"
    assert any("removed stale hp-inside/eth0" in a for a in doc["actions"])
    assert ping(lab.NS_INSIDE, lab.GW_INSIDE)


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_down_after_a_failed_test_and_up_again(clean_lab):
    lab.up(snat=True)
    # what a failed test leaves: a server still running in a lab namespace
    srv = subprocess.Popen(["ip", "netns", "exec", lab.NS_OUTSIDE, "sleep", "60"])
    try:
        doc = lab.down()
        assert doc["removed"] == list(lab.NAMESPACES)
        assert srv.wait(timeout=10) != 0  # ended by down
        assert any(doc["ended_processes"].values())
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(5)
    assert lab_links_left() == []
    for _ in range(2):
        doc = lab.up()
        assert doc["state"] == "up" and doc["mode"] == "dataplane"
        lab.down()
        assert lab_links_left() == []
