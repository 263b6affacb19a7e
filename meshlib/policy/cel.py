"""CEL in Telemetry `accessLogging[].filter.expression`: what Istio accepts, what meshlib runs.

    condition = parse_filter("response.code >= 500 || response.flags != '-'")

Istio's validation parses the expression with cel-go and rejects the resource when that fails
(`validateTelemetryFilter` in pkg/config/validation: "must be a valid CEL expression"); it
checks nothing else, since attributes and functions are Envoy's business at run time. meshlib
reads the expression by CEL's grammar (cel-go `parser/gen/CEL.g4`) and keeps the part it
evaluates: `response.code <op> <integer>`, `response.flags ==/!= "<flags>"` or `0`, joined
with `&&`, `||`, `!` and parentheses. `parse_filter` returns that part as a `Condition`
(plain values, which the access log compiles into a predicate) or raises:

- `MalformedExpression`: not CEL by its grammar (a syntax error, a character no CEL token
  starts with, an unterminated string, nothing at all). Istio rejects the resource; so does
  meshlib's validation.
- `UnsupportedExpression`: valid CEL outside the subset. The access log then logs every
  request, and `meshlib check` says so.

When in doubt an expression counts as unsupported, never as malformed: the grammar is read
generously (escapes, trailing commas, `.?` / `[?` optional syntax, backquoted names), and the
checks cel-go makes past the grammar (reserved words, macro arguments, literal ranges, escape
sequences) are not repeated. Parentheses, brackets, braces and calls nested deeper than 64 are
unsupported too: a limit of this parser's own, well inside Python's recursion limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "AllOf",
    "AnyOf",
    "Comparison",
    "Condition",
    "MalformedExpression",
    "Not",
    "UnsupportedExpression",
    "parse_filter",
]


class UnsupportedExpression(ValueError):
    """A filter expression outside the CEL subset meshlib evaluates."""

    def __init__(self, expression: str, why: str) -> None:
        super().__init__(f"{expression!r}: {why}")
        self.expression = expression
        self.why = why

    def __reduce__(self) -> tuple[type[UnsupportedExpression], tuple[str, str]]:
        return (type(self), (self.expression, self.why))  # picklable, as the errors in errors.py


class MalformedExpression(UnsupportedExpression):
    """A filter expression that is not CEL at all: Istio's validation rejects it."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """`response.code <symbol> value` (an int), or `response.flags ==/!= value` (text or 0)."""

    attribute: str
    symbol: str
    value: int | str


@dataclass(frozen=True, slots=True)
class AllOf:
    terms: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    terms: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    term: Condition


Condition = Comparison | AllOf | AnyOf | Not


def parse_filter(expression: str) -> Condition:
    """The condition `expression` states; see the module docstring for what raises."""
    try:
        node = _condition(_Parser(expression).parse())
    except RecursionError:  # a caller already deep in its stack: 64 levels did not fit
        raise UnsupportedExpression(expression, "nested too deep") from None
    if isinstance(node, _Opaque):
        raise UnsupportedExpression(expression, node.why)
    return node


# -- what the parser builds besides conditions ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attribute:
    name: str  # dotted: "response.code"


@dataclass(frozen=True, slots=True)
class _Literal:
    value: int | str | bool | None
    text: str


@dataclass(frozen=True, slots=True)
class _Opaque:
    """Valid CEL meshlib does not evaluate; `why` names what (one reason of maybe several)."""

    why: str


_Node = Comparison | AllOf | AnyOf | Not | _Attribute | _Literal | _Opaque


def _describe(node: _Node) -> str:
    if isinstance(node, _Attribute):
        return repr(node.name)
    return node.text if isinstance(node, _Literal) else "a condition"


def _condition(node: _Node) -> Condition | _Opaque:
    if isinstance(node, _Attribute | _Literal):
        return _Opaque(f"{_describe(node)} alone is not a condition")
    return node


# -- tokens: CEL's lexer rules ----------------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<space>(?:[ \t\r\n\f]+|//[^\n]*)+)
    | (?P<float>[0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+
        |\.[0-9]+(?:[eE][+-]?[0-9]+)?)
    | (?P<uint>(?:0x[0-9a-fA-F]+|[0-9]+)[uU])
    | (?P<int>0x[0-9a-fA-F]+|[0-9]+)
    | (?P<raw>[bB]?[rR](?:'''.*?'''|\"\"\".*?\"\"\"|'[^'\n\r]*'|"[^"\n\r]*"))
    | (?P<str>[bB]?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
        |'(?:\\.|[^\\'\n\r])*'|"(?:\\.|[^\\"\n\r])*"))
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*|`[^`\n\r]*`)
    | (?P<op>==|!=|<=|>=|&&|\|\||[<>!()\[\]{}.,\-?:+*/%])
    """,
    re.VERBOSE | re.DOTALL,
)
_PLAIN_STRING = re.compile(r"'[^'\\]*'|\"[^\"\\]*\"")  # the only strings meshlib compares
_DECIMAL = re.compile(r"[0-9]{1,18}[uU]?")
_RELATIONS = ("==", "!=", "<", "<=", ">", ">=", "in")
_MIRROR = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_ARITHMETIC = ("+", "-", "*", "/", "%")
_KEYWORDS: dict[str, bool | None] = {"true": True, "false": False, "null": None}
_ATTRIBUTES = ("response.code", "response.flags")
_MAX_NESTING = 64

Token = tuple[str, str, int]  # kind, text, position


def _tokens(expression: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if match is None:
            raise MalformedExpression(
                expression, f"unexpected {expression[position]!r} at {position}"
            )
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group(), position))
        position = match.end()
    return tokens


# -- the grammar ------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over CEL's grammar, one method per rule (read generously):

    expr := or ('?' or ':' expr)?;  or := and ('||' and)*;  and := relation ('&&' relation)*
    relation := calc (('<' | '<=' | '>=' | '>' | '==' | '!=' | 'in') calc)*
    calc := unary (('*' | '/' | '%' | '+' | '-') unary)*;  unary := '!'* member | '-'+ member
    member := primary ('.' '?'? name call? | '[' '?'? expr ']' | '{' entries '}')*
    primary := '.'? name call? | '(' expr ')' | '[' items ']' | '{' entries '}' | literal
    """

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens = _tokens(expression)
        self.index = 0
        self.depth = 0

    def parse(self) -> _Node:
        if not self.tokens:
            raise MalformedExpression(self.expression, "empty")
        node = self.expr()
        if self.index < len(self.tokens):
            raise self.malformed(f"unexpected {self.tokens[self.index][1]!r}")
        return node

    # -- reading tokens

    def malformed(self, why: str) -> MalformedExpression:
        if self.index < len(self.tokens):
            return MalformedExpression(self.expression, f"{why} at {self.tokens[self.index][2]}")
        return MalformedExpression(self.expression, f"{why} at the end")

    def peek(self) -> str | None:
        """The next token's text (None at the end)."""
        return self.tokens[self.index][1] if self.index < len(self.tokens) else None

    def accept(self, text: str) -> bool:
        if self.peek() == text:
            self.index += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise self.malformed(f"expected {text!r}")

    def take(self) -> Token:
        if self.index == len(self.tokens):
            raise MalformedExpression(self.expression, "ends too early")
        self.index += 1
        return self.tokens[self.index - 1]

    def enclosed(self, closer: str, item: Callable[[], object]) -> None:
        """Items up to `closer`, one level deeper; past the limit, give up (unsupported)."""
        self.enter()
        self.items(closer, item)
        self.depth -= 1

    def enter(self) -> None:
        if self.depth == _MAX_NESTING:
            raise UnsupportedExpression(self.expression, f"nested more than {_MAX_NESTING} deep")
        self.depth += 1

    # -- the rules

    def expr(self) -> _Node:
        node = self.either()
        if not self.accept("?"):
            return node
        self.either()
        self.expect(":")
        self.expr()
        return _Opaque("the conditional operator (?:)")

    def either(self) -> _Node:
        terms = [self.both()]
        while self.accept("||"):
            terms.append(self.both())
        return terms[0] if len(terms) == 1 else _joined(AnyOf, terms)

    def both(self) -> _Node:
        terms = [self.relation()]
        while self.accept("&&"):
            terms.append(self.relation())
        return terms[0] if len(terms) == 1 else _joined(AllOf, terms)

    def relation(self) -> _Node:
        left = self.calc()
        symbols: list[str] = []
        right = left
        while self.peek() in _RELATIONS:
            symbols.append(self.take()[1])
            right = self.calc()
        if not symbols:
            return left
        if len(symbols) > 1 or symbols[0] == "in":
            return _Opaque(f"the operators {' '.join(symbols)}")
        return _comparison(left, symbols[0], right)

    def calc(self) -> _Node:
        node = self.unary()
        while self.peek() in _ARITHMETIC:
            symbol = self.take()[1]
            self.unary()
            node = _Opaque(f"arithmetic ({symbol})")
        return node

    def unary(self) -> _Node:
        nots = minuses = 0
        while self.accept("!"):
            nots += 1
        while not nots and self.peek() == "-" and not self.signed_number():
            self.index += 1
            minuses += 1
        node = self.member()
        if minuses:
            return _Opaque("negation (-)")
        if nots % 2 == 0:  # cel-go drops an even run of '!'
            return node
        term = _condition(node)
        return term if isinstance(term, _Opaque) else Not(term)

    def signed_number(self) -> bool:
        """Whether a '-' is next and is the sign of the number after it (a literal in CEL)."""
        after = self.index + 1
        return (
            self.peek() == "-"
            and after < len(self.tokens)
            and self.tokens[after][0] in ("int", "float")
        )

    def member(self) -> _Node:
        node = self.primary()
        while True:
            if self.accept("."):
                node = self.selection(node)
            elif self.accept("["):
                self.index_operand()
                node = _Opaque("indexing ([...])")
            elif self.accept("{"):
                self.enclosed("}", self.entry)
                node = _Opaque("a message literal ({...})")
            else:
                return node

    def selection(self, node: _Node) -> _Node:
        optional = self.accept("?")
        name = self.name("a field name after '.'")
        if self.accept("("):
            self.enclosed(")", self.expr)
            return _Opaque(f"the function {name}()")
        if optional:
            return _Opaque("optional selection (.?)")
        if isinstance(node, _Attribute):
            return _Attribute(f"{node.name}.{name}")
        return node if isinstance(node, _Opaque) else _Opaque(f"a field of {_describe(node)}")

    def name(self, wanted: str) -> str:
        kind, text, _ = self.take()
        if kind != "name":
            self.index -= 1
            raise self.malformed(f"expected {wanted}")
        return text

    def index_operand(self) -> None:
        self.enter()
        self.accept("?")
        self.expr()
        self.expect("]")
        self.depth -= 1

    def primary(self) -> _Node:
        if self.signed_number():
            self.index += 2
            return _Opaque("a negative number")
        kind, text, _ = self.take()
        if kind == "name" and text != "in":
            return self.identifier(text)
        if kind == "op":
            return self.group(text)
        if kind in ("int", "uint") and _DECIMAL.fullmatch(text):
            return _Literal(int(text.rstrip("uU")), text)
        if kind == "str" and _PLAIN_STRING.fullmatch(text):
            return _Literal(text[1:-1], text)
        if kind in ("int", "uint", "float"):
            return _Opaque(f"the number {text}")
        if kind in ("str", "raw"):
            return _Opaque(f"the string {text} (escapes, raw, bytes or triple quotes)")
        self.index -= 1
        raise self.malformed(f"unexpected {text!r}")

    def identifier(self, name: str) -> _Node:
        if name in _KEYWORDS:
            return _Literal(_KEYWORDS[name], name)
        if self.accept("("):
            self.enclosed(")", self.expr)
            return _Opaque(f"the function {name}()")
        return _Attribute(name)

    def group(self, symbol: str) -> _Node:
        if symbol == "(":
            self.enter()
            node = self.expr()
            self.expect(")")
            self.depth -= 1
            return node
        if symbol == "[":
            self.enclosed("]", self.expr)
            return _Opaque("a list ([...])")
        if symbol == "{":
            self.enclosed("}", self.entry)
            return _Opaque("a map ({...})")
        if symbol == ".":  # a name in the root scope: `.response.code`
            self.identifier(self.name("a name after '.'"))
            return _Opaque("a root-scoped name (.name)")
        self.index -= 1
        raise self.malformed(f"unexpected {symbol!r}")

    def entry(self) -> _Node:
        """A map entry or a message field, `key: value` (`?key: value` when optional)."""
        self.accept("?")
        self.expr()
        self.expect(":")
        return self.expr()

    def items(self, closer: str, item: Callable[[], object]) -> None:
        """Items up to `closer`, separated by commas; a trailing comma, or a lone one, is fine."""
        if self.accept(","):
            self.expect(closer)
            return
        while not self.accept(closer):
            item()
            if not self.accept(","):
                self.expect(closer)
                return


def _joined(kind: type[AnyOf] | type[AllOf], nodes: list[_Node]) -> _Node:
    """`a || b || c` as one AnyOf (AllOf for &&), flat: evaluating never recurses per term."""
    terms: list[Condition] = []
    for node in nodes:
        term = _condition(node)
        if isinstance(term, _Opaque):
            return term
        terms.append(term)
    return kind(tuple(terms))


def _comparison(left: _Node, symbol: str, right: _Node) -> _Node:
    if isinstance(right, _Attribute) and not isinstance(left, _Attribute):
        left, right, symbol = right, left, _MIRROR[symbol]
    if isinstance(left, _Opaque):
        return left
    if isinstance(right, _Opaque):
        return right
    if not isinstance(left, _Attribute):
        return _Opaque(f"no attribute in {_describe(left)} {symbol} {_describe(right)}")
    if left.name not in _ATTRIBUTES:
        return _Opaque(f"unsupported attribute {_describe(left)}")
    if not isinstance(right, _Literal) or right.value is None or isinstance(right.value, bool):
        return _Opaque(f"expected a number or a string, got {_describe(right)}")
    return _typed(left.name, symbol, right.value)


def _typed(attribute: str, symbol: str, value: int | str) -> _Node:
    if attribute == "response.code":
        if not isinstance(value, int):
            return _Opaque("response.code compares with an integer")
        return Comparison(attribute, symbol, value)
    if symbol not in ("==", "!="):
        return _Opaque("response.flags supports only == and !=")
    if isinstance(value, int) and value != 0:
        return _Opaque("response.flags compares with 0 (no flag) or a flag string")
    return Comparison(attribute, symbol, value)
