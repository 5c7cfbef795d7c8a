"""An idle worker's verdicts go with its next wait (``RedisBackend.settle_wait_and_claim``): the settle call
is written ahead of the wait on the waiting connection, applied before the wait blocks, and its outcome is
reported as soon as its reply is read; a refused call is reported as such while the claim behind the wait
still returns its tasks; after a lost connection it is repeated with its call id, so what it applied counts
as applied."""

from __future__ import annotations

import cProfile
import pstats
import time
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from lifecycle.asynctask import AsyncTasks, ClaimedTask, NewTask, Settlement, TaskState
from lifecycle.asynctask._backends.redis._conn import SCRIPTS, ScriptRunner
from lifecycle.asynctask._backends.redis._lua import LuaScript
from lifecycle.asynctask._backends.redis._wait import Settling, Waiter
from lifecycle.asynctask.redis import RedisBackend
from tests.asynctask.redis.redis_servers import OpenRedis, settle_replies_lost, until_blocked

pytestmark = pytest.mark.redis

PROMPT = 10.0


def _task(task_id: str, now: float) -> NewTask:
    return NewTask(task_id, "job", "default", b"[]", 3, None, now, now)


class _Outcomes:
    """The ``settled`` callback: what it was told, and an event set the first time."""

    def __init__(self) -> None:
        self.told: list[set[str] | None] = []
        self.event = anyio.Event()

    def __call__(self, lost: set[str] | None) -> None:
        self.told.append(lost)
        self.event.set()


async def _running(backend: RedisBackend, task_id: str, now: float) -> Settlement:
    """Enqueue and claim ``task_id``; its success, to settle."""
    assert await backend.enqueue_many([_task(task_id, now)]) == [task_id]
    claimed = await backend.claim(["default"], 1, now=now, lease_until=now + 30)
    assert [c.record.id for c in claimed] == [task_id]
    return Settlement(task_id, claimed[0].token, TaskState.SUCCEEDED, at=now, result=b"r")


async def _settle_then_wait(
    backend: RedisBackend,
    verdicts: list[Settlement],
    now: float,
    outcomes: _Outcomes,
    *,
    queues: list[str] | None = None,
    timeout: float = 120,
    woken: anyio.Event | None = None,
) -> list[ClaimedTask] | None:
    """``settle_wait_and_claim`` of ``verdicts``, then a claim of up to 5 tasks of ``queues`` (``default``)
    leased for 30 s; the outcome told to ``outcomes``."""
    return await backend.settle_wait_and_claim(
        verdicts,
        ["default"] if queues is None else queues,
        5,
        now=now,
        lease_until=now + 30,
        timeout=timeout,
        woken=anyio.Event() if woken is None else woken,
        settled=outcomes,
    )


async def _state(backend: RedisBackend, task_id: str) -> TaskState:
    record = await backend.get(task_id)
    assert record is not None
    return record.state


async def test_verdicts_sent_with_a_wait_are_saved_and_reported_before_the_wait_ends(
    open_redis: OpenRedis, redis_url: str
) -> None:
    backend = await open_redis()
    producer = await open_redis()
    admin = aioredis.Redis.from_url(redis_url)
    now = time.time()
    verdict = await _running(backend, "done", now)
    outcomes = _Outcomes()
    results: list[Any] = []
    try:
        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as group:

                async def wait() -> None:
                    results.append(await _settle_then_wait(backend, [verdict], now, outcomes))

                group.start_soon(wait)
                await outcomes.event.wait()  # reported while the wait still blocks: nothing is enqueued yet
                assert outcomes.told == [set()]
                assert await _state(backend, "done") is TaskState.SUCCEEDED
                await until_blocked(admin, 1)
                assert not results
                assert await producer.enqueue_many([_task("next", time.time())]) == ["next"]
    finally:
        await admin.aclose()
    assert [[c.record.id for c in claimed] for claimed in results] == [["next"]]
    assert outcomes.told == [set()]


async def test_a_lost_lease_is_reported_as_settle_reports_it(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    now = time.time()
    verdict = await _running(backend, "taken", now)
    assert await backend.enqueue_many([_task("ready", now)]) == ["ready"]
    outcomes = _Outcomes()
    wrong = Settlement("taken", "not-the-token", TaskState.SUCCEEDED, at=now)
    with anyio.fail_after(PROMPT):
        claimed = await _settle_then_wait(backend, [wrong, verdict, verdict], now, outcomes)
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["ready"]  # due already: the wait ended at once
    # The first settlement's lease is not held; the third repeats the second's lease, which that one ended.
    assert outcomes.told == [{"taken"}]
    assert await _state(backend, "taken") is TaskState.SUCCEEDED


async def test_a_refused_settle_call_is_reported_and_the_claim_behind_the_wait_still_returns_its_tasks(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_redis()
    now = time.time()
    verdict = await _running(backend, "held", now)
    assert await backend.enqueue_many([_task("ready", now)]) == ["ready"]
    refusing = LuaScript("settle", "return redis.error_reply('refused for the test')")
    await backend._run().client.script_load(refusing.source)
    monkeypatch.setitem(SCRIPTS, "settle", refusing)
    outcomes = _Outcomes()
    with anyio.fail_after(PROMPT):
        claimed = await _settle_then_wait(backend, [verdict], now, outcomes)
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["ready"]
    assert outcomes.told == [None]
    assert await _state(backend, "held") is TaskState.ACTIVE


async def test_a_settle_call_whose_reply_is_lost_is_repeated_and_what_it_applied_counts_as_applied(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after the settle call and the claim ran, before their replies were read: both
    are sent again with the same call ids. The settle call's marker makes the repeat count its settlement
    as applied (a new call would find the record settled already and report its lease lost)."""
    backend = await open_redis()
    now = time.time()
    verdict = await _running(backend, "done", now)
    assert await backend.enqueue_many([_task("ready", now)]) == ["ready"]
    original = Waiter._send_all
    sent: list[object] = []

    async def lose_the_replies(
        self: Waiter, commands: Any, skip: Any, pause: float, woken: anyio.Event, settling: Settling | None
    ) -> object:
        assert settling is not None
        unread = Settling(settling.args, sent.append)  # the reply is read here and not passed on
        await original(self, commands, skip, pause, woken, unread)
        raise RedisConnectionError("connection lost after the calls ran")

    monkeypatch.setattr(Waiter, "_send_all", lose_the_replies)
    outcomes = _Outcomes()
    with anyio.fail_after(PROMPT):
        claimed = await _settle_then_wait(backend, [verdict], now, outcomes)
    assert sent == [[]]  # the first execution applied it
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["ready"]
    assert outcomes.told == [set()]
    assert await _state(backend, "done") is TaskState.SUCCEEDED


async def test_a_settle_call_whose_repeat_failed_too_is_given_back_and_named_by_the_next_settle_call(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after the settle call and the claim ran; the claim's repeat succeeds but the
    settle call's repeat fails too: its outcome is unknown, so the verdicts go back to the caller (``None``),
    and the settle call that saves them next names the lost call, which applied them: no lease is reported
    lost."""
    backend = await open_redis()
    now = time.time()
    verdict = await _running(backend, "done", now)
    assert await backend.enqueue_many([_task("ready", now)]) == ["ready"]
    original_send = Waiter._send_all
    original_run = ScriptRunner.run

    async def lose_the_replies(
        self: Waiter, commands: Any, skip: Any, pause: float, woken: anyio.Event, settling: Settling | None
    ) -> object:
        assert settling is not None
        await original_send(self, commands, skip, pause, woken, Settling(settling.args, lambda reply: None))
        raise RedisConnectionError("connection lost after the calls ran")

    async def refuse_settle_repeats(self: ScriptRunner, name: str, args: Any, **options: Any) -> Any:
        if name == "settle":
            raise RedisConnectionError("still no connection for the settle call")
        return await original_run(self, name, args, **options)

    monkeypatch.setattr(Waiter, "_send_all", lose_the_replies)
    monkeypatch.setattr(ScriptRunner, "run", refuse_settle_repeats)
    outcomes = _Outcomes()
    with anyio.fail_after(PROMPT):
        claimed = await _settle_then_wait(backend, [verdict], now, outcomes)
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["ready"]
    assert outcomes.told == [None]  # given back
    monkeypatch.setattr(ScriptRunner, "run", original_run)
    assert await _state(backend, "done") is TaskState.SUCCEEDED  # the first execution applied it
    assert await backend.settle([verdict]) == set()


async def test_a_refused_settle_call_keeps_the_earlier_call_it_named_for_the_next_one(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settle call applied its verdict and gave up (no reply); the settle call sent with a wait that named
    it is refused (a script the server forgot, as after a restart), which applies nothing: the settler's
    next call still names the first one, which applied the verdict."""
    backend = await open_redis(reconnect_timeout=0.02)
    now = time.time()
    verdict = await _running(backend, "done", now)
    settle_replies_lost(monkeypatch, backend)
    with anyio.fail_after(PROMPT), pytest.raises(RedisConnectionError):
        await backend.settle([verdict])
    monkeypatch.undo()
    assert await backend.enqueue_many([_task("ready", now)]) == ["ready"]
    command = ScriptRunner.command

    def forgotten_settle(self: ScriptRunner, name: str, args: Any) -> tuple[str | bytes | int, ...]:
        sent = command(self, name, args)
        return ("EVALSHA", "0" * 40, *sent[2:]) if name == "settle" else sent

    monkeypatch.setattr(ScriptRunner, "command", forgotten_settle)
    outcomes = _Outcomes()
    with anyio.fail_after(PROMPT):
        claimed = await _settle_then_wait(backend, [verdict], now, outcomes)
    monkeypatch.setattr(ScriptRunner, "command", command)
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["ready"]
    assert outcomes.told == [None]  # refused
    assert await backend.settle([verdict]) == set()


@pytest.mark.parametrize("case", ["woken already", "no queues"])
async def test_with_no_wait_to_write_the_verdicts_are_settled_on_their_own(
    open_redis: OpenRedis, case: str
) -> None:
    backend = await open_redis()
    now = time.time()
    verdict = await _running(backend, "done", now)
    woken = anyio.Event()
    if case == "woken already":
        woken.set()
    outcomes = _Outcomes()
    with anyio.fail_after(PROMPT):
        claimed = await _settle_then_wait(
            backend,
            [verdict],
            now,
            outcomes,
            queues=[] if case == "no queues" else ["default"],
            timeout=0.05 if case == "no queues" else 120,
            woken=woken,
        )
    assert claimed is None
    assert outcomes.told == [set()]
    assert await _state(backend, "done") is TaskState.SUCCEEDED


async def _one_at_a_time(
    worker_backend: RedisBackend, producer_backend: RedisBackend, count: int
) -> list[str]:
    """Send ``count`` tasks one at a time to an idle worker on ``worker_backend`` (each waited for, and its
    result checked); return their ids."""
    worker = AsyncTasks(worker_backend, concurrency=2)
    producer = AsyncTasks(producer_backend, execution=False)

    @worker.register(name="double")
    async def double(n: int) -> int:
        return n * 2

    await worker.initialize()
    await producer.initialize()
    ids = []
    try:
        async with anyio.create_task_group() as group:
            scope = anyio.CancelScope()

            async def execute() -> None:
                with scope:
                    await worker.execute()

            group.start_soon(execute)
            for n in range(count):
                ids.append(await producer.enqueue("double", n))
                done = await producer.wait(ids[-1], timeout=PROMPT)
                assert (done.state, done.result) == (TaskState.SUCCEEDED, n * 2)
            scope.cancel()
    finally:
        await producer.cleanup()
        await worker.cleanup()
    return ids


async def test_an_idle_worker_saves_its_verdicts_with_its_waits(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks sent one at a time to an idle worker: their verdicts go with the worker's next waits (no settle
    call of their own), and every result is saved."""
    worker_backend = await open_redis()
    written: list[bool] = []
    original = Waiter.wait_then_claim

    async def wait_then_claim(self: Waiter, *args: Any) -> Any:
        written.append(len(args) > 6 and args[6] is not None)  # a settle call written with the wait
        return await original(self, *args)

    # On the class: the engine saves verdicts with its waits only when the backend's own methods are used.
    monkeypatch.setattr(Waiter, "wait_then_claim", wait_then_claim)
    await _one_at_a_time(worker_backend, await open_redis(), 5)
    assert sum(written) >= 2, written


async def test_an_idle_worker_wakes_no_flusher_and_looks_up_no_library_per_task(
    open_redis: OpenRedis,
) -> None:
    """Tasks sent one at a time to an idle worker: the verdict of each goes with the next wait without the
    settler's flusher running for it (it would find the verdict taken), and the engine makes its events with
    the running loop's event class, looked up once (``anyio.Event()`` looks up the running library on every
    call). Counted, not timed: the calls a profiler sees (a few events are made once per worker, each of the
    ``count`` tasks made three before)."""
    count = 48
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await _one_at_a_time(await open_redis(), await open_redis(), count)
    finally:
        profiler.disable()
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    flusher_runs = sum(
        calls  # each time the flusher's coroutine resumes
        for (path, _, name), (_, calls, _, _, _) in stats.items()
        if path.endswith("_engine/_settler.py") and name == "run"
    )
    engine_event_lookups = sum(
        calls
        for (path, _, name), (_, _, _, _, callers) in stats.items()
        if path.endswith("anyio/_core/_synchronization.py") and name == "__new__"
        for (caller_path, _, _), (_, calls, _, _) in callers.items()
        if "/asynctask/_engine/" in caller_path
    )
    # Both counts find something (the flusher starts; a few events are made once per worker): the profiler's
    # names are the ones looked for.
    assert 1 <= flusher_runs <= count / 4, f"the flusher ran {flusher_runs} times for {count} tasks"
    assert 1 <= engine_event_lookups <= count / 4, f"{engine_event_lookups} anyio.Event() in the engine"


@pytest.mark.parametrize("case", ["refused", "raises"])
async def test_verdicts_a_wait_did_not_save_are_saved_by_the_settler(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A settle call the store refused (reported as ``None``), or a call that failed before reporting: the
    engine gives the verdicts back to its settler, which saves them on its own."""
    original = RedisBackend.settle_wait_and_claim
    failed: list[list[str]] = []

    async def failing(self: RedisBackend, settlements: Any, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append([s.task_id for s in settlements])
            if case == "raises":
                raise RedisConnectionError("connection lost before anything was written")
            kwargs["settled"](None)
            return await self.wait_and_claim(*args, **{k: v for k, v in kwargs.items() if k != "settled"})
        return await original(self, settlements, *args, **kwargs)

    monkeypatch.setattr(RedisBackend, "settle_wait_and_claim", failing)
    ids = await _one_at_a_time(await open_redis(), await open_redis(), 4)
    assert len(failed) == 1
    assert failed[0][0] in ids


def test_the_engine_carries_verdicts_with_a_wait_only_through_the_backends_own_methods() -> None:
    from lifecycle.asynctask._backend import combined_settle_wait_and_claim

    class OwnWaitAndClaim(RedisBackend):
        async def wait_and_claim(self, *args: Any, **kwargs: Any) -> Any:
            return await super().wait_and_claim(*args, **kwargs)

    class OwnSettle(RedisBackend):
        async def settle(self, settlements: Any) -> set[str]:
            return await super().settle(settlements)

    plain = RedisBackend("redis://127.0.0.1:6379/0", prefix="not-opened")
    assert combined_settle_wait_and_claim(plain) == plain.settle_wait_and_claim
    # An override of wait_and_claim would run for the waits without verdicts and be bypassed for the others.
    for bypassed in (OwnWaitAndClaim("redis://127.0.0.1:6379/0"), OwnSettle("redis://127.0.0.1:6379/0")):
        assert combined_settle_wait_and_claim(bypassed) is None, bypassed
