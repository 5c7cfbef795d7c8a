"""The one caller of a :class:`NotifyingBackend`'s ``wait_for_notices`` in an ``AsyncTasks``: the worker while
it serves, otherwise whichever ``wait()`` is waiting. Cancel notices go to the worker; settled notices wake
every waiter of the ``AsyncTasks``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from ..._core._backoff import Backoff
from .._backend import NotifyingBackend

__all__ = ["NoticePump"]

_RETRY = Backoff(initial=0.05, cap=5.0)


class NoticePump:
    """Reads notices for one ``AsyncTasks`` and dispatches them. :attr:`lock` is held by whoever reads."""

    def __init__(
        self, backend: NotifyingBackend, on_settled: Callable[[], None], logger: logging.Logger
    ) -> None:
        self._backend = backend
        self._on_settled = on_settled
        self._logger = logger
        self.lock = anyio.Lock()
        self._on_cancel: Callable[[list[str]], Awaitable[None]] | None = None

    async def pump(self, timeout: float) -> None:
        """Read the notices that arrived (waiting up to ``timeout`` for a first) and dispatch them; the caller
        holds :attr:`lock`."""
        notices = await self._backend.wait_for_notices(timeout=timeout)
        cancels = [notice.task_id for notice in notices if notice.kind == "cancel"]
        if any(notice.kind == "settled" for notice in notices):
            self._on_settled()
        on_cancel = self._on_cancel
        if cancels and on_cancel is not None:
            await on_cancel(cancels)

    async def serve(self, on_cancel: Callable[[list[str]], Awaitable[None]], timeout: float) -> None:
        """Read and dispatch notices until cancelled (a worker's service); cancel notices go to
        ``on_cancel``."""
        async with self.lock:
            self._on_cancel = on_cancel
            try:
                failures = 0
                while True:
                    try:
                        await self.pump(timeout)
                    except Exception as exc:
                        failures += 1
                        delay = _RETRY.delay(failures)
                        self._logger.warning(
                            "could not read the store's notices (%s: %s); cancellations and results from "
                            "other processes are seen by polling meanwhile; trying again in %.2f s",
                            type(exc).__name__,
                            exc,
                            delay,
                            exc_info=failures == 1,
                        )
                        await anyio.sleep(delay)
                    else:
                        failures = 0
            finally:
                self._on_cancel = None
