"""Policy benchmarks: load + validate + compile 10,000 resources; route lookup with 1,000 VSs.

Goals (issue 2): the load <= 2 s and <= 200 MB peak on a 2-core machine; a route decision
<= 5 us. The load runs in a fresh interpreter so its peak memory is its own.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import textwrap
import timeit
from pathlib import Path

RESOURCES = 10_000
VIRTUAL_SERVICES = 1_000


def generate(count: int, seed: int = 7) -> str:
    """`count` resources in equal thirds: ServiceEntry, DestinationRule, VirtualService."""
    rng = random.Random(seed)
    docs = []
    services = count // 3
    for i in range(count):
        svc = f"svc-{i % services}"
        ns = f"ns-{i % 50}"
        kind = i * 3 // count if count >= 3 else 2
        if kind == 0:
            docs.append(
                f"""\
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {{name: {svc}, namespace: {ns}}}
                spec:
                  hosts: [{svc}.{ns}.svc.cluster.local]
                  location: MESH_INTERNAL
                  resolution: STATIC
                  ports: [{{number: 8080, name: http, protocol: HTTP}}]
                  endpoints:
                  - {{address: 10.0.{i % 250}.1, labels: {{app: {svc}, version: v1}}}}
                  - {{address: 10.0.{i % 250}.2, labels: {{app: {svc}, version: v2}}}}
                """
            )
        elif kind == 1:
            docs.append(
                f"""\
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {{name: {svc}, namespace: {ns}}}
                spec:
                  host: {svc}
                  trafficPolicy:
                    connectionPool: {{tcp: {{maxConnections: 100}}, http: {{http2MaxRequests: 1000}}}}
                    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
                  subsets:
                  - {{name: v1, labels: {{version: v1}}}}
                  - {{name: v2, labels: {{version: v2}}}}
                """
            )
        else:
            weight = rng.randint(1, 99)
            docs.append(
                f"""\
                apiVersion: networking.istio.io/v1
                kind: VirtualService
                metadata: {{name: {svc}, namespace: {ns}}}
                spec:
                  hosts: [{svc}]
                  http:
                  - match:
                    - headers: {{end-user: {{exact: jason}}}}
                      uri: {{prefix: /api}}
                    route: [{{destination: {{host: {svc}, subset: v2}}}}]
                    timeout: 2s
                  - match: [{{uri: {{regex: '/items/[0-9]+'}}}}]
                    route: [{{destination: {{host: {svc}, subset: v1}}}}]
                    retries: {{attempts: 3, perTryTimeout: 500ms, retryOn: '5xx,reset'}}
                  - route:
                    - {{destination: {{host: {svc}, subset: v1}}, weight: {weight}}}
                    - {{destination: {{host: {svc}, subset: v2}}, weight: {100 - weight}}}
                """
            )
    return "---\n".join(textwrap.dedent(d) for d in docs)


PEAK_RSS = """
def peak_rss_mb():
    # VmHWM: this process's own peak. ru_maxrss would also count the parent's memory at
    # fork time (Linux keeps it across exec), so a big parent would inflate the figure.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

LOAD_SCRIPT = """
import json, resource, sys, time

{PEAK_RSS}
t0 = time.perf_counter()
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_paths
from meshlib.policy.snapshot import Snapshot
t1 = time.perf_counter()
result = load_paths([sys.argv[1]])
result.raise_for_errors()
t2 = time.perf_counter()
snapshot = Snapshot.build(result.resources, MeshConfig(namespace="ns-0"))
t3 = time.perf_counter()
print(json.dumps({
    "resources": len(result.resources),
    "parse_validate_s": t2 - t1,
    "compile_s": t3 - t2,
    "total_s": t3 - t1,
    "peak_rss_mb": peak_rss_mb(),
}))
""".replace("{PEAK_RSS}", PEAK_RSS)

BASELINE_SCRIPT = """
import json, resource
{PEAK_RSS}
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_paths
from meshlib.policy.snapshot import Snapshot
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
""".replace("{PEAK_RSS}", PEAK_RSS)


def bench_load() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "mesh.yaml")
        path.write_text(generate(RESOURCES))
        size_mb = path.stat().st_size / 1e6
        runs = [
            json.loads(subprocess.check_output([sys.executable, "-c", LOAD_SCRIPT, str(path)]))
            for _ in range(3)
        ]
    base = json.loads(subprocess.check_output([sys.executable, "-c", BASELINE_SCRIPT]))
    best = min(runs, key=lambda r: r["total_s"])
    best["yaml_mb"] = size_mb
    best["interpreter_baseline_mb"] = base["peak_rss_mb"]
    return best


def bench_route() -> dict[str, float]:
    from meshlib.config import MeshConfig
    from meshlib.policy.loader import load_text
    from meshlib.policy.matching import RequestAttributes
    from meshlib.policy.snapshot import Snapshot

    # 1,000 VirtualServices (plus their services and rules): 3,000 resources.
    result = load_text(generate(VIRTUAL_SERVICES * 3))
    result.raise_for_errors()
    snapshot = Snapshot.build(result.resources, MeshConfig(namespace="ns-0"))
    rng = random.Random(1)
    services = VIRTUAL_SERVICES
    requests = []
    for _ in range(1000):
        i = rng.randrange(services)
        host = f"svc-{i}.ns-{i % 50}.svc.cluster.local:8080"
        kind = rng.randrange(3)
        if kind == 0:
            requests.append(RequestAttributes("GET", host, "/api/x", headers={"end-user": "jason"}))
        elif kind == 1:
            requests.append(RequestAttributes("GET", host, "/items/42", headers={}))
        else:
            requests.append(RequestAttributes("GET", host, "/other", headers={"user-agent": "x"}))
    for r in requests:
        decision = snapshot.route(r)
        assert decision.route is not None, r.authority

    def run() -> None:
        for r in requests:
            snapshot.route(r)

    per_call = min(timeit.repeat(run, number=20, repeat=5)) / (20 * len(requests))
    return {"virtual_services": VIRTUAL_SERVICES, "route_decision_us": per_call * 1e6}


def main() -> None:
    load = bench_load()
    print(
        f"policy load: {load['resources']:.0f} resources ({load['yaml_mb']:.1f} MB of YAML):"
        f" parse+validate {load['parse_validate_s']:.2f} s + compile {load['compile_s']:.2f} s"
        f" = {load['total_s']:.2f} s (goal <= 2 s); peak RSS {load['peak_rss_mb']:.0f} MB"
        f" (interpreter with meshlib imported: {load['interpreter_baseline_mb']:.0f} MB; goal <= 200 MB)"
    )
    route = bench_route()
    print(
        f"route decision with {route['virtual_services']} VirtualServices:"
        f" {route['route_decision_us']:.2f} us per request (goal <= 5 us)"
    )
