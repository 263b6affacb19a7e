"""gunicorn settings for productpage: two worker processes, one merged metrics view.

This is the recipe of docs/observability.md §4 (prometheus-client's multiprocess mode): each
worker writes its counts to PROMETHEUS_MULTIPROC_DIR (set by whoever starts gunicorn, before
anything imports prometheus_client), the directory is emptied when gunicorn starts, the master
serves the merged view of every worker on the metrics port, and a dead worker's live gauges
leave the view.

MESHLIB_METRICS_PORT names the metrics port, as for the single-process services; here the
master binds it, so the workers are told not to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

_raw_port = os.environ.get("MESHLIB_METRICS_PORT", "15020")
METRICS_PORT = None if _raw_port.lower() in ("off", "none", "disabled") else int(_raw_port)
os.environ["MESHLIB_METRICS_PORT"] = "off"  # the workers must not bind it themselves
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), "meshlib-productpage")
)

workers = 2
worker_class = "gthread"  # threads: a page waiting on a slow reviews call holds one thread
threads = 16
graceful_timeout = 3  # a demo stops quickly; requests in flight get this long to finish
accesslog = None  # meshlib's metrics (and its access log, when a Telemetry asks) say it all
control_socket_disable = True  # gunicorn >= 27 would otherwise make ~/.gunicorn/gunicorn.ctl


def on_starting(server: Any) -> None:
    """Start empty: files an earlier run left would be added to this run's counts."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def when_ready(server: Any) -> None:
    """In the master: /stats/prometheus (and /metrics) with every worker's numbers merged."""
    from meshlib.telemetry.metrics import serve_metrics

    if METRICS_PORT is not None:
        serve_metrics(METRICS_PORT, host="127.0.0.1")


def child_exit(server: Any, worker: Any) -> None:
    """A worker died: its live gauges leave the merged view (its counts stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
