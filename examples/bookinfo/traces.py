"""The trace check: one request with a sampled W3C traceparent, found again in every service.

The services run with MESHLIB_TRACES_EXPORTER=console, so each span is printed as a JSON
document on the service's stdout, which the demo keeps in .demo/logs/<workload>.log. The
check sends GET /productpage with `traceparent: 00-<new trace id>-<span id>-01` (sampled: the
services' parent-based sampling traces it whatever the percentage) and `end-user: jason`,
then reads the logs for that trace id and follows the parent links from the caller's span:
SERVER span of productpage, its CLIENT span, the SERVER span of reviews, and so on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: str  # "SERVER" / "CLIENT"
    service: str
    version: str


@dataclass(frozen=True)
class TraceCheck:
    trace_id: str
    hops: tuple[str, ...]  # ("productpage v1", "reviews v2", "ratings v1")
    spans: int
    linked: bool  # every hop reached from the caller's span through parent links

    def line(self) -> str:
        links = "parent links ok" if self.linked else "parent links BROKEN"
        path = " -> ".join(self.hops) if self.hops else "no spans found"
        return f"trace {self.trace_id}: {path} ({self.spans} spans, {links})"


def spans_in(text: str) -> Iterable[dict[str, Any]]:
    """The JSON documents in a log: ConsoleSpanExporter starts each with '{' on a new line."""
    decoder = json.JSONDecoder()
    position = 0
    while (start := text.find("{", position)) != -1:
        position = start + 1
        if start and text[start - 1] != "\n":
            continue  # inside a line: not the start of a document
        try:
            document, position = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(document, dict):
            yield document


def _hex(value: str | None) -> str | None:
    return None if value is None else value.removeprefix("0x")


def find_spans(log_dir: Path, trace_id: str) -> list[Span]:
    found = []
    for log in sorted(log_dir.glob("*.log")):
        text = log.read_text(errors="replace")
        if trace_id not in text:
            continue
        for document in spans_in(text):
            context = document.get("context") or {}
            if _hex(context.get("trace_id")) != trace_id:
                continue
            resource = (document.get("resource") or {}).get("attributes") or {}
            found.append(
                Span(
                    trace_id=trace_id,
                    span_id=_hex(context.get("span_id")) or "",
                    parent_id=_hex(document.get("parent_id")),
                    kind=str(document.get("kind", "")).removeprefix("SpanKind."),
                    service=str(resource.get("service.name", "?")),
                    version=str(resource.get("service.version", "?")),
                )
            )
    return found


def follow(spans: list[Span], root_parent: str) -> tuple[list[str], set[str]]:
    """The longest chain of SERVER spans linked to the caller's span, and every span reached."""
    children: dict[str | None, list[Span]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)
    reached: set[str] = set()
    best: list[str] = []

    def walk(parent: str, path: list[str]) -> None:
        nonlocal best
        for span in children.get(parent, []):
            reached.add(span.span_id)
            hop = [*path, f"{span.service} {span.version}"] if span.kind == "SERVER" else path
            if len(hop) > len(best):
                best = hop
            walk(span.span_id, hop)

    walk(root_parent, [])
    return best, reached


async def check(url: str, log_dir: Path, expect_hops: int = 3, wait: float = 5.0) -> TraceCheck:
    """Send the traced request to productpage at `url`; read the logs until the trace is whole."""
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    headers = {"traceparent": f"00-{trace_id}-{caller_span}-01", "end-user": "jason"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers) as response,
    ):
        await response.read()
    deadline = time.monotonic() + wait
    while True:  # spans end just after their responses are sent: poll the logs for them
        spans = await asyncio.to_thread(find_spans, log_dir, trace_id)
        hops, reached = follow(spans, caller_span)
        if len(hops) >= expect_hops or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    linked = bool(hops) and len(reached) == len(spans)  # no span outside the caller's tree
    return TraceCheck(trace_id, tuple(hops), len(spans), linked)
