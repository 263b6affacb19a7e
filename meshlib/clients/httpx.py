"""Meshed httpx: `MeshTransport` / `AsyncMeshTransport` wrap any httpx transport, and
`Client` / `AsyncClient` are real httpx clients that use them.

    client = meshlib.Client()                  # an httpx.Client; requests routed by policy
    client.get("http://reviews:9080/reviews/1")
    transport = meshlib.MeshTransport(httpx.HTTPTransport(retries=0), mesh=my_mesh)

Hosts the mesh does not know go through untouched. For the others the transport routes,
balances, retries and times out as the route says and answers locally where a sidecar would
(503 UO/UH/UF, 504 UT, 404 NR, fault aborts); the Envoy response flags are in
`response.extensions["response_flags"]` and, on local answers, in the
`x-meshlib-response-flags` header.

This module is the adapter's public face and holds the clients; the transports are
`_httpx_transport`'s, and the helpers under them have modules of their own (`_httpx_base`,
`_httpx_call`, `_httpx_failures`, `_httpx_reading`, `_httpx_pools`). None of them is compiled
(see pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from meshlib.clients._httpx_headers import lowercase_raw
from meshlib.clients._httpx_pools import _default_async_transport
from meshlib.clients._httpx_reading import _READ_WHOLE, _Reading
from meshlib.clients._httpx_transport import _MESHED, AsyncMeshTransport, MeshTransport
from meshlib.mesh import Mesh, given_mesh

__all__ = ["AsyncClient", "AsyncMeshTransport", "Client", "MeshTransport"]


class _Cookies(httpx.Cookies):
    """httpx's cookie store, skipping the cookie jar when a response sets no cookie.

    httpx hands every response to `http.cookiejar` (through urllib request and response
    adapters), which then finds no `Set-Cookie` header in most responses: that costs ~15 µs
    per request, more than routing it. Responses that do set cookies go the usual way.
    """

    @classmethod
    def sharing(cls, cookies: httpx.Cookies) -> _Cookies:
        """This store over the same jar (a `CookieJar` the app passed stays the one used)."""
        store = cls()
        store.jar = cookies.jar
        return store

    def extract_cookies(self, response: httpx.Response) -> None:
        for name, _ in lowercase_raw(response.headers):
            if name == b"set-cookie" or name == b"set-cookie2":
                super().extract_cookies(response)
                return


_PARSED_URLS = 256  # distinct URL strings a client keeps parsed; more start the cache anew


class _ClientMixin:
    """What meshlib's clients change in httpx's own per-request work, behaviour unchanged.

    - The cookie store skips the cookie jar for responses that set no cookie (`_Cookies`);
      setting `client.cookies` keeps that store.
    - A URL string is parsed once: httpx parses it on every call (~8 µs, more than routing
      the request), though apps call the same few URLs again and again. httpx URLs are
      immutable, so requests can share the parsed form; the cache holds at most
      `_PARSED_URLS` strings and starts anew when `base_url` changes.
    - A response `send` has read is freed when the app drops it (`_unbound`).
    - A redirect's new request is read whole as the first was (`_Reading`).
    """

    _cookies: httpx.Cookies
    _base_url: httpx.URL
    _parsed: tuple[httpx.URL, dict[str, httpx.URL]] | None = None

    @property
    def cookies(self) -> httpx.Cookies:
        return self._cookies

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        self._cookies = _Cookies(cookies)

    def _build_redirect_request(self, request: httpx.Request, response: httpx.Response) -> Any:
        redirect = super()._build_redirect_request(request, response)  # type: ignore[misc]
        reading = _READ_WHOLE.get()
        if reading is not None and reading.marks(request.extensions):
            reading.more.append(redirect.extensions)  # httpx copied them: the next hop's
        return redirect

    def _merge_url(self, url: httpx.URL | str) -> httpx.URL:
        if not isinstance(url, str):
            return super()._merge_url(url)  # type: ignore[misc, no-any-return]
        parsed = self._parsed
        if parsed is None or parsed[0] is not self._base_url or len(parsed[1]) >= _PARSED_URLS:
            parsed = self._parsed = (self._base_url, {})
        merged = parsed[1].get(url)
        if merged is None:
            merged = parsed[1][url] = super()._merge_url(url)  # type: ignore[misc]
        return merged


def _unbound(response: httpx.Response) -> httpx.Response:
    """`response`, read and closed, its stream no longer pointing back at it.

    httpx wraps each response's stream in one that points back at the response, to set
    `elapsed` when it closes: a reference cycle, so every response (its headers, body and
    decoder) waits for the cyclic garbage collector instead of being freed when the app drops
    it. Under concurrency those collections cost more CPU than the mesh's routing. Once the
    body is read and the stream closed, the binding has done its job: the stream becomes the
    bytes read, which is all a read response's stream can still give.
    """
    for read in (*response.history, response):
        if read.is_closed:
            try:
                content = read.content
            except httpx.ResponseNotRead:  # closed without being read: left as httpx made it
                continue
            read.stream = httpx.ByteStream(content)
    return response


def _mesh_every_transport(
    client: httpx.Client | httpx.AsyncClient, wrap: Callable[[Any], Any]
) -> None:
    """Wrap the transports httpx made for `client` — the given or default one, `mounts=`,
    and the proxies from `proxy=` or the environment (HTTP_PROXY, NO_PROXY, ...) — so that
    every request goes through the mesh, whichever transport httpx picks for its URL."""

    def meshed(transport: Any) -> Any:
        return (
            transport
            if transport is None or getattr(transport, _MESHED, False)
            else wrap(transport)
        )

    client._transport = meshed(client._transport)
    client._mounts = {pattern: meshed(t) for pattern, t in client._mounts.items()}


class Client(_ClientMixin, httpx.Client):
    """An `httpx.Client` whose requests go through the mesh.

    Every httpx feature still works: httpx makes its transports as it always does (the given
    one or its default, `mounts=`, proxies from `proxy=` or the environment), and each is
    wrapped, not replaced.
    """

    def __init__(self, *args: Any, mesh: Mesh | None = None, **kwargs: Any) -> None:
        given_mesh(mesh, "meshlib.Client")  # before httpx opens anything
        super().__init__(*args, **kwargs)
        _mesh_every_transport(self, lambda inner: MeshTransport(inner, mesh=mesh))
        self._cookies = _Cookies.sharing(self._cookies)

    def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: httpx._types.AuthTypes | httpx._client.UseClientDefault | None = (
            httpx.USE_CLIENT_DEFAULT
        ),
        follow_redirects: bool | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if stream:
            return super().send(request, stream=True, auth=auth, follow_redirects=follow_redirects)
        with _Reading(request.extensions):
            response = super().send(request, auth=auth, follow_redirects=follow_redirects)
        return _unbound(response)


class AsyncClient(_ClientMixin, httpx.AsyncClient):
    """An `httpx.AsyncClient` whose requests go through the mesh.

    As `Client`; without `transport=`, the default one is meshlib's HTTP/1.1 pool (it keeps
    throughput under concurrency), unless an option only httpx's own transport has is given
    (`http2`, `cert`). Proxies, from `proxy=` or the environment, go through httpx's transports.
    """

    def __init__(self, *args: Any, mesh: Mesh | None = None, **kwargs: Any) -> None:
        given_mesh(mesh, "meshlib.AsyncClient")  # before httpx opens anything
        super().__init__(*args, **kwargs)
        if kwargs.get("transport") is None:
            options = {"cert": kwargs["cert"]} if kwargs.get("cert") is not None else {}
            if kwargs.get("http1") is False:  # HTTP/2 only (prior knowledge): httpx's transport
                options["http1"] = False
            # httpx made its own default transport, unused yet (no connection, nothing to close)
            self._transport = _default_async_transport(
                verify=kwargs.get("verify", True),
                limits=kwargs.get("limits"),
                http2=kwargs.get("http2", False),
                trust_env=kwargs.get("trust_env", True),
                **options,
            )
        _mesh_every_transport(self, lambda inner: AsyncMeshTransport(inner, mesh=mesh))
        self._cookies = _Cookies.sharing(self._cookies)

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: httpx._types.AuthTypes | httpx._client.UseClientDefault | None = (
            httpx.USE_CLIENT_DEFAULT
        ),
        follow_redirects: bool | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if stream:
            return await super().send(
                request, stream=True, auth=auth, follow_redirects=follow_redirects
            )
        with _Reading(request.extensions):
            response = await super().send(request, auth=auth, follow_redirects=follow_redirects)
        return _unbound(response)
