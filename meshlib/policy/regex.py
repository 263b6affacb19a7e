"""Istio's regular expressions (RE2 syntax) compiled with Python's `re`.

Envoy matches with RE2. Python's `re` is far cheaper per match than an RE2 binding (0.1 us
against 2.6 us here), so meshlib reads each pattern as RE2 reads it, in one pass, and writes
the Python pattern with the same meaning (`_Translator`):

- RE2's spellings are read as RE2 reads them: `\\Q...\\E`, `\\z`, `\\x{10FFFF}`, octal
  `\\101`, named groups, flags anywhere (`(?i)`, `(?U)`, ...), a `{` that starts no repeat,
  POSIX classes (also negated), Unicode general categories (`\\pL`, `\\p{Lu}`, `\\PN`);
- where `re` would read the same text differently, RE2's meaning is written out: every
  character class is computed as a set of code points and written explicitly; `\\d \\s \\w`
  and `\\b` are ASCII, as in RE2; `(?i)` folds case with Unicode simple case folding, as
  RE2 does (`k` also matches U+212A KELVIN SIGN, `[a-z]` U+017F LONG S), not with `re`'s
  IGNORECASE; `$` without `(?m)` is the very end; `(?U)` swaps greedy and lazy;
- what RE2 (and so Istio) rejects is an error: lookaround, backreferences, atomic groups,
  possessive and stacked quantifiers, `\\Z`, `\\u0041`, `[\\b]`, repeat counts over 1000
  (also multiplied through nested repeats, as in `(a{100}){100}`).

Valid RE2 that meshlib cannot match with RE2's meaning is reported as unsupported, never
silently matched differently: Unicode scripts (`\\p{Greek}`: Python has no script tables)
and `\\C` (any byte).

`uriRegexRewrite.rewrite` strings are RE2 rewrite strings too; `re2_substitution` turns one
into the template `re.Pattern.sub` expects, once, when policy loads.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import warnings
from bisect import bisect_left, bisect_right
from typing import TypeAlias

Ranges: TypeAlias = list[tuple[int, int]]  # code point ranges, inclusive

_MAX_RUNE = 0x10FFFF
_MAX_REPEAT = 1000  # RE2 rejects larger counts, and larger products of nested counts

# RE2's Perl classes (ASCII only: its \s has no \v) and POSIX classes.
_PERL: dict[str, Ranges] = {
    "d": [(0x30, 0x39)],
    "s": [(0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
}
_POSIX: dict[str, Ranges] = {
    "alnum": [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
    "alpha": [(0x41, 0x5A), (0x61, 0x7A)],
    "ascii": [(0x00, 0x7F)],
    "blank": [(0x09, 0x09), (0x20, 0x20)],
    "cntrl": [(0x00, 0x1F), (0x7F, 0x7F)],
    "digit": [(0x30, 0x39)],
    "graph": [(0x21, 0x7E)],
    "lower": [(0x61, 0x7A)],
    "print": [(0x20, 0x7E)],
    "punct": [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)],
    "space": [(0x09, 0x0D), (0x20, 0x20)],
    "upper": [(0x41, 0x5A)],
    "word": _PERL["w"],
    "xdigit": [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
}
# RE2's \p names that Python's unicodedata can serve: the general categories (RE2 has no
# Cn: unassigned code points are in no class) and Any.
_CATEGORIES = frozenset(
    {"C", "Cc", "Cf", "Co", "Cs", "L", "Ll", "Lm", "Lo", "Lt", "Lu", "M", "Mc", "Me", "Mn"}
    | {"N", "Nd", "Nl", "No", "P", "Pc", "Pd", "Pe", "Pf", "Pi", "Po", "Ps"}
    | {"S", "Sc", "Sk", "Sm", "So", "Z", "Zl", "Zp", "Zs"}
)
# Letters, marks, digits and connectors: what RE2 allows in a group name.
_NAME_CATEGORIES = frozenset(["Lu", "Ll", "Lt", "Lm", "Lo", "Nl", "Mn", "Mc", "Nd", "Pc"])
# Simple case foldings newer than some Pythons' unicodedata (Unicode 15 added them).
_EXTRA_FOLDS = ((0x390, 0x1FD3), (0x3B0, 0x1FE3), (0xFB05, 0xFB06))
_CASED_END = 0x20000  # no code point above has a case mapping

_I, _M, _S, _U = 1, 2, 4, 8
_FLAG_BITS = {"i": _I, "m": _M, "s": _S, "U": _U}
_FLAGS = re.compile(r"\(\?([imsU]*)(?:-([imsU]+))?([:)])")
_RE2_META = frozenset("\\[()|^$.*+?{")  # every other character is a literal in RE2
_PY_META = frozenset(".^$*+?{}[]\\|()")  # literals `re` needs escaped
_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "a": 0x07, "f": 0x0C, "v": 0x0B}
_OCTAL = frozenset("01234567")
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_UNICODE_HINT = "; use an explicit character class"


class RegexError(ValueError):
    """A pattern Istio would reject, or one meshlib cannot match with Istio's meaning."""


@functools.lru_cache(maxsize=2048)
def compile_re2(pattern: str) -> re.Pattern[str]:
    """Compile an Istio (RE2) regex; raise RegexError with a message for the user.

    Cached: policy validation and compilation both ask for each pattern (a RegexError is
    raised again each time, not cached)."""
    translated = _Translator(pattern).run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a FutureWarning: refuse, do not guess
        try:
            return re.compile(translated)
        except (re.error, Warning) as exc:
            raise RegexError(f"invalid regex {pattern!r}: {exc}") from None
        except RecursionError:  # Python's parser recurses once per nested group
            raise RegexError(
                f"regex {pattern[:80]!r}... nests too deeply to compile here (fewer nested groups)"
            ) from None


_NONE: frozenset[int] = frozenset()


@functools.lru_cache(maxsize=256)
def unstable_captures(pattern: str) -> frozenset[int]:
    """The capturing groups (numbers) of a valid pattern that RE2 and Python's `re` may
    capture differently, though they match alike: all of them when `*`, `+`, `{n,}` or
    `{n,m}` repeats something that can match empty (see `_Translator.star_of_empty`), else
    none. A rewrite must not use them."""
    translator = _Translator(pattern)
    translator.run()
    return frozenset(range(1, translator.captures + 1)) if translator.star_of_empty else _NONE


class _Translator:
    """One pass over an RE2 pattern, reading it as RE2's parser does, writing the Python
    `re` pattern with the same meaning.

    Flags are RE2's: `(?i)` lasts to the end of the enclosing group (across "|"), `(?i:...)`
    to its ")". They are applied here, so the Python pattern needs none of its own: `(?i)`
    writes each cased literal as the class of its case orbit, `(?m)` and `(?s)` choose how
    `^ $ .` are written, `(?U)` swaps each quantifier's greediness. `re`'s IGNORECASE is
    never used: its folding differs from RE2's (it equates "i" with U+0130 and U+0131).

    A quantifier applies to the last atom. RE2 rejects one with no atom before it and one
    right after another (`a**`), but lets it repeat an empty-width assertion (`^*`) or,
    after a flag group, a repeat (`a*(?i)*`): `re` refuses both as written, so that atom is
    wrapped in `(?:...)` first.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.out: list[str] = []
        self.flags = 0
        # per open group: the flags to restore at its ")", where its "(" is in out, and the
        # enclosing group's heaviest atom
        self.groups: list[tuple[int, int, int]] = []
        self.atom: int | None = None  # where the last atom starts in out; None: none yet
        self.wrap = False  # the last atom takes no Python quantifier as it is
        self.repeated = False  # the last token was a quantifier
        self.weight = 1  # copies of the innermost thing the last atom makes (RE2 allows 1000)
        self.heaviest = 1  # the largest weight of an atom in the current group
        self.captures = 0  # capturing groups so far
        # Where `*`, `+`, `{n,}` or `{n,m}` repeats something that can match empty, Python's
        # engine may take one more, empty, iteration than RE2 does, and capture other text:
        # `(a*)+` on "aa" gives RE2's group 1 "aa", Python's "". Matching is the same; captures
        # may not be. (`?` and `{n}` capture as RE2 does.)
        self.star_of_empty = False  # a varying repeat of something that can match empty

    def error(self, what: str) -> RegexError:
        return RegexError(f"invalid RE2 regex {self.pattern!r}: {what} are not RE2 syntax")

    def invalid(self, what: str) -> RegexError:
        return RegexError(f"invalid regex {self.pattern!r}: {what}")

    def unsupported(self, what: str, hint: str = "") -> RegexError:
        return RegexError(
            f"regex {self.pattern!r}: {what} valid RE2 but not supported by meshlib{hint}"
        )

    def run(self) -> str:
        p, out, i, n = self.pattern, self.out, 0, len(self.pattern)
        while i < n:
            c = p[i]
            if c not in _RE2_META:
                self.literal(c)
                i += 1
            elif c == "\\":
                i = self.escape(i)
            elif c == "[":
                i = self.char_class(i)
            elif c == "(":
                i = self.group(i)
            elif c == ")":
                if not self.groups:
                    raise self.invalid(f"unexpected ) at position {i}")
                self.flags, at, outer = self.groups.pop()
                out.append(")")
                self.weight = self.heaviest
                self.heaviest = max(outer, self.weight)
                self.atom, self.wrap, self.repeated = at, False, False
                i += 1
            elif c == "|":
                out.append("|")
                self.atom, self.repeated = None, False
                i += 1
            elif c == "^":
                self.push("(?m:^)" if self.flags & _M else "^", empty=True)
                i += 1
            elif c == "$":  # without (?m), RE2's $ is the very end, Python's \Z
                self.push("(?m:$)" if self.flags & _M else "\\Z", empty=True)
                i += 1
            elif c == ".":
                self.push("(?s:.)" if self.flags & _S else ".")
                i += 1
            elif c == "{":
                repeat = self.counted(i)
                if repeat is None:  # a "{" that starts no {n}, {n,} or {n,m} is literal
                    self.literal("{")
                    i += 1
                    continue
                low, high, end = repeat
                if (high >= 0 and high < low) or low > _MAX_REPEAT or high > _MAX_REPEAT:
                    raise self.invalid(
                        f"bad repeat {p[i:end]}: repeat counts are at most {_MAX_REPEAT}"
                        " and {n,m} needs n <= m"
                    )
                count = f"{{{low}}}" if high == low else f"{{{low},{high if high >= 0 else ''}}}"
                i = self.repeat(count, p[i:end], end, high if high >= 0 else low)
            else:  # * + ?
                i = self.repeat(c, c, i + 1, 0)
        if self.groups:
            raise self.invalid("missing ): a group is not closed")
        return "".join(out)

    def push(self, text: str, *, empty: bool = False) -> None:
        """Append one atom (`empty`: an assertion, which Python will not repeat as is)."""
        self.out.append(text)
        self.atom = len(self.out) - 1
        self.wrap, self.repeated, self.weight = empty, False, 1

    def literal(self, char: str) -> None:
        if self.flags & _I:
            orbit = _case_orbit(ord(char))
            if orbit is not None:
                self.push(orbit)
                return
        self.push("\\" + char if char in _PY_META else char)

    def repeat(self, op: str, text: str, i: int, count: int) -> int:
        """A quantifier `op` (RE2 spelling `text`, repeating `count` times at most, 0 for
        unbounded) ends before `i`; a "?" there makes it lazy."""
        p = self.pattern
        lazy = p.startswith("?", i)
        if lazy:
            i += 1
            text += "?"
        if self.repeated:
            raise self.error(
                f"stacked or possessive quantifiers such as a**, a*+ or a*{{2}} ({text!r} here)"
            )
        if self.atom is None:
            raise self.invalid(f"nothing before the quantifier {text!r} to repeat")
        atom = self.atom
        if self.wrap:
            self.out[atom:] = ["(?:" + "".join(self.out[atom:]) + ")"]
        if op != "?" and (op[0] != "{" or "," in op):  # a count that can vary
            self.note_unstable(atom)
        if self.flags & _U:
            lazy = not lazy
        self.out.append(op + "?" if lazy else op)
        self.wrap = self.repeated = True
        if count >= 2:
            self.weight *= count
            if self.weight > _MAX_REPEAT:
                raise self.invalid(
                    f"repeat counts are at most {_MAX_REPEAT}, also multiplied through"
                    f" nested repeats ({text!r} repeats {self.weight} copies)"
                )
            self.heaviest = max(self.heaviest, self.weight)
        return i

    def note_unstable(self, atom: int) -> None:
        """The atom from out[atom] on is about to be repeated a varying number of times (`*`,
        `+`, `{n,}`, `{n,m}`): if it can match empty, Python's engine may take one more, empty,
        iteration than RE2, which can move where any group of the pattern starts or ends."""
        text = "".join(self.out[atom:])
        if text.startswith("(") and _nullable(text):  # a literal or class matches a character
            self.star_of_empty = True

    def counted(self, i: int) -> tuple[int, int, int] | None:
        """RE2's `{n}`, `{n,}` (n, -1) or `{n,m}` at i, and where it ends; None if none."""
        p, n = self.pattern, len(self.pattern)
        low = _integer(p, i + 1)
        if low is None:
            return None
        value, j = low
        if j >= n:
            return None
        high = value
        if p[j] == ",":
            j += 1
            if p.startswith("}", j):
                high = -1
            else:
                bound = _integer(p, j)
                if bound is None:
                    return None
                high, j = bound
        if not p.startswith("}", j):
            return None
        return value, high, j + 1

    def escape(self, i: int) -> int:
        p = self.pattern
        c = p[i + 1 : i + 2]
        if c == "b":
            self.push("(?a:\\b)", empty=True)
        elif c == "B":  # Python's \B never matches an empty text, RE2's does
            self.push("(?a:\\B|\\A\\Z)", empty=True)
        elif c == "A":
            self.push("\\A", empty=True)
        elif c == "z":  # Python's \Z is RE2's \z
            self.push("\\Z", empty=True)
        elif c == "Q":
            end = p.find("\\E", i + 2)
            for char in p[i + 2 :] if end < 0 else p[i + 2 : end]:
                self.literal(char)
            self.repeated = False
            return len(p) if end < 0 else end + 2
        elif c == "C":
            raise self.unsupported("\\C (any byte, which may split a UTF-8 character) is")
        elif c and c in "pP":
            ranges, negated, end = self.unicode_group(i)
            self.push(_class(self.group_set(ranges, negated)))
            return end
        elif c and c in "dDsSwW":
            self.push(_class(self.group_set(_PERL[c.lower()], c.isupper())))
        else:
            code, end = self.escaped_char(i)
            self.literal(chr(code))
            return end
        return i + 2

    def escaped_char(self, i: int) -> tuple[int, int]:
        """RE2's escape for one character at i (octal, hex, C, or punctuation), and where
        it ends."""
        p = self.pattern
        c = p[i + 1 : i + 2]
        if not c:
            raise self.invalid("trailing \\")
        if c in _OCTAL and (c == "0" or p[i + 2 : i + 3] in _OCTAL):
            end = i + 2
            while end < i + 4 and p[end : end + 1] in _OCTAL:
                end += 1
            return int(p[i + 1 : end], 8), end  # \0, \12, \101: RE2 reads octal
        if c in _DIGITS:
            raise self.error("backreferences such as \\1")
        if c == "x":
            if p.startswith("{", i + 2):
                end = p.find("}", i + 3)
                digits = p[i + 3 : end] if end >= 0 else ""
                if digits and all(d in _HEX for d in digits) and int(digits, 16) <= _MAX_RUNE:
                    return int(digits, 16), end + 1
            elif len(digits := p[i + 2 : i + 4]) == 2 and all(d in _HEX for d in digits):
                return int(digits, 16), i + 4
            raise self.invalid(
                f"bad escape at position {i}: RE2 spells a code point \\x41 or \\x{{10FFFF}}"
            )
        if c in _ESCAPES:
            return _ESCAPES[c], i + 2
        if c < "\x80" and not c.isalnum():  # escaped punctuation is itself (\_ too)
            return ord(c), i + 2
        if c == "Z":
            raise self.error("\\Z (RE2 spells the end of text \\z)")
        if c in "uUN":
            raise self.error("\\u, \\U and \\N{...} escapes (RE2 spells a code point \\x{41})")
        if c == "b":
            raise self.error("\\b in a class (a backspace in Python; use \\x08)")
        raise self.error(f"escapes such as \\{c}")

    def group_set(self, ranges: Ranges, negated: bool) -> Ranges:
        """A Perl, POSIX or Unicode class as RE2 adds it: folded under (?i), then negated."""
        if self.flags & _I:
            ranges = _fold(ranges)
        return _negate(ranges) if negated else ranges

    def unicode_group(self, i: int) -> tuple[Ranges, bool, int]:
        """RE2's `\\pL`, `\\p{Lu}`, `\\P{^Lu}` at i: the class, whether negated, its end."""
        p = self.pattern
        negated = p[i + 1] == "P"
        if p.startswith("{", i + 2):
            end = p.find("}", i + 3)
            if end < 0:
                raise self.invalid(f"unclosed Unicode class {p[i : i + 12]!r}")
            name, end = p[i + 3 : end], end + 1
        else:
            name, end = p[i + 2 : i + 3], i + 3
        if name.startswith("^"):
            negated, name = not negated, name[1:]
        if not name:
            raise self.invalid(f"bad Unicode class {p[i:end]!r}")
        if name == "Any":
            return [(0, _MAX_RUNE)], negated, end
        if name not in _CATEGORIES:
            raise self.unsupported(
                f"the Unicode class {p[i:end]!r} is not a general category such as \\pL or"
                " \\p{Lu}: Unicode scripts (\\p{Greek}) are",
                " (Python has no script tables), and other names are not RE2" + _UNICODE_HINT,
            )
        return _categories()[name], negated, end

    def char_class(self, i: int) -> int:
        """RE2's `[...]` at i: its set of code points, written as one explicit class."""
        p, n = self.pattern, len(self.pattern)
        j = i + 1
        negated = p.startswith("^", j)
        if negated:
            j += 1
        ranges: Ranges = []  # folded under (?i) when the class ends
        groups: Ranges = []  # negated groups, folded before they were negated
        first = True  # "]" first is a literal
        while j < n and (p[j] != "]" or first):
            first = False
            if p.startswith("[:", j) and n - j > 2:
                end = p.find(":]", j + 2)
                if end >= 0:
                    name = p[j + 2 : end]
                    chars = _POSIX.get(name.removeprefix("^"))
                    if chars is None:
                        raise self.invalid(f"unknown POSIX class {p[j : end + 2]}")
                    if name.startswith("^"):
                        groups += self.group_set(chars, True)
                    else:
                        ranges += chars
                    j = end + 2
                    continue
            if p[j] == "\\" and j + 1 < n:
                c = p[j + 1]
                if c in "pP" and n - j > 2:
                    chars, group_negated, j = self.unicode_group(j)
                    if group_negated:
                        groups += self.group_set(chars, True)
                    else:
                        ranges += chars
                    continue
                if c in "dDsSwW":
                    if c.isupper():
                        groups += self.group_set(_PERL[c.lower()], True)
                    else:
                        ranges += _PERL[c]
                    j += 2
                    continue
            start = j
            low, j = self.class_char(j)
            high = low
            if p.startswith("-", j) and j + 1 < n and p[j + 1] != "]":
                high, j = self.class_char(j + 1)
                if high < low:
                    raise self.invalid(f"bad class range {p[start:j]!r}")
            ranges.append((low, high))
        if j >= n:
            raise self.invalid(f"missing ]: the class at position {i} is not closed")
        chars = _union(ranges)
        if self.flags & _I:
            chars = _fold(chars)
        if groups:
            chars = _union(chars + groups)
        self.push(_class(_negate(chars) if negated else chars))
        return j + 1

    def class_char(self, j: int) -> tuple[int, int]:
        if self.pattern[j] == "\\":
            return self.escaped_char(j)
        return ord(self.pattern[j]), j + 1

    def group(self, i: int) -> int:
        p, out = self.pattern, self.out
        at = len(out)
        if not p.startswith("(?", i):
            out.append("(")
            self.capture(at)
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
        if rest == "P<" or rest[:1] == "<":
            start = i + 4 if rest == "P<" else i + 3
            end = p.find(">", start)
            name = p[start:end] if end >= 0 else ""
            if not name or any(unicodedata.category(c) not in _NAME_CATEGORIES for c in name):
                raise self.invalid(f"bad group name at position {i}")
            out.append("(")  # names are not needed: rewrites refer to groups by number
            self.capture(at)
            return end + 1
        flags = _FLAGS.match(p, i)
        if flags is None:
            raise self.invalid(f"unknown group syntax at position {i}")
        on, off, kind = flags.groups()
        new = self.flags
        for f in on:
            new |= _FLAG_BITS[f]
        for f in off or "":
            new &= ~_FLAG_BITS[f]
        if kind == ":":
            out.append("(?:")
            self.open(at, self.flags)
        else:  # (?flags) lasts to the end of the enclosing group
            self.repeated = False
        self.flags = new
        return flags.end()

    def capture(self, at: int) -> None:
        self.captures += 1
        self.open(at, self.flags)

    def open(self, at: int, flags: int) -> None:
        self.groups.append((flags, at, self.heaviest))
        self.atom, self.repeated, self.heaviest = None, False, 1


def _nullable(translated: str) -> bool | None:
    """Whether a translated piece can match the empty text; None if it does not compile
    alone (the whole pattern's compilation reports why)."""
    try:
        return re.compile(translated).fullmatch("") is not None
    except re.error:
        return None


def _integer(text: str, i: int) -> tuple[int, int] | None:
    """RE2's repeat count at i (ASCII digits, no leading zero, under 10 digits) and its end."""
    end = i
    while end < len(text) and text[end] in _DIGITS:
        end += 1
    digits = text[i:end]
    if not digits or len(digits) >= 10 or (len(digits) > 1 and digits[0] == "0"):
        return None
    return int(digits), end


def _union(ranges: Ranges) -> Ranges:
    """Sorted, with overlapping and adjacent ranges merged."""
    merged: Ranges = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


def _negate(ranges: Ranges) -> Ranges:
    """The complement of merged ranges."""
    complement: Ranges = []
    start = 0
    for low, high in ranges:
        if low > start:
            complement.append((start, low - 1))
        start = high + 1
    if start <= _MAX_RUNE:
        complement.append((start, _MAX_RUNE))
    return complement


def _fold(ranges: Ranges) -> Ranges:
    """Merged ranges with every code point's case orbit added, as RE2 folds a class."""
    cased, orbits = _case_orbits()
    added: Ranges = []
    for low, high in ranges:
        for code in cased[bisect_left(cased, low) : bisect_right(cased, high)]:
            added += [(c, c) for c in orbits[code]]
    return _union(ranges + added) if added else ranges


def _char(code: int) -> str:
    """One code point, as a literal inside or outside a Python class."""
    char = chr(code)
    if char.isascii() and char.isalnum():
        return char
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _class(ranges: Ranges) -> str:
    """Merged ranges as a Python atom: negated when it holds the top code point, so that
    `[^/]` stays `[^/]` (`re` compiles a class over most of Unicode slowly)."""
    if not ranges:
        return "[^\\x00-\\U0010ffff]"
    negated = ranges[-1][1] == _MAX_RUNE
    if negated:
        ranges = _negate(ranges)
        if not ranges:
            return "(?s:.)"
    elif len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _char(ranges[0][0])
    body = "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges)
    return f"[^{body}]" if negated else f"[{body}]"


@functools.cache
def _case_orbit(code: int) -> str | None:
    """A literal under (?i): the class of the code points it folds with, None if none."""
    if code < 0x80 and not chr(code).isalpha():
        return None
    orbit = _case_orbits()[1].get(code)
    return None if orbit is None else _class([(c, c) for c in orbit])


@functools.cache
def _case_orbits() -> tuple[list[int], dict[int, tuple[int, ...]]]:
    """RE2's case folding: the code points with an orbit (sorted), and each one's orbit,
    the code points equal to it under Unicode simple case folding. Built once, from
    `unicodedata`: the simple folding is `casefold()` where that is one character, else
    the simple lowercase (the "S" entries of CaseFolding.txt are lowercase mappings)."""
    targets: dict[int, set[int]] = {}
    for code in range(_CASED_END):
        char = chr(code)
        folded = char.casefold()
        if len(folded) != 1:
            folded = char.lower()
        if len(folded) == 1 and folded != char:
            targets.setdefault(ord(folded), {ord(folded)}).add(code)
    orbit_of: dict[int, frozenset[int]] = {}
    for members in targets.values():
        orbit = frozenset(members)
        for code in orbit:
            orbit_of[code] = orbit
    for a, b in _EXTRA_FOLDS:
        orbit = orbit_of.get(a, frozenset({a})) | orbit_of.get(b, frozenset({b}))
        for code in orbit:
            orbit_of[code] = orbit
    return sorted(orbit_of), {code: tuple(sorted(o)) for code, o in orbit_of.items()}


@functools.cache
def _categories() -> dict[str, Ranges]:
    """The code points of each Unicode general category RE2 names, built once (0.1 s)."""
    runs: dict[str, Ranges] = {}
    category = unicodedata.category
    start, current = 0, category("\x00")
    for code in range(1, _MAX_RUNE + 2):
        name = category(chr(code)) if code <= _MAX_RUNE else ""
        if name != current:
            runs.setdefault(current, []).append((start, code - 1))
            start, current = code, name
    runs.pop("Cn", None)
    table = dict(runs)
    for major in "CLMNPSZ":
        table[major] = _union([r for name, rs in runs.items() if name[0] == major for r in rs])
    return table


def re2_replace_all(pattern: re.Pattern[str], template: str, text: str) -> str:
    """Every match of `pattern` in `text` replaced with `template` (from `re2_substitution`),
    as RE2's `GlobalReplace` (Envoy's `uriRegexRewrite`) replaces: an empty match right where
    the previous match ended is skipped, where `re.sub` would replace it (`/*$` on `/a/b/`
    gives `/a/b/`, not `/a/b//`)."""
    out: list[str] = []
    pos, last_end, end = 0, -1, len(text)
    while pos <= end:
        match = pattern.search(text, pos)
        if match is None:
            break
        start, stop = match.span()
        out.append(text[pos:start])
        if start == stop == last_end:  # RE2: no empty match where the last match ended
            out.append(text[pos : pos + 1])
            pos += 1
            continue
        out.append(match.expand(template))
        pos = last_end = stop
    out.append(text[pos:])
    return "".join(out)


def re2_substitution(rewrite: str, groups: int, unstable: frozenset[int] = frozenset()) -> str:
    """An RE2 rewrite string as a `re.sub` template; raise RegexError if RE2 would refuse it.

    RE2 knows three escapes: `\\0` (the whole match), `\\1`..`\\9` (a group; one digit, so
    `\\10` is group 1 then "0") and `\\\\` (a backslash). Any other backslash, or a group
    the pattern does not have (it has `groups`), makes the rewrite invalid; one of the
    `unstable` groups (see `unstable_captures`) is refused as unsupported.
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
            if int(escaped) in unstable:
                raise RegexError(
                    f"rewrite {rewrite!r}: \\{escaped} is a group of a regex where *, +, {{n,}} or"
                    " {n,m} repeats something that can match nothing, so RE2 and Python may capture"
                    " different text: valid RE2 but not supported by meshlib in a rewrite (make"
                    " each repeated part match at least one character, e.g. `(\\w+/?)+` for"
                    " `(\\w*/?)+`)"
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
