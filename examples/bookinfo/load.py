"""The load generator: GET /productpage at a steady rate, a share of it as `end-user: jason`.

It stands outside the mesh (a browser, a gateway), so it is a plain aiohttp client. Every
answer is tallied under the scenario that was in force when the request was sent: how many
pages, how many answered 200, which reviews version answered (or "unavailable"), whether
stars were shown, and the same for jason's requests. A request is tallied only if the scenario
was still in force when its answer came (None, between two scenarios, tallies nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

UNAVAILABLE = "unavailable"


@dataclass
class Tally:
    """What the load generator saw during one scenario (all its runs, if it came round again)."""

    pages: int = 0
    ok: int = 0
    reviews: Counter[str] = field(default_factory=Counter)  # version, or "unavailable"
    ratings_shown: int = 0
    jason: int = 0
    jason_reviews: Counter[str] = field(default_factory=Counter)

    def add(self, jason: bool, status: int | None, page: dict[str, Any] | None) -> None:
        self.pages += 1
        self.jason += jason
        if status != 200 or page is None:
            return
        self.ok += 1
        reviews = page.get("reviews") or {}
        version = str(reviews.get("version", UNAVAILABLE))
        self.reviews[version] += 1
        self.ratings_shown += bool(reviews.get("ratings_shown"))
        if jason:
            self.jason_reviews[version] += 1


@dataclass
class LastPage:
    """The latest page each kind of user got, for the live view."""

    jason: str = "-"
    others: str = "-"


def describe(page: dict[str, Any] | None, status: int | None) -> str:
    """'reviews v2, black stars' / 'reviews unavailable (504)' / 'HTTP 502', for the view."""
    if status != 200 or page is None:
        return f"HTTP {status}" if status is not None else "no answer"
    reviews = page.get("reviews") or {}
    if "error" in reviews:
        return f"reviews unavailable ({reviews.get('status') or reviews.get('reason')})"
    entries = reviews.get("reviews") or [{}]
    rating = entries[0].get("rating")
    if rating is None:
        stars = "no stars"
    elif "error" in rating:
        stars = f"ratings unavailable ({rating.get('status') or rating.get('reason')})"
    else:
        stars = f"{rating.get('color')} stars"
    return f"reviews {reviews.get('version')}, {stars}"


class LoadGenerator:
    """Sends `rate` requests per second until stopped; `scenario()` says what to tally under."""

    def __init__(
        self,
        url: str,
        *,
        rate: float,
        jason_share: float,
        scenario: Callable[[], int | None],
        timeout: float = 5.0,
        max_in_flight: int = 200,
    ) -> None:
        self.url = url
        self.rate = rate
        self.jason_share = jason_share
        self.scenario = scenario
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.tallies: dict[int, Tally] = {}
        self.last = LastPage()
        self.sent = 0
        self.in_flight = 0
        self.skipped = 0  # requests not sent because max_in_flight were still open

    def is_jason(self, n: int) -> bool:
        """Every request whose index crosses a multiple of 1/share: an even spread."""
        return int((n + 1) * self.jason_share) > int(n * self.jason_share)

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_in_flight)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            interval, start, n = 1.0 / self.rate, time.monotonic(), 0
            while not stop.is_set():
                if self.in_flight < self.max_in_flight:
                    task = asyncio.create_task(self._one(session, n))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    self.skipped += 1
                n += 1
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout)
            for task in tasks:
                task.cancel()

    async def _one(self, session: aiohttp.ClientSession, n: int) -> None:
        jason = self.is_jason(n)
        scenario = self.scenario()
        headers = {"end-user": "jason"} if jason else {}
        status: int | None = None
        page: dict[str, Any] | None = None
        self.sent += 1
        self.in_flight += 1
        try:
            async with session.get(self.url, headers=headers) as response:
                status = response.status
                if status == 200:
                    page = await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            self.in_flight -= 1
        if jason:
            self.last.jason = describe(page, status)
        else:
            self.last.others = describe(page, status)
        if scenario is not None and scenario == self.scenario():
            self.tallies.setdefault(scenario, Tally()).add(jason, status, page)
