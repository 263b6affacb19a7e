"""RE2 syntax and meaning that meshlib's translator (meshlib/policy/regex.py) must keep.

Every expected value below is what Google's RE2 (the google-re2 binding, RE2 of 2025-11)
gave for the pattern: full match, as Envoy's safe_regex matches. The tests do not need RE2:
the results are written here. The other direction, Perl/Python syntax RE2 rejects, is in
REJECTED.
"""

from __future__ import annotations

import pytest

from meshlib.policy.loader import load_text
from meshlib.policy.regex import (
    RegexError,
    compile_re2,
    re2_replace_all,
    re2_substitution,
    unstable_captures,
)

# (pattern, value, whether RE2 full-matches it)
RE2_MATCHES = [
    ("[!--]", ",", True),
    ("[!--]", "!", True),
    ("[!--]", "-", True),
    ("[!--]", ".", False),
    ("[+--]", ",", True),
    ("[+--]", "+", True),
    ("[+--]", "-", True),
    ("[+--]", ".", False),
    ("[a-b-c]", "-", True),
    ("[a-b-c]", "c", True),
    ("[\\d-z]", "-", True),
    ("[\\d-z]", "5", True),
    ("[\\d-z]", "z", True),
    ("[\\d-z]", "a", False),
    ("\\x{41}", "A", True),
    ("\\x{41}", "x{41}", False),
    ("[\\x{41}-\\x{5A}]+", "HELLO", True),
    ("[\\x{41}-\\x{5A}]+", "hello", False),
    ("\\x{10FFFF}", "\U0010ffff", True),
    ("\\x41\\x{000042}", "AB", True),
    ("\\101", "A", True),
    ("\\12", "\n", True),
    ("\\12", "\x012", False),
    ("\\0", "\x00", True),
    ("\\08", "\x008", True),
    ("\\1234", "S4", True),
    ("[\\101-\\103]+", "ABC", True),
    ("[\\101-\\103]+", "D", False),
    ("[[:^alpha:]]", "1", True),
    ("[[:^alpha:]]", "a", False),
    ("[[:^alpha:]]", "\xe9", True),
    ("[[:^alpha:]x]", "x", True),
    ("[[:^alpha:]x]", "a", False),
    ("[^[:^digit:]]", "5", True),
    ("[^[:^digit:]]", "a", False),
    ("[[:space:]]", "\x0b", True),
    ("(?U)a+", "aaa", True),
    ("(?U)(a+)(a*)", "aaa", True),
    ("^*a", "a", True),
    ("\\b+a", "a", True),
    ("$*", "", True),
    ("a*(?i)*", "aa", True),
    ("\\pL+", "abc", True),
    ("\\pL+", "\xe9t\xe9", True),
    ("\\pL+", "a1", False),
    ("\\p{Lu}", "A", True),
    ("\\p{Lu}", "a", False),
    ("\\PN", "a", True),
    ("\\PN", "1", False),
    ("\\PN", "\u0663", False),
    ("\\p{^N}", "a", True),
    ("\\p{^N}", "\u0663", False),
    ("[\\pN\\p{Lu}]+", "1A\u0663", True),
    ("[\\pN\\p{Lu}]+", "a", False),
    ("[^\\PN]", "1", True),
    ("[^\\PN]", "a", False),
    ("\\pZ", " ", True),
    ("\\pZ", "\u2028", True),
    ("\\pZ", "\xa0", True),
    ("\\p{Any}", "\n", True),
    ("\\p{C}", "\x00", True),
    ("\\p{C}", "\ue000", True),
    ("\\p{C}", "\u0378", False),
    ("\\s", "\x0b", False),
    ("\\s", " ", True),
    ("\\s", "\t", True),
    ("\\s", "\xa0", False),
    ("[\\s]", "\x0b", False),
    ("\\S", "\x0b", True),
    ("\\S", "\xa0", True),
    ("\\d", "\u0663", False),
    ("\\w", "\xe9", False),
    ("\\w", "_", True),
    ("a\\b", "a", True),
    ("\xe9\\b", "\xe9", False),
    ("\\B", "", True),
    ("(?i)k", "\u212a", True),
    ("(?i)k", "K", True),
    ("(?i)\xe9", "\xc9", True),
    ("(?i)[a-z]+", "\u017f", True),
    ("(?i)[a-z]+", "\u212a", True),
    ("(?i)[a-z]+", "\u0131", False),
    ("(?i)[a-z]+", "\u0130", False),
    ("(?i)i", "\u0131", False),
    ("(?i)i", "\u0130", False),
    ("(?i)[^k]", "\u212a", False),
    ("(?i)\\w", "\u212a", True),
    ("(?i)\\w", "\u017f", True),
    ("(?i)\\W", "\u212a", False),
    ("(?i)\\p{Lu}", "a", True),
    ("(?i)\\P{Lu}", "a", False),
    ("(?i)\u03c3", "\u03c2", True),
    ("(?i)\u03c3", "\u03a3", True),
    ("(?i)\u01c5", "\u01c4", True),
    ("(?i)\u01c5", "\u01c6", True),
    ("(?i)\u0390", "\u1fd3", True),
    ("(?i)stra\xdfe", "STRASSE", False),
    ("a$\\n", "a\n", False),
    ("(?m)a$\\n", "a\n", True),
    ("a{01}", "a{01}", True),
    ("a{01}", "a", False),
    ("(?i-i)a", "A", False),
    ("(?P<a>x)(?P<a>y)", "xy", True),
    ("(?P<1>x)", "x", True),
    ("\\_", "_", True),
]


@pytest.mark.parametrize(("pattern", "value", "matches"), RE2_MATCHES)
def test_full_match_as_re2(pattern: str, value: str, matches: bool) -> None:
    """Valid RE2 compiles and full-matches exactly as RE2 does."""
    assert (compile_re2(pattern).fullmatch(value) is not None) is matches


# Patterns RE2 rejects, with its message; Python's `re` accepts most of them.
REJECTED = [
    "\\u0041",  # invalid escape sequence: \\u
    "[\\b]",  # invalid escape sequence: \\b
    "(a{100}){100}",  # invalid repetition size: {100}
    "(a{3}){334}",  # invalid repetition size: {334}
    "(a{2,}){501}",  # invalid repetition size: {501}
    "\\1",  # invalid escape sequence: \\1
    "\\18",  # invalid escape sequence: \\1
    "\\8",  # invalid escape sequence: \\8
    "\\x{110000}",  # invalid escape sequence: \\x{110000
    "\\x{}",  # invalid escape sequence: \\x{}
    "\\x4",  # invalid escape sequence: \\x4
    "\\e",  # invalid escape sequence: \\e
    "\\E",  # invalid escape sequence: \\E
    "\\N{DIGIT ONE}",  # invalid escape sequence: \\N
    "\\\xe9",  # invalid escape sequence: \\\xc3\xa9
    "[z-a]",  # invalid character class range: z-a
    "[a-\\d]",  # invalid escape sequence: \\d
    "[[:foo:]]",  # invalid character class range: [:foo:]
    "[[:a]b:]]",  # invalid character class range: [:a]b:]
    "\\p{Cn}",  # invalid character class range: \\p{Cn}
    "\\p{greek}",  # invalid character class range: \\p{greek}
    "\\p",  # invalid character class range: \\p
    "a**",  # bad repetition operator: **
    "a{2}*",  # bad repetition operator: {2}*
    "a*{2}",  # bad repetition operator: *{2}
    "(?-)a",  # invalid perl operator: (?-)
    "(?P<a-b>x)",  # invalid named capture group: (?P<a-b>
    "a{100000000}",  # invalid repetition size: {100000000}
    "x|*",  # no argument for repetition operator: *
]


@pytest.mark.parametrize("pattern", REJECTED)
def test_rejected_as_re2_rejects(pattern: str) -> None:
    with pytest.raises(RegexError):
        compile_re2(pattern)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("\\u0041", "\\u, \\U and \\N{...} escapes (RE2 spells a code point \\x{41})"),
        ("[\\b]", "\\b in a class (a backspace in Python; use \\x08)"),
        ("(a{100}){100}", "multiplied through nested repeats ('{100}' repeats 10000 copies)"),
        ("a*+", "possessive"),
        ("\\101\\1", "backreferences such as \\1"),
    ],
)
def test_rejections_say_why(pattern: str, message: str) -> None:
    with pytest.raises(RegexError) as error:
        compile_re2(pattern)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        ("\\p{Greek}", "'\\\\p{Greek}'"),
        ("[a\\P{Latin}]", "'\\\\P{Latin}'"),
        ("\\p{^Han}", "'\\\\p{^Han}'"),
        ("a\\C", "\\C (any byte"),
    ],
)
def test_valid_re2_meshlib_cannot_match_is_unsupported(pattern: str, construct: str) -> None:
    """RE2 accepts these; meshlib says it does not support them rather than guess."""
    with pytest.raises(RegexError) as error:
        compile_re2(pattern)
    assert construct in str(error.value)
    assert "valid RE2 but not supported by meshlib" in str(error.value)


def test_unsupported_script_is_reported_where_it_is() -> None:
    """The policy loader names the file, line, resource and field of the regex."""
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
        "spec:\n  hosts: [r]\n  http:\n"
        "  - match: [{headers: {x-name: {regex: '\\p{Greek}+'}}}]\n"
        "    route: [{destination: {host: r}}]\n"
    )
    result = load_text(text, "mesh.yaml")
    assert [str(d) for d in result.errors] == [
        "mesh.yaml:7: error: VirtualService default/r:"
        " spec.http[0].match[0].headers.x-name.regex: regex '\\\\p{Greek}+': the Unicode"
        " class '\\\\p{Greek}' is not a general category such as \\pL or \\p{Lu}: Unicode"
        " scripts (\\p{Greek}) are valid RE2 but not supported by meshlib (Python has no"
        " script tables), and other names are not RE2; use an explicit character class"
    ]


@pytest.mark.parametrize(
    ("pattern", "rewrite", "text", "replaced"),
    [
        ("/*$", "/", "/a/b/", "/a/b/"),  # re.sub: /a/b//
        ("/*$", "/end", "/a/b", "/a/b/end"),
        ("a*", "-", "baaa", "-b-"),  # re.sub: -b--
        ("x", "y", "abc", "abc"),
        ("(b)", "[\\1]", "abcb", "a[b]c[b]"),
    ],
)
def test_replace_all_as_re2s_global_replace(
    pattern: str, rewrite: str, text: str, replaced: str
) -> None:
    """Envoy's uriRegexRewrite is RE2::GlobalReplace, which skips an empty match where the
    previous match ended (results from re2.cc's loop)."""
    compiled = compile_re2(pattern)
    template = re2_substitution(rewrite, compiled.groups)
    assert re2_replace_all(compiled, template, text) == replaced


@pytest.mark.parametrize(
    ("pattern", "unstable"),
    [
        ("(a*)+", {1}),  # RE2 captures "aa" from "aa", Python ""
        ("(a|)+", {1}),
        ("^/files/(\\w*/?)+$", {1}),
        ("(x)(?:[ab]?)*(y)", {1, 2}),  # any group, once a * repeats what can match nothing
        ("(a+)+", set()),
        ("^/svc/([^/]+)/(.*)$", set()),
        ("(a*){2}", set()),  # an exact count captures as RE2 does
        ("^/files/(\\w*/?){1,}$", {1}),  # a varying count does not
        ("(a*|b){1,3}", {1}),
        ("(a*)?", set()),
        ("(?:a*)+", set()),  # no group to capture
    ],
)
def test_captures_python_may_take_differently(pattern: str, unstable: set[int]) -> None:
    assert unstable_captures(pattern) == unstable


def test_a_rewrite_using_such_a_capture_is_unsupported_where_it_is() -> None:
    """RE2 rewrites `/files/a/b` to `/last/b` with group 1 of `(\\w*/?)+`; Python would
    give `/last/`: refused at load, with file, line, resource and field. The same rewrite
    over `(\\w+/?)+`, which Python captures as RE2 does, loads."""
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
        "spec:\n  hosts: [r]\n  http:\n"
        "  - match: [{uri: {prefix: /files}}]\n"
        "    rewrite: {uriRegexRewrite: {match: '^/files/(\\w%s/?)+$', rewrite: '/last/\\1'}}\n"
        "    route: [{destination: {host: r}}]\n"
    )
    errors = [str(d) for d in load_text(text % "*", "mesh.yaml").errors]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        "mesh.yaml:8: error: VirtualService default/r: spec.http[0].rewrite.uriRegexRewrite"
        ".rewrite: rewrite '/last/\\\\1': \\1 is a group of a regex where *, +, {n,} or"
        " {n,m} repeats"
    )
    assert "valid RE2 but not supported by meshlib in a rewrite" in errors[0]
    assert load_text(text % "+", "mesh.yaml").errors == ()
    compiled = compile_re2("^/files/(\\w+/?)+$")
    template = re2_substitution(
        "/last/\\1", compiled.groups, unstable_captures("^/files/(\\w+/?)+$")
    )
    assert re2_replace_all(compiled, template, "/files/a/b") == "/last/b"
