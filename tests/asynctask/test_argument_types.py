"""``enqueue`` checks each argument against its parameter's annotation before anything is stored: a
``TypeError`` names the parameter, the expected and the given type; values are checked, never converted.

This module uses ``from __future__ import annotations``, so every annotation below is a string that
``register`` resolves (once) in this module's namespace.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, NewType, Optional, TypedDict, Union

import pytest

from lifecycle.asynctask import AsyncTasks, Call, JSONEncoding, ManualClock, MemoryBackend, TaskContext

if TYPE_CHECKING:
    from pathlib import Path  # noqa: F401 - a name only type checkers see: left unchecked at run time

T0 = 1_700_000_000.0
UserId = NewType("UserId", int)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Point:
    x: int
    y: int


class Pair(NamedTuple):
    left: str
    right: str


class Movie(TypedDict):
    title: str
    year: int


encoding = JSONEncoding()
encoding.register(Point)
encoding.register(Pair)

AWARE = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
ID = uuid.UUID(int=7)


@pytest.fixture
async def tasks() -> Any:
    tasks = AsyncTasks(MemoryBackend(), clock=ManualClock(T0), execution=False, encoding=encoding)
    async with tasks:
        yield tasks


def register(tasks: AsyncTasks, annotation: str) -> Any:
    """A task taking one argument annotated ``annotation`` (evaluated in this module)."""
    namespace: dict[str, Any] = {}
    names = {**globals(), **TYPING_NAMES}
    exec(f"async def check(value: {annotation}) -> None: ...", names, namespace)
    fn = namespace["check"]
    fn.__module__ = __name__
    return tasks.register(fn, name=f"check[{annotation}]")


TYPING_NAMES = {
    "Annotated": Annotated,
    "Literal": Literal,
    "Mapping": Mapping,
    "Optional": Optional,
    "Sequence": Sequence,
    "Union": Union,
}
"""Names the annotations of the tasks that :func:`register` writes use."""

ACCEPTED = [
    ("int", 3),
    ("int", UserId(3)),
    ("float", 1.5),
    ("float", 2),  # an int is a float for type checkers
    ("str", "x"),
    ("bool", False),
    ("bytes", b"\x00"),
    ("None", None),
    ("list[int]", [1, 2]),
    ("list[int]", []),
    ("list[list[str]]", [["a"], []]),
    ("dict[str, float]", {"a": 1.0, "b": 2}),
    ("dict[int, Point]", {1: Point(1, 2)}),
    ("tuple", (1, "a")),
    ("tuple[int, str]", (1, "a")),
    ("tuple[int, ...]", (1, 2, 3)),
    ("tuple[()]", ()),
    ("set[str]", {"a"}),
    ("frozenset[int]", frozenset({1})),
    ("Optional[int]", None),
    ("Optional[int]", 5),
    ("int | None", None),
    ("Union[int, str]", "x"),
    ("Literal['a', 'b']", "b"),
    ("Literal[1]", 1),
    ("Literal[Color.RED]", Color.RED),
    ("Color", Color.BLUE),
    ("Point", Point(1, 2)),
    ("Pair", Pair("a", "b")),
    ("Movie", {"title": "Heat", "year": 1995}),
    ("datetime", AWARE),
    ("date", date(2024, 1, 1)),
    ("timedelta", timedelta(seconds=1)),
    ("uuid.UUID", ID),
    ("Decimal", Decimal("1.5")),
    ("Sequence[int]", (1, 2)),
    ("Mapping[str, int]", {"a": 1}),
    ("Annotated[int, 'meta']", 1),
    ("UserId", 4),
    ("Any", {"any": [1, None]}),
    ("object", ("anything", 1)),
    ("Path", "not a path at all"),  # imported under TYPE_CHECKING only: cannot be checked
]


@pytest.mark.parametrize(("annotation", "value"), ACCEPTED)
async def test_values_of_the_annotated_type_are_accepted(
    tasks: AsyncTasks, annotation: str, value: Any
) -> None:
    fn = register(tasks, annotation)
    task_id = await tasks.enqueue(fn, value)
    assert (await tasks.info(task_id)) is not None


REFUSED = [
    ("int", "3", "int", "str ('3')"),
    ("int", True, "int", "bool (True)"),
    ("int", 3.0, "int", "float (3.0)"),
    ("float", "1.5", "float", "str ('1.5')"),
    ("float", False, "float", "bool (False)"),
    ("str", 3, "str", "int (3)"),
    ("str", b"x", "str", "bytes (b'x')"),
    ("bool", 1, "bool", "int (1)"),
    ("bytes", "x", "bytes", "str ('x')"),
    ("None", 0, "None", "int (0)"),
    ("list[int]", (1, 2), "list[int]", "tuple ((1, 2))"),
    ("list[int]", [1, "2"], "list[int]", "list ([1, '2']): value[1] is str ('2'), not int"),
    ("dict[str, float]", {"a": "x"}, "dict[str, float]", "dict ({'a': 'x'}): value['a'] is str ('x'), not"),
    ("dict[str, float]", {1: 1.0}, "dict[str, float]", "dict ({1: 1.0}): a key of value is int (1), not str"),
    ("tuple[int, str]", (1, 2), "tuple[int, str]", "tuple ((1, 2)): value[1] is int (2), not str"),
    ("tuple[int, str]", (1,), "tuple[int, str]", "tuple ((1,))"),
    ("tuple[int, ...]", [1], "tuple[int, ...]", "list ([1])"),
    ("tuple", [1], "tuple", "list ([1])"),
    ("set[str]", ["a"], "set[str]", "list (['a'])"),
    ("Optional[int]", "x", "int | None", "str ('x')"),
    ("Optional[list[int]]", ["x"], "list[int] | None", "list (['x']): value[0] is str ('x'), not int"),
    ("Union[int, str]", 1.5, "int | str", "float (1.5)"),
    ("Literal['a', 'b']", "c", "Literal['a', 'b']", "str ('c')"),
    ("Literal[1]", True, "Literal[1]", "bool (True)"),
    ("Color", "red", "Color", "str ('red')"),
    ("Point", {"x": 1, "y": 2}, "Point", "dict ({'x': 1, 'y': 2})"),
    ("Pair", ("a", "b"), "Pair", "tuple (('a', 'b'))"),
    ("Movie", {"title": "Heat"}, "Movie", "dict ({'title': 'Heat'}): value (missing key 'year')"),
    (
        "Movie",
        {"title": "Heat", "year": "95"},
        "Movie",
        "dict ({'title': 'Heat', 'year': '95'}): value['year'] is str ('95'), not int",
    ),
    ("datetime", "2024-05-01T12:00:00+00:00", "datetime", "str ('2024-05-01T12:00:00+00:00')"),
    ("datetime", 1714564800.0, "datetime", "float (1714564800.0)"),
    ("date", "2024-01-01", "date", "str ('2024-01-01')"),
    ("uuid.UUID", str(ID), "UUID", "str ('00000000-0000-0000-0000-000000000007')"),
    ("Decimal", "1.5", "Decimal", "str ('1.5')"),
    ("Decimal", 1.5, "Decimal", "float (1.5)"),
    ("Sequence[int]", {1}, "Sequence[int]", "set ({1})"),
    ("Mapping[str, int]", {"a": "1"}, "Mapping[str, int]", "dict ({'a': '1'}): value['a'] is str ('1')"),
    ("UserId", "4", "int", "str ('4')"),
]


@pytest.mark.parametrize(("annotation", "value", "expected", "given"), REFUSED)
async def test_values_of_another_type_are_refused_naming_parameter_expected_and_given(
    tasks: AsyncTasks, annotation: str, value: Any, expected: str, given: str
) -> None:
    fn = register(tasks, annotation)
    name = f"check[{annotation}]"
    message = f"cannot enqueue {name!r}: argument 1 (value) must be {expected}, got {given}"
    with pytest.raises(TypeError, match=re.escape(message)):
        await tasks.enqueue(fn, value)
    assert await tasks.list() == []


async def send_welcome(ctx: TaskContext, user_id: int, when: datetime | None = None) -> None: ...


async def untyped(a, b=None):  # type: ignore[no-untyped-def]
    return a


async def test_the_message_names_the_task_the_parameter_and_both_types(tasks: AsyncTasks) -> None:
    tasks.register(send_welcome, name="emails.welcome")
    with pytest.raises(TypeError) as caught:
        await tasks.enqueue(send_welcome, "42")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "cannot enqueue 'emails.welcome': argument 1 (user_id) must be int, got str ('42') (values are "
        "checked, not converted: pass the type the function declares)"
    )
    with pytest.raises(TypeError, match=r"argument 2 \(when\) must be datetime \| None, got str"):
        await tasks.enqueue(send_welcome, 42, "2024-05-01")  # type: ignore[arg-type, call-arg]
    await tasks.enqueue(send_welcome, 42, AWARE)
    await tasks.enqueue(send_welcome, 42)


async def test_a_registered_name_is_checked_like_the_function(tasks: AsyncTasks) -> None:
    tasks.register(send_welcome, name="emails.welcome")
    with pytest.raises(TypeError, match=r"argument 1 \(user_id\) must be int, got str"):
        await tasks.enqueue("emails.welcome", "42")
    await tasks.enqueue("elsewhere.unknown", "anything")  # not registered here: not checked


async def test_unannotated_parameters_accept_anything(tasks: AsyncTasks) -> None:
    tasks.register(untyped, name="untyped")
    await tasks.enqueue(untyped, object.__name__, [1, "a", None])
    assert tasks._registry.get("untyped").arguments.checked == ()  # type: ignore[union-attr]


async def test_a_parameter_defaulting_to_none_accepts_none(tasks: AsyncTasks) -> None:
    async def legacy(count: int = None) -> None: ...  # type: ignore[assignment]  # noqa: RUF013 - on purpose

    tasks.register(legacy, name="legacy")
    await tasks.enqueue(legacy, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be int \| None, got str"):
        await tasks.enqueue(legacy, "1")  # type: ignore[arg-type]


async def test_enqueue_many_stores_nothing_when_one_call_is_refused(tasks: AsyncTasks) -> None:
    tasks.register(send_welcome, name="emails.welcome")
    calls = [Call(send_welcome, 1), Call(send_welcome, 2), Call(send_welcome, "3")]  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 1 \(user_id\) must be int, got str \('3'\)"):
        await tasks.enqueue_many(calls)
    assert await tasks.list() == []


async def test_chain_steps_and_schedules_are_checked_when_declared(tasks: AsyncTasks) -> None:
    tasks.register(send_welcome, name="emails.welcome")
    with pytest.raises(TypeError, match=r"argument 1 \(user_id\) must be int, got str"):
        await tasks.enqueue_chain([Call(send_welcome, 1), Call(send_welcome, "2")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 1 \(user_id\) must be int, got float"):
        tasks.every(send_welcome, 60, 1.5, name="welcome-all")
    assert await tasks.list() == []


async def test_a_class_defined_after_its_task_is_resolved_at_the_first_enqueue(tasks: AsyncTasks) -> None:
    tasks.register(ships_later, name="ships")
    with pytest.raises(TypeError, match=r"argument 1 \(parcel\) must be Parcel, got dict"):
        await tasks.enqueue(ships_later, {"weight": 1})  # type: ignore[arg-type]
    local = JSONEncoding()
    local.register(Parcel)
    own = AsyncTasks(MemoryBackend(), execution=False, encoding=local)
    own.register(ships_later, name="ships")
    async with own:
        await own.enqueue(ships_later, Parcel(weight=1))


async def ships_later(parcel: Parcel) -> None: ...


@dataclass
class Parcel:  # defined after the task that names it: resolved when first needed, then cached
    weight: int


async def test_values_are_checked_not_converted_and_subclass_instances_pass(tasks: AsyncTasks) -> None:
    class Special(Point):
        pass

    fn = register(tasks, "Point")
    with pytest.raises(TypeError, match="cannot encode"):  # passes the type check; the encoding refuses it
        await tasks.enqueue(fn, Special(1, 2))
    assert await tasks.list() == []


def test_checking_costs_little_compared_to_an_enqueue() -> None:
    """The per-enqueue cost of the checks stays small: well under the cost of building the task (measured
    on the same machine, so the test does not depend on its speed)."""
    import timeit

    from lifecycle.asynctask._enqueue import build_task

    tasks = AsyncTasks(MemoryBackend(), execution=False)
    tasks.register(send_welcome, name="emails.welcome")
    definition = tasks._registry.get("emails.welcome")
    assert definition is not None
    args = (42, AWARE)
    call = Call(send_welcome, *args)
    check = min(
        timeit.repeat(lambda: definition.arguments.check("emails.welcome", args), number=500, repeat=5)
    )
    build = min(
        timeit.repeat(lambda: build_task(call, T0, tasks._registry, tasks.encoding), number=500, repeat=5)
    )
    assert check < build / 3, (check, build)
