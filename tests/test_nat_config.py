"""NAT gateway configuration: defaults, the lab example, and clear errors naming the key."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import numpy as np
import pytest

from hotplane.shared.nat_config import (
    ConfigError,
    Filtering,
    PortSpec,
    config_from_dict,
    default_config,
    load_config,
    parse_config,
    parse_pool_entry,
)

REPO = Path(__file__).resolve().parent.parent

BASE = """
[gateway]
inside_port = "ring:in"
outside_port = "ring:out"
inside_address = "100.64.0.1/24"
outside_address = "198.18.0.1/24"
"""


def cfg(extra: str, nat: str = 'pool = ["198.18.1.0/28"]') -> str:
    return BASE + "\n[nat]\n" + nat + "\n" + extra


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="t.toml")
    assert str(ei.value).startswith("t.toml: ")
    return ei.value.errors


def one_error(text: str) -> str:
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


def test_default_config() -> None:
    c = default_config()
    assert c.gateway.inside_port == PortSpec("ring", "in")
    assert c.gateway.outside_port == PortSpec("ring", "out")
    assert c.gateway.inside_address == IPv4Interface("100.64.0.1/24")
    assert c.gateway.outside_address.ip == IPv4Address("198.18.0.1")
    assert c.nat.workers == 2 and c.supervisor.workers == 2
    assert c.nat.filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT
    t = c.nat.timeouts
    assert (t.udp, t.tcp_established, t.tcp_transitory, t.icmp, t.port_reuse_hold) == (300, 7440, 240, 60, 120)
    assert c.nat.port_lo == 1024
    assert c.stats.listen == "127.0.0.1:9108"
    pool = c.nat.pool_addresses()
    assert pool.dtype == np.uint32 and len(pool) == 16
    assert int(pool[0]) == int(IPv4Address("198.18.1.0")) and int(pool[-1]) == int(IPv4Address("198.18.1.15"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.nat.workers = 3  # type: ignore[misc]


def test_worker_blocks_match_steering() -> None:
    c = default_config().nat
    assert c.block == (65536 - 1024) // 2
    assert c.worker_port_range(0) == (1024, 1024 + c.block)
    assert c.worker_port_range(1) == (1024 + c.block, 1024 + 2 * c.block)
    for w in range(2):
        lo, hi = c.worker_port_range(w)
        for dport in (lo, hi - 1):
            assert ((dport - c.port_lo) // c.block) % c.workers == w  # CONTRACTS.md steering
    with pytest.raises(ValueError):
        c.worker_port_range(2)
    assert c.per_worker_limit(4096, 3) == 1366 and c.per_worker_limit(0, 3) == 0


def test_lab_example_file() -> None:
    c = load_config(REPO / "deploy" / "gateway.toml")
    assert c.gateway.inside_port == PortSpec("af_packet", "hp-in0")
    assert c.gateway.outside_port == PortSpec("af_packet", "hp-out0")
    assert c.gateway.inside_address.network == IPv4Network("100.64.0.0/24")
    assert c.gateway.outside_address.network == IPv4Network("198.18.0.0/24")
    assert [r.source for r in c.nat.pool] == ["198.18.1.0/28"]
    assert c.nat.static[0].proto == "tcp" and c.nat.static[0].outside_port == 2222


def test_full_config() -> None:
    c = parse_config(cfg("""
[nat.timeouts]
udp = 30
[[nat.static]]
proto = "udp"
inside = "100.64.0.10:53"
outside = "198.18.1.3:53"
[[nat.static]]
inside = "100.64.0.20"
outside = "198.18.5.1"
[[routes]]
prefix = "10.0.0.0/8"
via = "100.64.0.254"
port = "inside"
[[routes]]
prefix = "0.0.0.0/0"
port = "outside"
[stats]
listen = "0.0.0.0:9200"
[supervisor]
restart = "on-failure"
backoff_max = 5
""", nat='pool = ["198.18.1.0/28", "198.18.2.10-198.18.2.12", "198.18.3.1"]\nworkers = 4\n'
         'filtering = "endpoint-independent"\nper_host_ports = 100\nicmp_on_limit = true'))
    assert c.nat.workers == 4 and c.supervisor.workers == 4
    assert c.nat.filtering is Filtering.ENDPOINT_INDEPENDENT
    assert len(c.nat.pool_addresses()) == 16 + 3 + 1
    assert c.nat.timeouts.udp == 30 and c.nat.timeouts.icmp == 60
    fwd, one = c.nat.static
    assert fwd.proto_number == 17 and not fwd.one_to_one and fwd.inside_port == 53
    assert one.one_to_one and one.proto is None and one.outside_addr == IPv4Address("198.18.5.1")
    assert c.routes[0].via == IPv4Address("100.64.0.254") and c.routes[1].via is None
    assert c.stats.port == 9200 and c.supervisor.restart == "on-failure"
    assert c.supervisor.backoff_max == 5.0


@pytest.mark.parametrize("entry,first,last", [
    ("198.18.1.0/28", "198.18.1.0", "198.18.1.15"),
    ("198.18.1.5-198.18.1.9", "198.18.1.5", "198.18.1.9"),
    ("198.18.1.7", "198.18.1.7", "198.18.1.7"),
])
def test_pool_entries(entry: str, first: str, last: str) -> None:
    r = parse_pool_entry(entry)
    assert (str(r.first), str(r.last)) == (first, last)


@pytest.mark.parametrize("nat,expect", [
    ('pool = ["198.18.1.0/28", "198.18.1.0/33"]', 'nat.pool[1]: "198.18.1.0/33" is not an IPv4 prefix'),
    ('pool = ["198.18.1.1/28"]', 'nat.pool[0]: "198.18.1.1/28" has host bits set; did you mean "198.18.1.0/28"?'),
    ('pool = ["198.18.1.9-198.18.1.1"]', "nat.pool[0]: \"198.18.1.9-198.18.1.1\": the range ends before it starts"),
    ('pool = ["198.18.1.0/28", "198.18.1.4-198.18.1.20"]',
     'nat.pool[1]: "198.18.1.4-198.18.1.20" overlaps nat.pool[0]'),
    ('pool = ["100.64.0.0/25"]', "nat.pool[0]: \"100.64.0.0/25\" overlaps the inside network 100.64.0.0/24"),
    ('pool = []', "nat.pool: is empty"),
    ('pool = ["198.16.0.0/16"]', "nat.pool: has 65536 addresses; at most 1024"),
    ('pool = [5]', "nat.pool[0]: expected a string, got an integer 5"),
    ('pool = ["198.18.1.0/28"]\nworkers = 0', "nat.workers: must be from 1 to 64"),
    ('pool = ["198.18.1.0/28"]\nworkers = "2"', "nat.workers: expected an integer, got a string '2'"),
    ('pool = ["198.18.1.0/28"]\nicmp_on_limit = 1', "nat.icmp_on_limit: expected true or false, got an integer 1"),
    ('pool = ["198.18.1.0/28"]\nper_host_ports = -1', "nat.per_host_ports: must be 0 (unlimited) or more"),
    ('pool = ["198.18.1.0/28"]\nport_lo = 65500\nworkers = 1', "nat.port_lo: must be from 1 to"),
    ('pool = ["198.18.1.0/28"]\nport_lo = 62000\nworkers = 64', "nat.workers: 64 workers leave 55 ports each"),
    ('pool = ["198.18.1.0/28"]\nfiltering = "endpoint-independant"',
     'nat.filtering: "endpoint-independant" is not a filtering mode; did you mean "endpoint-independent"?'),
    ('pool = ["198.18.1.0/28"]\ntimouts = {udp = 5}', 'nat.timouts: unknown key; did you mean "timeouts"?'),
    ('pool = ["198.18.1.0/28"]\n[nat.timeouts]\nudp = 0', "nat.timeouts.udp: must be a whole number of seconds"),
    ('pool = ["198.18.1.0/28"]\n[nat.timeouts]\ntcp_transitory = 8000',
     "nat.timeouts.tcp_transitory: 8000 s is longer than tcp_established"),
    ('pool = ["198.18.1.0/28"]\n[nat.timeouts]\nudpp = 5', 'nat.timeouts.udpp: unknown key; did you mean "udp"?'),
])
def test_nat_errors(nat: str, expect: str) -> None:
    msg = one_error(cfg("", nat=nat))
    assert msg.startswith(expect), msg


@pytest.mark.parametrize("extra,expect", [
    ('[[nat.static]]\nproto = "tcp"\ninside = "100.64.0.5:22"\noutside = "198.18.9.9:22"',
     "nat.static[0].outside: 198.18.9.9 is neither gateway.outside_address nor in nat.pool"),
    ('[[nat.static]]\ninside = "100.64.0.5:22"\noutside = "198.18.0.1:22"',
     'nat.static[0].proto: missing; a port forward needs proto = "tcp" or "udp"'),
    ('[[nat.static]]\nproto = "sctp"\ninside = "100.64.0.5:22"\noutside = "198.18.0.1:22"',
     'nat.static[0].proto: "sctp" must be "tcp" or "udp"'),
    ('[[nat.static]]\nproto = "tcp"\ninside = "100.64.0.5"\noutside = "198.18.0.1:22"',
     "nat.static[0]: give a port on both inside and outside"),
    ('[[nat.static]]\ninside = "100.64.0.5"\noutside = "198.18.1.3"',
     "nat.static[0].outside: 198.18.1.3 is in nat.pool; a 1:1 address must not be shared"),
    ('[[nat.static]]\ninside = "100.64.0.5"\noutside = "198.18.0.1"',
     "nat.static[0].outside: 198.18.0.1 is the gateway's own outside address"),
    ('[[nat.static]]\nproto = "tcp"\ninside = "100.64.0.5:70000"\noutside = "198.18.0.1:22"',
     'nat.static[0].inside: "100.64.0.5:70000": the port must be a number from 1 to 65535'),
    ('[[nat.static]]\nproto = "tcp"\ninside = "100.64.0.5:22"\noutside = "198.18.0.1:22"\n'
     '[[nat.static]]\nproto = "tcp"\ninside = "100.64.0.6:22"\noutside = "198.18.0.1:22"',
     'nat.static[1].outside: "198.18.0.1:22" is already mapped by nat.static[0]'),
    ('[[routes]]\nprefix = "10.0.0.1/8"\nport = "inside"', 'routes[0].prefix: "10.0.0.1/8" has host bits set; did you mean "10.0.0.0/8"?'),
    ('[[routes]]\nprefix = "10.0.0.0/8"\nport = "inside"\nvia = "198.18.0.9"',
     "routes[0].via: 198.18.0.9 is not on the inside network 100.64.0.0/24"),
    ('[[routes]]\nprefix = "10.0.0.0/8"\nport = "insde"', 'routes[0].port: "insde" is not a port'),
    ('[[routes]]\nport = "inside"', "routes[0].prefix: missing; this key is required"),
    ('[[routes]]\nprefix = "10.0.0.0/8"\nport = "inside"\n[[routes]]\nprefix = "10.0.0.0/8"\nport = "outside"',
     "routes[1].prefix: 10.0.0.0/8 is already routed"),
    ('[stats]\nlisten = "localhost"', 'stats.listen: "localhost" is not "address:port"'),
    ('[supervisor]\nworkers = 3', "supervisor.workers: is 3 but nat.workers is 2"),
    ('[supervisor]\nrestart = "sometimes"', 'supervisor.restart: "sometimes" is not a restart policy'),
    ('[supervisor]\nbackoff_initial = 5\nbackoff_max = 1', "supervisor.backoff_max: 1.0 is below backoff_initial"),
    ('[supervisr]\nrestart = "always"', 'supervisr: unknown key; did you mean "supervisor"?'),
])
def test_section_errors(extra: str, expect: str) -> None:
    msg = one_error(cfg(extra))
    assert msg.startswith(expect), msg


@pytest.mark.parametrize("gateway,expect", [
    ('inside_port = "ring:in"\noutside_port = "tap:x"', 'gateway.outside_port: "tap:x" is not a port'),
    ('inside_port = "af_packet:this-name-is-too-long"\noutside_port = "ring:out"', "gateway.inside_port: "),
    ('inside_port = "ring:in"\noutside_port = "ring:in"', 'gateway.outside_port: "ring:in" is also the inside port'),
])
def test_port_errors(gateway: str, expect: str) -> None:
    text = (f'[gateway]\n{gateway}\ninside_address = "100.64.0.1/24"\noutside_address = "198.18.0.1/24"\n'
            '[nat]\npool = ["198.18.1.0/28"]\n')
    msg = one_error(text)
    assert msg.startswith(expect), msg


def test_address_and_mac_errors() -> None:
    text = ('[gateway]\ninside_port = "ring:in"\noutside_port = "ring:out"\ninside_address = "100.64.0.0/24"\n'
            'outside_address = "198.18.0.300/24"\ninside_mac = "02:00:00:00:00"\n[nat]\npool = ["198.18.1.0/28"]\n')
    errs = errors_of(text)
    assert any(e.startswith("gateway.inside_mac: \"02:00:00:00:00\" is not a MAC address") for e in errs), errs
    assert any(e.startswith('gateway.outside_address: "198.18.0.300/24" is not an IPv4 address') for e in errs)
    assert any(e.startswith('gateway.inside_address: "100.64.0.0/24" is the network address') for e in errs)
    ok = parse_config(BASE.replace('"ring:out"', '"ring:out"\ninside_mac = "02:AA:00:00:00:01"') +
                      '[nat]\npool = ["198.18.1.0/28"]\n')
    assert ok.gateway.inside_mac == bytes([2, 0xAA, 0, 0, 0, 1]) and ok.gateway.outside_mac is None


def test_overlapping_sides_and_missing_sections() -> None:
    msg = one_error(BASE.replace("198.18.0.1/24", "100.64.0.129/25") + '[nat]\npool = ["198.18.1.0/28"]\n')
    assert msg.startswith("gateway.outside_address: 100.64.0.128/25 overlaps the inside network")
    errs = errors_of("")
    assert "gateway: missing; the [gateway] table (ports and addresses) is required" in errs
    assert any(e.startswith("nat: missing") for e in errs)
    assert "nat.pool: missing; this key is required" in errors_of(BASE + "[nat]\nworkers = 1\n")


def test_misspelt_key_reports_the_typo_and_the_missing_key() -> None:
    errs = errors_of(cfg('[[nat.static]]\nproto = "tcp"\ninside = "100.64.0.5:22"\noutsde = "198.18.0.1:22"'))
    assert errs == ['nat.static[0].outsde: unknown key; did you mean "outside"?',
                    "nat.static[0].outside: missing; this key is required"]


def test_unknown_key_without_close_match_lists_keys() -> None:
    msg = one_error(cfg("", nat='pool = ["198.18.1.0/28"]\nzzz = 1'))
    assert msg.startswith("nat.zzz: unknown key; the keys here are: pool, port_lo")


def test_many_errors_reported_together() -> None:
    errs = errors_of(cfg('[stats]\nlisten = "x"\n', nat='pool = ["bad"]\nworkers = 999\nfiltering = "open"'))
    assert len(errs) == 4, errs
    paths = sorted(e.split(":", 1)[0] for e in errs)
    assert paths == ["nat.filtering", "nat.pool[0]", "nat.workers", "stats.listen"]


def test_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("[gateway\n", source="broken.toml")
    assert "broken.toml: 1 configuration error" in str(ei.value) and "not valid TOML" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "absent.toml")
    assert "cannot read the file" in str(ei.value)
    p = tmp_path / "g.toml"
    p.write_text(cfg(""))
    assert load_config(p).source == str(p)


def test_config_from_dict_wrong_types() -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"gateway": [], "nat": {"pool": "198.18.1.0/28"}})
    errs = ei.value.errors
    assert any(e.startswith("gateway: expected a table, got an array") for e in errs), errs


@pytest.mark.parametrize("value,expect", [
    ("1000", "nat.max_sessions: must be 0 (the default size) or from 1024 to 1_073_741_824"),
    ("2_000_000_000", "nat.max_sessions: must be 0 (the default size) or from 1024 to 1_073_741_824"),
    ("-1", "nat.max_sessions: must be 0 (the default size) or from 1024"),
    ('"10M"', "nat.max_sessions: expected an integer, got a string '10M'"),
])
def test_max_sessions_errors(value: str, expect: str) -> None:
    msg = one_error(cfg("", nat=f'pool = ["198.18.1.0/28"]\nmax_sessions = {value}'))
    assert msg.startswith(expect), msg


def test_max_sessions_sizes_the_session_zones() -> None:
    from hotplane.secondary.nat_pipeline import DEFAULT_TABLE_CAPACITY, MAX_LOAD, table_capacity_for

    assert parse_config(cfg("")).nat.max_sessions == 0
    assert table_capacity_for(parse_config(cfg(""))) == DEFAULT_TABLE_CAPACITY
    c = parse_config(cfg("", nat='pool = ["198.18.1.0/28"]\nworkers = 2\nmax_sessions = 10_000_000'))
    assert c.nat.max_sessions == 10_000_000
    cap = table_capacity_for(c)  # per worker: 5M sessions (plus the refusal margin) at MAX_LOAD, exactly
    assert cap * MAX_LOAD >= 5_000_000 + 512 and cap * MAX_LOAD < 5_000_000 * 1.001
