"""The Redis ScriptRunner's reply timeout: a call the server does not answer within ``socket_timeout`` raises
``TimeoutError``; an answer passes through; a cancellation from outside stays a cancellation. The runner is
plain anyio, so this holds on trio as well (the backend itself runs on asyncio)."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

from lifecycle.asynctask._backends.redis._conn import ScriptRunner

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


def runner(socket_timeout: float) -> ScriptRunner:
    return ScriptRunner(object(), prefix="p:", socket_timeout=socket_timeout, reconnect_timeout=0.0)  # type: ignore[arg-type]


async def test_a_call_not_answered_within_socket_timeout_raises_timeout_error() -> None:
    reached = anyio.Event()

    async def silent() -> Any:
        reached.set()
        await anyio.sleep_forever()

    with anyio.fail_after(10):  # the test's own guard, far beyond the runner's 0.05 s
        with pytest.raises(TimeoutError):
            await runner(0.05).once(silent)
    assert reached.is_set()


async def test_an_answer_within_socket_timeout_is_returned() -> None:
    async def answer() -> Any:
        await anyio.lowlevel.checkpoint()
        return b"reply"

    assert await runner(math.inf).once(answer) == b"reply"
    assert await runner(30.0).once(answer) == b"reply"


async def test_a_cancellation_from_outside_is_not_turned_into_a_timeout() -> None:
    started = anyio.Event()
    outcome: list[str] = []

    async def silent() -> Any:
        started.set()
        await anyio.sleep_forever()

    async def call() -> None:
        try:
            await runner(30.0).once(silent)
        except TimeoutError:
            outcome.append("timeout")
            raise
        outcome.append("returned")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(call)
            await started.wait()
            group.cancel_scope.cancel()
    assert outcome == []  # cancelled: neither a timeout nor a return
    assert group.cancel_scope.cancelled_caught
