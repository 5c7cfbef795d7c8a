"""register(): the function rules (each a TypeError that says what to change), names, and arity checks."""

from __future__ import annotations

import functools
import importlib.machinery
import sys
import types
from typing import TYPE_CHECKING

import pytest

from lifecycle.asynctask import AsyncTasks, MemoryBackend, TaskContext
from lifecycle.asynctask._registry import Registry

if TYPE_CHECKING:
    from decimal import Decimal as OnlyForTypeCheckers


async def plain(a: int, b: str = "x") -> None: ...


async def with_context(ctx: TaskContext, key: str) -> None: ...


async def other_hint_unresolvable(ctx: TaskContext, key: OnlyForTypeCheckers) -> None: ...


def sync_job(ctx: TaskContext, value: int) -> int:
    return value


class Handler:
    async def __call__(self, value: int) -> int:
        return value

    async def method(self, ctx: TaskContext, value: int) -> int:
        return value


@pytest.fixture
def tasks() -> AsyncTasks:
    return AsyncTasks(MemoryBackend())


def test_register_returns_the_function_and_names_it_module_qualname(tasks: AsyncTasks) -> None:
    assert tasks.register(plain) is plain
    assert tasks.task_names == [f"{__name__}.plain"]


def test_register_as_a_decorator_with_options(tasks: AsyncTasks) -> None:
    @tasks.register(name="jobs.custom", queue="mail", max_retries=2, timeout=3)
    async def custom(x: int) -> None: ...

    definition = tasks._registry.get("jobs.custom")
    assert definition is not None
    assert (definition.fn, definition.queue, definition.max_retries, definition.timeout) == (
        custom,
        "mail",
        2,
        3.0,
    )


def test_a_first_parameter_annotated_task_context_is_recognised(tasks: AsyncTasks) -> None:
    tasks.register(with_context)
    definition = tasks._registry.get(f"{__name__}.with_context")
    assert definition is not None
    assert (definition.takes_context, definition.min_args, definition.max_args) == (True, 1, 1)
    assert definition.parameter_names == ("key",)


def test_string_annotations_are_resolved_even_when_another_one_cannot_be(tasks: AsyncTasks) -> None:
    # This module uses `from __future__ import annotations`; OnlyForTypeCheckers exists only for mypy.
    tasks.register(other_hint_unresolvable)
    definition = tasks._registry.get(f"{__name__}.other_hint_unresolvable")
    assert definition is not None
    assert definition.takes_context
    assert definition.parameter_names == ("key",)


def test_defaults_make_arguments_optional(tasks: AsyncTasks) -> None:
    tasks.register(plain)
    definition = tasks._registry.get(f"{__name__}.plain")
    assert definition is not None
    assert (definition.takes_context, definition.min_args, definition.max_args) == (False, 1, 2)


def test_a_plain_def_is_accepted_and_marked_for_a_thread(tasks: AsyncTasks) -> None:
    tasks.register(sync_job)
    definition = tasks._registry.get(f"{__name__}.sync_job")
    assert definition is not None
    assert (definition.is_async, definition.takes_context) == (False, True)


def test_callable_objects_and_bound_methods_are_accepted(tasks: AsyncTasks) -> None:
    handler = Handler()
    tasks.register(handler, name="handler")
    tasks.register(handler.method, name="handler.method")
    by_call = tasks._registry.get("handler")
    by_method = tasks._registry.get("handler.method")
    assert by_call is not None
    assert by_call.is_async
    assert by_call.max_args == 1
    assert by_method is not None
    assert by_method.takes_context
    assert by_method.max_args == 1
    assert tasks._registry.for_function(handler.method) is by_method, (
        "a fresh bound method finds its definition"
    )


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda x: x, "has no stable importable name"),
        (functools.partial(plain, 1), "has no stable importable name"),
    ],
)
def test_functions_without_a_stable_name_need_name(tasks: AsyncTasks, fn: object, message: str) -> None:
    with pytest.raises(TypeError, match=message) as raised:
        tasks.register(fn)  # type: ignore[call-overload]
    assert "pass name='...'" in str(raised.value)
    tasks.register(fn, name="explicit")  # type: ignore[call-overload]


def test_nested_functions_need_an_explicit_name(tasks: AsyncTasks) -> None:
    async def inner(x: int) -> None: ...

    with pytest.raises(TypeError, match="defined inside another"):
        tasks.register(inner)


def test_star_args_and_kwargs_are_refused(tasks: AsyncTasks) -> None:
    async def star(*values: int) -> None: ...

    async def double_star(**options: int) -> None: ...

    with pytest.raises(TypeError, match=r"takes \*values: task functions need fixed parameters"):
        tasks.register(star, name="star")
    with pytest.raises(TypeError, match=r"takes \*\*options"):
        tasks.register(double_star, name="double_star")


def test_required_keyword_only_parameters_are_refused(tasks: AsyncTasks) -> None:
    async def keyword(a: int, *, b: int) -> None: ...

    async def keyword_with_default(a: int, *, b: int = 2) -> None: ...

    with pytest.raises(TypeError, match="keyword-only parameter 'b' without a default"):
        tasks.register(keyword, name="keyword")
    tasks.register(keyword_with_default, name="keyword_with_default")


def test_a_task_context_must_come_first(tasks: AsyncTasks) -> None:
    async def late(key: str, ctx: TaskContext) -> None: ...

    with pytest.raises(TypeError, match="a TaskContext parameter must come first"):
        tasks.register(late, name="late")


@pytest.mark.parametrize("bad", [42, "text", int])
def test_non_functions_are_refused(tasks: AsyncTasks, bad: object) -> None:
    with pytest.raises(TypeError, match="takes an async def"):
        tasks.register(bad, name="bad")  # type: ignore[call-overload]


def test_generator_functions_are_refused(tasks: AsyncTasks) -> None:
    async def agen():  # type: ignore[no-untyped-def]
        yield 1

    with pytest.raises(TypeError, match="is a generator function"):
        tasks.register(agen, name="agen")


def test_a_used_name_is_a_value_error_but_the_same_registration_is_idempotent(tasks: AsyncTasks) -> None:
    tasks.register(plain, name="shared")
    tasks.register(plain, name="shared")
    with pytest.raises(ValueError, match="'shared' is already registered for plain"):
        tasks.register(with_context, name="shared")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"name": ""}, ValueError, r"register\(plain\(\)\): the task name must be a non-empty string"),
        ({"name": "  "}, ValueError, r"register\(plain\(\)\): the task name must not be blank"),
        ({"name": 3}, TypeError, r"register\(plain\(\)\): the task name must be a non-empty string"),
        ({"queue": ""}, ValueError, r"register\(plain\(\)\): the queue name must be a non-empty string"),
        ({"queue": 3}, TypeError, r"register\(plain\(\)\): the queue name must be a non-empty string"),
        ({"max_retries": -1}, ValueError, r"register\(plain\(\)\): max_retries must be at least 0, got -1"),
        ({"max_retries": 1.5}, TypeError, r"max_retries must be a whole number of at least 0 \(an int\)"),
        ({"timeout": 0}, ValueError, r"register\(plain\(\)\): timeout must be a finite number of seconds"),
        ({"timeout": float("inf")}, ValueError, r"timeout must be a finite .* \(or None for no limit\)"),
        ({"timeout": "1"}, TypeError, r"timeout must be a number of seconds greater than zero"),
    ],
)
def test_bad_options_are_named(
    tasks: AsyncTasks, options: dict[str, object], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        tasks.register(plain, **options)  # type: ignore[call-overload]


def test_two_async_tasks_have_separate_registries() -> None:
    first, second = AsyncTasks(MemoryBackend()), AsyncTasks(MemoryBackend())
    first.register(plain)
    assert second.task_names == []
    second.register(plain)  # no clash: nothing is global


def test_arity_errors_say_what_the_function_takes() -> None:
    registry = Registry()
    definition = registry.add(with_context, name=None, queue=None, max_retries=None, timeout=None)
    definition.check_arity(1)
    with pytest.raises(TypeError, match=r"takes 1 argument \(key\) but 2 were given") as raised:
        definition.check_arity(2)
    assert "the worker supplies the TaskContext" in str(raised.value)
    optional = registry.add(plain, name=None, queue=None, max_retries=None, timeout=None)
    with pytest.raises(TypeError, match=r"takes at least 1 argument \(a, b\) but 0 were given"):
        optional.check_arity(0)
    with pytest.raises(TypeError, match=r"takes at most 2 arguments \(a, b\) but 3 were given"):
        optional.check_arity(3)


@pytest.mark.parametrize(
    ("file", "spec_name", "expected"),
    [
        ("/srv/app/service.py", None, "service.in_script"),  # python /srv/app/service.py
        ("/srv/app/pkg/jobs.py", "pkg.jobs", "pkg.jobs.in_script"),  # python -m pkg.jobs
        (None, None, "__main__.in_script"),  # an interactive session: nothing else to go by
        ("/srv/app/my-script.py", None, "__main__.in_script"),  # not importable as a module anyway
    ],
)
def test_functions_of_a_script_are_named_after_its_module(
    tasks: AsyncTasks, monkeypatch: pytest.MonkeyPatch, file: str | None, spec_name: str | None, expected: str
) -> None:
    main = types.ModuleType("__main__")
    if file is not None:
        main.__file__ = file
    main.__spec__ = None if spec_name is None else importlib.machinery.ModuleSpec(spec_name, None)
    monkeypatch.setitem(sys.modules, "__main__", main)

    async def in_script() -> None: ...

    in_script.__module__ = "__main__"
    in_script.__qualname__ = "in_script"
    tasks.register(in_script)
    assert tasks.task_names == [expected]
    definition = tasks._registry.get("__main__.in_script")
    assert definition is not None, "tasks stored under the old __main__ name still find their function"
    assert definition.fn is in_script
