"""Answers a sidecar gives without the upstream, and Envoy's response flags.

When Envoy answers a request itself — no route, overflow, no healthy host, timeout, a fault
abort — it sends a fixed status and body and records a response flag (`%RESPONSE_FLAGS%`,
metric label `response_flags`). meshlib does the same, so an app and its dashboards see what
they would see behind a sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

FLAGS_HEADER = "x-meshlib-response-flags"  # where the app can read the flags of an answer
NO_FLAGS = "-"


class Flag:
    """Envoy's short response flags (ISTIO.md §3.6) that meshlib sets (constants of the
    class: `Final`, which the compiled build needs to keep them so)."""

    NO_HEALTHY_UPSTREAM: Final = "UH"
    UPSTREAM_CONNECTION_FAILURE: Final = "UF"
    UPSTREAM_OVERFLOW: Final = "UO"
    NO_ROUTE: Final = "NR"
    RETRY_LIMIT_EXCEEDED: Final = "URX"
    NO_CLUSTER: Final = "NC"
    UPSTREAM_TIMEOUT: Final = "UT"
    UPSTREAM_REMOTE_RESET: Final = "UR"
    UPSTREAM_CONNECTION_TERMINATION: Final = "UC"
    DOWNSTREAM_TERMINATION: Final = "DC"  # the caller gave up (its own timeout, a cancellation)
    DELAY_INJECTED: Final = "DI"
    FAULT_INJECTED: Final = "FI"
    DNS_FAILURE: Final = "DF"


# The order Envoy prints flags in (its ResponseFlag enum order), e.g. "UF,URX".
ENVOY_ORDER = [
    "LH",
    "UH",
    "UT",
    "LR",
    "UR",
    "UF",
    "UC",
    "UO",
    "NR",
    "DI",
    "FI",
    "RL",
    "UAEX",
    "RLSE",
    "DC",
    "URX",
    "SI",
    "IH",
    "DPE",
    "UMSDR",
    "RFCF",
    "NFCF",
    "DT",
    "UPE",
    "NC",
    "OM",
    "DF",
    "DO",
]
_RANK = {flag: rank for rank, flag in enumerate(ENVOY_ORDER)}


def ordered(flags: list[str]) -> list[str]:
    """Flags without repeats, in Envoy's order."""
    return sorted(dict.fromkeys(flags), key=lambda f: _RANK.get(f, len(_RANK)))


def join_flags(flags: list[str] | tuple[str, ...]) -> str:
    """Several flags joined as Envoy prints them; `-` for none."""
    return ",".join(ordered(list(flags))) if flags else NO_FLAGS


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A response meshlib writes itself, as Envoy would."""

    status: int
    body: bytes
    flag: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    content_type: str = "text/plain"


_RESET_PREFIX = b"upstream connect error or disconnect/reset before headers. "
_OVERFLOW_BODY = (
    b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
)
_TERMINATION_BODY = (
    b"upstream connect error or disconnect/reset before headers."
    b" reset reason: connection termination"
)


def no_route() -> LocalReply:
    return LocalReply(404, b"", Flag.NO_ROUTE)


def no_cluster() -> LocalReply:
    return LocalReply(503, b"", Flag.NO_CLUSTER)


def no_healthy_upstream() -> LocalReply:
    return LocalReply(503, b"no healthy upstream", Flag.NO_HEALTHY_UPSTREAM)


def overflow() -> LocalReply:
    return LocalReply(
        503,
        _OVERFLOW_BODY,
        Flag.UPSTREAM_OVERFLOW,
        MappingProxyType({"x-envoy-overloaded": "true"}),
    )


def after_retry(reply: LocalReply) -> LocalReply:
    """`reply` as Envoy words it once a retry has happened: a reset's body (UF, UC, UR, UO)
    reads "... retried and the latest reset reason: ..." (router.cc onUpstreamReset,
    is_retry_); other answers are unchanged."""
    body = reply.body
    if not body.startswith(_RESET_PREFIX):
        return reply
    cut = len(_RESET_PREFIX)
    body = body[:cut] + b"retried and the latest " + body[cut:]
    return LocalReply(reply.status, body, reply.flag, reply.headers)


def connect_failure(reason: str = "remote connection failure") -> LocalReply:
    body = f"upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    return LocalReply(503, body.encode(), Flag.UPSTREAM_CONNECTION_FAILURE)


def upstream_reset(reason: str = "remote reset") -> LocalReply:
    """The upstream reset the HTTP/2 stream (RST_STREAM) before the response headers."""
    body = f"upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    return LocalReply(503, body.encode(), Flag.UPSTREAM_REMOTE_RESET)


def connection_termination() -> LocalReply:
    """The connection closed (FIN or RST) before the response headers: Envoy's `503 UC`."""
    return LocalReply(503, _TERMINATION_BODY, Flag.UPSTREAM_CONNECTION_TERMINATION)


def timeout() -> LocalReply:
    return LocalReply(504, b"upstream request timeout", Flag.UPSTREAM_TIMEOUT)


def fault_abort(status: int) -> LocalReply:
    return LocalReply(status, b"fault filter abort", Flag.FAULT_INJECTED)


def grpc_fault_abort(code: int, grpc_request: bool) -> LocalReply:
    """A `grpcStatus` abort: Envoy's local reply is HTTP 200 either way, gRPC-shaped (empty
    body, `grpc-status`, `grpc-message`) only when the request is gRPC."""
    if not grpc_request:
        return LocalReply(200, b"fault filter abort", Flag.FAULT_INJECTED)
    return LocalReply(
        200,
        b"",
        Flag.FAULT_INJECTED,
        MappingProxyType({"grpc-status": str(code), "grpc-message": "fault filter abort"}),
        "application/grpc",
    )


def redirect(location: str, status: int) -> LocalReply:
    return LocalReply(status, b"", None, MappingProxyType({"location": location}))


def direct(status: int, body: bytes) -> LocalReply:
    return LocalReply(status, body)
