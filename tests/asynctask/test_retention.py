"""Retention passes: one pass judges every state by the time it began (MemoryBackend, manual clock)."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from lifecycle.asynctask import AsyncTasks, ManualClock, MemoryBackend, TaskState

T0 = 1_700_000_000.0
WEEK = 7 * 86_400.0


class SlowFirstPurge(MemoryBackend):
    """Moves the clock on by a week during the pass's first ``purge``, the way a pass held up by a busy
    backend sees a test (or the world) move on before it reaches the next state."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.clock = clock
        self.befores: list[tuple[frozenset[TaskState], float | None]] = []

    async def purge(
        self,
        *,
        states: Collection[TaskState],
        queue: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        self.befores.append((frozenset(states), before))
        if len(self.befores) == 1:
            self.clock.advance(WEEK + 1)
        return await super().purge(states=states, queue=queue, before=before, limit=limit)


@pytest.mark.anyio
async def test_a_pass_judges_every_state_by_the_time_it_began() -> None:
    clock = ManualClock(T0)
    backend = SlowFirstPurge(clock)
    async with AsyncTasks(backend, clock=clock, retention={"succeeded": 60, "cancelled": WEEK}) as tasks:

        @tasks.register(name="retention.later")
        async def later() -> None: ...

        cancelled = await tasks.enqueue(later, delay=60)
        assert await tasks.cancel(cancelled)
        assert await tasks.purge_expired() == 0, "the cancelled task was not a week old when the pass began"
        assert await tasks.info(cancelled) is not None
        assert backend.befores == [
            (frozenset({TaskState.SUCCEEDED}), T0 - 60),
            (frozenset({TaskState.DEAD}), T0 - WEEK),
            (frozenset({TaskState.CANCELLED}), T0 - WEEK),
        ]
        assert await tasks.purge_expired() == 1, "the next pass begins a week later"
        assert await tasks.info(cancelled) is None
