"""Policy edited while traffic flows: the split changes without a restart or a failed request."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path

import meshlib
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from tests.e2e.conftest import HOST, PORT, URL, virtual_service
from tests.upstream import Upstream, service_entry, subsets_rule


def policy(upstreams: dict[str, Upstream], v1: int, v2: int) -> str:
    split = virtual_service(
        f"""
        - route:
          - {{destination: {{host: reviews, subset: v1}}, weight: {v1}}}
          - {{destination: {{host: reviews, subset: v2}}, weight: {v2}}}
        """
    )
    return "---\n".join(
        [service_entry(HOST, PORT, upstreams), subsets_rule(HOST, ["v1", "v2", "v3"]), split]
    )


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(".mesh.yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_policy_edit_shifts_traffic_without_failures(
    tmp_path: Path, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """Moving the canary from 100/0 to 0/100 mid-run: within 2 s all traffic is on v2, none
    failed — for each of the three clients."""
    path = tmp_path / "mesh.yaml"
    path.write_text(policy(upstreams, 100, 0))
    mesh = Mesh(MeshConfig(service="productpage"), policy=path)
    seen: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def note(status: int, upstream: str | None) -> None:
        seen.append((time.monotonic(), status, upstream))

    async def async_traffic() -> None:
        async with meshlib.AsyncClient(mesh=mesh) as client:
            while not stop.is_set():
                response = await client.get(URL + "/")
                note(response.status_code, response.headers.get("x-upstream"))

    def traffic() -> None:
        if client_kind == "httpx-async":
            asyncio.run(async_traffic())
        elif client_kind == "requests":
            with meshlib.Session(mesh=mesh) as session:
                while not stop.is_set():
                    answer = session.get(URL + "/", timeout=30)
                    note(answer.status_code, answer.headers.get("x-upstream"))
        else:
            with meshlib.Client(mesh=mesh) as client:
                while not stop.is_set():
                    response = client.get(URL + "/")
                    note(response.status_code, response.headers.get("x-upstream"))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        started = time.monotonic()
        while len(seen) < 50:
            assert worker.is_alive() and time.monotonic() - started < 10, "no traffic went"
            time.sleep(0.01)
        edited_at = time.monotonic()
        write_atomically(path, policy(upstreams, 0, 100))
        while not any(t > edited_at and who == "v2" for t, _, who in seen):
            assert time.monotonic() - edited_at < 2.0, "the edit was not live within 2 s"
            time.sleep(0.01)
        switched_at = next(t for t, _, who in seen if t > edited_at and who == "v2")
        while sum(1 for t, _, _ in list(seen) if t > switched_at) < 30:  # traffic after it
            assert time.monotonic() - switched_at < 10, "traffic stopped after the switch"
            time.sleep(0.01)
    finally:
        stop.set()
        worker.join()
        mesh.close()
    assert Counter(status for _, status, _ in seen) == Counter({200: len(seen)})
    before = {who for t, _, who in seen if t < edited_at}
    after = {who for t, _, who in seen if t > switched_at}
    assert before == {"v1"}
    assert after == {"v2"}
