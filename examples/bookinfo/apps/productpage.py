"""productpage: bookinfo's front page, as JSON. Flask, served by gunicorn (gunicorn_conf.py).

    gunicorn -c examples/bookinfo/apps/gunicorn_conf.py examples.bookinfo.apps.productpage:app

It calls details and reviews by their mesh names. Which reviews version answers, the caller's
`end-user` and trace context reaching reviews and ratings, timeouts, retries and faults: all of
that is meshlib's work, from mesh.yaml. As in bookinfo, a failed call to reviews or details is
shown on the page ("reviews unavailable", with the status) and the page itself stays 200.
"""

from __future__ import annotations

from typing import Any

import flask
import requests

import meshlib

meshlib.configure()  # MESHLIB_SERVICE, MESHLIB_POLICY, MESHLIB_PROPAGATE_HEADERS, ...
app = flask.Flask("productpage")
app.wsgi_app = meshlib.MeshWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
session = meshlib.Session()

PRODUCT = {"id": 0, "title": "The Comedy of Errors", "author": "William Shakespeare"}
DETAILS_URL = "http://details:9080/details/0"
REVIEWS_URL = "http://reviews:9080/reviews/0"
# bookinfo's productpage gives reviews 3 s; the demo's delays are shorter, so is this.
DETAILS_TIMEOUT = 1.0
REVIEWS_TIMEOUT = 1.0


def fetch(url: str, timeout: float, what: str) -> dict[str, Any]:
    """The JSON `url` answers, or what the page shows instead when the call failed."""
    try:
        response = session.get(url, timeout=timeout)
    except requests.RequestException as exc:  # no answer at all, e.g. our own timeout fired
        return {"error": f"{what} unavailable", "status": None, "reason": type(exc).__name__}
    if response.status_code != 200:  # an upstream error or meshlib's own answer (504 UT, ...)
        return {"error": f"{what} unavailable", "status": response.status_code}
    body: dict[str, Any] = response.json()
    return body


@app.get("/productpage")
def productpage() -> dict[str, Any]:
    details = fetch(DETAILS_URL, DETAILS_TIMEOUT, "details")
    reviews = fetch(REVIEWS_URL, REVIEWS_TIMEOUT, "reviews")
    if "error" not in reviews:
        reviews["ratings_shown"] = any("stars" in r.get("rating", {}) for r in reviews["reviews"])
    return {"product": PRODUCT, "details": details, "reviews": reviews}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "Product page is healthy"}
