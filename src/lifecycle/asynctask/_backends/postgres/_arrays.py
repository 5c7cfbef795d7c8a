"""One-dimensional PostgreSQL arrays in binary, built in one pass, for the settlement's and the new tasks'
columns.

psycopg adapts a Python ``list`` by looking at its elements first (their types, to choose the array type)
and then dumping them one by one through a generic dumper: for the eight column arrays of a settlement of
32 tasks that was about 110 µs of the worker's CPU per batch (a third of the settlement's client time). A
list of one of these classes says its array type itself, and the dumpers registered on the backend's pooled
connections (see :func:`register`) write PostgreSQL's binary array format directly. On a connection without
them (the caller's, in the transactional outbox), they are plain lists to psycopg, adapted as any list is.
"""

from __future__ import annotations

import struct
from typing import Any

from psycopg.adapt import AdaptersMap, Buffer, Dumper
from psycopg.pq import Format

__all__ = ["BytesArray", "FloatArray", "Int8Array", "IntArray", "TextArray", "register"]

_HEADER = struct.Struct("!iiIii")  # dimensions, has nulls, element type, length, lower bound
_EMPTY = struct.Struct("!iiI")  # an empty array: no dimensions
_LENGTH = struct.Struct("!i")
_FLOAT = struct.Struct("!id")  # the element's length (8), then the value
_INT4 = struct.Struct("!ii")  # the element's length (4), then the value
_INT8 = struct.Struct("!iq")  # the element's length (8), then the value
_NULL = _LENGTH.pack(-1)

_TEXT_OID, _TEXT_ARRAY_OID = 25, 1009
_BYTEA_OID, _BYTEA_ARRAY_OID = 17, 1001
_INT4_OID, _INT4_ARRAY_OID = 23, 1007
_INT8_OID, _INT8_ARRAY_OID = 20, 1016
_FLOAT8_OID, _FLOAT8_ARRAY_OID = 701, 1022


class TextArray(list[str | None]):
    """A list sent as ``text[]``."""

    __slots__ = ()


class BytesArray(list[bytes | None]):
    """A list sent as ``bytea[]``."""

    __slots__ = ()


class IntArray(list[int | None]):
    """A list sent as ``int4[]``."""

    __slots__ = ()


class Int8Array(list[int | None]):
    """A list sent as ``int8[]``."""

    __slots__ = ()


class FloatArray(list[float | None]):
    """A list sent as ``float8[]`` (ints are sent as floats)."""

    __slots__ = ()


def _array(element_oid: int, count: int, has_null: bool, parts: list[bytes]) -> bytes:
    if not count:
        return _EMPTY.pack(0, 0, element_oid)
    parts[0] = _HEADER.pack(1, 1 if has_null else 0, element_oid, count, 1)
    return b"".join(parts)


def _repeated(element_oid: int, count: int, element: bytes) -> bytes:
    """The binary array of ``count`` times one element (its length and bytes already packed, or ``_NULL``)."""
    return _HEADER.pack(1, 1 if element == _NULL else 0, element_oid, count, 1) + element * count


def _uniform(values: list[Any]) -> bool:
    """Whether ``values`` (not empty) holds one value throughout, as a batch's name, queue or unset
    options mostly do: compared at C speed, then packed once."""
    return values.count(values[0]) == len(values)


def _varlen_array(element_oid: int, values: list[bytes | None]) -> bytes:
    """The binary array of ``values`` (each element's bytes already made, ``None`` for NULL)."""
    parts = [b""]
    has_null = False
    pack = _LENGTH.pack
    for data in values:
        if data is None:
            has_null = True
            parts.append(_NULL)
        else:
            parts.append(pack(len(data)))
            parts.append(data)
    return _array(element_oid, len(values), has_null, parts)


def _fixed_array(element_oid: int, item: struct.Struct, size: int, values: list[Any]) -> bytes:
    """The binary array of ``values``, each packed by ``item`` with its length ``size`` first (NULL: -1)."""
    pack = item.pack
    if values and _uniform(values):
        first = values[0]
        # Not a zero, unless all are ints: 0.0 == -0.0 == 0, and the floats differ in binary.
        if first is None or first != 0 or all(type(value) is int for value in values):
            return _repeated(element_oid, len(values), _NULL if first is None else pack(size, first))
    parts = [b""]
    parts.extend(_NULL if value is None else pack(size, value) for value in values)
    return _array(element_oid, len(values), None in values, parts)


class _TextArrayDumper(Dumper):
    format = Format.BINARY
    oid = _TEXT_ARRAY_OID

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        # The connection's encoding, as psycopg's own text dumpers use it.
        self._encoding = "utf-8" if self.connection is None else self.connection.info.encoding

    def dump(self, obj: Any) -> Buffer:
        encoding = self._encoding
        if obj and _uniform(obj):
            first = obj[0]
            data = _NULL if first is None else _LENGTH.pack(len(encoded := first.encode(encoding))) + encoded
            return _repeated(_TEXT_OID, len(obj), data)
        return _varlen_array(_TEXT_OID, [None if value is None else value.encode(encoding) for value in obj])


class _BytesArrayDumper(Dumper):
    format = Format.BINARY
    oid = _BYTEA_ARRAY_OID

    def dump(self, obj: Any) -> Buffer:
        return _varlen_array(_BYTEA_OID, [None if value is None else bytes(value) for value in obj])


class _IntArrayDumper(Dumper):
    format = Format.BINARY
    oid = _INT4_ARRAY_OID

    def dump(self, obj: Any) -> Buffer:
        return _fixed_array(_INT4_OID, _INT4, 4, obj)


class _Int8ArrayDumper(Dumper):
    format = Format.BINARY
    oid = _INT8_ARRAY_OID

    def dump(self, obj: Any) -> Buffer:
        return _fixed_array(_INT8_OID, _INT8, 8, obj)


class _FloatArrayDumper(Dumper):
    format = Format.BINARY
    oid = _FLOAT8_ARRAY_OID

    def dump(self, obj: Any) -> Buffer:
        return _fixed_array(_FLOAT8_OID, _FLOAT, 8, obj)


def register(adapters: AdaptersMap) -> None:
    """Have ``adapters`` (a pooled connection's) dump the array classes of this module directly."""
    adapters.register_dumper(TextArray, _TextArrayDumper)
    adapters.register_dumper(BytesArray, _BytesArrayDumper)
    adapters.register_dumper(IntArray, _IntArrayDumper)
    adapters.register_dumper(Int8Array, _Int8ArrayDumper)
    adapters.register_dumper(FloatArray, _FloatArrayDumper)
