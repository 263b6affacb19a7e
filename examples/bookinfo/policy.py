"""The demo's policy: scenarios from scenarios/*.yaml, and mesh.yaml written from them.

mesh.yaml = ServiceEntries (where each workload listens: loopback, the ports the OS gave)
          + mesh/*.yaml (DestinationRule subsets, Telemetry)
          + scenarios/00-all-v1.yaml, with the current scenario's resources replacing those
            of the same kind and name (what `kubectl apply` of both files would leave).

Every service watches mesh.yaml; it is replaced atomically (a temporary file, then
os.replace), so a service never reads half a file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
SCENARIOS = HERE / "scenarios"
STATIC = HERE / "mesh"
MESH_PORT = 9080  # the port every bookinfo service has in the mesh (http://reviews:9080)

Resource = dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    """One scenarios/NN-name.yaml file: its title and hint come from its leading comment."""

    name: str  # "reviews-90-10"
    title: str  # "Canary: reviews v1 90%, v2 10%"
    hint: str  # the "Look for:" sentence
    path: Path
    resources: tuple[Resource, ...]

    @property
    def longest_delay(self) -> float:
        """The longest fault delay of its routes, in seconds (calls it delays end this late)."""
        delays = [
            _seconds(str(route["fault"]["delay"].get("fixedDelay", "0s")))
            for resource in self.resources
            if resource.get("kind") == "VirtualService"
            for route in resource.get("spec", {}).get("http") or []
            if (route.get("fault") or {}).get("delay")
        ]
        return max(delays, default=0.0)


def _seconds(duration: str) -> float:
    """An Istio duration ("2s", "500ms", "1m") in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration.strip())
    if match is None:
        raise ValueError(f"not a duration: {duration!r}")
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match[2]]


@dataclass(frozen=True)
class Endpoint:
    """A workload's address in the mesh: the service it belongs to, its version, its port."""

    service: str
    version: str
    port: int


def load_scenarios(folder: Path = SCENARIOS) -> list[Scenario]:
    """The scenarios in file-name order (the first one is the base the others build on)."""
    return [_load_scenario(path) for path in sorted(folder.glob("*.yaml"))]


def _load_scenario(path: Path) -> Scenario:
    text = path.read_text()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    title = comment[0] if comment else path.stem
    hint_lines: list[str] = []
    for line in comment:
        if line.startswith("Look for:") or (hint_lines and line):
            hint_lines.append(line)
        elif hint_lines:
            break
    hint = " ".join(hint_lines).removeprefix("Look for:").strip()
    name = path.stem.split("-", 1)[1] if path.stem[:2].isdigit() else path.stem
    resources = tuple(doc for doc in yaml.safe_load_all(text) if doc)
    return Scenario(name, title, hint, path, resources)


def service_entries(endpoints: Iterable[Endpoint], namespace: str = "default") -> list[Resource]:
    """One ServiceEntry per service: its workloads on 127.0.0.1, labelled app and version."""
    by_service: dict[str, list[Endpoint]] = {}
    for endpoint in endpoints:
        by_service.setdefault(endpoint.service, []).append(endpoint)
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": service, "namespace": namespace},
            "spec": {
                "hosts": [f"{service}.{namespace}.svc.cluster.local"],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "ports": [{"number": MESH_PORT, "name": "http", "protocol": "HTTP"}],
                "endpoints": [
                    {
                        "address": "127.0.0.1",
                        "ports": {"http": e.port},
                        "labels": {"app": service, "version": e.version},
                    }
                    for e in members
                ],
            },
        }
        for service, members in by_service.items()
    ]


def _key(resource: Resource) -> tuple[str, str, str]:
    metadata = resource.get("metadata") or {}
    return resource["kind"], metadata.get("namespace", ""), metadata["name"]


def overlay(base: Sequence[Resource], top: Sequence[Resource]) -> list[Resource]:
    """`base` with each resource of `top` replacing the one of the same kind and name."""
    replaced = {_key(r): r for r in top}
    merged = [replaced.pop(_key(r), r) for r in base]
    return merged + list(replaced.values())


def static_resources(folder: Path = STATIC) -> list[Resource]:
    return [
        doc
        for path in sorted(folder.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def render(endpoints: Iterable[Endpoint], base: Scenario, scenario: Scenario) -> str:
    """The text of mesh.yaml for `scenario` applied on top of `base`."""
    resources = [
        *service_entries(endpoints),
        *static_resources(),
        *overlay(base.resources, scenario.resources),
    ]
    header = (
        "# Written by examples/bookinfo/demo.py: the demo rewrites this file at every scenario.\n"
        f"# Scenario: {scenario.name} ({scenario.title})\n"
    )
    return header + yaml.safe_dump_all(resources, sort_keys=False, default_flow_style=None)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; Prometheus may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
