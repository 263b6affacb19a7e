"""Turn plain YAML/JSON data into frozen policy dataclasses, reporting every problem.

The dataclasses in this package *are* the schema: field names map to Istio's camelCase keys,
annotations give the types, and `spec_field(...)` adds bounds, required-ness and "ignored in
library mode" notes. A converter is compiled once per type and reports each problem to a
`Sink` with its path (`spec.http[0].route[1].weight`), so one pass finds every error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, Protocol, Union, get_args, get_origin

Path = tuple[str | int, ...]
Converter = Callable[[Any, Path, "Sink"], Any]


class _Invalid:
    """Marks a value that failed conversion (its errors have been reported)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()
EMPTY_MAP: Mapping[Any, Any] = MappingProxyType({})


class Sink(Protocol):
    """Where conversion reports what it finds."""

    def error(self, path: Path, message: str) -> None: ...

    def warning(self, path: Path, message: str) -> None: ...


def format_path(path: Path) -> str:
    """`("spec", "http", 0, "route")` -> `spec.http[0].route`."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif out and not part.replace("-", "").replace("_", "").isalnum():
            out.append(f"[{part!r}]")
        else:
            out.append(f".{part}" if out else part)
    return "".join(out)


def describe(value: Any) -> str:
    """A short name for the YAML type of `value`, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclasses.dataclass(frozen=True, slots=True)
class IntRange:
    """The range of a protobuf integer type. Istio decodes policy into protobuf, which refuses
    a value beyond it; checked where a field's type is `Int32`, `UInt32` (or an Optional one)."""

    name: str
    low: int
    high: int


Int32 = Annotated[int, IntRange("int32", -(2**31), 2**31 - 1)]
UInt32 = Annotated[int, IntRange("uint32", 0, 2**32 - 1)]
UInt64 = Annotated[int, IntRange("uint64", 0, 2**64 - 1)]


def spec_field(
    default: Any = None,
    *,
    key: str | None = None,
    required: bool = False,
    ge: float | None = None,
    le: float | None = None,
    ignored: str | None = None,
) -> Any:
    """Declare a policy field. `ignored` names why library mode ignores it (a warning)."""
    meta = {"key": key, "required": required, "ge": ge, "le": le, "ignored": ignored}
    if isinstance(default, Mapping):
        return dataclasses.field(default_factory=lambda: EMPTY_MAP, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def camel(name: str) -> str:
    """`consecutive_5xx_errors` -> `consecutive5xxErrors` (a trailing `_` is dropped)."""
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def spelled(value: Any) -> Any:
    """A converted policy value as Istio spells it again (`consecutive5xxErrors: 5`,
    `interval: 1.5s`), leaving out unset fields and those library mode ignores."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if hasattr(type(value), "parse_policy"):  # a value written as one string: a Duration
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.metadata.get("key") or camel(f.name): spelled(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not _unset(getattr(value, f.name)) and not f.metadata.get("ignored")
        }
    if isinstance(value, Mapping):
        return {str(key): spelled(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [spelled(item) for item in value]
    return str(value)


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, (tuple, Mapping)) and not value)


def convert(tp: Any, value: Any, path: Path, sink: Sink) -> Any:
    """Convert `value` to type `tp`; returns INVALID after reporting errors."""
    return converter_for(tp)(value, path, sink)


_cache: dict[Any, Converter] = {}


def converter_for(tp: Any) -> Converter:
    """The converter for a type annotation, compiled once."""
    try:
        return _cache[tp]
    except (KeyError, TypeError):
        pass
    conv = _build(tp)
    with contextlib.suppress(TypeError):  # an unhashable annotation is just not cached
        _cache[tp] = conv
    return conv


def _build(tp: Any) -> Converter:
    if tp is Any:
        return lambda value, path, sink: value
    if get_origin(tp) is Annotated:  # Int32 and kin: a field's converter checks the range
        return converter_for(get_args(tp)[0])
    parse = getattr(tp, "parse_policy", None)
    if parse is not None:  # a scalar type with its own syntax, e.g. Duration
        return typing.cast(Converter, parse)
    if dataclasses.is_dataclass(tp):
        return _message_converter(typing.cast(type, tp))
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        return _enum_converter(args)
    if origin in (Union, types.UnionType):
        return _union_converter(args)
    if origin is tuple:
        return _list_converter(converter_for(args[0]))
    if origin in (Mapping, dict, MappingProxyType) or (
        isinstance(origin, type) and issubclass(origin, Mapping)
    ):
        return _map_converter(converter_for(args[0]), converter_for(args[1]))
    if tp in _SCALARS:
        return _SCALARS[tp]
    raise TypeError(f"no policy converter for {tp!r}")


def _scalar(check: Callable[[Any], bool], expected: str) -> Converter:
    def conv(value: Any, path: Path, sink: Sink) -> Any:
        if check(value):
            return value
        sink.error(path, f"must be {expected}, not {describe(value)}")
        return INVALID

    return conv


def _to_float(value: Any, path: Path, sink: Sink) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
        # YAML's .nan and .inf: JSON, so Kubernetes, cannot carry them, and no bound holds
        # them back (every comparison with NaN is false).
        sink.error(path, f"must be a finite number, not {value}")
        return INVALID
    sink.error(path, f"must be a number, not {describe(value)}")
    return INVALID


def _to_int(value: Any, path: Path, sink: Sink) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        # kubectl turns YAML into JSON with Go's encoder, which writes a whole float below
        # 1e21 as an integer (`50.0`, and `1e+06` as Helm renders a large number, arrive as
        # 50 and 1000000), so Kubernetes and Istio take it where an integer is due.
        return int(value)
    sink.error(path, f"must be an integer, not {describe(value)}")
    return INVALID


_SCALARS: dict[Any, Converter] = {
    str: _scalar(lambda v: isinstance(v, str), "a string"),
    int: _to_int,
    bool: _scalar(lambda v: isinstance(v, bool), "true or false"),
    float: _to_float,
}


def _enum_converter(choices: tuple[Any, ...]) -> Converter:
    allowed = frozenset(choices)
    text = ", ".join(str(c) for c in choices)

    def conv(value: Any, path: Path, sink: Sink) -> Any:
        if isinstance(value, str) and value in allowed:
            return value
        sink.error(path, f"invalid value {value!r} (allowed: {text})")
        return INVALID

    return conv


def _union_converter(args: tuple[Any, ...]) -> Converter:
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        return converter_for(members[0])  # Optional[X]: null is handled by the caller
    scalar_types = tuple(m for m in members if m in (str, int, bool))
    if len(scalar_types) != len(members):
        raise TypeError(f"unions other than scalars are not supported: {args!r}")
    text = " or ".join(describe(t()) for t in scalar_types)

    def conv(value: Any, path: Path, sink: Sink) -> Any:
        if isinstance(value, scalar_types) and not (
            isinstance(value, bool) and bool not in members
        ):
            return value
        sink.error(path, f"must be {text}, not {describe(value)}")
        return INVALID

    return conv


def _list_converter(item: Converter) -> Converter:
    def conv(value: Any, path: Path, sink: Sink) -> Any:
        if not isinstance(value, list):
            sink.error(path, f"must be a list, not {describe(value)}")
            return INVALID
        out = []
        ok = True
        for index, element in enumerate(value):
            if element is None:
                sink.error((*path, index), "must not be null")
                ok = False
                continue
            converted = item(element, (*path, index), sink)
            if converted is INVALID:
                ok = False
            out.append(converted)
        return tuple(out) if ok else INVALID

    return conv


def _map_converter(key: Converter, item: Converter) -> Converter:
    def conv(value: Any, path: Path, sink: Sink) -> Any:
        if not isinstance(value, dict):
            sink.error(path, f"must be an object (a map), not {describe(value)}")
            return INVALID
        out = {}
        ok = True
        for k, element in value.items():
            where = (*path, str(k))
            converted_key = key(k, where, sink)
            converted = INVALID if element is None else item(element, where, sink)
            if element is None:
                sink.error(where, "must not be null")
            if converted is INVALID or converted_key is INVALID:
                ok = False
            else:
                out[converted_key] = converted
        return MappingProxyType(out) if ok else INVALID

    return conv


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    key: str
    convert: Converter
    required: bool
    ge: float | None
    le: float | None
    integer: IntRange | None
    ignored: str | None
    bounded: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        bounded = self.ge is not None or self.le is not None or self.integer is not None
        object.__setattr__(self, "bounded", bounded)


def _integer_range(tp: Any) -> IntRange | None:
    """The IntRange of a field's type: `Int32`, or `Int32 | None`."""
    members = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    for member in members:
        if get_origin(member) is Annotated:
            return next((m for m in member.__metadata__ if isinstance(m, IntRange)), None)
    return None


def _message_converter(cls: type) -> Converter:
    module = sys.modules[cls.__module__]
    hints = typing.get_type_hints(cls, vars(module), include_extras=True)
    specs: dict[str, _FieldSpec] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        key = meta.get("key") or camel(f.name)
        specs[key] = _FieldSpec(
            name=f.name,
            key=key,
            convert=_placeholder(hints[f.name]),
            required=bool(meta.get("required")),
            ge=meta.get("ge"),
            le=meta.get("le"),
            integer=_integer_range(hints[f.name]),
            ignored=meta.get("ignored"),
        )
    required = [s for s in specs.values() if s.required]
    allowed = ", ".join(specs)
    validate = getattr(cls, "validate_policy", None)

    def conv(value: Any, path: Path, sink: Sink) -> Any:
        if not isinstance(value, dict):
            sink.error(path, f"must be an object, not {describe(value)}")
            return INVALID
        kwargs: dict[str, Any] = {}
        ok = True
        for key, element in value.items():
            spec = specs.get(key) if isinstance(key, str) else None
            where = (*path, str(key))
            if spec is None:
                close = difflib.get_close_matches(str(key), specs, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                sink.error(where, f"unknown field ({hint}allowed: {allowed})")
                ok = False
                continue
            if element is None:  # null means unset, as in protobuf JSON
                continue
            converted = spec.convert(element, where, sink)
            if converted is INVALID:
                ok = False
                continue
            if spec.bounded and not _in_bounds(converted, spec, where, sink):
                ok = False
                continue
            if spec.ignored:
                sink.warning(where, f"ignored: {spec.ignored}")
            kwargs[spec.name] = converted
        for spec in required:
            if spec.name not in kwargs and value.get(spec.key) is None and spec.key in value:
                sink.error((*path, spec.key), "is required and must not be null")
                ok = False
            elif spec.key not in value:
                sink.error((*path, spec.key), "is required")
                ok = False
        if not ok:
            return INVALID
        obj = cls(**kwargs)
        if validate is not None:
            validate(obj, path, sink)
        return obj

    return conv


def _placeholder(tp: Any) -> Converter:
    """Resolve nested converters lazily, so recursive and forward types work."""
    resolved: list[Converter] = []

    def conv(value: Any, path: Path, sink: Sink) -> Any:
        if not resolved:
            resolved.append(converter_for(tp))
        return resolved[0](value, path, sink)

    return conv


def _in_bounds(value: Any, spec: _FieldSpec, path: Path, sink: Sink) -> bool:
    number = getattr(value, "seconds", value)
    unit = "s" if hasattr(value, "seconds") else ""
    if spec.ge is not None and number < spec.ge:
        sink.error(path, f"must be >= {_num(spec.ge)}{unit}")
        return False
    if unit and spec.ge == 0.001 and round(number * 1e6) % 1000:
        sink.error(path, "only durations to millisecond precision are supported")
        return False
    if spec.le is not None and number > spec.le:
        sink.error(path, f"must be <= {_num(spec.le)}{unit}")
        return False
    integer = spec.integer
    if integer is not None and not integer.low <= number <= integer.high:
        bound = f">= {integer.low}" if number < integer.low else f"<= {integer.high}"
        sink.error(path, f"must be {bound} (the {integer.name} range)")
        return False
    return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
