"""Instance memory with real processes: fixed address, memzones, persistence, refusal of bad state.

Most tests run twice: on hugepages (skipped, with the reason, where they cannot
be had) and on the 4 KiB fallback (``--no-huge``).
"""

from __future__ import annotations

import json
import mmap
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

# Directory header byte offsets (schema/memzone.py: the registry prefix, then magic).
HDR_VERSION = 4
HDR_MAGIC = 16


def child(instance, body: str, *eal: str, timeout: float = 60) -> dict:
    """Run ``body`` in a fresh secondary process; it prints one JSON line as its result."""
    r = child_run(instance, body, *eal, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def child_run(instance, body: str, *eal: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh secondary process and return how it ended."""
    code = CHILD_PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *instance.eal(*eal)], env=instance.env, capture_output=True, text=True, timeout=timeout)


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
    """The EAL options of one backing: [] on hugepages (found from the mounts), ['--no-huge'] for 4 KiB pages."""
    if request.param == "hugepages":
        request.getfixturevalue("hugepages")
        return []
    return ["--no-huge"]


def start(instance, mode, *eal: str):
    """Start a primary on ``mode``'s backing and check that it really is that backing."""
    p, info = instance.start_primary(*eal, *mode)
    assert info["hugepages"] == (mode == []), f"primary ran on the wrong backing: {info['memory_file']}"
    return p, info


def stop(p) -> str:
    """SIGTERM a primary; returns its stderr."""
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    return err


def poke(path: str, offset: int, data: bytes) -> bytes:
    """Overwrite bytes of a memory file through a mapping (hugetlbfs has no write(2)); returns the old bytes."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size) as m:
            old = m[offset : offset + len(data)]
            m[offset : offset + len(data)] = data
    finally:
        os.close(fd)
    return old


def write_blob(instance) -> None:
    """Reserve the blob zone and fill it (first element 1), from this test process attached as a secondary."""
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init

    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    try:
        a = inst.directory.reserve("blob", BLOB.zone_size(4096), BLOB).elements(BLOB)
        a[:] = np.arange(a.size, dtype=np.uint64) * 7 + 1
        del a  # views go before the unmap
    finally:
        inst.close()


def read_first(instance) -> tuple[int, int]:
    """(first element of the blob zone, generation), read by this test process attached as a secondary."""
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init

    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    try:
        a = inst.directory.lookup_checked("blob", BLOB).elements(BLOB)
        first = int(a[0])
        del a  # views go before the unmap
        return first, inst.generation
    finally:
        inst.close()


def assert_serving(p, info, instance, *, first: int | None = 1) -> None:
    """The primary is alive, answers IPC, and (``first``) a secondary still attaches and reads the blob zone."""
    from hotplane.shared.ipc import request_sync

    assert p.poll() is None, f"primary died (rc={p.returncode})"
    status = request_sync(info["ipc"], "status", timeout=30).result
    assert status["pid"] == p.pid and status["generation"] == info["generation"]
    if first is not None:
        assert read_first(instance)[0] == first


def test_processes_share_memory_at_one_address(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "16")
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
    assert stop(p).count("WARNING: no hugepages") == 1


def test_primary_restart_keeps_zones_and_bumps_generation(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "16")
    assert info["generation"] == 1 and info["created"]
    child(instance, WRITE)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    p2, info2 = start(instance, mode)
    assert info2["generation"] == 2 and not info2["created"]
    assert info2["base"] == info["base"]
    assert read_first(instance) == (1, 2)
    assert [z["name"] for z in info2["zones"]] == ["blob"]


def test_second_primary_refused_naming_pid(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    r = instance.run(["primary", *instance.eal(*mode)])
    assert r.returncode == 1
    assert f"already running (pid {p.pid})" in r.stderr
    assert_serving(p, info, instance, first=None)


def _dead_pid() -> int:
    """A pid no process has (for a stale pid record)."""
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


@pytest.mark.parametrize("record", ["stale", "empty"])
def test_primary_named_while_it_holds_the_lock_but_has_not_recorded_its_pid(instance, record):
    """The window between a primary's flock and its pid record: it is still the one named."""
    from hotplane.shared.runtime import primary_lock, running_primary_pid

    lock_path = primary_lock(instance.prefix).path
    lock_path.write_text(f"{_dead_pid()}\n" if record == "stale" else "")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hotplane.shared.runtime import primary_lock; l = primary_lock(sys.argv[1]); "
         "assert l.acquire(blocking=False); print('held', flush=True); sys.stdin.read()", instance.prefix],
        env=instance.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    instance.procs.append(holder)
    assert holder.stdout.readline().strip() == "held"
    assert running_primary_pid(instance.prefix) == holder.pid
    r = instance.run(["primary", *instance.eal("--no-huge")])
    assert r.returncode == 1 and f"already running (pid {holder.pid})" in r.stderr, r.stderr
    r = instance.run(["cleanup", "--file-prefix", instance.prefix])
    assert r.returncode == 1 and f"primary pid {holder.pid}" in r.stderr, r.stderr


def test_racing_primaries_all_name_the_winner(instance):
    from hotplane.shared.runtime import primary_lock

    primary_lock(instance.prefix).path.write_text(f"{_dead_pid()}\n")  # left by a SIGKILLed primary
    procs = [instance.spawn(["primary", *instance.eal("--socket-mem", "8", "--no-huge"), "--", "--json", "--bare"]) for _ in range(3)]
    winners, losers = [], []
    for pr in procs:
        line = instance.read_line(pr, 90)
        (winners if line else losers).append(pr)
    assert len(winners) == 1, [pr.stderr.read() for pr in losers]
    for pr in losers:
        _, err = pr.communicate(timeout=30)
        assert pr.returncode == 1 and f"already running (pid {winners[0].pid})" in err, err


def test_asking_for_the_primary_never_takes_its_lock(instance, monkeypatch):
    """A check (cleanup, auto, a supervisor) must not make a primary starting at that instant find its lock taken."""
    import fcntl

    from hotplane.shared.runtime import running_primary_pid

    p, info = instance.start_primary("--socket-mem", "8", "--no-huge")

    def no_flock(*a):
        raise AssertionError("running_primary_pid took a lock")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_flock)
        assert running_primary_pid(instance.prefix) == p.pid
    stop(p)
    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_flock)
        assert running_primary_pid(instance.prefix) is None


def test_two_prefixes_side_by_side(instance, mode):
    p1, i1 = start(instance, mode, "--socket-mem", "8")
    other = type(instance)(instance.root)
    try:
        p2, i2 = start(other, mode, "--socket-mem", "8")
        assert i1["base"] != i2["base"] and i1["memory_file"] != i2["memory_file"]
        child(instance, WRITE)
        child(other, WRITE, "--", "5")
        assert read_first(instance)[0] == 1
        assert read_first(other)[0] == 5
    finally:
        other.teardown()


def test_cleanup_refuses_while_running_then_removes(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    r = instance.run(["cleanup", "--file-prefix", instance.prefix])
    assert r.returncode == 1 and "is running" in r.stderr and str(p.pid) in r.stderr
    assert os.path.exists(info["memory_file"])
    stop(p)
    r = instance.run(["cleanup", "--file-prefix", instance.prefix, "--json"])
    assert r.returncode == 0, r.stderr
    removed = json.loads(r.stdout)["removed"]
    assert info["memory_file"] in removed
    assert not os.path.exists(info["memory_file"])
    assert not (instance.root / instance.prefix).exists()


def test_cleanup_refuses_while_a_secondary_is_attached(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    holder = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + "print('up', flush=True); sys.stdin.read()", *instance.eal()],
                              env=instance.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        stop(p)
        r = instance.run(["cleanup", "--file-prefix", instance.prefix])
        assert r.returncode == 1 and "attached" in r.stderr and str(holder.pid) in r.stderr
        assert os.path.exists(info["memory_file"])
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert instance.run(["cleanup", "--file-prefix", instance.prefix]).returncode == 0


def test_corrupt_header_on_primary_restart_names_cleanup(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    stop(p)
    poke(info["memory_file"], HDR_MAGIC, b"GARBAGE!")
    r = instance.run(["primary", *instance.eal(*mode)])
    assert r.returncode == 1
    assert "bad magic" in r.stderr and f"hotplane cleanup --file-prefix {instance.prefix}" in r.stderr
    assert "Traceback" not in r.stderr
    assert os.path.exists(info["memory_file"]), "a refused primary must not remove what it refused"


def test_corrupt_header_on_secondary_attach_names_cleanup(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    write_blob(instance)
    old = poke(info["memory_file"], HDR_MAGIC, b"GARBAGE!")
    r = instance.run(["memzones", *instance.eal()])
    assert r.returncode == 1
    assert "bad magic" in r.stderr and f"hotplane cleanup --file-prefix {instance.prefix}" in r.stderr
    assert "Traceback" not in r.stderr
    assert_serving(p, info, instance, first=None)  # the primary is not a casualty of a refused secondary
    poke(info["memory_file"], HDR_MAGIC, old)
    assert_serving(p, info, instance)


def test_unknown_directory_schema_refused(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    stop(p)
    poke(info["memory_file"], HDR_VERSION, (9).to_bytes(4, "little"))  # directory layout version 9
    r = instance.run(["primary", *instance.eal(*mode)])
    assert r.returncode == 1 and "version 9" in r.stderr and "hotplane cleanup" in r.stderr


def test_secondary_without_primary_is_told_what_to_do(instance):
    r = instance.run(["memzones", *instance.eal()])
    assert r.returncode == 1
    assert "start its primary first" in r.stderr


def _occupy_then_init(instance, base: int, role: str, *eal: str) -> subprocess.CompletedProcess:
    """A process that has something mapped inside the instance's address range tries to join as ``role``."""
    code = textwrap.dedent(f"""
        import mmap, sys
        from hotplane.shared.memory import _libc, MAP_FIXED_NOREPLACE
        a = _libc.mmap({base} + (2 << 20), 4096, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        assert a == {base} + (2 << 20), a
        from hotplane.shared.eal import parse_eal
        from hotplane.shared.instance import eal_init, InstanceError
        try:
            eal_init(parse_eal(sys.argv[1:], role={role!r}))
        except InstanceError as e:
            print(e)
            sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", code, *instance.eal(*eal)], env=instance.env, capture_output=True, text=True, timeout=60)


def test_address_in_use_secondary_names_base_virtaddr(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    write_blob(instance)
    base = int(info["base"], 16)
    r = _occupy_then_init(instance, base, "secondary")
    assert r.returncode == 3, r.stderr
    assert hex(base) in r.stdout and "--base-virtaddr" in r.stdout
    assert_serving(p, info, instance)


def test_address_in_use_primary_refused_and_nothing_lost(instance, mode):
    from hotplane.shared import memory
    from hotplane.shared.eal import parse_eal

    base = parse_eal(instance.eal()).default_base()
    # A new instance: refused naming the address and --base-virtaddr, and no half-made file is left.
    r = _occupy_then_init(instance, base, "primary", "--socket-mem", "8", *mode)
    assert r.returncode == 3, r.stderr
    assert hex(base) in r.stdout and "--base-virtaddr" in r.stdout
    assert memory.existing_memory_file(instance.prefix) is None
    # An existing instance: refused, and its memory is kept for a primary that can map it.
    p, info = start(instance, mode, "--socket-mem", "8")
    write_blob(instance)
    stop(p)
    r = _occupy_then_init(instance, base, "primary", *mode)
    assert r.returncode == 3, r.stderr
    assert hex(base) in r.stdout and "can only be used at the address it was created at" in r.stdout
    assert os.path.exists(info["memory_file"])
    p2, info2 = start(instance, mode)
    assert not info2["created"] and info2["generation"] == 2
    assert read_first(instance)[0] == 1


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


SCHEMA_V2 = """
from hotplane.schema.registry import SchemaError
BLOB2 = register(Layout("test_blob", 1000, 2, element=np.dtype([("a", "<u8"), ("b", "<u8")])))
try:
    d.lookup_checked("blob", BLOB2 if sys.argv[-1] == "v2" else "test_blob")
except SchemaError as e:
    print(e)
    sys.exit(3)
"""


def test_schema_mismatch_refused(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "8")
    write_blob(instance)
    from hotplane.shared.eal import parse_eal
    from hotplane.shared.instance import eal_init

    # A secondary built for version 2 of the layout is refused, and nobody else is hurt.
    r = child_run(instance, SCHEMA_V2, "--", "v2")
    assert r.returncode == 3 and "expected test_blob" in r.stdout, r.stdout + r.stderr
    assert_serving(p, info, instance)

    inst = eal_init(parse_eal(instance.eal(), role="secondary"))
    try:
        with pytest.raises(SchemaError, match="expected test_blob"):
            inst.directory.lookup_checked("blob", BLOB2)
        e = inst.directory.entries[0]
        saved = int(e["layout_hash"]), int(e["schema_id"])
        # A zone whose recorded hash no build knows is refused, naming both hashes.
        e["layout_hash"] = 0x1234
        with pytest.raises(SchemaError, match="found 0x0000000000001234, this build expects"):
            inst.directory.lookup_checked("blob", BLOB)
        # A corrupt zone entry (an id nobody registered): a secondary is refused, the primary serves on.
        e["schema_id"] = 4242
        r = child_run(instance, SCHEMA_V2, "--", "any")
        assert r.returncode == 3 and "unknown schema id 4242" in r.stdout, r.stdout + r.stderr
        assert_serving(p, info, instance, first=None)
        e["layout_hash"], e["schema_id"] = saved
    finally:
        inst.close()
    assert_serving(p, info, instance)


def test_concurrent_reservations_do_not_overlap(instance, mode):
    p, info = start(instance, mode, "--socket-mem", "16")
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
    r = child_run(instance, body)
    assert r.returncode == -signal.SIGKILL
    res = child(instance, """
    z = d.reserve("after", 128, BLOB)
    print(json.dumps({"names": [x.name for x in d.list()], "half": d.lookup("half") is not None}))
    """)
    assert res["names"] == ["after"] and not res["half"]


@pytest.mark.parametrize("first,then", [("hugepages", "--no-huge"), ("no-huge", "--huge-dir")])
def test_restart_with_another_backing_keeps_the_memory_and_says_so(instance, hugepages, first, then):
    """A restart keeps the state wherever it lives; an option asking for another backing gets one clear note."""
    p, info = instance.start_primary("--socket-mem", "8", *(["--no-huge"] if first == "no-huge" else []))
    assert info["hugepages"] == (first == "hugepages")
    write_blob(instance)
    stop(p)
    p2, info2 = instance.start_primary(*([then] if then == "--no-huge" else [then, hugepages]))
    assert not info2["created"] and info2["memory_file"] == info["memory_file"] and info2["hugepages"] == info["hugepages"]
    assert read_first(instance)[0] == 1
    err = stop(p2)
    notes = [line for line in err.splitlines() if "note:" in line and then in line]
    assert len(notes) == 1, err
    assert info["memory_file"] in notes[0] and f"hotplane cleanup --file-prefix {instance.prefix}" in notes[0]
    assert "WARNING: no hugepages" not in err  # nothing fell back: the existing memory was used as it is


def test_lost_memory_record_at_a_custom_base_names_base_virtaddr(instance, mode):
    from hotplane.shared.eal import parse_eal

    custom = parse_eal(instance.eal()).default_base() + (4 << 30)
    p, info = start(instance, mode, "--socket-mem", "8", "--base-virtaddr", hex(custom))
    assert int(info["base"], 16) == custom
    write_blob(instance)
    stop(p)
    (instance.root / instance.prefix / "memory.json").unlink()
    r = instance.run(["primary", *instance.eal(*mode)])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"--base-virtaddr {custom:#x}" in r.stderr and "keep its contents" in r.stderr
    assert os.path.exists(info["memory_file"])
    p2, info2 = start(instance, mode, "--base-virtaddr", hex(custom))
    assert not info2["created"] and info2["generation"] == 2
    assert read_first(instance)[0] == 1
