"""Callers cannot flood the app's log through OpenTelemetry's baggage propagator, which logs
a warning quoting each malformed list-member of a `baggage` header it extracts (up to 180 a
header): meshlib lets one such warning a minute through (meshlib/telemetry/log_limit.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.config import MeshConfig
from meshlib.telemetry.log_limit import BAGGAGE_LOGGER, OnePerInterval
from tests.upstream import AsgiServer


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord(BAGGAGE_LOGGER, logging.WARNING, __file__, 1, message, (), None)


def test_one_record_per_interval_passes_telling_how_many_were_held() -> None:
    """Within an interval one record passes; the first after it says how many were held back
    since, and one after a quiet interval says nothing more."""
    now = [100.0]
    limit = OnePerInterval(interval=60.0, clock=lambda: now[0])
    assert limit.filter(record("first"))
    assert [limit.filter(record(f"held {i}")) for i in range(5)] == [False] * 5
    now[0] += 59.9
    assert not limit.filter(record("still within the minute"))
    now[0] += 0.2
    passed = record("next")
    assert limit.filter(passed)
    assert passed.getMessage() == "next (6 more held back since the last one logged)"
    now[0] += 60.0
    quiet = record("after a quiet minute")
    assert limit.filter(quiet) and quiet.getMessage() == "after a quiet minute"


def test_malformed_baggage_from_callers_logs_at_most_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 served requests, each with a baggage header of 150 malformed members and one
    good one: the good member reaches the app every time, and OpenTelemetry's warnings about
    the others come to at most one line (15,000 before)."""
    mesh = meshlib.Mesh(MeshConfig(service="ratings", metrics_port=None), watch=False)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        from opentelemetry import baggage

        body = json.dumps(dict(baggage.get_all())).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    bad = ",".join(["no-equals-sign"] * 150 + ["user=alice"])
    server = AsgiServer(meshlib.MeshMiddleware(app, mesh=mesh)).start()
    try:
        with (
            caplog.at_level(logging.WARNING, logger=BAGGAGE_LOGGER),
            httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            answers = [client.get("/", headers={"baggage": bad}).json() for _ in range(100)]
    finally:
        server.stop()
        mesh.close()
    assert answers == [{"user": "alice"}] * 100
    assert len([r for r in caplog.records if r.name == BAGGAGE_LOGGER]) <= 1
