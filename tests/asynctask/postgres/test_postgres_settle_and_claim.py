"""PostgresBackend.settle_and_claim: a worker's settlement of the last batch and its next claim in one
transaction, sent in one pipeline (one round trip); a failure of either undoes both."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask import NewGroup, Settlement, TaskState
from lifecycle.asynctask._backend import combined_settle_and_claim
from lifecycle.asynctask._backends.postgres import _backend as backend_module
from lifecycle.asynctask._backends.postgres import _ops as ops
from lifecycle.asynctask.postgres import PostgresBackend
from lifecycle.asynctask.testing import T0

from ._support import OpenPostgres, task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the pipeline syncs psycopg sends (one per round trip of a pipeline)."""
    syncs = [0]
    enqueue_sync = psycopg.AsyncPipeline._enqueue_sync

    def counting(pipeline: psycopg.AsyncPipeline) -> None:
        syncs[0] += 1
        enqueue_sync(pipeline)

    monkeypatch.setattr(psycopg.AsyncPipeline, "_enqueue_sync", counting)
    return syncs


async def _writers(backend: PostgresBackend, *task_ids: str) -> list[int]:
    """The transaction id that wrote the current version of each task's row (``xmin``)."""
    async with backend._connection() as connection:
        cursor = await connection.execute(
            sql.SQL("SELECT id, xmin::text::bigint FROM {} WHERE id = ANY(%s)").format(
                backend._statements.tasks
            ),
            (list(task_ids),),
        )
        written = {row[0]: row[1] for row in await cursor.fetchall()}
    return [written[task_id] for task_id in task_ids]


@pytest.mark.parametrize("pipelines", [True, False], ids=["pipeline", "no-pipeline"])
async def test_settle_and_claim_settles_first_then_claims(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch, pipelines: bool
) -> None:
    monkeypatch.setattr(backend_module, "_PIPELINES", pipelines)
    backend = await open_pg()
    await backend.enqueue_many([task("a"), task("b"), task("c", enqueued_at=T0 + 0.5, run_at=T0 + 0.5)])
    first = await backend.claim(["default"], 2, now=T0 + 1, lease_until=T0 + 31)
    assert [c.record.id for c in first] == ["a", "b"]
    verdicts = [
        # a retry due now: the claim after it sees it pending again, behind c (due before the retry)
        Settlement("a", first[0].token, TaskState.PENDING, at=T0 + 2, run_at=T0 + 2),
        Settlement("b", first[1].token, TaskState.SUCCEEDED, at=T0 + 2),
        Settlement("c", "not-a-lease-of-c", TaskState.SUCCEEDED, at=T0 + 2),
    ]
    syncs = _count_syncs(monkeypatch)
    lost, claimed = await backend.settle_and_claim(verdicts, ["default"], 10, now=T0 + 2, lease_until=T0 + 32)
    assert lost == {"c"}
    assert [c.record.id for c in claimed] == ["c", "a"]
    assert [c.record.attempts for c in claimed] == [1, 2]
    assert (await backend.stats())["default"] == {TaskState.ACTIVE: 2, TaskState.SUCCEEDED: 1}
    if pipelines:
        assert syncs == [1], "the settlement and the claim go in one round trip"
        settled, leased = await _writers(backend, "b", "c")
        assert settled == leased, "the settlement and the claim are one transaction"
    else:
        assert syncs == [0]


async def test_a_repeated_settlement_in_the_batch_counts_once_and_is_reported(open_pg: OpenPostgres) -> None:
    backend = await open_pg()
    await backend.enqueue_many([task("a")])
    (held,) = await backend.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 31)
    done = Settlement("a", held.token, TaskState.SUCCEEDED, at=T0 + 2, result=b"1")
    again = Settlement("a", held.token, TaskState.DEAD, at=T0 + 2, error="late")
    lost, claimed = await backend.settle_and_claim(
        [done, again], ["default"], 10, now=T0 + 2, lease_until=T0 + 32
    )
    assert (lost, claimed) == ({"a"}, [])
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.result, record.last_error) == (TaskState.SUCCEEDED, b"1", None)


async def test_a_settle_and_claim_whose_claim_fails_on_the_server_undoes_the_settlement(
    open_pg: OpenPostgres,
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([task("a"), task("b")])
    (held,) = await backend.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 31)
    saved = Settlement("a", held.token, TaskState.SUCCEEDED, at=T0 + 2)
    # PostgreSQL text cannot hold NUL: the server refuses the claim's queue array, after the settlement ran.
    with pytest.raises(psycopg.Error):
        await backend.settle_and_claim([saved], ["default", "bad\x00"], 10, now=T0 + 2, lease_until=T0 + 32)
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.lease_until) == (TaskState.ACTIVE, T0 + 31)
    assert (await backend.stats())["default"] == {TaskState.ACTIVE: 1, TaskState.PENDING: 1}
    # The connection is usable again (kept or replaced), and the same verdicts go through now.
    lost, claimed = await backend.settle_and_claim([saved], ["default"], 10, now=T0 + 2, lease_until=T0 + 32)
    assert (lost, [c.record.id for c in claimed]) == (set(), ["b"])
    assert (await backend.stats())["default"] == {TaskState.ACTIVE: 1, TaskState.SUCCEEDED: 1}


async def test_a_claim_that_fails_in_the_client_after_the_settlement_was_sent_commits_nothing(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The settlement is on its way when the claim's parameters fail to adapt: the pipeline's Sync must not
    # follow, or the server would commit the settlement of a call that raised.
    backend = await open_pg()
    await backend.enqueue_many([task("a"), task("b")])
    (held,) = await backend.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 31)
    claim_statement = ops._claim_statement

    def unadaptable(*args: Any) -> tuple[bytes, dict[str, Any]]:
        statement, params = claim_statement(*args)
        return statement, {**params, "limit": object()}

    monkeypatch.setattr(ops, "_claim_statement", unadaptable)
    saved = Settlement("a", held.token, TaskState.SUCCEEDED, at=T0 + 2)
    with pytest.raises(psycopg.ProgrammingError, match="cannot adapt"):
        await backend.settle_and_claim([saved], ["default"], 10, now=T0 + 2, lease_until=T0 + 32)
    monkeypatch.undo()
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.lease_until) == (TaskState.ACTIVE, T0 + 31)
    lost, claimed = await backend.settle_and_claim([saved], ["default"], 10, now=T0 + 2, lease_until=T0 + 32)
    assert (lost, [c.record.id for c in claimed]) == (set(), ["b"])


async def test_a_settle_and_claim_refused_before_sending_leaves_nothing_done(open_pg: OpenPostgres) -> None:
    backend = await open_pg()
    await backend.enqueue_many([task("a"), task("b")])
    (held,) = await backend.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 31)
    saved = Settlement("a", held.token, TaskState.SUCCEEDED, at=T0 + 2)
    refused = Settlement("b", "t", TaskState.ACTIVE, at=T0 + 2)  # no verdict
    with pytest.raises(ValueError, match="settlement's state must be"):
        await backend.settle_and_claim([saved, refused], ["default"], 10, now=T0 + 2, lease_until=T0 + 32)
    assert (await backend.stats())["default"] == {TaskState.ACTIVE: 1, TaskState.PENDING: 1}


async def test_a_settlement_that_stores_a_group_settles_then_claims(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([task("a"), task("b")])
    (held,) = await backend.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 31)
    group = NewGroup("g", (task("g.1", enqueued_at=T0 + 2),), None, T0 + 2)
    step = Settlement("a", held.token, TaskState.SUCCEEDED, at=T0 + 2, then_groups=(group,))
    syncs = _count_syncs(monkeypatch)
    lost, claimed = await backend.settle_and_claim([step], ["default"], 10, now=T0 + 3, lease_until=T0 + 33)
    assert lost == set()
    assert sorted(c.record.id for c in claimed) == ["b", "g.1"]
    assert syncs == [0], "a group is stored by statements of its own, not in the pipeline"
    stored = await backend.get_group("g")
    assert stored is not None
    assert stored.task_ids == ("g.1",)


async def test_the_engine_settles_and_claims_through_the_backend_s_own_method(open_pg: OpenPostgres) -> None:
    backend = await open_pg()
    assert combined_settle_and_claim(backend) == backend.settle_and_claim

    class Wrapped(PostgresBackend):
        async def settle(self, settlements: Any) -> set[str]:
            return await super().settle(settlements)

    assert combined_settle_and_claim(Wrapped("postgresql://x@127.0.0.1/x")) is None
