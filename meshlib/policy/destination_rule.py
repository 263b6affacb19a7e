"""DestinationRule: what happens to traffic for a host once routing has chosen it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from meshlib.policy._schema import Int32, Path, Sink, UInt32, UInt64, camel, spec_field, spelled
from meshlib.policy.common import (
    MILLISECOND,
    Duration,
    MatchLabelsSelector,
    Percent,
    PortSelector,
    check_export_to,
    check_host,
    check_labels,
    is_dns_label,
)

LBSimple = Literal[
    "UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"
]

_LOCALITY = "localities do not exist in library mode"
# Pilot stopped reading the deprecated field (applyOutlierDetection), so Envoy's defaults apply.
_CONSECUTIVE_ERRORS = (
    "consecutiveErrors is deprecated and Istio no longer reads it (without"
    " consecutive5xxErrors, Envoy's 5 consecutive 5xx eject); use consecutive5xxErrors or"
    " consecutiveGatewayErrors"
)


@dataclass(frozen=True, slots=True)
class HTTPCookie:
    name: str = spec_field(required=True)
    path: str | None = None
    ttl: Duration | None = spec_field(ge=0)
    attributes: tuple[Any, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.name:
            sink.error((*path, "name"), "a cookie name is required for httpCookie")


@dataclass(frozen=True, slots=True)
class RingHash:
    minimum_ring_size: int | None = spec_field(ge=0, le=8_388_608)


@dataclass(frozen=True, slots=True)
class MagLev:
    table_size: int | None = spec_field(ge=0)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        size = self.table_size
        if not size:  # 0 is proto3's unset, and Envoy's isPrime(0) is false: two errors
            sink.error((*path, "tableSize"), "must be set for maglev")
        if size is not None and (size >= 5_000_011 or not _is_prime(size)):
            sink.error((*path, "tableSize"), f"must be a prime number below 5000011 (got {size})")


def _is_prime(n: int) -> bool:
    """Envoy's (and so Istio's) isPrime, which counts 1 as prime: Envoy accepts a table of 1."""
    if 0 < n < 4:
        return True
    if n % 2 == 0:
        return False
    return all(n % d for d in range(3, int(n**0.5) + 1, 2))


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: UInt64 | None = spec_field(ge=0)  # deprecated; ringHash.minimumRingSize

    def validate_policy(self, path: Path, sink: Sink) -> None:
        keys = [
            k
            for k in (
                "http_header_name",
                "http_cookie",
                "use_source_ip",
                "http_query_parameter_name",
            )
            if getattr(self, k) not in (None, False)
        ]
        # No key is valid (Istio accepts it): Envoy then hashes nothing and picks at random.
        if len(keys) > 1:
            sink.error(
                path,
                "only one hash key may be set: httpHeaderName, httpCookie, useSourceIp"
                " or httpQueryParameterName",
            )
        if self.ring_hash is not None and self.maglev is not None:
            sink.error(path, "only one of ringHash and maglev may be set")
        if self.minimum_ring_size is not None and (self.ring_hash or self.maglev):
            sink.error((*path, "minimumRingSize"), "cannot be combined with ringHash or maglev")
        if self.minimum_ring_size:  # Istio warns unless it is unset (0)
            sink.warning(
                (*path, "minimumRingSize"),
                "consistent hash minimumRingSize is deprecated, use ringHash.minimumRingSize",
            )


@dataclass(frozen=True, slots=True)
class WarmupConfiguration:
    duration: Duration = spec_field(required=True, ge=MILLISECOND)
    minimum_percent: float | None = spec_field(ge=0, le=100)
    aggression: float | None = spec_field(ge=1)


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    simple: LBSimple | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: Any = spec_field(ignored=_LOCALITY)
    zone_aware_lb_setting: Any = spec_field(ignored=_LOCALITY)
    warmup_duration_secs: Duration | None = spec_field(ge=MILLISECOND)
    warmup: WarmupConfiguration | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.simple is not None and self.consistent_hash is not None:
            sink.error(path, "only one of simple and consistentHash may be set")
        if self.warmup is not None and self.warmup_duration_secs is not None:
            sink.error(path, "only one of warmup and warmupDurationSecs may be set")

    @property
    def algorithm(self) -> str:
        """The effective simple algorithm: LEAST_REQUEST unless stated (Istio >= 1.14)."""
        if self.consistent_hash is not None:
            return "CONSISTENT_HASH"
        if self.simple in (None, "UNSPECIFIED", "LEAST_CONN"):
            return "LEAST_REQUEST"
        return self.simple


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    probes: UInt32 | None = spec_field(ge=0)
    time: Duration | None = spec_field(ge=MILLISECOND)
    interval: Duration | None = spec_field(ge=MILLISECOND)


@dataclass(frozen=True, slots=True)
class TCPSettings:
    max_connections: Int32 | None = spec_field(ge=0)
    connect_timeout: Duration | None = spec_field(ge=MILLISECOND)
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = spec_field(ge=MILLISECOND)
    idle_timeout: Duration | None = spec_field(ge=MILLISECOND)


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    http1_max_pending_requests: Int32 | None = spec_field(ge=0)
    http2_max_requests: Int32 | None = spec_field(ge=0)
    max_requests_per_connection: Int32 | None = spec_field(ge=0)
    max_retries: Int32 | None = spec_field(ge=0)
    idle_timeout: Duration | None = spec_field(ge=MILLISECOND)
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: Int32 | None = spec_field(ge=0)
    http2_keep_alive: Any = spec_field(ignored="HTTP/2 keepalive pings are left to the client")

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.h2_upgrade_policy == "UPGRADE" and self.use_client_protocol:
            sink.error(path, "useClientProtocol must not be true when h2UpgradePolicy is UPGRADE")


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.tcp is None and self.http is None:
            sink.error(path, "a connection pool needs tcp or http settings")


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: UInt32 | None = spec_field(ge=0)
    consecutive_gateway_errors: UInt32 | None = spec_field(ge=0)
    consecutive_5xx_errors: UInt32 | None = spec_field(ge=0)
    interval: Duration | None = spec_field(ge=MILLISECOND)
    base_ejection_time: Duration | None = spec_field(ge=MILLISECOND)
    max_ejection_percent: int | None = spec_field(ge=0, le=100)
    min_health_percent: int | None = spec_field(ge=0, le=100)
    consecutive_errors: Int32 | None = spec_field(ge=0, ignored=_CONSECUTIVE_ERRORS)
    outlier_detection_http_error_codes: tuple[int, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.consecutive_local_origin_failures and not self.split_external_local_origin_errors:
            sink.error(
                (*path, "consecutiveLocalOriginFailures"),
                "needs splitExternalLocalOriginErrors: true",
            )
        for index, code in enumerate(self.outlier_detection_http_error_codes):
            # Istio's CRD bounds each code (list-value-validation), and the API server checks
            # that on apply; istiod's Go validation does not, so this is where files meet it.
            if not 100 <= code <= 599:
                bound = ">= 100" if code < 100 else "<= 599"
                sink.error(
                    (*path, "outlierDetectionHttpErrorCodes", index),
                    f"must be {bound} (an HTTP status code)",
                )


TLSMode = Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    mode: TLSMode | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.mode == "ISTIO_MUTUAL":
            for f in fields(self):
                if f.name != "mode" and getattr(self, f.name) not in (None, ()):
                    sink.warning(
                        path, "ISTIO_MUTUAL uses Istio certificates; other TLS settings are ignored"
                    )
                    break
        if self.mode in ("SIMPLE", "MUTUAL") and self.credential_name:
            given = [
                key
                for key, value in (
                    ("clientCertificate", self.client_certificate),
                    ("privateKey", self.private_key),
                    ("caCertificates", self.ca_certificates),
                    ("caCrl", self.ca_crl),
                )
                if value
            ]
            if given:  # Istio's ValidateTLS: the credential holds them
                sink.error(
                    path,
                    f"{', '.join(given)} cannot be given with credentialName (it holds them)",
                )
        if self.mode == "MUTUAL" and self.credential_name is None:
            if not self.client_certificate:
                sink.error((*path, "clientCertificate"), "is required for MUTUAL")
            if not self.private_key:
                sink.error((*path, "privateKey"), "is required for MUTUAL")


@dataclass(frozen=True, slots=True)
class RetryBudget:
    percent: Percent | None = None
    min_retry_concurrency: UInt32 | None = spec_field(ge=0)
    budget_interval: Duration | None = spec_field(ge=MILLISECOND)


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


# The blocks a subset or port-level policy replaces wholesale (ISTIO.md §2.2).
POLICY_BLOCKS = ("load_balancer", "connection_pool", "outlier_detection", "tls")


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tunnel: Any = spec_field(ignored="tunnelling needs a proxy")
    proxy_protocol: Any = spec_field(ignored="PROXY protocol needs a proxy")
    retry_budget: RetryBudget | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if all(getattr(self, f.name) in (None, ()) for f in fields(self)):
            sink.error(path, "a traffic policy needs at least one field")
        seen: set[int] = set()
        for index, port_policy in enumerate(self.port_level_settings):
            where = (*path, "portLevelSettings", index)
            if all(getattr(port_policy, block) is None for block in POLICY_BLOCKS):
                sink.error(
                    where,
                    "a port-level setting needs loadBalancer, connectionPool,"
                    " outlierDetection or tls",
                )
            if port_policy.port is None:
                sink.error((*where, "port"), "is required")
            elif port_policy.port.number in seen:
                # Istio accepts it; pilot takes the first entry for a port, as meshlib does.
                sink.warning(
                    (*where, "port"),
                    f"duplicate port {port_policy.port.number}: only the first entry"
                    " for a port applies",
                )
            else:
                seen.add(port_policy.port.number)

    def to_dict(self) -> dict[str, Any]:
        """The blocks set, as a DestinationRule spells them (`meshlib routes`); for a policy
        from `overlay`, what applies to one destination port (port-level entries resolved)."""
        return {
            camel(block): spelled(getattr(self, block))
            for block in (*POLICY_BLOCKS, "retry_budget")
            if getattr(self, block) is not None
        }

    def for_port(self, port: int | None) -> TrafficPolicy:
        """The policy for `port`: a port-level entry replaces all four blocks, unset ones too."""
        if port is not None:
            for entry in self.port_level_settings:
                if entry.port is not None and entry.port.number == port:
                    return replace(
                        self, **{block: getattr(entry, block) for block in POLICY_BLOCKS}
                    )
        return self

    def overlay(self, subset_policy: TrafficPolicy | None, port: int | None) -> TrafficPolicy:
        """This (parent) policy with a subset's policy applied, as pilot merges them."""
        base = self.for_port(port)
        if subset_policy is None:
            return base
        # pilot's MergeSubsetTrafficPolicy: the subset's blocks replace the parent's, then a
        # subset port-level entry replaces the four port blocks (unset ones too); what a
        # port-level entry cannot hold (retryBudget) stays the subset's, else the parent's.
        changes: dict[str, Any] = {
            block: getattr(subset_policy, block)
            for block in (*POLICY_BLOCKS, "retry_budget")
            if getattr(subset_policy, block) is not None
        }
        if port is not None:
            for entry in subset_policy.port_level_settings:
                if entry.port is not None and entry.port.number == port:
                    changes.update({block: getattr(entry, block) for block in POLICY_BLOCKS})
                    break
        return replace(base, **changes) if changes else base


@dataclass(frozen=True, slots=True)
class Subset:
    name: str = spec_field(required=True)
    labels: Mapping[str, str] = spec_field({})
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    host: str = spec_field(required=True)
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    # istio.type.v1beta1.WorkloadSelector: `matchLabels`, unlike a ServiceEntry's `labels`
    workload_selector: MatchLabelsSelector | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        check_host(self.host, (*path, "host"), sink)
        names: set[str] = set()
        for index, subset in enumerate(self.subsets):
            where = (*path, "subsets", index)
            if not is_dns_label(subset.name):
                sink.error(
                    (*where, "name"),
                    f"invalid subset name {subset.name!r} (a DNS label: letters, digits and"
                    " '-', at most 63)",
                )
            check_labels(subset.labels, (*where, "labels"), sink)
            if subset.name in names:
                sink.error((*path, "subsets", index, "name"), f"duplicate subset {subset.name!r}")
            names.add(subset.name)

    def validate_in_namespace(self, namespace: str, path: Path, sink: Sink) -> None:
        """Checks that need the resource's namespace (`.` in exportTo names it)."""
        check_export_to(
            self.export_to,
            namespace,
            (*path, "exportTo"),
            sink,
            workload_selector=self.workload_selector is not None,
        )

    def subset(self, name: str) -> Subset | None:
        for subset in self.subsets:
            if subset.name == name:
                return subset
        return None
