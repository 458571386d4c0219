"""The memory-ordering module: the x86-64 check, atomic word helpers, and a cross-process publish litmus test."""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import platform
import time

import numpy as np
import pytest

from hotplane.shared import ordering
from hotplane.shared.ordering import OrderingError, load_u64, require_buffer, require_tso, store_u64, u64_word

on_x86_64 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")


@on_x86_64
def test_this_machine_is_accepted():
    require_tso()


@pytest.mark.parametrize("name", ["x86_64", "AMD64"])
def test_x86_64_names_accepted(name):
    require_tso(name)


@pytest.mark.parametrize("name", ["aarch64", "arm64", "ppc64le", "riscv64", "i686", "s390x"])
def test_other_machines_refused_with_a_clear_message(name):
    with pytest.raises(OrderingError, match=rf"x86-64.*{name}"):
        require_tso(name)


def test_ring_and_counters_refuse_a_non_tso_machine(monkeypatch):
    from hotplane.shared.counters import CounterBlocks
    from hotplane.shared.ring import SpscRing

    monkeypatch.setattr(ordering.platform, "machine", lambda: "aarch64")
    buf = _aligned(4096)
    with pytest.raises(OrderingError, match="aarch64"):
        SpscRing.create(buf, 8, np.uint64)
    with pytest.raises(OrderingError, match="aarch64"):
        CounterBlocks.create(buf, 1)


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + nbytes]


def test_word_helpers_roundtrip_full_64_bits():
    buf = _aligned(64)
    words = buf.view(np.uint64)
    for v in (0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1):
        store_u64(words, 3, v)
        assert load_u64(words, 3) == v and isinstance(load_u64(words, 3), int)
        assert int.from_bytes(buf[24:32].tobytes(), "little") == v  # little-endian, in place
    store_u64(words, 0, 2**64 + 5)  # free-running counters wrap modulo 2**64
    assert load_u64(words, 0) == 5
    w = u64_word(buf, 40)
    w[...] = 77
    assert w.item() == 77 and load_u64(w) == 77 and words[5] == 77


def test_misaligned_or_wrong_views_refused():
    buf = _aligned(64)
    with pytest.raises(ValueError, match="aligned"):
        u64_word(buf, 4)
    with pytest.raises(ValueError, match="uint64"):
        load_u64(buf.view(np.int64), 0)
    with pytest.raises(ValueError, match="uint64"):
        store_u64(buf[:16].view(np.float64), 0, 1)
    odd = _aligned(72)[4:68].view(np.uint64)  # 4 bytes past a cache line boundary
    assert not odd.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        load_u64(odd, 0)
    with pytest.raises(ValueError, match="aligned"):
        store_u64(odd, 0, 1)


def test_require_buffer():
    require_buffer(_aligned(128), 128, what="t")
    with pytest.raises(ValueError, match="t: buffer has 64 bytes, needs 128"):
        require_buffer(_aligned(64), 128, what="t")
    with pytest.raises(ValueError, match="aligned"):
        require_buffer(_aligned(256)[1:129], 64, what="t")
    with pytest.raises(ValueError, match="contiguous"):
        require_buffer(_aligned(256)[::2], 64, what="t")


# ---- publish/consume across processes -------------------------------------------------

N_PAYLOAD = 32  # 4 cache lines of payload, published by one flag word


def _publisher(buf, rounds, conn):
    try:
        flag = u64_word(buf, 0)
        payload = buf[64 : 64 + 8 * N_PAYLOAD].view(np.uint64)
        for k in range(1, rounds + 1):
            payload[:] = k  # the data first (one bulk numpy copy)...
            flag[...] = k  # ...then the word that makes it visible
        conn.send(("ok", rounds))
    except BaseException as e:
        conn.send(("error", repr(e)))


@on_x86_64
@pytest.mark.timeout(60)
def test_a_consumer_never_sees_the_flag_before_the_payload(request):
    """Message passing: whoever reads flag == k must then read payload >= k in every word."""
    m = mmap.mmap(-1, 4096)
    buf = np.frombuffer(m, np.uint8)
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(False)
    rounds = 300_000
    p = ctx.Process(target=_publisher, args=(buf, rounds, send), daemon=True)

    def cleanup():
        if p.is_alive():
            p.kill()
        p.join(5)
        with contextlib.suppress(BufferError):
            m.close()

    request.addfinalizer(cleanup)
    flag = u64_word(buf, 0)
    payload = buf[64 : 64 + 8 * N_PAYLOAD].view(np.uint64)
    seen = np.empty(N_PAYLOAD, np.uint64)
    p.start()
    checks, last, deadline = 0, 0, time.monotonic() + 45
    while last < rounds and time.monotonic() < deadline:
        k = flag.item()
        np.copyto(seen, payload)
        assert seen.min() >= k, f"flag {k} visible before its payload: {seen.min()}"
        assert k >= last, "the flag went backwards"
        last = k
        checks += 1
    assert recv.poll(10) and recv.recv() == ("ok", rounds)
    assert last == rounds and checks > 100
