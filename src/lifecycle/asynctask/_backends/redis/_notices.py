"""``wait_for_notices`` for the Redis backend: one pub/sub subscription per backend object.

The scripts publish on ``{prefix}:notices`` when tasks settle and when a running task's cancellation is
asked (see ``notify()`` in the Lua prelude). A reader task, started by the first :meth:`Listener.wait`,
holds the subscription on a connection of its own (from the waiting client's pool, so the pooled
connections of the worker's calls are never taken), buffers what arrives, and reconnects with backoff after
the connection drops, as the wake-up connection does. Waiting is then only waiting for the buffer, so a
caller cancelled while it waits never disturbs the connection. Notices are best effort: those published
while the connection is down are missed (the engine's polling catches up). The settlements a backend object
applied itself are not reported back to it: its engine saw those verdicts (so a worker that nobody waits
on does not parse its own stream).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import anyio
from redis.exceptions import RedisError, ResponseError

from ...._redact import library_logger
from ..._records import Notice
from ._codec import notices

__all__ = ["BUFFERED", "PER_CALL", "Listener"]

_log = library_logger("lifecycle.asynctask.redis")

BUFFERED = 20_000
"""Notices kept for the next call at most; when more arrive unread, the oldest are dropped."""

PER_CALL = 5_000
"""Notices one :meth:`Listener.wait` call returns at most (the rest wait for the next call)."""

_IDLE_PING = 15.0
"""Seconds without a message after which the reader pings the server, to find a connection that died
silently (no reply within the socket timeout: it reconnects)."""


class Listener:
    """The subscription of one backend object: its reader task, the buffer and the event that says it is
    not empty."""

    def __init__(
        self,
        client: Any,
        channel: str,
        *,
        nonce: str,
        socket_timeout: float,
        connect_timeout: float,
        countable: bool = True,
    ) -> None:
        self._client = client
        self._channel = channel
        self._own = nonce.encode()
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._buffer: collections.deque[Notice] = collections.deque(maxlen=BUFFERED)
        self._arrived = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        # Whether PUBSUB NUMSUB may be run and counts every subscriber (not on a cluster, whose nodes count
        # their own): None until asked.
        self._may_count: bool | None = None if countable else False
        self.live = False
        """Whether the subscription is up (subscribed, and no failure seen since): the settle script then
        leaves out a settled notice when this subscription, which skips this object's own, is the channel's
        only one."""

    async def wait(self, timeout: float) -> list[Notice]:
        """See :meth:`RedisBackend.wait_for_notices`. The first call starts the subscription and waits for
        it (up to ``connect_timeout``) before it waits ``timeout`` for notices."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
            with anyio.move_on_after(self._connect_timeout):
                await self._subscribed.wait()
        if not self._buffer and timeout > 0:
            with anyio.move_on_after(timeout):
                await self._arrived.wait()
        found: list[Notice] = []
        while self._buffer and len(found) < PER_CALL:
            found.append(self._buffer.popleft())
        if not self._buffer:
            self._arrived.clear()
        return found

    async def _read(self) -> None:
        """Subscribe and buffer notices until closed; reconnect after a dropped connection (after 20 ms, then
        twice as long each time up to 1 s)."""
        delay = 0.02
        while True:
            pubsub = self._client.pubsub()  # subscribe confirmations read below, then skipped
            try:
                with anyio.fail_after(self._connect_timeout + self._socket_timeout):
                    await pubsub.subscribe(self._channel)
                    # The server's confirmation (subscribe() only sends the command): from then on this
                    # subscription is counted among the channel's.
                    confirmed = await pubsub.get_message(
                        ignore_subscribe_messages=False, timeout=self._connect_timeout + self._socket_timeout
                    )
                confirmed_type = confirmed.get("type") if isinstance(confirmed, dict) else None
                self.live = confirmed_type in ("subscribe", b"subscribe") and await self._countable()
                self._subscribed.set()
                if delay > 0.02:
                    _log.info("Redis notices subscription back")
                delay = 0.02
                await self._receive(pubsub)
            except ResponseError as exc:  # NOPERM: the ACL user may not subscribe; polling remains
                _log.warning(
                    "cannot subscribe to %s (%s): cancellations and results reach this process by polling "
                    "only; grant the user &%s +subscribe +publish for instant ones",
                    self._channel,
                    exc,
                    self._channel,
                )
                self._subscribed.set()
                return
            except (RedisError, OSError, TimeoutError) as exc:
                if delay == 0.02:
                    _log.warning("Redis notices subscription lost (%s); reconnecting", exc)
            except Exception:  # a fault of its own must not end the subscription for good
                _log.exception("Redis notices subscription failed; subscribing again")
            finally:
                self.live = False
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    try:
                        await pubsub.aclose()
                    except (RedisError, OSError):
                        pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _countable(self) -> bool:
        """Whether this user may run ``PUBSUB NUMSUB`` (the settle script counts the channel's subscribers,
        see :attr:`live`); asked once, so a user without it (the documented least rights for notices do not
        include it) is not refused it, and logged in the server's ACL log, on every settle. Any other
        failure: not now (asked again at the next subscription)."""
        if self._may_count is None:
            # The notices client has no socket timeout of its own (its subscription waits for messages): an
            # answer that never comes (a half-open connection) must not hold the reading of notices.
            with anyio.move_on_after(self._connect_timeout + self._socket_timeout):
                try:
                    await self._client.execute_command("PUBSUB", "NUMSUB", self._channel)
                except ResponseError:  # NOPERM
                    self._may_count = False
                except Exception:  # the connection, or anything else: not now (never the subscription's end)
                    return False
                else:
                    self._may_count = True
            if self._may_count is None:  # no answer in time: not now
                return False
        return self._may_count

    async def _receive(self, pubsub: Any) -> None:
        """Buffer the subscription's messages until the connection fails (raises)."""
        quiet_since = time.monotonic()
        pinged = False
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_IDLE_PING)
            if message is None:
                if pinged and time.monotonic() - quiet_since > _IDLE_PING + self._socket_timeout:
                    raise TimeoutError("no reply to a ping on the notices connection")
                if not pinged:
                    await pubsub.ping()
                    pinged = True
                continue
            quiet_since = time.monotonic()
            pinged = False
            if message.get("type") == "message" and isinstance(message.get("data"), bytes):
                found = notices(message["data"], own=self._own)
                if found:
                    self._buffer.extend(found)
                    self._arrived.set()

    async def close(self) -> None:
        """Stop the reader (which closes its connection). Idempotent."""
        reader, self._reader = self._reader, None
        self.live = False
        if reader is not None:
            reader.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait((reader,))
