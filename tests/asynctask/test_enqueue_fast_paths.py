"""The shortcuts of an enqueue's CPU build exactly what the general code builds, for random inputs:
``new_task`` against the ``NewTask`` dataclass, the text of a tuple of plain values against the encoder's,
and ``build_task`` of a call without options against the same call through every option check."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle._checks import check_name
from lifecycle.asynctask import AsyncTasks, Call, JSONEncoding, MemoryBackend, NewTask, _enqueue
from lifecycle.asynctask._encoding import _plain_tuple_text
from lifecycle.asynctask._enqueue import build_plain_task, build_task, build_tasks, new_task_ids
from lifecycle.asynctask._records import new_task

FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None)

texts = st.one_of(st.none(), st.text(max_size=8))
numbers = st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-(10**6), 10**6))

task_fields = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8),
        "name": st.text(max_size=8),
        "queue": st.text(max_size=8),
        "payload": st.binary(max_size=8),
        "max_retries": st.integers(0, 100),
        "timeout": st.one_of(st.none(), st.floats(min_value=0.001, max_value=1e6)),
        "enqueued_at": st.floats(allow_nan=False),
        "run_at": st.floats(allow_nan=False),
    },
    optional={
        "meta": texts,
        "priority": st.integers(-(10**6), 10**6),
        "concurrency_key": texts,
        "expires_at": numbers,
        "unique_key": texts,
        "unique_until": numbers,
        "group_id": texts,
        "generated_id": st.booleans(),
    },
)


def test_new_task_takes_the_fields_of_new_task_in_their_order_with_their_defaults() -> None:
    fields = dataclasses.fields(NewTask)
    parameters = list(inspect.signature(new_task).parameters.values())
    assert [parameter.name for parameter in parameters] == [field.name for field in fields]
    for parameter, field in zip(parameters, fields, strict=True):
        expected = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        assert parameter.default == expected, field.name


@FUZZ
@given(task_fields)
def test_new_task_builds_what_the_dataclass_builds(fields: dict[str, Any]) -> None:
    fast = new_task(**fields)
    plain = NewTask(**fields)
    assert type(fast) is NewTask
    assert fast == plain
    for field in dataclasses.fields(NewTask):  # generated_id is left out of ==
        assert getattr(fast, field.name) == getattr(plain, field.name)
    assert dataclasses.replace(fast) == plain
    assert repr(fast) == repr(plain)
    assert hash(fast) == hash(plain)


def test_a_task_from_new_task_is_frozen() -> None:
    task = new_task("a", "b", "c", b"", 0, None, 1.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.id = "other"  # type: ignore[misc]


plain_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**60), 10**60),
    st.text(),
    st.text(alphabet='"\\/[]{}\x00\x1f\x7f\u2028é😀', max_size=6),
)


@FUZZ
@given(st.lists(plain_values, max_size=6).map(tuple))
def test_the_text_of_plain_arguments_is_the_encoders(args: tuple[Any, ...]) -> None:
    encoding = JSONEncoding()
    assert _plain_tuple_text(args) == json.dumps(encoding._convert(args), separators=(",", ":"))
    assert encoding.decode(encoding.encode(args)) == args


@pytest.mark.parametrize(
    "value",
    [[1], (1.5,), (b"x",), ((1,),), ([],), (True, 1.0), ({"a": 1},), "text", 1, None, (object(),)],
)
def test_other_values_are_left_to_the_encoder(value: Any) -> None:
    assert _plain_tuple_text(value) is None


def test_plain_arguments_too_deep_for_max_depth_fail_as_before() -> None:
    with pytest.raises(TypeError, match="nested 2 levels deep: JSONEncoding allows max_depth=1"):
        JSONEncoding(max_depth=1).encode((1, "a"))
    with pytest.raises(TypeError, match="cannot encode a value as JSON: Exceeds the limit"):
        JSONEncoding().encode((10**5000,))


def echo(value: int, label: str = "", flag: bool | None = None) -> int:
    return value


def _tasks() -> AsyncTasks:
    tasks = AsyncTasks(MemoryBackend(), execution=False)
    tasks.register(echo, name="echo")
    tasks.register(echo, name="slow", queue="slow", max_retries=7, timeout=30, priority=5)
    return tasks


arguments = st.tuples(st.integers(-(10**9), 10**9), st.text(max_size=5), st.one_of(st.none(), st.booleans()))
loose = st.lists(st.one_of(plain_values, st.floats(allow_nan=False), st.binary(max_size=4)), max_size=3)


def _general(call: Call, tasks: AsyncTasks) -> NewTask:
    """``call`` through build_task's option checks: an option equal to the default it stands for."""
    definition = tasks._registry.get(call.target) if isinstance(call.target, str) else None
    spelled = Call(
        call.target,
        *call.args,
        queue="default" if definition is None else definition.queue,
    )
    return build_task(spelled, 100.0, tasks._registry, tasks._encoding)


@FUZZ
@given(st.sampled_from(["echo", "slow"]), arguments, st.integers(1, 3))
def test_a_call_without_options_builds_the_task_the_checked_path_builds(
    name: str, args: tuple[Any, ...], count: int
) -> None:
    tasks = _tasks()
    args = args[:count]
    fast = build_task(Call(name, *args), 100.0, tasks._registry, tasks._encoding)
    general = _general(Call(name, *args), tasks)
    plain = build_plain_task(name, args, 100.0, tasks._registry, tasks._encoding)
    assert fast.generated_id
    assert general.generated_id
    assert fast == dataclasses.replace(general, id=fast.id)
    assert plain == dataclasses.replace(general, id=plain.id)


@FUZZ
@given(loose)
def test_a_call_by_an_unknown_name_builds_the_same_task_or_error(args: list[Any]) -> None:
    tasks = _tasks()
    try:
        general: NewTask | Exception = _general(Call("app.elsewhere.job", *args), tasks)
    except TypeError as exc:
        general = exc
    try:
        fast: NewTask | Exception = build_task(
            Call("app.elsewhere.job", *args), 100.0, tasks._registry, tasks._encoding
        )
    except TypeError as exc:
        fast = exc
    if isinstance(general, Exception):
        assert isinstance(fast, TypeError)
        assert str(fast) == str(general)
    else:
        assert isinstance(fast, NewTask)
        assert fast == dataclasses.replace(general, id=fast.id)


@pytest.mark.parametrize(
    ("target", "args"),
    [(echo, ()), (echo, ("three",)), (echo, (1, 2)), ("echo", (1, "a", 3)), ("", (1,)), (len, (1,))],
)
def test_a_call_without_options_fails_as_the_checked_path_does(target: Any, args: tuple[Any, ...]) -> None:
    tasks = _tasks()
    with pytest.raises(TypeError if target != "" else ValueError) as fast:
        build_task(Call(target, *args), 100.0, tasks._registry, tasks._encoding)
    with pytest.raises(type(fast.value)) as general:
        build_task(Call(target, *args, queue="default"), 100.0, tasks._registry, tasks._encoding)
    assert str(fast.value) == str(general.value)


batch_calls = st.lists(
    st.tuples(
        st.sampled_from(["echo", "slow", "app.elsewhere.job", "", echo, len]),
        arguments,
        st.integers(1, 3),
        st.sampled_from([None, "q2"]),
    ),
    max_size=8,
)


@FUZZ
@given(batch_calls)
def test_a_batch_builds_what_each_call_builds_alone_or_fails_as_the_first_bad_call(
    items: list[tuple[Any, tuple[Any, ...], int, str | None]],
) -> None:
    # build_tasks resolves each target of the calls without options once for the batch.
    tasks = _tasks()
    calls = [
        Call(target, *args[:count]) if queue is None else Call(target, *args[:count], queue=queue)
        for target, args, count, queue in items
    ]
    alone: list[NewTask] = []
    error: Exception | None = None
    try:
        for call in calls:
            alone.append(build_task(call, 100.0, tasks._registry, tasks._encoding))
    except (TypeError, ValueError) as exc:
        error = exc
    try:
        batch: list[NewTask] | Exception = build_tasks(
            calls, 100.0, tasks._registry, tasks._encoding, new_task_ids(len(calls))
        )
    except (TypeError, ValueError) as exc:
        batch = exc
    if error is not None:
        assert isinstance(batch, type(error))
        assert str(batch) == str(error)
    else:
        assert isinstance(batch, list)
        assert batch == [
            dataclasses.replace(task, id=built.id) for task, built in zip(alone, batch, strict=True)
        ]
        assert all(task.generated_id for task in batch)


def test_a_batch_resolves_each_target_once() -> None:
    tasks = _tasks()
    looked_up: list[object] = []
    registry = tasks._registry
    for_function = registry.for_function

    def counting(target: Any) -> Any:
        looked_up.append(target)
        return for_function(target)

    registry.for_function = counting  # type: ignore[method-assign,assignment]
    calls = [Call(echo, n) for n in range(5)] + [Call(echo, 9, queue="other")]
    built = build_tasks(calls, 100.0, registry, tasks._encoding, new_task_ids(len(calls)))
    assert [task.queue for task in built] == ["default"] * 5 + ["other"]
    assert looked_up == [echo, echo]  # once for the five plain calls, once for the call with an option


def test_a_name_registered_under_itself_is_not_checked_again_and_any_other_name_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The single enqueue's shortcut takes a name found under itself in the registry as checked (register
    checked it); a name found only as a script's ``__main__.`` alias, or not at all, is checked as before."""
    tasks = _tasks()

    def scripted(value: int) -> int:
        return value

    scripted.__module__ = "__main__"  # as defined at the top of a script: also found as "__main__.scripted"
    scripted.__qualname__ = "scripted"
    tasks.register(scripted)
    alias = f"__main__.{scripted.__qualname__}"
    assert tasks._registry.get(alias) is not None
    checked: list[object] = []

    def counting(value: object, what: str) -> str:
        checked.append(value)
        return check_name(value, what)

    monkeypatch.setattr(_enqueue, "check_name", counting)
    registry, encoding = tasks._registry, tasks._encoding
    assert build_plain_task("echo", (1,), 100.0, registry, encoding).name == "echo"
    assert build_plain_task(echo, (1,), 100.0, registry, encoding).name == "echo"
    assert checked == []
    assert build_plain_task(alias, (1,), 100.0, registry, encoding).name == alias
    assert build_plain_task("elsewhere", (1,), 100.0, registry, encoding).name == "elsewhere"
    assert checked == [alias, "elsewhere"]
    with pytest.raises(ValueError, match="must not contain NUL"):
        build_plain_task("else\x00where", (1,), 100.0, registry, encoding)
    with pytest.raises(ValueError, match="non-empty"):
        build_plain_task("", (1,), 100.0, registry, encoding)
