"""What the sync and async meshed httpx transports share, with no I/O in it.

`MeshTransport` and `AsyncMeshTransport` (`_httpx_transport`) mirror each other by design, as
httpx's own transports and clients do; everything they do alike without sending anything is
here, as httpx keeps its `BaseClient`: the request each try sends (`_upstream`), a try's result
read from its response (`_result`), the answers meshlib gives itself (`_local`) and the edits
it makes to upstream's (`_finish`), the final response (`_respond`), and each mirrored copy's
request (`_mirror_request`, `_start_copy`).

Split out of `meshlib.clients.httpx`, and, like it, not compiled (see pyproject.toml).
"""

from __future__ import annotations

import httpx

from meshlib.clients._common import (
    MIRROR_TIMEOUT,
    RESPONSE_FLAGS,
    UPSTREAM_HOST,
    MirrorCopy,
    choose_hash_key,
    edited_headers,
    reply_headers,
    start_mirror,
)
from meshlib.clients._httpx_call import (
    _OURS,
    _OURS_CLOSING,
    _TRY_DEADLINE,
    _TRY_TIMEOUT,
    Added,
    Handled,
    _response_headers,
    _smaller,
    _upstream_url,
    request_attributes,
)
from meshlib.clients._httpx_headers import appended, encoded, extended
from meshlib.dataplane.exchange import Attempt, Exchange
from meshlib.dataplane.outcome import LocalReply, ordered
from meshlib.dataplane.retry import AttemptResult
from meshlib.dataplane.routing import RoutePlan
from meshlib.mesh import Mesh, default_mesh
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.routes import Mirror

# A mirrored copy's timeouts when the caller's request carries none (`_mirror_request`)
_MIRROR_TIMEOUTS = dict.fromkeys(("connect", "read", "write", "pool"), MIRROR_TIMEOUT)


class _Closes:
    """How many closes of the transport under a MeshTransport have begun (see `closing`):
    shared with the transport that replaces it over the same inner one (`adopt_mirrors`), so
    that a call in flight on the earlier one fails as the app's doing too."""

    __slots__ = ("begun",)

    def __init__(self) -> None:
        self.begun = 0


class _MeshTransportBase:
    """Everything MeshTransport and AsyncMeshTransport share: no I/O here."""

    _mesh: Mesh | None
    _closes: _Closes  # a call that saw one begin fail under it is the app's doing

    @property
    def mesh(self) -> Mesh:
        return self._mesh if self._mesh is not None else default_mesh()

    def closing(self) -> None:
        """The transport under this one is being closed, by the app: a call in flight that
        fails now is never retried nor held against its endpoint. (`close()` says so; for a
        stock transport under `instrument()`, the wrapper of its own `close`.)"""
        self._closes.begun += 1

    def _upstream(
        self,
        mesh: Mesh,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        plan: RoutePlan,
        attempt: Attempt,
    ) -> httpx.Request:
        """The request as sent to `attempt.endpoint`: route header edits, the call's
        `x-request-id`, trace context and the caller's propagated headers, the Host the route
        says, per-try timeouts. `view` is the request's headers by lowercase name."""
        path = None if plan.original_path is None else plan.path
        edits = plan.request_headers
        original = request.headers
        # Only headers the app did not set; the budget is this try's, as Envoy's router says.
        propagated = mesh.propagator.outbound(view.__contains__, attempt.timeout)
        ours = [
            ("host", plan.authority),
            ("x-envoy-attempt-count", str(attempt.number)),
            *mesh.identity_headers,
        ]
        if attempt.close_connection:
            ours.append(("connection", "close"))
        if edits:  # added and propagated headers count as the app's: the route's edits apply
            pairs = [*original.multi_items(), *added, *propagated]
            headers = encoded(edited_headers(pairs, edits, dict(ours)), original.encoding)
        else:  # the caller's headers as httpx holds them, ours appended: nothing re-encoded
            drop = _OURS_CLOSING if attempt.close_connection else _OURS
            headers = extended(original, drop, [*added, *propagated, *ours])
        caller = request.extensions.get("timeout") or {}
        connect, read, _ = attempt.timeouts(caller.get("connect"), caller.get("read"))
        timeout = {
            "connect": connect,
            "read": read,
            "write": _smaller(caller.get("write"), attempt.timeout),
            # waiting for the pool comes before the try's time (Envoy's onPoolReady)
            "pool": _smaller(caller.get("pool"), attempt.route_left()),
        }
        extensions = {**request.extensions, "timeout": timeout}
        if attempt.timeout is not None:  # the try's headers are due by then (_http1 reads it)
            extensions[_TRY_DEADLINE] = attempt.deadline
            extensions[_TRY_TIMEOUT] = attempt.timeout
        return httpx.Request(
            request.method,
            _upstream_url(request.url, plan.scheme, attempt.endpoint, path),
            headers=headers,
            stream=request.stream,
            extensions=extensions,
        )

    @staticmethod
    def _result(response: httpx.Response) -> AttemptResult:
        headers = _response_headers(response.headers)
        return AttemptResult(
            status=response.status_code,
            grpc_status=headers.get("grpc-status"),
            response=response,
            rate_limited="x-envoy-ratelimited" in headers,
            headers=headers,
        )

    @staticmethod
    def _local(
        reply: LocalReply, request: httpx.Request, flags: list[str], plan: RoutePlan | None
    ) -> httpx.Response:
        if reply.flag is not None:
            flags = ordered([*flags, reply.flag])
        response = httpx.Response(
            reply.status,
            headers=reply_headers(reply, flags, plan),
            # A stream, not `content=` (which httpx reads at once): a caller streaming the
            # answer can read it raw, as a server's. HEAD: headers only.
            stream=httpx.ByteStream(b"" if request.method == "HEAD" else reply.body),
            request=request,
            extensions={RESPONSE_FLAGS: flags},
        )
        return response

    @staticmethod
    def _finish(
        response: httpx.Response, plan: RoutePlan, exchange: Exchange, flags: list[str]
    ) -> httpx.Response:
        if plan.response_headers:
            original = response.headers
            edited = edited_headers(original.multi_items(), plan.response_headers, {})
            response.headers = encoded(edited, original.encoding)
        if exchange.set_cookie is not None:  # the client's cookie jar keeps it
            appended(response.headers, "set-cookie", exchange.set_cookie)
        response.extensions = {
            **response.extensions,
            RESPONSE_FLAGS: flags,
            UPSTREAM_HOST: exchange.upstream_host,
        }
        return response

    def _mirror_request(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        plan: RoutePlan,
        copy: MirrorCopy,
    ) -> httpx.Request:
        """The copy a mirror gets: the request as the route sends it, with the call's
        `x-request-id`, the trace context and propagated headers, as a sidecar mirrors what
        the app sent (its own headers copied); this workload's identity, as on every call."""
        mesh = self.mesh
        endpoint = copy.endpoint  # host and port apart, as in `_upstream_url`
        url = request.url.copy_with(host=endpoint.address, port=endpoint.port, path=plan.path)
        extra = {"host": plan.authority, **dict(mesh.identity_headers)}
        if copy.attempt.close_connection:
            extra["connection"] = "close"  # the mirror's maxRequestsPerConnection reached
        original = request.headers
        pairs = [*original.multi_items(), *added, *mesh.propagator.outbound(view.__contains__)]
        edited = edited_headers(pairs, plan.request_headers, extra)
        headers = encoded(edited, original.encoding)
        # the caller's timeouts (httpx's 5 s by default), 10 s where it set none: a copy never
        # waits for good (`_httpx_pools._bound_copy` bounds them by the route's timeout as it
        # is sent)
        timeout = {
            phase: MIRROR_TIMEOUT if seconds is None else seconds
            for phase, seconds in (request.extensions.get("timeout") or _MIRROR_TIMEOUTS).items()
        }
        return httpx.Request(
            request.method,
            url,
            headers=headers,
            stream=request.stream,
            extensions={"timeout": timeout},
        )

    def _start_copy(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        plan: RoutePlan,
        mirror: Mirror,
        *,
        may_wait: bool,
    ) -> tuple[httpx.Request, MirrorCopy] | None:
        """A mirrored copy started on its mirror cluster (see `start_mirror`), and the
        request it sends; None when the cluster drops it. `may_wait`: it may wait for a
        connection (bounded by the caller's pool timeout); else it is dropped."""
        pool = (request.extensions.get("timeout") or {}).get("pool") if may_wait else 0
        copy = start_mirror(self.mesh, plan, mirror, pool)
        if copy is None:
            return None
        return self._mirror_request(request, view, added, plan, copy), copy

    @staticmethod
    def _exchange(
        mesh: Mesh,
        plan: RoutePlan,
        attributes: RequestAttributes,
        request: httpx.Request,
        replayable: bool,
    ) -> Exchange:
        exchange = mesh.exchange(plan, replayable=replayable)
        choose_hash_key(exchange, mesh, attributes)
        # Waiting for a connection (maxConnections) is bounded by httpx's pool timeout. Set
        # on every request: a policy update may add maxConnections before a retry.
        exchange.pool_timeout = (request.extensions.get("timeout") or {}).get("pool")
        exchange.pool_timeout_error = httpx.PoolTimeout
        exchange.caller_request = request
        return exchange

    def _respond(
        self,
        request: httpx.Request,
        plan: RoutePlan,
        exchange: Exchange,
        result: AttemptResult,
        flags: list[str],
    ) -> Handled:
        """The response for the final attempt: upstream's, or the answer Envoy would give."""
        if (result.client_timeout or result.broke_off) and result.error is not None:
            raise result.error  # the caller's own timeout, a body broken off: as without the mesh
        if exchange.flags or result.reply is not None or result.failure is not None:
            flags = ordered(flags + exchange.response_flags(result))
        reply = exchange.final_reply(result)
        if reply is not None:
            return self._local(reply, request, flags, plan), None, None
        response = self._finish(result.response, plan, exchange, flags)
        headers = None if plan.response_headers else result.headers
        return response, headers, exchange.service_time(result)

    def _prepare(
        self, request: httpx.Request, items: list[tuple[str, str]]
    ) -> tuple[Mesh, RoutePlan, RequestAttributes]:
        mesh = self.mesh
        attributes = request_attributes(request, items)
        return mesh, mesh.plan(attributes), attributes
