"""Run-time checks of task arguments against the task function's annotations: what ``enqueue`` does, for a
function registered in this ``AsyncTasks``, before anything is stored.

Each annotation is compiled once, at ``register``, into a predicate (a chain of ``isinstance`` tests and
loops over containers), so an enqueue costs one call per annotated argument. Values are checked, never
converted: a ``str`` is refused for a ``datetime`` parameter, a ``dict`` for a dataclass. A mismatch is
then explained by a second, slower walk that finds the innermost value at fault.

The rules are a type checker's, with two exceptions chosen for task arguments: ``bool`` is refused where
``int`` or ``float`` is expected (``True`` for a user id is a bug, not a subtype), and ``None`` is accepted
for a parameter whose default is ``None`` (``x: int = None``, which Python 3.10 reads as ``Optional``).
What cannot be checked at run time is accepted: unannotated parameters, ``Any``, ``object``, type
variables without bound, non-runtime protocols, callables and annotations whose names cannot be resolved.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union

import typing_extensions

__all__ = ["ArgumentCheck", "compile_check", "describe_type"]

Check = Callable[[Any], bool]

_WRAPPERS = tuple(
    getattr(module, name)
    for module in (typing, typing_extensions)
    for name in ("Annotated", "Required", "NotRequired", "ReadOnly", "Final", "ClassVar")
    if hasattr(module, name)
)
_LITERALS = (Literal, typing_extensions.Literal)
_ANY = (Any, typing_extensions.Any, object)
_MAPPINGS = (dict, collections.abc.Mapping)
_NOT_INT = bool  # refused where int or float is expected: see the module docstring


class ArgumentCheck:
    """The compiled checks of one task function's positional parameters (its ``TaskContext`` excluded).

    ``check(task, args)`` raises ``TypeError`` naming the first argument that does not fit its parameter's
    annotation: the parameter, the type it expects and the type it was given. Annotations that could not be
    resolved when the function was registered (a class defined later in its module) are resolved again at
    the first check, then stay unchecked if they still cannot be.
    """

    __slots__ = ("_checks", "_names", "_namespace", "_pending")

    def __init__(self, fn: Callable[..., Any], parameters: Sequence[inspect.Parameter]) -> None:
        self._names = tuple(parameter.name for parameter in parameters)
        self._namespace = _namespace(fn)
        self._checks: list[tuple[int, Check, Any]] = []
        self._pending: list[tuple[int, inspect.Parameter]] = []
        for index, parameter in enumerate(parameters):
            self._add(index, parameter, final=False)

    @property
    def checked(self) -> tuple[str, ...]:
        """The names of the parameters whose arguments are checked (for tests and docs)."""
        return tuple(self._names[index] for index, _, _ in self._checks)

    def check(self, task: str, args: tuple[Any, ...]) -> None:
        """Raise ``TypeError`` when an argument does not fit its parameter's annotation."""
        if self._pending:
            self._resolve_pending()
        count = len(args)
        for index, check, annotation in self._checks:
            if index < count and not check(args[index]):
                raise TypeError(self._explain(task, index, annotation, args[index]))

    def _add(self, index: int, parameter: inspect.Parameter, *, final: bool) -> None:
        if parameter.annotation is parameter.empty:
            return
        try:
            annotation = _resolve(parameter, self._namespace)
        except Exception:  # a name not defined yet, or imported under TYPE_CHECKING only
            if not final:
                self._pending.append((index, parameter))
            return
        if parameter.default is None:
            annotation = _or_none(annotation)
        try:
            check = compile_check(annotation)
        except Exception:  # an annotation object this module does not understand: accept anything
            return
        if check is not None:
            self._checks.append((index, check, annotation))
            self._checks.sort(key=lambda item: item[0])

    def _resolve_pending(self) -> None:
        pending, self._pending = self._pending, []
        for index, parameter in pending:
            self._add(index, parameter, final=True)

    def _explain(self, task: str, index: int, annotation: Any, value: Any) -> str:
        name = self._names[index]
        text = (
            f"cannot enqueue {task!r}: argument {index + 1} ({name}) must be {describe_type(annotation)}, "
            f"got {_type_name(value)} {_short(value)}"
        )
        inner = _mismatch(annotation, value, name)
        if inner is not None and inner[0] != name:
            where, expected, bad = inner
            text += f": {where} is {_type_name(bad)} {_short(bad)}, not {describe_type(expected)}"
        return f"{text} (values are checked, not converted: pass the type the function declares)"


def _or_none(annotation: Any) -> Any:
    """``annotation | None``, for any annotation object (``|`` is not defined on all of them)."""
    if annotation is None or annotation is type(None):
        return annotation
    return Union[annotation, None]


def compile_check(annotation: Any) -> Check | None:
    """A predicate telling whether a value fits ``annotation``, or ``None`` when anything fits (or the
    annotation cannot be checked at run time)."""
    annotation = _unwrap(annotation)
    if _is(annotation, _ANY):
        return None
    if annotation is None or annotation is type(None):
        return _is_none
    if isinstance(annotation, TypeVar):
        return _type_var_check(annotation)
    origin = typing.get_origin(annotation)
    if origin is None:
        return _class_check(annotation) if isinstance(annotation, type) else None
    args: tuple[Any, ...] = typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return _union_check(args)
    if _is(origin, _LITERALS):
        return _literal_check(args)
    if origin is tuple:
        return _tuple_check(args)
    if origin is type:
        return _subclass_check(args)
    if not isinstance(origin, type):
        return None
    if issubclass(origin, _MAPPINGS):
        return _mapping_check(origin, args)
    if issubclass(origin, collections.abc.Collection) and not issubclass(origin, (str, bytes)) and args:
        return _collection_check(origin, args[0])
    return _instance_check(origin)  # also collections.abc.Callable[...], a user's Generic[...]


def describe_type(annotation: Any) -> str:
    """``annotation`` as it reads in code: ``int``, ``list[int]``, ``datetime | None``,
    ``Literal['a', 'b']``."""
    annotation = _unwrap(annotation)
    if annotation is None or annotation is type(None):
        return "None"
    if _is(annotation, _ANY):
        return "object" if annotation is object else "Any"
    origin = typing.get_origin(annotation)
    args: tuple[Any, ...] = typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(describe_type(arg) for arg in args)
    if _is(origin, _LITERALS):
        return f"Literal[{', '.join(repr(arg) for arg in args)}]"
    if origin is not None:
        base = getattr(origin, "__qualname__", None) or repr(origin).replace("typing.", "")
        if origin is tuple and args == ():
            return "tuple[()]"
        return f"{base}[{', '.join('...' if arg is ... else describe_type(arg) for arg in args)}]"
    if isinstance(annotation, type):
        return annotation.__qualname__
    if isinstance(annotation, TypeVar):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


# -- compiling -----------------------------------------------------------------------------------------------


def _is_none(value: Any) -> bool:
    return value is None


def _is_int(value: Any) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, _NOT_INT))


def _is_float(value: Any) -> bool:
    kind = type(value)
    if kind is float or kind is int:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, _NOT_INT)


def _is_complex(value: Any) -> bool:
    return isinstance(value, (int, float, complex)) and not isinstance(value, _NOT_INT)


def _class_check(cls: type) -> Check | None:
    if cls is int:
        return _is_int
    if cls is float:
        return _is_float
    if cls is complex:
        return _is_complex
    if typing_extensions.is_typeddict(cls):
        return _typed_dict_check(cls)
    if getattr(cls, "_is_protocol", False) and not getattr(cls, "_is_runtime_protocol", False):
        return None  # isinstance() cannot answer for a protocol that is not @runtime_checkable
    return _instance_check(cls)


def _instance_check(cls: type) -> Check:
    def check(value: Any) -> bool:
        return isinstance(value, cls)

    return check


def _type_var_check(variable: TypeVar) -> Check | None:
    if variable.__bound__ is not None:
        return compile_check(variable.__bound__)
    if variable.__constraints__:
        return _union_check(variable.__constraints__)
    return None


def _union_check(members: tuple[Any, ...]) -> Check | None:
    checks: list[Check] = []
    for member in members:
        check = compile_check(member)
        if check is None:
            return None  # one member accepts anything, so the union does
        checks.append(check)
    accepts_none = _is_none in checks
    others = [check for check in checks if check is not _is_none]
    if accepts_none and len(others) == 1:
        (single,) = others

        def optional(value: Any) -> bool:
            return value is None or single(value)

        return optional

    def any_of(value: Any) -> bool:
        return any(check(value) for check in checks)

    return any_of


def _literal_check(values: tuple[Any, ...]) -> Check:
    # 1 == True == 1.0: a literal matches a value of its own type only.
    allowed = tuple((type(value), value) for value in values)

    def literal(value: Any) -> bool:
        kind = type(value)
        return any(kind is allowed_kind and value == allowed_value for allowed_kind, allowed_value in allowed)

    return literal


def _tuple_check(args: tuple[Any, ...]) -> Check:
    if not args:  # bare `tuple` reaches _class_check; this is `tuple[()]`
        return lambda value: isinstance(value, tuple) and not value
    if len(args) == 2 and args[1] is ...:
        item = compile_check(args[0])
        if item is None:
            return _instance_check(tuple)
        return lambda value: isinstance(value, tuple) and all(item(each) for each in value)
    items = [compile_check(arg) for arg in args]
    length = len(items)

    def fixed(value: Any) -> bool:
        if not isinstance(value, tuple) or len(value) != length:
            return False
        return all(check is None or check(each) for check, each in zip(items, value, strict=True))

    return fixed


def _subclass_check(args: tuple[Any, ...]) -> Check:
    target = _unwrap(args[0]) if args else object
    if not isinstance(target, type):
        return _instance_check(type)
    return lambda value: isinstance(value, type) and issubclass(value, target)


def _mapping_check(origin: type, args: tuple[Any, ...]) -> Check:
    key = compile_check(args[0]) if args else None
    item = compile_check(args[1]) if len(args) > 1 else None
    if key is None and item is None:
        return _instance_check(origin)

    def mapping(value: Any) -> bool:
        if not isinstance(value, origin):
            return False
        return all(
            (key is None or key(k)) and (item is None or item(v))
            for k, v in value.items()  # type: ignore[attr-defined]
        )

    return mapping


def _collection_check(origin: type, argument: Any) -> Check:
    item = compile_check(argument)
    if item is None:
        return _instance_check(origin)

    def collection(value: Any) -> bool:
        return isinstance(value, origin) and all(item(each) for each in value)  # type: ignore[attr-defined]

    return collection


def _typed_dict_check(cls: type) -> Check:
    hints = _field_hints(cls)
    fields = {name: compile_check(hint) for name, hint in hints.items()}
    required = frozenset(getattr(cls, "__required_keys__", ()))

    def typed_dict(value: Any) -> bool:
        if not isinstance(value, dict) or not required <= value.keys():
            return False
        return all(
            (check := fields.get(key)) is None or check(item) for key, item in value.items() if key in fields
        )

    return typed_dict


# -- explaining a mismatch -----------------------------------------------------------------------------------


def _mismatch(annotation: Any, value: Any, where: str) -> tuple[str, Any, Any] | None:
    """``(where, expected, value)`` of the innermost part of ``value`` that does not fit, or ``None``."""
    check = compile_check(annotation)
    if check is None or check(value):
        return None
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    args: tuple[Any, ...] = typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        # Explain against the member whose container type matches, if exactly one does.
        matching = [arg for arg in args if _outer_fits(arg, value)]
        if len(matching) == 1:
            return _mismatch(matching[0], value, where) or (where, annotation, value)
        return where, annotation, value
    if not _outer_fits(annotation, value):
        return where, annotation, value
    if origin is tuple:
        members = (args[0],) * len(value) if len(args) == 2 and args[1] is ... else args
        for index, (arg, each) in enumerate(zip(members, value, strict=False)):
            inner = _mismatch(arg, each, f"{where}[{index}]")
            if inner is not None:
                return inner
        return where, annotation, value
    if isinstance(origin, type) and issubclass(origin, _MAPPINGS) and args:
        key_type, *item_type = args
        for key, item in value.items():
            inner = _mismatch(key_type, key, f"a key of {where}")
            if inner is None and item_type:
                inner = _mismatch(item_type[0], item, f"{where}[{key!r}]")
            if inner is not None:
                return inner
    elif isinstance(origin, type) and issubclass(origin, collections.abc.Collection) and args:
        for index, each in enumerate(value):
            indexed = isinstance(value, collections.abc.Sequence)
            label = f"{where}[{index}]" if indexed else f"an item of {where}"
            inner = _mismatch(args[0], each, label)
            if inner is not None:
                return inner
    elif isinstance(annotation, type) and typing_extensions.is_typeddict(annotation):
        missing = sorted(set(getattr(annotation, "__required_keys__", ())) - set(value))
        if missing:
            return f"{where} (missing key {missing[0]!r})", annotation, value
        for key, hint in _field_hints(annotation).items():
            if key in value:
                inner = _mismatch(hint, value[key], f"{where}[{key!r}]")
                if inner is not None:
                    return inner
    return where, annotation, value


def _outer_fits(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is of the outer type of ``annotation`` (``list`` for ``list[int]``)."""
    annotation = _unwrap(annotation)
    if typing_extensions.is_typeddict(annotation):
        return isinstance(value, dict)
    origin = typing.get_origin(annotation)
    if origin is None or _is(origin, _LITERALS) or origin is Union or origin is types.UnionType:
        check = compile_check(annotation)
        return check is None or check(value)
    return not isinstance(origin, type) or isinstance(value, origin)


# -- helpers -------------------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """The type inside ``Annotated[...]``, ``Required[...]`` and similar, a ``NewType``'s supertype, a
    ``type X = ...`` alias's value."""
    while True:
        origin = typing.get_origin(annotation)
        if _is(origin, _WRAPPERS):
            annotation = typing.get_args(annotation)[0]
        elif hasattr(annotation, "__supertype__"):  # NewType
            annotation = annotation.__supertype__
        elif type(annotation).__name__ == "TypeAliasType" and hasattr(annotation, "__value__"):
            annotation = annotation.__value__
        else:
            return annotation


def _resolve(parameter: inspect.Parameter, namespace: dict[str, Any]) -> Any:
    """The annotation of ``parameter`` with string annotations (and forward references inside it)
    evaluated in the function's module; raises what the evaluation raises (``NameError``, ...)."""
    holder = types.SimpleNamespace(__annotations__={"value": parameter.annotation})
    return typing.get_type_hints(holder, globalns=namespace, include_extras=True)["value"]


def _namespace(fn: Callable[..., Any]) -> dict[str, Any]:
    """The globals string annotations of ``fn`` are evaluated in (its module's)."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    target = inspect.unwrap(target)
    if inspect.ismethod(target):
        target = target.__func__
    if not inspect.isfunction(target):
        call = getattr(type(target), "__call__", None)  # noqa: B004 - a callable object
        target = getattr(call, "__func__", call)
    namespace = getattr(target, "__globals__", None)
    return namespace if isinstance(namespace, dict) else {}


def _field_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception:  # a field annotation that cannot be resolved: check the keys only
        return {}


def _is(value: Any, candidates: tuple[Any, ...]) -> bool:
    """``value in candidates`` by identity (annotations need not be hashable, nor comparable)."""
    return any(value is candidate for candidate in candidates)


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__qualname__


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the TypeError
        return f"<{type(value).__name__} object>"
    text = f"({text})"
    return text if len(text) <= 62 else f"{text[:58]}...)"
