"""Mesh every httpx and requests client in the process, with one call.

    meshlib.instrument()     # idempotent; existing and future clients are meshed
    meshlib.uninstrument()   # back to stock behaviour

wrapt wraps the methods where httpx and requests hand a request to the network —
`httpx.HTTPTransport.handle_request`, `httpx.AsyncHTTPTransport.handle_async_request`,
`requests.adapters.HTTPAdapter.send` — so clients created before the call are meshed too,
and each client keeps its own connection pool, TLS and proxy settings. A meshlib client is
never meshed twice: meshlib's own transports mark the requests they send.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import wrapt

from meshlib.clients._guard import inside_meshlib

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_lock = threading.Lock()
_state: dict[str, Any] = {"mesh": None, "patched": False}
_FACADE = "_meshlib_facade"


class _Clients:
    """meshlib's client classes, imported by `instrument()`: importing this module (which
    `import meshlib` does) loads neither httpx nor requests."""

    MeshTransport: Any = None
    AsyncMeshTransport: Any = None
    MeshAdapter: Any = None


def _targets() -> tuple[tuple[Any, str], ...]:
    """Where httpx and requests hand a request to the network."""
    import httpx
    import requests.adapters

    return (
        (httpx.HTTPTransport, "handle_request"),
        (httpx.AsyncHTTPTransport, "handle_async_request"),
        (requests.adapters.HTTPAdapter, "send"),
    )


def _facade(instance: Any, make: Any) -> Any:
    """The meshing wrapper of one stock transport or adapter, for the Mesh instrumented now
    (made anew after `instrument(another_mesh)`)."""
    facade = instance.__dict__.get(_FACADE)
    if facade is None or facade._mesh is not _state["mesh"]:
        facade = instance.__dict__[_FACADE] = make()
    return facade


def _httpx_sync(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if inside_meshlib():
        return wrapped(*args, **kwargs)
    facade = _facade(instance, lambda: _Clients.MeshTransport(instance, mesh=_state["mesh"]))
    return facade.handle_request(*args, **kwargs)


async def _httpx_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if inside_meshlib():
        return await wrapped(*args, **kwargs)
    facade = _facade(instance, lambda: _Clients.AsyncMeshTransport(instance, mesh=_state["mesh"]))
    return await facade.handle_async_request(*args, **kwargs)


def _requests_send(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if inside_meshlib() or isinstance(instance, _Clients.MeshAdapter):
        return wrapped(*args, **kwargs)
    facade = _facade(instance, lambda: _Clients.MeshAdapter(mesh=_state["mesh"], inner=instance))
    return facade.send(*args, **kwargs)


_WRAPPERS = (_httpx_sync, _httpx_async, _requests_send)


def instrument(mesh: Mesh | None = None) -> None:
    """Mesh every httpx and requests client (idempotent). `mesh` defaults to the default Mesh."""
    from meshlib.clients.httpx import AsyncMeshTransport, MeshTransport
    from meshlib.clients.requests import MeshAdapter

    _Clients.MeshTransport, _Clients.AsyncMeshTransport = MeshTransport, AsyncMeshTransport
    _Clients.MeshAdapter = MeshAdapter
    with _lock:
        _state["mesh"] = mesh
        if _state["patched"]:
            return
        for (owner, name), wrapper in zip(_targets(), _WRAPPERS, strict=True):
            wrapt.wrap_function_wrapper(owner, name, wrapper)
        _state["patched"] = True


def uninstrument() -> None:
    """Undo `instrument()`; clients send requests as stock httpx and requests do."""
    with _lock:
        if not _state["patched"]:
            return
        for owner, name in _targets():
            method = owner.__dict__[name]
            setattr(owner, name, getattr(method, "__wrapped__", method))
        _state["patched"] = False
        _state["mesh"] = None


def is_instrumented() -> bool:
    return bool(_state["patched"])
