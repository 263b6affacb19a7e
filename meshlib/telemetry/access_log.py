"""Access logs: one line per request through Python logging, in Istio's default format.

    access_log = AccessLog()                         # logger "meshlib.access", TEXT encoding
    access_log.apply(snapshot, config)               # on every Snapshot swap
    if access_log.enabled("inbound"):                # O(1): build the entry only when it is on
        access_log.log(AccessLogEntry(...))          # one INFO record, never raises

A line looks like Istio's default TEXT format (ISTIO.md §3.7, pilot `telemetry_logging.go`):

    [2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" 418 - via_upstream - "-" 0 135 4 4
      "-" "curl/7.73.0-DEV" "84961386-6d84-929d-98bd-c5aee93b5c88" "httpbin:8000"
      "10.44.1.27:80" outbound|8000||httpbin.foo.svc.cluster.local - - 10.44.1.23:46520 - default

(one line, wrapped here). Fields in order: start time (ISO 8601, UTC, milliseconds), `"METHOD
original-path PROTOCOL"`, response code, response flags, response code details, connection
termination details, `"upstream transport failure reason"`, bytes received, bytes sent,
duration ms, `x-envoy-upstream-service-time`, `"x-forwarded-for"`, `"user-agent"`,
`"x-request-id"`, `"authority"`, `"upstream host"`, upstream cluster, upstream local address,
downstream local address, downstream remote address, requested server name, route name. A
missing value prints `-`. meshlib has no socket-level view of connection termination, transport
failure reasons, local addresses or SNI, so those five are always `-`. Durations are whole
milliseconds, truncated, as Envoy prints them. Control characters in values are escaped
(`\\xNN`) so a request is always exactly one line.

`x-envoy-upstream-service-time` is what Envoy's router on the logging side puts in that
response header: the milliseconds from having the request to the upstream's response headers
(of its final try: earlier tries and back-offs included). meshlib measures the same interval
itself, only for a line it will write — outbound from the routed call (after a fault's delay)
to the final try's headers (`Exchange.service_time`; a passthrough call's is its duration),
inbound from the request's arrival to the app's headers going to the server (or the server's
500 for an app that failed) — and logs `-` where there was no upstream response: meshlib's own
answers (FI, NR, UO, UH, UF, UT, ...) and a caller gone before any. It adds no such header to
responses (docs/observability.md, "Access logs").

JSON encoding: one compact object with Istio's default JSON keys (`start_time`, `method`,
`path`, `protocol`, `response_code`, `response_flags`, `response_code_details`,
`connection_termination_details`, `upstream_transport_failure_reason`, `bytes_received`,
`bytes_sent`, `duration`, `upstream_service_time`, `x_forwarded_for`, `user_agent`,
`request_id`, `authority`, `upstream_host`, `upstream_cluster`, `upstream_local_address`,
`downstream_local_address`, `downstream_remote_address`, `requested_server_name`,
`route_name`); codes, byte counts and the duration are numbers, `upstream_service_time` is a
string (it is a header value in Envoy), a missing value is `null`. Either way the record also
carries the same fields plus `direction` as `record.meshlib_access` (a dict, via `extra=`), for
structured logging handlers.

When it is on (rules; Istio's `mergeLogs` in pilot `model/telemetry.go`, ISTIO.md §6):

- **Off by default.** Only a Telemetry `accessLogging` entry that applies to this workload
  turns it on (or `MESHLIB_ACCESS_LOG`, below).
- **Levels.** Entries are taken mesh (root namespace) -> namespace -> workload (selector), the
  same resources and precedence as tracing (`meshlib.telemetry._resolve`), and within a
  Telemetry in list order; each entry, in order, switches its providers on, or off with
  `disabled: true`. So the root namespace can enable, a namespace `disabled: true` turn it off,
  and a workload-selector Telemetry (`disabled: false`, or any entry) turn it back on.
- **Providers.** meshlib has one sink — the `meshlib.access` logger — which stands in for every
  provider: `envoy`, `otel`, a custom file provider alike; where lines go is the logging
  configuration's business. An entry without `providers` uses its predecessor's (the first
  one's default is `envoy`, as if MeshConfig `defaultProviders.accessLogging: [envoy]`; Istio's
  default MeshConfig has none, so there that first entry logs nothing, and `meshlib check`
  warns about it). As in
  Istio, only the providers named by the lowest level that names any stay in scope (a
  namespace switching to `providers: [otel]` replaces the mesh's `envoy`). It logs when at
  least one provider is on, once per request, whatever the number of providers.
- **match.mode.** `CLIENT` entries apply to outbound requests (meshed clients), `SERVER` to
  inbound (the middleware), `CLIENT_AND_SERVER` or no `match` to both.
- **filter.expression.** A provider's filter is the one of the last entry (that applies to the
  direction) naming the provider; an entry without `providers` that has a filter sets it for
  the providers it inherits (Istio records filters only for named providers; meshlib does not
  drop such a filter). With several providers on, a request is logged if any one's filter
  passes. meshlib evaluates a small, safe subset of CEL, no `eval`: comparisons
  `response.code <op> <int>` (`==`, `!=`, `<`, `<=`, `>`, `>=`, either side),
  `response.flags == / != "<flags>"` (meshlib's flag text: `"-"` or e.g. `"UF,URX"`) and
  `response.flags == / != 0` (Envoy's bit vector: 0 means no flag), combined with `&&`, `||`,
  `!` and parentheses, read by CEL's grammar (`meshlib.policy.cel`; `!` binds tighter than a
  comparison). An expression that is not CEL at all never gets here: validation rejects it,
  as Istio's does. Any other valid CEL (other attributes, functions) is unsupported: meshlib
  logs one warning per expression on `meshlib.telemetry` and treats the filter as always true
  — logging too much rather than hiding failures (`meshlib check` warns too).
- **MESHLIB_ACCESS_LOG** (read when the AccessLog is made): `on` logs every request both
  ways, `json` the same in JSON encoding, `off` never logs; Telemetry is then ignored. Unset
  or empty: Telemetry decides. Any other value raises `ConfigError`.
- **Logging.** One record per request at INFO on `meshlib.access` (`propagate` as configured).
  When access logging comes on and that logger's level is NOTSET, meshlib sets it to INFO so
  the usual root level WARNING does not swallow what the operator switched on; set the level
  yourself to override. Lines go where the app's logging sends them; while it sends them
  nowhere (no handler on the logger or the loggers it propagates to, as under uvicorn,
  gunicorn and hypercorn unless the app configures logging), to stdout, as Envoy writes its
  access log (`meshlib.telemetry.last_resort`).
- **Never raises.** Any exception while formatting or emitting (a broken handler, filter or
  formatter) is swallowed and counted in `failures`: a log line must not fail a request.
- **Cost.** `enabled(direction)` is one comparison and one attribute read; `log()` for a
  disabled direction returns after the same, under 1 µs (see tests). Callers should check
  `enabled` before building an `AccessLogEntry`.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from meshlib.config import MeshConfig
from meshlib.errors import ConfigError
from meshlib.policy.cel import (
    AllOf,
    AnyOf,
    Comparison,
    Condition,
    Not,
    UnsupportedExpression,
    parse_filter,
)
from meshlib.policy.snapshot import Snapshot
from meshlib.policy.telemetry import (
    DEFAULT_ACCESS_LOG_PROVIDERS,
    AccessLogging,
    WorkloadModeSelector,
)
from meshlib.telemetry import last_resort
from meshlib.telemetry._resolve import telemetry_levels

__all__ = [
    "DEFAULT_PROVIDERS",
    "ENV_ACCESS_LOG",
    "LOGGER_NAME",
    "AccessLog",
    "AccessLogEntry",
    "UnsupportedExpression",
    "compile_filter",
    "effective_access_logging",
    "protocol_of",
]

Direction = Literal["inbound", "outbound"]
Encoding = Literal["TEXT", "JSON"]
Mode = Literal["CLIENT", "SERVER"]
Predicate = Callable[["AccessLogEntry"], bool]

LOGGER_NAME = "meshlib.access"
ENV_ACCESS_LOG = "MESHLIB_ACCESS_LOG"
DEFAULT_PROVIDERS: tuple[str, ...] = DEFAULT_ACCESS_LOG_PROVIDERS

_log = logging.getLogger("meshlib.telemetry")
_INFO = logging.INFO

# The HTTP versions servers and clients report (ASGI's `http_version`, WSGI's
# `SERVER_PROTOCOL`, httpx's response's), as Envoy's access log spells them (%PROTOCOL%);
# anything else is logged as HTTP/1.1.
_PROTOCOLS = {
    "1.0": "HTTP/1.0",
    "1.1": "HTTP/1.1",
    "2": "HTTP/2",
    "2.0": "HTTP/2",
    "3": "HTTP/3",
    "3.0": "HTTP/3",
}


def protocol_of(version: object) -> str:
    """Envoy's name for an HTTP `version` as a server or client gives it ("1.1", "HTTP/2.0",
    b"HTTP/2", urllib3's 11, ...)."""
    if isinstance(version, bytes):
        version = version.decode("latin-1")
    elif isinstance(version, int) and not isinstance(version, bool):
        version = f"{version // 10}.{version % 10}"
    if not isinstance(version, str):
        return "HTTP/1.1"
    return _PROTOCOLS.get(version.upper().removeprefix("HTTP/"), "HTTP/1.1")


_ENV_VALUES = ("on", "off", "json")


@dataclass(slots=True)
class AccessLogEntry:
    """One request, filled by the middleware (inbound) and the meshed clients (outbound)."""

    start_time: float  # time.time() when the request started
    method: str
    path: str  # the original path, query included
    protocol: str  # "HTTP/1.1"
    response_code: int  # 0 when there was no response
    response_flags: str  # "-" or e.g. "UF,URX"
    bytes_received: int
    bytes_sent: int
    duration_ms: float
    upstream_service_time_ms: float | None
    x_forwarded_for: str | None
    user_agent: str | None
    request_id: str | None
    authority: str | None
    upstream_host: str | None
    upstream_cluster: str | None
    route_name: str | None
    downstream_remote_address: str | None
    direction: Direction
    response_code_details: str | None = None


# -- which entries apply (Telemetry precedence, Istio's mergeLogs) ---------------------------


def effective_access_logging(
    snapshot: Snapshot, config: MeshConfig, mode: Mode
) -> dict[str, str | None]:
    """The access-log providers on for this workload in `mode`, each with its filter expression.

    `mode` is `CLIENT` (outbound) or `SERVER` (inbound). An empty dict means off; a value of
    None means the provider logs every request. See the module docstring for the rules.
    """
    levels = [level.access_logging for level in telemetry_levels(snapshot, config)]
    levels = [entries for entries in levels if entries]
    if not levels:
        return {}
    # Pass 1: which providers are in scope, and each provider's filter.
    in_scope: set[str] = set(DEFAULT_PROVIDERS)
    filters: dict[str, str | None] = {}
    parent: tuple[str, ...] = DEFAULT_PROVIDERS
    for entries in levels:
        named: set[str] = set()
        for entry in entries:
            explicit = _provider_names(entry)
            names = explicit or parent
            parent = names
            if not _matches(entry.match, mode):
                continue
            expression = _expression(entry)
            if explicit:
                named.update(explicit)
                for name in explicit:
                    filters[name] = expression
            elif expression is not None:
                for name in names:
                    filters[name] = expression
        if named:
            in_scope = named
    # Pass 2: each entry, in order, switches its providers on or off.
    providers: dict[str, str | None] = {}
    parent = DEFAULT_PROVIDERS
    for entries in levels:
        for entry in entries:
            names = _provider_names(entry) or parent
            parent = names
            if not _matches(entry.match, mode):
                continue
            for name in names:
                if name not in in_scope:
                    continue
                if entry.disabled:
                    providers.pop(name, None)
                else:
                    providers[name] = filters.get(name)
    return providers


def _provider_names(entry: AccessLogging) -> tuple[str, ...]:
    return tuple(p.name for p in entry.providers)


def _expression(entry: AccessLogging) -> str | None:
    expression = entry.filter.expression if entry.filter is not None else None
    return expression if expression and expression.strip() else None


def _matches(selector: WorkloadModeSelector | None, mode: Mode) -> bool:
    if selector is None or selector.mode is None or selector.mode == "CLIENT_AND_SERVER":
        return True
    return selector.mode == mode


# -- filter expressions: a tiny, safe CEL subset --------------------------------------------


def compile_filter(expression: str) -> Predicate:
    """Compile a Telemetry `filter.expression` into a predicate on an AccessLogEntry.

    Raises UnsupportedExpression for anything outside the subset in the module docstring
    (MalformedExpression, a kind of it, when the text is not CEL at all).
    """
    return _predicate(parse_filter(expression))


def _predicate(condition: Condition) -> Predicate:
    if isinstance(condition, AnyOf):
        return _any_of(tuple(_predicate(term) for term in condition.terms))
    if isinstance(condition, AllOf):
        return _all_of(tuple(_predicate(term) for term in condition.terms))
    if isinstance(condition, Not):
        return _negate(_predicate(condition.term))
    return _compare(condition)


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _compare(comparison: Comparison) -> Predicate:
    compare = _COMPARE[comparison.symbol]
    value = comparison.value
    if comparison.attribute == "response.code":
        return lambda entry: compare(entry.response_code, value)
    if isinstance(value, int):  # `response.flags == 0`: Envoy's flag bits, 0 is "no flag"
        return lambda entry: compare(_flag_text(entry.response_flags) != "-", False)
    wanted = _flag_text(value)
    return lambda entry: compare(_flag_text(entry.response_flags), wanted)


def _flag_text(flags: str | None) -> str:
    return flags or "-"


def _any_of(terms: tuple[Predicate, ...]) -> Predicate:
    # Flat (a || b || c is one any, not a chain): evaluating never recurses per term.
    return lambda entry: any(term(entry) for term in terms)


def _all_of(terms: tuple[Predicate, ...]) -> Predicate:
    return lambda entry: all(term(entry) for term in terms)


def _negate(inner: Predicate) -> Predicate:
    return lambda entry: not inner(entry)


def _always(entry: AccessLogEntry) -> bool:
    return True


# -- formatting -------------------------------------------------------------------------------

# C0, DEL and C1 (NEL, U+0085, ends a line for some log readers): latin-1 header bytes can
# carry any of them. And the Unicode line and paragraph separators, which a percent-decoded
# ASGI path can: every character `str.splitlines` splits at is escaped.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029)})


def _text(value: str | None) -> str:
    """A value for the TEXT line: `-` when missing, control characters escaped."""
    if not value:
        return "-"
    if not value.isprintable():
        value = value.translate(_ESCAPES)
    return value


def _timestamp(start: float) -> str:
    """Envoy's %START_TIME% default: ISO 8601, UTC, milliseconds (2020-11-25T21:26:18.409Z)."""
    millis = round(start * 1_000_000) // 1000
    seconds, millis = divmod(millis, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


def _fields(entry: AccessLogEntry) -> dict[str, Any]:
    """Istio's default JSON keys and values (None for missing) for one entry."""
    service_time = entry.upstream_service_time_ms
    return {
        "start_time": _timestamp(entry.start_time),
        "method": entry.method or None,
        "path": entry.path or None,
        "protocol": entry.protocol or None,
        "response_code": entry.response_code,
        "response_flags": entry.response_flags or "-",
        "response_code_details": entry.response_code_details or None,
        "connection_termination_details": None,
        "upstream_transport_failure_reason": None,
        "bytes_received": entry.bytes_received,
        "bytes_sent": entry.bytes_sent,
        "duration": int(entry.duration_ms),
        "upstream_service_time": None if service_time is None else str(int(service_time)),
        "x_forwarded_for": entry.x_forwarded_for or None,
        "user_agent": entry.user_agent or None,
        "request_id": entry.request_id or None,
        "authority": entry.authority or None,
        "upstream_host": entry.upstream_host or None,
        "upstream_cluster": entry.upstream_cluster or None,
        "upstream_local_address": None,
        "downstream_local_address": None,
        "downstream_remote_address": entry.downstream_remote_address or None,
        "requested_server_name": None,
        "route_name": entry.route_name or None,
    }


def _text_line(fields: dict[str, Any]) -> str:
    """Istio's default TEXT format from the JSON-shaped fields (see the module docstring)."""
    f = fields
    service_time = f["upstream_service_time"]
    return (
        f"[{f['start_time']}] "
        f'"{_text(f["method"])} {_text(f["path"])} {_text(f["protocol"])}" '
        f"{f['response_code']} {_text(f['response_flags'])} "
        f"{_text(f['response_code_details'])} - "
        f'"-" '
        f"{f['bytes_received']} {f['bytes_sent']} {f['duration']} "
        f"{service_time or '-'} "
        f'"{_text(f["x_forwarded_for"])}" "{_text(f["user_agent"])}" '
        f'"{_text(f["request_id"])}" "{_text(f["authority"])}" '
        f'"{_text(f["upstream_host"])}" {_text(f["upstream_cluster"])} - - '
        f"{_text(f['downstream_remote_address'])} - {_text(f['route_name'])}"
    )


# -- the logger -------------------------------------------------------------------------------


def _env_override() -> str | None:
    raw = os.environ.get(ENV_ACCESS_LOG, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in _ENV_VALUES:
        raise ConfigError(
            f"{ENV_ACCESS_LOG}={raw!r}: expected one of {', '.join(_ENV_VALUES)} (or unset)"
        )
    return value


class AccessLog:
    """Writes access log lines for this workload when Telemetry (or the environment) says so."""

    def __init__(
        self, logger: logging.Logger | None = None, *, encoding: Encoding = "TEXT"
    ) -> None:
        normalized = str(encoding).upper()
        if normalized not in ("TEXT", "JSON"):
            raise ConfigError(f"encoding={encoding!r}: expected TEXT or JSON")
        chosen: Encoding = "JSON" if normalized == "JSON" else "TEXT"
        self.logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self.forced = _env_override()
        self.encoding: Encoding = "JSON" if self.forced == "json" else chosen
        self.failures = 0  # log calls that failed inside logging (swallowed)
        self._inbound: Predicate | None = None  # None: off; _always: no filter
        self._outbound: Predicate | None = None
        self._warned: set[str] = set()
        if self.forced in ("on", "json"):
            self._set(_always, _always)

    def enabled(self, direction: Direction) -> bool:
        """Whether a request in this direction may be logged (its filter is not yet applied)."""
        if direction == "outbound":
            return self._outbound is not None
        return self._inbound is not None

    def apply(self, snapshot: Snapshot, config: MeshConfig) -> None:
        """Take the accessLogging a new Snapshot's Telemetry gives this workload.

        No effect while MESHLIB_ACCESS_LOG forces logging on or off.
        """
        if self.forced is not None:
            return
        inbound = self._rule(effective_access_logging(snapshot, config, "SERVER").values())
        outbound = self._rule(effective_access_logging(snapshot, config, "CLIENT").values())
        self._set(inbound, outbound)

    def log(self, entry: AccessLogEntry) -> None:
        """Write one line for `entry` if its direction is on and its filter passes; never raises."""
        rule = self._outbound if entry.direction == "outbound" else self._inbound
        if rule is None:
            return
        try:
            if rule is not _always and not rule(entry):
                return
            logger = self.logger
            if not logger.isEnabledFor(_INFO):
                return
            fields = _fields(entry)
            if self.encoding == "JSON":
                line = json.dumps(fields, separators=(",", ":"))
            else:
                line = _text_line(fields)
            fields["direction"] = entry.direction
            logger.info(line, extra={"meshlib_access": fields})
        except Exception:
            self.failures += 1

    def _set(self, inbound: Predicate | None, outbound: Predicate | None) -> None:
        if inbound is not None or outbound is not None:
            if self.logger.level == logging.NOTSET:
                self.logger.setLevel(_INFO)
            last_resort.install(self.logger)  # stdout, while the app's logging has no handler
        self._inbound = inbound
        self._outbound = outbound

    def _rule(self, expressions: Iterable[str | None]) -> Predicate | None:
        """One predicate for a direction: None when no provider is on, `_always` unfiltered."""
        predicates: list[Predicate] = []
        found = False
        for expression in expressions:
            found = True
            if expression is None:
                return _always
            try:
                predicates.append(compile_filter(expression))
            except UnsupportedExpression as error:
                if expression not in self._warned:
                    self._warned.add(expression)
                    _log.warning(
                        "Telemetry accessLogging filter not supported by meshlib, logging "
                        "every request instead: %s (supported: response.code <op> <int>, "
                        'response.flags ==/!= "<flags>" or 0, with &&, ||, !, parentheses)',
                        error,
                    )
                return _always
        if not found:
            return None
        if len(predicates) == 1:
            return predicates[0]
        chosen = tuple(predicates)
        return lambda entry: any(predicate(entry) for predicate in chosen)
