"""MeshConfig: who this workload is, where its policy comes from, what it propagates.

Built from keyword arguments, from `MESHLIB_*` environment variables, and from the names a
Kubernetes Deployment usually sets through the Downward API (`POD_NAMESPACE`, `POD_NAME`,
`SERVICE_ACCOUNT`). Keyword arguments win over the environment (a variable one overrides is not
read). A bad value raises `ConfigError` naming the argument or variable it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meshlib._text import ascii_int
from meshlib.errors import ConfigError

DEFAULT_METRICS_PORT = 15020

# Kubernetes names: a DNS-1123 label for namespaces, a label value for app/version.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")  # SPIFFE's trust domain characters
_WORKLOAD = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?")
# Framing and hop-by-hop headers (RFC 9110 7.6.1, RFC 9112 6): each describes one message or
# one connection, so copied from the inbound request onto every outbound one they break it.
_NOT_PROPAGATED = frozenset(
    (
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)
# A Deployment's pod is named <deployment>-<replicaset hash>-<5 char suffix>.
_POD_OF_DEPLOYMENT = re.compile(r"(?P<workload>.+)-[a-z0-9]{6,10}-[a-z0-9]{5}")

_ENV = {
    "service": "MESHLIB_SERVICE",
    "version": "MESHLIB_VERSION",
    "namespace": "MESHLIB_NAMESPACE",
    "workload": "MESHLIB_WORKLOAD",
    "labels": "MESHLIB_LABELS",
    "service_account": "MESHLIB_SERVICE_ACCOUNT",
    "trust_domain": "MESHLIB_TRUST_DOMAIN",
    "cluster": "MESHLIB_CLUSTER",
    "cluster_domain": "MESHLIB_CLUSTER_DOMAIN",
    "root_namespace": "MESHLIB_ROOT_NAMESPACE",
    "policy": "MESHLIB_POLICY",
    "propagate_headers": "MESHLIB_PROPAGATE_HEADERS",
    "propagators": "MESHLIB_PROPAGATORS",
    "metrics_port": "MESHLIB_METRICS_PORT",
    "metrics_host": "MESHLIB_METRICS_HOST",
    "instance_ip": "MESHLIB_INSTANCE_IP",
}
# Every MESHLIB_* variable meshlib reads: MeshConfig's, and those a Mesh reads itself
# (telemetry/_tracer_provider.py, telemetry/access_log.py). A close misspelling of one is
# warned about.
_KNOWN_VARIABLES = (*_ENV.values(), "MESHLIB_TRACES_EXPORTER", "MESHLIB_ACCESS_LOG")
# Read when the MESHLIB_* variable is absent: the Downward API names a Deployment commonly
# sets, and OpenTelemetry's own variable for the formats to send.
_FALLBACK = {
    "namespace": "POD_NAMESPACE",
    "service_account": "SERVICE_ACCOUNT",
    "instance_ip": "INSTANCE_IP",  # what Istio's injector sets; POD_IP is read after it
    "propagators": "OTEL_PROPAGATORS",
}
# The trace formats meshlib can send, as OTEL_PROPAGATORS names them, and those it sends by
# default (OpenTelemetry's default too).
PROPAGATORS = ("tracecontext", "baggage", "b3", "b3multi")
DEFAULT_PROPAGATORS = ("tracecontext", "baggage")
# The fields that are also labels: both given, they must agree, or metrics and subsets would
# see one value and `config.version` another.
_LABEL_OF = {"service": "app", "version": "version"}


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """This workload's identity and settings.

    >>> MeshConfig(service="reviews", version="v2", namespace="bookinfo").labels["version"]
    'v2'

    `service` and `version` are also the workload's `app` and `version` labels, the ones
    DestinationRule subsets and `sourceLabels` matches select on.
    """

    service: str | None = None
    version: str | None = None
    namespace: str = "default"
    workload: str | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    service_account: str = "default"
    trust_domain: str = "cluster.local"
    cluster: str = "Kubernetes"
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    policy: str | None = None
    propagate_headers: tuple[str, ...] = ()
    propagators: tuple[str, ...] = DEFAULT_PROPAGATORS
    """The trace formats sent on every meshed call, as `OTEL_PROPAGATORS` names them (of
    `PROPAGATORS`); the formats a served request arrived in are answered in kind besides."""
    metrics_port: int | None = DEFAULT_METRICS_PORT
    metrics_host: str = "0.0.0.0"
    """The address the metrics port listens on: every interface, like Istio's 15020, so
    Prometheus can scrape the pod; `127.0.0.1` keeps it on the machine."""
    instance_ip: str | None = None
    """This instance's (pod's) IP: the source address `consistentHash.useSourceIp` hashes, as
    a sidecar sees its app's connections come from it. None: the host name stands in."""

    def __post_init__(self) -> None:
        if isinstance(self.propagate_headers, str):  # "end-user,x-user-group"
            object.__setattr__(self, "propagate_headers", _split_list(self.propagate_headers))
        object.__setattr__(self, "propagators", _formats(self.propagators))
        for name in _ENV:  # the constructor checks what it is given, as create() and from_env
            value = getattr(self, name)
            _check(name, value, f"{name}={value!r}")
        _check_labels_agree({name: getattr(self, name) for name in ("labels", *_LABEL_OF)}, {})
        labels = dict(self.labels)
        if self.service:
            labels.setdefault("app", self.service)
        if self.version:
            labels.setdefault("version", self.version)
        object.__setattr__(self, "labels", MappingProxyType(labels))
        object.__setattr__(
            self, "propagate_headers", tuple(h.lower() for h in self.propagate_headers)
        )
        if self.workload is None and self.service:
            object.__setattr__(self, "workload", self.service)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MeshConfig:
        """Read `MESHLIB_*` (and Downward API) variables; keyword arguments take precedence."""
        env = os.environ if environ is None else environ
        _warn_misspelt(env)
        # None means "not given", except for metrics_port, where it means "off".
        values = {k: v for k, v in overrides.items() if v is not None or k == "metrics_port"}
        where: dict[str, str] = {}  # the variable each value came from, for errors
        for name, var in _ENV.items():
            if name in values:  # an argument wins: its variable is not even parsed
                continue
            raw = env.get(var)
            if not raw and name in _FALLBACK:  # unset or empty: the fallback's value
                var, raw = _FALLBACK[name], env.get(_FALLBACK[name])
            if raw is None or raw == "":
                continue
            values[name] = _parse_env(name, var, raw)
            where[name] = f"{var}={raw!r}"
        if "instance_ip" not in values and env.get("POD_IP"):
            values["instance_ip"] = _parse_env("instance_ip", "POD_IP", env["POD_IP"])
        if "workload" not in values and env.get("POD_NAME"):
            values["workload"] = _workload_of_pod(env["POD_NAME"])
        _check_labels_agree(values, where)
        return cls.create(**values)

    @classmethod
    def create(cls, **kwargs: Any) -> MeshConfig:
        """Build a MeshConfig from keyword arguments, checking each value."""
        unknown = set(kwargs) - set(_ENV)
        if unknown:
            allowed = ", ".join(sorted(_ENV))
            raise ConfigError(
                f"unknown MeshConfig argument(s) {sorted(unknown)} (allowed: {allowed})"
            )
        return cls(**kwargs)  # which checks each value

    @property
    def canonical_service(self) -> str:
        """Istio's canonical service: the canonical-name label, else app, else the workload."""
        for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
            if self.labels.get(key):
                return self.labels[key]
        return self.workload or "unknown"

    @property
    def canonical_revision(self) -> str:
        """Istio's canonical revision: the canonical-revision label, else version, else latest."""
        for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
            if self.labels.get(key):
                return self.labels[key]
        return "latest"

    @property
    def principal(self) -> str:
        """This workload's SPIFFE identity."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def is_header_name(name: str) -> bool:
    """True for an HTTP header name (an RFC 9110 token), in any case."""
    return _HEADER_NAME.fullmatch(name.lower()) is not None


def _check_propagated(header: Any, where: str) -> None:
    if isinstance(header, str) and (header.startswith(":") or header.lower() in _NOT_PROPAGATED):
        raise ConfigError(
            f"{where}: {header!r} cannot be propagated: framing and hop-by-hop headers (and"
            " HTTP/2 pseudo-headers) belong to one message or connection, and copied onto"
            " every outbound call they would break it"
        )
    if not isinstance(header, str) or not is_header_name(header):
        raise ConfigError(f"{where}: {header!r} is not a valid HTTP header name")


def _formats(value: Any) -> Any:
    """Trace format names as OTEL_PROPAGATORS spells them, lowercase; "none" for none."""
    items = _split_list(value) if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        return items  # _check reports it
    names = tuple(item.lower() if isinstance(item, str) else item for item in items)
    return () if names == ("none",) else names


def _split_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _check_labels_agree(values: Mapping[str, Any], where: Mapping[str, str]) -> None:
    """Refuse `labels` that give `app` or `version` a value other than `service` or `version`
    does; `where` names the variable a value came from (else it is an argument)."""
    labels = values.get("labels")
    if not isinstance(labels, Mapping):
        return  # none, or not a mapping: _check reports that
    for name, label in _LABEL_OF.items():
        value = values.get(name)
        if value and label in labels and labels[label] != value:
            labels_from = where.get("labels", f"labels={dict(labels)!r}")
            value_from = where.get(name, f"{name}={value!r}")
            raise ConfigError(
                f"{labels_from} sets label {label}={labels[label]!r} but {value_from} disagrees:"
                " give one of them, or the same value"
            )


_warned_misspelt: set[str] = set()  # warned once a process: from_env runs again and again


def _warn_misspelt(env: Mapping[str, str]) -> None:
    """Warn, once, of a set variable that looks like a misspelling of one meshlib's
    configuration reads (`MESHLIB_SERVCE`, `meshlib_policy`): it would be ignored without a
    word, and the workload run unnamed or without its policy. Other `MESHLIB_*` names (an
    app's own, one a Telemetry `customTags` entry reads) are left alone unless that close."""
    for var in env:
        upper = var.upper()
        if not upper.startswith("MESHLIB_") or var in _KNOWN_VARIABLES or var in _warned_misspelt:
            continue
        close = difflib.get_close_matches(upper, _KNOWN_VARIABLES, 1, 0.85)
        if close:
            _warned_misspelt.add(var)
            logging.getLogger("meshlib").warning(
                "%s is not one of meshlib's configuration variables: did you mean %s?",
                var,
                close[0],
            )


def _workload_of_pod(pod: str) -> str:
    """The workload a pod belongs to: a Deployment's name, else the pod's own name."""
    match = _POD_OF_DEPLOYMENT.fullmatch(pod)
    workload = match["workload"] if match else pod
    _check("workload", workload, f"POD_NAME={pod!r}")
    return workload


def _parse_env(name: str, var: str, raw: str) -> Any:
    where = f"{var}={raw!r}"
    value: Any = raw
    if name == "labels":
        pairs: dict[str, str] = {}
        for item in _split_list(raw):
            key, sep, val = item.partition("=")
            if not sep:
                raise ConfigError(
                    f"{where}: expected comma-separated key=value pairs, got {item!r}"
                )
            pairs[key.strip()] = val.strip()
        value = pairs
    elif name == "propagate_headers":
        value = _split_list(raw)
    elif name == "propagators":
        value = _formats(raw)
        if var == "OTEL_PROPAGATORS":
            # The app's OpenTelemetry setup reads it too, and may list formats of its own
            # (xray, jaeger): meshlib sends those it can, and says so.
            known = tuple(f for f in value if f in PROPAGATORS)
            if known != value:
                known = known or DEFAULT_PROPAGATORS
                logging.getLogger("meshlib").warning(
                    "%s: meshlib cannot send %s, and sends %s; set MESHLIB_PROPAGATORS to"
                    " say which formats meshlib sends",
                    where,
                    ", ".join(f for f in value if f not in PROPAGATORS),
                    ", ".join(known),
                )
            return known
    elif name == "metrics_port":
        if raw.lower() in ("off", "none", "disabled"):
            return None
        port = ascii_int(raw, 5)  # not int(): it takes " 80", "1_000", "٣"
        if port is None or port > 65535:
            raise ConfigError(
                f"{where}: must be a port number 0-65535 (0 picks a free port), or 'off'"
            )
        return port
    _check(name, value, where)
    return value


def _check(name: str, value: Any, where: str) -> None:
    """Raise ConfigError when `value` is not acceptable for MeshConfig field `name`."""
    if name == "metrics_port":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535
        ):
            raise ConfigError(
                f"{where}: must be a port number 0-65535 (0 picks a free port), or None"
            )
    elif name == "labels":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a mapping of label names to values")
        for key, val in value.items():
            if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
                raise ConfigError(
                    f"{where}: {key!r} is not a valid Kubernetes label name (up to 63 letters,"
                    " digits, '-', '_' and '.', after an optional DNS prefix and '/')"
                )
            if not isinstance(val, str) or not _LABEL_VALUE.fullmatch(val):
                raise ConfigError(
                    f"{where}: {val!r} is not a valid value for label {key!r} (up to 63"
                    " letters, digits, '-', '_' and '.', beginning and ending with a letter or"
                    " digit)"
                )
    elif name == "propagate_headers":
        items: Iterable[Any] = _split_list(value) if isinstance(value, str) else value
        for header in items:
            _check_propagated(header, where)
    elif name == "propagators":
        if not isinstance(value, (str, tuple, list)):
            raise ConfigError(f"{where}: must be format names, comma-separated or a sequence")
        unknown = [f for f in _formats(value) if f not in PROPAGATORS]
        if unknown:
            raise ConfigError(
                f"{where}: meshlib cannot send {', '.join(map(repr, unknown))}: it sends"
                f" {', '.join(PROPAGATORS)}, comma-separated (or none)"
            )
    elif name in ("namespace", "root_namespace"):
        if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
            raise ConfigError(
                f"{where}: must be a Kubernetes namespace name (lowercase letters, digits, '-')"
            )
    elif name == "instance_ip":
        try:
            if value is not None:
                ipaddress.ip_address(value if isinstance(value, str) else "")  # not an int
        except ValueError:
            raise ConfigError(f"{where}: must be an IP address, e.g. 10.1.2.3") from None
    elif name == "metrics_host":
        try:
            if not isinstance(value, str):
                raise TypeError(value)
            ipaddress.ip_address(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: must be an IP address to listen on, e.g. 0.0.0.0 or 127.0.0.1"
            ) from None
    elif name in ("service_account", "cluster_domain"):
        if not isinstance(value, str) or len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
            raise ConfigError(
                f"{where}: must be a DNS name (lowercase letters, digits, '-' and '.'), as"
                " Kubernetes names service accounts and cluster domains"
            )
    elif name == "trust_domain":
        if not isinstance(value, str) or not _TRUST_DOMAIN.fullmatch(value):
            raise ConfigError(
                f"{where}: must be a SPIFFE trust domain (lowercase letters, digits, '.', '-',"
                " '_'), e.g. cluster.local"
            )
    elif name == "workload":
        if value is not None and (not isinstance(value, str) or not _WORKLOAD.fullmatch(value)):
            raise ConfigError(f"{where}: must be a Kubernetes workload name, e.g. reviews-v2")
    elif name in ("service", "version"):
        if value is not None and (
            not isinstance(value, str) or not value or not _LABEL_VALUE.fullmatch(value)
        ):
            raise ConfigError(
                f"{where}: must be a valid Kubernetes label value, e.g. 'reviews' or 'v2'"
            )
    elif value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string")
