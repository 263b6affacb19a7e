"""`MeshTransport` and `AsyncMeshTransport`: httpx transports that apply the mesh's policy.

Each wraps an inner httpx transport (the given one, or a default) and runs a call the way a
sidecar would: routing and balancing, the attempt loop (retries, timeouts, breakers), faults,
mirrored copies, and the answers Envoy gives itself. The two mirror each other by design, as
httpx's own sync and async transports do: what they share without I/O is `_httpx_base`'s,
the helpers they call per request live in `_httpx_call`, `_httpx_failures` and
`_httpx_reading`, and the pools under them in `_httpx_pools`. Public as
`meshlib.MeshTransport` / `meshlib.AsyncMeshTransport` (and from `meshlib.clients.httpx`).

Split out of `meshlib.clients.httpx`, and, like it, not compiled: mypyc mis-builds the async
`try/except` around awaits (see pyproject.toml).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import httpx

from meshlib.clients._aio import sleep
from meshlib.clients._common import (
    MAX_MIRRORS_PENDING,
    BodyTooLate,
    MirrorCopy,
    MirrorTracker,
    client_span,
    end_client_span,
    record_exception,
)
from meshlib.clients._guard import passthrough_inside
from meshlib.clients._httpx_base import _Closes, _MeshTransportBase
from meshlib.clients._httpx_call import (
    Added,
    Handled,
    _passthrough,
    _record,
    _replayable,
    _view,
)
from meshlib.clients._httpx_failures import (
    _CALLERS_OWN,
    _body_failed,
    _delay_timed_out,
    _exception_flag,
    _failed,
    _read_timeout_first,
)
from meshlib.clients._httpx_pools import (
    MIRROR_GRACE,
    _AsyncCopies,
    _bound_copy,
    _CopyPool,
    _default_async_transport,
    pool_like,
)
from meshlib.clients._httpx_reading import (
    _READ_WHOLE,
    _aclose,
    _aread_whole,
    _close,
    _read_whole,
)
from meshlib.dataplane.exchange import Attempt
from meshlib.dataplane.outcome import Flag
from meshlib.dataplane.retry import AttemptResult, run_attempts, run_attempts_async
from meshlib.dataplane.routing import RoutePlan
from meshlib.mesh import Mesh, given_mesh
from meshlib.policy.matching import RequestAttributes

_MESHED = "meshlib.meshed"  # marks transports meshlib made, so nothing is meshed twice


def _close_orphan(response: httpx.Response) -> None:
    """Close the connection a mirrored copy used when the client closed the inner transport
    while the copy was on it: httpcore's pool, closed while the copy was connecting, no longer
    lists that connection, so nobody else would ever close it."""
    stream = response.extensions.get("network_stream")
    close = getattr(stream, "close", None)
    if callable(close):
        close()


class MeshTransport(_MeshTransportBase, httpx.BaseTransport):
    """An httpx transport that applies the mesh's policy, over any inner transport."""

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        mesh: Mesh | None = None,
        **kwargs: Any,
    ) -> None:
        self._mesh = given_mesh(mesh, "meshlib.MeshTransport")
        self._inner = transport if transport is not None else httpx.HTTPTransport(**kwargs)
        # Its `closes` counts close_mirrors() calls: a copy queued before one goes through a
        # pool of its own (see `_take_pool`), not through one opened after the close, which
        # nobody would close. Its `pool` is a `_CopyPool`.
        self._mirroring = MirrorTracker()
        self._closes = _Closes()
        setattr(self, _MESHED, True)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        items, view, added = _view(request)
        mesh, plan, attributes = self._prepare(request, items)
        flags: list[str] = []  # the flags set so far, counted with an exception too
        try:
            response, headers, service = self._handle(
                request, view, added, mesh, plan, attributes, started, flags
            )
        except BaseException as exc:
            record_exception(mesh, plan, started, view, _exception_flag(exc), flags=flags)
            raise
        _record(mesh, plan, view, response, started, headers, service)
        return response

    def _handle(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        mesh: Mesh,
        plan: RoutePlan,
        attributes: RequestAttributes,
        started: float,
        flags: list[str],
    ) -> Handled:
        if plan.passthrough:
            with client_span(mesh, request.method, request.url, None, None, view) as span:
                with passthrough_inside():
                    response = self._inner.handle_request(_passthrough(mesh, request, view, added))
                passed = self._result(response)
                end_client_span(mesh, span, passed)
                return response, passed.headers, None  # its service time: see record_source
        if plan.reply is not None:
            return self._local(plan.reply, request, flags, plan), None, None
        if plan.fault_delay is not None:
            flags.append(Flag.DELAY_INJECTED)  # set as the delay starts, as Envoy's is
            read = _read_timeout_first(request, plan.fault_delay)
            time.sleep(plan.fault_delay if read is None else read)
            if read is not None:
                raise _delay_timed_out(request)
        if plan.fault_abort is not None:
            return self._local(plan.fault_abort, request, flags, plan), None, None
        replayable = _replayable(request)
        exchange = self._exchange(mesh, plan, attributes, request, replayable)
        if plan.mirrors and replayable:
            exchange.shadow = lambda: self._start_mirrors(request, view, added, plan)

        reading = _READ_WHOLE.get()
        whole = reading is not None and reading.marks(request.extensions)
        closes = self._closes
        begun = closes.begun

        def send(attempt: Attempt) -> AttemptResult:
            with client_span(mesh, request.method, request.url, plan, attempt, view) as span:
                try:
                    with passthrough_inside():
                        upstream = self._upstream(mesh, request, view, added, plan, attempt)
                        response = self._inner.handle_request(upstream)
                except _CALLERS_OWN:
                    raise  # the request itself is wrong: the app's error, as without the mesh
                except httpx.TransportError as exc:
                    if closes.begun != begun:
                        raise  # the app closed the client under it: its error, never retried
                    result = _failed(exc, request, attempt)
                else:
                    result = self._result(response)
                    if exchange.began is not None:  # its headers came: before a body is read
                        result.answered = time.perf_counter()
                    if whole and not exchange.would_retry(result):
                        try:
                            _read_whole(response, exchange.deadline.at, result.headers, started)
                        except (httpx.TransportError, BodyTooLate) as exc:
                            result = _body_failed(exc, request, attempt)
                end_client_span(mesh, span, result)
                return result

        result = run_attempts(exchange, send, _close)
        return self._respond(request, plan, exchange, result, flags)

    def _start_mirrors(
        self, request: httpx.Request, view: dict[str, str], added: Added, plan: RoutePlan
    ) -> None:
        for mirror in plan.mirrors:
            started = self._start_copy(request, view, added, plan, mirror, may_wait=False)
            if started is not None and not self._mirroring.submit(
                self._send_mirror, *started, self._mirroring.closes
            ):
                started[1].end(None)  # MAX_MIRRORS_PENDING copies pending: dropped

    def _take_pool(self, epoch: int) -> _CopyPool | None:
        """The pool a copy sent now goes through, counted as in use until `_give_back`: the
        transport's pool for copies, made when first needed (see `pool_like`); for a copy
        queued before the last `close_mirrors`, a pool of its own, closed after it (the
        transport's was closed, or is closed once its copies in flight end). None when no pool
        like the inner transport can be made: the copy goes through the inner one."""
        copies = self._mirroring
        with copies.lock:
            pool: _CopyPool | None = copies.pool if epoch == copies.closes else None
            if pool is None:
                made = pool_like(self._inner)
                if made is None:
                    return None
                pool = _CopyPool(made)
                if epoch == copies.closes:
                    copies.pool = pool
                else:
                    pool.retired = True
            pool.users += 1
            return pool

    def _give_back(self, pool: _CopyPool) -> None:
        """A copy is done with `pool`: the last one out of a retired pool closes it."""
        with self._mirroring.lock:
            pool.users -= 1
            last = pool.retired and pool.users == 0
        if last:
            pool.transport.close()

    def _send_mirror(self, request: httpx.Request, copy: MirrorCopy, epoch: int) -> None:
        result: AttemptResult | None = None
        pool: _CopyPool | None = None
        try:
            pool = self._take_pool(epoch)
            transport = self._inner if pool is None else pool.transport
            sent_under = self._mirroring.closes
            if pool is None and epoch != sent_under:
                # Queued before a close: sent through the inner transport's pool, opened anew
                # for it, on a connection closed after it.
                request.headers["connection"] = "close"
            with passthrough_inside():
                try:
                    response = transport.handle_request(_bound_copy(request, copy))
                except httpx.TransportError as exc:
                    if pool is not None or epoch == self._mirroring.closes:
                        result = _failed(exc, request, copy.attempt)  # as a try's
                    # else the app closed the transport under it: not the mirror's failure
                    return
                result = AttemptResult(status=response.status_code)
                try:
                    response.read()
                finally:
                    response.close()  # read or not, its connection is given back
                    if pool is None and self._mirroring.closes != sent_under:
                        _close_orphan(response)
        except Exception:  # a mirror never affects anything: its failures are dropped
            pass
        finally:
            try:
                copy.end(result)  # its outcome to outlier detection, its slot given back
            finally:
                if pool is not None:
                    self._give_back(pool)

    def close(self) -> None:
        self.closing()
        self.close_mirrors()
        self._inner.close()

    def adopt_mirrors(self, earlier: MeshTransport) -> None:
        """Share the mirrored copies and their pool of the transport this one replaces over
        the same inner one (`instrument()` with another Mesh), before sending any: closing
        this one retires the pool the earlier one's copies go through too, and one it queued
        goes on a pool of its own; and its count of closes, so that its calls in flight are
        not retried through the closed pool."""
        self._mirroring = earlier._mirroring
        self._closes = earlier._closes

    def close_mirrors(self) -> None:
        """Count a close, without waiting for the mirrored copies (Envoy never holds a caller
        for its shadow, and `httpx.get()` closes a client on every call), and retire their
        pool: closed now when no copy is in flight on it, else by the last one to end, so a
        copy in flight is not cut off. A copy still queued goes when a thread frees, on a pool
        of its own closed after it (see `_take_pool`): no copy is dropped, and no connection
        stays open in a pool nobody closes. (Copies that go through the inner transport, one
        meshlib cannot copy, end with it as anything on it does.) `close()` does it;
        `instrument()` does it when a stock transport closes."""
        copies = self._mirroring
        with copies.lock:
            copies.closes += 1
            pool, copies.pool = copies.pool, None
            if pool is not None:
                pool.retired = True
                if pool.users:
                    return  # closed by the last copy in flight
        if pool is not None:
            pool.transport.close()


class AsyncMeshTransport(_MeshTransportBase, httpx.AsyncBaseTransport):
    """The asyncio twin of MeshTransport. Its default inner transport keeps throughput
    under concurrency (see `meshlib.clients._http1`)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        mesh: Mesh | None = None,
        **kwargs: Any,
    ) -> None:
        self._mesh = given_mesh(mesh, "meshlib.AsyncMeshTransport")
        self._inner = transport if transport is not None else _default_async_transport(**kwargs)
        self._mirrors = _AsyncCopies()
        self._closes = _Closes()
        setattr(self, _MESHED, True)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        items, view, added = _view(request)
        mesh, plan, attributes = self._prepare(request, items)
        flags: list[str] = []  # the flags set so far, counted with an exception too
        try:
            response, headers, service = await self._handle(
                request, view, added, mesh, plan, attributes, started, flags
            )
        except BaseException as exc:
            record_exception(mesh, plan, started, view, _exception_flag(exc), flags=flags)
            raise
        _record(mesh, plan, view, response, started, headers, service)
        return response

    async def _handle(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        mesh: Mesh,
        plan: RoutePlan,
        attributes: RequestAttributes,
        started: float,
        flags: list[str],
    ) -> Handled:
        if plan.passthrough:
            with client_span(mesh, request.method, request.url, None, None, view) as span:
                with passthrough_inside():
                    response = await self._inner.handle_async_request(
                        _passthrough(mesh, request, view, added)
                    )
                passed = self._result(response)
                end_client_span(mesh, span, passed)
                return response, passed.headers, None  # its service time: see record_source
        if plan.reply is not None:
            return self._local(plan.reply, request, flags, plan), None, None
        if plan.fault_delay is not None:
            flags.append(Flag.DELAY_INJECTED)  # set as the delay starts, as Envoy's is
            read = _read_timeout_first(request, plan.fault_delay)
            await sleep(plan.fault_delay if read is None else read)
            if read is not None:
                raise _delay_timed_out(request)
        if plan.fault_abort is not None:
            return self._local(plan.fault_abort, request, flags, plan), None, None
        replayable = _replayable(request)
        exchange = self._exchange(mesh, plan, attributes, request, replayable)
        if plan.mirrors and replayable:
            exchange.shadow = lambda: self._start_mirrors(request, view, added, plan)

        reading = _READ_WHOLE.get()
        whole = reading is not None and reading.marks(request.extensions)
        closes = self._closes
        begun = closes.begun

        async def send(attempt: Attempt) -> AttemptResult:
            with client_span(mesh, request.method, request.url, plan, attempt, view) as span:
                try:
                    with passthrough_inside():
                        upstream = self._upstream(mesh, request, view, added, plan, attempt)
                        response = await self._inner.handle_async_request(upstream)
                except _CALLERS_OWN:
                    raise  # the request itself is wrong: the app's error, as without the mesh
                except httpx.TransportError as exc:
                    if closes.begun != begun:
                        raise  # the app closed the client under it: its error, never retried
                    result = _failed(exc, request, attempt)
                else:
                    result = self._result(response)
                    if exchange.began is not None:  # its headers came: before a body is read
                        result.answered = time.perf_counter()
                    if whole and not exchange.would_retry(result):
                        try:
                            await _aread_whole(
                                response, exchange.deadline.at, result.headers, started
                            )
                        except (httpx.TransportError, BodyTooLate) as exc:
                            result = _body_failed(exc, request, attempt)
                end_client_span(mesh, span, result)
                return result

        result = await run_attempts_async(exchange, send, _aclose)
        return self._respond(request, plan, exchange, result, flags)

    def _start_mirrors(
        self, request: httpx.Request, view: dict[str, str], added: Added, plan: RoutePlan
    ) -> None:
        for mirror in plan.mirrors:
            if len(self._mirrors) >= MAX_MIRRORS_PENDING:
                return  # copies pending: new ones are dropped
            started = self._start_copy(request, view, added, plan, mirror, may_wait=True)
            if started is not None:
                copied, copy = started
                self._mirrors.start(
                    functools.partial(self._send_mirror, copied, copy), copy.given_up
                )

    def _mirroring_transport(self) -> httpx.AsyncBaseTransport:
        """Where copies go: a pool of their own when one like the inner transport can be made
        (see `pool_like`), else the inner transport."""
        copies = self._mirrors
        if copies.pool is None:
            copies.pool = pool_like(self._inner)
        return copies.pool or self._inner

    async def _send_mirror(self, request: httpx.Request, copy: MirrorCopy) -> None:
        result: AttemptResult | None = None
        try:
            if not await copy.wait_async():  # maxConnections in use: wait, not for good
                return
            with passthrough_inside():
                try:
                    response = await self._mirroring_transport().handle_async_request(
                        _bound_copy(request, copy)
                    )
                except httpx.TransportError as exc:
                    result = _failed(exc, request, copy.attempt)  # as a try's
                    return
                result = AttemptResult(status=response.status_code)
                try:
                    await response.aread()
                finally:
                    await response.aclose()  # read or not, its connection is given back
        except Exception:  # a mirror never affects anything: its failures are dropped
            pass
        finally:
            copy.end(result)  # its outcome to outlier detection; cancelled: given back

    async def aclose(self) -> None:
        self.closing()
        await self.aclose_mirrors()
        await self._inner.aclose()

    def adopt_mirrors(self, earlier: AsyncMeshTransport) -> None:
        """Share the mirrored copies and their pool of the transport this one replaces over
        the same inner one (`instrument()` with another Mesh), before sending any: closing
        this one gives the earlier one's copies their grace and cancels them too (one waiting
        for a connection would otherwise open a pool nobody closes), and closes the pool; and
        its count of closes, so that its calls in flight are not retried through the closed
        pool."""
        self._mirrors = earlier._mirrors
        self._closes = earlier._closes

    async def aclose_mirrors(self) -> None:
        """Give copies in flight up to MIRROR_GRACE to finish (then drop them), and close
        their own pool.

        Unlike the sync clients' `close()`, this waits. A sync copy runs on a process-wide
        thread that outlives the client (and that Python lets finish at exit), so not waiting
        loses nothing. An async copy is a task of the event loop, which ends with it, and an
        `AsyncClient` is most often closed as the app shuts down, right before its loop ends:
        httpx has no function that makes and closes one per call, as `httpx.get()` does, and
        advises one client for the app's life. Not waiting would not let those copies go, only
        leave them to be cancelled with the loop."""
        copies = self._mirrors
        await copies.aclose(MIRROR_GRACE)
        pool, copies.pool = copies.pool, None
        if pool is not None:
            await pool.aclose()
