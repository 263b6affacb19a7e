"""CEL filter expressions: malformed (Istio rejects them), valid but unsupported, or evaluated."""

from __future__ import annotations

import pytest

from meshlib.policy.cel import (
    AllOf,
    AnyOf,
    Comparison,
    MalformedExpression,
    Not,
    UnsupportedExpression,
    parse_filter,
)


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("  // only a comment", "empty", id="comment-only"),
        pytest.param("response.code >= 400 &&", "ends too early", id="dangling-and"),
        pytest.param("response.code >=", "ends too early", id="dangling-comparison"),
        pytest.param("(response.code == 200", "expected ')' at the end", id="unclosed-paren"),
        pytest.param("response.code == 200)", "unexpected ')' at 20", id="extra-paren"),
        pytest.param("response.code = 400", "unexpected '=' at 14", id="single-equals"),
        pytest.param("response.code == 5 | response.code == 4", "unexpected '|'", id="single-bar"),
        pytest.param("response.code == 200 response.code", "unexpected 'response'", id="two-terms"),
        pytest.param("response.flags == 'UF", 'unexpected "\'"', id="unterminated-string"),
        pytest.param("request.headers[]", "unexpected ']'", id="empty-index"),
        pytest.param("a..b", "expected a field name after '.'", id="double-dot"),
        pytest.param("x ? y", "expected ':'", id="half-conditional"),
        pytest.param("!-x", "unexpected '-'", id="not-minus"),
        pytest.param("in", "unexpected 'in'", id="keyword"),
        pytest.param("{1}", "expected ':'", id="map-without-colon"),
        pytest.param("()", "unexpected ')'", id="empty-parens"),
    ],
)
def test_malformed_expressions(expression: str, why: str) -> None:
    """What CEL's grammar refuses raises MalformedExpression, saying where."""
    with pytest.raises(MalformedExpression) as caught:
        parse_filter(expression)
    assert why in caught.value.why


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("response.code >= 400 || request.url_path.startsWith('/api')", "startsWith()"),
        ("xds.cluster_name == 'BlackHoleCluster'", "unsupported attribute 'xds.cluster_name'"),
        ("size(request.headers) > 0", "the function size()"),
        ("response.code", "alone is not a condition"),
        ("response.code in [200, 201]", "in"),
        ("response.code + 1 > 2", "arithmetic"),
        ("response.code == -1", "negative number"),
        ("response.code > 400 ? true : false", "?:"),
        ("request.headers['x-debug'] == '1'", "indexing"),
        ("{'a': 1,} == {}", "map"),
        ("[,] == []", "list"),
        ("a.?b == 1", "optional"),
        ("r'UF' == response.flags", "raw"),
        ("'U\\'F' == response.flags", "escapes"),
        ("0x1F4 == response.code", "the number 0x1F4"),
        ("response.code == 123456789012345678901", "the number"),
        ("response.code >= '400'", "compares with an integer"),
        ("response.flags > 'UF'", "only == and !="),
        ("response.flags == 4", "0 (no flag) or a flag string"),
        ("!response.code == 500", "alone is not a condition"),  # CEL: (!response.code) == 500
        ("(" * 65 + "response.code == 200" + ")" * 65, "nested more than 64 deep"),
    ],
)
def test_valid_cel_outside_the_subset_is_unsupported_not_malformed(
    expression: str, why: str
) -> None:
    """Valid CEL meshlib does not evaluate raises UnsupportedExpression, never the malformed kind."""
    with pytest.raises(UnsupportedExpression) as caught:
        parse_filter(expression)
    assert not isinstance(caught.value, MalformedExpression)
    assert why in caught.value.why


def test_the_subset_becomes_conditions() -> None:
    """Comparisons face the attribute first; || and && chains are flat; parentheses vanish."""
    code = Comparison("response.code", ">=", 500)
    flags = Comparison("response.flags", "!=", "-")
    assert parse_filter("500 <= response.code") == code
    assert parse_filter("(response.code >= 500) || response.flags != '-'") == AnyOf((code, flags))
    assert parse_filter('response.code >= 500 && response.flags != "-" && response.flags == 0') == (
        AllOf((code, flags, Comparison("response.flags", "==", 0)))
    )
    assert parse_filter("!(response.code >= 500)") == Not(code)
    assert parse_filter("!!response.code >= 500") == code  # cel-go drops an even run of '!'
    assert parse_filter("response . code >= 500u // five hundred") == code


def test_the_errors_pickle() -> None:
    """Both errors survive pickling (multiprocessing, gunicorn workers) with their reason."""
    import pickle

    for error in (MalformedExpression("a &&", "ends too early"), UnsupportedExpression("x", "y")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and (copy.expression, copy.why) == (
            error.expression,
            error.why,
        )
