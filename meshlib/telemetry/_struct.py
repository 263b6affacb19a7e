"""The protobuf wire format of `google.protobuf.Struct`, as far as Istio's metadata exchange
uses it: string values, and Structs of string values one level down (the `LABELS`).

Istio's sidecars send their workload's metadata as such a Struct, serialized and base64-
encoded (peer.py). Two small functions do here what the protobuf runtime would, which meshlib
does not otherwise need: `encode` writes a Struct deterministically (map keys in order, as
Envoy's `serializeToStringDeterministic`), `decode` reads one from the network without
raising, its work bounded by the count of fields (`MAX_FIELDS`) as well as by the length the
caller allows (peer.MAX_ISTIO_HEADER_LENGTH).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MAX_FIELDS", "StructValue", "decode", "encode"]

StructValue = str | Mapping[str, str]

# Field numbers (google/protobuf/struct.proto): Struct.fields = 1 (map entries: key = 1,
# value = 2); Value.string_value = 3, Value.struct_value = 5.
_ENTRY = 0x0A  # field 1, length-delimited
_VALUE = 0x12  # field 2, length-delimited
_STRING = 0x1A  # field 3, length-delimited
_STRUCT = 0x2A  # field 5, length-delimited

# What `decode` reads at most: protobuf fields in all, four per key or label (the entry, its
# key, its value, the value's kind). A sidecar's whole node metadata with 176 pod labels, 15.8
# KiB of base64, has about 700; a crafted message of thousands of empty fields, which costs
# more per byte to read than any real one, stops here (about 0.4 ms in pure Python, as the
# real 15.8 KiB one takes).
MAX_FIELDS = 2048


def encode(fields: Mapping[str, StructValue]) -> bytes:
    """`fields` as a serialized Struct, keys in order (deterministic, as Envoy writes it)."""
    out = bytearray()
    for key in sorted(fields):
        value = fields[key]
        if isinstance(value, str):
            encoded = _field(_STRING, value.encode())
        else:
            encoded = _field(_STRUCT, encode(value))
        out += _field(_ENTRY, _field(_ENTRY, key.encode()) + _field(_VALUE, encoded))
    return bytes(out)


def decode(data: bytes, max_fields: int = MAX_FIELDS) -> dict[str, StructValue] | None:
    """The string values of the Struct `data` holds, and those of its Structs one level down;
    other values (numbers, lists, deeper Structs) and strings that are not UTF-8 are skipped.
    None when `data` is not a well-formed Struct, or holds more than `max_fields` protobuf
    fields in all: the work is bounded by the count of fields as well as by the length."""
    reader = _Reader(max_fields)
    fields = reader.struct(data, nested=True)
    return fields if reader.left >= 0 else None


class _Reader:
    """One `decode`: the fields it may still read."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def struct(self, data: bytes, nested: bool) -> dict[str, StructValue] | None:
        fields: dict[str, StructValue] = {}
        entries = self.fields(data)
        if entries is None:
            return None
        for number, entry in entries:
            if number != 1 or not isinstance(entry, bytes):
                continue
            parts = self.fields(entry)
            if parts is None:
                return None
            key: str | None = None
            value: StructValue | None = None
            for part_number, part in parts:
                if not isinstance(part, bytes):
                    continue
                if part_number == 1:
                    key = _text(part)
                elif part_number == 2:
                    value = self.value(part, nested)
            if key is not None and value is not None:
                fields[key] = value
        return fields

    def value(self, data: bytes, nested: bool) -> StructValue | None:
        """A Value's string, or Struct of strings; of a oneof set twice, the last, as protobuf
        reads it."""
        parts = self.fields(data)
        if parts is None:
            return None
        value: StructValue | None = None
        for number, part in parts:
            if number == 3 and isinstance(part, bytes):
                value = _text(part)
            elif number == 5 and nested and isinstance(part, bytes):
                inner = self.struct(part, nested=False)
                value = (
                    None
                    if inner is None
                    else {k: v for k, v in inner.items() if isinstance(v, str)}
                )
            elif 1 <= number <= 6:  # another kind of value set last: not a string
                value = None
        return value

    def fields(self, data: bytes) -> list[tuple[int, bytes | int]] | None:
        """The (field number, value) pairs of one message: bytes for length-delimited fields,
        an int for the others. None for a malformed message (a truncated field, a wire type
        that does not exist), and once the budget of fields is spent."""
        out: list[tuple[int, bytes | int]] = []
        at, end = 0, len(data)
        while at < end:
            self.left -= 1
            if self.left < 0:
                return None
            tag = data[at]  # tags and lengths under 128, as most are: one byte, no call
            if tag < 0x80:
                at += 1
            else:
                tag, at = _varint(data, at)
                if tag < 0:
                    return None
            number, wire = tag >> 3, tag & 7
            if wire == 2:  # length-delimited
                if at < end and data[at] < 0x80:
                    length = data[at]
                    at += 1
                else:
                    length, at = _varint(data, at)
                    if length < 0:
                        return None
                if at + length > end:
                    return None
                out.append((number, data[at : at + length]))
                at += length
            elif wire == 0:  # varint
                value, at = _varint(data, at)
                if value < 0:
                    return None
                out.append((number, value))
            elif wire == 1 or wire == 5:  # fixed 64 or 32 bits
                at += 8 if wire == 1 else 4
                if at > end:
                    return None
                out.append((number, 0))
            else:  # groups (3, 4) are not in proto3; 6 and 7 do not exist
                return None
        return out


def _text(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and where it ends; (-1, at) when truncated or over 64 bits."""
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    return -1, at


def _field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _length(len(payload)) + payload


def _length(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
