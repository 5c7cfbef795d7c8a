"""`lifecycle.asynctask.__all__` is exactly the documented public API; each public object has a docstring of
its own, reports its public module, and pickles by its public path."""

from __future__ import annotations

import inspect
import pickle
import traceback
import typing
from types import FunctionType, GenericAlias, ModuleType

import anyio
import pytest

import lifecycle.asynctask
import lifecycle.asynctask.nats
import lifecycle.asynctask.postgres
import lifecycle.asynctask.redis
import lifecycle.asynctask.testing

PUBLIC_MODULES: tuple[ModuleType, ...] = (
    lifecycle.asynctask,
    lifecycle.asynctask.redis,
    lifecycle.asynctask.postgres,
    lifecycle.asynctask.nats,
    lifecycle.asynctask.testing,
)

NOT_CLASSES_OR_FUNCTIONS = {
    ("lifecycle.asynctask.testing", "T0"),  # a float: documented in docs/backend-protocol.md
    ("lifecycle.asynctask.testing", "BackendFactory"),  # a Callable alias: likewise
}

DOCUMENTED = (
    "Abort",
    "AsyncTasks",
    "Backend",
    "BackendError",
    "BlockingProducer",
    "Call",
    "ChainInfo",
    "ChainStep",
    "ClaimedTask",
    "DuplicateTaskError",
    "Encoding",
    "FlowLimits",
    "FlowState",
    "FlowStats",
    "Group",
    "GroupInfo",
    "GroupRecord",
    "JSONEncoding",
    "ManualClock",
    "MemoryBackend",
    "NewGroup",
    "NewTask",
    "Notice",
    "NotifyingBackend",
    "PickleEncoding",
    "ProgressUpdate",
    "QueueStats",
    "Retry",
    "SQLiteBackend",
    "ScheduleInfo",
    "Settlement",
    "TaskContext",
    "TaskFlow",
    "TaskInfo",
    "TaskObserver",
    "TaskRecord",
    "TaskState",
    "TransactionalBackend",
    "WorkerLostError",
    "backend_from_url",
)


def test_all_is_exactly_the_documented_api() -> None:
    assert sorted(lifecycle.asynctask.__all__) == sorted(DOCUMENTED)
    assert isinstance(lifecycle.asynctask.__all__, tuple)


def public_objects() -> list[tuple[str, str, object]]:
    """``(module name, name, object)`` of every class and function the public modules export."""
    found: list[tuple[str, str, object]] = []
    for module in PUBLIC_MODULES:
        assert isinstance(module.__all__, tuple), module.__name__
        for name in module.__all__:
            value = getattr(module, name)
            alias = isinstance(value, GenericAlias)  # an instance of type too, on Python 3.10
            if not alias and isinstance(value, type | FunctionType):
                found.append((module.__name__, name, value))
            else:
                assert (module.__name__, name) in NOT_CLASSES_OR_FUNCTIONS, (module.__name__, name)
    return found


def own_doc(owner: object, attribute: str | None = None) -> str:
    """The docstring written for ``owner`` (or its ``attribute``) itself: never one inherited from a base
    class (what ``inspect.getdoc`` would fall back to), nor the signature a dataclass writes in its place."""
    if attribute is None:
        doc = owner.__dict__.get("__doc__") if isinstance(owner, type) else getattr(owner, "__doc__", None)
        if isinstance(owner, type) and doc and doc.startswith(f"{owner.__name__}("):
            return ""  # the dataclass-made "Name(field: type, ...)", not a docstring
        return doc or ""
    value = owner.__dict__[attribute]
    if isinstance(value, property):
        value = value.fget
    elif isinstance(value, classmethod | staticmethod):
        value = value.__func__
    return getattr(value, "__doc__", None) or ""


@pytest.mark.parametrize(("module", "name", "value"), public_objects(), ids=lambda x: str(x)[:40])
def test_every_public_object_has_a_docstring_of_its_own(module: str, name: str, value: object) -> None:
    assert own_doc(value).strip(), f"{module}.{name} has no docstring of its own"
    if not isinstance(value, type):
        return
    for attribute, member in vars(value).items():
        if attribute.startswith("_") or not (
            isinstance(member, FunctionType | property | classmethod | staticmethod)
        ):
            continue
        assert own_doc(value, attribute).strip(), f"{module}.{name}.{attribute} has no docstring of its own"


def test_the_docstring_check_can_fail() -> None:
    class Base:
        """Documented."""

        def method(self) -> None:
            """Documented."""

    class Bare(Base):
        def method(self) -> None:
            pass

    assert inspect.getdoc(Bare) == "Documented.", "what the old check read: it could not fail"
    assert own_doc(Bare) == ""
    assert own_doc(Bare, "method") == ""


@pytest.mark.parametrize(("module", "name", "value"), public_objects(), ids=lambda x: str(x)[:40])
def test_every_public_object_reports_its_public_module(module: str, name: str, value: object) -> None:
    assert getattr(value, "__module__", None) == module
    assert getattr(value, "__qualname__", None) == name
    if isinstance(value, type):
        # Type hints still resolve after the move (pydantic, FastAPI, cattrs read them).
        typing.get_type_hints(value)


def test_public_classes_stand_alone() -> None:
    # One class, one place: no public class of the package is split across private base classes (the
    # conformance suites excepted: they are composed of one rule-set class per topic, by design).
    public = {value for _, _, value in public_objects()}
    for module, name, value in public_objects():
        if not isinstance(value, type) or module == "lifecycle.asynctask.testing":
            continue
        for base in value.__mro__[1:]:
            if base.__module__.startswith("lifecycle"):
                private = f"{base.__module__}.{base.__qualname__}"
                assert base in public, f"{module}.{name} inherits the private {private}"
    assert lifecycle.asynctask.AsyncTasks.__mro__ == (lifecycle.asynctask.AsyncTasks, object)


def test_the_issue_api_methods_exist_on_async_tasks() -> None:
    methods = (
        "register", "enqueue", "enqueue_many", "info", "cancel", "stats", "list", "requeue",
        "requeue_dead", "purge", "schedule", "every", "enqueue_chain", "initialize", "execute", "cleanup",
    )  # fmt: skip
    for method in methods:
        assert callable(getattr(lifecycle.asynctask.AsyncTasks, method)), method


def test_server_backends_are_importable_from_their_modules() -> None:
    from lifecycle.asynctask.nats import NatsBackend
    from lifecycle.asynctask.postgres import PostgresBackend
    from lifecycle.asynctask.redis import RedisBackend

    assert RedisBackend.__module__ == "lifecycle.asynctask.redis"
    assert PostgresBackend.__module__ == "lifecycle.asynctask.postgres"
    assert NatsBackend.__module__ == "lifecycle.asynctask.nats"
    assert repr(RedisBackend) == "<class 'lifecycle.asynctask.redis.RedisBackend'>"


def test_public_exceptions_name_their_public_module() -> None:
    errors = [
        getattr(lifecycle.asynctask, name)
        for name in lifecycle.asynctask.__all__
        if isinstance(getattr(lifecycle.asynctask, name), type)
        and issubclass(getattr(lifecycle.asynctask, name), BaseException)
    ]
    assert {error.__name__ for error in errors} == {
        "Abort",
        "BackendError",
        "DuplicateTaskError",
        "Retry",
        "WorkerLostError",
    }
    for error in errors:
        assert error.__module__ == "lifecycle.asynctask", error
        instance = error(reason="x") if error is lifecycle.asynctask.Retry else error("x")
        text = "".join(traceback.format_exception_only(instance))
        assert text.startswith(f"lifecycle.asynctask.{error.__name__}: "), text
        assert pickle.loads(pickle.dumps(error)) is error, "pickled by its public path"
        dumped = pickle.dumps(instance)
        assert b"lifecycle.asynctask._" not in dumped
        again = pickle.loads(dumped)
        assert (type(again), again.args) == (type(instance), instance.args)


def test_public_values_pickle_by_their_public_path() -> None:
    from lifecycle.asynctask import ChainInfo, ChainStep, QueueStats, TaskInfo, TaskState

    chain = ChainInfo(
        id="chain-1",
        state=TaskState.ACTIVE,
        current=0,
        steps=(ChainStep(index=0, name="app.a", task_id="chain-1.0", state=TaskState.ACTIVE),),
    )
    info = TaskInfo(
        id="chain-1.0",
        name="app.a",
        queue="default",
        state=TaskState.ACTIVE,
        attempts=1,
        max_retries=3,
        enqueued_at=1.0,
        run_at=1.0,
        result={"rows": [1, 2]},
        chain_id="chain-1",
        chain_step=0,
        chain=chain,
    )
    for value in (info, QueueStats(pending=2, dead=1), TaskState.DEAD):
        dumped = pickle.dumps(value)
        assert b"lifecycle.asynctask._" not in dumped, value
        assert pickle.loads(dumped) == value
    duplicate = lifecycle.asynctask.DuplicateTaskError("a", ["a", "b"])
    again = pickle.loads(pickle.dumps(duplicate))
    assert (again.task_id, again.task_ids, again.args) == ("a", ("a", "b"), duplicate.args)
    retry = pickle.loads(pickle.dumps(lifecycle.asynctask.Retry(after=5, reason="rate limited")))
    assert (retry.after, retry.reason, str(retry)) == (5.0, "rate limited", "rate limited")


async def test_a_dead_tasks_error_names_the_public_exception_path() -> None:
    tasks = lifecycle.asynctask.AsyncTasks(lifecycle.asynctask.MemoryBackend(), poll_interval=0.05)

    @tasks.register(name="aborts")
    async def aborts() -> None:
        raise lifecycle.asynctask.Abort("order 7 does not exist")

    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        info = await tasks.wait(await tasks.enqueue(aborts), timeout=10)
        group.cancel_scope.cancel()
    assert info.last_error is not None
    assert "lifecycle.asynctask.Abort: order 7 does not exist" in info.last_error
    assert "_model" not in info.last_error
