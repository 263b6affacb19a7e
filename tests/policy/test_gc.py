"""Policy loads and compiles with the cyclic garbage collector paused, and restores it."""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from meshlib.config import MeshConfig
from meshlib.policy import _gc
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot

POLICY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"""


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    (gc.enable if enabled else gc.disable)()


def test_loading_and_building_pause_the_collector_and_restore_it() -> None:
    """While YAML is converted and while the Snapshot is built the collector is off (seen
    from inside: every call into the converter and into the Snapshot's own building code);
    after, it is on again and collects when asked."""
    seen: dict[str, set[bool]] = {"convert": set(), "snapshot": set()}

    def watch(frame: Any, event: str, arg: object) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code.co_name == "convert" and code.co_filename.endswith("_schema.py"):
            seen["convert"].add(gc.isenabled())
        elif code.co_filename.endswith("snapshot.py") and code.co_name != "build":
            seen["snapshot"].add(gc.isenabled())

    gc.enable()
    with _gc.collector_paused():
        assert not gc.isenabled()
        with _gc.collector_paused():  # nested: still paused on the way out
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    sys.setprofile(watch)
    try:
        result = load_text(POLICY, "t.yaml")
        Snapshot.build(result.resources, MeshConfig())
    finally:
        sys.setprofile(None)
    assert seen == {"convert": {False}, "snapshot": {False}}
    assert gc.isenabled()
    collected: list[str] = []
    gc.callbacks.append(lambda phase, info: collected.append(phase))
    try:
        gc.collect()
    finally:
        gc.callbacks.pop()
    assert collected == ["start", "stop"]  # the collector still runs when asked


def test_an_error_inside_restores_the_collector() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), _gc.collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_the_app_switched_off_stays_off() -> None:
    gc.disable()
    result = load_text(POLICY, "t.yaml")
    Snapshot.build(result.resources, MeshConfig())
    assert not gc.isenabled()


def test_concurrent_pauses_restore_once_the_last_ends() -> None:
    gc.enable()
    inside = threading.Barrier(2)
    first_out = threading.Event()
    states: list[bool] = []

    def first() -> None:
        with _gc.collector_paused():
            inside.wait()
        first_out.set()

    def second() -> None:
        with _gc.collector_paused():
            inside.wait()
            first_out.wait(10)
            states.append(gc.isenabled())  # the first has left; this one still holds it off

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert states == [False]
    assert gc.isenabled()


def test_lazy_input_is_read_before_the_pause() -> None:
    """A lazy source (pages from an API) is consumed before the collector pauses."""
    from meshlib.policy.loader import load_objects

    states: list[bool] = []

    def pages() -> Iterator[dict[str, object]]:
        states.append(gc.isenabled())
        yield {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "api"},
            "spec": {"hosts": ["api.internal"], "resolution": "DNS"},
        }
        states.append(gc.isenabled())

    gc.enable()
    assert len(load_objects(pages(), "api").resources) == 1
    assert states == [True, True]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_load_gets_its_collector_back() -> None:
    gc.enable()
    with _gc.collector_paused():
        pid = os.fork()
        if pid == 0:  # the child: exit status says what it saw
            os._exit(0 if gc.isenabled() and _gc._depth == 0 else 1)
        _, status = os.waitpid(pid, 0)
        assert not gc.isenabled()  # the parent's load goes on, paused
    assert os.waitstatus_to_exitcode(status) == 0
    assert gc.isenabled()
