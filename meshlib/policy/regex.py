"""Istio's regular expressions (RE2 syntax) compiled with Python's `re`.

Envoy matches with RE2. Python's `re` is a close superset, and far cheaper per match than an
RE2 binding (0.1 us against 2.6 us here), so meshlib compiles with `re` after two steps that
keep Istio's meaning:

- constructs RE2 accepts and `re` spells or reads differently are translated (`\\Q...\\E`,
  `\\z`, `(?<name>`, flags mid-pattern, a literal `{`, POSIX classes: see `_Translator`);
- constructs `re` accepts but RE2 (and so Istio) rejects are errors: lookaround,
  backreferences, atomic groups, possessive quantifiers, repeat counts over 1000.

A pattern that is valid RE2 but cannot be translated (Unicode classes like `\\pL`) is
reported as such, never silently matched differently.

`uriRegexRewrite.rewrite` strings are RE2 rewrite strings too; `re2_substitution` turns one
into the template `re.Pattern.sub` expects, once, when policy loads.
"""

from __future__ import annotations

import re
import warnings

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7F",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1F\\x7F",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_POSIX = re.compile(r"\[:(\^?)(\w+):\]")
_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")  # RE2's only repeat forms; any other "{" is literal
_FLAGS = re.compile(r"\(\?([imsU]*)(?:-([imsU]+))?([:)])")
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*>")
_UNICODE_CLASSES = "Unicode classes (\\p{..}) are"
_USE_A_CLASS = "; use an explicit character class"
_MAX_REPEAT = 1000  # RE2 rejects larger counts
_CLASS_ESCAPED = frozenset("[&~|")  # literal in an RE2 class; Python warns about them unescaped


class RegexError(ValueError):
    """A pattern Istio would reject, or one meshlib cannot match with Istio's meaning."""


def compile_re2(pattern: str) -> re.Pattern[str]:
    """Compile an Istio (RE2) regex; raise RegexError with a message for the user."""
    translated = _Translator(pattern).run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. FutureWarning for nested sets: refuse, do not guess
        try:
            return re.compile(translated, re.ASCII)  # RE2's \d \w \s are ASCII-only
        except (re.error, Warning) as exc:
            raise RegexError(f"invalid regex {pattern!r}: {exc}") from None
        except RecursionError:  # Python's parser nests each scoped flag group
            raise RegexError(
                f"regex {pattern[:80]!r}... nests too deeply to compile here (fewer flag"
                " groups or nested groups)"
            ) from None


class _Translator:
    """One pass over an RE2 pattern, writing the Python `re` pattern with the same meaning.

    It reads escapes, character classes and groups as RE2 does, so a construct is judged
    where it really is (`\\++` is one or more "+", not a possessive quantifier), and:

    - `\\Q...\\E` becomes the escaped literal text;
    - `\\z` becomes `\\Z` (Python's `\\Z` is RE2's `\\z`; RE2 has no `\\Z`);
    - a "{" that does not start an RE2 repeat (`{n}`, `{n,}`, `{n,m}`) is a literal, so
      `a{,2}` stays the literal text it is in RE2 (Python would read a repeat);
    - `(?<name>` becomes Python's `(?P<name>`;
    - a flag group `(?i)` becomes a scoped group `(?i:...)` running to the end of the
      enclosing group, closed and reopened around each "|", which is RE2's scope for it
      (Python accepts global flags only at the start);
    - POSIX classes such as `[[:alpha:]]` become ranges.

    Not translated, and so an error rather than a silent difference: Unicode classes
    (`\\pL`), the `U` (ungreedy) flag and negated POSIX classes. Also known and left as
    is: without the `m` flag RE2's `$` matches only at the very end, Python's also before
    a final newline (paths and header values have none).
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.out: list[str] = []
        self.flags: list[list[str]] = [[]]  # per open group: the flag scopes opened in it

    def error(self, what: str) -> RegexError:
        return RegexError(f"invalid RE2 regex {self.pattern!r}: {what} are not RE2 syntax")

    def unsupported(self, what: str, hint: str = "") -> RegexError:
        return RegexError(
            f"regex {self.pattern!r}: {what} valid RE2 but not supported by meshlib{hint}"
        )

    def run(self) -> str:
        p, out, i, n = self.pattern, self.out, 0, len(self.pattern)
        while i < n:
            c = p[i]
            if c == "\\":
                i = self.escape(i)
                continue
            if c == "[":
                i = self.char_class(i)
            elif c == "(":
                i = self.group(i)
            elif c == ")":
                self.close_flags()
                if len(self.flags) > 1:
                    self.flags.pop()
                out.append(")")
                i += 1
            elif c == "|":
                scopes = self.flags[-1]
                out.append(")" * len(scopes) + "|" + "".join(f"(?{f}:" for f in scopes))
                i += 1
            elif c == "{":
                repeat = _REPEAT.match(p, i)
                if repeat is None:
                    out.append("\\{")
                    i += 1
                    continue
                low, high = repeat.group(1), repeat.group(3)
                if int(low) > _MAX_REPEAT or (high and int(high) > _MAX_REPEAT):
                    raise RegexError(
                        f"invalid RE2 regex {p!r}: repeat counts are at most {_MAX_REPEAT}"
                    )
                out.append(repeat.group())
                i = repeat.end()
                self.possessive(i)
            elif c in "*+?":
                out.append(c)
                i += 1
                if p.startswith("?", i):  # lazy
                    out.append("?")
                    i += 1
                else:
                    self.possessive(i)
            else:
                out.append(c)
                i += 1
        while self.flags:
            self.close_flags()
            self.flags.pop()
        return "".join(out)

    def possessive(self, i: int) -> None:
        if self.pattern.startswith("+", i):
            raise self.error("possessive quantifiers such as a*+")

    def close_flags(self) -> None:
        scopes = self.flags[-1]
        self.out.append(")" * len(scopes))
        scopes.clear()

    def escape(self, i: int) -> int:
        p = self.pattern
        c = p[i + 1 : i + 2]
        if c == "Q":
            end = p.find("\\E", i + 2)
            literal = p[i + 2 :] if end < 0 else p[i + 2 : end]
            self.out.append(re.escape(literal))
            return len(p) if end < 0 else end + 2
        if c in "123456789" and c:
            raise self.error("backreferences such as \\1")
        if c and c in "pP":
            raise self.unsupported(_UNICODE_CLASSES, _USE_A_CLASS)
        if c == "Z":
            raise self.error("\\Z (RE2 spells the end of text \\z)")
        self.out.append("\\Z" if c == "z" else p[i : i + 2])
        return i + 2

    def char_class(self, i: int) -> int:
        p, n = self.pattern, len(self.pattern)
        out = ["["]
        j = i + 1
        if p.startswith("^", j):
            out.append("^")
            j += 1
        first = True
        while j < n and (p[j] != "]" or first):
            first = False
            posix = _POSIX.match(p, j)
            if posix is not None:
                out.append(_posix_class(posix))
                j = posix.end()
            elif p[j] == "\\":
                escaped = p[j + 1 : j + 2]
                if escaped and escaped in "pP":
                    raise self.unsupported(_UNICODE_CLASSES, _USE_A_CLASS)
                if escaped and escaped in "123456789":
                    raise self.error("backreferences such as \\1")
                out.append(p[j : j + 2])
                j += 2
            else:
                out.append("\\" + p[j] if p[j] in _CLASS_ESCAPED else p[j])
                j += 1
        if j < n:
            out.append("]")
            j += 1
        self.out.append("".join(out))
        return j  # unclosed: Python reports it

    def group(self, i: int) -> int:
        p, out = self.pattern, self.out
        if not p.startswith("(?", i):
            out.append("(")
            self.flags.append([])
            return i + 1
        rest = p[i + 2 : i + 4]
        if rest[:1] in ("=", "!") or rest in ("<=", "<!"):
            raise self.error("lookaround (?=, (?!, (?<=, (?<!")
        if rest[:1] == ">":
            raise self.error("atomic groups (?>...)")
        if rest in ("P=", "P>") or rest[:1] == "(":
            raise self.error("named backreferences and conditionals")
        if rest[:1] == "#":
            raise self.error("comments (?#...)")
        name_at = i + 4 if rest == "P<" else i + 3 if rest[:1] == "<" else -1
        if name_at >= 0:
            name = _GROUP_NAME.match(p, name_at)
            if name is None:
                raise RegexError(f"invalid RE2 regex {p!r}: bad group name at position {i}")
            out.append(f"(?P<{name.group()}")
            self.flags.append([])
            return name.end()
        flags = _FLAGS.match(p, i)
        if flags is None:
            raise RegexError(f"invalid RE2 regex {p!r}: unknown group syntax at position {i}")
        on, off, kind = flags.groups()
        if "U" in on + (off or ""):
            raise self.unsupported("the U (ungreedy) flag is")
        spec = on + (f"-{off}" if off else "")
        if kind == ":":
            out.append(f"(?{spec}:")
            self.flags.append([])
        elif spec:
            out.append(f"(?{spec}:")  # runs to the end of the enclosing group
            self.flags[-1].append(spec)
        return flags.end()


def _posix_class(match: re.Match[str]) -> str:
    negate, name = match.groups()
    chars = _POSIX_CLASSES.get(name)
    if chars is None:
        raise RegexError(f"unknown POSIX class [:{name}:]")
    if negate:
        raise RegexError(f"negated POSIX class [:^{name}:] is not supported by meshlib")
    return chars


def re2_substitution(rewrite: str, groups: int) -> str:
    """An RE2 rewrite string as a `re.sub` template; raise RegexError if RE2 would refuse it.

    RE2 knows three escapes: `\\0` (the whole match), `\\1`..`\\9` (a group; one digit, so
    `\\10` is group 1 then "0") and `\\\\` (a backslash). Any other backslash, or a group
    the pattern does not have (it has `groups`), makes the rewrite invalid.
    """
    out: list[str] = []
    i, end = 0, len(rewrite)
    while i < end:
        at = rewrite.find("\\", i)
        if at < 0:
            out.append(rewrite[i:])
            break
        out.append(rewrite[i:at])
        escaped = rewrite[at + 1 : at + 2]
        if escaped == "\\":
            out.append("\\\\")
        elif escaped in _DIGITS:
            if int(escaped) > groups:
                raise RegexError(
                    f"invalid rewrite {rewrite!r}: \\{escaped} refers to a group the regex"
                    f" does not have (it has {groups})"
                )
            out.append(f"\\g<{escaped}>")
        else:
            what = f"\\{escaped}" if escaped else "a trailing \\"
            raise RegexError(
                f"invalid rewrite {rewrite!r}: {what} is not RE2 rewrite syntax"
                " (use \\0-\\9 for groups, \\\\ for a backslash)"
            )
        i = at + 2
    return "".join(out)


_DIGITS = frozenset("0123456789")
