"""Read YAML documents and remember where each value came from.

Values are converted to plain Python (dict, list, str, int, float, bool, None). The YAML
node tree is kept beside them so that an error found later, by field path, can name its
line; nothing is spent on positions while a file is valid.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from meshlib.policy._schema import Path

try:  # libyaml's parser is an order of magnitude faster; the pure-Python one is the fallback
    _Base: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Base = yaml.SafeLoader


class _Loader(_Base):  # type: ignore[misc]
    """The safe loader, remembering each scalar's implicit tag: the parser asks the Python
    resolver once per node, and policy files repeat the same keys and values thousands of
    times. (A safe loader has no path resolvers, so the tag depends on these three only.)"""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._tags: dict[tuple[Any, str, Any], str] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is not yaml.ScalarNode:
            return super().resolve(kind, value, implicit)
        key = (value, implicit[0], implicit[1])
        tag = self._tags.get(key)
        if tag is None:
            tag = super().resolve(kind, value, implicit)
            if tag in _KUBECTL_STRINGS or (tag in _NUMBERS and ":" in value):
                tag = _STR
            elif tag == _STR and implicit[0] and _GO_FLOAT.match(value.replace("_", "")):
                tag = _FLOAT
            tag = self._tags[key] = tag
        return tag


# Guards against alias bombs ("billion laughs"): a file expands to at most this many values
# more than it has characters (without aliases, every value takes at least one character).
MAX_ALIAS_VALUES = 1_000_000
# Policy nests about ten levels deep; this bound keeps deep garbage from exhausting the stack.
MAX_DEPTH = 100

_constructor = yaml.constructor.SafeConstructor()
_STR = "tag:yaml.org,2002:str"
# Plain values PyYAML reads as YAML 1.1 dates, sexagesimal numbers (`1:30`) and the `=` value
# key, but which kubectl's reader (go-yaml v2, through sigs.k8s.io/yaml) keeps as strings:
# read as strings too, so that a label `release: 2024-01-01` means what it means to kubectl.
_KUBECTL_STRINGS = frozenset({"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"})
_FLOAT = "tag:yaml.org,2002:float"
_NUMBERS = frozenset({"tag:yaml.org,2002:int", _FLOAT})
# Plain values go-yaml v2 reads as floats and PyYAML's YAML 1.1 rules as strings: an exponent
# without a '.' or without a sign (`1e+06`, which Helm writes for large numbers, `1e3`,
# `1.5e3`), and digits with a leading zero that are not octal (`08`). Go's pattern (its
# yamlStyleFloat), tried as go-yaml does on the value without its underscores; `re.match`
# with `\Z`, so that a trailing newline does not match.
_GO_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z")


class YAMLProblem(Exception):
    """A document that cannot be read, with the line where reading failed."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


# YAML 1.2 streams are UTF-8, UTF-16 or UTF-32, named by a byte-order mark (none: UTF-8).
# kubectl reads UTF-16 files with one (Windows PowerShell's `>` writes UTF-16LE so), and
# UTF-8 ones. UTF-32LE's mark begins with UTF-16LE's, so it is tried first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32LE"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32BE"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
)


def decode(data: bytes) -> str:
    """The text of a YAML stream: `data` in the encoding its byte-order mark names (the mark
    is kept, as U+FEFF, which the parser skips), else UTF-8. YAMLProblem, with its line, for
    bytes that are not text in that encoding."""
    marked = next(((codec, name) for bom, codec, name in _BOMS if data.startswith(bom)), None)
    codec, name = marked or ("utf-8", "UTF-8")
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise _undecodable(data, exc, name, marked is not None) from None
    if marked is None and "\x00" in text:  # never in YAML: UTF-16 or 32 written without a mark
        raise YAMLProblem(
            "NUL bytes: UTF-16 or UTF-32 text without a byte-order mark? Save it as UTF-8"
            " (or with a byte-order mark)",
            text.count("\n", 0, text.index("\x00")) + 1,
        )
    return text


def _undecodable(data: bytes, exc: UnicodeDecodeError, name: str, marked: bool) -> YAMLProblem:
    """Where `data` stops being `name` text: the line, and the bytes."""
    line = data[: exc.start].decode(exc.encoding, "replace").count("\n") + 1
    bad = " ".join(f"0x{byte:02x}" for byte in data[exc.start : exc.end])
    what = f"byte {bad}" if exc.end - exc.start == 1 else f"bytes {bad}"
    if not marked:  # a comment saved as Latin-1, say
        return YAMLProblem(f"not UTF-8 text ({what})", line)
    return YAMLProblem(f"not {name} text, as its byte-order mark says ({what}: {exc.reason})", line)


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document: its data, and its node tree for finding lines."""

    data: Any
    node: yaml.Node | None
    line: int  # 1-based line where the document starts

    def line_of(self, path: Path) -> int:
        """The line of the value at `path`, or of its deepest ancestor that exists."""
        return line_at(self.node, path, self.line)


def line_at(node: yaml.Node | None, path: Path, line: int) -> int:
    """The line of the value at `path` under `node` (itself at `line`), or of its deepest
    ancestor that exists."""
    for part in path:
        found = child(node, part)
        if found is None:
            return line
        line, node = found
    return line


def child(node: yaml.Node | None, part: str | int) -> tuple[int, yaml.Node] | None:
    """The line of `part` (a mapping's key, a sequence's index) in `node`, and its value."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key.start_mark.line + 1, value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item = node.value[part]
        return item.start_mark.line + 1, item
    return None


def read_documents(text: str) -> Iterator[Document | YAMLProblem]:
    """Yield each document in `text`, or the problem that makes it unreadable.

    A document with a bad value (a duplicate key, say) is one problem and the next document
    is still read; a syntax error ends the stream, as nothing after it can be trusted.
    """
    loader = _Loader(text)
    builder = _Builder(MAX_ALIAS_VALUES + len(text))  # one budget for the whole file
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            try:
                data = builder.build(node)
            except YAMLProblem as bad_document:
                yield bad_document
                if builder.budget <= 0:
                    return  # the next documents would fail the same way, each at a cost
                continue
            yield Document(data=data, node=node, line=node.start_mark.line + 1)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if problem == _FLOW_COLON and exc.context_mark and exc.problem_mark:
            problem += _quote_hint(text, exc.context_mark, exc.problem_mark)
        elif exc.context and exc.context_mark and mark and exc.context_mark.line < mark.line:
            # An unclosed quote or bracket fails lines later, at the end of the file, say:
            # the line to fix is where it opened.
            problem += f" ({exc.context} that started at line {exc.context_mark.line + 1})"
        yield YAMLProblem(f"invalid YAML: {problem}", mark.line + 1 if mark else None)
    except yaml.YAMLError as exc:
        yield YAMLProblem(f"invalid YAML: {exc}", None)
    except RecursionError:  # the pure-Python parser composes nested nodes recursively
        yield YAMLProblem(f"invalid YAML: nested more than {MAX_DEPTH} levels deep", None)
    finally:
        loader.dispose()


# libyaml ends an unquoted value at a ':' before ',', ']' or '}' inside [...] or {...} (as
# YAML 1.2 says), where go-yaml, so kubectl, reads on: `[2001:db8::]`, written so in Istio's
# own examples, is an error here. Changing that would take a parser of our own; the message
# says what to write instead.
_FLOW_COLON = "found unexpected ':'"


def _quote_hint(text: str, start: yaml.Mark, colon: yaml.Mark) -> str:
    """What to write instead of the unquoted value from `start` to the `colon` it ends in."""
    value = text.removeprefix("\ufeff")[start.index : colon.index + 1]  # marks skip a BOM
    if not value.endswith(":") or "\n" in value or "\r" in value:
        return " (inside [...] or {...}, quote a value with ':' before ',', ']' or '}')"
    return f" at the end of {value} (inside [...] or {{...}}, quote it: {json.dumps(value)})"


class _Builder:
    """Node tree -> plain values, rejecting what Kubernetes' YAML reader rejects; at most
    `budget` values in all, over every document it builds."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.active: set[int] = set()  # the collections being built: an alias back into one
        # is a cycle, and their number is the depth

    def build(self, node: yaml.Node) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _problem(node, "file too large for its size (alias expansion?)")
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR:  # the common case, without the constructor's overhead
                return node.value
            constructor = _constructor.yaml_constructors.get(node.tag)
            if constructor is None:
                raise _problem(node, f"unsupported YAML tag {node.tag}")
            try:
                return constructor(_constructor, node)
            except (yaml.YAMLError, ValueError, TypeError) as exc:
                raise _problem(node, f"bad {node.tag.rsplit(':', 1)[-1]} value: {exc}") from None
        if id(node) in self.active:
            raise _problem(node, "recursive alias")
        if len(self.active) >= MAX_DEPTH:
            raise _problem(node, f"nested more than {MAX_DEPTH} levels deep")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(child) for child in node.value]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node)
        finally:
            self.active.discard(id(node))
        raise _problem(node, "unsupported YAML node")  # pragma: no cover

    def _mapping(self, node: yaml.MappingNode) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        written: set[Any] = set()  # keys written out in this mapping, not merged into it
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._merge(key_node, value_node, out)
                continue
            key = self.build(key_node)
            if isinstance(key, (list, dict)):
                raise _problem(key_node, "a mapping key must be a scalar")
            if key in written:
                raise _problem(key_node, f"duplicate key {key!r}")
            written.add(key)
            out[key] = self.build(value_node)
        return out

    def _merge(self, key_node: yaml.Node, value_node: yaml.Node, out: dict[Any, Any]) -> None:
        """`<<: *defaults` (or a list of them), as go-yaml v2, so kubectl, reads it: the
        merged mapping's keys are set where the `<<` stands, over the keys before it, and
        the keys after it override them; in a list the first mapping wins."""
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise _problem(key_node, "a merge key (<<) takes a mapping or a list of them")
            out.update(self.build(source))


def _problem(node: yaml.Node, message: str) -> YAMLProblem:
    return YAMLProblem(f"invalid YAML: {message}", node.start_mark.line + 1)
