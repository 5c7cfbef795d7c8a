"""JSONEncoding and PickleEncoding: exact round trips (hypothesis), registered classes, and clear errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import sys
import types
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.asynctask import Encoding, JSONEncoding, PickleEncoding
from lifecycle.asynctask._encoding import _JSON


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    label: str = "p"


class Pair(NamedTuple):
    left: Any
    right: Any


@attrs.define
class Box:
    content: Any
    _secret: int = 0


@dataclasses.dataclass
class Unregistered:
    value: int


class Money:
    def __init__(self, cents: int, currency: str) -> None:
        self.cents, self.currency = cents, currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.cents, self.currency) == (other.cents, other.currency)

    __hash__ = None  # type: ignore[assignment]


def make_encoding() -> JSONEncoding:
    encoding = JSONEncoding()
    encoding.register(Point)
    encoding.register(Pair)
    encoding.register(Box)
    encoding.register(
        Money,
        name="money",
        encode=lambda money: [money.cents, money.currency],
        decode=lambda data: Money(*data),
    )
    return encoding


ENCODING = make_encoding()


def fields_of(value: Any) -> dict[str, Any]:
    """The fields of a dataclass or attrs instance (``vars`` where there are no slots)."""
    return vars(value) if not hasattr(value, "__slots__") else attrs.asdict(value, recurse=False)


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[key], b[key]) for key in a)
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, dt.datetime | dt.time):
        return bool(a == b and a.tzinfo == b.tzinfo and a.fold == b.fold)
    if dataclasses.is_dataclass(a) or isinstance(a, Box):
        return same(fields_of(a), fields_of(b))
    return bool(a == b)


hashable = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(),
    st.binary(max_size=20),
    st.uuids(),
    st.dates(),
    st.sampled_from(list(Color) + list(Level)),
)
scalars = st.one_of(
    hashable,
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.datetimes(timezones=st.none() | st.timezones() | st.just(dt.timezone.utc)),
    st.datetimes().map(lambda value: value.replace(tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30)))),
    st.times(timezones=st.none() | st.just(dt.timezone.utc)),
    st.timedeltas(),
    st.binary(max_size=20).map(bytearray),
    st.builds(Point, st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
    st.builds(Money, st.integers(), st.sampled_from(["EUR", "USD"])),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=8), children, max_size=5),
        st.dictionaries(hashable, children, max_size=5),
        st.sets(hashable, max_size=5),
        st.frozensets(hashable, max_size=5),
        st.builds(Pair, children, children),
        st.builds(Box, children, st.integers()),
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_json_round_trips_to_the_same_types(value: Any) -> None:
    data = ENCODING.encode(value)
    assert isinstance(data, bytes)
    assert same(ENCODING.decode(data), value), data


@settings(max_examples=200, deadline=None)
@given(values)
def test_json_text_is_what_the_shared_json_encoder_writes(value: Any) -> None:
    # encode() calls a C encoder built once instead of JSONEncoder.encode(), which builds one per call.
    tree = ENCODING._convert(value)
    assert ENCODING.encode(value) == _JSON.encode(tree).encode()


def test_json_text_of_top_level_scalars_is_what_the_shared_json_encoder_writes() -> None:
    encoding = JSONEncoding()
    for value in ("plain", 'é\u2028"\\', "", 0, -(10**30), 1.5, math.inf, -math.inf, math.nan, True, None):
        assert encoding.encode(value) == _JSON.encode(encoding._convert(value)).encode()


@settings(max_examples=100, deadline=None)
@given(st.lists(values, max_size=4).map(tuple))
def test_argument_tuples_round_trip_through_a_second_encoding_with_the_same_registrations(
    args: tuple[Any, ...],
) -> None:
    worker_side = make_encoding()
    assert same(worker_side.decode(ENCODING.encode(args)), args)


@settings(max_examples=100, deadline=None)
@given(values)
def test_pickle_round_trips(value: Any) -> None:
    encoding = PickleEncoding()
    assert same(encoding.decode(encoding.encode(value)), value)


def test_json_output_is_ascii_json_readable_in_a_database() -> None:
    data = ENCODING.encode(("k", ["r"], {"a": 1}))
    assert data == b'{"__lifecycle__":"tuple","v":["k",["r"],{"a":1}]}'
    assert ENCODING.encode("\udc80 é") == b'"\\udc80 \\u00e9"', "lone surrogates survive too"


def test_a_user_dict_with_the_tag_key_is_not_mistaken_for_a_tag() -> None:
    tricky = {"__lifecycle__": "tuple", "v": [1, 2]}
    assert ENCODING.decode(ENCODING.encode(tricky)) == tricky
    assert ENCODING.decode(ENCODING.encode({1: "int key", (1, 2): "tuple key"})) == {
        1: "int key",
        (1, 2): "tuple key",
    }


def test_zoneinfo_datetimes_keep_their_zone_and_fold() -> None:
    zone = ZoneInfo("Europe/Berlin")
    ambiguous = dt.datetime(2024, 10, 27, 2, 30, tzinfo=zone, fold=1)
    decoded = ENCODING.decode(ENCODING.encode(ambiguous))
    assert decoded.tzinfo is zone
    assert decoded.fold == 1
    assert decoded.utcoffset() == ambiguous.utcoffset()


def test_encodings_satisfy_the_protocol() -> None:
    assert isinstance(JSONEncoding(), Encoding)
    assert isinstance(PickleEncoding(), Encoding)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Unregistered(1), r"register the class with encoding.register\(Unregistered\)"),
        (object(), "use JSON types, tuple, bytes"),
        # The bare base class on purpose (abstract to type checkers): a tzinfo with no name and no offset.
        (dt.datetime(2024, 1, 1, tzinfo=ZoneInfo("UTC")).replace(tzinfo=dt.tzinfo()), "tzinfo"),  # type: ignore[abstract]
    ],
)
def test_unencodable_values_raise_type_error_saying_what_to_do(value: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        ENCODING.encode(value)


def test_subclasses_of_builtins_are_refused_to_keep_types_exact() -> None:
    class Tags(list[str]):
        pass

    with pytest.raises(TypeError, match="subclass of list; pass a plain list"):
        ENCODING.encode(Tags(["a"]))


def test_self_containing_values_are_a_type_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="contains itself"):
        ENCODING.encode(loop)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80 not json", "not a valid JSONEncoding payload"),
        (b'{"__lifecycle__":"obj","cls":"nobody.Knows","v":{}}', "'nobody.Knows', which is not registered"),
        (b'{"__lifecycle__":"enum","cls":"no_such_module:Color","v":1}', "has not imported"),
        (b'{"__lifecycle__":"from-the-future","v":1}', "unknown JSONEncoding tag"),
        (b'{"__lifecycle__":"bytes","v":"***"}', "not a valid JSONEncoding payload"),
    ],
)
def test_undecodable_bytes_raise_value_error_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ENCODING.decode(data)


def test_register_rules() -> None:
    encoding = JSONEncoding()
    assert encoding.register(Point) is Point
    with pytest.raises(ValueError, match="already registered"):
        encoding.register(Point, name="other")
    with pytest.raises(ValueError, match="already registered"):
        encoding.register(Pair, name=f"{Point.__module__}.{Point.__qualname__}")
    with pytest.raises(ValueError, match="encoded natively"):
        encoding.register(dict)
    with pytest.raises(TypeError, match=r"pass encode=.*and decode="):
        encoding.register(Money)
    with pytest.raises(TypeError, match="both encode= and decode="):
        encoding.register(Money, encode=lambda m: m)  # type: ignore[call-overload]

    @dataclasses.dataclass
    class NeedsInitVar:
        value: int
        extra: dataclasses.InitVar[int]

    with pytest.raises(TypeError, match="needs extra, which are not fields"):
        encoding.register(NeedsInitVar, name="needs")

    @encoding.register(name="decorated")
    @dataclasses.dataclass
    class Decorated:
        value: int

    assert encoding.decode(encoding.encode(Decorated(3))) == Decorated(3)


def test_an_enum_may_be_registered_to_pin_its_name() -> None:
    encoding = JSONEncoding()
    encoding.register(Color, name="colors")
    assert encoding.encode(Color.RED) == b'{"__lifecycle__":"obj","cls":"colors","v":"red"}'
    assert encoding.decode(encoding.encode(Color.BLUE)) is Color.BLUE


def test_pickle_errors_are_type_and_value_errors() -> None:
    encoding = PickleEncoding()
    with pytest.raises(TypeError, match="cannot pickle"):
        encoding.encode(lambda: None)
    with pytest.raises(ValueError, match="cannot unpickle"):
        encoding.decode(b"definitely not a pickle")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'[{"__lifecycle__":"decimal","v":"abc"}]', "malformed 'decimal' value 'abc'"),
        (b'[{"__lifecycle__":"decimal","v":[1]}]', "malformed 'decimal' value"),
        (b"[" * 1000 + b"]" * 1000, "nests 1000 levels deep, more than max_depth=200"),
        (b'{"a":' * 500 + b"1" + b"}" * 500, "nests 500 levels deep"),
        (b'["\xc3\x28"]', "UnicodeDecodeError"),
        (b'{"__lifecycle__":["x"],"v":1}', r"the tag \['x'\] is not a string"),
        (b'{"__lifecycle__":"timedelta","v":[1e300,0,0]}', "malformed 'timedelta' value"),
        (b'{"__lifecycle__":"timedelta","v":5}', "malformed 'timedelta' value"),
        (b'{"__lifecycle__":"set","v":[[1]]}', "malformed 'set' value"),
        (b'{"__lifecycle__":"tuple","v":7}', "malformed 'tuple' value"),
        (b'{"__lifecycle__":"datetime","v":"2024-01-01","tz":"No/Such_Zone"}', "malformed 'datetime' value"),
        (b'{"__lifecycle__":"datetime","v":"2024-01-01","fold":3}', "malformed 'datetime' value"),
        (b'{"__lifecycle__":"date","v":null}', "malformed 'date' value"),
        (b'{"__lifecycle__":"uuid","v":"xyz"}', "malformed 'uuid' value"),
        (b'{"__lifecycle__":"float","v":{}}', "malformed 'float' value"),
        (b'{"__lifecycle__":"dict","v":[[[1],2]]}', "malformed 'dict' value"),
        (b'{"__lifecycle__":"obj","v":{}}', "malformed 'obj' value"),
        (b'{"__lifecycle__":"obj","cls":["x"],"v":{}}', "not registered"),
        (b'{"__lifecycle__":"obj","cls":"money","v":7}', "cannot rebuild 'money' from 7"),
        (b'{"__lifecycle__":"enum","cls":7,"v":1}', "is not a string"),
        (
            b'{"__lifecycle__":"enum","cls":"' + Color.__module__.encode() + b':Color","v":"green"}',
            "not a value of enum",
        ),
        (b"1" * 5000, "not a valid JSONEncoding payload"),
    ],
)
def test_decode_raises_only_value_error_naming_the_cause(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        ENCODING.decode(data)
    assert type(caught.value) is ValueError, "nothing but ValueError, not even a subclass"


def test_an_enum_path_is_read_without_running_module_getattr() -> None:
    touched: list[str] = []
    module = types.ModuleType("lazy_module_for_test")
    module.__getattr__ = lambda name: touched.append(name)  # type: ignore[method-assign]
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(ValueError, match="has not imported"):
            ENCODING.decode(b'{"__lifecycle__":"enum","cls":"lazy_module_for_test:Anything","v":1}')
    finally:
        del sys.modules[module.__name__]
    assert touched == [], "a payload must never make the worker import or compute anything"


def test_the_depth_limit_is_checked_the_same_way_on_both_sides() -> None:
    encoding = JSONEncoding(max_depth=10)
    nested: Any = "leaf"
    for _ in range(10):
        nested = [nested]
    assert encoding.decode(encoding.encode(nested)) == nested, "exactly max_depth levels: fine"
    with pytest.raises(TypeError, match=r"nested 11 levels deep: JSONEncoding allows max_depth=10"):
        encoding.encode([nested])
    with pytest.raises(TypeError, match="counts two levels"):
        encoding.encode(tuple(nested))  # a tagged object around a list: one level more than the list
    # Brackets inside strings are not nesting.
    assert encoding.decode(encoding.encode(["[" * 50, "{" * 50])) == ["[" * 50, "{" * 50]
    too_deep = b"[" * 11 + b"]" * 11
    with pytest.raises(ValueError, match="nests 11 levels deep"):
        encoding.decode(too_deep)
    assert JSONEncoding().decode(too_deep) == [[[[[[[[[[[]]]]]]]]]]]
    assert encoding.max_depth == 10
    with pytest.raises(ValueError, match=r"JSONEncoding\(max_depth=...\) must be at least 1, got 0"):
        JSONEncoding(max_depth=0)
    with pytest.raises(ValueError, match=r"JSONEncoding\(max_depth=...\) must be at most 10000, got 10001"):
        JSONEncoding(max_depth=10_001)
    with pytest.raises(TypeError, match=r"JSONEncoding\(max_depth=...\) must be a whole number"):
        JSONEncoding(max_depth=10.0)  # type: ignore[arg-type]


def test_a_value_deeper_than_python_can_recurse_is_a_type_error_at_encode() -> None:
    deep: Any = []
    for _ in range(20_000):
        deep = [deep]
    with pytest.raises(TypeError, match="nests deeper than JSONEncoding allows"):
        ENCODING.encode(deep)


def test_utf16_payloads_are_measured_after_decoding() -> None:
    assert ENCODING.decode('["a", {"b": 1}]'.encode("utf-16")) == ["a", {"b": 1}]
    with pytest.raises(ValueError, match="nests 300 levels deep"):
        ENCODING.decode(("[" * 300 + "]" * 300).encode("utf-16"))


_JSONISH = ' \t\n\r[]{}",:-.0123456789aeflnrstuv_\\\ufeff\ud800\xe9'
_TUPLE_HEAD = '{"__lifecycle__":"tuple","v":['


@settings(max_examples=800, derandomize=True, database=None, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=_JSONISH, max_size=14),
        st.builds(  # argument tuples as encode() writes them, and texts that only look like them
            lambda items, tail: _TUPLE_HEAD + items + tail,
            st.sampled_from(["", "1", "1,2", '"a",[3]', '{"__lifecycle__":"set","v":[1]}', "1,"])
            | st.text(alphabet=_JSONISH, max_size=6),
            st.sampled_from(["]}", "] }", "]}\n", '],"v":[2]}', '],"x":[2]}', "]", "}", "]}]}"]),
        ),
    ),
    st.sampled_from(["utf-8", "utf-16-le", "utf-16", "utf-32-be"]),
)
def test_decode_reads_json_text_exactly_as_json_loads_does(text: str, codec: str) -> None:
    # decode() parses with one scanner made once, and an argument tuple's list alone; what it accepts, and
    # the error it names, stay those of json.loads with its object hook on the text in the encoding json
    # detects (leading and trailing whitespace, extra data, a BOM, UTF-16 and -32 text, lone surrogates,
    # repeated keys).
    encoding = JSONEncoding()
    data = text.encode(codec, "surrogatepass")
    expected: Any = None
    refused: ValueError | None = None
    try:
        expected = json.loads(
            data.decode(json.detect_encoding(data), "surrogatepass"),
            object_hook=encoding._object_hook,
        )
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a malformed tagged value
        refused = exc
    if refused is None:
        decoded = encoding.decode(data)
        assert (type(decoded), decoded) == (type(expected), expected)
        return
    with pytest.raises(ValueError) as raised:
        encoding.decode(data)
    assert str(raised.value) in (
        f"not a valid JSONEncoding payload: {type(refused).__name__}: {refused}",  # json's own error
        str(refused),  # the object hook's (a _DecodeError)
    )


def test_a_scripts_classes_are_named_after_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    main = types.ModuleType("__main__")
    main.__file__ = "/srv/app/service.py"
    monkeypatch.setitem(sys.modules, "__main__", main)

    @dataclasses.dataclass
    class Order:
        number: int

    Order.__module__ = "__main__"
    Order.__qualname__ = "Order"
    encoding = JSONEncoding()
    encoding.register(Order)
    assert encoding.encode(Order(7)) == b'{"__lifecycle__":"obj","cls":"service.Order","v":{"number":7}}'
    older = b'{"__lifecycle__":"obj","cls":"__main__.Order","v":{"number":7}}'
    assert encoding.decode(older) == Order(7), "payloads written under the old __main__ name still decode"
    assert "__main__" not in repr(encoding)
