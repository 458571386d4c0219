"""IPC channel round trips per second, against an os.pipe ping-pong between two processes.

The server runs in a forked child (echo handler); the parent measures sequential
request/response round trips on uvloop and on the default loop, pipelined requests
(many in flight), a request passing an fd, and the blocking CLI client (one
connection per call). The reference is the cheapest round trip two Python processes
can do: one byte each way through a pair of pipes.

Run: ``python -m hotplane.bench.ipc [--json] [--n N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time

import uvloop

from hotplane.bench.report import emit
from hotplane.shared import ipc

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def _pipe_pingpong(n: int) -> float:
    """Seconds for ``n`` one-byte round trips with a forked echo child."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(a_w)
            os.close(b_r)
            while os.read(a_r, 1):
                os.write(b_w, b"x")
            code = 0
        finally:
            os._exit(code)
    os.close(a_r)
    os.close(b_w)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(a_w, b"x")
            os.read(b_r, 1)
        return time.perf_counter() - t0
    finally:
        os.close(a_w)
        os.close(b_r)
        os.waitpid(pid, 0)


def _start_server(path: str, loop_kind: str) -> tuple[int, int]:
    """Fork a child serving ``echo`` on ``path``; returns (pid, stop_fd). Closing
    stop_fd stops it. Returns once the socket accepts connections."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(stop_w)

            async def echo(channel, req):
                for fd in req.fds:
                    os.close(fd)
                return req.params, ()

            async def main():
                srv = await ipc.serve(path, echo)
                os.write(ready_w, b"r")
                stop = asyncio.Event()
                asyncio.get_running_loop().add_reader(stop_r, stop.set)
                await stop.wait()
                await srv.close()

            with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as r:
                r.run(main())
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    if os.read(ready_r, 1) != b"r":
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RuntimeError("IPC bench server failed to start")
    os.close(ready_r)
    return pid, stop_w


async def _client_runs(path: str, n: int, window: int) -> dict[str, float]:
    ch = await ipc.connect(path, timeout=10)
    try:
        for _ in range(200):  # warm up
            await ch.request("echo", 1)
        t0 = time.perf_counter()
        for i in range(n):
            await ch.request("echo", i)
        seq = time.perf_counter() - t0

        async def worker(count: int) -> None:
            for i in range(count):
                await ch.request("echo", i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n // window) for _ in range(window)))
        piped = time.perf_counter() - t0

        r, w = os.pipe()
        try:
            m = max(1, n // 4)
            t0 = time.perf_counter()
            for _ in range(m):
                await ch.request("echo", None, fds=[w])
            with_fd = (time.perf_counter() - t0) * n / m  # scaled to n round trips
        finally:
            os.close(r)
            os.close(w)
    finally:
        await ch.close()
    return {"sequential": seq, f"pipelined x{window}": piped, "with 1 fd": with_fd}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane bench ipc", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--n", type=int, default=5000, help="round trips per case (default 5000)")
    ap.add_argument("--window", type=int, default=32, help="requests in flight when pipelined")
    args = ap.parse_args(argv)
    n = args.n

    rows = []
    pipe_s = _pipe_pingpong(n * 4)
    pipe_rate = n * 4 / pipe_s
    rows.append({"case": "os.pipe ping-pong (reference)", "loop": "-", "round_trips": n * 4, "seconds": pipe_s, "per_sec": pipe_rate, "us_each": 1e6 / pipe_rate})

    tmp = tempfile.mkdtemp(prefix="hp-bench-ipc-")
    path = os.path.join(tmp, "bench.sock")
    summary: dict[str, float] = {"pipe_round_trips_per_sec": pipe_rate}
    try:
        for kind, factory in LOOPS.items():
            pid, stop = _start_server(path, kind)
            try:
                with asyncio.Runner(loop_factory=factory) as r:
                    results = r.run(_client_runs(path, n, args.window))
            finally:
                os.close(stop)
                os.waitpid(pid, 0)
            for case, secs in results.items():
                rate = n / secs
                rows.append({"case": f"ipc request {case}", "loop": kind, "round_trips": n, "seconds": secs, "per_sec": rate, "us_each": 1e6 / rate})
                if case == "sequential":
                    summary[f"ipc_{kind}_per_sec"] = rate
                    summary[f"ipc_{kind}_vs_pipe"] = rate / pipe_rate
        pid, stop = _start_server(path, "uvloop")
        try:
            m = max(10, n // 20)
            t0 = time.perf_counter()
            for i in range(m):
                ipc.request_sync(path, "echo", i, 10)
            secs = time.perf_counter() - t0
        finally:
            os.close(stop)
            os.waitpid(pid, 0)
        rows.append({"case": "request_sync (connect per call)", "loop": "server uvloop", "round_trips": m, "seconds": secs, "per_sec": m / secs, "us_each": 1e6 * secs / m})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    emit("ipc", rows, as_json=args.json, summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
