"""The transports meshlib puts under its httpx transports, and the pool mirrored copies use.

Two things are made here. The async default (`_default_async_transport`): meshlib's HTTP/1.1
pool, which keeps throughput under concurrency, unless HTTP/2 or an option only httpx's own
transport understands is asked for. And, for mirrored copies, a transport like the inner one
with a connection pool of its own (`pool_like`): Envoy sends a mirror's copies through the
mirror cluster's own pool, so a slow shadow never takes the connections the calls themselves
wait for. With them, the bookkeeping that closes a copies' pool when its last copy ends
(`_CopyPool`, `_AsyncCopies`) and the time bounds a copy gets (`_bound_copy`).

Split out of `meshlib.clients.httpx`, and, like it, not compiled (see pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import httpcore
import httpx

from meshlib.clients._aio import Background
from meshlib.clients._common import MirrorCopy
from meshlib.clients._httpx_call import _smaller

MIRROR_GRACE = 1.0  # seconds aclose() waits for mirrored copies still in flight


def _bound_copy(request: httpx.Request, copy: MirrorCopy) -> httpx.Request:
    """A mirrored copy about to be sent, its timeouts bounded by what is left of the route's
    timeout and by the mirror cluster's connect timeout."""
    timeout = dict(request.extensions["timeout"])
    timeout["connect"], timeout["read"], _ = copy.timeouts(timeout["connect"], timeout["read"])
    left = copy.attempt.route_left()
    if left is not None:
        for phase in ("write", "pool"):
            timeout[phase] = _smaller(timeout[phase], left)
    request.extensions = {**request.extensions, "timeout": timeout}
    return request


class _AsyncCopies(Background):
    """The asyncio twin of a MeshTransport's `MirrorTracker`: an AsyncMeshTransport's copies
    and their pool, shared with the transport that replaces it (`adopt_mirrors`), so one close
    stops them all."""

    pool: httpx.AsyncBaseTransport | None = None  # see AsyncMeshTransport._mirroring_transport


class _CopyPool:
    """The connection pool a MeshTransport's mirrored copies go through (see `pool_like`),
    and how many copies use it now. Closing the client retires it: it is closed when no copy
    uses it any more, at once when none is in flight."""

    __slots__ = ("retired", "transport", "users")

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport
        self.users = 0  # copies sending through it now (under the MirrorTracker's lock)
        self.retired = False  # no copy takes it any more: the last one out closes it


def pool_like(inner: Any) -> Any:
    """A transport with `inner`'s settings and a connection pool of its own, for mirrored
    copies (Envoy sends them through the mirror cluster's own pool: a slow shadow must not
    take the connections the calls themselves wait for): meshlib's HTTP/1.1 transport makes
    its `sibling()`; httpx's own, without a proxy, is matched by a new one with its TLS
    context and HTTP versions (for asyncio, meshlib's HTTP/1.1 pool when it speaks only
    HTTP/1.1). None for any other transport (an app's own, a mock): copies go through it."""
    sibling = getattr(inner, "sibling", None)
    if callable(sibling):
        return sibling()  # None when it cannot make one
    pool = getattr(inner, "_pool", None)
    try:
        if type(inner) is httpx.HTTPTransport and type(pool) is httpcore.ConnectionPool:
            return httpx.HTTPTransport(
                verify=pool._ssl_context or True, http1=pool._http1, http2=pool._http2
            )
        if type(inner) is httpx.AsyncHTTPTransport and type(pool) is httpcore.AsyncConnectionPool:
            # Not meshlib's HTTP/1.1 pool for an HTTP/2 one: a prior-knowledge mirror would get
            # HTTP/1.1, and over TLS the context they share offers h2 by ALPN once httpcore
            # has set it so, which that pool must refuse.
            only_h2: dict[str, Any] = {} if pool._http1 else {"http1": False}
            return _default_async_transport(
                verify=pool._ssl_context or True, http2=pool._http2, **only_h2
            )
    except AttributeError:  # another httpcore: the inner transport it is
        pass
    return None


# httpx's own default pool limits (`httpx.Limits()` alone sets none)
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


def _default_async_transport(
    *,
    verify: Any = True,
    limits: httpx.Limits | None = None,
    http2: bool = False,
    trust_env: bool = True,
    **kwargs: Any,
) -> httpx.AsyncBaseTransport:
    """meshlib's HTTP/1.1 pool (it keeps throughput under concurrency), unless HTTP/2 or an
    option only httpx's own transport understands is asked for."""
    if http2 or kwargs:
        return httpx.AsyncHTTPTransport(
            verify=verify,
            limits=limits or _DEFAULT_LIMITS,
            http2=http2,
            trust_env=trust_env,
            **kwargs,
        )
    from meshlib.clients._http1 import Http1Transport

    limits = limits or _DEFAULT_LIMITS
    return Http1Transport(
        verify=verify,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        trust_env=trust_env,
    )
