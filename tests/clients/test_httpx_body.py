"""meshlib.clients._httpx_body: a body meshlib read, handed to httpx as read — the fast path
over httpx's private `_content` and the public `read()` give the same response."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator

import httpx
import pytest

from meshlib.clients import _httpx_body as hb


@pytest.fixture(params=[True, False], ids=["fast", "public"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    monkeypatch.setattr(hb, "FAST", request.param)
    yield request.param


def test_the_fast_path_is_live_on_the_installed_httpx() -> None:
    assert hb.FAST, f"httpx {httpx.__version__} no longer keeps a read body in _content"


def _response(headers: list[tuple[str, str]]) -> httpx.Response:
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"unread"))


def test_a_plain_body_is_held_read_and_closed(mode: bool) -> None:
    response = _response([("content-type", "text/plain; charset=utf-8")])
    hb.hold(response, "h\u00e9llo".encode(), encoded=False)
    assert response.is_stream_consumed and response.is_closed
    assert response.content == "h\u00e9llo".encode() and response.text == "h\u00e9llo"
    assert response.num_bytes_downloaded == 6
    assert asyncio.run(response.aread()) == "h\u00e9llo".encode()  # nothing left to read
    assert list(response.iter_bytes()) == ["h\u00e9llo".encode()]


def test_an_encoded_body_is_left_for_httpx_to_decode(mode: bool) -> None:
    response = _response([("content-encoding", "gzip")])
    hb.hold(response, gzip.compress(b"zipped"), encoded=True)
    assert not response.is_stream_consumed
    assert response.read() == b"zipped"


def test_both_paths_agree() -> None:
    seen = []
    for fast in (True, False):
        hb.FAST = fast
        try:
            response = _response([("content-length", "4")])
            hb.hold(response, b"body", encoded=False)
            seen.append((response.content, response.is_closed, response.num_bytes_downloaded))
        finally:
            hb.FAST = hb._probe()
    assert seen[0] == seen[1]
