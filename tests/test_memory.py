"""Instance memory with real processes: fixed address, memzones, persistence, refusal of bad state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hotplane.schema.registry import Layout, SchemaError, register

pytestmark = pytest.mark.timeout(120)

# A layout for tests only (ids >= 1000 are never used by the product).
BLOB = register(Layout("test_blob", 1000, 1, element=np.dtype("<u8")))
BLOB2 = register(Layout("test_blob", 1000, 2, element=np.dtype([("a", "<u8"), ("b", "<u8")])))

CHILD_PRELUDE = """
import json, os, sys
import numpy as np
from hotplane.schema.registry import Layout, register
from hotplane.shared.eal import parse_eal
from hotplane.shared.instance import eal_init
BLOB = register(Layout("test_blob", 1000, 1, element=np.dtype("<u8")))
inst = eal_init(parse_eal(sys.argv[1:], role="secondary"))
d = inst.directory
"""


def child(instance, body: str, *eal: str, timeout: float = 60) -> dict:
    """Run ``body`` in a fresh secondary process; it prints one JSON line as its result."""
    code = CHILD_PRELUDE + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code, *instance.eal(*eal)], env=instance.env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


WRITE = """
z = d.reserve("blob", BLOB.zone_size(4096), BLOB)
a = z.elements(BLOB)
a[:] = np.arange(a.size, dtype=np.uint64) * 7 + int(sys.argv[-1] if sys.argv[-1].isdigit() else 1)
print(json.dumps({"addr": inst.memory.addr, "zone_addr": a.ctypes.data, "n": int(a.size), "gen": inst.generation}))
"""

READ = """
z = d.lookup_checked("blob", BLOB)
a = z.elements(BLOB)
print(json.dumps({"addr": inst.memory.addr, "zone_addr": a.ctypes.data, "sum": int(a.sum()), "first": int(a[0]), "gen": inst.generation}))
"""


@pytest.fixture(params=["hugepages", "no-huge"])
def mode(request):
    if request.param == "hugepages":
        request.getfixturevalue("hugepages")
        return []
    return ["--no-huge"]


def test_processes_share_memory_at_one_address(instance, mode):
    p, info = instance.start_primary("--socket-mem", "16", *mode)
    assert info["hugepages"] == (mode == [])
    w = child(instance, WRITE)
    r = child(instance, READ)
    assert w["addr"] == r["addr"] == int(info["base"], 16)
    assert w["zone_addr"] == r["zone_addr"]
    n = w["n"]
    assert r["sum"] == sum(i * 7 + 1 for i in range(n))
    if mode:
        assert "WARNING: no hugepages" in p.stderr.readline() + p.stderr.readline()


def test_fallback_warns_once_and_loudly(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    assert not info["hugepages"]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert err.count("WARNING: no hugepages") == 1


def test_primary_restart_keeps_zones_and_bumps_generation(instance, mode):
    p, info = instance.start_primary("--socket-mem", "16", *mode)
    assert info["generation"] == 1 and info["created"]
    child(instance, WRITE)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    p2, info2 = instance.start_primary(*mode)
    assert info2["generation"] == 2 and not info2["created"]
    assert info2["base"] == info["base"]
    r = child(instance, READ)
    assert r["first"] == 1 and r["gen"] == 2
    assert [z["name"] for z in info2["zones"]] == ["blob"]


def test_second_primary_refused_naming_pid(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    r = instance.run(["primary", *instance.eal()])
    assert r.returncode == 1
    assert f"already running (pid {p.pid})" in r.stderr


def test_two_prefixes_side_by_side(instance, tmp_path):
    p1, i1 = instance.start_primary("--socket-mem", "8", "--no-huge")
    other = type(instance)(instance.root)
    try:
        p2, i2 = other.start_primary("--socket-mem", "8", "--no-huge")
        assert i1["base"] != i2["base"] and i1["memory_file"] != i2["memory_file"]
        child(instance, WRITE)
        child(other, WRITE, "--", "5")
        assert child(instance, READ)["first"] == 1
        assert child(other, READ)["first"] == 5
    finally:
        other.teardown()


def test_cleanup_refuses_while_running_then_removes(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    r = instance.run(["cleanup", "--file-prefix", instance.prefix])
    assert r.returncode == 1 and "is running" in r.stderr
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    r = instance.run(["cleanup", "--file-prefix", instance.prefix, "--json"])
    assert r.returncode == 0, r.stderr
    removed = json.loads(r.stdout)["removed"]
    assert info["memory_file"] in removed
    assert not os.path.exists(info["memory_file"])
    assert not (instance.root / instance.prefix).exists()


def test_cleanup_refuses_while_a_secondary_is_attached(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    holder = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + "print('up', flush=True); sys.stdin.read()", *instance.eal()],
                              env=instance.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        r = instance.run(["cleanup", "--file-prefix", instance.prefix])
        assert r.returncode == 1 and "attached" in r.stderr and str(holder.pid) in r.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert instance.run(["cleanup", "--file-prefix", instance.prefix]).returncode == 0


def test_corrupt_header_names_cleanup(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    with open(info["memory_file"], "r+b") as f:
        f.seek(16)
        f.write(b"GARBAGE!")
    r = instance.run(["primary", *instance.eal()])
    assert r.returncode == 1
    assert f"hotplane cleanup --file-prefix {instance.prefix}" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_directory_schema_refused(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    with open(info["memory_file"], "r+b") as f:
        f.seek(4)
        f.write((9).to_bytes(4, "little"))  # directory layout version 9
    r = instance.run(["primary", *instance.eal()])
    assert r.returncode == 1 and "version 9" in r.stderr and "hotplane cleanup" in r.stderr


def test_secondary_without_primary_is_told_what_to_do(instance):
    r = instance.run(["memzones", *instance.eal()])
    assert r.returncode == 1
    assert "start its primary first" in r.stderr


def test_address_in_use_names_base_virtaddr(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    base = int(info["base"], 16)
    body = f"""
    """
    code = textwrap.dedent(f"""
        import mmap, ctypes, sys
        from hotplane.shared.memory import _libc, MAP_FIXED_NOREPLACE
        a = _libc.mmap({base} + (2 << 20), 4096, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        assert a == {base} + (2 << 20), a
        from hotplane.shared.eal import parse_eal
        from hotplane.shared.instance import eal_init, InstanceError
        try:
            eal_init(parse_eal(sys.argv[1:], role="secondary"))
        except InstanceError as e:
            print(e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code, *instance.eal()], env=instance.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert hex(base) in r.stdout and "--base-virtaddr" in r.stdout


def test_missing_huge_dir(instance, tmp_path):
    r = instance.run(["primary", *instance.eal("--huge-dir", str(tmp_path / "nope"))])
    assert r.returncode == 1 and "no such directory" in r.stderr
    r = instance.run(["primary", *instance.eal("--huge-dir", str(tmp_path))])
    assert r.returncode == 1 and "not a hugetlbfs mount" in r.stderr


def test_too_little_hugepage_memory(instance, hugepages):
    r = instance.run(["primary", *instance.eal("--huge-dir", hugepages, "--socket-mem", str(1 << 20))])
    assert r.returncode == 1
    assert "hugepages" in r.stderr and "--socket-mem" in r.stderr
    assert not os.path.exists(os.path.join(hugepages, f"{instance.prefix}map_0"))


def test_schema_mismatch_refused(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    child(instance, WRITE)
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init

    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    try:
        with pytest.raises(SchemaError, match="expected test_blob"):
            inst.directory.lookup_checked("blob", BLOB2)
        # A zone whose recorded hash no build knows is refused, naming both hashes.
        e = inst.directory.entries[0]
        e["layout_hash"] = 0x1234
        with pytest.raises(SchemaError, match="found 0x0000000000001234, this build expects"):
            inst.directory.lookup_checked("blob", BLOB)
        e["schema_id"] = 4242
        with pytest.raises(SchemaError, match="unknown schema id 4242"):
            inst.directory.lookup_checked("blob", "test_blob")
    finally:
        inst.close()


def test_concurrent_reservations_do_not_overlap(instance):
    p, info = instance.start_primary("--socket-mem", "16", "--no-huge")
    body = """
    pid = os.getpid()
    names = []
    for i in range(40):
        z = d.reserve(f"z{pid}.{i}", 64 * (1 + i % 5), BLOB)
        names.append(z.name)
    print(json.dumps({"n": len(names)}))
    """
    code = CHILD_PRELUDE + textwrap.dedent(body)
    procs = [subprocess.Popen([sys.executable, "-c", code, *instance.eal()], env=instance.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for pr in procs:
        out, err = pr.communicate(timeout=60)
        assert pr.returncode == 0, err
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init

    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    try:
        zones = inst.directory.list()
        assert len(zones) == 160 and len({z.name for z in zones}) == 160
        spans = sorted((z.offset, z.offset + z.length) for z in zones)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert all(z.offset % 64 == 0 for z in zones)
    finally:
        inst.close()


def test_reserver_killed_mid_reservation_wedges_nothing(instance):
    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")
    # The child takes the lock, half-writes an entry, and dies holding the lock.
    body = """
    d.lock.acquire()
    e = d.entries[int(d.hdr[0]["zone_count"])]
    e["name"] = b"half"
    e["offset"] = 123
    os.kill(os.getpid(), 9)
    """
    code = CHILD_PRELUDE + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code, *instance.eal()], env=instance.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    res = child(instance, """
    z = d.reserve("after", 128, BLOB)
    print(json.dumps({"names": [x.name for x in d.list()], "half": d.lookup("half") is not None}))
    """)
    assert res["names"] == ["after"] and not res["half"]
