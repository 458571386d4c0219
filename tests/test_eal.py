"""EAL option parsing: the same rules for every process, exit code 2 on bad input."""

import os
import subprocess
import sys

import pytest

from hotplane.shared.eal import UsageError, parse_eal, parse_lcores


def test_defaults_and_app_args():
    o = parse_eal(["--", "--json", "x"])
    assert o.file_prefix == "hotplane" and o.proc_type == "auto"
    assert o.app_args == ["--json", "x"]
    assert o.memory_bytes == 256 << 20


def test_all_options():
    o = parse_eal(["--file-prefix", "gw1", "--proc-type", "primary", "--huge-dir", "/dev/hugepages", "--socket-mem", "64,64",
                   "--base-virtaddr", "0x200000000000", "--lcores", "0"])
    assert o.socket_mem_mb == 128
    assert o.base_virtaddr == 0x200000000000
    assert o.lcores == [0]
    with pytest.raises(UsageError, match="--vdev ring:in is not supported"):
        parse_eal(["--vdev", "ring:in"])
    assert parse_eal(o.to_argv()).to_argv() == o.to_argv()


@pytest.mark.parametrize("argv,needle", [
    (["--bogus"], "unknown EAL option"),
    (["--no-huge", "--huge-dir", "/x"], "contradict"),
    (["--proc-type", "secondary", "--socket-mem", "64"], "--socket-mem is the primary's choice"),
    (["--proc-type", "secondary", "--no-huge"], "--no-huge is the primary's choice"),
    (["--proc-type", "bogus"], "invalid choice"),
    (["--socket-mem", "0"], "positive"),
    (["--socket-mem", "lots"], "megabytes"),
    (["--base-virtaddr", "0x1234"], "2 MiB aligned"),
    (["--base-virtaddr", "0x7f0000000000"], "outside"),
    (["--file-prefix", "a/b"], "--file-prefix"),
    (["--lcores", "3-1"], "backwards"),
    (["--lcores", "999"], "not available"),
])
def test_bad_options(argv, needle):
    with pytest.raises(UsageError, match=needle):
        parse_eal(argv)


def test_role_is_the_default_and_auto_is_kept_for_eal_init():
    assert parse_eal([], role="primary").proc_type == "primary"
    o = parse_eal(["--proc-type", "auto"], role="secondary")
    assert (o.proc_type, o.role) == ("auto", "secondary")
    with pytest.raises(UsageError, match="contradicts this command"):
        parse_eal(["--proc-type", "secondary"], role="primary")
    # A command that only ever runs as a secondary takes no primary-only option, auto or not.
    with pytest.raises(UsageError, match="--no-huge is the primary's choice"):
        parse_eal(["--proc-type", "auto", "--no-huge"], role="secondary")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cmd,wrong", [("primary", "secondary"), ("memzones", "primary"), ("worker", "primary")])
def test_cli_contradictory_proc_type_exit_2(cmd, wrong):
    r = subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", cmd, "--proc-type", wrong], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"--proc-type {wrong} contradicts this command" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(120)
def test_cli_proc_type_auto(instance):
    """auto is the primary while no primary of the prefix runs, else a secondary (DPDK's rule)."""
    import json
    import signal

    p, info = instance.start_primary("--proc-type", "auto", "--socket-mem", "8", "--no-huge")
    assert info["proc_type"] == "primary" and info["created"]
    r = instance.run(["memzones", *instance.eal("--proc-type", "auto"), "--", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["proc_type"] == "secondary"
    # A primary runs, so auto means secondary, which `hotplane primary` cannot be.
    r = instance.run(["primary", *instance.eal("--proc-type", "auto", "--no-huge"), "--", "--bare"])
    assert r.returncode == 1 and f"already running (pid {p.pid})" in r.stderr and "would be a secondary" in r.stderr, r.stderr
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    # No primary runs, so auto means primary, which `hotplane memzones` cannot be; an explicit
    # secondary still reads the memory the primary left.
    r = instance.run(["memzones", *instance.eal("--proc-type", "auto")])
    assert r.returncode == 1 and "would be the primary" in r.stderr and "--proc-type secondary" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = instance.run(["memzones", *instance.eal("--proc-type", "secondary"), "--", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["generation"] == 1, r.stderr


@pytest.mark.timeout(120)
def test_auto_without_a_fixed_role_becomes_what_is_missing(instance):
    import signal

    from hotplane.shared.eal import EalOptions
    from hotplane.shared.instance import eal_init

    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    joined = eal_init(EalOptions(file_prefix=instance.prefix, proc_type="auto"))
    try:
        assert joined.proc_type == "secondary" and joined.generation == 1
    finally:
        joined.close()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    took_over = eal_init(EalOptions(file_prefix=instance.prefix, proc_type="auto"))
    try:
        assert took_over.proc_type == "primary" and not took_over.created and took_over.generation == 2
    finally:
        took_over.close()


def test_lcores_list():
    assert parse_lcores("0-2,5,1") == [0, 1, 2, 5]


def test_default_base_differs_per_prefix():
    a, b = parse_eal(["--file-prefix", "a"]), parse_eal(["--file-prefix", "b"])
    assert a.default_base() != b.default_base()
    assert a.default_base() % (2 << 20) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cmd", ["primary", "memzones"])
def test_cli_exit_code_2(cmd):
    r = subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", cmd, "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown EAL option" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(60)
def test_cli_unknown_command():
    r = subprocess.run([sys.executable, "-m", "hotplane.supervisor.cli", "frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_lcores_applied(monkeypatch):
    from hotplane.shared.eal import apply_affinity

    before = os.sched_getaffinity(0)
    try:
        cpu = min(before)
        apply_affinity(parse_eal(["--lcores", str(cpu)]))
        assert os.sched_getaffinity(0) == {cpu}
    finally:
        os.sched_setaffinity(0, before)
