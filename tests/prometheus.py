"""A real Prometheus server for tests: the `prometheus` binary on loopback, scraping given ports.

The binary comes from the Debian package `prometheus` (`make test` installs it when it can);
`AVAILABLE` tells whether it is on PATH, so tests can skip with `SKIP_REASON`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

BINARY = shutil.which("prometheus")
AVAILABLE = BINARY is not None
SKIP_REASON = (
    "needs the prometheus binary from the Debian package `prometheus` "
    "(`make test` installs it as root; or apt-get install prometheus)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """Prometheus scraping `targets` ({job: "host:port"}) every `interval` seconds.

    Use as a context manager: starts the process, waits for /-/ready, and stops it on exit.
    """

    def __init__(self, workdir: Path, targets: dict[str, str], interval: float = 1.0) -> None:
        assert BINARY is not None, SKIP_REASON
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = "\n".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['{target}']}}]"
            for job, target in targets.items()
        )
        self.config = workdir / "prometheus.yml"
        every = f"{round(interval * 1000)}ms"
        self.config.write_text(
            f"global:\n  scrape_interval: {every}\n  scrape_timeout: {every}\n"
            f"  evaluation_interval: {every}\nscrape_configs:\n{jobs}\n"
        )
        self.log = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def start(self, timeout: float = 30) -> Prometheus:
        assert BINARY is not None
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    BINARY,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(self.process, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:  # poll readiness
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited ({process.returncode}):\n{self.logs()}")
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def wait_for_targets(self, jobs: int, timeout: float = 20) -> None:
        """Poll until `jobs` targets were scraped successfully (the first scrape comes only
        after the scrape manager's first reload, about 5 s after readiness)."""
        deadline = time.monotonic() + timeout
        while len(self.query("up == 1")) < jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"targets not up after {timeout}s: {self.query('up')}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        self.http.close()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (at `at`, a Unix time, or now): the result vector."""
        params: dict[str, str] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = self.http.get("/api/v1/query", params=params)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        assert body["data"]["resultType"] == "vector", (expr, body)
        return list(body["data"]["result"])

    def scalar(self, expr: str, at: float | None = None) -> float:
        """The value of a query that must answer exactly one sample."""
        result = self.query(expr, at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def series(self, match: str) -> list[dict[str, str]]:
        response = self.http.get("/api/v1/series", params={"match[]": match})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (match, body)
        return list(body["data"])
