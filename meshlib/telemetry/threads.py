"""Make the request context follow work into other threads.

The request being served travels in `contextvars` (`meshlib.telemetry.propagation.current`,
the OpenTelemetry context, `meshlib.dataplane.deadline.inbound_deadline`). Where Python
copies the context, it follows on its own:

- asyncio tasks copy the context at creation (`asyncio.create_task`, `gather`, TaskGroup);
- `asyncio.to_thread` copies it explicitly, and so does Starlette's threadpool
  (`run_in_threadpool` is `anyio.to_thread.run_sync`, which runs the call in a copy).

Where it does not, it is lost — the call runs in the worker thread's own context, with no
inbound request, so trace, x-request-id, `end-user` and the deadline are not sent on:

- `concurrent.futures.ThreadPoolExecutor.submit` (and `map`, which calls it) hands the
  callable to a long-lived worker thread as is: the pool does not copy contextvars. This
  also covers `loop.run_in_executor`, which calls `executor.submit` with no copy (asyncio's
  default executor is a ThreadPoolExecutor).
- `threading.Thread` starts in an empty context (before Python 3.14's
  `thread_inherit_context`).

`install()` fixes both with wrapt: `ThreadPoolExecutor.submit` runs each callable with the
submitter's request context current, and `threading.Thread.start` captures the starter's
and makes it current in the new thread before its `run()`. Only the request context travels
(`_request_context.capture()`: the request, its deadline, the OpenTelemetry context): every other
context variable behaves as the stdlib has it — a pool's tasks see what the pool's
`initializer` set, `decimal`'s context stays per thread — and work submitted outside any
request runs exactly as without meshlib. A pool task's request context is undone when the
task ends, so the worker keeps nothing of it for the next; what a task sets in it does not
leak back to the submitter.

Caveat: a thread started while a request is served keeps that request's context for its whole
life. The pool's own worker threads are exempt (each task brings its context), and so are
the threads of multiprocessing's `ThreadPool` (`multiprocessing.pool`, `multiprocessing.dummy`),
whose tasks bring theirs too (`apply_async`, `map`, `imap` and the rest; its result callbacks
run on its handler thread, in no request's context); but a long-lived worker that the app or a
library starts lazily inside a request would keep sending that request's headers and deadline;
start such a thread with `contextvars.Context().run(t.start)` to give it an empty context. A
thread given an explicit `context=` (Python 3.14) keeps it.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread
import functools
import importlib
import threading
from types import ModuleType
from typing import Any

import wrapt

from meshlib.telemetry._request_context import capture, run_in

__all__ = ["install", "is_installed", "uninstall"]

_lock = threading.Lock()
_state = {"active": False}
# The pool's worker loop: its threads take each task's context from `submit`, not `start`.
_POOL_WORKER = getattr(concurrent.futures.thread, "_worker", None)
# multiprocessing's ThreadPool (`multiprocessing.pool`, `multiprocessing.dummy`) starts its
# workers and its task and result handlers when it is made: one made inside a request would
# run every later task, and every result callback, in that request's context.
_POOL_MODULE = "multiprocessing.pool"


def _pool_thread(target: object) -> bool:
    """Whether a thread running `target` is a pool's own, serving work from any request."""
    if target is None:
        return False
    return target is _POOL_WORKER or getattr(target, "__module__", None) == _POOL_MODULE


def _submit(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if not _state["active"] or not args:
        return wrapped(*args, **kwargs)
    captured = capture()
    if captured is None:
        return wrapped(*args, **kwargs)
    return wrapped(run_in, captured, *args, **kwargs)


def _pool_task(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """A ThreadPool task (`func`, the first argument) runs in its submitter's context. The
    method called is Pool's as it is now, not as it was when this wrapper was put on
    ThreadPool: a wrapper another library puts on Pool later is not bypassed."""
    if _pools and instance is not None:
        wrapped = getattr(super(_pools[0], instance), wrapped.__name__, wrapped)
    if not _state["active"]:
        return wrapped(*args, **kwargs)
    captured = capture()
    if captured is None:
        return wrapped(*args, **kwargs)
    if args:
        args = (functools.partial(run_in, captured, args[0]), *args[1:])
    elif "func" in kwargs:
        kwargs = {**kwargs, "func": functools.partial(run_in, captured, kwargs["func"])}
    return wrapped(*args, **kwargs)


# Where ThreadPool takes tasks: `apply` and `starmap*` go through these too. Wrapped on
# ThreadPool only: a process Pool pickles its tasks, and runs them where no context follows.
_POOL_ENTRIES = ("apply_async", "_map_async", "imap", "imap_unordered")


def _start(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if (
        not _state["active"]
        or getattr(instance, "_context", None) is not None  # 3.14: an explicit context=
        or _pool_thread(getattr(instance, "_target", None))
        or not hasattr(instance, "__dict__")
    ):
        return wrapped(*args, **kwargs)
    captured = capture()
    if captured is None:
        return wrapped(*args, **kwargs)
    own = instance.__dict__.get("run")  # an instance-level run(), rare
    run = instance.run

    def run_in_context() -> None:
        try:
            run_in(captured, run)
        finally:  # drop the captured context with the thread's work, not with the object
            _restore_run(instance, own)

    instance.run = run_in_context
    try:
        return wrapped(*args, **kwargs)
    except BaseException:
        _restore_run(instance, own)
        raise


def _restore_run(instance: Any, own: Any) -> None:
    if own is None:
        instance.__dict__.pop("run", None)
    else:
        instance.run = own


_TARGETS = (
    (concurrent.futures.ThreadPoolExecutor, "submit", _submit),
    (threading.Thread, "start", _start),
)


def _ours_in_chain(owner: type, name: str, wrapper: Any) -> bool:
    method = owner.__dict__.get(name)
    while method is not None:
        if isinstance(method, wrapt.FunctionWrapper) and method._self_wrapper is wrapper:
            return True
        method = getattr(method, "__wrapped__", None)
    return False


def _targets() -> list[tuple[type, str, Any]]:
    targets: list[tuple[type, str, Any]] = list(_TARGETS)
    if _pools:  # multiprocessing.pool was imported (imported here it is not: see install)
        targets.extend((_pools[0], name, _pool_task) for name in _POOL_ENTRIES)
    return targets


_pools: list[type] = []  # multiprocessing.pool.ThreadPool, once the app imported that module


def _pool_imported(module: ModuleType) -> None:
    """multiprocessing.pool was imported: wrap ThreadPool's entries if installed (the module
    costs an import and a bigger heap to every process, so it is not imported for this)."""
    # The hook runs at once when the module is in sys.modules, which it is while another
    # thread still runs it: import_module waits for that import to end.
    module = importlib.import_module(module.__name__)
    with _lock:
        if not _pools:
            _pools.append(module.ThreadPool)
        if _state["active"]:
            _wrap(_targets())


_inherited: set[tuple[type, str]] = set()  # wrapped where the class had no method of its own


def _wrap(targets: list[tuple[type, str, Any]]) -> None:
    for owner, name, wrapper in targets:
        if not _ours_in_chain(owner, name, wrapper):
            if name not in owner.__dict__:
                _inherited.add((owner, name))  # ThreadPool's, which are Pool's
            wrapt.wrap_function_wrapper(owner, name, wrapper)


_hooked = False


def install() -> None:
    """Make contextvars follow work into threads and thread pools (idempotent)."""
    global _hooked
    with _lock:
        _wrap(_targets())
        _state["active"] = True
        hook, _hooked = not _hooked, True
    if hook:  # runs now if already imported, so outside the lock, which the hook takes
        wrapt.register_post_import_hook(_pool_imported, "multiprocessing.pool")


def uninstall() -> None:
    """Undo `install()` (idempotent). A wrapper another library put over ours stays in place,
    and ours then passes calls through untouched."""
    with _lock:
        _state["active"] = False
        for owner, name, wrapper in _targets():
            method = owner.__dict__.get(name)
            if isinstance(method, wrapt.FunctionWrapper) and method._self_wrapper is wrapper:
                if (owner, name) in _inherited:
                    _inherited.discard((owner, name))
                    delattr(owner, name)  # inherited again, as the base has it now
                else:
                    setattr(owner, name, method.__wrapped__)


def is_installed() -> bool:
    return _state["active"]
