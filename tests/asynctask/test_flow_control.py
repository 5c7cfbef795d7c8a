"""Flow control options checked at ``register`` and ``enqueue``: one clear error naming the call, the value
and the fix; what the engine hands the backend (limits in the claim only when some name has them, uniqueness
keys, debounce batches); and a backend written before flow control keeps working without it."""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest

from lifecycle.asynctask import (
    AsyncTasks,
    Call,
    DuplicateTaskError,
    FlowLimits,
    ManualClock,
    MemoryBackend,
    NewTask,
    TaskState,
)
from lifecycle.asynctask._backend import is_backend, supports_flow_control
from lifecycle.asynctask._flow import parse_rate, rate_text
from lifecycle.asynctask.testing.engine._harness import WAIT

pytestmark = pytest.mark.anyio


async def job(value: int) -> int:
    return value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/s", (100, 1.0)),
        ("30/m", (30, 60.0)),
        ("1000/h", (1000, 3600.0)),
        ("100/10s", (100, 10.0)),
        ("/m", (1, 60.0)),
        (" 5 / 2.5h ", (5, 9000.0)),
    ],
)
def test_rate_limits_parse(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text, "register(job())") == expected


@pytest.mark.parametrize("text", ["fast", "100", "100/d", "0/s", "100/0s", "-1/s", "1.5/s", "100/s/s", ""])
def test_a_bad_rate_limit_names_the_call_the_value_and_the_form(text: str) -> None:
    tasks = AsyncTasks(MemoryBackend())
    with pytest.raises(ValueError) as raised:
        tasks.register(job, rate_limit=text)
    message = str(raised.value)
    assert "register(job())" in message
    assert repr(text) in message
    assert '"100/s"' in message or "at least 1 start" in message


def test_rate_text_round_trips() -> None:
    for text in ("100/s", "30/m", "1000/h", "100/10s"):
        rate, per = parse_rate(text, "here")
        assert rate_text(FlowLimits(rate=rate, per=per)) == text


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"rate_limit": 5}, TypeError, "rate_limit"),
        ({"max_running": 0}, ValueError, "max_running"),
        ({"max_running": 2.5}, TypeError, "max_running"),
        ({"max_running_per_key": 0}, ValueError, "max_running_per_key"),
        ({"priority": True}, TypeError, "priority"),
        ({"priority": 10**15}, ValueError, "priority"),
    ],
)
def test_bad_registration_limits_are_refused(
    options: dict[str, Any], error: type[Exception], words: str
) -> None:
    tasks = AsyncTasks(MemoryBackend())
    with pytest.raises(error, match=words):
        tasks.register(job, **options)
    assert tasks.task_names == []


async def test_bad_enqueue_options_are_refused_before_anything_is_stored() -> None:
    tasks = AsyncTasks(MemoryBackend())
    tasks.register(job)
    async with tasks:
        cases: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({"debounce": 5}, ValueError, "task_id"),
            ({"debounce": 5, "task_id": "x", "delay": 1}, TypeError, "debounce"),
            ({"debounce": 5, "task_id": "x", "unique_for": 9}, ValueError, "unique_for"),
            ({"expires": "soon"}, TypeError, "expires"),
            ({"expires": -1}, ValueError, "expires"),
            ({"expires": 10, "delay": 20}, ValueError, "could never run"),
            ({"expires": datetime(2000, 1, 1, tzinfo=timezone.utc)}, ValueError, "could never run"),
            ({"unique_for": 0}, ValueError, "unique_for"),
            ({"concurrency_key": ""}, ValueError, "concurrency_key"),
            ({"concurrency_key": 7}, TypeError, "concurrency_key"),
            ({"priority": "high"}, TypeError, "priority"),
        ]
        for options, error, words in cases:
            with pytest.raises(error, match=words):
                await tasks.enqueue(job, 1, **options)
        with pytest.raises(ValueError, match="debounce"):
            await tasks.enqueue_many([Call(job, 1, task_id="a", debounce=1), Call(job, 2)])
        with pytest.raises(TypeError, match="unique_for"):
            await tasks.enqueue_chain([Call(job, 1), Call(job, 2, unique_for=5)])
        assert await tasks.list() == []


async def test_enqueue_stores_the_flow_fields() -> None:
    clock = ManualClock(1_000.0)
    tasks = AsyncTasks(MemoryBackend(), clock=clock)
    tasks.register(job, name="flow.job", priority=4)
    async with tasks:
        task_id = await tasks.enqueue(job, 1, concurrency_key="acct-1", expires=timedelta(minutes=1))
        info = await tasks.info(task_id)
        assert info is not None
        assert (info.priority, info.concurrency_key, info.expires_at) == (4, "acct-1", 1_060.0)
        at = datetime.fromtimestamp(2_000, timezone.utc)
        other = await tasks.enqueue(job, 2, priority=-2, expires=at)
        info = await tasks.info(other)
        assert info is not None
        assert (info.priority, info.expires_at) == (-2, 2_000.0)


class Recording(MemoryBackend):
    """A MemoryBackend that records what the engine passes to claim and enqueue_many."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.claims: list[Mapping[str, FlowLimits] | str | None] = []
        self.stored: list[tuple[list[NewTask], str]] = []

    async def claim(self, queues: Sequence[str], limit: int, **options: Any) -> Any:
        self.claims.append(options.get("limits", "not passed"))
        return await super().claim(queues, limit, **options)

    async def enqueue_many(self, tasks: Sequence[NewTask], **options: Any) -> list[str]:
        self.stored.append((list(tasks), options.get("if_exists", "not passed")))
        return await super().enqueue_many(tasks, **options)


async def test_the_engine_passes_limits_only_when_a_name_has_them() -> None:
    plain = Recording()
    tasks = AsyncTasks(plain, concurrency=1)
    tasks.register(job)
    async with tasks:
        await tasks.enqueue(job, 1)
        await tasks.recover_expired()
        worker_claim = await _one_claim(tasks)
    assert worker_claim == "not passed", "no limits registered: claim() is called as before flow control"

    limited = Recording()
    tasks = AsyncTasks(limited, concurrency=1)
    tasks.register(job, name="flow.limited", max_running=3)
    tasks.register(lambda: None, name="flow.free")
    async with tasks:
        await tasks.enqueue("flow.free")
        claim = await _one_claim(tasks)
    assert claim == {"flow.limited": FlowLimits(max_running=3)}, "only the names with limits"


async def _one_claim(tasks: AsyncTasks) -> object:
    backend = tasks.backend
    assert isinstance(backend, Recording)
    async with anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            while not backend.claims:
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    return backend.claims[0]


async def test_unique_keys_are_the_task_id_or_the_name_and_the_arguments() -> None:
    backend = Recording()
    tasks = AsyncTasks(backend)
    tasks.register(job, name="flow.job")
    async with tasks:
        await tasks.enqueue(job, 1, unique_for=30)
        await tasks.enqueue(job, 2, unique_for=30)
        await tasks.enqueue(job, 1, task_id="given", unique_for=30)
        await tasks.enqueue(job, 1, task_id="d", debounce=3)
    keys = [batch[0].unique_key for batch, _ in backend.stored]
    assert keys[0] is not None
    assert keys[1] is not None
    assert keys[0] != keys[1], "other arguments: another key"
    assert keys[0].startswith("call:flow.job:")
    assert keys[2] == "id:given"
    assert keys[3] is None
    assert [mode for _, mode in backend.stored] == ["not passed"] * 3 + ["debounce"]


async def test_a_window_conflict_says_so_and_pickles() -> None:
    tasks = AsyncTasks(MemoryBackend())
    tasks.register(job, name="flow.job")
    async with tasks:
        await tasks.enqueue(job, 1, unique_for=30)
        with pytest.raises(DuplicateTaskError) as raised:
            await tasks.enqueue(job, 1, unique_for=30)
    assert "unique_for" in str(raised.value)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert str(copy) == str(raised.value)
    assert copy.task_ids == raised.value.task_ids


class OldBackend:
    """A backend written before flow control: every method but pause/resume/paused/flow_state, and a claim
    without ``limits``."""

    def __init__(self) -> None:
        self._inner = MemoryBackend()

    def __getattr__(self, name: str) -> Any:
        if name in ("pause", "resume", "paused", "flow_state", "claim"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    async def open(self) -> None:
        await self._inner.open()

    async def close(self) -> None:
        await self._inner.close()

    async def claim(self, queues: Sequence[str], limit: int, *, now: float, lease_until: float) -> Any:
        return await self._inner.claim(queues, limit, now=now, lease_until=lease_until)


for _method in (
    "enqueue_many",
    "extend_leases",
    "settle",
    "reclaim_expired",
    "wait_for_work",
    "get",
    "list_records",
    "stats",
    "cancel",
    "requeue",
    "purge",
):
    setattr(
        OldBackend, _method, (lambda name: lambda self, *a, **k: getattr(self._inner, name)(*a, **k))(_method)
    )


async def test_a_backend_without_flow_control_still_runs_tasks_and_refuses_what_it_cannot_enforce() -> None:
    old = OldBackend()
    assert is_backend(old)
    assert not supports_flow_control(old)
    assert supports_flow_control(MemoryBackend())
    tasks = AsyncTasks(old, concurrency=1)  # type: ignore[arg-type]
    tasks.register(job, name="flow.job")
    async with tasks:
        task_id = await tasks.enqueue(job, 5)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.execute)
            info = await tasks.wait(task_id, timeout=20)
            group.cancel_scope.cancel()
        assert (info.state, info.result) == (TaskState.SUCCEEDED, 5)
        assert await tasks.paused() == set()
        with pytest.raises(RuntimeError, match="flow control"):
            await tasks.pause("default")
    limited = AsyncTasks(OldBackend(), concurrency=1)  # type: ignore[arg-type]
    limited.register(job, name="flow.job", rate_limit="1/s")
    async with limited:
        with pytest.raises(RuntimeError, match=r"flow\.job"):
            await limited.execute()
