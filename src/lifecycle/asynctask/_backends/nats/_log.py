"""The NATS side of the backend: the connection, the two JetStream streams of a prefix (the transaction log
and the snapshots), publishing with optimistic concurrency, reading the log by push and by sequence, and
storing and loading snapshots. Every request is retried after a dropped connection or a server restart until
``reconnect_timeout`` has passed; a retried publish carries the same message id and expected sequence, so
the server stores it at most once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from ...._redact import library_logger, redact
from ..._errors import BackendError

__all__ = ["LAYOUT", "Conflict", "Log", "Names", "Pointer", "StreamMissing"]

_log = library_logger("lifecycle.asynctask.nats")

T = TypeVar("T")

LAYOUT = 1
"""The layout version written in the streams' descriptions (``lifecycle tasks, layout 1``)."""

_DESCRIPTION = "lifecycle tasks, layout "
_FIRST_ATTEMPTS = 1  # per server: a refused first connection fails open() at once (0 would mean forever)
_EXPECTED = "Nats-Expected-Last-Sequence"
_TXN = "Lifecycle-Txn"
_PART = "Lifecycle-Part"
_WRONG_LAST_SEQUENCE = 10071
_STORE_NOT_CREATED = 10049  # "error creating store for stream"
_STORE_RACE_ATTEMPTS = 5

_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)
# "duplicate message id is in process": in a cluster, a publish sent again (after a reconnect) while its
# first copy is still being agreed on; once that is stored, sending it again returns its sequence.
_ID_IN_PROCESS = 10158


def _transient(exc: Exception) -> bool:
    """Whether a call that failed with ``exc`` may succeed when sent again."""
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code == _ID_IN_PROCESS


class Conflict(Exception):
    """The log had moved on: a publish expected ``expected`` as the last sequence, the log is at ``last``."""

    def __init__(self, expected: int, last: int | None) -> None:
        super().__init__(f"the log is at {last}, not {expected}")
        self.expected = expected
        self.last = last


class StreamMissing(Exception):
    """The streams of the prefix do not exist."""


@dataclass(frozen=True)
class Names:
    """The streams and subjects of one prefix."""

    prefix: str

    @property
    def log_stream(self) -> str:
        return f"{self.prefix}_tasks_log"

    @property
    def log_subject(self) -> str:
        return f"{self.prefix}.tasks.log"

    @property
    def snap_stream(self) -> str:
        return f"{self.prefix}_tasks_snap"

    @property
    def snap_subjects(self) -> str:
        return f"{self.prefix}.tasks.snap.>"

    @property
    def pointer_subject(self) -> str:
        return f"{self.prefix}.tasks.snap.head"

    def chunk_subject(self, seq: int) -> str:
        return f"{self.prefix}.tasks.snap.chunk.{seq}"


@dataclass(frozen=True)
class Pointer:
    """The latest snapshot: taken at log sequence ``seq``, stored in the messages ``chunks`` of the snapshot
    stream; ``message`` is the pointer's own sequence there (the next pointer expects it)."""

    message: int
    seq: int
    chunks: tuple[int, ...]
    size: int


class Log:
    """One connection to NATS for one prefix (see the module docstring)."""

    def __init__(
        self,
        url: str,
        names: Names,
        *,
        replicas: int,
        options: dict[str, Any],
        connect_timeout: float,
        reconnect_timeout: float,
    ) -> None:
        self.url = url
        self.names = names
        self.replicas = replicas
        self._options = options
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._nc: Client | None = None
        self._subscription: Subscription | None = None
        self.max_payload = 1024 * 1024
        # The calls of retrying() under way, each with the number of connection losses before it began.
        self._attempts: dict[anyio.CancelScope, int] = {}
        self._losses = 0
        self.reconnected: Callable[[], None] | None = None
        """Called (on the event loop, without awaiting anything) each time the connection is back after a
        loss: the log's subscription may have died with it (see :meth:`follow`)."""

    @property
    def shown(self) -> str:
        """The server URL with passwords masked."""
        return redact(self.url, self.url)

    # -- connection ------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (within ``connect_timeout``); later connection losses are healed by reconnecting."""
        client = Client()

        async def on_error(error: Exception) -> None:
            _log.debug("NATS at %s: %s", self.shown, redact(repr(error), self.url))

        async def on_disconnect() -> None:
            _log.info("lost the connection to NATS at %s; reconnecting", self.shown)
            self.connection_lost()

        async def on_reconnect() -> None:
            _log.info("reconnected to NATS at %s", self.shown)
            self.connection_back()

        options: dict[str, Any] = {
            "servers": [server.strip() for server in self.url.split(",")],
            "name": "lifecycle",
            "connect_timeout": max(1, int(self._connect_timeout)),
            "reconnect_time_wait": 0.25,
            "max_reconnect_attempts": _FIRST_ATTEMPTS,  # a refused first connection fails open() soon
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
            **self._options,
        }
        try:
            with anyio.fail_after(self._connect_timeout):
                await client.connect(**options)
            if "max_reconnect_attempts" not in self._options:
                client.options[
                    "max_reconnect_attempts"
                ] = -1  # connected once: reconnect for as long as it takes
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await _quietly(client.close())
            if isinstance(exc, TimeoutError | OSError | nats.errors.Error):
                reason = (
                    f"no answer within {self._connect_timeout:g} s"
                    if isinstance(exc, TimeoutError)
                    else redact(str(exc) or type(exc).__name__, self.url)
                )
                raise BackendError(
                    f"cannot connect to NATS at {self.shown} ({reason}); check that the server runs and the "
                    "URL (nats://host:4222), and that JetStream is enabled (nats-server -js)"
                ) from None
            raise
        info = getattr(client, "_server_info", None) or {}
        if not info.get("jetstream"):
            with anyio.CancelScope(shield=True):
                await _quietly(client.close())
            raise BackendError(
                f"the NATS server at {self.shown} (version {info.get('version', '?')}) has no JetStream: "
                "start it with JetStream enabled (nats-server -js, or a jetstream {} block in its "
                "configuration)"
            )
        self._nc = client
        self.max_payload = client.max_payload or self.max_payload

    def connection_lost(self) -> None:
        """The connection was lost (nats-py's disconnect callback calls this, before it reconnects)."""
        self._losses += 1

    def connection_back(self) -> None:
        """The connection is back after a loss (nats-py's reconnect callback calls this): the calls of
        :meth:`retrying` sent before the loss are sent again, and :attr:`reconnected` is told."""
        # A request sent before the connection was lost gets no reply (nats-py waits out its timeout, five
        # seconds, holding up whatever waits for it): send it again now, on the new connection. One made
        # while it was down is left alone: nats-py held it, and sent it on the new connection.
        for attempt, losses in list(self._attempts.items()):
            if losses < self._losses:
                attempt.cancel()
        if self.reconnected is not None:
            self.reconnected()

    async def close(self) -> None:
        client, self._nc = self._nc, None
        self._subscription = None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await _quietly(client.close())

    @property
    def client(self) -> Client:
        if self._nc is None:
            raise RuntimeError("this NatsBackend is not open: call `await backend.open()` first")
        return self._nc

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, again after a transient failure until ``reconnect_timeout`` has passed, and at
        once when it was sent before the connection was lost and the connection is back (its reply would
        have gone to the old one).

        What goes through it may be sent twice: reads; publishes to the log, whose message id and expected
        sequence make a repeat return the first one's sequence (:meth:`publish`); snapshot writes, where a
        repeated chunk is left for the next compaction to delete and a repeated pointer is refused (that
        compaction then skips its purge); and the log's subscription (a consumer made twice: nats-py drops
        the one it does not use)."""
        deadline = time.monotonic() + self._reconnect_timeout
        pause = 0.05

        def gave_up(why: str) -> BackendError:
            return BackendError(
                f"NATS at {self.shown} did not answer {what} for {self._reconnect_timeout:g} s ({why}); is "
                "the server running with JetStream?"
            )

        while True:
            with anyio.CancelScope() as attempt:
                self._attempts[attempt] = self._losses
                try:
                    return await call()
                except Exception as exc:
                    if not _transient(exc):
                        raise
                    if time.monotonic() + pause > deadline:
                        raise gave_up(f"{type(exc).__name__}: {redact(str(exc), self.url)}") from exc
                    _log.debug("retrying %s after %r", what, exc)
                finally:
                    del self._attempts[attempt]
            if attempt.cancelled_caught:  # sent before a loss, and the connection is back: send it again now
                if time.monotonic() > deadline:
                    raise gave_up("the connection was lost and came back meanwhile")
                _log.debug("sending %s again after a reconnect", what)
                continue
            await anyio.sleep(pause)
            pause = min(1.0, pause * 2)

    # -- streams ---------------------------------------------------------------------------------------------

    async def layout(self) -> int | None:
        """The layout version of the prefix's log stream, or ``None`` when it does not exist. Raises
        :class:`BackendError` for a stream of that name that lifecycle did not create."""
        js = self.client.jetstream()
        try:
            info = await self.retrying("a stream lookup", lambda: js.stream_info(self.names.log_stream))
        except nats.js.errors.NotFoundError:
            return None
        description = info.config.description or ""
        if not description.startswith(_DESCRIPTION) or not description[len(_DESCRIPTION) :].isdigit():
            raise BackendError(
                f"the stream {self.names.log_stream!r} at {self.shown} was not created by lifecycle (its "
                f"description is {description!r}); choose another prefix"
            )
        return int(description[len(_DESCRIPTION) :])

    async def create(self) -> None:
        """Create the two streams (a stream that exists is left as it is) and the log's first message."""
        names = self.names
        for name, subjects in (
            (names.log_stream, [names.log_subject]),
            (names.snap_stream, [names.snap_subjects]),
        ):
            config = StreamConfig(
                name=name,
                description=f"{_DESCRIPTION}{LAYOUT}",
                subjects=subjects,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=120.0,
                max_msgs_per_subject=-1,
            )
            try:
                await self._add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # stream name already in use (with another configuration)
                    raise BackendError(
                        f"cannot create the stream {name!r} at {self.shown}: {exc.description}"
                    ) from exc

    async def _add_stream(self, config: StreamConfig) -> None:
        """Create one stream. nats-server 2.9 can answer "error creating store for stream" (10049) while
        another client deletes the account's last stream (the server removes the account's directory and
        the creation's mkdir loses the race); that answer is tried again a few times, any other is not."""
        js = self.client.jetstream()
        for attempt in range(_STORE_RACE_ATTEMPTS):
            try:
                await self.retrying("creating a stream", lambda: js.add_stream(config))
                return
            except nats.js.errors.ServerError as exc:
                if exc.err_code != _STORE_NOT_CREATED or attempt == _STORE_RACE_ATTEMPTS - 1:
                    raise BackendError(
                        f"cannot create the stream {config.name!r} at {self.shown}: {exc.description}; check "
                        "the server's JetStream storage (its -sd directory: space and permissions)"
                    ) from exc
                _log.debug("creating stream %r again after %r", config.name, exc)
            await anyio.sleep(0.05 * (attempt + 1))

    async def delete(self) -> None:
        """Delete both streams of the prefix (those that exist)."""
        js = self.client.jetstream()
        for name in (self.names.log_stream, self.names.snap_stream):
            try:
                await self.retrying("deleting a stream", lambda name=name: js.delete_stream(name))  # type: ignore[misc]
            except nats.js.errors.NotFoundError:
                pass

    # -- the log ---------------------------------------------------------------------------------------------

    async def head(self) -> int:
        """The sequence of the log's last message (0 when it has none); raises :class:`StreamMissing`."""
        js = self.client.jetstream()
        try:
            info = await self.retrying("a stream lookup", lambda: js.stream_info(self.names.log_stream))
        except nats.js.errors.NotFoundError:
            raise StreamMissing from None
        return int(info.state.last_seq)

    async def publish(self, data: bytes, *, expected: int, txn: str, part: int = 0, parts: int = 1) -> int:
        """Append ``data`` (piece ``part`` of ``parts`` of transaction ``txn``) to the log if its last
        sequence is ``expected``; return the new sequence. Raises :class:`Conflict` when the log has moved
        on."""
        js = self.client.jetstream()
        headers = {_EXPECTED: str(expected), "Nats-Msg-Id": f"{txn}.{part}"}
        if parts > 1:
            headers[_TXN] = txn
            headers[_PART] = f"{part}/{parts}"
        subject = self.names.log_subject
        try:
            ack = await self.retrying(
                "a publish", lambda: js.publish(subject, data, headers=dict(headers), timeout=5.0)
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                raise Conflict(expected, _last_of(exc.description)) from None
            raise
        except nats.js.errors.NotFoundError:
            raise StreamMissing from None
        return int(ack.seq)

    async def fetch(self, seq: int) -> tuple[int | None, tuple[str, int, int], bytes] | None:
        """``(expected, part, data)`` of log message ``seq`` (see ``State.feed``), or ``None`` when it is gone
        (purged)."""
        js = self.client.jetstream()
        try:
            message = await self.retrying("reading the log", lambda: js.get_msg(self.names.log_stream, seq))
        except nats.js.errors.NotFoundError:
            return None
        return _expected_of(message.headers), _part_of(message.headers), message.data or b""

    async def follow(
        self, start: int, on_message: Callable[[int, int | None, tuple[str, int, int], bytes], None]
    ) -> None:
        """Deliver every log message from sequence ``start`` on to ``on_message(seq, expected, part, data)``
        (see ``State.feed``), in order, by push (an ordered consumer). Replaces the previous subscription.

        After a server restart the consumer is gone, and nats-py recreates it only once two of its heartbeats
        were missed (two seconds at least): whoever follows the log calls this again when
        :attr:`reconnected` tells it the connection is back."""
        await self.stop_following()
        js = self.client.jetstream()

        async def deliver(msg: Msg) -> None:
            headers = msg.headers
            on_message(msg.metadata.sequence.stream, _expected_of(headers), _part_of(headers), msg.data)

        self._subscription = await self.retrying(
            "subscribing to the log",
            lambda: js.subscribe(
                self.names.log_subject,
                stream=self.names.log_stream,
                cb=deliver,
                ordered_consumer=True,
                idle_heartbeat=1.0,
                # A config of its own per attempt: nats-py writes the attempt's delivery inbox into it.
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start)
                ),
            ),
        )

    async def stop_following(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with anyio.CancelScope(shield=True):
                await _quietly(subscription.unsubscribe())

    async def purge_log_below(self, seq: int) -> None:
        """Delete the log messages before ``seq``."""
        js = self.client.jetstream()
        await self.retrying("purging the log", lambda: js.purge_stream(self.names.log_stream, seq=seq))

    # -- snapshots -------------------------------------------------------------------------------------------

    async def pointer(self) -> Pointer | None:
        """The latest snapshot's pointer, or ``None`` when no snapshot was taken."""
        js = self.client.jetstream()
        names = self.names
        try:
            message = await self.retrying(
                "reading the snapshot pointer",
                lambda: js.get_last_msg(names.snap_stream, names.pointer_subject),
            )
        except nats.js.errors.NotFoundError:
            return None
        try:
            document = json.loads(message.data or b"")
            return Pointer(
                message=int(message.seq or 0),
                seq=int(document["seq"]),
                chunks=tuple(int(chunk) for chunk in document["chunks"]),
                size=int(document["size"]),
            )
        except (ValueError, KeyError, TypeError):
            _log.warning("the snapshot pointer of prefix %r cannot be read; ignoring it", names.prefix)
            return None

    async def read_snapshot(self, pointer: Pointer) -> bytes | None:
        """The snapshot ``pointer`` names, or ``None`` when a chunk of it is gone (a newer snapshot replaced
        it meanwhile)."""
        js = self.client.jetstream()
        pieces: list[bytes] = []
        for chunk in pointer.chunks:
            try:
                message = await self.retrying(
                    "reading a snapshot",
                    lambda chunk=chunk: js.get_msg(self.names.snap_stream, chunk),  # type: ignore[misc]
                )
            except nats.js.errors.NotFoundError:
                return None
            pieces.append(message.data or b"")
        data = b"".join(pieces)
        return data if len(data) == pointer.size else None

    async def write_snapshot(self, seq: int, data: bytes, previous: Pointer | None) -> bool:
        """Store a snapshot taken at ``seq`` and point to it, unless another process pointed to a snapshot
        meanwhile (then ``False``: the caller lets it be)."""
        js = self.client.jetstream()
        names = self.names
        step = max(1024, self.max_payload // 2)
        chunks: list[int] = []
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            ack = await self.retrying(
                "writing a snapshot",
                lambda piece=piece: js.publish(names.chunk_subject(seq), piece, timeout=10.0),  # type: ignore[misc]
            )
            chunks.append(int(ack.seq))
        document = json.dumps({"seq": seq, "chunks": chunks, "size": len(data)}).encode()
        expected = 0 if previous is None else previous.message
        headers = {"Nats-Expected-Last-Subject-Sequence": str(expected)}
        try:
            await self.retrying(
                "writing a snapshot",
                lambda: js.publish(names.pointer_subject, document, headers=dict(headers), timeout=10.0),
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def purge_snapshots_below(self, seq: int) -> None:
        """Delete the snapshot stream's messages before ``seq`` (older snapshots and their pointers)."""
        js = self.client.jetstream()
        await self.retrying("purging old snapshots", lambda: js.purge_stream(self.names.snap_stream, seq=seq))


def _expected_of(headers: dict[str, str] | None) -> int | None:
    if not headers:
        return None
    value = headers.get(_EXPECTED)
    return int(value) if value is not None and value.isdigit() else None


def _part_of(headers: dict[str, str] | None) -> tuple[str, int, int]:
    """``(transaction, piece, pieces)`` of a log message (``(transaction, 0, 1)``: a transaction in one
    message; its id is its message id's)."""
    if not headers:
        return "", 0, 1
    if _PART not in headers:
        return headers.get("Nats-Msg-Id", "").removesuffix(".0"), 0, 1
    index, _, count = headers[_PART].partition("/")
    if not (index.isdigit() and count.isdigit()) or not int(index) < int(count):
        return "", 0, 0  # unreadable: skipped
    return headers.get(_TXN, ""), int(index), int(count)


def _last_of(description: str | None) -> int | None:
    """The log's last sequence in a "wrong last sequence: N" error."""
    text = (description or "").rpartition(":")[2].strip()
    return int(text) if text.isdigit() else None


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as exc:  # closing or unsubscribing what is already gone
        _log.debug("ignored while closing: %r", exc)
