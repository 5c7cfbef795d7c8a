"""How task arguments and results become bytes: the :class:`Encoding` protocol, :class:`JSONEncoding` (the
safe default) and :class:`PickleEncoding` (opt-in, for trusted backends only)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import inspect
import itertools
import json
import math
import pickle
import re
import sys
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Protocol, TypeVar, overload, runtime_checkable
from zoneinfo import ZoneInfo

from .._checks import check_count
from ._names import public_module

__all__ = ["Encoding", "JSONEncoding", "PickleEncoding"]

T = TypeVar("T", bound=type)

_TAG = "__lifecycle__"
"""The key that marks a JSON object as an encoded non-JSON value. A user dict that has this key (or any key
that is not a string) is itself encoded as a tagged list of pairs, so nothing can be mistaken for a tag."""

DEFAULT_MAX_DEPTH = 200
"""How deeply :class:`JSONEncoding` lets arrays and objects nest by default: far more than any argument
list needs, far less than Python's recursion limit, so neither ``encode`` nor ``decode`` can hit it."""

_MAX_MAX_DEPTH = 10_000

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_TUPLE_HEAD = f'{{"{_TAG}":"tuple","v":['
_TUPLE_ITEMS = len(_TUPLE_HEAD) - 1  # where the list starts
# Configured once: json.dumps with these options builds a new JSONEncoder on every call. An encoder keeps only
# its options (each encode() makes its own C encoder), so one is shared by every call and thread.
_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), check_circular=False)
# The C encoder that _JSON.encode() builds on every call (iterencode's one-shot path), built once from the
# same arguments, so the same text: a stateless object without circular-reference markers. ``None`` where
# the C accelerator is missing; _JSON is used then.
_C_MAKE_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
_ENCODE_ONCE: Any = (
    None
    if _C_MAKE_ENCODER is None
    else _C_MAKE_ENCODER(
        None,
        _JSON.default,
        json.encoder.encode_basestring_ascii,
        None,
        _JSON.key_separator,
        _JSON.item_separator,
        _JSON.sort_keys,
        _JSON.skipkeys,
        _JSON.allow_nan,
    )
)


@runtime_checkable
class Encoding(Protocol):
    """Turns task arguments and results into bytes and back.

    ``encode`` raises ``TypeError`` naming the value it cannot encode (``enqueue`` calls it before anything is
    stored, so a bad argument never reaches the backend). ``decode`` raises ``ValueError`` for bytes it cannot
    decode (the worker then makes the task ``dead`` with that error). ``decode(encode(x))`` must equal ``x``
    and have the same types.

    The worker does not rely on these rules for its safety: any exception from ``decode`` of a task's
    arguments makes that task ``dead`` naming it, and any exception from ``encode`` of a result stores the
    task as succeeded without a result (logged); neither reaches the worker.
    """

    def encode(self, value: Any) -> bytes:
        """The bytes for ``value``; ``TypeError`` when it cannot be encoded."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value ``data`` was encoded from; ``ValueError`` when ``data`` is not a valid encoding."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Codec:
    name: str
    cls: type
    to_data: Callable[[Any], Any]
    from_data: Callable[[Any], Any]


class JSONEncoding:
    """The default encoding: JSON text, readable in the database, safe to decode from any source.

    Round-trips, to the same types: ``None``, ``bool``, ``int``, ``float`` (also ``nan`` and infinities),
    ``str``, ``list``, ``dict`` (any hashable keys), ``tuple``, ``set``, ``frozenset``, ``bytes``,
    ``bytearray``, ``datetime`` / ``date`` / ``time`` (naive, fixed-offset or ``zoneinfo.ZoneInfo``),
    ``timedelta``, ``UUID``, ``Decimal``, ``Enum`` members (of a class imported in the worker), and
    instances of classes registered with :meth:`register` (dataclasses, NamedTuples, attrs classes, or
    anything with your own ``encode``/``decode`` pair). Types are matched exactly: a subclass of ``dict`` or
    an unregistered dataclass is a ``TypeError`` at ``enqueue`` that says what to register.

    Producers and workers must register the same classes under the same names.

    Arrays and objects may nest at most ``max_depth`` levels deep in the JSON text (default 200; a tuple,
    set, ``bytes`` value or registered object counts one level more than a list, for its tag object).
    ``encode`` refuses a deeper value with a ``TypeError``, and ``decode`` refuses deeper bytes with a
    ``ValueError`` before parsing them, so no payload can exhaust Python's recursion limit. Give producers and
    workers the same ``max_depth``.

    ``decode`` raises nothing but ``ValueError``, whatever the bytes: a malformed tagged value names its tag.

    Example::

        encoding = JSONEncoding()

        @encoding.register
        @dataclass
        class Point:
            x: int
            y: int

        tasks = AsyncTasks(backend, encoding=encoding)
    """

    def __init__(self, *, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        if check_count(max_depth, "JSONEncoding(max_depth=...)", minimum=1) > _MAX_MAX_DEPTH:
            raise ValueError(
                f"JSONEncoding(max_depth=...) must be at most {_MAX_MAX_DEPTH}, got {max_depth!r}"
            )
        self._max_depth = max_depth
        self._by_type: dict[type, _Codec] = {}
        self._by_name: dict[str, _Codec] = {}
        self._aliases: dict[str, _Codec] = {}  # older names, decoded but never written
        decoder = json.JSONDecoder(object_hook=self._object_hook)  # one scanner for every decode
        self._scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once  # type: ignore[attr-defined]
        self._encoders: dict[type, Callable[[Any], Any]] = {
            str: _same,
            int: _same,
            bool: _same,
            type(None): _same,
            float: _float,
            list: self._list,
            dict: self._dict,
            tuple: self._tuple,
            set: self._set,
            frozenset: self._frozenset,
            bytes: _bytes,
            bytearray: _bytearray,
            dt.datetime: _datetime,
            dt.date: _date,
            dt.time: _time,
            dt.timedelta: _timedelta,
            uuid.UUID: _uuid,
            Decimal: _decimal,
        }

    def __repr__(self) -> str:
        return f"JSONEncoding(registered={sorted(self._by_name)!r}, max_depth={self._max_depth})"

    @property
    def max_depth(self) -> int:
        """How deeply arrays and objects may nest in a payload (see the class docstring)."""
        return self._max_depth

    @overload
    def register(self, cls: T, /, *, name: str | None = None) -> T: ...

    @overload
    def register(
        self,
        cls: None = None,
        /,
        *,
        name: str | None = None,
        encode: Callable[[Any], Any] | None = None,
        decode: Callable[[Any], Any] | None = None,
    ) -> Callable[[T], T]: ...

    @overload
    def register(
        self,
        cls: T,
        /,
        *,
        name: str | None = None,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
    ) -> T: ...

    def register(
        self,
        cls: type | None = None,
        /,
        *,
        name: str | None = None,
        encode: Callable[[Any], Any] | None = None,
        decode: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Let instances of ``cls`` be task arguments and results; returns ``cls`` (usable as a decorator).

        Dataclasses, NamedTuples and attrs classes work as they are: their ``__init__`` fields are encoded
        by name, and the class is rebuilt by calling it with them. For any other class pass ``encode`` (the
        instance -> any encodable value) and ``decode`` (that value -> the instance). ``name`` (default
        ``module.qualname``) is what the payload stores; keep it stable across refactors and identical in
        producers and workers. Enums need no registration, but registering one pins its stored name.

        Raises ``TypeError`` when ``cls`` is not a class or cannot be rebuilt from its fields (say how with
        ``encode``/``decode``), ``ValueError`` when the name or the class is registered already.
        """
        if cls is None:
            return lambda real: self.register(real, name=name, encode=encode, decode=decode)
        if not isinstance(cls, type):
            raise TypeError(f"register() takes a class, got {cls!r}")
        if (encode is None) != (decode is None):
            raise TypeError(f"register({cls.__qualname__}): pass both encode= and decode=, or neither")
        codec_name = name if name is not None else f"{public_module(cls.__module__)}.{cls.__qualname__}"
        if not isinstance(codec_name, str) or not codec_name:
            raise TypeError(f"register({cls.__qualname__}): name must be a non-empty string, got {name!r}")
        if cls in self._encoders:
            raise ValueError(
                f"{cls.__qualname__} is encoded natively by JSONEncoding: no need to register it"
            )
        if codec_name in self._by_name:
            raise ValueError(
                f"the name {codec_name!r} is already registered for {self._by_name[codec_name].cls!r}: "
                "pass another name="
            )
        if cls in self._by_type:
            raise ValueError(f"{cls!r} is already registered as {self._by_type[cls].name!r}")
        if encode is not None and decode is not None:
            codec = _Codec(codec_name, cls, encode, decode)
        else:
            codec = _codec_for_class(codec_name, cls)
        self._by_type[cls] = codec
        self._by_name[codec_name] = codec
        if name is None and cls.__module__ == "__main__":
            # Payloads a script wrote as "__main__.Cls" (before classes were named after its module).
            self._aliases.setdefault(f"__main__.{cls.__qualname__}", codec)
        return cls

    # -- encode ---------------------------------------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        """JSON bytes for ``value``; ``TypeError`` naming the first value that cannot be encoded, or saying
        that it nests deeper than ``max_depth``."""
        try:
            text = _plain_tuple_text(value)  # the usual payload: an argument tuple of plain values
            if text is not None and self._max_depth >= _PLAIN_TUPLE_DEPTH:
                return text.encode()
            tree = self._convert(value)
            text = "".join(_ENCODE_ONCE(tree, 0)) if _ENCODE_ONCE is not None else _JSON.encode(tree)
        except RecursionError:
            raise TypeError(
                "cannot encode a value that contains itself, or nests deeper than JSONEncoding allows "
                f"(max_depth={self._max_depth}): flatten it"
            ) from None
        except ValueError as exc:  # e.g. an int beyond sys.get_int_max_str_digits()
            raise TypeError(f"cannot encode a value as JSON: {exc}") from None
        depth = _depth(text, self._max_depth)
        if depth > self._max_depth:
            raise TypeError(
                f"cannot encode a value nested {depth} levels deep: JSONEncoding allows "
                f"max_depth={self._max_depth} (a tuple, set or registered object counts two levels); flatten "
                "it, or give producers and workers a JSONEncoding(max_depth=...) that fits"
            )
        return text.encode()

    def _convert(self, value: Any) -> Any:
        converter = self._encoders.get(type(value))
        if converter is not None:
            return converter(value)
        codec = self._by_type.get(type(value))
        if codec is not None:
            return {_TAG: "obj", "cls": codec.name, "v": self._convert(codec.to_data(value))}
        if isinstance(value, enum.Enum):
            cls = type(value)
            return {
                _TAG: "enum",
                "cls": f"{public_module(cls.__module__)}:{cls.__qualname__}",
                "v": self._convert(value.value),
            }
        raise TypeError(_cannot_encode(value))

    def _list(self, value: list[Any]) -> Any:
        convert = self._convert
        return [convert(item) for item in value]

    def _tuple(self, value: tuple[Any, ...]) -> Any:
        convert = self._convert
        return {_TAG: "tuple", "v": [convert(item) for item in value]}

    def _set(self, value: set[Any]) -> Any:
        convert = self._convert
        return {_TAG: "set", "v": [convert(item) for item in value]}

    def _frozenset(self, value: frozenset[Any]) -> Any:
        convert = self._convert
        return {_TAG: "frozenset", "v": [convert(item) for item in value]}

    def _dict(self, value: dict[Any, Any]) -> Any:
        convert = self._convert
        if _TAG not in value and all(type(key) is str for key in value):
            return {key: convert(item) for key, item in value.items()}
        return {_TAG: "dict", "v": [[convert(key), convert(item)] for key, item in value.items()]}

    # -- decode ---------------------------------------------------------------------------------------------

    def decode(self, data: bytes) -> Any:
        """The value encoded in ``data``; ``ValueError`` saying what is wrong with it, and nothing else,
        whatever the bytes (non-UTF-8 text, a malformed tagged value, nesting beyond ``max_depth``, ...)."""
        try:
            # Decoded here rather than by json.loads (which does the same), so that the depth is measured on
            # the text itself whatever its encoding (UTF-8, -16 or -32).
            given: object = data
            if type(given) is bytes and given[:1] in (b"{", b"[") and given[1:2] != b"\x00":
                # What encode() writes (once per task run: its arguments): json.detect_encoding says UTF-8
                # for these first bytes.
                text = given.decode("utf-8", "surrogatepass")
            elif isinstance(given, str):
                text = given
            elif isinstance(given, bytes | bytearray | memoryview):
                raw = bytes(given)
                text = raw.decode(json.detect_encoding(raw), "surrogatepass")
            else:
                raise _DecodeError(f"JSONEncoding.decode() takes bytes, got {type(given).__name__}")
            limit = self._max_depth
            # Else it cannot nest deeper than the limit (a short text, the usual payload, not even that many).
            if len(text) > limit and text.count("[") + text.count("{") > limit:
                depth = _depth(text, limit)
                if depth > limit:
                    raise _DecodeError(
                        f"not a valid JSONEncoding payload: it nests {depth} levels deep, more than "
                        f"max_depth={limit} allows (a payload this encoding wrote never does: was it "
                        "written with a larger JSONEncoding(max_depth=...), or corrupted?)"
                    )
            if text.startswith(_TUPLE_HEAD) and text.endswith("]}"):
                # An argument tuple as encode() writes it: its list read alone, then made a tuple, as the
                # tag's object hook would (read whole again, as json reads it, when anything follows it).
                try:
                    items, end = self._scan(text, _TUPLE_ITEMS)
                except StopIteration as missing:  # a value missing inside: what json.loads raises then
                    raise json.JSONDecodeError("Expecting value", text, missing.value) from None
                if end == len(text) - 1:
                    return tuple(items)
            return self._parse(text)
        except _DecodeError as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:
            raise ValueError(f"not a valid JSONEncoding payload: {type(exc).__name__}: {exc}") from None

    def _parse(self, text: str) -> Any:
        """``json.loads(text, object_hook=...)`` with one scanner made once, not one per call."""
        try:
            value, end = self._scan(text, 0)
        except StopIteration:  # a value missing, or not at the very start (whitespace first): json's way
            return json.loads(text, object_hook=self._object_hook)
        if end != len(text):
            rest = text[end:].lstrip(" \t\n\r")  # what json allows after a value
            if rest:
                raise json.JSONDecodeError("Extra data", text, len(text) - len(rest))
        return value

    def _object_hook(self, obj: dict[str, Any]) -> Any:
        tag = obj.get(_TAG)
        if tag is None:
            return obj
        try:
            return self._tagged(tag, obj)
        except _DecodeError:
            raise
        except Exception as exc:
            raise _DecodeError(
                f"not a valid JSONEncoding payload: a malformed {_short(tag)} value {_short(obj.get('v'))} "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def _tagged(self, tag: object, obj: dict[str, Any]) -> Any:
        if not isinstance(tag, str):
            raise _DecodeError(f"not a valid JSONEncoding payload: the tag {_short(tag)} is not a string")
        decoder = _DECODERS.get(tag)
        if decoder is not None:
            return decoder(obj)
        if tag == "obj":
            name = obj["cls"]
            codec = self._by_name.get(name) or self._aliases.get(name) if isinstance(name, str) else None
            if codec is None:
                raise _DecodeError(
                    f"the payload holds an instance of {_short(name)}, which is not registered with this "
                    "JSONEncoding: call encoding.register(cls) in the worker as in the producer"
                )
            try:
                return codec.from_data(obj["v"])
            except _DecodeError:
                raise
            except Exception as exc:
                raise _DecodeError(
                    f"not a valid JSONEncoding payload: cannot rebuild {name!r} from {_short(obj['v'])} "
                    f"({type(exc).__name__}: {exc})"
                ) from None
        if tag == "enum":
            return _enum_member(obj["cls"], obj["v"], self._by_name)
        raise _DecodeError(f"unknown JSONEncoding tag {_short(tag)} (written by a newer version?)")


class PickleEncoding:
    """Encodes with :mod:`pickle`: any picklable object, but UNSAFE on a backend others can write to.

    Unpickling runs code chosen by whoever wrote the bytes, so use it only when every producer and everyone
    with write access to the backend is trusted. Payloads are opaque in the database, and tied to the class
    layout of the code that wrote them.
    """

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self._protocol = protocol

    def __repr__(self) -> str:
        return f"PickleEncoding(protocol={self._protocol})"

    def encode(self, value: Any) -> bytes:
        """Pickled bytes; ``TypeError`` when ``value`` cannot be pickled."""
        try:
            return pickle.dumps(value, protocol=self._protocol)
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            raise TypeError(f"cannot pickle {type(value).__name__} value: {exc}") from None

    def decode(self, data: bytes) -> Any:
        """The unpickled value; ``ValueError`` when ``data`` cannot be unpickled."""
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise ValueError(f"cannot unpickle payload: {type(exc).__name__}: {exc}") from None


class _DecodeError(Exception):
    pass


def _same(value: Any) -> Any:
    return value


_ENCODE_STR = json.encoder.encode_basestring_ascii  # what the encoder writes a str with (ensure_ascii)
_PLAIN_TUPLE_START = "".join(_JSON.iterencode({_TAG: "tuple", "v": []}))[:-2]  # '{"__lifecycle__":...,"v":['
_PLAIN_TUPLE_DEPTH = 2  # how deeply the text of a tuple of plain values nests: its tag object, its list


def _plain_tuple_text(value: Any) -> str | None:
    """The text ``JSONEncoding.encode`` writes for ``value`` when it is a tuple of ``int``, ``str``, ``bool``
    and ``None`` only (the usual arguments of a task), written here item by item instead of as a tree for
    the JSON encoder (a quarter of its CPU); ``None`` for any other value. An ``int`` too long for
    ``repr`` raises the ``ValueError`` the encoder would."""
    if type(value) is not tuple:
        return None
    items = []
    for item in value:
        kind = type(item)
        if kind is int:
            items.append(int.__repr__(item))
        elif kind is str:
            items.append(_ENCODE_STR(item))
        elif item is None:
            items.append("null")
        elif item is True:
            items.append("true")
        elif item is False:
            items.append("false")
        else:
            return None
    return _PLAIN_TUPLE_START + ",".join(items) + "]}"


def _float(value: float) -> Any:
    if math.isfinite(value):
        return value
    return {_TAG: "float", "v": repr(value)}


def _bytes(value: bytes) -> Any:
    return {_TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}


def _bytearray(value: bytearray) -> Any:
    return {_TAG: "bytearray", "v": base64.b64encode(value).decode("ascii")}


def _zone(value: dt.datetime | dt.time) -> dict[str, Any]:
    tz = value.tzinfo
    extra: dict[str, Any] = {}
    if value.fold:
        extra["fold"] = 1
    if tz is None or type(tz) is dt.timezone:
        return extra
    if isinstance(tz, ZoneInfo) and tz.key:
        extra["tz"] = tz.key
        return extra
    raise TypeError(
        f"cannot encode {type(value).__name__} with tzinfo {tz!r}: use a datetime.timezone offset or a "
        "zoneinfo.ZoneInfo zone, so it decodes to the same zone"
    )


def _datetime(value: dt.datetime) -> Any:
    zone = _zone(value)
    if zone.get("tz"):
        return {_TAG: "datetime", "v": value.replace(tzinfo=None).isoformat(), **zone}
    return {_TAG: "datetime", "v": value.isoformat(), **zone}


def _date(value: dt.date) -> Any:
    return {_TAG: "date", "v": value.isoformat()}


def _time(value: dt.time) -> Any:
    zone = _zone(value)
    if zone.get("tz"):
        return {_TAG: "time", "v": value.replace(tzinfo=None).isoformat(), **zone}
    return {_TAG: "time", "v": value.isoformat(), **zone}


def _timedelta(value: dt.timedelta) -> Any:
    return {_TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}


def _uuid(value: uuid.UUID) -> Any:
    return {_TAG: "uuid", "v": str(value)}


def _decimal(value: Decimal) -> Any:
    return {_TAG: "decimal", "v": str(value)}


def _decode_datetime(obj: dict[str, Any]) -> dt.datetime:
    value = dt.datetime.fromisoformat(obj["v"])
    if "tz" in obj:
        value = value.replace(tzinfo=ZoneInfo(obj["tz"]))
    return value.replace(fold=obj.get("fold", 0))


def _decode_time(obj: dict[str, Any]) -> dt.time:
    value = dt.time.fromisoformat(obj["v"])
    if "tz" in obj:
        value = value.replace(tzinfo=ZoneInfo(obj["tz"]))
    return value.replace(fold=obj.get("fold", 0))


def _decode_decimal(obj: dict[str, Any]) -> Decimal:
    text = obj["v"]
    if not isinstance(text, str):
        raise TypeError("a decimal is stored as a string")
    try:
        return Decimal(text)
    except ArithmeticError:  # decimal.InvalidOperation
        raise ValueError("not a decimal number") from None


def _decode_dict(obj: dict[str, Any]) -> dict[Any, Any]:
    return {key: item for key, item in obj["v"]}


_DECODERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tuple": lambda obj: tuple(obj["v"]),
    "dict": _decode_dict,
    "set": lambda obj: set(obj["v"]),
    "frozenset": lambda obj: frozenset(obj["v"]),
    "float": lambda obj: float(obj["v"]),
    "bytes": lambda obj: base64.b64decode(obj["v"], validate=True),
    "bytearray": lambda obj: bytearray(base64.b64decode(obj["v"], validate=True)),
    "datetime": _decode_datetime,
    "date": lambda obj: dt.date.fromisoformat(obj["v"]),
    "time": _decode_time,
    "timedelta": lambda obj: dt.timedelta(days=obj["v"][0], seconds=obj["v"][1], microseconds=obj["v"][2]),
    "uuid": lambda obj: uuid.UUID(obj["v"]),
    "decimal": _decode_decimal,
}


def _enum_member(path: object, value: Any, registered: dict[str, _Codec]) -> enum.Enum:
    if not isinstance(path, str):
        raise _DecodeError(f"not a valid JSONEncoding payload: the enum class {_short(path)} is not a string")
    codec = registered.get(path)
    cls: Any = codec.cls if codec is not None else None
    if cls is None:
        module_name, _, qualname = path.partition(":")
        # Only classes of modules the worker already imported: a payload must never make us import code, so
        # attributes are read from __dict__ (no module __getattr__, no descriptors).
        cls = sys.modules.get(module_name)
        if cls is None and module_name == public_module("__main__"):  # written by this very script
            cls = sys.modules.get("__main__")
        for part in qualname.split("."):
            namespace = getattr(cls, "__dict__", None)
            cls = namespace.get(part) if isinstance(namespace, Mapping) else None
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
        raise _DecodeError(
            f"the payload holds a member of enum {path!r}, which this worker has not imported: import its "
            "module in the worker (or encoding.register(cls) it)"
        )
    try:
        return cls(value)
    except ValueError:
        raise _DecodeError(
            f"not a valid JSONEncoding payload: {_short(value)} is not a value of enum {path!r}"
        ) from None


def _depth(text: str, limit: int) -> int:
    """How deeply arrays and objects nest in the JSON ``text`` (brackets inside strings do not count): exact
    when more than ``limit``; otherwise a bound that is at most ``limit``."""
    brackets = text.count("[") + text.count("{")
    if brackets <= limit:  # the common case, at C speed: it cannot nest deeper than it has brackets
        return brackets
    skeleton = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, skeleton)), default=0)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _codec_for_class(name: str, cls: type) -> _Codec:
    if issubclass(cls, enum.Enum):
        enum_cls: Any = cls
        return _Codec(name, cls, lambda member: member.value, lambda data: enum_cls(data))
    if dataclasses.is_dataclass(cls):
        field_names = [field.name for field in dataclasses.fields(cls) if field.init]
        _check_rebuildable(cls, field_names)
        return _Codec(name, cls, _field_getter(field_names), _keyword_builder(cls))
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        field_names = list(cls._fields)
        return _Codec(name, cls, _field_getter(field_names), _keyword_builder(cls))
    attrs_fields = getattr(cls, "__attrs_attrs__", None)
    if attrs_fields is not None:
        pairs = [(a.name, getattr(a, "alias", None) or a.name.lstrip("_")) for a in attrs_fields if a.init]
        _check_rebuildable(cls, [alias for _, alias in pairs])

        def attrs_to_data(value: Any) -> dict[str, Any]:
            return {alias: getattr(value, attribute) for attribute, alias in pairs}

        return _Codec(name, cls, attrs_to_data, _keyword_builder(cls))
    raise TypeError(
        f"register({cls.__qualname__}): JSONEncoding rebuilds dataclasses, NamedTuples and attrs classes by "
        "itself; for this class pass encode=(instance -> encodable value) and decode=(value -> instance)"
    )


def _field_getter(field_names: list[str]) -> Callable[[Any], dict[str, Any]]:
    def to_data(value: Any) -> dict[str, Any]:
        return {field: getattr(value, field) for field in field_names}

    return to_data


def _keyword_builder(cls: type) -> Callable[[Any], Any]:
    def from_data(data: Any) -> Any:
        if not isinstance(data, dict):
            raise _DecodeError(f"stored fields of {cls.__qualname__} are not an object: {data!r}")
        return cls(**data)

    return from_data


def _check_rebuildable(cls: type, field_names: list[str]) -> None:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return
    missing = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in field_names
    ]
    if missing:
        raise TypeError(
            f"register({cls.__qualname__}): its __init__ needs {', '.join(missing)}, which are not fields; "
            "pass encode= and decode= to say how to rebuild it"
        )


def _cannot_encode(value: Any) -> str:
    cls = type(value)
    what = f"{cls.__module__}.{cls.__qualname__}"
    if (
        dataclasses.is_dataclass(cls)
        or hasattr(cls, "__attrs_attrs__")
        or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
    ):
        return (
            f"cannot encode {what} value {value!r}: register the class with encoding.register({cls.__name__})"
        )
    for base in (dict, list, tuple, str, int, float, set, frozenset, bytes):
        if isinstance(value, base):
            return (
                f"cannot encode {what} value {value!r}: JSONEncoding keeps types exactly and "
                f"{cls.__name__} is a subclass of {base.__name__}; pass a plain {base.__name__}, or "
                "register the class with encoding.register(cls, encode=..., decode=...)"
            )
    return (
        f"cannot encode {what} value {value!r} with JSONEncoding: use JSON types, tuple, bytes, datetime, "
        "UUID, Decimal, Enum, or register the class with encoding.register(cls)"
    )
