"""Compiled HTTP routes: a VirtualService route with defaults applied and hosts resolved.

What the data plane needs per request is here, ready to use: matchers, destinations with
relative weights, the effective retry policy (Istio's default when the route sets none), the
timeout in seconds, faults and mirrors with their fractions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshlib._text import ascii_int
from meshlib.policy.common import Duration
from meshlib.policy.matching import CATCH_ALL, RequestAttributes, RouteMatcher
from meshlib.policy.virtual_service import (
    RETRY_ON_GRPC,
    CorsPolicy,
    HeaderOperations,
    Headers,
    HTTPDirectResponse,
    HTTPFaultInjection,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
)

# Istio's retry policy for routes that set none (pilot retry.go).
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_ATTEMPTS = 2
DEFAULT_BACKOFF = 0.025


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The effective retry policy of a route."""

    attempts: int
    retry_on: frozenset[str]
    retriable_status_codes: frozenset[int]
    per_try_timeout: float | None = None
    retry_ignore_previous_hosts: bool = True
    backoff: float = DEFAULT_BACKOFF
    is_default: bool = False
    text: str = DEFAULT_RETRY_ON
    # Whether retries still avoid tried hosts when the destination uses consistent hashing.
    # Pilot (retry.ConvertPolicy) drops the previous-hosts predicate for a route with a single
    # destination whose DestinationRule hashes, unless retryIgnorePreviousHosts is set.
    ignore_previous_hosts_when_hashing: bool = True

    @classmethod
    def resolve(
        cls, retry: HTTPRetry | None, *, sole_destination: bool = False
    ) -> RetryPolicy | None:
        """Istio's rules: none set -> the default; attempts 0 -> no retries (None).
        `sole_destination`: the VirtualService route lists exactly one destination."""
        if retry is None:
            return cls._from_text(
                DEFAULT_ATTEMPTS,
                DEFAULT_RETRY_ON,
                is_default=True,
                when_hashing=not sole_destination,
            )
        if retry.attempts == 0:
            return None
        policy = cls._from_text(retry.attempts, retry.retry_on or DEFAULT_RETRY_ON)
        explicit = retry.retry_ignore_previous_hosts
        return RetryPolicy(
            attempts=policy.attempts,
            retry_on=policy.retry_on,
            retriable_status_codes=policy.retriable_status_codes,
            per_try_timeout=retry.per_try_timeout.seconds if retry.per_try_timeout else None,
            retry_ignore_previous_hosts=explicit is not False,
            backoff=retry.backoff.seconds if retry.backoff else DEFAULT_BACKOFF,
            text=policy.text,
            ignore_previous_hosts_when_hashing=(
                not sole_destination if explicit is None else explicit
            ),
        )

    @classmethod
    def _from_text(
        cls, attempts: int, text: str, *, is_default: bool = False, when_hashing: bool = True
    ) -> RetryPolicy:
        tokens = [t for t in text.split(",") if t]
        codes = frozenset(n for t in tokens if (n := ascii_int(t, 4)) is not None)
        conditions = {t for t in tokens if not (t.isascii() and t.isdigit())}
        if codes:  # pilot adds the condition that makes the listed codes count
            conditions.add("retriable-status-codes")
        return cls(
            attempts,
            frozenset(conditions),
            codes,
            is_default=is_default,
            text=text,
            ignore_previous_hosts_when_hashing=when_hashing,
        )

    @property
    def grpc_conditions(self) -> frozenset[str]:
        return self.retry_on & RETRY_ON_GRPC

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attempts": self.attempts, "retryOn": self.text}
        if self.per_try_timeout is not None:
            out["perTryTimeout"] = _seconds(self.per_try_timeout)
        if self.backoff != DEFAULT_BACKOFF:
            out["backoff"] = _seconds(self.backoff)
        if not self.retry_ignore_previous_hosts:
            out["retryIgnorePreviousHosts"] = False
        if self.is_default:
            out["default"] = True
        return out


@dataclass(frozen=True, slots=True)
class RouteDestination:
    """A weighted destination with its host resolved to an FQDN."""

    host: str
    subset: str | None
    port: int | None
    weight: int
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    host: str
    subset: str | None
    port: int | None
    fraction: float  # 0..1


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One http route of a VirtualService, ready for the data plane."""

    virtual_service: str  # "namespace/name"
    index: int  # position in the VirtualService's http list (of the root, for delegates)
    name: str | None
    matchers: tuple[RouteMatcher, ...]  # any one must match; empty = catch-all
    destinations: tuple[RouteDestination, ...]
    total_weight: int
    retries: RetryPolicy | None
    timeout: Duration | None
    fault: HTTPFaultInjection | None
    mirrors: tuple[Mirror, ...]
    headers: Headers | None
    rewrite: HTTPRewrite | None
    redirect: HTTPRedirect | None
    direct_response: HTTPDirectResponse | None
    cors_policy: CorsPolicy | None
    # rewrite.uriRegexRewrite compiled: the pattern and its `re.sub` template
    uri_regex_rewrite: tuple[re.Pattern[str], str] | None = None
    # Configured with several destinations: Envoy weighted clusters, even when weight-0 ones
    # were dropped from `destinations` (it decides the order of header edits)
    weighted: bool = False

    def match(self, request: RequestAttributes) -> RouteMatcher | None:
        """The match block `request` satisfies (CATCH_ALL without blocks), or None."""
        if not self.matchers:
            return CATCH_ALL
        for matcher in self.matchers:
            if matcher(request):
                return matcher
        return None

    def matches(self, request: RequestAttributes) -> bool:
        return self.match(request) is not None

    def to_dict(self) -> dict[str, Any]:
        """The policy part of `meshlib routes --output json` (a stable contract)."""
        return {
            "timeout": str(self.timeout) if self.timeout and self.timeout.seconds else None,
            "retries": self.retries.as_dict() if self.retries else None,
            "fault": _fault_dict(self.fault),
            "mirror": _mirror_dict(self.mirrors),
            "headers": _headers_dict(self.headers),
            "rewrite": _drop_none(
                {
                    "uri": self.rewrite.uri,
                    "authority": self.rewrite.authority,
                    "uriRegexRewrite": (
                        {
                            "match": self.rewrite.uri_regex_rewrite.match,
                            "rewrite": self.rewrite.uri_regex_rewrite.rewrite,
                        }
                        if self.rewrite.uri_regex_rewrite
                        else None
                    ),
                }
            )
            if self.rewrite
            else None,
            "redirect": _drop_none(
                {
                    "uri": self.redirect.uri,
                    "authority": self.redirect.authority,
                    "scheme": self.redirect.scheme,
                    "port": self.redirect.port,
                    "derivePort": self.redirect.derive_port,
                    "redirectCode": self.redirect.redirect_code or 301,
                }
            )
            if self.redirect
            else None,
            "directResponse": (
                {
                    "status": self.direct_response.status,
                    "body": self.direct_response.body.content().decode("utf-8", "replace")
                    if self.direct_response.body
                    else None,
                }
                if self.direct_response
                else None
            ),
        }


def _seconds(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _fault_dict(fault: HTTPFaultInjection | None) -> dict[str, Any] | None:
    if fault is None:
        return None
    out: dict[str, Any] = {}
    if fault.delay is not None and fault.delay.fixed_delay is not None:
        out["delay"] = {
            "fixedDelay": str(fault.delay.fixed_delay),
            "percentage": fault.delay.fraction * 100,
        }
    abort = fault.abort
    if abort is not None and (abort.http_status or abort.grpc_status) is not None:
        out["abort"] = _drop_none(
            {
                "httpStatus": abort.http_status,
                "grpcStatus": abort.grpc_status,
                "percentage": abort.fraction * 100,
            }
        )
    return out or None


def _mirror_dict(mirrors: tuple[Mirror, ...]) -> dict[str, Any] | None:
    if not mirrors:
        return None
    return {
        "destinations": [
            {"host": m.host, "subset": m.subset, "port": m.port, "percentage": m.fraction * 100}
            for m in mirrors
        ]
    }


def _ops_dict(ops: HeaderOperations | None) -> dict[str, Any] | None:
    if ops is None:
        return None
    return _drop_none(
        {
            "set": dict(ops.set) or None,
            "add": dict(ops.add) or None,
            "remove": list(ops.remove) or None,
        }
    )


def _headers_dict(headers: Headers | None) -> dict[str, Any] | None:
    if headers is None:
        return None
    return (
        _drop_none({"request": _ops_dict(headers.request), "response": _ops_dict(headers.response)})
        or None
    )
