"""``hotplane lab up|down|status``: a network-namespace lab to run the gateway in.

Topology (every name starts with ``hp-`` so nothing collides with the host)::

    hp-inside                      hp-gw                        hp-outside
    eth0 100.64.0.2/24  <-veth->  hp-in0   [gateway]  hp-out0  <-veth->  eth0 198.18.0.2/24
    default via 100.64.0.1        (no kernel addresses in                 198.18.0.3/24
                                   dataplane mode)                        198.18.1.0/28 via 198.18.0.1
                                                                          100.64.0.0/10 via 198.18.0.1

* ``hp-gw`` holds the gateway's ends, so the gateway never touches the
  machine's own interfaces: run it with ``ip netns exec hp-gw hotplane ...``
  on ports ``af_packet:hp-in0`` and ``af_packet:hp-out0``. Its addresses are
  ``GW_INSIDE`` (100.64.0.1) and ``GW_OUTSIDE`` (198.18.0.1); the public pool
  ``PUBLIC_POOL`` (198.18.1.0/28) is routed to it from the outside host, and
  so is the inside prefix 100.64.0.0/10, so a routing-only (no NAT) gateway
  can be measured too (a NAT test checks the source the outside host sees).
* Dataplane mode (default): the ``hp-gw`` kernel has no IPv4 addresses and does
  not forward, so only the userspace gateway answers ARP/ICMP and forwards.
  Kernel mode (``up --kernel``, :func:`kernel_forwarding`) gives the ``hp-gw``
  kernel the gateway addresses and ``ip_forward=1``: the reference that
  benchmarks compare against; ``--snat`` (:func:`kernel_snat`) adds an nft
  masquerade rule (table ``ip hotplane_lab``) toward the outside.
* MTU 1500; IPv6 is disabled in all three namespaces (no ND/MLD noise on the
  gateway's ports); with ``ethtool`` installed, checksum offload, TSO, GSO and
  GRO are turned off on every veth end, so AF_PACKET never sees a frame larger
  than the MTU and hosts send complete checksums (the receiving kernels verify
  what the gateway rewrites). Without ``ethtool`` that step is skipped and
  reported as a problem by ``status``: install it (``apt-get install -y
  ethtool``).

``up`` is idempotent: it checks each piece and creates or repairs only what is
missing or wrong, then sets the requested mode. ``down`` ends the processes
still running inside the three namespaces (a leftover iperf3 or gateway
would keep a deleted namespace and its links alive) and deletes the
namespaces, which removes everything the lab made. The names are fixed, so two
labs cannot run on one machine at once; ``up``/``down`` take a lock so
concurrent callers do not interleave.

Exit codes: 0 ok, 1 failure (with a message), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

NS_INSIDE = "hp-inside"
NS_OUTSIDE = "hp-outside"
NS_GW = "hp-gw"
NAMESPACES = (NS_INSIDE, NS_OUTSIDE, NS_GW)
GW_IN = "hp-in0"
GW_OUT = "hp-out0"
HOST_IF = "eth0"
MTU = 1500

INSIDE_HOST = "100.64.0.2"
GW_INSIDE = "100.64.0.1"
OUTSIDE_HOSTS = ("198.18.0.2", "198.18.0.3")
GW_OUTSIDE = "198.18.0.1"
PREFIX_LEN = 24
PUBLIC_POOL = "198.18.1.0/28"
INSIDE_PREFIX = "100.64.0.0/10"  # routed back via the gateway too, for routing-only (no NAT) runs
NFT_TABLE = "hotplane_lab"

# (gateway end in hp-gw, host namespace, host addresses)
PAIRS = ((GW_IN, NS_INSIDE, (INSIDE_HOST,), GW_INSIDE), (GW_OUT, NS_OUTSIDE, OUTSIDE_HOSTS, GW_OUTSIDE))
OFFLOADS = {"tx-checksumming": "tx", "tcp-segmentation-offload": "tso", "generic-segmentation-offload": "gso", "generic-receive-offload": "gro"}
LOCK_PATH = "/run/hotplane-lab.lock"
CMD_TIMEOUT = 30


class LabError(RuntimeError):
    """The lab could not be brought to the requested state; the message says why."""


# --- running commands ----------------------------------------------------------------


def _run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=CMD_TIMEOUT, input=stdin)
    except FileNotFoundError:
        raise LabError(f"`{args[0]}` is not installed: apt-get install -y iproute2 nftables ethtool") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(args)}` did not finish in {CMD_TIMEOUT} s") from None
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {(p.stderr or p.stdout).strip()}")
    return p


def _ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", "-n", ns, *args, check=check)


def _in_ns(ns: str, *cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    return _run("ip", "netns", "exec", ns, *cmd, check=check, stdin=stdin)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces and veth links): run it with sudo")
    if shutil.which("ip") is None:
        raise LabError("`ip` is not installed: apt-get install -y iproute2")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- looking at what exists ---------------------------------------------------------------


def netns_list() -> set[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = _run("ip", "-j", "netns", "list", check=False).stdout.strip()
    try:
        return {e["name"] for e in json.loads(out)} if out else set()
    except (ValueError, KeyError, TypeError):
        return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link(ns: str, name: str) -> dict | None:
    p = _ip(ns, "-j", "-d", "link", "show", "dev", name, check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return None
    return json.loads(p.stdout)[0]


def _addrs(ns: str, name: str) -> set[str]:
    p = _ip(ns, "-j", "-4", "addr", "show", "dev", name, check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return set()
    return {f"{a['local']}/{a['prefixlen']}" for e in json.loads(p.stdout) for a in e.get("addr_info", [])}


def _routes(ns: str) -> set[str]:
    p = _ip(ns, "-j", "-4", "route", "show", check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return set()
    return {f"{r['dst']} via {r['gateway']}" for r in json.loads(p.stdout) if "gateway" in r}


def _sysctl(ns: str, key: str) -> str | None:
    p = _in_ns(ns, "sysctl", "-n", key, check=False)
    return p.stdout.strip() if p.returncode == 0 else None


def _pair_ok(gw_if: str, host_ns: str) -> bool:
    """Is ``gw_if`` in hp-gw a veth whose peer is ``eth0`` in ``host_ns``?"""
    gw, host = _link(NS_GW, gw_if), _link(host_ns, HOST_IF)
    if not gw or not host:
        return False
    kinds = (gw.get("linkinfo", {}).get("info_kind"), host.get("linkinfo", {}).get("info_kind"))
    return kinds == ("veth", "veth") and gw.get("link_index") == host.get("ifindex") and host.get("link_index") == gw.get("ifindex")


def _offloads_off(ns: str, dev: str) -> list[str]:
    """Offload features still on (empty when all are off; ['ethtool missing'] without ethtool)."""
    if shutil.which("ethtool") is None:
        return ["ethtool missing"]
    p = _in_ns(ns, "ethtool", "-k", dev, check=False)
    on = []
    for line in p.stdout.splitlines():
        name, _, val = line.partition(":")
        if name.strip() in OFFLOADS and val.strip().startswith("on"):
            on.append(name.strip())
    return on


def _snat_on() -> bool:
    if shutil.which("nft") is None:
        return False
    return _in_ns(NS_GW, "nft", "list", "table", "ip", NFT_TABLE, check=False).returncode == 0


def status() -> dict[str, Any]:
    """What exists, what is wrong, and how to send traffic through it."""
    _require_root()
    present = netns_list()
    doc: dict[str, Any] = {"namespaces": {ns: ns in present for ns in NAMESPACES}, "links": {}, "problems": []}
    problems: list[str] = doc["problems"]
    for ns in NAMESPACES:
        if ns not in present:
            problems.append(f"namespace {ns} missing")
    gw_present = NS_GW in present
    kernel_addrs = False
    for gw_if, host_ns, hosts, gw_addr in PAIRS:
        entry: dict[str, Any] = {"gateway_end": f"{NS_GW}/{gw_if}", "host_end": f"{host_ns}/{HOST_IF}"}
        doc["links"][gw_if] = entry
        if not (gw_present and host_ns in present):
            entry["ok"] = False
            continue
        ok = _pair_ok(gw_if, host_ns)
        entry["paired"] = ok
        if not ok:
            problems.append(f"veth {NS_GW}/{gw_if} <-> {host_ns}/{HOST_IF} missing or miswired")
            entry["ok"] = False
            continue
        gw, host = _link(NS_GW, gw_if), _link(host_ns, HOST_IF)
        entry.update(gateway_mac=gw["address"], host_mac=host["address"], mtu=gw["mtu"])
        for side_ns, dev, info in ((NS_GW, gw_if, gw), (host_ns, HOST_IF, host)):
            if "UP" not in info.get("flags", []):
                problems.append(f"{side_ns}/{dev} is down")
            if info.get("mtu") != MTU:
                problems.append(f"{side_ns}/{dev} has MTU {info.get('mtu')}, want {MTU}")
            still_on = _offloads_off(side_ns, dev)
            if still_on:
                problems.append(f"{side_ns}/{dev} offloads on: {', '.join(still_on)}")
        want = {f"{h}/{PREFIX_LEN}" for h in hosts}
        have = _addrs(host_ns, HOST_IF)
        entry["host_addresses"] = sorted(have)
        if not want <= have:
            problems.append(f"{host_ns}/{HOST_IF} lacks {', '.join(sorted(want - have))}")
        gw_have = _addrs(NS_GW, gw_if)
        entry["gateway_kernel_addresses"] = sorted(gw_have)
        kernel_addrs |= f"{gw_addr}/{PREFIX_LEN}" in gw_have
    if NS_INSIDE in present and f"default via {GW_INSIDE}" not in _routes(NS_INSIDE):
        problems.append(f"{NS_INSIDE} has no default route via {GW_INSIDE}")
    if NS_OUTSIDE in present:
        routes = _routes(NS_OUTSIDE)
        for prefix in (PUBLIC_POOL, INSIDE_PREFIX):
            if f"{prefix} via {GW_OUTSIDE}" not in routes:
                problems.append(f"{NS_OUTSIDE} has no route {prefix} via {GW_OUTSIDE}")
    forwarding = gw_present and _sysctl(NS_GW, "net.ipv4.ip_forward") == "1"
    snat = gw_present and _snat_on()
    if not any(doc["namespaces"].values()):
        doc["state"] = "down"
    else:
        doc["state"] = "up" if not problems else "partial"
    if doc["state"] == "down":
        doc["mode"] = None
    else:
        doc["mode"] = ("kernel+snat" if snat else "kernel") if (forwarding and kernel_addrs) else "dataplane"
    doc["kernel_forwarding"] = bool(forwarding)
    doc["kernel_snat"] = bool(snat)
    doc["addresses"] = {
        "inside_host": f"{INSIDE_HOST}/{PREFIX_LEN}",
        "gateway_inside": GW_INSIDE,
        "gateway_outside": GW_OUTSIDE,
        "outside_hosts": [f"{h}/{PREFIX_LEN}" for h in OUTSIDE_HOSTS],
        "public_pool": PUBLIC_POOL,
        "inside_prefix_routed_from_outside": INSIDE_PREFIX,
    }
    doc["how_to"] = _how_to(doc["mode"])
    return doc


def _how_to(mode: str | None) -> list[str]:
    gw = (
        f"the hp-gw kernel forwards ({mode}); `hotplane lab up` returns the gateway to the dataplane"
        if mode and mode != "dataplane"
        else f"start the gateway in hp-gw: ip netns exec {NS_GW} hotplane ... with ports af_packet:{GW_IN} (inside) and af_packet:{GW_OUT} (outside)"
    )
    return [
        gw,
        f"ping:   ip netns exec {NS_INSIDE} ping -c 3 {OUTSIDE_HOSTS[0]}   (the gateway itself: ping -c 3 {GW_INSIDE})",
        f"iperf3: ip netns exec {NS_OUTSIDE} iperf3 -s -1 -B {OUTSIDE_HOSTS[0]} & ip netns exec {NS_INSIDE} iperf3 -c {OUTSIDE_HOSTS[0]} -t 5",
        f"STUN-style: the outside host answers on both {OUTSIDE_HOSTS[0]} and {OUTSIDE_HOSTS[1]}",
        # Sink first (it counts from its READY on), then the generator; exact loss through the report file.
        f"hotplane gen: ip netns exec {NS_OUTSIDE} hotplane sink -- --port af_packet:{HOST_IF} --idle-exit 2 --duration 60 --expect /tmp/hp-gen.json"
        f" & ip netns exec {NS_INSIDE} hotplane gen -- --port af_packet:{HOST_IF} --src {INSIDE_HOST} --dst {OUTSIDE_HOSTS[0]}"
        f" --flows 16 --rate 10000 --duration 5 --report /tmp/hp-gen.json",
        f"capture:  ip netns exec {NS_INSIDE} tcpdump -ni {HOST_IF}",
    ]


# --- making it so ----------------------------------------------------------------------------


def _ensure_netns(ns: str, actions: list[str]) -> None:
    if ns not in netns_list():
        _run("ip", "netns", "add", ns)
        actions.append(f"created namespace {ns}")
    for key in ("all", "default"):
        _in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
    _ip(ns, "link", "set", "lo", "up")


def _ensure_pair(gw_if: str, host_ns: str, actions: list[str]) -> None:
    if not _pair_ok(gw_if, host_ns):
        # remove whichever half survived a partial setup, then make the pair in place
        for ns, dev in ((NS_GW, gw_if), (host_ns, HOST_IF)):
            if _link(ns, dev) is not None:
                _ip(ns, "link", "del", "dev", dev)
                actions.append(f"removed stale {ns}/{dev}")
        _ip(NS_GW, "link", "add", "name", gw_if, "mtu", str(MTU), "type", "veth", "peer", "name", HOST_IF, "netns", host_ns, "mtu", str(MTU))
        actions.append(f"created veth {NS_GW}/{gw_if} <-> {host_ns}/{HOST_IF}")
    for ns, dev in ((NS_GW, gw_if), (host_ns, HOST_IF)):
        _ip(ns, "link", "set", "dev", dev, "mtu", str(MTU), "up")
        if shutil.which("ethtool") is not None and _offloads_off(ns, dev):
            # each feature on its own: one fixed feature must not stop the others
            for flag in OFFLOADS.values():
                _in_ns(ns, "ethtool", "-K", dev, flag, "off", check=False)
            actions.append(f"offloads off on {ns}/{dev}")


def _ensure_host_addresses(actions: list[str]) -> None:
    for _gw_if, host_ns, hosts, _gw in PAIRS:
        have = _addrs(host_ns, HOST_IF)
        for h in hosts:
            if f"{h}/{PREFIX_LEN}" not in have:
                _ip(host_ns, "addr", "replace", f"{h}/{PREFIX_LEN}", "dev", HOST_IF)
                actions.append(f"address {h}/{PREFIX_LEN} on {host_ns}/{HOST_IF}")
    _ip(NS_INSIDE, "route", "replace", "default", "via", GW_INSIDE, "dev", HOST_IF)
    for prefix in (PUBLIC_POOL, INSIDE_PREFIX):
        _ip(NS_OUTSIDE, "route", "replace", prefix, "via", GW_OUTSIDE, "dev", HOST_IF)


def up(*, kernel: bool = False, snat: bool = False) -> dict[str, Any]:
    """Create or repair the lab; ``kernel``/``snat`` pick the hp-gw kernel's role. Returns :func:`status` plus ``actions``."""
    _require_root()
    actions: list[str] = []
    with _locked():
        for ns in NAMESPACES:
            _ensure_netns(ns, actions)
        for gw_if, host_ns, _hosts, _gw in PAIRS:
            _ensure_pair(gw_if, host_ns, actions)
        _ensure_host_addresses(actions)
        _set_kernel_mode(forward=kernel or snat, snat=snat, actions=actions)
    doc = status()
    doc["actions"] = actions
    if doc["state"] != "up":
        raise LabError("lab is not fully up: " + "; ".join(doc["problems"]))
    return doc


def _ns_pids(ns: str) -> list[int]:
    out = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]


def _end_processes(ns: str, grace: float = 3.0) -> list[int]:
    """SIGTERM what still runs inside ``ns`` (then SIGKILL after ``grace`` s); return the pids."""
    pids = _ns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes; its parent reaps it
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def down() -> dict[str, Any]:
    """Remove everything the lab made: processes left inside its namespaces, then the namespaces."""
    _require_root()
    removed, ended = [], {}
    with _locked():
        present = netns_list()
        for ns in NAMESPACES:
            if ns not in present:
                continue
            pids = _end_processes(ns)
            if pids:
                ended[ns] = pids
            _run("ip", "netns", "del", ns)
            removed.append(ns)
        left = [ns for ns in NAMESPACES if ns in netns_list()]
    if left:
        raise LabError(f"could not remove namespaces {', '.join(left)}")
    return {"state": "down", "removed": removed, "ended_processes": ended}


# --- kernel reference modes ---------------------------------------------------------------------


def _require_up() -> None:
    present = netns_list()
    missing = [ns for ns in NAMESPACES if ns not in present]
    if missing or not all(_pair_ok(gw_if, host_ns) for gw_if, host_ns, _h, _g in PAIRS):
        raise LabError("the lab is not up: run `hotplane lab up` first")


def _set_kernel_mode(*, forward: bool, snat: bool, actions: list[str]) -> None:
    for gw_if, _host_ns, _hosts, gw_addr in PAIRS:
        addr = f"{gw_addr}/{PREFIX_LEN}"
        have = _addrs(NS_GW, gw_if)
        if forward and addr not in have:
            _ip(NS_GW, "addr", "replace", addr, "dev", gw_if)
            actions.append(f"kernel address {addr} on {NS_GW}/{gw_if}")
        if not forward:
            for extra in sorted(have):
                _ip(NS_GW, "addr", "del", extra, "dev", gw_if)
                actions.append(f"removed kernel address {extra} from {NS_GW}/{gw_if}")
    want = "1" if forward else "0"
    if _sysctl(NS_GW, "net.ipv4.ip_forward") != want:
        _in_ns(NS_GW, "sysctl", "-qw", f"net.ipv4.ip_forward={want}")
        actions.append(f"ip_forward={want} in {NS_GW}")
    on = _snat_on()
    if snat and not on:
        if shutil.which("nft") is None:
            raise LabError("kernel SNAT needs nft: apt-get install -y nftables")
        rules = (
            f"table ip {NFT_TABLE} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{GW_OUT}" masquerade\n'
            f"  }}\n"
            f"}}\n"
        )
        _in_ns(NS_GW, "nft", "-f", "-", stdin=rules)
        actions.append(f"nft masquerade toward {GW_OUT} in {NS_GW}")
    elif not snat and on:
        _in_ns(NS_GW, "nft", "delete", "table", "ip", NFT_TABLE)
        actions.append(f"removed nft table {NFT_TABLE} in {NS_GW}")


def kernel_forwarding(enable: bool) -> list[str]:
    """Let the hp-gw kernel route between the ports (the benchmark reference), or stop it.

    Enabling gives hp-in0/hp-out0 the gateway addresses and sets ip_forward=1;
    disabling removes them (and any kernel SNAT) so the userspace gateway owns
    the addresses again. Returns what changed.
    """
    _require_root()
    actions: list[str] = []
    with _locked():
        _require_up()
        _set_kernel_mode(forward=enable, snat=enable and _snat_on(), actions=actions)
    return actions


def kernel_snat(enable: bool) -> list[str]:
    """Masquerade traffic leaving hp-out0 in the hp-gw kernel (enabling also enables forwarding).

    Disabling removes only the nft table; forwarding stays as it was.
    """
    _require_root()
    actions: list[str] = []
    with _locked():
        _require_up()
        forwarding = _sysctl(NS_GW, "net.ipv4.ip_forward") == "1"
        _set_kernel_mode(forward=enable or forwarding, snat=enable, actions=actions)
    return actions


# --- command line ---------------------------------------------------------------------------------


def _print_status(doc: dict[str, Any]) -> None:
    print(f"lab: {doc['state']}" + (f"  (gateway: {doc['mode']})" if doc["mode"] else ""))
    for ns, ok in doc["namespaces"].items():
        print(f"  namespace {ns:<11} {'present' if ok else 'missing'}")
    for name, link in doc["links"].items():
        if link.get("paired"):
            kaddr = ", ".join(link["gateway_kernel_addresses"]) or "none"
            print(
                f"  {link['gateway_end']} ({link['gateway_mac']}) <-> {link['host_end']} ({link['host_mac']})"
                f"  mtu {link['mtu']}  host {', '.join(link['host_addresses'])}  hp-gw kernel addresses: {kaddr}"
            )
        else:
            print(f"  {link['gateway_end']} <-> {link['host_end']}: missing")
    for p in doc["problems"]:
        print(f"  problem: {p}")
    if doc["state"] == "up":
        a = doc["addresses"]
        print(
            f"addresses: inside host {a['inside_host']} (default via {a['gateway_inside']}), "
            f"outside hosts {', '.join(a['outside_hosts'])}, gateway {a['gateway_inside']} / {a['gateway_outside']}, "
            f"public pool {a['public_pool']} routed to the gateway"
        )
        print("send traffic:")
        for line in doc["how_to"]:
            print(f"  {line}")
    elif doc["state"] == "partial":
        print("repair with: hotplane lab up   (or remove with: hotplane lab down)")
    else:
        print("create it with: hotplane lab up")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hotplane lab", description="network-namespace lab for the gateway (hp-inside, hp-gw, hp-outside)")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create or repair the lab (idempotent)")
    u.add_argument("--kernel", action="store_true", help="let the hp-gw kernel forward (reference mode) instead of the dataplane")
    u.add_argument("--snat", action="store_true", help="kernel masquerade toward the outside (implies --kernel)")
    u.add_argument("--json", action="store_true")
    d = sub.add_parser("down", help="remove everything the lab made")
    d.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="what exists and how to send traffic through it")
    s.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """``hotplane lab up|down|status [--json]``: 0 ok, 1 failure, 2 usage."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0, bad usage 2
        return int(e.code or 0)
    try:
        if args.cmd == "up":
            doc = up(kernel=args.kernel, snat=args.snat)
        elif args.cmd == "down":
            doc = down()
        else:
            doc = status()
    except LabError as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}))
        else:
            print(f"hotplane lab {args.cmd}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.cmd == "down":
        print(f"lab down: removed {', '.join(doc['removed']) or 'nothing (it was not up)'}")
        for ns, pids in doc["ended_processes"].items():
            print(f"  ended processes in {ns}: {' '.join(map(str, pids))}")
    else:
        for a in doc.get("actions", []):
            print(f"  {a}")
        _print_status(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
