"""Log capture: append-only files, copytruncate rotation, tail/follow, and a full disk."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hotplane.supervisor import logs as logs_mod
from hotplane.supervisor.logs import Follower, LogFile, backup_path, rotate_periodically, tail_lines


class Reports(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


@pytest.fixture
def reports() -> Reports:
    return Reports()


def test_write_line_and_child_output(tmp_path: Path, reports: Reports) -> None:
    with LogFile(tmp_path / "logs" / "w.log", report=reports) as lf:
        assert lf.write_line("started pid 1")
        code = "import sys; print('out'); print('err', file=sys.stderr)"
        subprocess.run([sys.executable, "-c", code], stdout=lf.child_fd, stderr=lf.child_fd, check=True, timeout=60)
        assert lf.write_line("pid 1 exited")
    lines = (tmp_path / "logs" / "w.log").read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[hotplane\] started pid 1", lines[0])
    assert lines[1:3] == ["out", "err"] and lines[3].endswith("[hotplane] pid 1 exited")
    assert oct((tmp_path / "logs" / "w.log").stat().st_mode & 0o777) == "0o640"
    assert not reports


def test_rotation_shifts_backups_and_keeps_n(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    lf = LogFile(path, max_bytes=100, backups=3)
    try:
        for gen in range(6):
            os.write(lf.child_fd, f"generation {gen}\n".encode() * 10)
            assert lf.maybe_rotate()
            assert path.stat().st_size == 0
        assert not lf.maybe_rotate(), "under max_bytes: no rotation"
        assert backup_path(path, 1).read_text().startswith("generation 5")
        assert backup_path(path, 2).read_text().startswith("generation 4")
        assert backup_path(path, 3).read_text().startswith("generation 3")
        assert not backup_path(path, 4).exists()
        assert lf.rotations == 6
        # O_APPEND: after the truncate the next write lands at 0, no hole.
        os.write(lf.child_fd, b"after\n")
        assert path.read_bytes() == b"after\n"
    finally:
        lf.close()


def test_rotation_without_backups_just_truncates(tmp_path: Path) -> None:
    with LogFile(tmp_path / "w.log", max_bytes=10, backups=0) as lf:
        os.write(lf.child_fd, b"x" * 50)
        assert lf.maybe_rotate()
        assert lf.size() == 0 and not backup_path(lf.path, 1).exists()


WRITER = "import os\nfor i in range(30000):\n    os.write(1, b'line %08d\\n' % i)\n"


def rotate_under_writer(path: Path, **kw) -> LogFile:
    """Rotate ``path`` as often as possible while a real child appends 30000 numbered lines."""
    lf = LogFile(path, max_bytes=8192, backups=400, **kw)
    p = subprocess.Popen([sys.executable, "-c", WRITER], stdout=lf.child_fd, stderr=lf.child_fd)
    try:
        while p.poll() is None:
            lf.maybe_rotate()
    finally:
        p.kill()
        p.wait(timeout=30)
        lf.close()
    assert p.returncode == 0
    assert lf.rotations >= 3 and not backup_path(path, 400).exists()
    return lf


def all_output(path: Path) -> bytes:
    files = [backup_path(path, k) for k in range(400, 0, -1)] + [path]
    return b"".join(f.read_bytes() for f in files if f.exists())


def supports_collapse(directory: Path) -> bool:
    probe = directory / "probe"
    with LogFile(probe, max_bytes=1, backups=1) as lf:
        os.write(lf.child_fd, b"x" * 3 * os.fstatvfs(lf.child_fd).f_bsize)
        lf.rotate()
        ok = lf.lossless
    for f in directory.glob("probe*"):
        f.unlink()
    return ok


@pytest.mark.timeout(120)
def test_lossless_rotation_while_a_child_writes(tmp_path: Path) -> None:
    """Collapse rotation: backups + live file are exactly the child's output, nothing lost."""
    if not supports_collapse(tmp_path):
        pytest.skip(f"{tmp_path} is on a file system without FALLOC_FL_COLLAPSE_RANGE")
    path = tmp_path / "w.log"
    lf = rotate_under_writer(path)
    assert lf.lossless
    assert all_output(path) == b"".join(b"line %08d\n" % i for i in range(30000))


@pytest.mark.timeout(120)
def test_copytruncate_rotation_while_a_child_writes(tmp_path: Path) -> None:
    """copytruncate: lines never corrupted, reordered or duplicated; losses only at rotations."""
    path = tmp_path / "w.log"
    lf = rotate_under_writer(path, lossless=False)
    nums = []
    files = [backup_path(path, k) for k in range(400, 0, -1)] + [path]
    for f in files:
        if not f.exists():
            continue
        lines = f.read_text().splitlines()
        for n, line in enumerate(lines):
            if re.fullmatch(r"line \d{8}", line):
                nums.append(int(line[5:]))
            else:
                # Only the last line of a backup may be cut (a write caught half done).
                assert f != path and n == len(lines) - 1, f"corrupted line {line!r} in {f.name}"
                assert re.fullmatch(r"l(i(n(e( \d{0,7})?)?)?)?", line), f"not a cut line: {line!r}"
    assert nums == sorted(nums) and len(set(nums)) == len(nums)
    gaps = sum(1 for a, b in zip(nums, nums[1:]) if b != a + 1)
    assert gaps <= lf.rotations, "lines can only go missing at a rotation"
    assert nums[-1] == 29999


def test_tail_lines(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    with pytest.raises(FileNotFoundError):
        tail_lines(path)
    with LogFile(path, max_bytes=10_000) as lf:
        os.write(lf.child_fd, "".join(f"old {i}\n" for i in range(100)).encode())
        lf.rotate()
        os.write(lf.child_fd, b"new 0\nnew 1\n")
    assert tail_lines(path, 3) == ["old 99", "new 0", "new 1"]
    assert tail_lines(path, 3, include_rotated=False) == ["new 0", "new 1"]
    assert tail_lines(path, 0) == []
    big = "".join(f"{i:06d}\n" for i in range(20000)).encode()
    path.write_bytes(big)
    assert tail_lines(path, 2500) == [f"{i:06d}" for i in range(17500, 20000)]


def test_follower_is_lossless_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    lf = LogFile(path, max_bytes=1, backups=5)
    try:
        os.write(lf.child_fd, b"before follow\n")
        f = Follower(path)  # from the end
        assert f.poll() == b""
        os.write(lf.child_fd, b"a\n")
        assert f.poll() == b"a\n"
        os.write(lf.child_fd, b"b\n")
        lf.rotate()  # 'b' now only in .1
        os.write(lf.child_fd, b"c\n")
        assert f.poll() == b"b\nc\n"
        # Three rotations between two polls.
        os.write(lf.child_fd, b"d\n")
        lf.rotate()
        os.write(lf.child_fd, b"e\n")
        lf.rotate()
        os.write(lf.child_fd, b"f\n")
        lf.rotate()
        os.write(lf.child_fd, b"g\n")
        assert f.poll() == b"d\ne\nf\ng\n"
        # Truncated by someone else: start again at 0.
        os.truncate(path, 0)
        os.write(lf.child_fd, b"h\n")
        assert f.poll() == b"h\n"
        # Replaced file: followed from its beginning.
        os.unlink(path)
        path.write_bytes(b"i\n")
        assert f.poll() == b"i\n"
        f.close()
        assert Follower(path, from_end=False).poll() == b"i\n"
    finally:
        lf.close()


def test_follower_across_a_collapse_rotation(tmp_path: Path) -> None:
    if not supports_collapse(tmp_path):
        pytest.skip("no FALLOC_FL_COLLAPSE_RANGE here")
    path = tmp_path / "w.log"
    lf = LogFile(path, max_bytes=1, backups=3)
    try:
        f = Follower(path)
        stream = b"".join(b"%06d\n" % i for i in range(5000))  # 35000 bytes: several blocks
        os.write(lf.child_fd, stream[:20000])
        got = f.poll()
        os.write(lf.child_fd, stream[20000:30000])
        lf.rotate()
        assert lf.lossless and 0 < lf.size() < 2 * os.fstatvfs(lf.child_fd).f_bsize
        os.write(lf.child_fd, stream[30000:])
        got += f.poll()
        assert got == stream
        assert backup_path(path, 1).read_bytes() + path.read_bytes() == stream
        assert tail_lines(path, 3) == ["004997", "004998", "004999"]
        # A split line is whole again in tail: the .1 tail and the live head are joined.
        live_lines = path.read_bytes().count(b"\n")
        assert tail_lines(path, live_lines + 2) == [f"{i:06d}" for i in range(5000 - live_lines - 2, 5000)]
    finally:
        lf.close()


@pytest.mark.timeout(60)
def test_follow_async(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    lf = LogFile(path, max_bytes=1, backups=2)

    async def main() -> bytes:
        stop = asyncio.Event()
        got = b""

        async def writer() -> None:
            for i in range(5):
                os.write(lf.child_fd, b"%d\n" % i)
                if i == 2:
                    lf.rotate()
                await asyncio.sleep(0.02)

        w = asyncio.create_task(writer())
        async for chunk in Follower(path).follow(interval=0.01, stop=stop):
            got += chunk
            if got.count(b"\n") == 5:
                stop.set()
        await w
        return got

    try:
        assert asyncio.run(asyncio.wait_for(main(), 30)) == b"0\n1\n2\n3\n4\n"
    finally:
        lf.close()


@pytest.mark.timeout(60)
def test_rotate_periodically(tmp_path: Path) -> None:
    lf = LogFile(tmp_path / "w.log", max_bytes=10)
    os.write(lf.child_fd, b"x" * 100)

    async def main() -> None:
        task = asyncio.create_task(rotate_periodically(lambda: [lf], interval=0.01))
        for _ in range(500):
            if lf.rotations:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    lf.close()
    assert lf.rotations == 1 and backup_path(lf.path, 1).read_bytes() == b"x" * 100 + b"\n"  # cut line closed


def test_removed_log_file_is_reported_once_and_still_rotated(tmp_path: Path, reports: Reports) -> None:
    with LogFile(tmp_path / "w.log", max_bytes=10, report=reports) as lf:
        os.unlink(lf.path)
        assert not lf.maybe_rotate()
        os.write(lf.child_fd, b"written to the removed file\n")
        assert lf.maybe_rotate()
        assert backup_path(lf.path, 1).read_bytes() == b"written to the removed file\n"
        assert lf.size() == 0, "the removed file's space is reclaimed"
    assert len(reports) == 1 and "removed or replaced" in reports[0]


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 64 KiB tmpfs (root only), unmounted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the monkeypatched ENOSPC tests still run)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Fill the file system with one file; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_disk_drops_lines_reports_once_and_recovers(tiny_fs: Path, reports: Reports) -> None:
    lf = LogFile(tiny_fs / "w.log", report=reports)
    try:
        assert lf.write_line("before")
        filler = fill(tiny_fs)
        # The file's last page may still have room for a few lines.
        fits = 0
        while lf.write_line("fits " + "x" * 200):
            fits += 1
            assert fits < 40, "the disk should be full"
        for i in range(49):
            assert lf.write_line(f"line {i} " + "x" * 200) is False
        assert lf.dropped_lines == 50 and lf.disk_full
        assert len(reports) == 1, reports
        assert "No space left on device" in reports[0] and "keeps running" in reports[0] and str(lf.path) in reports[0]
        os.unlink(filler)
        assert lf.write_line("after")
        assert not lf.disk_full and len(reports) == 2 and "50 line(s)" in reports[1]
        text = lf.path.read_text()
        assert "50 line(s) and 0 byte(s) of output were dropped" in text and text.rstrip().endswith("after")
    finally:
        lf.close()


def test_full_disk_rotation_discards_instead_of_failing(tiny_fs: Path, reports: Reports) -> None:
    lf = LogFile(tiny_fs / "w.log", max_bytes=8192, backups=2, report=reports)
    try:
        os.write(lf.child_fd, b"y" * 12288)
        filler = fill(tiny_fs)
        assert lf.maybe_rotate()  # cannot copy: the live content is discarded
        assert lf.size() == 0 and lf.dropped_bytes == 12288 and lf.rotations == 0
        assert not list(tiny_fs.glob(".*rotating")), "no partial backup left behind"
        assert len(reports) == 1 and "rotating" in reports[0]
        os.unlink(filler)
        os.write(lf.child_fd, b"z" * 9000)
        assert lf.maybe_rotate() and lf.rotations == 1 and not lf.disk_full
        assert "12288 byte(s)" in reports[1]
    finally:
        lf.close()


def test_full_disk_monkeypatched(tmp_path: Path, reports: Reports, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same without root: os.write raises ENOSPC."""
    lf = LogFile(tmp_path / "w.log", report=reports)
    real_write = os.write

    def full(fd, data):
        if fd == lf.child_fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    try:
        monkeypatch.setattr(logs_mod.os, "write", full)
        assert [lf.write_line(f"l{i}") for i in range(3)] == [False] * 3
        monkeypatch.setattr(logs_mod.os, "write", real_write)
        assert lf.write_line("ok")
        assert lf.dropped_lines == 3 and len(reports) == 2
        # Other errors are not swallowed.
        monkeypatch.setattr(logs_mod.os, "write", lambda fd, d: (_ for _ in ()).throw(OSError(errno.EBADF, "bad")))
        with pytest.raises(OSError):
            lf.write_line("x")
    finally:
        monkeypatch.setattr(logs_mod.os, "write", real_write)
        lf.close()


CHILD_PRINTS = """
import sys, os
if sys.argv[1] == "guard":
    from hotplane.supervisor.logs import guard_stdio
    out, err = guard_stdio()
for i in range(2000):
    print("line", i, "x" * 100)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "guard":
    # Tell the test how much was dropped, through a side channel.
    os.write(int(sys.argv[2]), b"%d" % out.dropped)
"""


@pytest.mark.timeout(120)
def test_guarded_child_survives_a_full_disk(tiny_fs: Path, tmp_path: Path) -> None:
    lf = LogFile(tiny_fs / "child.log")
    try:
        fill(tiny_fs)
        rfd, wfd = os.pipe()
        r = subprocess.run([sys.executable, "-c", CHILD_PRINTS, "guard", str(wfd)], stdout=lf.child_fd, stderr=lf.child_fd, pass_fds=(wfd,), timeout=60)
        os.close(wfd)
        dropped = int(os.read(rfd, 100) or b"0")
        os.close(rfd)
        assert r.returncode == 0, "a guarded child keeps running on a full disk"
        assert dropped > 2000 * 100
        # Without the guard, Python dies of the write error: the reason guard_stdio exists.
        r = subprocess.run([sys.executable, "-c", CHILD_PRINTS, "plain"], stdout=lf.child_fd, stderr=lf.child_fd, timeout=60)
        assert r.returncode != 0
    finally:
        lf.close()


def test_guard_reports_dropped_output_when_space_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    raw = logs_mod._GuardedRaw(fd, "stdout")
    real_write = os.write
    try:
        monkeypatch.setattr(logs_mod.os, "write", lambda f, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        assert raw.write(b"lost\n") == 5
        assert raw.dropped == 5
        monkeypatch.setattr(logs_mod.os, "write", real_write)
        raw.write(b"kept\n")
    finally:
        monkeypatch.setattr(logs_mod.os, "write", real_write)
        os.close(fd)
    assert (tmp_path / "out").read_text() == "[hotplane] 5 byte(s) of stdout were dropped: write failed (disk full?)\nkept\n"
