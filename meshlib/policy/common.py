"""Value types shared by several Istio resources: durations, percentages, string matches."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshlib.policy._schema import INVALID, Path, Sink, describe, spec_field
from meshlib.policy.regex import RegexError, compile_re2

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
MILLISECOND = 0.001


@dataclass(frozen=True, slots=True)
class Duration:
    """A duration written the Go/protobuf way: `1.5s`, `300ms`, `1m`, `1h30m`."""

    seconds: float
    text: str

    def __str__(self) -> str:
        return self.text

    @classmethod
    def of(cls, text: str) -> Duration:
        """Parse `text`; raise ValueError when it is not a duration."""
        if text == "0":
            return cls(0.0, text)
        total = 0.0
        pos = 0
        while pos < len(text):
            match = _DURATION_PART.match(text, pos)
            if match is None:
                raise ValueError(f"invalid duration {text!r} (expected e.g. 1.5s, 300ms, 1m)")
            total += float(match[1]) * _UNIT_SECONDS[match[2]]
            pos = match.end()
        if not text:
            raise ValueError("invalid duration '' (expected e.g. 1.5s, 300ms, 1m)")
        return cls(total, text)

    @classmethod
    def parse_policy(cls, value: Any, path: Path, sink: Sink) -> Any:
        if not isinstance(value, str):
            sink.error(path, f"must be a duration string such as 1.5s, not {describe(value)}")
            return INVALID
        try:
            return cls.of(value)
        except ValueError as exc:
            sink.error(path, str(exc))
            return INVALID


@dataclass(frozen=True, slots=True)
class Percent:
    """Istio's `Percent`: `{value: 0..100}`, fractions allowed."""

    value: float = spec_field(0.0, ge=0, le=100)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if 0 < self.value < 0.0001:
            sink.error((*path, "value"), "must be 0 or in the range 0.0001..100")

    @property
    def fraction(self) -> float:
        return self.value / 100.0


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One of `exact`, `prefix`, `regex` (full match, RE2 syntax); `{}` means "present"."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) > 1:
            sink.error(
                path, f"only one of exact, prefix, regex may be set (got {', '.join(given)})"
            )
        if self.regex is not None and self.regex != "*":  # "*" means "present", as {}
            if self.regex == "":
                sink.error((*path, "regex"), "a regex match must not be empty")
            elif len(self.regex) > 1024:
                sink.error((*path, "regex"), "regex is too large (at most 1024 characters)")
            else:
                check_regex(self.regex, (*path, "regex"), sink)

    def describe(self) -> str:
        for kind in ("exact", "prefix", "regex"):
            value = getattr(self, kind)
            if value is not None:
                return f"{kind} {value!r}"
        return "present"

    def as_dict(self) -> dict[str, str]:
        return {k: v for k in ("exact", "prefix", "regex") if (v := getattr(self, k)) is not None}


def check_regex(pattern: str, path: Path, sink: Sink) -> bool:
    """Report a regex Istio would reject or meshlib cannot match as RE2 does."""
    try:
        compile_re2(pattern)
    except RegexError as exc:
        sink.error(path, str(exc))
        return False
    return True


@dataclass(frozen=True, slots=True)
class PortSelector:
    number: int = spec_field(required=True, ge=1, le=65535)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a label selector (`matchLabels`, a subset's `labels`, `sourceLabels`) selects
    `labels`."""
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """Selects workloads by labels; `matchLabels` is the security API's spelling."""

    labels: Mapping[str, str] = spec_field({})


@dataclass(frozen=True, slots=True)
class MatchLabelsSelector:
    """istio.type.v1beta1.WorkloadSelector, checked as Istio's validateWorkloadSelector."""

    match_labels: Mapping[str, str] = spec_field({})

    def validate_policy(self, path: Path, sink: Sink) -> None:
        check_selector_labels(self.match_labels, path, "matchLabels", sink)


def check_selector_labels(labels: Mapping[str, str], path: Path, key: str, sink: Sink) -> None:
    """Istio's validateWorkloadSelector, for both spellings of a selector's map (`key`):
    no empty key and no wildcard (errors); no labels selects every workload (a warning)."""
    for name, value in labels.items():
        where = (*path, key, name)
        if not name:
            sink.error(where, "an empty key is not supported in a selector")
        if "*" in name or "*" in value:
            sink.error(where, "a wildcard is not supported in a selector")
    if not labels:
        sink.warning(path, "a workload selector without labels selects every workload")


# What a policy's targetRef may name, as Istio's validatePolicyTargetReference allows it:
# (group, kind), the core group written "" or "core".
TARGET_KINDS = (
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
)


@dataclass(frozen=True, slots=True)
class PolicyTargetReference:
    group: str | None = None
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.name:
            sink.error((*path, "name"), "is required")
        if self.namespace:
            sink.error(
                (*path, "namespace"),
                "must not be set: a policy cannot target another namespace",
            )
        if ((self.group or "core"), self.kind) not in TARGET_KINDS:
            allowed = ", ".join(f"{g}/{k}" for g, k in TARGET_KINDS)
            given = f"{self.group or 'core'}/{self.kind or ''}"
            sink.error(path, f"cannot target {given} (allowed: {allowed})")


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
_WILDCARD_FIRST_LABEL = re.compile(r"\*|(\*|\*-)?[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")


# Kubernetes label syntax as Istio's labels.Instance.Validate checks it: a key is an optional
# DNS-name prefix (at most 253 characters) and "/", then a name; a value is empty or a name.
_LABEL_NAME = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_PREFIX_LABEL = r"[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?"
_LABEL_KEY = re.compile(
    rf"(?P<prefix>{_PREFIX_LABEL}(?:\.{_PREFIX_LABEL})*/)?(?P<name>{_LABEL_NAME})"
)
_LABEL_VALUE = re.compile(_LABEL_NAME)


def check_labels(labels: Mapping[str, str], path: Path, sink: Sink) -> None:
    """Report label keys and values that are not Kubernetes label syntax; `path` is the map.

    As Istio checks them, a value's length is not limited (Kubernetes limits it to 63).
    """
    for key, value in labels.items():
        match = _LABEL_KEY.fullmatch(key)
        if match is None or len(match["name"]) > 63 or len(match["prefix"] or "") - 1 > 253:
            sink.error(
                (*path, key),
                f"invalid label key {key!r} (an optional DNS-name prefix and '/', then a name of"
                " at most 63 letters, digits, '-', '_' or '.' that starts and ends with a"
                " letter or digit)",
            )
        if value and not _LABEL_VALUE.fullmatch(value):
            sink.error(
                (*path, key),
                f"invalid label value {value!r} (letters, digits, '-', '_' or '.', starting"
                " and ending with a letter or digit, or empty)",
            )


def is_dns_label(value: str) -> bool:
    return _DNS_LABEL.fullmatch(value) is not None


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def is_dns_name(name: str, *, wildcard: bool = False) -> bool:
    """Whether `name` is a DNS name as Istio's ValidateFQDN checks it: at most 255 characters,
    DNS labels, an optional trailing dot, a top-level label not all digits. With `wildcard`, as
    its ValidateWildcardDomain: the first label may be `*` or start with `*`, and a lone label
    is not a top-level one."""
    first, *rest = name.removesuffix(".").split(".")
    top = rest[-1] if rest else "" if wildcard else first
    return (
        len(name) <= 255
        and (_WILDCARD_FIRST_LABEL if wildcard else _DNS_LABEL).fullmatch(first) is not None
        and all(_DNS_LABEL.fullmatch(label) for label in rest)
        and not (top.isascii() and top.isdigit())
    )


def check_host(
    host: str, path: Path, sink: Sink, *, allow_star: bool = True, allow_ip: bool = False
) -> bool:
    """Report a host that is not a DNS name, `*.suffix` wildcard, or (if allowed) `*`; return
    whether it is valid.

    An IP address is a host only where Istio takes one (`allow_ip`: VirtualService hosts);
    elsewhere its validateWildcardDomain refuses it (an all-numeric top-level label).
    """
    if host == "*":
        if not allow_star:
            sink.error(path, "the wildcard host '*' is not allowed here")
        return allow_star
    if is_ip(host):
        if not allow_ip:
            sink.error(path, f"invalid host {host!r}: an IP address is not allowed here")
        return allow_ip
    if not is_dns_name(host, wildcard=True):
        sink.error(path, f"invalid host {host!r} (a DNS name, optionally with a '*.' prefix)")
        return False
    return True


# A namespace name, as Kubernetes requires it: a lowercase DNS-1123 label.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def check_export_to(
    export_to: tuple[str, ...],
    namespace: str,
    path: Path,
    sink: Sink,
    *,
    allow_none: bool = False,
    workload_selector: bool = False,
) -> None:
    """Report an `exportTo` Istio's validateExportTo rejects; `path` is the exportTo list.

    Entries are namespace names, `.` (`namespace`, the resource's own) or `*`; `~` (nobody)
    only where `allow_none` (a ServiceEntry). `*` and `~` stand alone. A DestinationRule with a
    `workload_selector` stays in its own namespace.
    """
    seen: dict[str, str] = {}  # namespace -> the entry that named it
    for index, entry in enumerate(export_to):
        key = namespace if entry == "." else entry  # `.` and the namespace's name are one entry
        where = (*path, index)
        if key in seen:
            if seen[key] != entry:
                sink.error(where, f"duplicate entry: '.' and {key!r} both name this namespace")
            else:
                sink.error(where, f"duplicate entry {entry!r}")
        elif entry == "~" and not allow_none:
            sink.error(where, "'~' (export to none) is allowed only on a ServiceEntry")
        elif entry not in (".", "*", "~") and not _NAMESPACE.fullmatch(entry):
            none = ", '~'" if allow_none else ""
            sink.error(
                where,
                f"invalid entry {entry!r} (a namespace name in lowercase, '.', '*'{none})",
            )
        else:
            if workload_selector and key != namespace and not seen.keys() - {namespace}:
                sink.error(  # once, at the first entry beyond, as Istio reports it
                    where,
                    "a DestinationRule with a workloadSelector cannot be exported"
                    " beyond its own namespace",
                )
            seen[key] = entry
    for alone, meaning in (("*", "every namespace"), ("~", "no namespace")):
        if alone in seen and len(export_to) > 1:
            sink.error(
                (*path, export_to.index(alone)),
                f"{alone!r} ({meaning}) cannot be listed with other entries",
            )


def check_port(number: int, path: Path, sink: Sink) -> None:
    if not 1 <= number <= 65535:
        sink.error(path, f"invalid port {number} (allowed: 1-65535)")
