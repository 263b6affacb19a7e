"""Mesh every httpx and requests client in the process, with one call.

    meshlib.instrument()     # idempotent; existing and future clients are meshed
    meshlib.uninstrument()   # back to stock behaviour

wrapt wraps the methods where httpx and requests hand a request to the network —
`httpx.HTTPTransport.handle_request`, `httpx.AsyncHTTPTransport.handle_async_request`,
`requests.adapters.HTTPAdapter.send` — so clients created before the call are meshed too,
and each client keeps its own connection pool, TLS and proxy settings. A meshlib client is
never meshed twice: meshlib's own transports mark the requests they send. A subclass that
overrides one of these methods runs once per call, not once per try: the mesh sends each try
through the stock method.

Another library's uninstrument may take meshlib's wrapper out with its own (OpenTelemetry's
unwraps the outermost wrapper of a method); `instrument()` again puts back what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import wrapt

from meshlib.clients._guard import inside_meshlib

if TYPE_CHECKING:
    from meshlib.mesh import Mesh


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Instrumented:
    """What one `instrument()` put in effect, published with one assignment and read once by
    each call: a call is meshed whole by the Mesh it read, or sent as stock, never between,
    however `uninstrument()` or `instrument()` in another thread overtakes it. A new one
    after `instrument(another_mesh)`, and whenever wrappers were put in place: each
    transport's facade is made anew under it (the method it sends through may now be
    another library's wrapper)."""

    mesh: Mesh | None  # None: the default Mesh


_lock = threading.Lock()  # instrument() and uninstrument()
_facade_lock = threading.Lock()  # making a facade
# "active": the _Instrumented in effect, or None. "closers": the transports' close methods
# are wrapped (they stay wrapped, see uninstrument).
_state: dict[str, Any] = {"active": None, "closers": False}
# On each meshed transport or adapter: (its facade, the _Instrumented it was made under), one
# value so that a call never reads one half of another call's update.
_FACADE = "_meshlib_facade"


class _Clients:
    """meshlib's client classes, imported by `instrument()`: importing this module (which
    `import meshlib` does) loads neither httpx nor requests."""

    MeshTransport: Any = None
    AsyncMeshTransport: Any = None
    MeshAdapter: Any = None
    pool_like: Any = None


def _targets() -> tuple[tuple[Any, str], ...]:
    """Where httpx and requests hand a request to the network."""
    import httpx
    import requests.adapters

    return (
        (httpx.HTTPTransport, "handle_request"),
        (httpx.AsyncHTTPTransport, "handle_async_request"),
        (requests.adapters.HTTPAdapter, "send"),
    )


def _closers() -> tuple[tuple[Any, str], ...]:
    """Where httpx transports are closed (a facade's pool for mirrored copies goes with them):
    `close()`, and the end of a `with` block, which closes the pool without calling it; and
    requests adapters (`Session.close()` closes each), whose facades' copies stop with them."""
    import httpx
    import requests.adapters

    return (
        (httpx.HTTPTransport, "close"),
        (httpx.HTTPTransport, "__exit__"),
        (httpx.AsyncHTTPTransport, "aclose"),
        (httpx.AsyncHTTPTransport, "__aexit__"),
        (requests.adapters.HTTPAdapter, "close"),
    )


def _facade(instance: Any, active: _Instrumented, make: Callable[[Mesh | None], Any]) -> Any:
    """The meshing wrapper of one stock transport or adapter under `active`, made by
    `make(mesh)` on first use: once, though the first calls of several clients sharing the
    transport race (another would have a pool for mirrored copies nothing closes)."""
    made = instance.__dict__.get(_FACADE)
    if made is not None and made[1] is active:
        return made[0]
    with _facade_lock:
        made = instance.__dict__.get(_FACADE)
        if made is not None and made[1] is active:
            return made[0]  # another thread's first call made it meanwhile
        facade = make(active.mesh)
        if made is not None and hasattr(facade, "adopt_mirrors"):
            # Closing the transport reaches only the latest facade: it takes over the earlier
            # one's copies and their pool (httpx: and its count of closes, for calls in flight)
            facade.adopt_mirrors(made[0])
        instance.__dict__[_FACADE] = (facade, active)
        return facade


def _made(instance: Any) -> Any:
    """The facade made for `instance`, or None."""
    made = instance.__dict__.get(_FACADE)
    return None if made is None else made[0]


class _Stock:
    """What a facade sends each try through: the stock method of its transport or adapter.

    Not the instance's own method: a subclass overriding it (a signing adapter, say) ran
    already — its call to the stock method is what brought the request to the mesh — and
    must not run again for every try.
    """

    def __init__(self, instance: Any, stock: Any) -> None:
        self._instance = instance
        self.handle_request = self.handle_async_request = self.send = stock

    def sibling(self) -> Any:
        """For mirrored copies: a transport like the stock one with a pool of its own, or
        None (see `meshlib.clients._httpx_pools.pool_like`). Its sends pass as stock: copies are
        sent from inside meshlib."""
        return _Clients.pool_like(self._instance)

    def close(self) -> None:
        self._instance.close()

    async def aclose(self) -> None:
        await self._instance.aclose()


def _in_effect() -> _Instrumented | None:
    """What a call is meshed under, read once and first; None to send it as stock: after
    `uninstrument()` (which may leave a wrapper in place under another library's, see
    there), and inside meshlib (a facade's own try)."""
    active: _Instrumented | None = _state["active"]
    if active is None or inside_meshlib():
        return None
    return active


def _httpx_sync(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    active = _in_effect()
    if active is None:
        return wrapped(*args, **kwargs)
    facade = _facade(
        instance,
        active,
        lambda mesh: _Clients.MeshTransport(_Stock(instance, wrapped), mesh=mesh),
    )
    return facade.handle_request(*args, **kwargs)


async def _httpx_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    active = _in_effect()
    if active is None:
        return await wrapped(*args, **kwargs)
    facade = _facade(
        instance,
        active,
        lambda mesh: _Clients.AsyncMeshTransport(_Stock(instance, wrapped), mesh=mesh),
    )
    return await facade.handle_async_request(*args, **kwargs)


def _requests_send(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    active = _in_effect()
    if active is None or isinstance(instance, _Clients.MeshAdapter):
        return wrapped(*args, **kwargs)
    facade = _facade(
        instance,
        active,
        lambda mesh: _Clients.MeshAdapter(mesh=mesh, inner=_Stock(instance, wrapped)),
    )
    return facade.send(*args, **kwargs)


def _httpx_close(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """Closing a stock transport also closes its facade's pool for mirrored copies (once the
    copies in flight on it end; a copy still queued goes on a pool of its own), and makes a
    call it has in flight fail as the app's doing, as `MeshTransport.close()` does: not sent
    again through the closed pool (it would open a connection nobody closes)."""
    facade = _made(instance)
    if facade is not None:
        facade.closing()
        facade.close_mirrors()
    return wrapped(*args, **kwargs)


async def _httpx_aclose(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    facade = _made(instance)
    if facade is not None:
        facade.closing()
        await facade.aclose_mirrors()
    return await wrapped(*args, **kwargs)


def _requests_close(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """Closing a stock adapter counts a close for its facade's copies, as
    `MeshAdapter.close()` does: none is waited for or dropped, and one sent after the close,
    through a pool opened anew, goes on a connection closed after it."""
    facade = _made(instance)
    if facade is not None:
        facade.close_mirrors()
    return wrapped(*args, **kwargs)


_WRAPPERS = (_httpx_sync, _httpx_async, _requests_send)
_CLOSE_WRAPPERS = (_httpx_close, _httpx_close, _httpx_aclose, _httpx_aclose, _requests_close)


def instrument(mesh: Mesh | None = None) -> None:
    """Mesh every httpx and requests client (idempotent). `mesh` defaults to the default Mesh."""
    from meshlib.mesh import given_mesh

    given_mesh(mesh, "meshlib.instrument")
    from meshlib.clients._httpx_pools import pool_like
    from meshlib.clients._httpx_transport import AsyncMeshTransport, MeshTransport
    from meshlib.clients.requests import MeshAdapter

    _Clients.MeshTransport, _Clients.AsyncMeshTransport = MeshTransport, AsyncMeshTransport
    _Clients.pool_like = pool_like
    _Clients.MeshAdapter = MeshAdapter
    with _lock:
        active = _state["active"]
        wrapped = False
        for (owner, name), wrapper in zip(_targets(), _WRAPPERS, strict=True):
            # Once in effect, only where meshlib's wrapper went missing: another library's
            # uninstrument may have taken it out (OpenTelemetry's unwraps the outermost
            # wrapper of a method, whoever's it is).
            if active is None or not _meshed(owner, name):
                wrapt.wrap_function_wrapper(owner, name, wrapper)
                wrapped = True
        if not _state["closers"]:
            for (owner, name), wrapper in zip(_closers(), _CLOSE_WRAPPERS, strict=True):
                wrapt.wrap_function_wrapper(owner, name, wrapper)
            _state["closers"] = True
        if wrapped or active is None or active.mesh is not mesh:
            # last: the wrappers are in place, each sending as stock until this is read
            _state["active"] = _Instrumented(mesh)


def uninstrument() -> None:
    """Undo `instrument()`; clients send requests as stock httpx and requests do.

    Closing a transport meshed before still closes the pool its facade made for mirrored
    copies, and closing an adapter still counts the close its queued copies check: those
    wrappers of `close` / `aclose` stay (they do nothing for other transports), as a client is
    often closed after `uninstrument()`."""
    with _lock:
        if _state["active"] is None:
            return
        # First: a call from now on is sent as stock (a call that read it before is meshed
        # whole), whether or not its wrapper can be taken out.
        _state["active"] = None
        for owner, name in _targets():
            _unwrap(owner, name)


def _unwrap(owner: Any, name: str) -> None:
    """Take meshlib's wrapper out of `owner.name`, wherever it is in a chain of wrapt
    wrappers: another library (OpenTelemetry's instrumentations, say) may have wrapped the
    same method after `instrument()`, and its wrapper stays. If meshlib's cannot be taken out
    of the chain, it stays in place and sends as stock (`_in_effect`)."""
    outer: Any = None
    layer = owner.__dict__[name]
    while getattr(layer, "_self_wrapper", None) is not None:
        inner = layer.__wrapped__
        if layer._self_wrapper in _WRAPPERS:
            if outer is None:
                setattr(owner, name, inner)
            else:
                with contextlib.suppress(AttributeError, TypeError):
                    outer.__wrapped__ = inner
            return
        outer, layer = layer, inner


def _meshed(owner: Any, name: str) -> bool:
    """Whether meshlib's wrapper is in the chain of wrapt wrappers of `owner.name`."""
    layer = owner.__dict__.get(name)
    while getattr(layer, "_self_wrapper", None) is not None:
        if layer._self_wrapper in _WRAPPERS:
            return True
        layer = layer.__wrapped__
    return False


def is_instrumented() -> bool:
    """Whether `instrument()` is in effect: False too where another library took meshlib's
    wrappers out (calling `instrument()` again puts them back)."""
    with _lock:
        in_effect = _state["active"] is not None
        return in_effect and all(_meshed(*target) for target in _targets())
