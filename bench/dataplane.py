"""Data-plane cost: meshed clients against the bare ones, as ratios measured in one run.

The mesh routes `reviews:9080` with a VirtualService splitting 90/10 over subsets v1 and v2 of
a DestinationRule, the route's default retry policy (tenacity per request) and the default
LEAST_REQUEST balancer. Both subsets' endpoints are the same uvicorn process (the server of
`bench.async_client`, 1 worker, httptools), listed twice with different `version` labels, so
the meshed and the bare client talk to the same socket and only the mesh differs.

1. Sequential latency, httpx.Client vs meshlib.Client and requests.Session vs meshlib.Session:
   200 warm-up GETs per client, then N=3000 timed GETs per client in ROUNDS alternating
   blocks (bare, meshed, bare, ...), so machine noise hits both alike; p50 and p99 over all
   N. Goal: meshed <= 1.10x bare.
2. Async throughput at 64 concurrent tasks, stock httpx.AsyncClient vs meshlib.AsyncClient
   (routing, balancing, a tenacity AsyncRetrying per request, over meshlib's HTTP/1.1
   transport): alternating 1 s windows, ~3 s per client. Goal: >= 10x stock. A diagnostic
   row runs meshlib's Http1Transport without the mesh, separating transport from policy.
3. What the mesh itself adds per request, without a network: the same `httpx.MockTransport`
   (and a mock requests adapter) under a bare and a meshed client, alternating rounds, median
   of the rounds' means; and `mesh.plan()` alone.

Only ratios and differences are meaningful: server and client share this machine's cores.
`python -m bench.dataplane --profile` profiles the meshed sync path over MockTransport
(cProfile) and prints where meshlib spends its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

import meshlib
from bench.async_client import BODY, _run, serve
from meshlib.clients.requests import MeshAdapter
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from meshlib.policy.loader import load_text
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Snapshot

HOST = "reviews.default.svc.cluster.local"
MESH_URL = "http://reviews:9080/"
ROUNDS = 5  # alternating bare/meshed blocks per comparison
N = 3000  # timed sequential requests per client, over all rounds
WARMUP = 200  # untimed requests per client before the first round
TASKS = 64  # async concurrency
ASYNC_ROUNDS = 3
ASYNC_WINDOW_S = 1.0  # per client per round: ~3 s each in all
ASYNC_WARMUP_S = 0.3
MOCK_N = 2000  # requests per client per round over the mock transports
PLAN_N = 20_000
LATENCY_GOAL = 1.10
THROUGHPUT_GOAL = 10.0
ROOT = Path(__file__).resolve().parent.parent


def policy(port: int) -> str:
    """ServiceEntry (one server listed twice), DestinationRule subsets, 90/10 VirtualService."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{HOST}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: reviews, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: reviews, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: 90
    - destination: {{host: reviews, subset: v2}}
      weight: 10
"""


def make_mesh(port: int) -> Mesh:
    result = load_text(policy(port), "bench-dataplane.yaml")
    result.raise_for_errors()
    config = MeshConfig(service="productpage")
    snapshot = Snapshot.build(result.resources, config)
    return Mesh(config, policy=snapshot, rng=random.Random(7))


# -- sequential latency over the network ----------------------------------------------------

Get = Callable[[], Any]


def _check(status: int, body: bytes) -> None:
    if status != 200 or body != BODY:
        raise RuntimeError(f"unexpected response {status} {body[:80]!r}")


def _timed(get: Get, n: int, samples: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        response = get()
        samples.append(clock() - start)
        if response.status_code != 200:  # outside the timed span; the body is checked below
            _check(response.status_code, b"")
    _check(*_status_body(response))


def _status_body(response: Any) -> tuple[int, bytes]:
    return response.status_code, response.content


def _quantile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank quantile, in microseconds."""
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def alternate(bare: Get, meshed: Get, n: int = N, rounds: int = ROUNDS) -> dict[str, Any]:
    """Warm both up, then `rounds` alternating blocks of n/rounds timed calls each."""
    for get in (bare, meshed):
        for _ in range(WARMUP):
            _check(*_status_body(get()))
    per_round = n // rounds
    samples: dict[str, list[int]] = {"bare": [], "meshed": []}
    round_p50: dict[str, list[float]] = {"bare": [], "meshed": []}
    for r in range(rounds):
        order = (("bare", bare), ("meshed", meshed))
        for name, get in order if r % 2 == 0 else order[::-1]:
            block: list[int] = []
            _timed(get, per_round, block)
            samples[name] += block
            round_p50[name].append(_quantile(sorted(block), 0.5))
    out: dict[str, Any] = {}
    for name, ns in samples.items():
        ns.sort()
        out[name] = (_quantile(ns, 0.5), _quantile(ns, 0.99))
    ratios = [m / b for b, m in zip(round_p50["bare"], round_p50["meshed"], strict=True)]
    out["p50_ratio_range"] = (min(ratios), max(ratios))
    return out


def sequential(mesh: Mesh, url: str) -> dict[str, dict[str, Any]]:
    results = {}
    with httpx.Client() as bare, meshlib.Client(mesh=mesh) as meshed:
        results["httpx"] = alternate(lambda: bare.get(url), lambda: meshed.get(MESH_URL))
    with requests.Session() as bare_s, meshlib.Session(mesh=mesh) as meshed_s:
        results["requests"] = alternate(lambda: bare_s.get(url), lambda: meshed_s.get(MESH_URL))
    return results


# -- async throughput -----------------------------------------------------------------------


async def _throughput(mesh: Mesh, url: str) -> dict[str, float]:
    """req/s per client; the clients take turns, a window each per round."""
    from meshlib.clients._http1 import Http1Transport

    clients = {
        "stock": (httpx.AsyncClient(), url),
        "meshed": (meshlib.AsyncClient(mesh=mesh), MESH_URL),
        # diagnostic: meshlib's transport without the mesh, to split transport from policy
        "transport": (httpx.AsyncClient(transport=Http1Transport()), url),
    }
    done = dict.fromkeys(clients, 0)
    elapsed = dict.fromkeys(clients, 0.0)

    def sender(client: httpx.AsyncClient, target: str) -> Callable[[], Any]:
        async def send() -> None:
            response = await client.get(target)
            _check(response.status_code, response.content)

        return send

    senders = {name: sender(client, target) for name, (client, target) in clients.items()}
    try:
        for send in senders.values():
            await _run(send, TASKS, ASYNC_WARMUP_S)
        names = list(senders)
        for r in range(ASYNC_ROUNDS):
            for name in names[r:] + names[:r]:  # rotate who goes first
                count, seconds = await _run(senders[name], TASKS, ASYNC_WINDOW_S)
                done[name] += count
                elapsed[name] += seconds
    finally:
        for client, _ in clients.values():
            await client.aclose()
    return {name: done[name] / elapsed[name] for name in done}


# -- the mesh's own cost, no network ---------------------------------------------------------


def _mock_handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/plain"}, content=BODY)


class MockAdapter(HTTPAdapter):
    """requests' twin of httpx.MockTransport: a fixed 200 answer, no socket."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        response = requests.Response()
        response.status_code = 200
        response.reason = "OK"
        response.headers = CaseInsensitiveDict({"content-type": "text/plain"})
        response._content = BODY
        response.raw = io.BytesIO(BODY)
        response.url = request.url or ""
        response.request = request
        response.connection = self
        return response


def _mean_us(run: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    run(n)
    return (time.perf_counter() - start) / n * 1e6


def _alternate_means(bare: Callable[[int], None], meshed: Callable[[int], None]) -> list[float]:
    bare(WARMUP)
    meshed(WARMUP)
    means: dict[str, list[float]] = {"bare": [], "meshed": []}
    for r in range(ROUNDS):
        order = (("bare", bare), ("meshed", meshed))
        for name, run in order if r % 2 == 0 else order[::-1]:
            means[name].append(_mean_us(run, MOCK_N))
    return [statistics.median(means["bare"]), statistics.median(means["meshed"])]


def _loop(get: Get) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            response = get()
        _check(*_status_body(response))

    return run


def _async_loop(client: httpx.AsyncClient, url: str) -> Callable[[int], None]:
    async def many(n: int) -> None:
        for _ in range(n):
            response = await client.get(url)
        _check(response.status_code, response.content)

    def run(n: int) -> None:
        asyncio.run(many(n))  # a fresh loop per block: the same overhead for both clients

    return run


def mock_costs(mesh: Mesh) -> dict[str, list[float]]:
    """Mean µs per request, bare and meshed, over transports that never touch a socket."""
    url = "http://127.0.0.1:1/"
    results = {}
    mock = httpx.MockTransport(_mock_handler)
    with httpx.Client(transport=mock) as bare, meshlib.Client(mesh=mesh, transport=mock) as meshed:
        results["httpx.Client"] = _alternate_means(
            _loop(lambda: bare.get(url)), _loop(lambda: meshed.get(MESH_URL))
        )
    abare = httpx.AsyncClient(transport=mock)
    ameshed = meshlib.AsyncClient(mesh=mesh, transport=mock)
    results["httpx.AsyncClient"] = _alternate_means(
        _async_loop(abare, url), _async_loop(ameshed, MESH_URL)
    )
    for client in (abare, ameshed):
        asyncio.run(client.aclose())
    with requests.Session() as bare_s, requests.Session() as meshed_s:
        bare_s.mount("http://", MockAdapter())
        meshed_s.mount("http://", MeshAdapter(mesh=mesh, inner=MockAdapter()))
        results["requests.Session"] = _alternate_means(
            _loop(lambda: bare_s.get(url)), _loop(lambda: meshed_s.get(MESH_URL))
        )
    return results


def plan_cost(mesh: Mesh) -> float:
    """µs per `mesh.plan()`: host lookup, route match, weighted pick, plan assembly."""
    headers = {"host": "reviews:9080", "user-agent": "python-httpx/0.28.1", "accept": "*/*"}

    def one() -> None:
        mesh.plan(RequestAttributes("GET", "reviews:9080", "/", headers=headers))

    return min(timeit.repeat(one, number=PLAN_N, repeat=ROUNDS)) / PLAN_N * 1e6


# -- report --------------------------------------------------------------------------------


def _goal(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    start = time.perf_counter()
    print(
        f"data plane: meshed vs bare clients, one uvicorn server on 127.0.0.1 sharing this"
        f" machine's {os.cpu_count()} cores; reviews:9080 split 90/10 over subsets v1/v2,"
        " default retries"
    )
    with serve() as url:
        mesh = make_mesh(int(url.rsplit(":", 1)[1]))
        try:
            seq = sequential(mesh, url)
            rps = asyncio.run(_throughput(mesh, url))
            mocks = mock_costs(mesh)
            plan_us = plan_cost(mesh)
        finally:
            mesh.close()

    print(f"\n1. sequential GET latency, {N} per client after {WARMUP} warm-up, {ROUNDS} rounds")
    print(
        f"{'client':<10} {'p50 bare':>9} {'p50 mesh':>9} {'ratio':>6} {'(rounds)':>12}"
        f" {'p99 bare':>9} {'p99 mesh':>9} {'ratio':>6}  goal <= {LATENCY_GOAL:.2f}x"
    )
    for name, r in seq.items():
        (b50, b99), (m50, m99) = r["bare"], r["meshed"]
        lo, hi = r["p50_ratio_range"]
        verdict = (  # the issue sets its latency goal for httpx
            f"p50 {_goal(m50 / b50 <= LATENCY_GOAL)}, p99 {_goal(m99 / b99 <= LATENCY_GOAL)}"
            if name == "httpx"
            else "(no goal)"
        )
        print(
            f"{name:<10} {b50:>7.0f}us {m50:>7.0f}us {m50 / b50:>5.2f}x {lo:>5.2f}-{hi:.2f}x"
            f" {b99:>7.0f}us {m99:>7.0f}us {m99 / b99:>5.2f}x  {verdict}"
        )

    ratio = rps["meshed"] / rps["stock"]
    print(f"\n2. async throughput, {TASKS} tasks, {ASYNC_ROUNDS}x{ASYNC_WINDOW_S:.0f} s per client")
    print(f"stock httpx.AsyncClient             {rps['stock']:>7,.0f} req/s")
    print(
        f"meshlib.AsyncClient (full mesh)     {rps['meshed']:>7,.0f} req/s  {ratio:.1f}x stock"
        f" (goal >= {THROUGHPUT_GOAL:.0f}x: {_goal(ratio >= THROUGHPUT_GOAL)})"
    )
    print(
        f"  diagnostic: Http1Transport only   {rps['transport']:>7,.0f} req/s"
        f"  {rps['transport'] / rps['stock']:.1f}x stock (the transport without the mesh)"
    )

    print(f"\n3. mesh cost per request without network (mock transport, median of {ROUNDS})")
    print(f"{'client':<18} {'bare':>8} {'meshed':>8} {'added':>8} {'ratio':>6}")
    for name, (b, m) in mocks.items():
        print(f"{name:<18} {b:>6.1f}us {m:>6.1f}us {m - b:>6.1f}us {m / b:>5.2f}x")
    print(f"{'mesh.plan() alone':<18} {'':>8} {'':>8} {plan_us:>6.1f}us")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


# -- profile (python -m bench.dataplane --profile) -------------------------------------------


@contextlib.contextmanager
def _profiled() -> Iterator[cProfile.Profile]:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield profiler
    finally:
        profiler.disable()


def profile(n: int = 20_000, top: int = 15) -> None:
    """cProfile of meshlib.Client over MockTransport; meshlib functions by inclusive time."""
    mesh = make_mesh(9)
    mock = httpx.MockTransport(_mock_handler)
    with meshlib.Client(mesh=mesh, transport=mock) as client:
        run = _loop(lambda: client.get(MESH_URL))
        run(WARMUP)
        with _profiled() as profiler:
            run(n)
    mesh.close()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values())
    package = str(ROOT / "meshlib")
    rows = []
    for (file, line, func), (_, calls, tt, ct, _) in raw.items():
        if file.startswith(package):
            rows.append((ct, tt, calls, f"{Path(file).relative_to(ROOT)}:{line}({func})"))
    rows.sort(reverse=True)
    print(f"meshed httpx.Client over MockTransport, {n} requests, {total / n * 1e6:.1f} us each")
    print(f"{'incl%':>6} {'self%':>6} {'calls/req':>9}  function")
    for ct, tt, calls, name in rows[:top]:
        print(f"{ct / total:>6.1%} {tt / total:>6.1%} {calls / n:>9.1f}  {name}")
    by_package: dict[str, float] = {}
    for (file, _, _), (_, _, tt, _, _) in raw.items():
        parts = Path(file).parts
        name = next((p for p in ("meshlib", "tenacity", "httpx", "bench") if p in parts), "other")
        by_package[name] = by_package.get(name, 0.0) + tt
    shares = sorted(by_package.items(), key=lambda item: -item[1])
    print("self time by package: " + ", ".join(f"{k} {v / total:.0%}" for k, v in shares))
    print("\nall functions by self time:")
    stats.sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    profile() if "--profile" in sys.argv[1:] else main()
