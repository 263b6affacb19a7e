"""Line numbers of a resource's fields, kept only when asked for (`meshlib check`).

    result = load_paths(["mesh.yaml"], keep_lines=True)
    lines = result.lines[resource.origin]      # FieldLines of one resource
    lines.line("spec.http[0].route[1].destination.host")   # -> 14

Serving never asks: loading then keeps nothing but the values, so policy loads as fast as
before. With `keep_lines`, each resource keeps a reference to the YAML node tree it was read
from (PyYAML builds it anyway), and a field's line is looked up only when a finding names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from meshlib.policy._schema import Path
from meshlib.policy._yaml import child, line_at

_INDEX = re.compile(r"\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]")


@dataclass(frozen=True, slots=True)
class FieldLines:
    """Where the fields of one resource are, in the file it came from."""

    node: yaml.Node  # the resource's mapping node
    line_of_resource: int

    def line(self, field: str | Path | None) -> int:
        """The line of `field` (`spec.http[0].route` or its path), else of its deepest
        ancestor that is in the file, else of the resource."""
        line = self.line_of_resource
        if not isinstance(field, str):
            return line_at(self.node, field or (), line)
        node: yaml.Node = self.node
        rest = field
        while rest:
            found, rest = _child_by_text(node, rest)
            if found is None:
                return line
            line, node = found
        return line


def _child_by_text(node: yaml.Node, text: str) -> tuple[tuple[int, yaml.Node] | None, str]:
    """The child `text` starts with, and what is left of `text` after it. A mapping key may
    itself hold dots or brackets (a header name, a label): the longest key that fits wins."""
    text = text.removeprefix(".")
    index = _INDEX.match(text)
    if index is not None:
        part: str | int = int(index[1]) if index[1] is not None else index[2]
        return child(node, part), text[index.end() :]
    if isinstance(node, yaml.MappingNode):
        best: tuple[int, yaml.Node] | None = None
        best_length = -1
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            name = key.value
            if (
                len(name) > best_length
                and text.startswith(name)
                and text[len(name) : len(name) + 1] in ("", ".", "[")
            ):
                best, best_length = (key.start_mark.line + 1, value), len(name)
        if best is not None:
            return best, text[best_length:]
    return None, ""
