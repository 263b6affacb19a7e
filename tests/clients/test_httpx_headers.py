"""meshlib.clients._httpx_headers: the fast path over httpx's private header list and the
public-API fallback give the same headers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from meshlib.clients import _httpx_headers as hh

ORIGINAL = [
    ("Host", "reviews:9080"),
    ("Accept", "*/*"),
    ("X-Envoy-Attempt-Count", "3"),
    ("Cookie", "a=1"),
    ("cookie", "b=2"),
    ("User-Agent", "python-httpx"),
]
DROP = frozenset((b"host", b"x-envoy-attempt-count"))
EXTRA = [("host", "reviews.default.svc.cluster.local:9080"), ("end-user", "jason")]


@pytest.fixture(params=[True, False], ids=["fast", "public"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    monkeypatch.setattr(hh, "FAST", request.param)
    yield request.param


def test_the_fast_path_is_live_on_the_installed_httpx() -> None:
    """The probe recognises this httpx's layout (else every request takes the slow path)."""
    assert hh.FAST, f"httpx {httpx.__version__} changed Headers._list: fast path off"


def test_extended_drops_then_appends(mode: bool) -> None:
    original = httpx.Headers(ORIGINAL)
    headers = hh.extended(original, DROP, EXTRA)
    assert headers.multi_items() == [
        ("accept", "*/*"),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        ("user-agent", "python-httpx"),
        *EXTRA,
    ]
    assert headers["Host"] == "reviews.default.svc.cluster.local:9080"
    assert headers.get_list("cookie") == ["a=1", "b=2"]
    assert original.multi_items()[0] == ("host", "reviews:9080"), "the original is untouched"
    assert [k for k, _ in headers.raw][:2] == [b"Accept", b"Cookie"], "raw case kept"


def test_both_paths_agree() -> None:
    results = []
    for fast in (True, False):
        hh.FAST = fast
        try:
            headers = hh.extended(httpx.Headers(ORIGINAL), DROP, EXTRA)
            hh.appended(headers, "x-request-id", "abc")
            results.append((headers.multi_items(), list(hh.lowercase_raw(headers))))
        finally:
            hh.FAST = hh._probe()
    assert results[0] == results[1]


def test_a_value_outside_ascii_goes_as_latin1(mode: bool) -> None:
    """An `end-user` received inbound as Latin-1 (`jürgen`) is sent on as the same bytes."""
    headers = hh.extended(httpx.Headers(ORIGINAL), DROP, [("end-user", "j\xfcrgen")])
    assert dict(hh.lowercase_raw(headers))[b"end-user"] == b"j\xfcrgen"
    assert headers["end-user"] == "j\xfcrgen"


def test_appended_adds_without_replacing(mode: bool) -> None:
    headers = httpx.Headers(ORIGINAL)
    hh.appended(headers, "x-request-id", "3e0f")
    assert headers["x-request-id"] == "3e0f"
    assert len(headers) == len(ORIGINAL) + 1


def test_lowercase_raw_keeps_order_and_duplicates(mode: bool) -> None:
    pairs = list(hh.lowercase_raw(httpx.Headers(ORIGINAL)))
    assert pairs == [(k.lower().encode(), v.encode()) for k, v in ORIGINAL]


def test_decoded_is_multi_items(mode: bool) -> None:
    headers = httpx.Headers([*ORIGINAL, ("X-Latin", "caf\xe9".encode("latin-1"))])
    assert hh.decoded(headers) == headers.multi_items()
