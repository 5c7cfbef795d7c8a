"""Conformance rules for stored data (bytes, text, numbers round-trip exactly) and the backend's lifecycle."""

from __future__ import annotations

import random

from ..._backend import Backend
from ..._records import NewTask, Settlement, TaskState
from .._support import T0, OpenBackend, SuiteBase, assert_fresh_record, claim_one, new_task, normalise_stats

__all__ = ["DataRules"]

MEGABYTE_PAYLOAD = random.Random(20240611).randbytes(1_000_000)
"""A ~1 MB payload of arbitrary (mostly non-UTF-8) bytes, the same on every run."""

ODD_TEXT = "tâche ✓ 🚀 队列 'single' \"double\" `tick` ; -- %s {} \\ \n\t end"
"""Text that trips careless quoting, encoding or key building: quotes, SQL and format characters, emoji."""


class DataRules(SuiteBase):
    """Payloads, results, names, queues, meta and numbers come back exactly as stored; close is idempotent."""

    async def test_backend_implements_the_protocol(self, backend: Backend) -> None:
        assert isinstance(backend, Backend), "every method of lifecycle.asynctask.Backend must be implemented"

    async def test_close_is_idempotent(self, open_backend: OpenBackend) -> None:
        backend = await open_backend()
        await backend.close()
        await backend.close()  # and once more after the test, by the suite

    async def test_payload_bytes_round_trip_exactly(self, open_backend: OpenBackend) -> None:
        producer = await open_backend()
        reader = await open_backend()
        payloads = {
            "empty": b"",
            "every-byte": bytes(range(256)),
            "nul-bytes": b"\x00" * 16,
            "invalid-utf8": b"\xff\xfe\xc3\x28 not text \x80",
            "megabyte": MEGABYTE_PAYLOAD,
        }
        tasks = [
            new_task(task_id, payload=payload, enqueued_at=T0 + n)
            for n, (task_id, payload) in enumerate(payloads.items())
        ]
        await producer.enqueue_many(tasks)
        for task in tasks:
            assert_fresh_record(await reader.get(task.id), task)
        listed = {record.id: record.payload for record in await reader.list_records()}
        assert listed == payloads
        claimed = await reader.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40)
        assert {c.record.id: c.record.payload for c in claimed} == payloads

    async def test_result_bytes_round_trip_exactly(self, open_backend: OpenBackend) -> None:
        worker = await open_backend()
        reader = await open_backend()
        results = {"empty": b"", "invalid-utf8": b"\xff\x00\xfe", "megabyte": MEGABYTE_PAYLOAD}
        await worker.enqueue_many([new_task(task_id) for task_id in results])
        claimed = await worker.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
        verdicts = [
            Settlement(
                task_id=c.record.id,
                token=c.token,
                state=TaskState.SUCCEEDED,
                at=T0 + 2,
                result=results[c.record.id],
            )
            for c in claimed
        ]
        assert await worker.settle(verdicts) == set()
        for task_id, result in results.items():
            record = await reader.get(task_id)
            assert record is not None
            assert record.result == result
            assert type(record.result) is bytes

    async def test_unicode_ids_names_queues_meta_and_errors_round_trip(
        self, open_backend: OpenBackend
    ) -> None:
        producer = await open_backend()
        reader = await open_backend()
        queue = "队列 🙂 'q'"
        task = new_task(f"id {ODD_TEXT}", name=f"app.jobs.größe {ODD_TEXT}", queue=queue, meta=ODD_TEXT)
        await producer.enqueue_many([task])
        assert_fresh_record(await reader.get(task.id), task)
        assert [r.id for r in await reader.list_records(queue=queue)] == [task.id]
        assert normalise_stats(await reader.stats()) == {queue: {TaskState.PENDING: 1}}
        claimed = await claim_one(reader, task.id, now=T0 + 1, lease_until=T0 + 31)
        assert await reader.extend_leases([(task.id, claimed.token)], lease_until=T0 + 61) == set()
        verdict = Settlement(
            task_id=task.id, token=claimed.token, state=TaskState.DEAD, at=T0 + 2, error=ODD_TEXT
        )
        assert await reader.settle([verdict]) == set()
        record = await producer.get(task.id)
        assert record is not None
        assert (record.state, record.last_error) == (TaskState.DEAD, ODD_TEXT)
        assert await producer.requeue([task.id], now=T0 + 3) == 1
        assert await producer.cancel([task.id], now=T0 + 4) == [task.id]
        assert await producer.purge(states={TaskState.CANCELLED}, queue=queue) == 1

    async def test_meta_round_trips_exactly(self, backend: Backend) -> None:
        metas = {"none": None, "empty": "", "json": '{"chain": "c1", "step": 2}', "lines": "a\nb\r\n  c  "}
        tasks = [new_task(task_id, meta=meta) for task_id, meta in metas.items()]
        await backend.enqueue_many(tasks)
        for task in tasks:
            assert_fresh_record(await backend.get(task.id), task)
        claimed = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
        assert {c.record.id: c.record.meta for c in claimed} == metas

    async def test_numbers_round_trip(self, backend: Backend) -> None:
        tasks: list[NewTask] = [
            new_task("zero-retries", max_retries=0, timeout=None),
            new_task("many-retries", max_retries=1_000_000, timeout=0.125),
            new_task("long-timeout", max_retries=5, timeout=86_400.5),
            new_task("recent", enqueued_at=1_700_000_000.125, run_at=1_700_000_000.25),
        ]
        await backend.enqueue_many(tasks)
        for task in tasks:
            assert_fresh_record(await backend.get(task.id), task)
        precise = new_task("microseconds", enqueued_at=1_700_000_000.123456, run_at=1_700_000_000.654321)
        await backend.enqueue_many([precise])
        record = await backend.get("microseconds")
        assert record is not None
        assert abs(record.enqueued_at - precise.enqueued_at) < 1e-6, "times must keep microsecond precision"
        assert abs(record.run_at - precise.run_at) < 1e-6, "times must keep microsecond precision"
