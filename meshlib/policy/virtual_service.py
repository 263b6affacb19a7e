"""VirtualService (networking.istio.io v1 / v1beta1 / v1alpha3): how requests to a host route."""

from __future__ import annotations

import base64
import binascii
import builtins
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from meshlib._text import ascii_int
from meshlib.policy._schema import Int32, Path, Sink, spec_field
from meshlib.policy.common import (
    MILLISECOND,
    Duration,
    Percent,
    PortSelector,
    StringMatch,
    check_export_to,
    check_host,
    check_labels,
    check_regex,
    is_dns_label,
    is_dns_name,
)
from meshlib.policy.header_values import check_header_value
from meshlib.policy.hosts import wildcard_matches
from meshlib.policy.regex import RegexError, compile_re2, re2_substitution, unstable_captures

RETRY_ON_HTTP = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
    }
)
RETRY_ON_GRPC = frozenset(
    {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}
)
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")
# Status codes Istio accepts in retryOn: those Go's http.StatusText knows.
KNOWN_STATUS_CODES = frozenset(
    [
        *range(100, 104),
        *range(200, 209),
        226,
        *range(300, 306),
        307,
        308,
        *range(400, 419),
        *(421, 422, 423, 424, 425, 426, 428, 429, 431, 451),
        *range(500, 509),
        510,
        511,
    ]
)
GRPC_STATUS_CODES = (  # in code order: OK is 0, UNAUTHENTICATED is 16
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
GRPC_STATUS_NAMES = frozenset(GRPC_STATUS_CODES)
_PSEUDO_OR_HOST = ("host", ":authority")


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: Mapping[str, str] = spec_field({})
    add: Mapping[str, str] = spec_field({})
    remove: tuple[str, ...] = ()

    def check(self, path: Path, sink: Sink, *, request: bool) -> None:
        """Istio's rules: no pseudo-headers; `host`/`:authority` only set or added on requests."""
        for op in ("set", "add", "remove"):
            names = getattr(self, op)
            for index, name in enumerate(names):
                where = (*path, op, name if op != "remove" else index)
                lower = name.lower()
                if not name:
                    sink.error(where, "header name must not be empty")
                elif request and op != "remove" and lower in _PSEUDO_OR_HOST:
                    continue  # an authority rewrite
                elif lower == "host":
                    sink.error(where, f"invalid header {name!r}: cannot set Host header")
                elif name.startswith(":"):
                    sink.error(where, f"invalid header {name!r}: header cannot have ':' prefix")
        for op in ("set", "add"):
            for name, value in getattr(self, op).items():
                if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
                    sink.error(
                        (*path, op, name), "header value must not contain control characters"
                    )
                else:
                    check_header_value(value, (*path, op, name), sink)


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.request is not None:
            self.request.check((*path, "request"), sink, request=True)
        if self.response is not None:
            self.response.check((*path, "response"), sink, request=False)


@dataclass(frozen=True, slots=True)
class Destination:
    host: str = spec_field(required=True)
    subset: str | None = None
    port: PortSelector | None = None

    def __post_init__(self) -> None:
        _empty_is_unset(self, "subset")  # Istio checks and uses only a non-empty subset

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.host == "*":
            sink.error((*path, "host"), "invalid destination host *")
        else:
            check_host(self.host, (*path, "host"), sink)
        if self.subset is not None and not is_dns_label(self.subset):
            sink.error((*path, "subset"), f"invalid subset name {self.subset!r} (a DNS label)")


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination = spec_field(required=True)
    weight: Int32 = spec_field(0, ge=0)
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: Mapping[str, StringMatch] = spec_field({})
    port: int | None = spec_field(ge=0, le=65535)  # 0 is proto3's unset
    source_labels: Mapping[str, str] = spec_field({})
    gateways: tuple[str, ...] = ()
    query_params: Mapping[str, StringMatch] = spec_field({})
    ignore_uri_case: bool = False
    without_headers: Mapping[str, StringMatch] = spec_field({})
    source_namespace: str | None = None
    stat_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.port == 0:  # Istio reads port 0 as no port condition
            object.__setattr__(self, "port", None)
        if self.source_namespace == "":  # proto3: an empty string is unset
            object.__setattr__(self, "source_namespace", None)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        for field in ("headers", "without_headers"):
            key = "headers" if field == "headers" else "withoutHeaders"
            for name in getattr(self, field):
                claim = name.lower().startswith("@request.auth.claims")
                if not claim and not _HEADER_NAME.fullmatch(name):
                    sink.error((*path, key, name), f"invalid header name {name!r}")
        for field in ("uri", "scheme", "method", "authority"):
            string_match = getattr(self, field)
            if string_match is None:
                continue
            if string_match.regex == "*":
                sink.error((*path, field, "regex"), "'*' is not a regex (use {} for any value)")
            if field != "uri" and string_match.prefix == "":
                sink.error((*path, field, "prefix"), "a prefix match must not be empty")
        for key, matches in (
            ("headers", self.headers),
            ("withoutHeaders", self.without_headers),
            ("queryParams", self.query_params),
        ):
            for name, string_match in matches.items():
                if string_match.regex == "*" and key != "withoutHeaders":  # there: "absent"
                    sink.error(
                        (*path, key, name, "regex"), "'*' is not a regex (use {} for presence)"
                    )
                if string_match.prefix == "":
                    sink.error((*path, key, name, "prefix"), "a prefix match must not be empty")
        check_labels(self.source_labels, (*path, "sourceLabels"), sink)
        check_gateway_names(self.gateways, (*path, "gateways"), sink)
        if self.source_namespace is not None and not is_dns_label(self.source_namespace):
            sink.error((*path, "sourceNamespace"), f"invalid namespace {self.source_namespace!r}")


def check_gateway_names(names: tuple[str, ...], path: Path, sink: Sink) -> None:
    """Istio's validateGatewayNames: `namespace/name` (two DNS labels), or the legacy form, a
    DNS name such as `mesh` or `gw.ns` (a warning when dotted). As Istio does, the check stops
    at the first name in the legacy form."""
    for index, name in enumerate(names):
        where = (*path, index)
        namespace, slash, gateway = name.partition("/")
        if not slash:
            if "." in name:
                first, second = name.split(".")[:2]
                sink.warning(
                    where,
                    f"legacy gateway name {name!r}; prefer <namespace>/<name>: '{second}/{first}'",
                )
            if not is_dns_name(name):
                sink.error(where, f"invalid gateway name {name!r} (a DNS name, or namespace/name)")
            return
        if not namespace or not gateway:
            sink.error(where, "namespace and gateway name cannot be empty")
        if not is_dns_label(namespace):
            sink.error(where, f"invalid namespace {namespace!r} in {name!r}")
        if not is_dns_label(gateway):
            sink.error(where, f"invalid gateway name {gateway!r} in {name!r}")


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: Int32 = spec_field(0, ge=0)
    per_try_timeout: Duration | None = spec_field(ge=MILLISECOND)
    retry_on: str | None = None
    retry_remote_localities: bool | None = spec_field(
        ignored="localities do not exist in library mode"
    )
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = spec_field(ge=MILLISECOND)

    def __post_init__(self) -> None:
        if self.retry_on == "":  # proto3: an empty string is unset (Istio's default applies)
            object.__setattr__(self, "retry_on", None)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.attempts == 0 and (
            self.per_try_timeout or self.retry_on or self.retry_remote_localities is not None
        ):
            sink.error(path, "retry settings are given but attempts is 0 (retries disabled)")
        if self.retry_on is None:
            return
        for token in self.retry_on.split(","):  # Istio does not trim spaces
            if token in RETRY_ON_HTTP or token in RETRY_ON_GRPC:
                continue
            if ascii_int(token, 4) in KNOWN_STATUS_CODES:
                continue
            allowed = ", ".join(sorted(RETRY_ON_HTTP | RETRY_ON_GRPC))
            sink.error(
                (*path, "retryOn"),
                f"{token!r} is not a valid retryOn policy (allowed, comma-separated without"
                f" spaces: an HTTP status code, {allowed})",
            )


@dataclass(frozen=True, slots=True)
class Delay:
    fixed_delay: Duration | None = spec_field(ge=MILLISECOND)
    exponential_delay: Duration | None = None
    percentage: Percent | None = None
    percent: int | None = spec_field(ge=0, le=100)  # deprecated integer form

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.fixed_delay is None and self.exponential_delay is None:
            # Istio accepts it, and pilot drops a delay without a fixedDelay from the route.
            sink.warning(path, "a delay without fixedDelay does nothing (it is ignored)")
        if self.exponential_delay is not None:
            sink.error((*path, "exponentialDelay"), "is not supported by Istio (use fixedDelay)")

    @property
    def fraction(self) -> float:
        """Share of requests delayed: `percentage`, else the deprecated `percent`, else 0."""
        if self.percentage is not None:
            return self.percentage.fraction
        return (self.percent or 0) / 100.0


@dataclass(frozen=True, slots=True)
class Abort:
    http_status: int | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        given = [f for f in ("http_status", "grpc_status", "http2_error") if getattr(self, f)]
        if not given:
            # Istio only warns, and pilot drops an abort without an error type from the route.
            sink.warning(path, "an abort without httpStatus or grpcStatus does nothing (ignored)")
        if len(given) > 1:
            sink.error(path, "only one of httpStatus, grpcStatus, http2Error may be set")
        if self.http_status is not None and not 200 <= self.http_status <= 600:
            sink.error((*path, "httpStatus"), f"HTTP status {self.http_status} is not in 200-600")
        if self.grpc_status is not None and self.grpc_status not in GRPC_STATUS_NAMES:
            allowed = ", ".join(sorted(GRPC_STATUS_NAMES))
            sink.error((*path, "grpcStatus"), f"unknown gRPC status (allowed: {allowed})")
        if self.http2_error is not None:
            sink.error((*path, "http2Error"), "HTTP/2 abort fault injection is not supported")

    @property
    def fraction(self) -> float:
        return self.percentage.fraction if self.percentage is not None else 0.0


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: Delay | None = None
    abort: Abort | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.delay is None and self.abort is None:
            sink.error(path, "a fault needs a delay, an abort, or both")


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    match: str = spec_field(required=True)
    rewrite: str = spec_field(required=True)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.match or not self.rewrite:
            empty = "match" if not self.match else "rewrite"
            sink.error((*path, empty), "uriRegexRewrite needs both match and rewrite")
        elif check_regex(self.match, (*path, "match"), sink):
            try:
                self.compiled()
            except RegexError as exc:
                sink.error((*path, "rewrite"), str(exc))

    def compiled(self) -> tuple[re.Pattern[str], str]:
        """The pattern and the `re.sub` template for it: RE2's `\\0`..`\\9` and `\\\\`
        converted once, when policy loads (raises RegexError for what RE2 refuses)."""
        pattern = compile_re2(self.match)
        unstable = unstable_captures(self.match)
        return pattern, re2_substitution(self.rewrite, pattern.groups, unstable)


def _empty_is_unset(message: object, *names: str) -> None:
    """An empty string is proto3's default, so Istio reads `uri: ""` as no `uri` at all: a
    rewrite keeps the path, a redirect keeps the request's path, host or scheme."""
    for name in names:
        if getattr(message, name) == "":
            object.__setattr__(message, name, None)


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None

    def __post_init__(self) -> None:
        _empty_is_unset(self, "uri", "authority")

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.uri is not None and self.uri_regex_rewrite is not None:
            sink.error(path, "only one of uri and uriRegexRewrite may be set")
        if self.uri is None and self.authority is None and self.uri_regex_rewrite is None:
            sink.error(path, "a rewrite needs uri, uriRegexRewrite or authority")


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = spec_field(ge=1, le=65535)
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str | None = None
    redirect_code: int | None = None

    def __post_init__(self) -> None:
        _empty_is_unset(self, "uri", "authority", "scheme")

    def validate_policy(self, path: Path, sink: Sink) -> None:
        targets = (self.uri, self.authority, self.port, self.derive_port, self.scheme)
        if all(target is None for target in targets):
            sink.error(path, "a redirect needs uri, authority, port, derivePort or scheme")
        if self.port is not None and self.derive_port is not None:
            sink.error(path, "only one of port and derivePort may be set")
        if self.redirect_code and not 300 <= self.redirect_code <= 399:
            sink.error(
                (*path, "redirectCode"), f"{self.redirect_code} is not a redirect code (3xx)"
            )
        if self.scheme not in (None, "", "http", "https"):
            sink.error((*path, "scheme"), "must be http or https")


@dataclass(frozen=True, slots=True)
class HTTPBody:
    string: str | None = None
    bytes: str | None = None  # base64, as protobuf JSON writes bytes

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.string is not None and self.bytes is not None:
            sink.error(path, "only one of string and bytes may be set")
        if self.bytes is not None:
            try:
                base64.b64decode(self.bytes, validate=True)
            except (binascii.Error, ValueError):
                sink.error((*path, "bytes"), "must be base64")

    def content(self) -> builtins.bytes:
        if self.bytes is not None:
            return base64.b64decode(self.bytes)
        return (self.string or "").encode()


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int = spec_field(required=True, ge=200, le=600)
    body: HTTPBody | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        """Istio limits a body kept in its config: over 1 MB an error, over 100 KB a warning."""
        size = len(self.body.content()) if self.body is not None else 0
        if size > 1024 * 1024:
            sink.error((*path, "body"), "a direct response body must be less than 1MB")
        elif size > 100 * 1024:
            sink.warning((*path, "body"), "a large direct response body (over 100KB)")


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[str, ...] = ()  # deprecated exact-match form
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        for index, origin in enumerate(self.allow_origins):
            # Istio's validateAllowOrigins: any non-empty exact, prefix or regex, `*` included
            # (Envoy treats an origin matcher that matches "*" as allowing every origin).
            if not (origin.exact or origin.prefix or origin.regex):
                sink.error(
                    (*path, "allowOrigins", index),
                    "needs a non-empty exact, prefix or regex (exact: '*' allows any origin)",
                )
            elif origin.regex == "*":
                sink.error(
                    (*path, "allowOrigins", index, "regex"),
                    "'*' is not a regex (exact: '*' allows any origin)",
                )
        for key in ("allow_headers", "expose_headers"):
            for index, name in enumerate(getattr(self, key)):
                if name != "*" and not _HEADER_NAME.fullmatch(name):
                    sink.error(
                        (*path, _KEYS[key], index),
                        f"invalid header name {name!r} (letters, digits, '-' and '_', or '*')",
                    )
        for index, method in enumerate(self.allow_methods):
            if method not in HTTP_METHODS:
                allowed = ", ".join(sorted(HTTP_METHODS))
                sink.error(
                    (*path, "allowMethods", index),
                    f"invalid method {method!r} (allowed: {allowed})",
                )
        if self.max_age is not None and self.max_age.seconds < MILLISECOND:
            sink.error((*path, "maxAge"), "must be at least 1ms")
        elif self.max_age is not None and self.max_age.seconds % 1:
            sink.error((*path, "maxAge"), "must be a whole number of seconds")


@dataclass(frozen=True, slots=True)
class Delegate:
    name: str = spec_field(required=True)
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPMirrorPolicy:
    destination: Destination = spec_field(required=True)
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = spec_field(ge=MILLISECOND)
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percentage: Percent | None = None
    mirror_percent: int | None = spec_field(ge=0, le=100)  # deprecated integer form
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        actions = [
            k
            for k in ("route", "redirect", "direct_response", "delegate")
            if getattr(self, k) not in (None, ())
        ]
        if not actions:
            sink.error(path, "a route needs one of route, redirect, directResponse or delegate")
        elif len(actions) > 1:
            names = ", ".join(_KEYS[a] for a in actions)
            sink.error(path, f"only one of route, redirect, directResponse, delegate ({names})")
        local_answer = self.redirect is not None or self.direct_response is not None
        if local_answer and self.rewrite is not None:
            sink.error((*path, "rewrite"), "cannot be combined with redirect or directResponse")
        if local_answer and self.fault is not None:
            sink.error((*path, "fault"), "cannot be combined with redirect or directResponse")
        if len(self.route) > 1 and sum(d.weight for d in self.route) <= 0:
            sink.error(
                (*path, "route"), "total weight must be > 0 when there are several destinations"
            )
        if self.mirror is not None and self.mirrors:
            sink.error((*path, "mirrors"), "only one of mirror and mirrors may be set")
        for key, given in (
            ("mirrorPercentage", self.mirror_percentage),
            ("mirrorPercent", self.mirror_percent),
        ):
            # Istio accepts either without `mirror`; it then mirrors nothing (a delegating
            # route passes it down to delegate routes that set `mirror`).
            if given is not None and self.mirror is None and self.delegate is None:
                sink.warning((*path, key), "does nothing without mirror (mirrors has its own)")
        if self.mirror_percent is not None:
            sink.warning(
                (*path, "mirrorPercent"),
                'using deprecated setting "mirrorPercent", use "mirrorPercentage" instead',
            )
        authorities = [self.rewrite.authority] if self.rewrite and self.rewrite.authority else []
        if self.headers is not None and self.headers.request is not None:
            for op in (self.headers.request.set, self.headers.request.add):
                authorities += [v for k, v in op.items() if k.lower() in _PSEUDO_OR_HOST]
        if len(authorities) > 1:
            sink.error(path, f"the authority is set more than once ({', '.join(authorities)})")


def _hosts_overlap(a: str, b: str) -> bool:
    """Istio's host.Name.Matches: equal names, or one wildcard's suffix covers the other."""
    return a == b or wildcard_matches(a, b) or wildcard_matches(b, a)


def _check_duplicate_hosts(hosts: tuple[str, ...], path: Path, sink: Sink) -> None:
    """A host equal to, or covered by a wildcard of, another host of the same VirtualService
    is a duplicate (`*.foo.com` and `a.foo.com`, `*.foo.com` and `*.com`), one error a pair,
    as Istio reports them."""
    for i, first in enumerate(hosts):
        for j in range(i + 1, len(hosts)):
            if _hosts_overlap(first, hosts[j]):
                sink.error((*path, j), f"duplicate hosts: {first!r} and {hosts[j]!r} overlap")


_KEYS = {
    "allow_headers": "allowHeaders",
    "expose_headers": "exposeHeaders",
    "direct_response": "directResponse",
    "cors_policy": "corsPolicy",
    "route": "route",
    "redirect": "redirect",
    "delegate": "delegate",
}


@dataclass(frozen=True, slots=True)
class VirtualService:
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[Any, ...] = spec_field(
        (), ignored="TLS (SNI) routes need a proxy; meshlib routes HTTP"
    )
    tcp: tuple[Any, ...] = spec_field((), ignored="TCP routes need a proxy; meshlib routes HTTP")
    export_to: tuple[str, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        check_gateway_names(self.gateways, (*path, "gateways"), sink)
        valid = [
            check_host(host, (*path, "hosts", index), sink, allow_ip=True)
            for index, host in enumerate(self.hosts)
        ]
        if "*" in self.hosts and self.applies_to_mesh:
            sink.error((*path, "hosts"), "the wildcard host '*' is not allowed for the mesh")
        elif all(valid):  # as Istio, only when every host is valid
            _check_duplicate_hosts(self.hosts, (*path, "hosts"), sink)
        if not self.http and not self.tcp and not self.tls:
            sink.error(path, "http, tcp or tls must be provided")
        if self.applies_to_mesh:
            for index, route in enumerate(self.http):
                for m_index, block in enumerate(route.match):
                    for key, names in (
                        ("headers", block.headers),
                        ("withoutHeaders", block.without_headers),
                    ):
                        for name in names:
                            if name.lower().startswith("@request.auth.claims"):
                                sink.error(
                                    (*path, "http", index, "match", m_index, key, name),
                                    "JWT claim based routing is only supported for gateways",
                                )
        if not self.hosts:  # a delegate VirtualService
            for key, given in (("gateways", self.gateways), ("tls", self.tls), ("tcp", self.tcp)):
                if given:  # a delegate serves only a root's http route, wherever that applies
                    sink.error((*path, key), "a delegate VirtualService (no hosts) cannot set it")
            for index, route in enumerate(self.http):
                if route.delegate is not None:
                    sink.error(
                        (*path, "http", index, "delegate"),
                        "a delegate VirtualService cannot delegate again",
                    )

    def validate_in_namespace(self, namespace: str, path: Path, sink: Sink) -> None:
        """Checks that need the resource's namespace (`.` in exportTo names it)."""
        check_export_to(self.export_to, namespace, (*path, "exportTo"), sink)

    @property
    def applies_to_mesh(self) -> bool:
        """Istio applies a VirtualService to sidecars when `gateways` is empty or has `mesh`."""
        return not self.gateways or "mesh" in self.gateways
