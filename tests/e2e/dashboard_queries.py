"""The PromQL that Istio's Grafana dashboards and Kiali run on the HTTP metrics, as published.

Each `Query` keeps an expression as its source has it, Grafana's template variables included;
tests/e2e/test_prometheus.py fills the variables in as Grafana would for the test's services
(frontend -> backend, namespace `default`) and checks every answer against what the traffic
was: 50 req/s, 20% of them 503, 50 ms of backend delay. Only the HTTP panels are here: the TCP
and gRPC-message panels query metrics meshlib does not emit. A panel that draws a metric
twice, once for mTLS traffic and once for the rest, is here twice: meshlib has no mTLS, so the
mTLS half must be empty and the other half carries the traffic.

Sources (repository, path, commit of the version read):
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = {
    "service": "istio/istio manifests/addons/dashboards/istio-service-dashboard.json @1272e6d",
    "workload": "istio/istio manifests/addons/dashboards/istio-workload-dashboard.json @7aafb02",
    "mesh": "istio/istio manifests/addons/dashboards/istio-mesh-dashboard.gen.json @0b2b04f "
    "(generated from istio-mesh.libsonnet and lib/queries.libsonnet)",
    "kiali-graph": "kiali/kiali graph/telemetry/istio/istio.go @5629373 (the graph's traffic)",
    "kiali-rt": "kiali/kiali graph/telemetry/istio/appender/response_time.go @be621d7",
    "kiali-tp": "kiali/kiali graph/telemetry/istio/appender/throughput.go (request/response bytes)",
    "kiali-health": "kiali/kiali prometheus/metrics.go @5132509 (health: request rates)",
    "kiali-metrics": "kiali/kiali business/metrics labels builder, prometheus/metrics.go "
    "(the app/workload/service Inbound and Outbound metrics tabs)",
}
__doc__ += "".join(f"\n- {key}: {where}" for key, where in SOURCES.items()) + "\n"

# Kiali's group-by of the graph queries (istio.go), and of its response-time appender.
KIALI_GROUP = (
    "source_cluster,source_workload_namespace,source_workload,source_canonical_service,"
    "source_canonical_revision,destination_cluster,destination_service_namespace,"
    "destination_service,destination_service_name,destination_workload_namespace,"
    "destination_workload,destination_canonical_service,destination_canonical_revision"
)
KIALI_BY = f"{KIALI_GROUP},request_protocol,response_code,grpc_response_status,response_flags"


@dataclass(frozen=True)
class Query:
    """One expression of a panel (or of Kiali), and what its answer must be.

    `expect`: "rps" (the values add up to the driven request rate), "success" (every value is
    the non-5xx share, 0.8), "seconds"/"ms" (every value a latency consistent with the 50 ms
    delay), "bytes" (every value a size between 0 and 32 bytes), "positive" (every value > 0),
    "empty" (no series). `by`: the labels whose values the answer's series must carry, and
    `keys` the set of those values over the answer. `vars`: Grafana variables set for it
    (others take the dashboard's defaults, "All" for the multi-value ones).
    """

    source: str
    panel: str
    expr: str
    expect: str
    by: tuple[str, ...] = ()
    keys: frozenset[tuple[str, ...]] = frozenset()
    vars: dict[str, str] = field(default_factory=dict)


def _keys(*rows: tuple[str, ...]) -> frozenset[tuple[str, ...]]:
    return frozenset(rows)


FROM_FRONTEND = _keys(("frontend", "default"))
FROM_FRONTEND_CODES = _keys(("frontend", "default", "200"), ("frontend", "default", "503"))
AT_BACKEND = _keys(("backend", "default"))
AT_BACKEND_CODES = _keys(("backend", "default", "200"), ("backend", "default", "503"))
TO_BACKEND = _keys(("backend.default.svc.cluster.local",))
TO_BACKEND_CODES = _keys(
    ("backend.default.svc.cluster.local", "200"), ("backend.default.svc.cluster.local", "503")
)
SRC = ("source_workload", "source_workload_namespace")
DST = ("destination_workload", "destination_workload_namespace")
SVC = ("destination_service",)
OUTBOUND = {"workload": "frontend"}  # the workload dashboard's Outbound Services rows

# Grafana's template variables of the two dashboards: (name, query, regex, multi-value).
# Each is resolved in order with query_result() and the regex over the answer's lines, as
# Grafana does; a multi-value variable left at "All" becomes `(a|b)` of its values.
SERVICE_VARIABLES = (
    (
        "srcns",
        'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_service="$service"})'
        ' by (source_workload_namespace) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", '
        'destination_service="$service"}) by (source_workload_namespace))',
        r'.*namespace="([^"]*).*',
    ),
    (
        "srcwl",
        'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_service="$service",'
        ' source_workload_namespace=~"$srcns"}) by (source_workload) or sum(istio_tcp_sent_bytes'
        '_total{reporter=~"$qrep", destination_service="$service", source_workload_namespace=~'
        '"$srcns"}) by (source_workload))',
        r'.*workload="([^"]*).*',
    ),
    (
        "dstcluster",
        'query_result(sum(istio_requests_total{reporter="destination", destination_service='
        '"$service"}) by (destination_cluster) or sum(istio_tcp_sent_bytes_total{reporter='
        '"destination", destination_service="$service"}) by (destination_cluster))',
        r'.*cluster="([^"]*).*',
    ),
    (
        "dstns",
        'query_result(sum(istio_requests_total{reporter="destination", destination_service='
        '"$service"}) by (destination_workload_namespace) or sum(istio_tcp_sent_bytes_total{'
        'reporter="destination", destination_service="$service"}) by '
        "(destination_workload_namespace))",
        r'.*namespace="([^"]*).*',
    ),
    (
        "dstwl",
        'query_result( sum(istio_requests_total{reporter="destination", destination_service='
        '"$service", destination_cluster=~"$dstcluster", destination_workload_namespace=~'
        '"$dstns"}) by (destination_workload) or sum(istio_tcp_sent_bytes_total{reporter='
        '"destination", destination_service="$service", destination_cluster=~"$dstcluster", '
        'destination_workload_namespace=~"$dstns"}) by (destination_workload))',
        r'.*workload="([^"]*).*',
    ),
)
# $service's own query; the test picks backend's value from its answer.
SERVICE_OPTIONS = (
    "query_result(sum(istio_requests_total{}) by (destination_service) or "
    "sum(istio_tcp_sent_bytes_total{}) by (destination_service))",
    r'.*destination_service="([^"]*).*',
)
WORKLOAD_OPTIONS = (
    (
        "namespace",
        "query_result(sum(istio_requests_total) by (destination_workload_namespace) or "
        "sum(istio_tcp_sent_bytes_total) by (destination_workload_namespace))",
        r'.*_namespace="([^"]*).*',
    ),
    (
        "workload",
        'query_result((sum(istio_requests_total{destination_workload_namespace=~"$namespace"}) '
        'by (destination_workload) or sum(istio_requests_total{source_workload_namespace=~"'
        '$namespace"}) by (source_workload)) or (sum(istio_tcp_sent_bytes_total{destination_'
        'workload_namespace=~"$namespace"}) by (destination_workload) or sum(istio_tcp_sent_'
        'bytes_total{source_workload_namespace=~"$namespace"}) by (source_workload)))',
        r'.*workload="([^"]*).*',
    ),
)
WORKLOAD_VARIABLES = (
    (
        "srcns",
        'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_workload='
        '"$workload", destination_workload_namespace=~"$namespace"}) by (source_workload_'
        'namespace) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_workload='
        '"$workload", destination_workload_namespace=~"$namespace"}) by '
        "(source_workload_namespace))",
        r'.*namespace="([^"]*).*',
    ),
    (
        "srcwl",
        'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_workload='
        '"$workload", destination_workload_namespace=~"$namespace", source_workload_namespace=~'
        '"$srcns"}) by (source_workload) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", '
        'destination_workload="$workload", destination_workload_namespace=~"$namespace", '
        'source_workload_namespace=~"$srcns"}) by (source_workload))',
        r'.*workload="([^"]*).*',
    ),
    (
        "dstsvc",
        'query_result(sum(istio_requests_total{reporter="source", source_workload=~"$workload", '
        'source_workload_namespace=~"$namespace"}) by (destination_service) or sum(istio_tcp_'
        'sent_bytes_total{reporter="source", source_workload=~"$workload", source_workload_'
        'namespace=~"$namespace"}) by (destination_service))',
        r'.*destination_service="([^"]*).*',
    ),
)

# A duration panel's expression at P50; the panel also draws P90, P95 and P99 (the test runs
# each), and falls back to the older `istio_request_duration_seconds`, which nobody emits now.
_P50_MS = (
    "(histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{{{sel}}}"
    "[$__rate_interval])) by ({by}le)) / 1000) or histogram_quantile(0.50, sum(irate(istio_"
    "request_duration_seconds_bucket{{{sel}}}[$__rate_interval])) by ({by}le))"
)
_P50_BYTES = (
    "histogram_quantile(0.50, sum(irate({metric}_bucket{{{sel}}}[$__rate_interval])) by ({by}le))"
)
QUANTILES = ("0.50", "0.90", "0.95", "0.99")


def _service_halves(
    panel: str,
    template: str,
    sel: str,
    by: str,
    expect: str,
    names: tuple[str, ...],
    keys: frozenset[tuple[str, ...]],
    **fmt: str,
) -> list[Query]:
    """The mTLS half (empty) and the other half (the traffic) of a service-dashboard panel."""
    out = []
    for policy, half_expect, half_keys in (
        ('connection_security_policy="mutual_tls"', "empty", frozenset()),
        ('connection_security_policy!="mutual_tls"', expect, keys),
    ):
        out.append(
            Query(
                "service",
                panel,
                template.format(sel=sel.format(policy=policy), by=by, **fmt),
                half_expect,
                names if half_keys else (),
                half_keys,
            )
        )
    return out


_S_SRC = (
    'reporter=~"$qrep", {policy}, destination_service="$service", source_workload=~"$srcwl", '
    'source_workload_namespace=~"$srcns"'
)
_S_DST = (
    'reporter="destination", {policy}, destination_service="$service", destination_workload=~'
    '"$dstwl", destination_workload_namespace=~"$dstns"'
)
_W_IN = (
    'reporter=~"$qrep", {policy}, destination_workload=~"$workload", destination_workload_'
    'namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"'
)
_W_OUT = (
    'reporter="source", {policy}, source_workload=~"$workload", source_workload_namespace=~'
    '"$namespace", destination_service=~"$dstsvc"'
)
_BY_SRC = "source_workload, source_workload_namespace, "
_BY_DST = "destination_workload, destination_workload_namespace, "
_BY_SVC = "destination_service, "

SERVICE = [
    Query(
        "service",
        "Client Request Volume",
        'round(sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service"}'
        "[$__rate_interval])), 0.001)",
        "rps",
    ),
    Query(
        "service",
        "Client Success Rate (non-5xx responses)",
        'sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service",'
        'response_code!~"5.*"}[$__rate_interval])) / (sum(irate(istio_requests_total{reporter=~'
        '"$qrep",destination_service="$service"}[$__rate_interval])) or on () vector(1))',
        "success",
    ),
    Query(
        "service",
        "Client Request Duration",
        _P50_MS.format(sel='reporter=~"$qrep",destination_service="$service"', by=""),
        "seconds",
    ),
    Query(
        "service",
        "Server Request Volume",
        'round(sum(irate(istio_requests_total{reporter="destination",destination_service='
        '"$service"}[$__rate_interval])), 0.001)',
        "rps",
    ),
    Query(
        "service",
        "Server Success Rate (non-5xx responses)",
        'sum(irate(istio_requests_total{reporter="destination",destination_service="$service",'
        'response_code!~"5.*"}[$__rate_interval])) / (sum(irate(istio_requests_total{reporter='
        '"destination",destination_service="$service"}[$__rate_interval])) or on () vector(1))',
        "success",
    ),
    Query(
        "service",
        "Server Request Duration",
        _P50_MS.format(sel='reporter="destination",destination_service="$service"', by=""),
        "seconds",
    ),
    *_service_halves(
        "Incoming Requests By Source And Response Code",
        "round(sum(irate(istio_requests_total{{{sel}}}[$__rate_interval])) by "
        "(source_workload, source_workload_namespace, response_code), 0.001)",
        _S_SRC,
        "",
        "rps",
        (*SRC, "response_code"),
        FROM_FRONTEND_CODES,
    ),
    *_service_halves(
        "Incoming Success Rate (non-5xx responses) By Source",
        'sum(irate(istio_requests_total{{{sel},response_code!~"5.*"}}[$__rate_interval])) by '
        "(source_workload, source_workload_namespace) / sum(irate(istio_requests_total{{{sel}}}"
        "[$__rate_interval])) by (source_workload, source_workload_namespace)",
        _S_SRC,
        "",
        "success",
        SRC,
        FROM_FRONTEND,
    ),
    *_service_halves(
        "Incoming Request Duration By Source", _P50_MS, _S_SRC, _BY_SRC, "seconds", SRC,
        FROM_FRONTEND,
    ),
    *_service_halves(
        "Incoming Request Size By Source", _P50_BYTES, _S_SRC, _BY_SRC, "bytes", SRC,
        FROM_FRONTEND, metric="istio_request_bytes",
    ),
    *_service_halves(
        "Response Size By Source", _P50_BYTES, _S_SRC, _BY_SRC, "bytes", SRC, FROM_FRONTEND,
        metric="istio_response_bytes",
    ),
    *_service_halves(
        "Incoming Requests By Destination Workload And Response Code",
        "round(sum(irate(istio_requests_total{{{sel}}}[$__rate_interval])) by "
        "(destination_workload, destination_workload_namespace, response_code), 0.001)",
        _S_DST,
        "",
        "rps",
        (*DST, "response_code"),
        AT_BACKEND_CODES,
    ),
    *_service_halves(
        "Incoming Success Rate (non-5xx responses) By Destination Workload",
        'sum(irate(istio_requests_total{{{sel},response_code!~"5.*"}}[$__rate_interval])) by '
        "(destination_workload, destination_workload_namespace) / sum(irate(istio_requests_"
        "total{{{sel}}}[$__rate_interval])) by (destination_workload, "
        "destination_workload_namespace)",
        _S_DST,
        "",
        "success",
        DST,
        AT_BACKEND,
    ),
    *_service_halves(
        "Incoming Request Duration By Service Workload", _P50_MS, _S_DST, _BY_DST, "seconds",
        DST, AT_BACKEND,
    ),
    *_service_halves(
        "Incoming Request Size By Service Workload", _P50_BYTES, _S_DST, _BY_DST, "bytes", DST,
        AT_BACKEND, metric="istio_request_bytes",
    ),
    *_service_halves(
        "Response Size By Service Workload", _P50_BYTES, _S_DST, _BY_DST, "bytes", DST,
        AT_BACKEND, metric="istio_response_bytes",
    ),
]  # fmt: skip


def _workload(queries: list[Query], **vars: str) -> list[Query]:
    return [Query("workload", q.panel, q.expr, q.expect, q.by, q.keys, vars) for q in queries]


# The workload dashboard's panels are the service dashboard's, keyed by workload; its
# Inbound rows use `$workload` = backend, its Outbound rows `$workload` = frontend.
WORKLOAD = [
    Query(
        "workload",
        "Incoming Request Volume",
        'round(sum(irate(istio_requests_total{reporter="$qrep",destination_workload_namespace=~'
        '"$namespace",destination_workload=~"$workload"}[$__rate_interval])), 0.001)',
        "rps",
    ),
    Query(
        "workload",
        "Incoming Success Rate (non-5xx responses)",
        'sum(irate(istio_requests_total{reporter="$qrep",destination_workload_namespace=~'
        '"$namespace",destination_workload=~"$workload",response_code!~"5.*"}[$__rate_interval]'
        ')) / sum(irate(istio_requests_total{reporter="$qrep",destination_workload_namespace=~'
        '"$namespace",destination_workload=~"$workload"}[$__rate_interval]))',
        "success",
    ),
    Query(
        "workload",
        "Request Duration",
        _P50_MS.format(
            sel='reporter="$qrep",destination_workload=~"$workload", '
            'destination_workload_namespace=~"$namespace"',
            by="",
        ),
        "seconds",
    ),
    *_workload(
        [
            *_service_halves(
                "Incoming Requests By Source And Response Code",
                "round(sum(irate(istio_requests_total{{{sel}}}[$__rate_interval])) by "
                "(source_workload, source_workload_namespace, response_code), 0.001)",
                _W_IN, "", "rps", (*SRC, "response_code"), FROM_FRONTEND_CODES,
            ),
            *_service_halves(
                "Incoming Success Rate (non-5xx responses) By Source",
                'sum(irate(istio_requests_total{{{sel},response_code!~"5.*"}}[$__rate_interval]'
                ")) by (source_workload, source_workload_namespace) / sum(irate(istio_requests_"
                "total{{{sel}}}[$__rate_interval])) by (source_workload, "
                "source_workload_namespace)",
                _W_IN, "", "success", SRC, FROM_FRONTEND,
            ),
            *_service_halves(
                "Incoming Request Duration By Source", _P50_MS, _W_IN, _BY_SRC, "seconds", SRC,
                FROM_FRONTEND,
            ),
            *_service_halves(
                "Incoming Request Size By Source", _P50_BYTES, _W_IN, _BY_SRC, "bytes", SRC,
                FROM_FRONTEND, metric="istio_request_bytes",
            ),
            *_service_halves(
                "Response Size By Source", _P50_BYTES, _W_IN, _BY_SRC, "bytes", SRC,
                FROM_FRONTEND, metric="istio_response_bytes",
            ),
        ]
    ),
    # Outbound: this panel splits by the peer's principal, not the security policy; meshlib
    # reports the callee's *claimed* principal, so plain-text calls land in the mTLS half.
    Query(
        "workload",
        "Outgoing Requests By Destination And Response Code (mTLS half)",
        'round(sum(irate(istio_requests_total{destination_principal=~"spiffe.*", source_'
        'workload_namespace=~"$namespace", source_workload=~"$workload", reporter="source", '
        'destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service, '
        "response_code), 0.001)",
        "rps",
        ("destination_service", "response_code"),
        TO_BACKEND_CODES,
        OUTBOUND,
    ),
    Query(
        "workload",
        "Outgoing Requests By Destination And Response Code",
        'round(sum(irate(istio_requests_total{destination_principal!~"spiffe.*", source_'
        'workload_namespace=~"$namespace", source_workload=~"$workload", reporter="source", '
        'destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service, '
        "response_code), 0.001)",
        "empty",
        vars=OUTBOUND,
    ),
    *_workload(
        [
            *_service_halves(
                "Outgoing Success Rate (non-5xx responses) By Destination",
                'sum(irate(istio_requests_total{{{sel},response_code!~"5.*"}}[$__rate_interval]'
                ")) by (destination_service) / sum(irate(istio_requests_total{{{sel}}}"
                "[$__rate_interval])) by (destination_service)",
                _W_OUT, "", "success", SVC, TO_BACKEND,
            ),
            *_service_halves(
                "Outgoing Request Duration By Destination", _P50_MS, _W_OUT, _BY_SVC,
                "seconds", SVC, TO_BACKEND,
            ),
            *_service_halves(
                "Outgoing Request Size By Destination", _P50_BYTES, _W_OUT, _BY_SVC, "bytes",
                SVC, TO_BACKEND, metric="istio_request_bytes",
            ),
            *_service_halves(
                "Response Size By Destination", _P50_BYTES, _W_OUT, _BY_SVC, "bytes", SVC,
                TO_BACKEND, metric="istio_response_bytes",
            ),
        ],
        **OUTBOUND,
    ),
]  # fmt: skip

_MESH_JOIN = (
    'label_join({q}, "destination_workload_var", ".", "destination_workload", '
    '"destination_workload_namespace")'
)
MESH = [
    Query(
        "mesh",
        "Traffic Volume",
        'round(sum (rate(istio_requests_total{reporter=~"source|waypoint"}[$__rate_interval])), '
        "0.01)",
        "rps",
    ),
    Query(
        "mesh",
        "Success Rate",
        'sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}'
        '[$__rate_interval])) / sum (rate(istio_requests_total{reporter=~"source|waypoint"}'
        "[$__rate_interval]))",
        "success",
    ),
    Query(
        "mesh",
        "4xxs",
        'round(sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"4.."}'
        "[$__rate_interval])), 0.01)or vector(0)",
        "zero",
    ),
    Query(
        "mesh",
        "5xxs",
        'round(sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"5.."}'
        "[$__rate_interval])), 0.01)or vector(0)",
        "positive",
    ),
    Query(
        "mesh",
        "HTTP/gRPC Workloads: Requests",
        _MESH_JOIN.format(
            q="sum by (destination_workload,destination_workload_namespace,destination_service) "
            '(rate(istio_requests_total{reporter=~"source|waypoint"}[$__rate_interval]))'
        ),
        "rps",
        ("destination_workload_var", "destination_service"),
        _keys(("backend.default", "backend.default.svc.cluster.local")),
    ),
    *(
        Query(
            "mesh",
            f"HTTP/gRPC Workloads: P{round(float(q) * 100)} Latency (ms)",
            _MESH_JOIN.format(
                q=f"histogram_quantile({q}, sum by (le,destination_workload,destination_workload_"
                'namespace) (rate(istio_request_duration_milliseconds_bucket{reporter=~"source|'
                'waypoint"}[$__rate_interval])))'
            ),
            "ms",
            ("destination_workload_var",),
            _keys(("backend.default",)),
        )
        for q in ("0.5", "0.9", "0.99")
    ),
    Query(
        "mesh",
        "HTTP/gRPC Workloads: Success Rate",
        _MESH_JOIN.format(
            q="sum by (destination_workload,destination_workload_namespace) (rate(istio_requests_"
            'total{reporter=~"source|waypoint",response_code!~"5.."}[$__rate_interval]))/sum by '
            "(destination_workload,destination_workload_namespace) (rate(istio_requests_total{"
            'reporter=~"source|waypoint"}[$__rate_interval]))'
        ),
        "success",
        ("destination_workload_var",),
        _keys(("backend.default",)),
    ),
]

_EDGE = ("source_workload", "destination_workload", "destination_service_name")
_NS = "default"
KIALI = [
    Query(
        "kiali-graph",
        "graph 0) incoming, unserviced: source telemetry to the namespace's services",
        f'sum(rate(istio_requests_total{{reporter="source",source_workload_namespace!="{_NS}",'
        'destination_workload_namespace="unknown",destination_workload="unknown",'
        f'destination_service=~"^.+\\\\.{_NS}\\\\..+$"}} [10s])) by ({KIALI_BY}) > 0',
        "empty",
    ),
    Query(
        "kiali-graph",
        "graph 1) incoming: destination telemetry",
        f'sum(rate(istio_requests_total{{reporter="destination",destination_workload_namespace='
        f'"{_NS}"}} [10s])) by ({KIALI_BY}) > 0',
        "positive",
        _EDGE,
        _keys(("unknown", "frontend", "frontend"), ("frontend", "backend", "backend")),
    ),
    Query(
        "kiali-graph",
        "graph 2) outgoing: source telemetry",
        f'sum(rate(istio_requests_total{{reporter="source",source_workload_namespace="{_NS}"}} '
        f"[10s])) by ({KIALI_BY}) > 0",
        "rps",
        (*_EDGE, "response_code", "response_flags", "request_protocol"),
        _keys(
            ("frontend", "backend", "backend", "200", "-", "http"),
            ("frontend", "backend", "backend", "503", "-", "http"),
        ),
    ),
    Query(
        "kiali-graph",
        "node graph (workload backend): incoming",
        f'sum(rate(istio_requests_total{{reporter="destination",destination_cluster="Kubernetes",'
        f'destination_workload_namespace="{_NS}",destination_workload="backend"}} [10s])) '
        f"by ({KIALI_BY}) > 0",
        "rps",
        ("source_cluster", "source_workload", "destination_cluster", "destination_workload"),
        _keys(("Kubernetes", "frontend", "Kubernetes", "backend")),
    ),
    Query(
        "kiali-rt",
        "response time, P95: incoming (destination telemetry)",
        f"histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket{{reporter"
        f'=~"destination|waypoint",destination_service_namespace="{_NS}"}}[10s])) by '
        f"(le,{KIALI_GROUP},request_protocol)) > 0",
        "ms",
        ("source_workload", "destination_workload"),
        _keys(("unknown", "frontend"), ("frontend", "backend")),
    ),
    Query(
        "kiali-rt",
        "response time, average: outgoing (source telemetry)",
        f'sum(rate(istio_request_duration_milliseconds_sum{{reporter=~"source|waypoint",source_'
        f'workload_namespace="{_NS}"}}[10s])) by ({KIALI_GROUP},request_protocol) / sum(rate('
        f'istio_request_duration_milliseconds_count{{reporter=~"source|waypoint",source_'
        f'workload_namespace="{_NS}"}}[10s])) by ({KIALI_GROUP},request_protocol) > 0',
        "ms",
        ("source_workload", "destination_workload"),
        _keys(("frontend", "backend")),
    ),
    Query(
        "kiali-tp",
        "throughput: response bytes, outgoing (destination reporter)",
        f'sum(rate(istio_response_bytes_sum{{reporter="destination",source_workload_namespace='
        f'"{_NS}"}}[10s])) by ({KIALI_GROUP}) > 0',
        "positive",
        ("source_workload", "destination_workload"),
        _keys(("frontend", "backend")),
    ),
    Query(
        "kiali-health",
        "service health (backend)",
        'rate(istio_requests_total{destination_service_name="backend",destination_service_'
        f'namespace="{_NS}",destination_cluster=~"Kubernetes|unknown"}}[10s]) > 0',
        "positive",
        ("reporter", "response_code"),
        _keys(("source", "200"), ("source", "503"), ("destination", "200"), ("destination", "503")),
    ),
    Query(
        "kiali-health",
        "workload health (backend): inbound",
        f'rate(istio_requests_total{{destination_workload_namespace="{_NS}",destination_workload='
        '"backend",destination_cluster="Kubernetes"}[10s]) > 0',
        "positive",
        ("reporter",),
        _keys(("source",), ("destination",)),
    ),
    Query(
        "kiali-health",
        "workload health (frontend): outbound",
        f'rate(istio_requests_total{{source_workload_namespace="{_NS}",source_workload='
        '"frontend",source_cluster="Kubernetes"}[10s]) > 0',
        "positive",
        ("reporter", "destination_workload"),
        _keys(("source", "backend"), ("destination", "backend")),
    ),
    Query(
        "kiali-health",
        "namespace health: traffic into the namespace's services",
        f'rate(istio_requests_total{{destination_service_namespace="{_NS}",destination_cluster='
        '"Kubernetes"}[10s]) > 0',
        "positive",
        ("destination_service_name",),
        _keys(("frontend",), ("backend",)),
    ),
    Query(
        "kiali-metrics",
        "app backend, inbound, source reporter: request volume",
        'sum(rate(istio_requests_total{destination_workload_namespace="default",'
        'destination_canonical_service="backend",reporter="source",request_protocol="http"}'
        "[10s]))",
        "rps",
    ),
    Query(
        "kiali-metrics",
        "app backend, inbound, source reporter: request errors (a fifth of the volume)",
        '(sum(rate(istio_requests_total{destination_workload_namespace="default",'
        'destination_canonical_service="backend",reporter="source",request_protocol="http",'
        'response_code=~"^0$|^[4-5]\\\\d\\\\d$"}[10s])) * 5)',
        "rps",
    ),
    Query(
        "kiali-metrics",
        "service backend, inbound, destination reporter: request duration P95",
        "histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket{reporter="
        '"destination",destination_service_name="backend",destination_service_namespace='
        '"default"}[10s])) by (le))',
        "ms",
    ),
    Query(
        "kiali-metrics",
        "workload frontend, outbound, source reporter: request duration average",
        'sum(rate(istio_request_duration_milliseconds_sum{source_workload_namespace="default",'
        'source_workload="frontend",reporter="source",request_protocol="http"}[10s])) / '
        'sum(rate(istio_request_duration_milliseconds_count{source_workload_namespace="default",'
        'source_workload="frontend",reporter="source",request_protocol="http"}[10s]))',
        "ms",
    ),
    Query(
        "kiali-metrics",
        "workload frontend, outbound, source reporter: response size P50",
        "histogram_quantile(0.5, sum(rate(istio_response_bytes_bucket{source_workload_namespace="
        '"default",source_workload="frontend",reporter="source",request_protocol="http"}[10s])) '
        "by (le))",
        "bytes",
    ),
]

QUERIES = [*SERVICE, *WORKLOAD, *MESH, *KIALI]
