"""PeerAuthentication and AuthorizationPolicy (security.istio.io v1 / v1beta1)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from meshlib._text import ascii_int
from meshlib.policy._schema import EMPTY_MAP, INVALID, Path, Sink, describe, spec_field
from meshlib.policy.common import MatchLabelsSelector, PolicyTargetReference

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class PortNumber(int):
    """A port written as a map key: an integer in YAML, a string in JSON and the K8s API."""

    @classmethod
    def parse_policy(cls, value: Any, path: Path, sink: Sink) -> Any:
        if isinstance(value, str):
            number = ascii_int(value, 9)
            value = value if number is None else number
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        sink.error(path, f"must be a port number, not {describe(value)}")
        return INVALID


@dataclass(frozen=True, slots=True)
class PeerMtls:
    mode: MtlsMode | None = None


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    selector: MatchLabelsSelector | None = None
    mtls: PeerMtls | None = None
    port_level_mtls: Mapping[PortNumber, PeerMtls] = spec_field({})

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.port_level_mtls is not EMPTY_MAP and not self.port_level_mtls:  # `{}`, as istiod
            sink.error((*path, "portLevelMtls"), "if given, must have at least one port")
        if self.port_level_mtls and (self.selector is None or not self.selector.match_labels):
            sink.error(
                (*path, "portLevelMtls"),
                "mesh- or namespace-wide peer authentication cannot have port level mTLS",
            )
        for port in self.port_level_mtls:
            if not 1 <= port <= 65535:
                sink.error((*path, "portLevelMtls", str(port)), "port must be in 1..65535")


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        _check_lists(self, path, sink)
        for name in ("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks"):
            for index, block in enumerate(getattr(self, name)):
                try:
                    ipaddress.ip_network(block, strict=False)
                except ValueError:
                    sink.error((*path, _camel(name), index), f"bad IP address or CIDR {block!r}")
        if (self.service_accounts or self.not_service_accounts) and (
            self.principals or self.not_principals or self.namespaces or self.not_namespaces
        ):
            sink.error(path, "serviceAccounts cannot be combined with principals or namespaces")


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        _check_lists(self, path, sink)
        for name in ("ports", "not_ports"):
            for index, port in enumerate(getattr(self, name)):
                if _bad_port(port):
                    sink.error((*path, _camel(name), index), f"bad port {port!r}")
        for name in ("paths", "not_paths"):
            for index, value in enumerate(getattr(self, name)):
                problem = path_template_problem(value)
                if problem:
                    sink.error((*path, _camel(name), index), f"invalid path {value!r}: {problem}")


# A path segment beside a `{*}`/`{**}` template: RFC 3986 pchar characters, as Envoy's
# uri_template matcher takes them (Istio's security.IsValidLiteral).
_PATH_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")


def path_template_problem(value: str) -> str | None:
    """Why Istio's CheckValidPathTemplate refuses a path, or None: `{*}` (one segment) and
    `{**}` (the rest) are whole segments, nothing follows `{**}`, no other `{` or `}`, and
    beside a template every segment is made of URI path characters."""
    templated = "{*}" in value or "{**}" in value
    seen_any = False
    for segment in value.strip("/").split("/"):
        if segment in ("{*}", "{**}"):
            if seen_any:
                return "{**} must be the last operator"
            seen_any = segment == "{**}"
            continue
        if "{" in segment or "}" in segment:
            return "'{' or '}' other than a whole {*} or {**} segment"
        if templated and not _PATH_LITERAL.fullmatch(segment):
            return f"segment {segment!r} is not made of URI path characters"
    return None


def _bad_port(text: str) -> bool:
    number = ascii_int(text, 5)
    return number is None or number > 65535


@dataclass(frozen=True, slots=True)
class RuleFrom:
    source: Source = spec_field(required=True)


@dataclass(frozen=True, slots=True)
class RuleTo:
    operation: Operation = spec_field(required=True)


_CONDITION_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
_BRACKETED_KEY = re.compile(
    r"(request\.headers|request\.experimental\.inline\.headers|request\.auth\.claims"
    r"|experimental\.envoy\.filters\.[\w.]+)\[.+\]"
)


@dataclass(frozen=True, slots=True)
class Condition:
    key: str = spec_field(required=True)
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.key:  # Istio checks nothing else of such a condition
            sink.error((*path, "key"), "must not be empty")
            return
        if not self.values and not self.not_values:
            sink.error(path, f"at least one of values or notValues is required for {self.key!r}")
        if self.key not in _CONDITION_KEYS and not _BRACKETED_KEY.fullmatch(self.key):
            sink.error((*path, "key"), f"unknown attribute {self.key!r}")
        for field in ("values", "not_values"):
            values = getattr(self, field)
            if self.key == "source.serviceAccount" and len(values) > 16:
                sink.error((*path, _camel(field)), "may not have more than 16 values")
            for index, value in enumerate(values):
                where = (*path, _camel(field), index)
                if value == "":
                    sink.error(where, "empty value not allowed")
                elif self.key == "source.serviceAccount":
                    _check_service_account(value, where, sink)
                elif self.key in ("source.ip", "remote.ip", "destination.ip"):
                    try:
                        ipaddress.ip_network(value, strict=False)
                    except ValueError:
                        sink.error(where, f"bad IP address or CIDR {value!r}")
                elif self.key == "destination.port" and _bad_port(value):
                    sink.error(where, f"bad port {value!r}")


def _check_service_account(value: str, path: Path, sink: Sink) -> None:
    """Istio's CheckServiceAccount: `name` or `namespace/name`, no wildcard, ≤ 320 chars."""
    namespace, slash, name = value.rpartition("/")
    if "*" in value:
        sink.error(path, f"wildcard not allowed in {value!r}")
    elif value.count("/") > 1 or (slash and not namespace) or not name:
        sink.error(path, f"expected 'serviceAccount' or 'namespace/serviceAccount', not {value!r}")
    elif len(value) > 320:
        sink.error(path, "a service account cannot exceed 320 characters")


@dataclass(frozen=True, slots=True)
class Rule:
    from_: tuple[RuleFrom, ...] | None = spec_field(key="from")
    to: tuple[RuleTo, ...] | None = None
    when: tuple[Condition, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.from_ == ():
            sink.error((*path, "from"), "must not be empty")
        if self.to == ():
            sink.error((*path, "to"), "must not be empty")


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    name: str = spec_field(required=True)


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    selector: MatchLabelsSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] | None = None
    provider: ExtensionProvider | None = None
    rules: tuple[Rule, ...] | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        chosen = [n for n in ("selector", "target_ref", "target_refs") if getattr(self, n)]
        if len(chosen) > 1:
            sink.error(path, "only one of selector, targetRef and targetRefs may be set")
        action = self.action or "ALLOW"
        if action == "CUSTOM":
            if self.rules is None:  # Istio then says nothing of the provider
                sink.error(
                    path,
                    "a CUSTOM action without rules is meaningless (it is never triggered);"
                    " add an empty rule {} to trigger it for every request",
                )
            elif self.provider is None:
                sink.error((*path, "provider"), "is required for action CUSTOM")
            elif not self.provider.name:
                sink.error((*path, "provider", "name"), "must not be empty")
            for r_index, rule in enumerate(self.rules or ()):
                _check_custom_rule(rule, (*path, "rules", r_index), sink)
        elif self.provider is not None:
            sink.error((*path, "provider"), "is only allowed with action CUSTOM")
        if action == "DENY" and self.rules is None:
            sink.error(path, "a DENY action without rules is meaningless")
        if action == "DENY":
            for index, rule in enumerate(self.rules or ()):
                if _http_only(rule):
                    sink.warning(
                        (*path, "rules", index),
                        "this DENY rule uses only HTTP attributes, so it denies all traffic to"
                        " TCP ports under its scope; it is recommended to name the port",
                    )


# Source fields a TCP connection has (identities and addresses), as Istio counts them.
_TCP_SOURCE_FIELDS = (
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "trust_domains",
    "not_trust_domains",
    "ip_blocks",
    "not_ip_blocks",
    "remote_ip_blocks",
    "not_remote_ip_blocks",
)


def _http_only(rule: Rule) -> bool:
    """Istio's warning test: a rule with `from` but no `to` and no TCP source field, or with
    `to` but no port, can only be read as HTTP, so on a TCP port it matches everything."""
    sources = [f.source for f in rule.from_ or ()]
    operations = [t.operation for t in rule.to or ()]
    tcp_from = any(getattr(src, name) for src in sources for name in _TCP_SOURCE_FIELDS)
    tcp_to = any(op.ports or op.not_ports for op in operations)
    return bool((sources and not operations and not tcp_from) or (operations and not tcp_to))


_CUSTOM_UNSUPPORTED_SOURCES = (
    "namespaces",
    "not_namespaces",
    "principals",
    "not_principals",
    "request_principals",
    "not_request_principals",
)


def _check_custom_rule(rule: Rule, path: Path, sink: Sink) -> None:
    """Istio's CUSTOM action cannot use identity attributes (the provider sees none)."""
    for f_index, rule_from in enumerate(rule.from_ or ()):
        for name in _CUSTOM_UNSUPPORTED_SOURCES:
            if getattr(rule_from.source, name):
                where = (*path, "from", f_index, "source", _camel(name))
                sink.error(where, "is not supported with action CUSTOM")
    for c_index, condition in enumerate(rule.when):
        key = condition.key
        if key in ("source.namespace", "source.principal") or key.startswith("request.auth."):
            sink.error(
                (*path, "when", c_index, "key"), f"{key} is not supported with action CUSTOM"
            )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _check_lists(obj: Source | Operation, path: Path, sink: Sink) -> None:
    given = False
    for f in fields(obj):
        values = getattr(obj, f.name)
        given = given or bool(values)
        for index, value in enumerate(values):
            if value == "":
                sink.error((*path, _camel(f.name), index), "empty value not allowed")
    if not given:
        sink.error(path, "must not be empty")
