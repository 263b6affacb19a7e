"""ServiceEntry and WorkloadEntry: the services and endpoints meshlib knows outside Kubernetes."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from meshlib.policy._schema import Path, Sink, UInt32, spec_field
from meshlib.policy.common import (
    WorkloadSelector,
    check_export_to,
    check_host,
    check_labels,
    check_selector_labels,
    is_dns_label,
    is_ip,
)

PROTOCOLS = frozenset(
    [
        "HTTP",
        "HTTP2",
        "HTTPS",
        "TCP",
        "TLS",
        "UDP",
        "GRPC",
        "GRPC-WEB",
        "MONGO",
        "REDIS",
        "MYSQL",
        "HTTP_PROXY",
    ]
)
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"})


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    """An endpoint: a standalone WorkloadEntry resource or one of `ServiceEntry.endpoints`."""

    address: str | None = None
    ports: Mapping[str, int] = spec_field({})
    labels: Mapping[str, str] = spec_field({})
    network: str | None = None
    locality: str | None = None
    weight: UInt32 | None = spec_field(ge=0)
    service_account: str | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.address:
            if not self.network:
                sink.error((*path, "address"), "is required")
            else:
                sink.warning(path, f"address is unset with network {self.network!r}")
        elif self.address.startswith("unix://"):
            socket_path = self.address[len("unix://") :]
            # Istio's ValidateUnixAddress: an absolute file path, or an abstract `@name`
            if not socket_path.startswith("@") and (
                not socket_path.startswith("/") or socket_path.endswith("/")
            ):
                sink.error((*path, "address"), f"{socket_path!r} is not an absolute path to a file")
            if self.ports:
                sink.error((*path, "ports"), "a unix endpoint must not include ports")
        elif not is_ip(self.address):
            check_host(self.address, (*path, "address"), sink, allow_star=False)
        check_labels(self.labels, (*path, "labels"), sink)
        for name, number in self.ports.items():
            if not is_dns_label(name):
                sink.error((*path, "ports", name), f"invalid port name {name!r}")
            if not 1 <= number <= 65535:
                sink.error((*path, "ports", name), f"invalid port {number} (allowed: 1-65535)")

    def port_for(self, port: ServicePort) -> int:
        """The endpoint port serving `port`: by name in `ports`, else targetPort, else number."""
        if port.name and port.name in self.ports:
            return self.ports[port.name]
        return port.target_port or port.number


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int = spec_field(required=True, ge=1, le=65535)
    protocol: str | None = None
    name: str | None = None
    # 0 too: istiod reads it as unset, but Istio's CRD rule (0 < self) refuses it
    target_port: int | None = spec_field(ge=1, le=65535)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.protocol and self.protocol.upper() not in PROTOCOLS:
            allowed = ", ".join(sorted(PROTOCOLS))
            sink.error((*path, "protocol"), f"unsupported protocol {self.protocol!r} ({allowed})")
        if not self.name:
            sink.error((*path, "name"), "is required (a DNS label such as http)")
        elif not is_dns_label(self.name):
            sink.error((*path, "name"), f"invalid port name {self.name!r}")

    @property
    def is_http(self) -> bool:
        return (self.protocol or "").upper() in HTTP_PROTOCOLS | {"HTTPS", "TLS"}


Resolution = Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"]


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] | None = None
    resolution: Resolution | None = None
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: WorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.hosts:
            sink.error((*path, "hosts"), "a service entry needs at least one host")
        for index, host in enumerate(self.hosts):
            check_host(host, (*path, "hosts", index), sink, allow_star=False)
            if "*" in host and host != "*" and not host.startswith("*."):
                # Istio's ValidatePartialWildCard, a warning on ServiceEntry hosts
                sink.warning((*path, "hosts", index), f"partial wildcard {host!r} not allowed")
        for index, address in enumerate(self.addresses):
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                sink.error((*path, "addresses", index), f"{address!r} is not an IP or CIDR")
        names: set[str] = set()
        numbers: set[int] = set()
        for index, port in enumerate(self.ports):
            if port.target_port and (self.resolution or "NONE") == "NONE":
                sink.warning(
                    (*path, "ports", index, "targetPort"),
                    "targetPort has no effect when resolution is NONE (requests keep their port)",
                )
            if port.name in names:
                sink.error(
                    (*path, "ports", index, "name"), f"port name {port.name!r} already defined"
                )
            if port.number in numbers:
                sink.error((*path, "ports", index, "number"), f"port {port.number} already defined")
            if port.name:
                names.add(port.name)
            numbers.add(port.number)
        if self.endpoints and self.workload_selector is not None:
            sink.error(path, "only one of workloadSelector and endpoints may be set")
        resolution = self.resolution or "NONE"
        if self.workload_selector is not None:
            self._check_workload_selector(resolution, (*path, "workloadSelector"), sink)
        if resolution not in ("NONE", "STATIC"):
            for index, address in enumerate(self.addresses):
                if "/" in address:
                    sink.error(
                        (*path, "addresses", index),
                        "CIDR addresses are allowed only for resolution NONE or STATIC",
                    )
            if len(self.hosts) > 1 and any(not p.is_http for p in self.ports):
                sink.error(path, "multiple hosts provided with non-HTTP, non-TLS ports")
        if resolution == "NONE" and self.endpoints:
            unset = " (the default: resolution is not set)" if self.resolution is None else ""
            sink.error(
                (*path, "endpoints"),
                f"no endpoints may be given for resolution NONE{unset}; for these endpoints"
                " set resolution STATIC (IP addresses) or DNS (host names)",
            )
        for index, endpoint in enumerate(self.endpoints):
            where = (*path, "endpoints", index)
            address = endpoint.address or ""
            if resolution == "STATIC" and not (is_ip(address) or address.startswith("unix://")):
                sink.error(
                    (*where, "address"), f"{address!r} is not an IP address (resolution STATIC)"
                )
            if resolution == "STATIC" and address.startswith("unix://") and len(self.ports) != 1:
                sink.error((*where, "address"), "a unix endpoint needs exactly 1 service port")
            for name in endpoint.ports:
                if name not in names:
                    sink.error((*where, "ports", name), "port is not defined by the service entry")
        if resolution in ("DNS", "DNS_ROUND_ROBIN") and not self.endpoints:
            for index, host in enumerate(self.hosts):
                if "*" in host:
                    sink.error(
                        (*path, "hosts", index),
                        "hosts must be FQDNs when no endpoints are given"
                        f" for resolution {resolution}",
                    )
        if resolution == "DNS_ROUND_ROBIN" and len(self.endpoints) > 1:
            sink.error((*path, "endpoints"), "DNS_ROUND_ROBIN takes at most one endpoint")

    def _check_workload_selector(self, resolution: str, path: Path, sink: Sink) -> None:
        """Istio's checks of a ServiceEntry's workloadSelector (ValidateAlphaWorkloadSelector
        and the per-resolution warnings)."""
        assert self.workload_selector is not None
        check_selector_labels(self.workload_selector.labels, path, "labels", sink)
        if resolution == "NONE":
            sink.warning(
                path,
                "workloadSelector should not be set when resolution is NONE: requests go to the"
                " host they name (Envoy's original destination), not to WorkloadEntries",
            )
        elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
            sink.warning(
                path, f"workloadSelector should not be set when resolution is {resolution}"
            )

    def validate_in_namespace(self, namespace: str, path: Path, sink: Sink) -> None:
        """Checks that need the resource's namespace (`.` in exportTo names it)."""
        # `~` (visible to no one) is Istio's on ServiceEntry only
        check_export_to(self.export_to, namespace, (*path, "exportTo"), sink, allow_none=True)
