"""ratings: the stars each reviewer gave. Starlette, served by uvicorn.

    uvicorn examples.bookinfo.apps.ratings:app --port 9080

RATINGS_FAILURE_RATE (0 to 1, default 0) makes this instance answer 503 to that share of
requests, drawn at random: the demo's "v2-flaky" deployment runs with 0.3, so that the
retries scenario has something to fix.
"""

from __future__ import annotations

import os
import random

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib

meshlib.configure()  # MESHLIB_SERVICE=ratings, MESHLIB_VERSION, ... from the environment
FAILURE_RATE = float(os.environ.get("RATINGS_FAILURE_RATE", "0"))
STARS = {"Reviewer1": 5, "Reviewer2": 4}


async def ratings(request: Request) -> JSONResponse:
    if FAILURE_RATE and random.random() < FAILURE_RATE:
        return JSONResponse({"error": "ratings backend failed"}, status_code=503)
    return JSONResponse({"id": int(request.path_params["product_id"]), "ratings": STARS})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "Ratings is healthy"})


app = meshlib.MeshMiddleware(
    Starlette(routes=[Route("/ratings/{product_id:int}", ratings), Route("/health", health)])
)
