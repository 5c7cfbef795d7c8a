"""Task function registration: the signature rules checked at ``register``, the argument checks at
``enqueue``."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .._checks import check_count, check_name, check_optional_seconds
from ._flow import build_limits, check_priority
from ._model import TaskContext
from ._names import public_module
from ._records import FlowLimits
from ._typecheck import ArgumentCheck

__all__ = [
    "Registry",
    "TaskDefinition",
    "check_label",
    "check_max_retries",
    "check_queue",
    "check_timeout",
    "is_async_callable",
]

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRIES = 5


@dataclass(frozen=True, slots=True)
class TaskDefinition:
    """A registered task function and its defaults."""

    name: str
    fn: Callable[..., Any]
    queue: str
    max_retries: int
    timeout: float | None
    takes_context: bool
    is_async: bool
    min_args: int
    max_args: int
    parameter_names: tuple[str, ...]
    arguments: ArgumentCheck = field(compare=False, repr=False)
    """The checks of the arguments against the annotations (compiled once, here, at register)."""
    priority: int = 0
    """The priority of its enqueues unless an enqueue gives one."""
    limits: FlowLimits | None = None
    """Its flow limits (rate, max_running, max_running_per_key), checked in every worker's claim."""

    def check_arguments(self, args: tuple[Any, ...]) -> None:
        """Raise ``TypeError`` unless ``args`` fit the function: their number, then each against its
        parameter's annotation (see :mod:`lifecycle.asynctask._typecheck`)."""
        if not self.min_args <= len(args) <= self.max_args:
            self.check_arity(len(args))
        self.arguments.check(self.name, args)

    def check_arity(self, count: int) -> None:
        """Raise ``TypeError`` unless ``count`` positional arguments fit the function (``ctx`` excluded)."""
        if self.min_args <= count <= self.max_args:
            return
        if self.min_args == self.max_args:
            expected = f"{self.max_args} argument{'s' if self.max_args != 1 else ''}"
        elif count < self.min_args:
            expected = f"at least {self.min_args} argument{'s' if self.min_args != 1 else ''}"
        else:
            expected = f"at most {self.max_args} argument{'s' if self.max_args != 1 else ''}"
        names = ", ".join(self.parameter_names)
        raise TypeError(
            f"task {self.name!r} takes {expected} ({names}) but {count} {'was' if count == 1 else 'were'} "
            "given; pass its positional arguments after the function (the worker supplies the TaskContext)"
        )


class Registry:
    """The task functions of one :class:`AsyncTasks`, by name and by function."""

    def __init__(self) -> None:
        self._by_name: dict[str, TaskDefinition] = {}
        self._by_function: dict[Any, TaskDefinition] = {}
        self._aliases: dict[str, TaskDefinition] = {}  # a script's "__main__.f": looked up, never listed
        self._limits: dict[str, FlowLimits] | None = None  # flow_limits(), computed once per change

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[TaskDefinition]:
        return iter(list(self._by_name.values()))

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._by_name)

    def get(self, name: str) -> TaskDefinition | None:
        """The definition registered under ``name``."""
        definition = self._by_name.get(name)
        return definition if definition is not None else self._aliases.get(name)

    def flow_limits(self) -> dict[str, FlowLimits]:
        """The flow limits of every registered name that has any (aliases included); empty when none."""
        if self._limits is None:
            limits: dict[str, FlowLimits] = {}
            for name, definition in [*self._aliases.items(), *self._by_name.items()]:
                if definition.limits is not None:
                    limits[name] = definition.limits
            self._limits = limits
        return self._limits

    def for_function(self, fn: object) -> TaskDefinition | None:
        """The definition of the registered function ``fn`` (the very object that was registered)."""
        try:
            return self._by_function.get(fn)
        except TypeError:  # an unhashable callable object: compare by identity
            return next((d for d in self._by_name.values() if d.fn is fn), None)

    def add(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None,
        queue: str | None,
        max_retries: int | None,
        timeout: float | timedelta | None,
        rate_limit: str | None = None,
        max_running: int | None = None,
        max_running_per_key: int | None = None,
        priority: int = 0,
    ) -> TaskDefinition:
        """Check ``fn`` against the rules and register it; see :meth:`AsyncTasks.register`."""
        definition = build_definition(
            fn,
            name=name,
            queue=queue,
            max_retries=max_retries,
            timeout=timeout,
            rate_limit=rate_limit,
            max_running=max_running,
            max_running_per_key=max_running_per_key,
            priority=priority,
        )
        existing = self._by_name.get(definition.name)
        if existing is not None:
            if existing.fn is fn and existing == definition:
                return existing
            raise ValueError(
                f"the task name {definition.name!r} is already registered for {_describe(existing.fn)}: "
                "pass another name= (names are what the backend stores, so each must be unique)"
            )
        self._by_name[definition.name] = definition
        self._limits = None
        if name is None and getattr(fn, "__module__", None) == "__main__":
            # Tasks a script stored under "__main__.f" (before its functions were named after its module)
            # still find their function in this script.
            self._aliases.setdefault(f"__main__.{fn.__qualname__}", definition)
        try:
            self._by_function.setdefault(fn, definition)
        except TypeError:
            pass
        return definition


def build_definition(
    fn: Callable[..., Any],
    *,
    name: str | None,
    queue: str | None,
    max_retries: int | None,
    timeout: float | timedelta | None,
    rate_limit: object = None,
    max_running: object = None,
    max_running_per_key: object = None,
    priority: object = 0,
) -> TaskDefinition:
    """Validate ``fn`` and the options; each problem is a ``TypeError`` (``ValueError`` for bad numbers)."""
    if isinstance(fn, type) or not callable(fn):
        raise TypeError(f"register() takes an async def (or def) function, got {fn!r}")
    described = _describe(fn)
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError(
            f"{described} is a generator function: a task must be an async def (or def) returning its result"
        )
    is_async = is_async_callable(fn)
    if name is None:
        name = _default_name(fn, described)
    else:
        name = check_label(name, f"register({described}): the task name")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"register({described}): cannot read its signature ({exc}); wrap it in a def"
        ) from None
    parameters = list(signature.parameters.values())
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL or parameter.kind is parameter.VAR_KEYWORD:
            star = "*" if parameter.kind is parameter.VAR_POSITIONAL else "**"
            raise TypeError(
                f"{described} takes {star}{parameter.name}: task functions need fixed parameters, so that "
                "enqueue can check the arguments; list them explicitly"
            )
        if parameter.kind is parameter.KEYWORD_ONLY and parameter.default is parameter.empty:
            raise TypeError(
                f"{described} has the keyword-only parameter {parameter.name!r} without a default: tasks are "
                "called with positional arguments only; make it positional or give it a default"
            )
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    context_at = [index for index, p in enumerate(positional) if _is_context(fn, p)]
    takes_context = context_at == [0]
    if context_at and not takes_context:
        raise TypeError(
            f"{described}: a TaskContext parameter must come first (ctx: TaskContext, then the arguments)"
        )
    arguments = positional[1:] if takes_context else positional
    min_args = sum(1 for p in arguments if p.default is p.empty)
    return TaskDefinition(
        name=name,
        fn=fn,
        queue=check_queue(DEFAULT_QUEUE if queue is None else queue, f"register({described})"),
        max_retries=check_max_retries(
            DEFAULT_MAX_RETRIES if max_retries is None else max_retries, f"register({described})"
        ),
        timeout=check_timeout(timeout, f"register({described})"),
        takes_context=takes_context,
        is_async=is_async,
        min_args=min_args,
        max_args=len(arguments),
        parameter_names=tuple(p.name for p in arguments),
        arguments=ArgumentCheck(fn, arguments),
        priority=check_priority(priority, f"register({described})"),
        limits=build_limits(rate_limit, max_running, max_running_per_key, f"register({described})"),
    )


def check_queue(queue: object, where: str) -> str:
    """``queue`` as a queue name: ``TypeError`` for a non-string, ``ValueError`` for an empty one or one
    holding a NUL.

    Task names, queue names and task ids never contain NUL: PostgreSQL cannot store it in text and other
    backends would store it, so the engine refuses it before anything reaches a backend, the same way
    whatever the backend.
    """
    return check_name(queue, f"{where}: the queue name")


def check_label(name: object, what: str) -> str:
    """A task or schedule name: as :func:`lifecycle._checks.check_name`, and not only whitespace (it must
    read as a name in listings and logs): ``TypeError`` for a non-string, ``ValueError`` otherwise."""
    text = check_name(name, what)
    if not text.strip():
        raise ValueError(f"{what} must not be blank, got {text!r}")
    return text


def check_max_retries(max_retries: object, where: str) -> int:
    """``max_retries`` as an int >= 0: ``TypeError`` for a non-int, ``ValueError`` for a negative one."""
    return check_count(max_retries, f"{where}: max_retries")


def check_timeout(timeout: object, where: str) -> float | None:
    """``timeout`` in seconds (``timedelta`` accepted) or ``None``: positive and finite."""
    return check_optional_seconds(timeout, f"{where}: timeout")


def is_async_callable(fn: object) -> bool:
    """True for an ``async def`` (also behind ``functools.partial``) or an object with an async
    ``__call__``."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(type(target), "__call__", None)  # noqa: B004 - an instance with async __call__
    return not inspect.isroutine(target) and call is not None and inspect.iscoroutinefunction(call)


def _default_name(fn: Callable[..., Any], described: str) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise TypeError(
            f"{described} has no stable importable name (a lambda, closure, partial or function defined "
            "inside another): pass name='...' to register() so producers and workers agree on it"
        )
    # A script's functions are named after the script's module, not "__main__", so that a worker which
    # imports the script (lifecycle worker service:tasks) knows them under the same name.
    return f"{public_module(module)}.{qualname}"


def _is_context(fn: Callable[..., Any], parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    if annotation is parameter.empty:
        return False
    if isinstance(annotation, str):
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = {}
        resolved = hints.get(parameter.name)
        if resolved is None:
            # Another parameter's annotation may be what failed: resolve this one alone.
            target = inspect.unwrap(fn)
            namespace = getattr(target, "__globals__", None)
            try:
                resolved = eval(annotation, dict(namespace or {}))  # what get_type_hints does, for one name
            except Exception:
                # Names imported under TYPE_CHECKING only: compare the written name.
                return annotation.rsplit(".", 1)[-1].strip("'\"") == "TaskContext"
        annotation = resolved
    return isinstance(annotation, type) and issubclass(annotation, TaskContext)


def _describe(fn: object) -> str:
    qualname = getattr(fn, "__qualname__", None)
    if qualname:
        return f"{qualname}()"
    return repr(fn)
