"""Meshed requests: `MeshAdapter` carries out the mesh's plan; `Session` mounts it.

    session = meshlib.Session()            # a requests.Session, meshed
    session.get("http://reviews:9080/reviews/1")

Envoy response flags are on `response.response_flags`, and on local answers also in the
`x-meshlib-response-flags` header.

Beside this module: `_requests_reading` (bodies read whole within a try's deadline, drained or
the connection closed) and `_requests_failures` (exceptions classified for retries and response
flags, the caller's timeouts).
"""

from __future__ import annotations

import http
import io
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.cookies
from requests.adapters import HTTPAdapter
from requests.exceptions import ChunkedEncodingError
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3 import HTTPHeaderDict, HTTPResponse

from meshlib.clients._common import (
    MIRROR_TIMEOUT,
    BodyTooLate,
    MirrorCopy,
    MirrorTracker,
    body_broke_off,
    choose_hash_key,
    client_span,
    edited_headers,
    end_client_span,
    forget_identity,
    record_exception,
    record_source,
    reply_headers,
    request_id,
    start_mirror,
)
from meshlib.clients._guard import passthrough_inside
from meshlib.clients._requests_failures import (
    ConnectionWaitTimeout,
    _caller_timeouts,
    _classify,
    _exception_flag,
    _failure,
    _fault_delay,
)
from meshlib.clients._requests_reading import _close, _discard, _read_whole
from meshlib.dataplane.deadline import remaining as remaining_deadline
from meshlib.dataplane.deadline import within as within_deadline
from meshlib.dataplane.exchange import Attempt, Exchange
from meshlib.dataplane.outcome import Flag, LocalReply, ordered
from meshlib.dataplane.retry import PER_TRY_TIMEOUT, AttemptResult, run_attempts
from meshlib.dataplane.routing import HeaderEdits, RoutePlan
from meshlib.mesh import Mesh, default_mesh, given_mesh
from meshlib.policy.matching import LazyHeaders, RequestAttributes
from meshlib.policy.snapshot import Endpoint
from meshlib.telemetry import propagation


def request_attributes(
    request: requests.PreparedRequest, view: dict[str, str] | None = None
) -> RequestAttributes:
    """What routing sees: the request, plus the headers the served request propagates.
    `view` is the request's headers by lowercase name, when the caller built it already."""
    parts = urlsplit(request.url or "")
    if view is None:
        view = _text_headers(request)
    inbound = propagation.current.get()
    pairs = list(view.items())
    if inbound is not None and inbound.headers:
        pairs.extend((n, v) for n, v in inbound.headers if n not in view)
    return RequestAttributes(
        request.method or "GET",
        view.get("host") or parts.netloc.rpartition("@")[2],  # without user:password@
        parts.path or "/",
        scheme=parts.scheme,
        query=parts.query,
        headers=LazyHeaders(pairs),
        port=parts.port,
    )


def _own_copy(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """`request.copy()` with headers of its own, sharing the rest: meshlib changes only the
    headers, so the cookie jar `copy()` duplicates (a third of its cost) is shared."""
    own = requests.PreparedRequest()
    own.method, own.url, own.body, own.hooks = (
        request.method,
        request.url,
        request.body,
        request.hooks,
    )
    own.headers = request.headers.copy()
    own._cookies = request._cookies  # type: ignore[attr-defined]
    own._body_position = request._body_position  # type: ignore[attr-defined]
    return own


def _text_headers(request: requests.PreparedRequest) -> dict[str, str]:
    """The request's headers by lowercase name, as text: requests also takes bytes names and
    values (sent as they are), which routing and propagation read as Latin-1 text."""
    view = dict(request.headers.lower_items())
    for name, value in view.items():
        if not isinstance(name, str) or not isinstance(value, str):
            return {_text(k): _text(v) for k, v in view.items()}
    return view


def _text(value: object) -> str:
    """A header name or value as text: bytes as Latin-1, anything else (an int an auth
    handler set after `prepare`) as http.client would send it."""
    if isinstance(value, str):
        return value
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _replayable(request: requests.PreparedRequest) -> bool:
    return request.body is None or isinstance(request.body, (bytes, str))


class MeshAdapter(HTTPAdapter):
    """A requests transport adapter that applies the mesh's policy."""

    # What pickling keeps, as for requests' own adapters (a Session is picklable). An explicit
    # Mesh (threads, locks, a policy source) cannot be pickled; the default one is found again.
    __attrs__ = [*HTTPAdapter.__attrs__, "_mesh", "_inner", "_owns_inner"]
    _owns_inner = False  # also for one pickled before this attribute existed

    def __init__(
        self, *, mesh: Mesh | None = None, inner: HTTPAdapter | None = None, **kwargs: Any
    ) -> None:
        self._mesh = given_mesh(mesh, "meshlib.MeshAdapter")
        super().__init__(**kwargs)
        self._mirroring = MirrorTracker()
        self._inner = inner  # an adapter to send through instead of this one's own pool
        self._owns_inner = False  # closed with this one (an app's, `Session.mount` meshed)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]  # requests has it, untyped
        self._mirroring = MirrorTracker()

    def close(self) -> None:
        self.close_mirrors()
        super().close()
        if self._inner is not None and self._owns_inner:
            self._inner.close()  # an app's adapter that `Session.mount` meshed

    def close_mirrors(self) -> None:
        """Count a close, without waiting for the mirrored copies: Envoy never holds a
        caller for its shadow, and `requests.get()` closes a session on every call. Copies
        in flight and queued still go, each on a connection that is closed after it (see
        `_send_mirror`), so none is left open in a pool nobody closes. `close()` does it;
        `instrument()` does it when a stock adapter closes."""
        self._mirroring.closes += 1

    def adopt_mirrors(self, earlier: MeshAdapter) -> None:
        """Track the copies of the adapter this one replaces over the same inner one
        (`instrument()` with another Mesh) as this one's: closing stops them too."""
        self._mirroring = earlier._mirroring

    def _send_upstream(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        with passthrough_inside():
            if self._inner is not None:
                return self._inner.send(request, **kwargs)
            return super().send(request, **kwargs)

    @property
    def mesh(self) -> Mesh:
        return self._mesh if self._mesh is not None else default_mesh()

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        started = time.perf_counter()
        caller = _caller_timeouts(timeout)  # (connect, read); ValueError as requests raises it
        original = request
        request = _own_copy(request)  # the caller's may be sent again: it gets no header of ours
        view = _text_headers(request)  # the request's headers, read once
        if "x-request-id" not in view:
            view["x-request-id"] = request.headers["x-request-id"] = request_id()
        mesh = self.mesh
        attributes = request_attributes(request, view)
        plan = mesh.plan(attributes)
        flags: list[str] = []  # the flags set so far, counted with an exception too
        try:
            response, service = self._handle(
                mesh,
                plan,
                attributes,
                request,
                view,
                stream,
                timeout,
                caller,
                verify,
                cert,
                proxies,
                flags,
            )
        except BaseException as exc:
            record_exception(mesh, plan, started, view, _exception_flag(exc), flags=flags)
            if isinstance(exc, requests.RequestException):
                # About the caller's request, not a copy sent to an endpoint (resending that
                # would skip the mesh): as without the mesh, and as httpx sets `exc.request`.
                exc.request = original
                if exc.response is not None:
                    _answering(exc.response, original)
            raise
        record_source(
            mesh,
            plan,
            response.status_code,
            response.headers,
            started,
            view,
            getattr(response, "response_flags", ()),
            getattr(response, "upstream_host", None),
            getattr(response.raw, "version", None),  # urllib3's: 11 for HTTP/1.1
            service,
        )
        forget_identity(response.headers, response.headers)
        # The id the call went out with (the app's, or the one meshlib made): not written
        # into the caller's PreparedRequest, so said here, as httpx's `extensions["request_id"]`.
        response.request_id = view["x-request-id"]  # type: ignore[attr-defined]
        if self._owns_inner:  # requests resends through it (digest auth): through the mesh
            response.connection = self
        return _answering(response, original)

    def _handle(
        self,
        mesh: Mesh,
        plan: RoutePlan,
        attributes: RequestAttributes,
        request: requests.PreparedRequest,
        view: dict[str, str],
        stream: bool,
        timeout: Any,
        caller: tuple[float | None, float | None],
        verify: Any,
        cert: Any,
        proxies: Mapping[str, str] | None,
        flags: list[str],
    ) -> tuple[requests.Response, float | None]:
        """The response, and Envoy's upstream service time in ms when measured for the access
        log (`Exchange.began`; a passthrough call's is its duration, see `record_source`).
        `caller` is the caller's `timeout` as (connect, read) seconds; `flags` gets the
        response flags set along the way."""
        options: dict[str, Any] = {
            "stream": stream,
            "verify": verify,
            "cert": cert,
            "proxies": proxies,
        }
        if plan.passthrough:
            with client_span(mesh, request.method or "GET", request.url, None, None, view) as span:
                _add_headers(request, mesh.propagator.outbound(view.__contains__))
                left = remaining_deadline()
                if left is not None:  # meshlib does not answer here: requests' Timeout shows
                    timeout = (within_deadline(caller[0], left), within_deadline(caller[1], left))
                response = self._send_upstream(request, timeout=timeout, **options)
                end_client_span(mesh, span, AttemptResult(status=response.status_code))
                return response, None
        if plan.reply is not None:
            return self._local(plan.reply, request, flags, plan), None
        if plan.fault_delay is not None:
            flags.append(Flag.DELAY_INJECTED)  # set as the delay starts, as Envoy's is
            _fault_delay(plan.fault_delay, caller[1], request)
        if plan.fault_abort is not None:
            return self._local(plan.fault_abort, request, flags, plan), None
        replayable = _replayable(request)
        exchange = mesh.exchange(plan, replayable=replayable)
        if plan.mirrors and replayable:

            def shadow() -> None:  # once the request has an upstream (see retry._attempt)
                for mirror in plan.mirrors:
                    # 0: a copy that would wait for a connection is dropped (see start_mirror)
                    copy = start_mirror(mesh, plan, mirror, 0)
                    if copy is None:
                        continue  # no endpoint in the pool, or the mirror's limits full
                    propagated = mesh.propagator.outbound(view.__contains__)
                    sent = self._upstream(
                        request, plan, None, propagated, mesh.identity_headers, copy.endpoint
                    )
                    if copy.attempt.close_connection:
                        sent.headers["connection"] = "close"  # maxRequestsPerConnection
                    epoch = self._mirroring.closes
                    if not self._mirroring.submit(
                        self._send_mirror, sent, copy, caller, options, epoch
                    ):
                        copy.end(None)  # MAX_MIRRORS_PENDING copies pending: dropped

            exchange.shadow = shadow
        choose_hash_key(exchange, mesh, attributes)
        # requests has no pool timeout: its connect timeout bounds waiting for a connection
        exchange.pool_timeout = caller[0]
        exchange.pool_timeout_error = ConnectionWaitTimeout
        exchange.pool_timeout_name = "connect timeout (requests has no pool timeout)"
        exchange.caller_request = request

        def send(attempt: Attempt) -> AttemptResult:
            with client_span(
                mesh, request.method or "GET", request.url, plan, attempt, view
            ) as span:
                result = self._attempt(
                    mesh, request, view, plan, attempt, options, caller, exchange
                )
                end_client_span(mesh, span, result)
                return result

        result = run_attempts(exchange, send, _close)
        if (result.client_timeout or result.broke_off) and result.error is not None:
            raise result.error  # the caller's own timeout, a body broken off: as without the mesh
        flags = ordered(flags + exchange.response_flags(result))
        reply = exchange.final_reply(result)
        if reply is not None:
            return self._local(reply, request, flags, plan), None
        final: requests.Response = result.response
        if plan.response_headers:
            final.headers = _joined(
                edited_headers(final.headers.items(), plan.response_headers, {})
            )
            _cookies_as_edited(final, request, plan.response_headers)
        if exchange.set_cookie is not None:
            _add_set_cookie(final, exchange.set_cookie)
        final.response_flags = flags  # type: ignore[attr-defined]
        final.upstream_host = exchange.upstream_host  # type: ignore[attr-defined]
        return final, exchange.service_time(result)

    def _send_mirror(
        self,
        request: requests.PreparedRequest,
        copy: MirrorCopy,
        caller: tuple[float | None, float | None],
        options: dict[str, Any],
        epoch: int,
    ) -> None:
        """Send a copy with the caller's (connect, read) timeouts, MIRROR_TIMEOUT for each the
        caller left unset (a copy never holds a mirroring thread for good), the route's timeout
        and the mirror's connect timeout bounding them; its answer is read within the read
        timeout and dropped, so its connection is used again. Its outcome goes to the mirror
        cluster's outlier detection (see `MirrorCopy`)."""
        result: AttemptResult | None = None
        try:
            copies = self._mirroring
            if epoch != copies.closes:  # closed while the copy waited for a thread:
                request.headers["connection"] = "close"  # its pool is opened anew for it
            connect, read, mesh_owned = copy.timeouts(*caller)
            try:
                response = self._send_upstream(request, timeout=(connect, read), **options)
            except (requests.ConnectionError, requests.Timeout) as exc:
                base = MIRROR_TIMEOUT if caller[0] is None else caller[0]
                result = _failure(exc, copy.attempt, base, mesh_owned)
                return
            result = AttemptResult(status=response.status_code)
            # Closed meanwhile: its pool may be opened anew, and is not to keep the connection.
            _discard(response, read or MIRROR_TIMEOUT, None, keep=lambda: epoch == copies.closes)
        except Exception:  # a mirror's failure never affects anything
            pass
        finally:
            copy.end(result)  # its outcome to outlier detection, its slot given back

    def _attempt(
        self,
        mesh: Mesh,
        request: requests.PreparedRequest,
        view: dict[str, str],
        plan: RoutePlan,
        attempt: Attempt,
        options: dict[str, Any],
        caller: tuple[float | None, float | None],
        exchange: Exchange,
    ) -> AttemptResult:
        """One try; `caller` is the caller's (connect, read) timeouts."""
        caller_connect, caller_read = caller
        propagated = mesh.propagator.outbound(view.__contains__, attempt.timeout)
        upstream = self._upstream(request, plan, attempt, propagated, mesh.identity_headers)
        connect, read, mesh_owned = attempt.timeouts(caller_connect, caller_read)
        try:
            response = self._send_upstream(upstream, timeout=(connect, read), **options)
        except (requests.ConnectionError, requests.Timeout) as exc:
            return _failure(exc, attempt, caller_connect, mesh_owned)
        result = AttemptResult(
            status=response.status_code,
            grpc_status=response.headers.get("grpc-status"),
            response=response,
            rate_limited="x-envoy-ratelimited" in response.headers,
            headers=response.headers,
        )
        if exchange.began is not None:  # its headers came: before a body is read
            result.answered = time.perf_counter()
        if not options["stream"] and not exchange.would_retry(result):
            try:
                _read_whole(response, exchange.deadline.at)
            except (
                requests.ConnectionError,
                requests.Timeout,
                ChunkedEncodingError,
                BodyTooLate,
            ) as exc:
                response.close()
                timed_out = not isinstance(exc, BodyTooLate) and _classify(exc) == PER_TRY_TIMEOUT
                return body_broke_off(exc, timed_out, timed_out and not mesh_owned)
        return result

    @staticmethod
    def _upstream(
        request: requests.PreparedRequest,
        plan: RoutePlan,
        attempt: Attempt | None,
        propagated: list[tuple[str, str]],
        identity: Sequence[tuple[str, str]] = (),
        endpoint: Endpoint | None = None,
    ) -> requests.PreparedRequest:
        """The request as sent to an endpoint (the attempt's, or a mirror's). The headers
        propagated for the app count as the app's own (the route's edits apply to them, as
        a sidecar's apply to what the app copied); then the Host the route says, the attempt
        count and this workload's identity."""
        parts = urlsplit(request.url or "")
        upstream = request.copy()
        target = endpoint if attempt is None else attempt.endpoint
        assert target is not None
        upstream.url = urlunsplit((plan.scheme, target.key, plan.path, parts.query, parts.fragment))
        extra = {"host": plan.authority}
        if attempt is not None:
            extra["x-envoy-attempt-count"] = str(attempt.number)
            if attempt.close_connection:
                extra["connection"] = "close"  # maxRequestsPerConnection reached
        extra.update(identity)
        # As text: after `prepare`, auth handlers and callers may set bytes or ints (sent as
        # the same Latin-1 bytes, or the int's digits, as http.client would send them).
        headers = [(_text(name), _text(value)) for name, value in request.headers.items()]
        headers += propagated
        upstream.headers = _joined(edited_headers(headers, plan.request_headers, extra))
        return upstream

    def _local(
        self,
        reply: LocalReply,
        request: requests.PreparedRequest,
        flags: list[str],
        plan: RoutePlan | None,
    ) -> requests.Response:
        if reply.flag is not None:
            flags = ordered([*flags, reply.flag])
        response = requests.Response()
        response.status_code = reply.status
        try:
            response.reason = http.HTTPStatus(reply.status).phrase
        except ValueError:
            response.reason = ""
        headers = reply_headers(reply, flags, plan)
        response.headers = _joined(headers)
        body = b"" if request.method == "HEAD" else reply.body  # HEAD: headers only, as Envoy
        # What requests' own adapter gives: urllib3's response as `raw`, the encoding its
        # headers say (ISO-8859-1 for text/plain).
        response.raw = HTTPResponse(
            body=io.BytesIO(body),
            headers=HTTPHeaderDict(headers),
            status=reply.status,
            version=11,
            reason=response.reason,
            preload_content=False,
            decode_content=False,
            request_url=request.url,
        )
        response.encoding = get_encoding_from_headers(response.headers)
        response._content = body
        response.url = request.url or ""
        response.request = request
        response.connection = self
        response.response_flags = flags  # type: ignore[attr-defined]
        return response


def _joined(pairs: Iterable[tuple[str, str]]) -> CaseInsensitiveDict[str]:
    """Headers as requests holds them: one entry per name, the values of a name that comes
    more than once joined with ", " (as urllib3 joins a response's), not the last kept."""
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    for name, value in pairs:
        earlier = headers.get(name)
        headers[name] = value if earlier is None else f"{earlier}, {value}"
    return headers


def _answering(response: requests.Response, request: requests.PreparedRequest) -> requests.Response:
    """`response` as the answer to the caller's `request`, not to the copy sent to an
    endpoint (as httpx sets `response.request`): requests follows redirects from
    `response.url` and `response.request` (a relative `Location` stays in the mesh, and a
    same-host redirect keeps `Authorization`), and digest auth resends `response.request`.
    (Cookies are right already: the cookie jar takes the host from the `Host` header.)"""
    response.request = request
    response.url = request.url or ""
    return response


def _cookies_as_edited(
    response: requests.Response, request: requests.PreparedRequest, edits: HeaderEdits
) -> None:
    """A route's response header edits of `Set-Cookie` also apply where requests' cookie jars
    read cookies (the raw HTTP message, one field per cookie; `response.headers` joins them):
    a cookie the route removes is never stored, one it adds is, as behind a sidecar."""
    added = [value for name, value in edits.add if name.lower() == "set-cookie"]
    replaced = edits.set.get("set-cookie")
    removed = "set-cookie" in edits.remove
    message = getattr(getattr(response.raw, "_original_response", None), "msg", None)
    if message is None or not (added or replaced is not None or removed):
        return
    # In edited_headers' order: set replaces, add appends, remove takes every one away.
    values = list(message.get_all("Set-Cookie") or ()) if replaced is None else [replaced]
    values = [] if removed else [*values, *added]
    del message["Set-Cookie"]  # an email.message.Message: every one of them
    for value in values:
        message["Set-Cookie"] = value
    response.cookies = requests.cookies.RequestsCookieJar()
    requests.cookies.extract_cookies_to_jar(response.cookies, request, response.raw)  # type: ignore[no-untyped-call]


def _add_set_cookie(response: requests.Response, value: str) -> None:
    """A generated hash cookie, where requests looks for cookies: the Session's jar reads the
    raw HTTP message urllib3 parsed, `response.headers` joins repeated fields with ", "."""
    given = response.headers.get("set-cookie")
    response.headers["Set-Cookie"] = f"{given}, {value}" if given else value
    message = getattr(getattr(response.raw, "_original_response", None), "msg", None)
    if message is not None:
        message["Set-Cookie"] = value  # an email.message.Message: adds, never replaces


def _add_headers(request: requests.PreparedRequest, headers: list[tuple[str, str]]) -> None:
    for name, value in headers:
        request.headers[name] = value


class Session(requests.Session):
    """A `requests.Session` whose requests go through the mesh."""

    def __init__(self, *, mesh: Mesh | None = None) -> None:
        given_mesh(mesh, "meshlib.Session")
        super().__init__()
        self._mesh = mesh
        adapter = MeshAdapter(mesh=mesh)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def mount(self, prefix: str | bytes, adapter: requests.adapters.BaseAdapter) -> None:
        """Mount `adapter` for URLs starting with `prefix`, meshed: an adapter of the app's
        (an `HTTPAdapter` with a bigger pool or urllib3 retries, say) sends each try the mesh
        plans, as `meshlib.Client` wraps httpx's `mounts=`; a `MeshAdapter` is mounted as it is.
        Closing the session closes the app's adapter too."""
        if not isinstance(adapter, MeshAdapter):
            meshed = MeshAdapter(mesh=getattr(self, "_mesh", None), inner=adapter)  # type: ignore[arg-type]
            meshed._owns_inner = True
            adapter = meshed
        super().mount(prefix, adapter)
