"""Header values in `headers` operations, read as Envoy's formatter reads them."""

from __future__ import annotations

import socket

import pytest

from meshlib.policy.header_values import render
from tests.dataplane.test_routing import plan, snapshot_for
from tests.policy.test_validation import check_error, dump, load, vs_route


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("100%", id="percent-at-end"),
        pytest.param("abc%123", id="unterminated-variable"),
        pytest.param("%START_TIME%%", id="variable-then-lone-percent"),
        pytest.param('%REQ(["a" "b"])%', id="array-without-comma"),
        pytest.param("%REQ(x) y%", id="text-after-arguments"),
        pytest.param("%ENVIRONMENT(HOME):3%", id="length-after-arguments"),
    ],
)
def test_values_envoy_cannot_parse_are_errors(value: str) -> None:
    """Istio's ValidateHTTPHeaderValue runs Envoy's parser: a `%` that opens no complete
    `%VAR%` (a literal % is `%%`) is refused."""
    check_error(
        vs_route(f"headers: {{request: {{set: {{x-a: '{value}'}}}}}}"),
        "spec.http[0].headers.request.set.x-a",
        9,
        "invalid header value",
    )


@pytest.mark.parametrize(
    "value",
    ["100%%", "%HOSTNAME%", "a %ENVIRONMENT(HOME)% b", "plain"],
)
def test_values_meshlib_can_send_load_cleanly(value: str) -> None:
    """`%%` and the variables meshlib expands give no diagnostic."""
    result = load(vs_route(f"headers: {{response: {{add: {{x-a: '{value}'}}}}}}"))
    assert result.diagnostics == (), dump(result)


@pytest.mark.parametrize(
    "value", ["%REQ(x-user)%", '%REQ(["x-user"])%', "%START_TIME(%s)%", "a %PROTOCOL% b"]
)
def test_variables_meshlib_cannot_expand_are_warnings(value: str) -> None:
    """Valid to Istio, so the resource loads; meshlib warns that it leaves the variable out."""
    result = load(vs_route(f"headers: {{request: {{add: {{x-a: '{value}'}}}}}}"))
    assert result.errors == (), dump(result)
    (warning,) = result.warnings
    assert warning.field == "spec.http[0].headers.request.add.x-a"
    assert "meshlib cannot expand %" in warning.message


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("100%%", "100%"),
        ("%%%%", "%%"),
        ("a%REQ(x)%b", "ab"),
        ("%HOSTNAME%", socket.gethostname()),
        ("no percent", "no percent"),
    ],
)
def test_render(value: str, sent: str) -> None:
    """`%%` is a literal %, known variables expand, unknown ones are left out."""
    assert render(value) == sent


def test_environment_variable_expands(monkeypatch: pytest.MonkeyPatch) -> None:
    """`%ENVIRONMENT(NAME)%` reads the process environment (empty when unset)."""
    monkeypatch.setenv("MESHLIB_TEST_ZONE", "eu-west-1")
    monkeypatch.delenv("MESHLIB_TEST_UNSET", raising=False)
    assert render("%ENVIRONMENT(MESHLIB_TEST_ZONE)%") == "eu-west-1"
    assert render("[%ENVIRONMENT(MESHLIB_TEST_UNSET)%]") == "[]"


def test_routes_send_rendered_values() -> None:
    """At runtime the plan carries what is sent: `%%` as `%`, and a header whose value is
    only a variable meshlib cannot expand is not sent at all (empty, as Envoy skips it)."""
    snapshot = snapshot_for(
        """
        - route: [{destination: {host: reviews}}]
          headers:
            request: {set: {x-share: '100%%', x-start: '%START_TIME%'}}
            response: {add: {x-host: 'by %HOSTNAME%'}}
        """
    )
    decided = plan(snapshot)
    assert decided.request_headers.set == {"x-share": "100%"}
    assert decided.response_headers.add == [("x-host", f"by {socket.gethostname()}")]
