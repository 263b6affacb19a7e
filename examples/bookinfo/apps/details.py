"""details: the book's details. FastAPI, served by uvicorn.

uvicorn examples.bookinfo.apps.details:app --port 9080
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

import meshlib

meshlib.configure()  # MESHLIB_SERVICE=details, MESHLIB_POLICY, ... from the environment
app = FastAPI(title="details")
app.add_middleware(meshlib.MeshMiddleware)


@app.get("/details/{product_id}")
async def details(product_id: int) -> dict[str, Any]:
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "Details is healthy"}
