"""Metrics cost: recording on the request path, and rendering a scrape, against prometheus-client.

1. `IstioMetrics.record()` per call, the labelled series already cached (the steady state):
   single-process storage, cycling over 1 and 64 label sets; then, in a subprocess with
   `PROMETHEUS_MULTIPROC_DIR`, the same over prometheus-client's mmap-backed children.
2. A scrape of 2,000 series: 500 label sets x Istio's 4 families, 25 labels each, histograms
   with 20 buckets (the shape of the issue's "prometheus-client took about 1.1 s"), rendered by
   meshlib's `render()` and by `prometheus_client.generate_latest` from the same registry, best
   of ROUNDS. Goal: render < 100 ms. 8,000 series (2,000 label sets) for scale.
3. Multiprocess: two worker processes record the same 500 label sets into one directory (2,000
   series once merged); record() there is prometheus-client's mmap write path. A scrape
   through `MultiProcessMetrics` + `render()` (the first one indexes the files, later ones read
   values at known offsets) against `MultiProcessCollector` + `generate_latest`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from meshlib.config import MeshConfig
from meshlib.telemetry.metrics import IstioMetrics, MultiProcessMetrics, render
from meshlib.telemetry.peer import PeerIdentity

ROUNDS = 3
CONFIG = MeshConfig(service="reviews", version="v2", namespace="bookinfo", workload="reviews-v2")
CALL: dict[str, Any] = {
    "destination_service": "reviews.bookinfo.svc.cluster.local",
    "destination_service_name": "reviews",
    "destination_service_namespace": "bookinfo",
}


def peer(i: int) -> PeerIdentity:
    return PeerIdentity(
        workload=f"productpage-v{i % 7}",
        namespace="bookinfo",
        app="productpage",
        version=f"v{i % 7}",
        canonical_service="productpage",
        canonical_revision=f"v{i % 7}",
        principal="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
        cluster="Kubernetes",
    )


def fill(istio: IstioMetrics, label_sets: int) -> None:
    """`label_sets` distinct label sets (peer x response code), a few observations each."""
    for i in range(label_sets):
        for j in range(3):
            istio.record(
                "destination",
                peer(i),
                response_code=100 + i // 7,
                **CALL,
                duration_ms=(i * 37 + j) % 5000 / 3,
                request_bytes=i * 11 + j,
                response_bytes=i * 101 + j,
            )


def record_us(istio: IstioMetrics, label_sets: int, n: int = 200_000) -> float:
    peers = [peer(i) for i in range(label_sets)]
    codes = [200 + i for i in range(label_sets)]
    for p, c in zip(peers, codes, strict=True):  # warm the cache
        istio.record(
            "destination",
            p,
            response_code=c,
            **CALL,
            duration_ms=1.0,
            request_bytes=1,
            response_bytes=1,
        )
    record = istio.record
    start = time.perf_counter()
    for i in range(n):
        k = i % label_sets
        record(
            "destination",
            peers[k],
            destination_service="reviews.bookinfo.svc.cluster.local",
            destination_service_name="reviews",
            destination_service_namespace="bookinfo",
            response_code=codes[k],
            duration_ms=12.5,
            request_bytes=310,
            response_bytes=4200,
        )
    return (time.perf_counter() - start) / n * 1e6


def best(call: Callable[[], Any], rounds: int = ROUNDS) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return min(times) * 1000, result


def bench_render(label_sets: int) -> dict[str, float]:
    registry = CollectorRegistry()
    fill(IstioMetrics(registry, CONFIG, multiprocess=False), label_sets)
    fast_ms, text = best(lambda: render(registry))
    slow_ms, _ = best(lambda: generate_latest(registry), rounds=1 if label_sets > 500 else ROUNDS)
    return {"fast_ms": fast_ms, "slow_ms": slow_ms, "mb": len(text) / 1e6}


def worker(label_sets: int) -> None:
    """In a subprocess with PROMETHEUS_MULTIPROC_DIR: fill, then time record() (prints µs)."""
    istio = IstioMetrics(CollectorRegistry(), CONFIG)
    assert istio.multiprocess
    fill(istio, label_sets)
    print(f"{record_us(istio, 64, n=50_000):.2f}")


def bench_multiprocess(label_sets: int, workers: int = 2) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as path:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path}
        argv = [sys.executable, "-m", "bench.metrics", "--worker", str(label_sets)]
        procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(workers)
        ]
        record = [float(p.communicate(timeout=600)[0]) for p in procs]
        registry = CollectorRegistry()
        MultiProcessMetrics(path, registry)
        first_ms, _ = best(lambda: render(registry), rounds=1)
        fast_ms, _ = best(lambda: render(registry))
        reference = CollectorRegistry()
        MultiProcessCollector(reference, path=path)  # type: ignore[no-untyped-call]
        slow_ms, _ = best(lambda: generate_latest(reference), rounds=1)
    return {"record_us": min(record), "first_ms": first_ms, "fast_ms": fast_ms, "slow_ms": slow_ms}


def main() -> None:
    single = IstioMetrics(CollectorRegistry(), CONFIG, multiprocess=False)
    one, many = record_us(single, 1), record_us(single, 64)
    print(
        f"IstioMetrics.record(), cached series: {one:.2f} us (1 label set), {many:.2f} us (64 label sets)"
    )
    for label_sets in (500, 2000):
        r = bench_render(label_sets)
        print(
            f"scrape of {4 * label_sets:,} series ({label_sets} label sets x 4 families, {r['mb']:.0f} MB):"
            f" meshlib render {r['fast_ms']:.0f} ms vs prometheus_client.generate_latest {r['slow_ms']:.0f} ms"
            f" ({r['slow_ms'] / r['fast_ms']:.0f}x)"
            + ("  (goal < 100 ms)" if label_sets == 500 else "")
        )
    mp = bench_multiprocess(500)
    print(
        f"multiprocess (2 workers, the same 500 label sets: 2,000 merged series): record() {mp['record_us']:.2f} us;"
        f" scrape {mp['fast_ms']:.0f} ms (first scrape, indexing the files: {mp['first_ms']:.0f} ms)"
        f" vs MultiProcessCollector + generate_latest {mp['slow_ms']:.0f} ms"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]))
    else:
        main()
