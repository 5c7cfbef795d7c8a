"""The settle script's plain path: a call that ends tasks whose leases it holds as succeeded, dead or
cancelled, with nothing else to do (no then, no group, no follow-up, no parked tasks of their names), runs
before the prelude is defined, and must store, publish and return exactly what the general part does;
anything else is left to the general part with nothing written before."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import ClaimedTask, FlowLimits, NewGroup, NewTask, Settlement, TaskState
from lifecycle.asynctask._backends.redis._codec import settlement_args
from lifecycle.asynctask._backends.redis._conn import SCRIPTS
from lifecycle.asynctask._backends.redis._lua import (
    _SETTLE,
    _SETTLE_PLAIN,
    PRELUDE,
    SETTLE_PLAIN_BOUND,
    LuaScript,
)
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, counted_call_ids, stored_keys

pytestmark = pytest.mark.redis

GENERAL = LuaScript("settle", PRELUDE + _SETTLE)
"""The settle script without its plain path: what the general part alone does."""

PLAIN_ONLY = LuaScript(
    "settle", _SETTLE_PLAIN.replace("%(plain)d", str(SETTLE_PLAIN_BOUND)) + "return 'general'\n"
)
"""The plain path alone: ``{}`` when it settled the call, ``'general'`` when it left it to the general
part."""

Verdicts = Callable[[list[ClaimedTask]], list[Settlement]]
Damage = Callable[[RedisBackend, aioredis.Redis, list[ClaimedTask]], Awaitable[None]]


def _task(task_id: str, **fields: Any) -> NewTask:
    task = NewTask(task_id, "job", "default", b"[]", 3, None, T0, T0)
    return replace(task, **fields) if fields else task


def _ok(claimed: list[ClaimedTask]) -> list[Settlement]:
    return [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=T0 + 2, result=b"r") for c in claimed]


async def _setup(
    backend: RedisBackend,
    client: aioredis.Redis,
    tasks: list[NewTask],
    groups: tuple[NewGroup, ...],
    limits: dict[str, FlowLimits] | None,
    damage: Damage | None,
) -> list[ClaimedTask]:
    if tasks:
        await backend.enqueue_many(tasks)
    for group in groups:
        await backend.enqueue_group(group)
    claimed = await backend.claim(["default", "other"], 2000, now=T0 + 1, lease_until=T0 + 31, limits=limits)
    if damage is not None:
        await damage(backend, client, claimed)
    return claimed


async def _both(
    open_redis: OpenRedis,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
    tasks: list[NewTask],
    verdicts: Verdicts,
    *,
    groups: tuple[NewGroup, ...] = (),
    limits: dict[str, FlowLimits] | None = None,
    damage: Damage | None = None,
    sends: int = 0,
    zmscore: bool = True,
) -> tuple[Any, Any, dict[str, Any], dict[str, Any], Any]:
    """Store ``tasks`` (and ``groups``) under two prefixes, claim them (with ``limits``), let ``damage``
    change each store, then settle ``verdicts(claimed)`` on each, with the whole script and with the general
    part alone: by ``RedisBackend.settle``, or (``sends``) the script call with those settlements as they
    are, sent that many times (twice: as a retry after a lost reply sends it). Returns both
    replies, both stores, and what the plain path alone answers to the call on a third store set up alike
    (which must then be unchanged unless it answered ``[]``). Without ``zmscore``, as for a server older than
    6.2 (one ZSCORE per task)."""
    plain = await open_redis(prefix=f"{unique_name}-plain")
    general = await open_redis(prefix=f"{unique_name}-general")
    probe = await open_redis(prefix=f"{unique_name}-probe")
    client = plain._run().client
    replies: dict[RedisBackend, Any] = {}
    flag = "1" if zmscore else "0"
    for backend in (plain, general):
        backend._zmscore = flag
        counted_call_ids(backend, monkeypatch)
        claimed = await _setup(backend, client, tasks, groups, limits, damage)
        if backend is general:
            monkeypatch.setitem(SCRIPTS, "settle", GENERAL)
        settlements = verdicts(claimed)
        if sends:
            args: list[str | bytes] = ["x.99", "60", flag]
            for settlement in settlements:
                args += settlement_args(settlement)
            replies[backend] = [await backend._run().run("settle", args) for _ in range(sends)]
        else:
            replies[backend] = await backend.settle(settlements)
        monkeypatch.setitem(SCRIPTS, "settle", _SCRIPT)
    counted_call_ids(probe, monkeypatch)
    claimed = await _setup(probe, client, tasks, groups, limits, damage)
    args = ["x.99", "60", flag]
    for settlement in verdicts(claimed):
        args += settlement_args(settlement)
    before = await stored_keys(client, probe.key_prefix)
    monkeypatch.setitem(SCRIPTS, "settle", PLAIN_ONLY)
    alone = await probe._run().run("settle", args)
    monkeypatch.setitem(SCRIPTS, "settle", _SCRIPT)
    if alone != []:
        assert await stored_keys(client, probe.key_prefix) == before, "the plain path wrote, then handed over"
    stored = await stored_keys(client, plain.key_prefix)
    expected = await stored_keys(client, general.key_prefix)
    return replies[plain], replies[general], stored, expected, alone


_SCRIPT = SCRIPTS["settle"]


def test_the_plain_path_returns_before_the_prelude_and_defines_no_function() -> None:
    source = _SCRIPT.source
    assert PRELUDE in source
    before = source[: source.index(PRELUDE)]
    assert "return {}" in before
    assert "function" not in before


@pytest.mark.parametrize("zmscore", [True, False], ids=["zmscore", "without-zmscore"])
async def test_the_plain_path_stores_what_the_general_part_does(
    open_redis: OpenRedis, unique_name: str, monkeypatch: pytest.MonkeyPatch, zmscore: bool
) -> None:
    tasks = [
        _task("a"),
        _task("b", priority=5),
        _task("c", meta="\x00tenant\x00acme", concurrency_key="user-1"),
        _task("d", expires_at=T0 + 90, timeout=2.5, max_retries=0),
        _task("e", queue="other", name="other-job"),
        _task("f", payload=b"\x00\xff binary"),
        _task("g", concurrency_key="user-2"),
        _task("h", queue="other", name="other-job", concurrency_key="user-1"),
    ]

    def verdicts(claimed: list[ClaimedTask]) -> list[Settlement]:
        by_id = {c.record.id: c for c in claimed}
        out = []
        wanted: list[tuple[str, TaskState, dict[str, Any]]] = [
            ("a", TaskState.SUCCEEDED, {"result": b"r\x00esult"}),
            ("b", TaskState.SUCCEEDED, {}),
            ("c", TaskState.DEAD, {"error": "boom"}),
            ("d", TaskState.CANCELLED, {"error": "cancelled"}),
            ("e", TaskState.SUCCEEDED, {"result": b""}),
            ("f", TaskState.DEAD, {"error": "x", "result": b"partial"}),
            ("g", TaskState.SUCCEEDED, {"result": b"1"}),
            ("h", TaskState.CANCELLED, {}),
        ]
        for task_id, state, fields in wanted:
            c = by_id[task_id]
            out.append(Settlement(task_id, c.token, state, at=T0 + 2, **fields))
        return out

    plain, general, stored, expected, alone = await _both(
        open_redis, unique_name, monkeypatch, tasks, verdicts, zmscore=zmscore
    )
    assert alone == []  # the plain path settled the call
    assert plain == general == set()
    assert len(stored) > 15
    assert stored == expected


@pytest.mark.parametrize("result", [b"r", None], ids=["with-result", "without-result"])
@pytest.mark.parametrize("zmscore", [True, False], ids=["zmscore", "without-zmscore"])
async def test_a_single_success_takes_the_plain_path(
    open_redis: OpenRedis,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
    result: bytes | None,
    zmscore: bool,
) -> None:
    """An idle worker's call: one settlement (its index score read with ZSCORE)."""
    tasks = [_task("a"), _task("b", queue="other")]

    def verdicts(claimed: list[ClaimedTask]) -> list[Settlement]:
        c = next(c for c in claimed if c.record.id == "b")
        return [Settlement("b", c.token, TaskState.SUCCEEDED, at=T0 + 2, result=result)]

    plain, general, stored, expected, alone = await _both(
        open_redis, unique_name, monkeypatch, tasks, verdicts, zmscore=zmscore
    )
    assert alone == []
    assert plain == general == set()
    assert stored == expected


async def test_the_plain_path_publishes_the_settled_notice_as_the_general_part_does(
    open_redis: OpenRedis, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another subscriber hears both paths' notice: the settling object's nonce and the ids, in call order."""
    heard: list[Any] = []
    for name, script in (("plain", _SCRIPT), ("general", GENERAL)):
        backend = await open_redis(prefix=f"{unique_name}-{name}")
        counted_call_ids(backend, monkeypatch)
        await backend.enqueue_many([_task("b"), _task("a")])
        claimed = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
        listener = backend._run().client.pubsub()
        await listener.subscribe(f"{backend.key_prefix}notices")
        try:
            assert (await listener.get_message(timeout=5))["type"] == "subscribe"
            monkeypatch.setitem(SCRIPTS, "settle", script)
            await backend.settle(list(reversed(_ok(claimed))))
            monkeypatch.setitem(SCRIPTS, "settle", _SCRIPT)
            message = await listener.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None
            heard.append(message["data"])
        finally:
            await listener.aclose()
    assert heard[0] == heard[1]
    assert heard[0] == b"s:x\x00a\x00b"


@pytest.mark.parametrize(
    "case",
    [
        "lost lease",
        "no record",
        "not in the active index",
        "damaged queue",
        "pending",
        "then",
        "group member",
        "follow-up",
        "parked tasks of the name",
        "id twice",
        "repeated call",
        "too many",
    ],
)
@pytest.mark.parametrize("zmscore", [True, False], ids=["zmscore", "without-zmscore"])
async def test_what_the_plain_path_leaves_to_the_general_part_ends_the_same(
    open_redis: OpenRedis, unique_name: str, monkeypatch: pytest.MonkeyPatch, case: str, zmscore: bool
) -> None:
    tasks = [_task("first"), _task("second")]
    groups: tuple[NewGroup, ...] = ()
    limits = None
    sends = {"repeated call": 2, "id twice": 1}.get(case, 0)
    if case == "group member":
        members = (_task("m1", group_id="grp"), _task("m2", group_id="grp"))
        groups = (NewGroup("grp", members, _task("z"), T0),)
    elif case == "parked tasks of the name":
        tasks.append(_task("third"))
        limits = {"job": FlowLimits(max_running=2)}  # the claim parks the third
    elif case == "too many":
        tasks += [_task(f"n{i:04}") for i in range(SETTLE_PLAIN_BOUND)]

    async def damage(backend: RedisBackend, client: aioredis.Redis, claimed: list[ClaimedTask]) -> None:
        key = f"{backend.key_prefix}t:first"
        if case == "no record":
            await client.delete(key)
        elif case == "not in the active index":
            await client.hset(key, "o", "f" * 16)
        elif case == "damaged queue":
            await client.hset(key, "q", "elsewhere")
        elif case == "follow-up":
            # A debounced enqueue of a running task: its follow-up waits for the settlement.
            assert await backend.enqueue_many([_task("first", payload=b"[1]")], if_exists="debounce") == [
                "first"
            ]

    def verdicts(claimed: list[ClaimedTask]) -> list[Settlement]:
        out = _ok(claimed)
        if case == "lost lease":
            out[0] = replace(out[0], token="not-the-token")
        elif case == "pending":
            out[0] = replace(out[0], state=TaskState.PENDING, result=None, run_at=T0 + 5)
        elif case == "then":
            out[0] = replace(out[0], then=(_task("next"),))
        elif case == "id twice":
            out.append(out[0])
        return out

    plain, general, stored, expected, alone = await _both(
        open_redis,
        unique_name,
        monkeypatch,
        tasks,
        verdicts,
        groups=groups,
        limits=limits,
        damage=damage,
        sends=sends,
        zmscore=zmscore,
    )
    if case == "repeated call":
        # The first attempt took the plain path; the retry finds the call's marker, and the general part
        # counts what the first attempt applied.
        assert alone == []
        assert plain == [[], []]
    else:
        assert alone == b"general"  # handed over, nothing written (checked in _both)
    assert plain == general
    assert stored == expected
    if case in ("lost lease", "no record", "not in the active index"):
        assert plain == {"first"}


@pytest.mark.parametrize(("field", "value"), [(7, "soon"), (6, "nan"), (7, "inf")])
async def test_a_damaged_follow_up_is_settled_as_if_there_were_none(
    open_redis: OpenRedis, field: int, value: str
) -> None:
    # A follow-up list whose run_at or enqueued_at is no finite number failed the whole settle call (a Lua
    # comparison with nil, or ZADD's "not a valid float"), and every retry of it, so the worker's settler
    # never got past it. Now it stays with its task: settled as if no follow-up waited.
    backend = await open_redis()
    client = backend._run().client
    await backend.enqueue_many([_task("first"), _task("other")])
    claimed = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
    assert await backend.enqueue_many([_task("first", payload=b"[1]")], if_exists="debounce") == ["first"]
    await client.lset(f"{backend.key_prefix}fu:first", field, value)
    assert await backend.settle(_ok(claimed)) == set()
    for task_id in ("first", "other"):
        record = await backend.get(task_id)
        assert record is not None
        assert record.state is TaskState.SUCCEEDED, task_id
    assert await client.exists(f"{backend.key_prefix}fu:first") == 0
