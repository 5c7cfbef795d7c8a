"""The NATS backend's log: transactions larger than one message, messages no replica may apply, snapshots
and the deletion of the log before them, replicas that fall behind a deleted log, and many writers at once."""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Awaitable, Callable

import anyio
import nats
import nats.js.errors
import pytest

from lifecycle.asynctask import ClaimedTask, GroupRecord, NewGroup, ProgressUpdate, Settlement, TaskState
from lifecycle.asynctask._backends.nats._codec import FORMAT, decode_message, decode_snapshot
from lifecycle.asynctask._backends.nats._log import Log, Names
from lifecycle.asynctask.nats import NatsBackend
from lifecycle.asynctask.testing import T0
from lifecycle.asynctask.testing._support import new_task
from tests.asynctask.nats.nats_servers import OpenNats

pytestmark = pytest.mark.nats


async def _log_state(url: str, prefix: str) -> tuple[int, int]:
    """(first, last) sequence of the prefix's log stream."""
    client = await nats.connect(url)
    try:
        state = (await client.jetstream().stream_info(f"{prefix}_tasks_log")).state
        return state.first_seq, state.last_seq
    finally:
        await client.close()


async def _publish_raw(url: str, prefix: str, body: bytes, headers: dict[str, str]) -> int:
    client = await nats.connect(url)
    try:
        ack = await client.jetstream().publish(f"{prefix}.tasks.log", body, headers=headers)
        return ack.seq
    finally:
        await client.close()


def _enqueue_document(task_id: str) -> bytes:
    row = [task_id, "suite.job", "default", {"b": ""}, "pending", 0, 3, None, T0, T0]
    row += [None] * 9 + [None, None, 1]
    return json.dumps({"v": 1, "ops": [["n", task_id, row]]}).encode()


async def test_a_transaction_larger_than_one_message_is_read_whole_by_every_process(
    open_nats: OpenNats, nats_url: str
) -> None:
    writer = await open_nats()
    reader = await open_nats()
    big = [new_task(f"big-{n}", payload=bytes([n]) * 700_000) for n in range(3)]
    _, before = await _log_state(nats_url, writer.prefix)
    assert await writer.enqueue_many(big) == ["big-0", "big-1", "big-2"]
    _, after = await _log_state(nats_url, writer.prefix)
    assert after - before >= 3, "2.8 MB of base64 cannot fit in one message of 1 MB"
    for task in big:
        record = await reader.get(task.id)
        assert record is not None
        assert record.payload == task.payload
    claimed = await reader.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 30)
    assert [c.record.payload for c in claimed] == [task.payload for task in big]


async def test_an_interrupted_transaction_of_several_messages_is_never_applied(
    open_nats: OpenNats, nats_url: str
) -> None:
    writer = await open_nats()
    await writer.enqueue_many([new_task("before")])
    _, last = await _log_state(nats_url, writer.prefix)
    document = _enqueue_document("half-written")
    headers = {
        "Nats-Expected-Last-Sequence": str(last),
        "Lifecycle-Txn": "interrupted",
        "Lifecycle-Part": "0/2",
    }
    await _publish_raw(nats_url, writer.prefix, document[: len(document) // 2], headers)
    assert await writer.enqueue_many([new_task("after")]) == ["after"], "a writer goes on after the dead one"
    later = await open_nats()
    for backend in (writer, later):
        assert await backend.get("half-written") is None
        assert {r.id for r in await backend.list_records()} == {"before", "after"}


async def test_a_message_not_written_right_after_the_last_one_is_skipped_by_every_replica(
    open_nats: OpenNats, nats_url: str
) -> None:
    writer = await open_nats()
    await writer.enqueue_many([new_task("before")])
    _, last = await _log_state(nats_url, writer.prefix)
    await _publish_raw(nats_url, writer.prefix, _enqueue_document("unchecked"), {})
    with pytest.raises(nats.js.errors.BadRequestError, match="wrong last sequence"):
        await _publish_raw(  # the server refuses it: the log is not at last - 1
            nats_url,
            writer.prefix,
            _enqueue_document("stale"),
            {"Nats-Expected-Last-Sequence": str(last - 1)},
        )
    await _publish_raw(nats_url, writer.prefix, b"not json", {"Nats-Expected-Last-Sequence": str(last + 1)})
    assert await writer.enqueue_many([new_task("after")]) == ["after"]
    later = await open_nats()
    for backend in (writer, later):
        assert {r.id for r in await backend.list_records()} == {"before", "after"}


async def test_snapshots_let_the_log_be_deleted_and_a_new_process_reads_the_same_store(
    open_nats: OpenNats, nats_url: str
) -> None:
    writer = await open_nats()
    writer.compact_every = 10
    for n in range(60):
        await writer.enqueue_many([new_task(f"t{n:02d}", enqueued_at=T0 + n, priority=n % 3)])
        if n % 4 == 0:
            (claimed,) = await writer.claim(["default"], 1, now=T0 + 100, lease_until=T0 + 130)
            await writer.settle([_done(claimed)])
    await writer.pause("held")
    first, last = await _log_state(nats_url, writer.prefix)
    assert first > 20, f"the log before the previous snapshot was deleted (first message {first} of {last})"
    reader = await open_nats()
    assert await reader.list_records(limit=1000) == await writer.list_records(limit=1000)
    assert await reader.stats() == await writer.stats()
    assert await reader.paused() == {"held"}
    taken = await reader.claim(["default"], 100, now=T0 + 100, lease_until=T0 + 130)
    assert len(taken) == 45, "every pending task, read from the snapshot and the log after it"
    order = [(-c.record.priority, c.record.enqueued_at) for c in taken]
    assert order == sorted(order), "claim order (priority, then enqueue order) survives a snapshot"


async def test_groups_cancel_requests_and_progress_survive_a_snapshot(
    open_nats: OpenNats, nats_url: str
) -> None:
    writer = await open_nats()
    writer.compact_every = 5
    members = tuple(new_task(f"g-m{n}", enqueued_at=T0, group_id="g") for n in range(3))
    then = new_task("g-then", enqueued_at=T0, payload=b"\x00then\xff")
    await writer.enqueue_group(NewGroup(id="g", members=members, then=then, created_at=T0, meta="m"))
    claimed = {c.record.id: c for c in await writer.claim(["default"], 3, now=T0 + 1, lease_until=T0 + 60)}
    assert await writer.settle([_done(claimed["g-m1"], result=b"\xffone")]) == set()
    assert await writer.cancel(["g-m2"], now=T0 + 2) == ["g-m2"]
    progress = ProgressUpdate("g-m0", claimed["g-m0"].token, done=1.5, total=3.0, message="half ✓")
    assert await writer.save_progress([progress]) == set()
    for n in range(20):  # enough transactions for two snapshots: the log before the group is deleted
        await writer.enqueue_many([new_task(f"filler-{n}", run_at=T0 + 1000)])
    first, last = await _log_state(nats_url, writer.prefix)
    assert first > 5, f"the group's transactions were deleted with the log (first message {first} of {last})"
    reader = await open_nats()
    group = await reader.get_group("g")
    assert isinstance(group, GroupRecord)
    assert group == await writer.get_group("g")
    assert (group.task_ids, group.results, group.meta) == (
        ("g-m0", "g-m1", "g-m2"),
        (None, b"\xffone", None),
        "m",
    )
    assert await reader.cancel_requests(["g-m0", "g-m1", "g-m2"]) == {"g-m2"}
    record = await reader.get("g-m0")
    assert record is not None
    assert (record.progress_done, record.progress_total, record.progress_message) == (1.5, 3.0, "half ✓")
    assert record.group_id == "g"
    verdicts = [_done(claimed["g-m0"]), _done(claimed["g-m2"], result=b"two")]
    assert await reader.settle(verdicts) == set(), (
        "the then kept in the snapshot is stored by the last success"
    )
    stored_then = await writer.get("g-then")
    assert stored_then is not None
    assert (stored_then.payload, stored_then.state) == (then.payload, TaskState.PENDING)
    assert (await writer.get_group("g")) == (await reader.get_group("g"))


def test_format_1_messages_and_snapshots_are_read_with_the_new_fields_defaults() -> None:
    row = [
        "old", "suite.job", "default", {"b": "AA=="}, "active", 1, 3, None, T0, T0, T0 + 1, None, T0 + 30,
        None, None, None, 0, None, None, "token-1", None, 7,
    ]  # fmt: skip
    (stored,) = decode_message(json.dumps({"v": 1, "ops": [["n", "old", row]]}).encode()) or []
    assert stored[2][19:24] == (False, None, None, None, None), "cancel_requested, progress and group_id"
    assert stored[2][24:] == ("token-1", None, 7), "the token, follow-up and order keep their meaning"
    (update,) = (
        decode_message(json.dumps({"v": 1, "ops": [["u", "old", {"12": T0 + 60, "19": "t2"}]]}).encode())
        or []
    )
    assert update[2] == {12: T0 + 60, 24: "t2"}, "a format 1 update of the token sets the token"
    assert decode_message(json.dumps({"v": FORMAT + 1, "ops": []}).encode()) is None, (
        "a newer format is skipped"
    )
    snapshot = {"v": 1, "seq": 9, "rows": [row], "windows": {}, "buckets": {}, "paused": []}
    seq, rows, _, _, _, groups = decode_snapshot(json.dumps(snapshot).encode())
    (read,) = list(rows)
    assert (seq, read[19:24], read[24], groups) == (9, (False, None, None, None, None), "token-1", [])


async def test_a_replica_behind_a_deleted_log_reads_the_snapshot_again(
    open_nats: OpenNats, nats_url: str
) -> None:
    writer = await open_nats()
    writer.compact_every = 5
    behind = await open_nats()
    await behind._opened().stop_following()  # as if its pushed messages were late: it reads nothing now
    for n in range(40):
        await writer.enqueue_many([new_task(f"t{n:02d}")])
    first, _ = await _log_state(nats_url, writer.prefix)
    assert first > behind._state.seq + 1, "the messages the late replica needs are gone"
    assert len(await behind.list_records(limit=100)) == 40
    claimed = await behind.claim(["default"], 100, now=T0 + 1, lease_until=T0 + 30)
    assert len(claimed) == 40
    assert await writer.stats() == {"default": {TaskState.ACTIVE: 40}}


async def test_many_writers_at_once_claim_each_task_once_and_lose_no_settlement(open_nats: OpenNats) -> None:
    backends = [await open_nats() for _ in range(4)]
    task_ids = [f"w{n:03d}" for n in range(300)]
    claimed: list[ClaimedTask] = []

    async def produce(backend: NatsBackend, start: int) -> None:
        for index in range(start, len(task_ids), 4):
            await backend.enqueue_many([new_task(task_ids[index])])

    async def work(backend: NatsBackend) -> None:
        idle = 0
        while idle < 50:
            batch = await backend.claim(["default"], 7, now=T0 + 1, lease_until=T0 + 30)
            if not batch:
                idle += 1
                await anyio.sleep(0.01)
                continue
            idle = 0
            claimed.extend(batch)
            assert await backend.settle([_done(c) for c in batch]) == set()

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for index, backend in enumerate(backends):
                group.start_soon(produce, backend, index)
                group.start_soon(work, backend)
    assert sorted(c.record.id for c in claimed) == task_ids, "every task claimed exactly once"
    for backend in backends:
        assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 300}}


def _done(claimed: ClaimedTask, result: bytes | None = None) -> Settlement:
    return Settlement(
        task_id=claimed.record.id, token=claimed.token, state=TaskState.SUCCEEDED, at=T0 + 2, result=result
    )


async def test_a_call_that_changes_nothing_plans_again_when_a_message_arrives_while_it_checks_the_log(
    open_nats: OpenNats,
) -> None:
    """The replica changes in place: another writer's claim pushed while a reclaim asks the server for the
    log's head must make the reclaim plan again, not return what it planned without that claim."""
    dead_worker = await open_nats()
    survivor = await open_nats()
    await dead_worker.enqueue_many([new_task("lost"), new_task("other")])
    await survivor.stats()  # the survivor has read the enqueue
    held: list[tuple[object, ...]] = []
    feed = survivor._feed

    def hold(*message: object) -> None:
        held.append(message)

    survivor._feed = hold  # type: ignore[method-assign, assignment]
    (lost,) = await dead_worker.claim(["default"], 1, now=T0, lease_until=T0 + 30)
    assert lost.record.id == "lost"
    log = survivor._log
    assert log is not None
    real_head = log.head

    async def head_delivering_the_held_claim() -> int:
        survivor._feed = feed  # type: ignore[method-assign]
        for message in held:
            feed(*message)  # type: ignore[arg-type]
        return await real_head()

    log.head = head_delivering_the_held_claim  # type: ignore[method-assign]
    with anyio.fail_after(10):
        reclaimed = await survivor.reclaim_expired(now=T0 + 40, lease_until=T0 + 70, limit=10)
    assert [claimed.record.id for claimed in reclaimed] == ["lost"]


async def test_a_call_sent_before_a_lost_connection_is_sent_again_when_it_is_back() -> None:
    url = "nats://127.0.0.1:4222"  # never connected to: the test calls retrying() with its own calls
    log = Log(url, Names("unit"), replicas=1, options={}, connect_timeout=1, reconnect_timeout=60)
    told: list[str] = []
    log.reconnected = lambda: told.append("reconnected")
    sent: Counter[str] = Counter()
    back = anyio.Event()

    def request(name: str, *, lost: bool) -> Callable[[], Awaitable[str]]:
        async def send() -> str:
            sent[name] += 1
            if lost and sent[name] == 1:
                await anyio.sleep_forever()  # its reply went to the lost connection: it never comes
            else:
                await back.wait()  # held by nats-py while the connection is down, answered once it is back
            return f"answer to {name}"

        return send

    answers: dict[str, str] = {}

    async def call(name: str, *, lost: bool) -> None:
        answers[name] = await log.retrying(name, request(name, lost=lost))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(call, "before", lost=True))
            await anyio.wait_all_tasks_blocked()
            log.connection_lost()
            group.start_soon(functools.partial(call, "during", lost=False))
            await anyio.wait_all_tasks_blocked()
            assert sent == {"before": 1, "during": 1}
            log.connection_back()
            await anyio.wait_all_tasks_blocked()
            assert sent == {"before": 2, "during": 1}  # only the one sent before the loss went again
            back.set()
    assert answers == {"before": "answer to before", "during": "answer to during"}
    assert told == ["reconnected"]


async def test_a_publish_whose_first_copy_is_still_being_agreed_on_is_sent_again() -> None:
    url = "nats://127.0.0.1:4222"
    log = Log(url, Names("unit"), replicas=3, options={}, connect_timeout=1, reconnect_timeout=60)
    attempts = 0

    async def publish() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:  # what a cluster answers a repeat while the first copy is not yet stored
            raise nats.js.errors.APIError(
                code=409, err_code=10158, description="duplicate message id is in process"
            )
        return 42

    with anyio.fail_after(5):
        assert await log.retrying("publishing", publish) == 42
    assert attempts == 2
