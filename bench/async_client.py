"""Async HTTP client throughput against a real loopback server (issue: httpx under concurrency).

A uvicorn server (1 worker, httptools when installed) serves a trivial ASGI app on 127.0.0.1 in
a subprocess; each client then runs for a fixed duration with 1 and with 64 concurrent tasks,
every request reading its whole body. Server and client share the same 2 cores, so the figures
are end-to-end for the pair, not the client alone.

Goal: httpx.AsyncClient over meshlib's Http1Transport >= 10x stock httpx.AsyncClient at 64
concurrent requests. Row (a2) is a diagnostic: more idle connections make stock httpx slower,
because httpcore's pool bookkeeping is quadratic in its connections (see
meshlib/clients/_http1.py). Rows (b) and (c), raw aiohttp and the benchmark's own minimal
httpx transport over it, are yardsticks for meshlib's (d): aiohttp was meshlib's transport
until its per-request cost (~60 us of client CPU, most of it features httpx already has) made
it the bottleneck. Every row prints the client's CPU time per request at 64 tasks (the
server runs in its own process), the figure that bounds throughput here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

BODY = b"hello from the mesh\n"
DURATION_S = 3.0  # measured window per client and concurrency
WARMUP_S = 0.3  # same concurrency, before measuring: opens the connections
CONCURRENCY = (1, 64)
ROOT = Path(__file__).resolve().parent.parent


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The server: a small fixed body for every request."""
    assert scope["type"] == "http"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """uvicorn in a subprocess; yields its base URL once it answers a request."""
    port = _free_port()
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    cmd = [sys.executable, "-m", "uvicorn", "bench.async_client:app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--http", http, "--loop", "asyncio"]
    cmd += ["--lifespan", "off", "--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"uvicorn exited with {proc.returncode}: {err}")
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # poll interval, not a fixed wait
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


class MinimalAiohttpTransport(httpx.AsyncBaseTransport):
    """The smallest httpx transport over aiohttp: the benchmark's own, before meshlib's."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100), auto_decompress=False
            )
        resp = await self._session.request(
            request.method,
            str(request.url),
            headers=list(request.headers.multi_items()),
            data=request.content or None,
            allow_redirects=False,
        )
        body = await resp.read()
        resp.release()
        return httpx.Response(resp.status, headers=list(resp.raw_headers), content=body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


Send = Callable[[], Awaitable[None]]
Client = Callable[[str, int], contextlib.AbstractAsyncContextManager[Send]]


@contextlib.asynccontextmanager
async def _httpx(
    url: str, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[Send]:
    async with httpx.AsyncClient(transport=transport) as client:

        async def send() -> None:
            response = await client.get(url)
            if response.status_code != 200 or response.content != BODY:
                raise RuntimeError(f"unexpected response {response!r}")

        yield send


def stock_httpx(url: str, tasks: int) -> contextlib.AbstractAsyncContextManager[Send]:
    return _httpx(url)


def httpx_keepalive(url: str, tasks: int) -> contextlib.AbstractAsyncContextManager[Send]:
    """Stock httpx, but keeping as many idle connections as there are tasks (no churn)."""
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    return _httpx(url, httpx.AsyncHTTPTransport(limits=limits))


def httpx_minimal_aiohttp(url: str, tasks: int) -> contextlib.AbstractAsyncContextManager[Send]:
    return _httpx(url, MinimalAiohttpTransport())


def httpx_meshlib(url: str, tasks: int) -> contextlib.AbstractAsyncContextManager[Send]:
    from meshlib.clients._http1 import Http1Transport

    return _httpx(url, Http1Transport())


@contextlib.asynccontextmanager
async def bare_aiohttp(url: str, tasks: int) -> AsyncIterator[Send]:
    async with aiohttp.ClientSession() as session:

        async def send() -> None:
            async with session.get(url) as response:
                if response.status != 200 or await response.read() != BODY:
                    raise RuntimeError(f"unexpected response {response!r}")

        yield send


CLIENTS: dict[str, Client] = {
    "(a) httpx.AsyncClient (stock)": stock_httpx,
    "(a2) httpx.AsyncClient, max_keepalive=100": httpx_keepalive,
    "(b) aiohttp.ClientSession": bare_aiohttp,
    "(c) httpx + minimal aiohttp transport": httpx_minimal_aiohttp,
    "(d) httpx + meshlib Http1Transport": httpx_meshlib,
}


async def _run(send: Send, tasks: int, duration: float) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    done = 0

    async def worker() -> None:
        nonlocal done
        while loop.time() < deadline:
            await send()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return done, time.perf_counter() - start


async def measure(client: Client, url: str, tasks: int) -> tuple[float, float]:
    """Requests per second of `client` with `tasks` concurrent tasks, and the client's CPU
    time per request in microseconds."""
    async with client(url, tasks) as send:
        await _run(send, tasks, WARMUP_S)
        cpu = time.process_time()
        done, elapsed = await _run(send, tasks, DURATION_S)
        cpu = time.process_time() - cpu
    return done / elapsed, cpu / done * 1e6


def bench(names: list[str] | None = None) -> dict[str, dict[int, tuple[float, float]]]:
    results: dict[str, dict[int, tuple[float, float]]] = {}
    with serve() as url:
        for name, client in CLIENTS.items():
            if names and name not in names:
                continue
            results[name] = {n: asyncio.run(measure(client, url, n)) for n in CONCURRENCY}
    return results


def main() -> None:
    print(
        f"async client throughput, uvicorn (1 worker) on 127.0.0.1, {DURATION_S} s per cell;"
        f" server and client share this machine's {os.cpu_count()} cores"
    )
    results = bench()
    width = max(map(len, results))
    print(
        f"{'client':<{width}}  "
        + "  ".join(f"{n:>3} task(s) req/s" for n in CONCURRENCY)
        + "  client CPU/request at 64"
    )
    for name, row in results.items():
        print(
            f"{name:<{width}}  "
            + "  ".join(f"{row[n][0]:>17,.0f}" for n in CONCURRENCY)
            + f"  {row[64][1]:>21,.0f} us"
        )
    stock = results["(a) httpx.AsyncClient (stock)"][64][0]
    meshlib = results["(d) httpx + meshlib Http1Transport"][64][0]
    print(
        f"meshlib transport vs stock httpx at 64 tasks: {meshlib / stock:.1f}\u00d7"
        " (goal >= 10\u00d7, issue: encode/httpx#3215)"
    )


if __name__ == "__main__":
    main()
