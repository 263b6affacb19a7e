"""Scrape every service process's metrics port, as Prometheus would, and keep a short history.

Each scrape reads /stats/prometheus of every process, keeps the last good Totals of each (a
failed scrape does not make counts drop) and records their sum with the time, so that any
window back to `keep` seconds can be subtracted. It also reads each process's
`meshlib_policy_generation`, which goes up when the process has loaded a new mesh.yaml.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from examples.bookinfo.stats import Totals, parse, total

GENERATION = "meshlib_policy_generation"


@dataclass(frozen=True)
class Target:
    """A process's metrics endpoint and the labels it is known by."""

    name: str  # "reviews-v2"
    app: str  # "reviews"
    version: str  # "v2"
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stats/prometheus"


def generation(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith((GENERATION + " ", GENERATION + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


class Scraper:
    def __init__(self, targets: Sequence[Target], keep: float = 120.0) -> None:
        self.targets = list(targets)
        self.keep = keep
        self.latest: dict[str, Totals] = {}
        self.generations: dict[str, float] = {}
        self.history: deque[tuple[float, Totals]] = deque()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Scraper:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _one(self, target: Target) -> None:
        assert self._session is not None
        try:
            async with self._session.get(target.url) as response:
                if response.status != 200:
                    return
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return  # keep the last good numbers; the supervisor notices dead processes
        self.latest[target.name] = await asyncio.to_thread(parse, text)
        found = generation(text)
        if found is not None:
            self.generations[target.name] = found

    async def scrape(self) -> Totals:
        """Scrape every target once; return (and remember) the sum of their counts."""
        await asyncio.gather(*(self._one(t) for t in self.targets))
        now = time.monotonic()
        summed = total(self.latest.values())
        self.history.append((now, summed))
        while self.history and self.history[0][0] < now - self.keep:
            self.history.popleft()
        return summed

    @property
    def current(self) -> Totals:
        return self.history[-1][1] if self.history else Totals()

    def window(self, seconds: float) -> tuple[Totals, float]:
        """Counts over the last `seconds` (or as much history as there is) and its length."""
        if not self.history:
            return Totals(), 0.0
        end_time, end = self.history[-1]
        start_time, start = self.history[0]
        for when, totals in reversed(self.history):
            if when <= end_time - seconds:
                start_time, start = when, totals
                break
        return end.since(start), end_time - start_time
