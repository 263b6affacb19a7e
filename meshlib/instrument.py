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
import threading
from typing import TYPE_CHECKING, Any

import wrapt

from meshlib.clients._guard import inside_meshlib

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_lock = threading.Lock()
# "closers": the transports' close methods are wrapped (they stay wrapped, see uninstrument)
_state: dict[str, Any] = {"mesh": None, "patched": False, "closers": False, "generation": 0}
_FACADE = "_meshlib_facade"
_GENERATION = "_meshlib_facade_generation"  # the instrument() its facade was made under


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
    `close()`, and the end of a `with` block, which closes the pool without calling it."""
    import httpx

    return (
        (httpx.HTTPTransport, "close"),
        (httpx.HTTPTransport, "__exit__"),
        (httpx.AsyncHTTPTransport, "aclose"),
        (httpx.AsyncHTTPTransport, "__aexit__"),
    )


def _facade(instance: Any, make: Any) -> Any:
    """The meshing wrapper of one stock transport or adapter, for the Mesh instrumented now
    (made anew after `instrument(another_mesh)`, and after `uninstrument()` and `instrument()`
    again: the method it sends through may now be another library's wrapper)."""
    state = instance.__dict__
    facade = state.get(_FACADE)
    generation = _state["generation"]
    if facade is None or facade._mesh is not _state["mesh"] or state.get(_GENERATION) != generation:
        earlier, facade = facade, make()
        if earlier is not None and hasattr(facade, "adopt_mirrors"):
            facade.adopt_mirrors(earlier)  # the earlier pool for copies is closed with it
        state[_FACADE] = facade
        state[_GENERATION] = generation
    return facade


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
        None (see `meshlib.clients.httpx.pool_like`). Its sends pass as stock: copies are
        sent from inside meshlib."""
        return _Clients.pool_like(self._instance)

    def close(self) -> None:
        self._instance.close()

    async def aclose(self) -> None:
        await self._instance.aclose()


def _bypass() -> bool:
    """Send as stock: inside meshlib (a facade's own try), or after `uninstrument()` left a
    wrapper in place under another library's (see there)."""
    return not _state["patched"] or inside_meshlib()


def _httpx_sync(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if _bypass():
        return wrapped(*args, **kwargs)
    facade = _facade(
        instance, lambda: _Clients.MeshTransport(_Stock(instance, wrapped), mesh=_state["mesh"])
    )
    return facade.handle_request(*args, **kwargs)


async def _httpx_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if _bypass():
        return await wrapped(*args, **kwargs)
    facade = _facade(
        instance,
        lambda: _Clients.AsyncMeshTransport(_Stock(instance, wrapped), mesh=_state["mesh"]),
    )
    return await facade.handle_async_request(*args, **kwargs)


def _requests_send(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if _bypass() or isinstance(instance, _Clients.MeshAdapter):
        return wrapped(*args, **kwargs)
    facade = _facade(
        instance,
        lambda: _Clients.MeshAdapter(mesh=_state["mesh"], inner=_Stock(instance, wrapped)),
    )
    return facade.send(*args, **kwargs)


def _httpx_close(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """Closing a stock transport closes its facade's pool for mirrored copies too, and makes
    a call it has in flight fail as the app's doing, as `MeshTransport.close()` does: not
    sent again through the closed pool (it would open a connection nobody closes)."""
    facade = instance.__dict__.get(_FACADE)
    if facade is not None:
        facade.closing()
        facade.close_mirrors()
    return wrapped(*args, **kwargs)


async def _httpx_aclose(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    facade = instance.__dict__.get(_FACADE)
    if facade is not None:
        facade.closing()
        await facade.aclose_mirrors()
    return await wrapped(*args, **kwargs)


_WRAPPERS = (_httpx_sync, _httpx_async, _requests_send)
_CLOSE_WRAPPERS = (_httpx_close, _httpx_close, _httpx_aclose, _httpx_aclose)


def instrument(mesh: Mesh | None = None) -> None:
    """Mesh every httpx and requests client (idempotent). `mesh` defaults to the default Mesh."""
    from meshlib.clients.httpx import AsyncMeshTransport, MeshTransport, pool_like
    from meshlib.clients.requests import MeshAdapter

    _Clients.MeshTransport, _Clients.AsyncMeshTransport = MeshTransport, AsyncMeshTransport
    _Clients.pool_like = pool_like
    _Clients.MeshAdapter = MeshAdapter
    with _lock:
        _state["mesh"] = mesh
        wrapped = False
        for (owner, name), wrapper in zip(_targets(), _WRAPPERS, strict=True):
            # Once patched, only where meshlib's wrapper went missing: another library's
            # uninstrument may have taken it out (OpenTelemetry's unwraps the outermost
            # wrapper of a method, whoever's it is).
            if not (_state["patched"] and _meshed(owner, name)):
                wrapt.wrap_function_wrapper(owner, name, wrapper)
                wrapped = True
        if not wrapped:
            return
        if not _state["closers"]:
            for (owner, name), wrapper in zip(_closers(), _CLOSE_WRAPPERS, strict=True):
                wrapt.wrap_function_wrapper(owner, name, wrapper)
            _state["closers"] = True
        _state["patched"] = True
        _state["generation"] += 1


def uninstrument() -> None:
    """Undo `instrument()`; clients send requests as stock httpx and requests do.

    Closing a transport meshed before still closes the pool its facade made for mirrored
    copies: that wrapper of `close` / `aclose` stays (it does nothing for other transports),
    as a client is often closed after `uninstrument()`."""
    with _lock:
        if not _state["patched"]:
            return
        for owner, name in _targets():
            _unwrap(owner, name)
        _state["patched"] = False
        _state["mesh"] = None


def _unwrap(owner: Any, name: str) -> None:
    """Take meshlib's wrapper out of `owner.name`, wherever it is in a chain of wrapt
    wrappers: another library (OpenTelemetry's instrumentations, say) may have wrapped the
    same method after `instrument()`, and its wrapper stays. If meshlib's cannot be taken out
    of the chain, it stays in place and sends as stock (`_bypass`)."""
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
        return bool(_state["patched"]) and all(_meshed(*target) for target in _targets())
