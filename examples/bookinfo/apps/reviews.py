"""reviews: two reviews of the book. FastAPI, served by uvicorn; one process per version.

    MESHLIB_VERSION=v2 uvicorn examples.bookinfo.apps.reviews:app --port 9080

As in bookinfo: v1 shows no ratings, v2 asks ratings and shows black stars, v3 red stars. When
ratings fails, v2 and v3 still answer, with "ratings unavailable" where the stars would be.
The answer names its version.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI

import meshlib

mesh = meshlib.configure()  # MESHLIB_SERVICE=reviews, MESHLIB_VERSION=v1|v2|v3, ...
VERSION = mesh.config.version or "v1"
STAR_COLOR = {"v2": "black", "v3": "red"}.get(VERSION)  # None: this version shows no ratings
# bookinfo's reviews wait 10 s (v2) and 2.5 s (v3) for ratings.
RATINGS_TIMEOUT = {"v2": 10.0, "v3": 2.5}.get(VERSION, 2.5)
REVIEWS = {
    "Reviewer1": "An extremely entertaining play by Shakespeare. The slapstick humour is "
    "refreshing!",
    "Reviewer2": "Absolutely fun and entertaining. The play lacks thematic depth when compared "
    "to other plays by Shakespeare.",
}

ratings: httpx.AsyncClient  # meshed; made when the server starts


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global ratings
    async with meshlib.AsyncClient() as ratings:
        yield


app = FastAPI(title="reviews", lifespan=lifespan)
app.add_middleware(meshlib.MeshMiddleware)


async def fetch_ratings(product_id: int) -> dict[str, Any]:
    """{"ratings": {reviewer: stars}}, or {"error": ..., "status": ...} when ratings failed."""
    url = f"http://ratings:9080/ratings/{product_id}"
    try:
        response = await ratings.get(url, timeout=RATINGS_TIMEOUT)
    except httpx.HTTPError as exc:
        return {"error": "ratings unavailable", "status": None, "reason": type(exc).__name__}
    if response.status_code != 200:
        return {"error": "ratings unavailable", "status": response.status_code}
    body: dict[str, Any] = response.json()
    return body


@app.get("/reviews/{product_id}")
async def reviews(product_id: int) -> dict[str, Any]:
    found = await fetch_ratings(product_id) if STAR_COLOR else {}
    entries = []
    for reviewer, text in REVIEWS.items():
        entry: dict[str, Any] = {"reviewer": reviewer, "text": text}
        if "ratings" in found:
            entry["rating"] = {"stars": found["ratings"].get(reviewer, 0), "color": STAR_COLOR}
        elif "error" in found:
            entry["rating"] = {"error": found["error"], "status": found["status"]}
        entries.append(entry)
    return {"id": product_id, "version": VERSION, "reviews": entries}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "Reviews is healthy"}
