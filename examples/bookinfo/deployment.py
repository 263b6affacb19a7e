"""What the demo runs: one process per bookinfo workload, its ports, command and environment.

Each workload is configured the way a Kubernetes Deployment would configure it: MESHLIB_*
variables (service, version, workload name, policy file, metrics port, the `end-user` header
to propagate, the console traces exporter), and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from examples.bookinfo.policy import Endpoint, write_atomically
from examples.bookinfo.scrape import Target
from examples.bookinfo.supervisor import Ports, Process

APPS = "examples.bookinfo.apps"
GUNICORN_CONF = Path(__file__).parent / "apps" / "gunicorn_conf.py"


@dataclass(frozen=True)
class Workload:
    service: str
    version: str
    env: Mapping[str, str] = field(default_factory=dict)  # the app's own settings

    @property
    def name(self) -> str:  # the Deployment's name, as in Istio's bookinfo: reviews-v2
        return f"{self.service}-{self.version}"


def bookinfo(flaky_rate: float) -> list[Workload]:
    return [
        Workload("productpage", "v1"),
        Workload("details", "v1"),
        Workload("reviews", "v1"),
        Workload("reviews", "v2"),
        Workload("reviews", "v3"),
        Workload("ratings", "v1"),
        Workload("ratings", "v2-flaky", {"RATINGS_FAILURE_RATE": str(flaky_rate)}),
    ]


@dataclass(frozen=True)
class Deployed:
    """A workload given its two loopback ports: the app's and meshlib's metrics port."""

    workload: Workload
    port: int
    metrics_port: int

    @property
    def name(self) -> str:
        return self.workload.name

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.workload.service, self.workload.version, self.port)

    @property
    def target(self) -> Target:
        w = self.workload
        return Target(self.name, w.service, w.version, self.metrics_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        address = f"127.0.0.1:{self.port}"
        if self.workload.service == "productpage":  # Flask under gunicorn, two workers
            conf = str(GUNICORN_CONF)
            return [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                conf,
                "-b",
                address,
                f"{APPS}.productpage:app",
            ]
        return [
            *(sys.executable, "-m", "uvicorn", f"{APPS}.{self.workload.service}:app"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--no-access-log", "--log-level", "warning"),
        ]

    def environment(self, workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if not k.startswith("MESHLIB_")}
        env.update(
            MESHLIB_SERVICE=self.workload.service,
            MESHLIB_VERSION=self.workload.version,
            MESHLIB_WORKLOAD=self.name,
            MESHLIB_POLICY=str(workdir / "mesh.yaml"),
            MESHLIB_METRICS_PORT=str(self.metrics_port),
            MESHLIB_METRICS_HOST="127.0.0.1",  # the demo's metrics stay on this machine
            MESHLIB_PROPAGATE_HEADERS="end-user",
            MESHLIB_TRACES_EXPORTER="console",  # spans as JSON on stdout: logs/<name>.log
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.workload.service == "productpage":  # gunicorn: one merged view of the workers
            env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "multiproc" / self.name)
        env.update(self.workload.env)
        return env

    def process(self, workdir: Path, base: Mapping[str, str] = os.environ) -> Process:
        return Process(
            name=self.name,
            command=self.command(),
            env=self.environment(workdir, base),
            log=workdir / "logs" / f"{self.name}.log",
        )


def deploy(workloads: Sequence[Workload], ports: Ports) -> list[Deployed]:
    """Give each workload two ports the OS picks (held by `ports` until the services bind)."""
    return [Deployed(w, ports.take(), ports.take()) for w in workloads]


def write_targets(path: Path, deployed: Sequence[Deployed]) -> None:
    """Prometheus file_sd targets: one per process, labelled app and version."""
    groups = [
        {
            "targets": [f"127.0.0.1:{d.metrics_port}"],
            "labels": {"app": d.workload.service, "version": d.workload.version},
        }
        for d in deployed
    ]
    write_atomically(path, json.dumps(groups, indent=2) + "\n")
