"""The engine's pure rules: retry-or-dead verdicts, error texts, and the claim order of queues."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest

from lifecycle import Backoff
from lifecycle._compat import ExceptionGroup
from lifecycle.asynctask import Abort, ClaimedTask, Retry, TaskInfo, TaskRecord, TaskState
from lifecycle.asynctask._engine._queues import QueueOrder
from lifecycle.asynctask._engine._verdict import MAX_ERROR_CHARS, Policy, error_text

NOW = 1_000.0


def claimed(attempts: int, max_retries: int = 2) -> ClaimedTask:
    record = TaskRecord(
        id="t",
        name="n",
        queue="default",
        payload=b"[]",
        state=TaskState.ACTIVE,
        attempts=attempts,
        max_retries=max_retries,
        timeout=None,
        enqueued_at=0.0,
        run_at=0.0,
    )
    return ClaimedTask(token="tok", record=record)


def policy(**backoff: float) -> Policy:
    options = {"initial": 2.0, "cap": 100.0, "jitter": False, **backoff}
    return Policy(Backoff(**options), random.Random(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(("attempts", "delay"), [(1, 2.0), (2, 4.0), (3, 8.0)])
def test_a_failure_is_retried_after_the_backoff_while_attempts_are_left(attempts: int, delay: float) -> None:
    verdict = policy().failure(claimed(attempts, max_retries=3), now=NOW, error="boom")
    assert (verdict.state, verdict.run_at, verdict.error, verdict.at) == (
        TaskState.PENDING,
        NOW + delay,
        "boom",
        NOW,
    )
    assert (verdict.task_id, verdict.token, verdict.refund_attempt) == ("t", "tok", False)


def test_the_failure_after_the_last_retry_is_dead() -> None:
    assert policy().failure(claimed(3, max_retries=2), now=NOW, error="x").state is TaskState.DEAD
    assert policy().failure(claimed(1, max_retries=0), now=NOW, error="x").state is TaskState.DEAD
    assert policy().failure(claimed(2, max_retries=2), now=NOW, error="x").state is TaskState.PENDING


def test_jittered_delays_stay_within_the_ceiling() -> None:
    jittered = Policy(Backoff(initial=1.0, cap=30.0), random.Random(3))
    delays = [jittered.failure(claimed(4, 10), now=NOW, error="x").run_at for _ in range(200)]
    assert all(NOW <= at <= NOW + 8.0 for at in delays if at is not None)
    assert len(set(delays)) > 150, "full jitter spreads retries"


@pytest.mark.parametrize("multiplier", [1.5, 2.0, 3.0, 10.0])
@pytest.mark.parametrize("attempt", [700, 1024, 1025, 10**6])
def test_huge_attempt_counts_reach_the_cap_without_overflowing(multiplier: float, attempt: int) -> None:
    assert Backoff(initial=1.0, cap=60.0, multiplier=multiplier).ceiling(attempt) == 60.0


def test_retry_and_abort_requests() -> None:
    rules = policy()
    retry = rules.for_exception(claimed(1), Retry(after=7.5, reason="busy"), now=NOW)
    assert (retry.state, retry.run_at, retry.error) == (TaskState.PENDING, NOW + 7.5, "retry requested: busy")
    plain_retry = rules.for_exception(claimed(1), Retry(), now=NOW)
    assert plain_retry.run_at == NOW + 2.0, "Retry() without after uses the backoff"
    exhausted = rules.for_exception(claimed(3), Retry(after=1), now=NOW)
    assert exhausted.state is TaskState.DEAD
    assert exhausted.error is not None
    assert "has no retries left (attempt 3, max_retries=2)" in exhausted.error
    aborted = rules.for_exception(claimed(1), Abort("bad input"), now=NOW)
    assert aborted.state is TaskState.DEAD
    assert aborted.error is not None
    assert aborted.error.startswith("aborted by the task: bad input")
    grouped = rules.for_exception(claimed(1), ExceptionGroup("g", [Abort("inner")]), now=NOW)
    assert grouped.state is TaskState.DEAD


def test_retry_validates_after() -> None:
    with pytest.raises(ValueError, match=r"Retry\(after=...\) must be a finite number of seconds zero"):
        Retry(after=-1)
    with pytest.raises(ValueError, match=r"got inf \(or None for no limit\)"):
        Retry(after=float("inf"))
    with pytest.raises(TypeError, match=r"Retry\(after=...\) must be a number of seconds"):
        Retry(after="soon")  # type: ignore[arg-type]
    assert Retry(after=0).after == 0.0
    assert Retry().after is None
    assert Retry(after=__import__("datetime").timedelta(minutes=2)).after == 120.0


def test_release_refunds_the_attempt_and_keeps_the_run_at() -> None:
    # Due when it was due (run_at 0.0), not now: the task keeps its place before those enqueued after it.
    release = policy().release(claimed(1), now=NOW)
    assert (release.state, release.run_at, release.refund_attempt, release.error, release.at) == (
        TaskState.PENDING,
        0.0,
        True,
        None,
        NOW,
    )


def test_release_of_a_record_without_a_finite_run_at_makes_it_due_now() -> None:
    task = claimed(1)
    damaged = ClaimedTask(task.token, dataclasses.replace(task.record, run_at=math.nan))
    assert policy().release(damaged, now=NOW).run_at == NOW


def test_error_text_keeps_type_message_traceback_and_is_bounded() -> None:
    def fail() -> None:
        raise ValueError("x" * 100_000)

    try:
        fail()
    except ValueError as exc:
        text = error_text(exc)
    assert text.startswith("Traceback (most recent call last):")
    assert "in fail" in text
    assert text.endswith("x" * 100)
    assert len(text) < MAX_ERROR_CHARS + 200
    assert "characters cut" in text


def test_strict_order_is_the_given_order() -> None:
    order = QueueOrder(["high", "default", "low"], random.Random(0))
    assert order.strict
    assert [tuple(order.next_order()) for _ in range(3)] == [("high", "default", "low")] * 3


def test_weighted_order_puts_queues_first_in_proportion_to_their_weight() -> None:
    order = QueueOrder({"critical": 6, "default": 3, "low": 1}, random.Random(12345))
    assert not order.strict
    firsts = Counter(order.next_order()[0] for _ in range(20_000))
    assert firsts["critical"] / 20_000 == pytest.approx(0.6, abs=0.02)
    assert firsts["default"] / 20_000 == pytest.approx(0.3, abs=0.02)
    assert firsts["low"] / 20_000 == pytest.approx(0.1, abs=0.02)
    assert sorted(order.next_order()) == ["critical", "default", "low"], "every queue is in every order"


@pytest.mark.parametrize(
    ("state", "attempts", "left"),
    [
        (TaskState.PENDING, 0, 5),  # not run yet: every retry is left
        (TaskState.ACTIVE, 1, 5),  # the first attempt runs: a failure is still retried 5 times
        (TaskState.PENDING, 1, 5),  # waiting for the first retry, which has not started
        (TaskState.ACTIVE, 2, 4),
        (TaskState.ACTIVE, 6, 0),  # the last retry runs
        (TaskState.DEAD, 6, 0),
        (TaskState.SUCCEEDED, 1, 0),
    ],
)
def test_retries_left_counts_the_retries_not_started_yet(state: TaskState, attempts: int, left: int) -> None:
    info = TaskInfo(
        id="t",
        name="n",
        queue="default",
        state=state,
        attempts=attempts,
        max_retries=5,
        enqueued_at=0.0,
        run_at=0.0,
    )
    assert info.retries_left == left
