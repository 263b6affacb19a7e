"""Kubernetes-shaped resources: kinds meshlib serves, object metadata, and the Resource wrapper."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from meshlib.policy._schema import Path, Sink, spec_field
from meshlib.policy.destination_rule import DestinationRule
from meshlib.policy.security import AuthorizationPolicy, PeerAuthentication
from meshlib.policy.service_entry import ServiceEntry, WorkloadEntry
from meshlib.policy.telemetry import Telemetry
from meshlib.policy.virtual_service import VirtualService

SpecT = TypeVar("SpecT")

_NETWORKING = ("networking.istio.io", ("v1", "v1beta1", "v1alpha3"))
_SECURITY = ("security.istio.io", ("v1", "v1beta1"))
_TELEMETRY = ("telemetry.istio.io", ("v1", "v1alpha1"))


@dataclass(frozen=True, slots=True)
class Kind:
    """A resource kind meshlib serves: its API group, served versions and spec type."""

    name: str
    group: str
    versions: tuple[str, ...]
    spec_type: type


KINDS: Mapping[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("VirtualService", *_NETWORKING, VirtualService),
        Kind("DestinationRule", *_NETWORKING, DestinationRule),
        Kind("ServiceEntry", *_NETWORKING, ServiceEntry),
        Kind("WorkloadEntry", *_NETWORKING, WorkloadEntry),
        Kind("PeerAuthentication", *_SECURITY, PeerAuthentication),
        Kind("AuthorizationPolicy", *_SECURITY, AuthorizationPolicy),
        Kind("Telemetry", *_TELEMETRY, Telemetry),
    )
}

# Istio kinds that have no meaning inside a process: loaded with a warning, never an error.
IGNORED_KINDS: Mapping[str, str] = {
    "Gateway": "gateways configure ingress/egress proxies, not sidecars",
    "Sidecar": "meshlib has no proxy whose listeners a Sidecar could scope",
    "EnvoyFilter": "meshlib does not run Envoy",
    "WorkloadGroup": "auto-registration of VMs needs istiod",
    "ProxyConfig": "meshlib does not run a proxy",
    "RequestAuthentication": "JWT authentication is not implemented by meshlib yet",
    "WasmPlugin": "meshlib does not run Wasm filters",
}

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """The parts of Kubernetes ObjectMeta that meshlib reads; the rest is accepted and unused."""

    name: str | None = None
    namespace: str | None = None
    labels: Mapping[str, str] = spec_field({})
    annotations: Mapping[str, str] = spec_field({})
    creation_timestamp: Any = None
    generate_name: Any = None
    uid: Any = None
    resource_version: Any = None
    generation: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: Any = None
    owner_references: Any = None
    finalizers: Any = None
    managed_fields: Any = None
    self_link: Any = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.name:
            sink.error((*path, "name"), "is required")
        elif len(self.name) > 253 or not _DNS_SUBDOMAIN.fullmatch(self.name):
            sink.error(
                (*path, "name"),
                f"invalid name {self.name!r} (lowercase letters, digits, '-' and '.')",
            )
        if self.namespace is not None and not _DNS_LABEL.fullmatch(self.namespace):
            sink.error(
                (*path, "namespace"),
                f"invalid namespace {self.namespace!r} (a DNS label, as Kubernetes requires:"
                " at most 63 lowercase letters, digits and '-')",
            )


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a resource came from: a file and line, or a Kubernetes API server."""

    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file or '<input>'}:{self.line}" if self.line else (self.file or "<input>")


@dataclass(frozen=True, slots=True)
class Resource(Generic[SpecT]):
    """One Istio object: kind, identity, spec, and where it was defined."""

    kind: str
    api_version: str
    name: str
    namespace: str
    spec: SpecT
    labels: Mapping[str, str]
    creation_timestamp: str | None = None
    origin: Origin = Origin()
    order: int = 0  # position in load order; ties in "oldest wins" rules break on it

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)
