"""RedisBackend: durable tasks in a Redis server you already operate (extra ``redis``).

Install with ``pip install "anyio-lifecycle[redis]"`` (redis-py; hiredis is used when installed).
asyncio only.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import anyio

from ..._extras import raise_missing_extra

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError, ResponseError
except ModuleNotFoundError as exc:  # the extra is not installed: say which, and how to install it
    raise_missing_extra(exc, "redis")

from ...._checks import check_count, check_name, check_seconds
from ...._redact import library_logger
from ..._backend import Create, check_create
from ..._errors import BackendError, DuplicateTaskError, StoreNotFoundError
from ..._records import (
    ClaimedTask,
    FlowLimits,
    FlowState,
    GroupRecord,
    NewGroup,
    NewTask,
    Notice,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
)
from .._asyncio_only import require_asyncio
from . import _admin as admin
from ._codec import (
    NEW_TASK_VALUES,
    RECORD_FIELDS,
    claimed_tasks,
    group_args,
    group_record,
    limits_args,
    new_task_args,
    progress_args,
    record_from_fields,
    settlement_args,
    sortable_time,
    time_text,
)
from ._conn import (
    ScriptRunner,
    check_url,
    close_clients,
    make_client,
    safe_url,
    take_url_options,
    unusable,
)
from ._lua import LAYOUT_VERSION
from ._notices import Listener
from ._wait import Settling, Waiter, until_set

__all__ = ["RedisBackend"]

_log = library_logger("lifecycle.asynctask.redis")

_MIN_REDIS = (6, 0)
_ZMSCORE_REDIS = (6, 2)
_MIGRATE_CHUNK = 5000
_UNSURE_KEPT = 10_000
"""Past this many leases remembered in ``RedisBackend._unsure``, those whose markers expired are dropped."""
_UNSURE_CALLS = 64
"""The most earlier settle calls of one lease a settle call names: the oldest ones whose markers may still
last (of a lease's calls, only the first one that reached the server with the lease held can have applied
its settlement; the ones after it found it applied and changed nothing)."""


class RedisBackend:
    """Stores tasks in Redis through redis-py's asyncio client.

    Any number of worker processes on any number of hosts may share one server and ``prefix`` (each with its
    own ``RedisBackend``). Every state change is one Lua script, so it is atomic; claims lease a whole batch
    in one script call and settlements, heartbeats and enqueues are batched the same way, so a busy worker
    needs far fewer than one round trip per task. Flow control (priorities, paused queues, rate and
    concurrency limits, expiry, uniqueness windows, debounce) is applied inside the same claim and enqueue
    scripts, so it holds across every worker. Idle workers block on the server (``BLPOP`` on a per-queue
    wake-up list, on a connection of their own) until a task is enqueued or released, the earliest delayed
    task is due, or a task held back by a limit may start (a slot freed, a token refilled), so nothing polls.
    An idle worker writes its claim behind that ``BLPOP`` (:meth:`wait_and_claim`), so the task that wakes it
    comes back in the same round trip.

    Durability is Redis's: a task is in the server's memory once :meth:`enqueue_many` returns, and survives a
    server crash only as far as the server's persistence allows (``appendonly yes`` with
    ``appendfsync always`` loses nothing, ``everysec`` up to a second of writes, RDB snapshots everything
    since the last snapshot; replication to a replica that is then promoted may lose the last writes too).

    Args:
        url: a redis-py URL: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` for TLS
            (certificate options as URL query options, e.g. ``?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem``),
            or ``unix:///path/to/redis.sock?db=0``.
        prefix: the name every key starts with, as the hash tag ``{prefix}``, so all keys of one prefix live
            in one Redis Cluster slot. Use one prefix per application; two applications on one server keep
            apart by prefix.
        socket_timeout: how long a command may wait for the server's reply before the connection counts as
            lost (seconds); a ``socket_timeout`` option in the URL takes precedence.
        connect_timeout: how long connecting may take (seconds); :meth:`open` fails after it.
        reconnect_timeout: how long a call keeps retrying after the connection dropped (a server restart, a
            failover) before it raises redis-py's ``ConnectionError`` (seconds). Retries never lose or
            duplicate work: every script is idempotent under a retry.
        max_connections: the most pooled connections this object opens (one more is used for waiting).
        clock: the time source :meth:`wait_for_work` compares ``run_at`` with (the engine's clock).
        client_options: further keyword arguments for redis-py's ``ConnectionPool.from_url`` (TLS files,
            ``health_check_interval``, ...).
        cluster: connect to a Redis Cluster (redis-py's ``RedisCluster``; ``url`` names any node). Also
            set by the URL option ``?cluster=true``. All keys of a prefix live in one slot, so every
            script runs on one node.

    Raises :class:`BackendError` from :meth:`open` under trio (redis-py's client needs asyncio), when the
    server cannot be reached or refuses the credentials, is older than Redis 6.0, or holds a newer key
    layout under this prefix.

    Example::

        backend = RedisBackend("redis://:secret@redis.internal:6379/0", prefix="shop")
        tasks = AsyncTasks(backend)
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "lifecycle",
        socket_timeout: float | timedelta = 30.0,
        connect_timeout: float | timedelta = 10.0,
        reconnect_timeout: float | timedelta = 30.0,
        max_connections: int = 32,
        clock: Callable[[], float] = time.time,
        client_options: Mapping[str, Any] | None = None,
        cluster: bool = False,
    ) -> None:
        url, cluster_option, url_socket_timeout = take_url_options(url)
        check_url(url, cluster=bool(cluster) or bool(cluster_option))
        if url_socket_timeout is not None:  # as in redis-py, an option in the URL wins
            socket_timeout = url_socket_timeout
        check_name(prefix, "RedisBackend(prefix=...)")
        if "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix {prefix!r} must not contain '{{' or '}}': the backend wraps it in braces itself "
                "(a Redis Cluster hash tag); choose a name without braces"
            )
        self._url = url
        self._name = prefix
        self._prefix = "{" + prefix + "}:"
        self._socket_timeout = check_seconds(socket_timeout, "RedisBackend(socket_timeout=...)")
        self._connect_timeout = check_seconds(connect_timeout, "RedisBackend(connect_timeout=...)")
        self._reconnect_timeout = check_seconds(reconnect_timeout, "RedisBackend(reconnect_timeout=...)")
        self._max_connections = check_count(max_connections, "RedisBackend(max_connections=...)", minimum=2)
        # A settle call's marker outlives every retry of the call (see the settle script).
        self._marker_seconds = str(math.ceil(self._reconnect_timeout + 2 * self._socket_timeout) + 10)
        self._clock = clock
        self._client_options = dict(client_options or {})
        self._cluster = bool(cluster) or bool(cluster_option)
        self._runner: ScriptRunner | None = None
        self._waiting: Waiter | None = None
        self._listener: Listener | None = None
        self._nonce = ""
        self._calls = itertools.count(1)
        self._last_claim = ""
        self._last_reclaim = ""
        # '1' when the server has ZMSCORE (Redis 6.2+): the settle script then looks up its tasks' index
        # entries with one command per queue instead of one ZSCORE per task. Set by open().
        self._zmscore = "0"
        # Leases whose settle calls' outcome this object never learned (a call raised: its reply was lost and
        # its retries gave up, or a settle call sent with a wait got no reply), with those calls, each as
        # (when it was made, its id): a later settle call of the lease names them while their markers may
        # last, so what they applied counts as applied (see the settle script).
        self._unsure: dict[tuple[str, str], tuple[tuple[float, str], ...]] = {}
        self._unmarked = False  # open, but no layout key yet: opened with create="on_enqueue"

    @property
    def prefix(self) -> str:
        """The application's key prefix (keys are named ``{prefix}:...``)."""
        return self._name

    @property
    def key_prefix(self) -> str:
        """What every key of this backend starts with: ``{prefix}:`` (the braces are the hash tag)."""
        return self._prefix

    def __repr__(self) -> str:
        cluster = ", cluster=True" if self._cluster else ""
        return f"RedisBackend({safe_url(self._url)!r}, prefix={self._name!r}{cluster})"

    # -- connection ---------------------------------------------------------------------------------------

    async def open(self, *, create: Create = True) -> None:
        """Connect, check the server and the key layout, load the scripts. Calling it again does nothing.

        The keys of a prefix exist once a task is stored; ``open`` records the layout version under the
        prefix (``{prefix}:layout``). ``create=False`` writes nothing: it raises :class:`BackendError` when
        no backend has used this prefix on this database (what the ``lifecycle tasks`` commands use).
        ``create="on_enqueue"`` (what ``AsyncTasks(..., execution=False)`` uses) records the layout at the
        first enqueue instead, so looking at tasks writes no key.

        Raises :class:`BackendError` under trio, when the server cannot be reached within
        ``connect_timeout`` or refuses the login, runs a Redis older than 6.0, or holds a newer layout.
        """
        create = check_create(create)
        if self._runner is not None:
            return
        require_asyncio("RedisBackend", "redis-py's client is asyncio-only")
        client = make_client(
            self._url,
            connect_timeout=self._connect_timeout,
            max_connections=self._max_connections,
            options=self._client_options,
            cluster=self._cluster,
        )
        waiter = make_client(
            self._url,
            connect_timeout=self._connect_timeout,
            max_connections=None,
            options=self._client_options,
            cluster=self._cluster,
        )
        runner = ScriptRunner(
            client,
            prefix=self._prefix,
            socket_timeout=self._socket_timeout,
            reconnect_timeout=self._reconnect_timeout,
        )
        try:
            with anyio.fail_after(self._connect_timeout + self._socket_timeout):
                info = await _server_info(client)
                version = str(info.get("redis_version", "6.0"))
                if _version(version) < _MIN_REDIS:
                    raise BackendError(
                        f"Redis at {safe_url(self._url)} runs version {version}, but RedisBackend needs "
                        "Redis 6.0 or newer; upgrade the server"
                    )
                policy = str(info.get("maxmemory_policy", "noeviction"))
                zmscore = "1" if _version(version) >= _ZMSCORE_REDIS else "0"
                await runner.load_all()
                if create is True:
                    stored = await runner.run("layout", [str(LAYOUT_VERSION)])
                else:
                    layout_key = f"{self._prefix}layout"
                    stored = await runner.once(lambda: client.get(layout_key))
                    if stored is None and create is False:
                        raise StoreNotFoundError(
                            f"there are no tasks under prefix {self._name!r} at {safe_url(self._url)} (no "
                            f"{layout_key} key); check the prefix (?prefix=NAME in a URL) and the database "
                            "number, or start a worker, which creates it"
                        )
        except BackendError:
            await close_clients(client, waiter)
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            await close_clients(client, waiter)
            raise unusable(self._url, exc) from exc
        except BaseException:
            await close_clients(client, waiter)
            raise
        self._unmarked = stored is None
        self._zmscore = zmscore
        if int(stored or 0) > LAYOUT_VERSION:
            await close_clients(client, waiter)
            raise self._newer_layout(int(stored))
        if stored is not None and int(stored) < LAYOUT_VERSION:
            try:
                await self._migrate(runner, int(stored))
            except BaseException:
                await close_clients(client, waiter)
                raise
        if policy.startswith("allkeys-"):
            _log.warning(
                "Redis at %s evicts keys when it runs out of memory (maxmemory-policy %s): tasks can vanish; "
                "set maxmemory-policy noeviction on a server that stores tasks",
                safe_url(self._url),
                policy,
            )
        self._nonce = secrets.token_hex(6)
        self._runner = runner
        self._waiting = Waiter(
            runner, waiter, nonce=self._nonce, clock=self._clock, socket_timeout=self._socket_timeout
        )
        self._listener = Listener(
            waiter,
            f"{self._prefix}notices",
            nonce=self._nonce,
            socket_timeout=self._socket_timeout,
            connect_timeout=self._connect_timeout,
            countable=not self._cluster,
        )

    async def _migrate(self, runner: ScriptRunner, stored: int) -> None:
        """Bring the keys under the prefix from layout ``stored`` to this version's, in steps of a few
        thousand entries (each one atomic, so other processes opening the store meanwhile are safe)."""
        _log.info(
            "moving the tasks under prefix %r at %s from key layout %d to %d",
            self._name,
            safe_url(self._url),
            stored,
            LAYOUT_VERSION,
        )
        while int(await runner.run("migrate", [str(_MIGRATE_CHUNK)])) == 0:
            pass

    async def _mark_layout(self, runner: ScriptRunner) -> None:
        """Record the layout version before the first enqueue of a backend opened with
        ``create="on_enqueue"``; refuse a newer layout another process recorded meanwhile."""
        stored = int(await runner.run("layout", [str(LAYOUT_VERSION)]))
        if stored > LAYOUT_VERSION:
            raise self._newer_layout(stored)
        self._unmarked = False

    def _newer_layout(self, stored: int) -> BackendError:
        return BackendError(
            f"the keys under prefix {self._name!r} at {safe_url(self._url)} use layout version "
            f"{stored}, newer than this version of lifecycle understands ({LAYOUT_VERSION}); "
            "upgrade anyio-lifecycle, or use another prefix"
        )

    async def close(self) -> None:
        """Close both connection pools. Idempotent."""
        runner, waiting, listener = self._runner, self._waiting, self._listener
        self._runner = self._waiting = self._listener = None
        if listener is not None:
            await listener.close()
        if waiting is not None:
            await waiting.close()
        if runner is not None:
            await close_clients(runner.client)

    def _run(self) -> ScriptRunner:
        if self._runner is None:
            raise RuntimeError("this RedisBackend is not open: call `await backend.open()` first")
        return self._runner

    def _call_id(self) -> str:
        return f"{self._nonce}.{next(self._calls):x}"

    # -- the worker's path --------------------------------------------------------------------------------

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        """Store ``tasks`` in one atomic script call; see :meth:`Backend.enqueue_many`.

        Uniqueness windows are keys ``{prefix}:uq:<key>`` holding the window's end, compared with each task's
        ``enqueued_at``; each key expires a minute after its window ends (by the server's clock), only to
        free memory. The whole batch is one command, so a very large batch holds the server for its duration
        (about a second per 100 000 small tasks): split huge imports at the call site.
        """
        if if_exists not in ("error", "skip", "debounce"):
            raise ValueError(f'if_exists must be "error", "skip" or "debounce", got {if_exists!r}')
        runner = self._run()
        if not tasks:
            return []
        if len(tasks) == 1 and _fresh(tasks[0]):
            # One task whose id the engine generated: the lean script, which looks for no record with its id
            # (none can exist). A repeat after a lost connection runs the general enqueue script, which finds
            # the record the first attempt may have stored by the call id. Written out here rather than in a
            # method of its own: one coroutine less on every single enqueue.
            task = tasks[0]
            call = self._call_id()
            values = new_task_args(task)
            if self._unmarked:
                await self._mark_layout(runner)
            reply = await runner.run(
                "enqueue_new", [call, *values], retry_as=("enqueue", lambda: [if_exists, call, "1", *values])
            )
            if isinstance(reply, list):  # the general script's reply, from a retry
                stored, detail = reply
                if stored == 0:
                    conflicts = [task_id.decode() for task_id in detail]
                    raise DuplicateTaskError(conflicts[0], conflicts)
                return [task.id] if detail == b"1" else []
            return [task.id]
        call = self._call_id()
        args: list[str | bytes] = [if_exists, call, str(len(tasks))]
        # Tasks whose id the engine generated are stored without looking for a record with it (the sixth
        # flag), on the first attempt only: a repeat (the first one's reply was lost) must find what that one
        # stored, so it sends the flags without it.
        generated = False
        for task in tasks:
            if task.generated_id:
                generated = True
                args += new_task_args(task, generated=True)
            else:
                args += new_task_args(task)
        if self._unmarked:
            await self._mark_layout(runner)
        retry = ("enqueue", lambda: _checked(args, len(tasks))) if generated else None
        stored, detail = await runner.run("enqueue", args, retry_as=retry)
        if stored == 0:
            conflicts = [task_id.decode() for task_id in detail]
            raise DuplicateTaskError(conflicts[0], conflicts)
        return [task.id for task, flag in zip(tasks, detail, strict=True) if flag == 49]  # b"1"

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` due tasks in one script call, every flow-control rule (paused queues,
        priorities, ``limits``, expiry) applied in it; see :meth:`Backend.claim`.

        Tasks that ``limits`` hold back are parked (moved aside, still pending) so that later claims pass them
        over at no cost until a slot is freed or the rate bucket refills. Besides the tasks it leases, one
        call examines at most 1000 entries (``SCAN_BOUND``); when it stopped there, the next
        :meth:`wait_for_work` returns at once, so the next claim goes on.
        """
        runner = self._run()
        if not queues or limit <= 0:
            return []
        call = self._call_id()
        args = [
            time_text(now),
            sortable_time(now),
            time_text(lease_until),
            str(int(limit)),
            call,
            self._last_claim,
            *limits_args(limits),
            *dict.fromkeys(queues),
        ]
        reply = await runner.run("claim", args)
        more, tasks = reply[0], reply[1:]
        self._last_claim = call if tasks else ""
        if (tasks or more == b"1") and self._waiting is not None:
            self._waiting.claimed()
        return claimed_tasks(tasks)

    async def wait_and_claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
        timeout: float,
        woken: anyio.Event,
    ) -> list[ClaimedTask] | None:
        """:meth:`wait_for_work` on ``queues``, ended early when ``woken`` is set, then :meth:`claim` as it
        runs the moment the wait ends, in the wait's own round trip: prepare_wait, the ``BLPOP`` and the claim
        script are written at once on the waiting connection, and the server runs the claim when the
        ``BLPOP`` returns (so a task enqueued during the wait is leased without a second round trip). Work due
        by ``now`` already ends the wait at once (prepare_wait rings the alarm). See :class:`WaitAndClaim`.

        The claim's ``now`` is ``now`` (read before this call) advanced by the real time that passed since:
        on this host up to the write, then on the server's clock from the wait's beginning to the claim, so
        no clock skew between this host and the server enters, and ``now`` stays behind the real time;
        ``lease_until`` is advanced alike. For an ACL user who may not run ``TIME`` (the documented least
        rights), only this host's part is added: a task that falls due during the wait is claimed by the
        next call. ``now`` is then moved up to the ``run_at`` of the ready tasks the claim may take, by at
        most ``WAKE_GRACE`` (1 s; ``lease_until`` is not moved by that): a task is ready only once a clock
        read a time past its ``run_at`` (its enqueuer's, as a rule), before the claim ran, so with the clocks
        in step that ``now`` is not ahead of the real time either, and a task enqueued during the wait is
        not left to the next call because its enqueuer read its clock a little after this caller did."""
        self._run()
        assert self._waiting is not None
        if not queues or limit <= 0:
            # Nothing to claim: wait as wait_for_work does, ended by woken as the claiming wait is.
            await until_set(woken, self._waiting.wait(queues, timeout))
            return None
        return await self._wait_then_claim(queues, limit, now, lease_until, limits, timeout, woken, None)

    async def settle_wait_and_claim(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
        timeout: float,
        woken: anyio.Event,
        settled: Callable[[set[str] | None], None],
    ) -> list[ClaimedTask] | None:
        """:meth:`settle` written with :meth:`wait_and_claim`'s wait, ahead of it on the waiting connection:
        the server applies the settlements before the wait blocks, and ``settled`` hears the outcome as soon
        as its reply is read (see :class:`SettleWaitAndClaim`). When no wait is written (nothing to claim,
        ``woken`` set already, a Redis Cluster client), :meth:`settle` runs first on its own. After a lost
        connection the settle call is sent again with the same call id, through the runner: its marker makes
        a repeat of a call that ran count its settlements as applied. When no reply to it could be read,
        ``settled`` hears ``None`` (the verdicts go back to the caller) and the next settle call of those
        leases names this one, so that what it applied counts as applied then (see :meth:`settle`)."""
        self._run()
        assert self._waiting is not None
        if not settlements:
            settled(set())
            return await self.wait_and_claim(
                queues, limit, now=now, lease_until=lease_until, limits=limits, timeout=timeout, woken=woken
            )
        if not queues or limit <= 0 or woken.is_set() or not self._waiting.writes_claims:
            settled(await self.settle(settlements))
            return await self.wait_and_claim(
                queues, limit, now=now, lease_until=lease_until, limits=limits, timeout=timeout, woken=woken
            )
        args, repeated, calls = self._settle_args(settlements)

        def outcome(reply: Any) -> None:
            # The script's reply (the lost ids), or None: it refused the call, which applied nothing, so the
            # earlier calls it named are still the ones to name.
            if reply is None:
                self._remember_unsure(settlements, calls)
            settled(None if reply is None else {task_id.decode() for task_id in reply} | repeated)

        settling = Settling(args, outcome)
        try:
            return await self._wait_then_claim(
                queues, limit, now, lease_until, limits, timeout, woken, settling
            )
        finally:
            if not settling.read:
                # Written, but neither its reply nor its repeat's was read: a later settle call of these
                # leases names this one. The verdicts go back to the caller, whose settler saves them.
                self._remember_unsure(settlements, calls)
                settling.done(None)

    async def _wait_then_claim(
        self,
        queues: Sequence[str],
        limit: int,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None,
        timeout: float,
        woken: anyio.Event,
        settling: Settling | None,
    ) -> list[ClaimedTask] | None:
        assert self._waiting is not None
        began = self._waiting.began
        call = self._call_id()
        rest = [str(int(limit)), call, self._last_claim, *limits_args(limits), *dict.fromkeys(queues)]

        def claim_args(later: float) -> list[str]:
            return [time_text(now + later), began, time_text(lease_until + later), *rest]

        waiting = self._waiting
        if settling is None:
            reply = await waiting.wait_then_claim(queues, timeout, woken, now, claim_args, call)
        else:
            reply = await waiting.wait_then_claim(queues, timeout, woken, now, claim_args, call, settling)
        if reply is None:
            return None
        more, tasks = reply[0], reply[1:]
        self._last_claim = call if tasks else ""
        if tasks or more == b"1":
            self._waiting.claimed()
        return claimed_tasks(tasks)

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        """Renew every held lease in one script call; see :meth:`Backend.extend_leases`."""
        runner = self._run()
        if not leases:
            return set()
        args = [time_text(lease_until)]
        for task_id, token in leases:
            args += (task_id, token)
        lost = await runner.run("extend", args)
        return {task_id.decode() for task_id in lost}

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        """Apply every settlement (with its ``then`` tasks) in one script call; see :meth:`Backend.settle`.

        A call repeated after a lost connection keeps its call id, so what its first execution applied counts
        as applied. When the call raises (no reply could be read before ``reconnect_timeout`` passed), this
        object remembers it for its leases, and its next settle call of any of them names it: what it applied
        counts as applied then too, as long as its marker lasts (``reconnect_timeout`` + twice
        ``socket_timeout`` + 10 s), instead of being reported as a lost lease."""
        runner = self._run()
        if not settlements:
            return set()
        args, repeated, calls = self._settle_args(settlements)
        try:
            lost = await runner.run("settle", args)
        except BaseException:
            self._remember_unsure(settlements, calls)
            raise
        return {task_id.decode() for task_id in lost} | repeated

    def _settle_args(
        self, settlements: Sequence[Settlement]
    ) -> tuple[list[str | bytes], set[str], tuple[tuple[float, str], ...]]:
        """The settle script's arguments for ``settlements`` (a new call id), the ids of those left out (a
        second settlement of a lease, which the first one ends), and the ids of the calls whose settlements
        it makes: the earlier calls of the same leases whose outcome is unknown (see ``_unsure``), then
        itself, each with when it was made."""
        # 'q': this object's notices subscription is up, so the script sends the settled notice only when
        # someone else subscribes (this object skips its own). A cluster node counts only its own
        # subscribers, so a cluster backend always sends it.
        listener = self._listener
        live = listener is not None and listener.live and not self._cluster
        call = self._call_id()
        args: list[str | bytes] = [call, self._marker_seconds, ""]
        leases: set[tuple[str, str]] = set()
        repeated: set[str] = set()
        earlier: dict[tuple[float, str], None] = {}
        unsure = self._unsure
        for settlement in settlements:
            lease = (settlement.task_id, settlement.token)
            if lease in leases:  # the first settlement of a lease ends it: a second one finds it gone
                repeated.add(settlement.task_id)
                continue
            leases.add(lease)
            if unsure:
                made = unsure.pop(lease, None)
                if made is not None:
                    earlier.update(dict.fromkeys(made))
            args += settlement_args(settlement)
        now = time.monotonic()
        flags = self._zmscore + ("q" if live else "-")
        if not earlier:  # the usual call: nothing to name
            args[2] = flags
            return args, repeated, ((now, call),)
        named = self._still_marked(earlier, now)
        args[2] = "".join((flags, *(f" {c}" for _, c in named)))
        return args, repeated, (*named, (now, call))

    def _still_marked(
        self, calls: Collection[tuple[float, str]], now: float
    ) -> tuple[tuple[float, str], ...]:
        """Of ``calls`` (when made, id), the oldest ``_UNSURE_CALLS`` whose markers may still last (a marker
        outlives its call by ``_marker_seconds``), oldest first."""
        horizon = now - float(self._marker_seconds)
        return tuple(sorted(call for call in calls if call[0] > horizon)[:_UNSURE_CALLS])

    def _remember_unsure(
        self, settlements: Sequence[Settlement], calls: tuple[tuple[float, str], ...]
    ) -> None:
        """Remember that the settle calls ``calls`` of ``settlements`` may have applied them (see
        ``_unsure``). Past ``_UNSURE_KEPT`` leases, those whose calls' markers all expired are dropped."""
        unsure = self._unsure
        now = time.monotonic()
        if len(unsure) >= _UNSURE_KEPT:
            for lease in [lease for lease, made in unsure.items() if not self._still_marked(made, now)]:
                del unsure[lease]
        for settlement in settlements:
            unsure[(settlement.task_id, settlement.token)] = calls

    async def cancel_requests(self, task_ids: Sequence[str]) -> set[str]:
        """Of ``task_ids``, those ``ACTIVE`` whose cancellation was asked; one read-only script call. See
        :meth:`Backend.cancel_requests`."""
        runner = self._run()
        unique = list(dict.fromkeys(task_ids))
        if not unique:
            return set()
        asked = await runner.run("cancel_requests", unique)
        return {task_id.decode() for task_id in asked}

    async def save_progress(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Store every update whose lease is held, in one script call; see :meth:`Backend.save_progress`."""
        runner = self._run()
        if not updates:
            return set()
        args: list[str] = []
        for update in updates:
            args += progress_args(update)
        lost = await runner.run("progress", args)
        return {task_id.decode() for task_id in lost}

    async def enqueue_group(self, group: NewGroup) -> str:
        """Store the group and its members in one atomic script call; see :meth:`Backend.enqueue_group`.

        The group is kept in ``{prefix}:g:<id>`` (with its member ids, results and ``then``); each member's
        record names it. Settling a member updates the group in the settlement's own script, so ``then`` is
        stored in the same atomic step as the last member's success, once.

        Raises :class:`DuplicateTaskError` naming the group id when a group with it exists, or the member
        ids that are ``PENDING``/``ACTIVE`` (or repeated, or refused by a uniqueness window).
        """
        runner = self._run()
        args: list[str | bytes] = ["group", self._call_id(), str(len(group.members))]
        for member in group.members:
            args += new_task_args(member)
        args += group_args(group)
        if self._unmarked:
            await self._mark_layout(runner)
        stored, detail = await runner.run("enqueue", args)
        if stored == 0:
            conflicts = [task_id.decode() for task_id in detail]
            raise DuplicateTaskError(conflicts[0], conflicts)
        return group.id

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group with this id, or ``None``; one read-only script call. Its counts read each member's
        record (a member whose record is gone counts as what it ended as). See :meth:`Backend.get_group`."""
        reply = await self._run().run("group", [group_id])
        return None if reply is None else group_record(group_id, reply)

    async def wait_for_notices(self, *, timeout: float) -> list[Notice]:
        """The notices published on ``{prefix}:notices`` since the last call (settlements; cancellations of
        running tasks), waiting up to ``timeout`` seconds for the first; see
        :meth:`NotifyingBackend.wait_for_notices`.

        The first call subscribes (on a connection of its own, reconnecting after it drops) and returns once
        the subscription is live, so notices published after it returns are seen by the next call. Notices
        published while the connection is down are missed: best effort, as the protocol allows. The
        ``"settled"`` notices of this object's own :meth:`settle` calls are left out (its engine knows those
        verdicts); those of everything else it does (a cancel, a claim that expires tasks) are not.
        """
        self._run()
        assert self._listener is not None
        return await self._listener.wait(max(0.0, float(timeout)))

    async def reclaim_expired(self, *, now: float, lease_until: float, limit: int) -> list[ClaimedTask]:
        """Take over up to ``limit`` expired leases; see :meth:`Backend.reclaim_expired`."""
        runner = self._run()
        if limit <= 0:
            return []
        call = self._call_id()
        args = [time_text(now), time_text(lease_until), str(int(limit)), call]
        reply = await runner.run("reclaim", [*args, self._last_reclaim])
        self._last_reclaim = call if reply else ""
        return claimed_tasks(reply)

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        """Block on the server until a task of ``queues`` is enqueued or released, the earliest delayed one
        is due (by ``clock``), or ``timeout`` seconds passed; see :meth:`Backend.wait_for_work`.

        Work that is already due is reported once; when the same task is still the first due one at the
        next call (the caller's clock disagrees), the call waits for a change instead of returning at once.
        """
        self._run()
        assert self._waiting is not None
        await self._waiting.wait(queues, timeout)

    # -- flow control -------------------------------------------------------------------------------------

    async def pause(self, queue: str) -> None:
        """Stop every caller of :meth:`claim` from taking tasks of ``queue`` until :meth:`resume`; stored in
        the set ``{prefix}:paused``. Idempotent."""
        runner = self._run()
        if self._unmarked:
            await self._mark_layout(runner)
        await runner.run("pause", [queue])

    async def resume(self, queue: str) -> None:
        """Undo :meth:`pause` and wake the queue's idle workers. Idempotent."""
        await self._run().run("resume", [queue])

    async def paused(self) -> set[str]:
        """The paused queues (one ``SMEMBERS``)."""
        runner = self._run()
        key = f"{self._prefix}paused"
        members = await runner.retrying(lambda: runner.client.smembers(key), "paused")
        return {member.decode("utf-8", "replace") for member in members}

    async def flow_state(
        self, name: str, concurrency_key: str | None, *, now: float, limits: FlowLimits
    ) -> FlowState:
        """The running counts of ``name`` (and of its ``concurrency_key``), its rate bucket refilled to
        ``now`` as the claim script would refill it, and the claims that found its tasks waiting for a token
        (``{prefix}:tr``); one read-only script call. See :meth:`Backend.flow_state`."""
        runner = self._run()
        args = [name, "0" if concurrency_key is None else "1", concurrency_key or ""]
        running, for_key, stored, refused = await runner.run("flow_state", args)
        if limits.rate is None:
            return FlowState(running=int(running), running_for_key=int(for_key), tokens=None)
        return FlowState(
            running=int(running),
            running_for_key=int(for_key),
            tokens=_refilled(stored, limits, now),
            refused=int(refused or 0),
        )

    # -- inspection and operator actions ------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record with this id, or ``None``; one ``HMGET``."""
        runner = self._run()
        key = f"{self._prefix}t:{task_id}"
        fields = await runner.retrying(lambda: runner.client.hmget(key, RECORD_FIELDS), "get")
        if all(value is None for value in fields):
            return None
        return record_from_fields(task_id, fields)

    async def list_records(
        self,
        *,
        states: Collection[TaskState] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Records matching the filters, newest ``enqueued_at`` first; see :meth:`Backend.list_records`.

        Reads ``offset + limit`` index entries per queue and state, so deep pages cost more than shallow ones.
        """
        return await admin.list_records(self._run(), states, queue, limit, offset)

    async def stats(self) -> Mapping[str, Mapping[TaskState, int]]:
        """The number of records per queue and state (states without records are left out); one call."""
        return await admin.stats(self._run())

    async def cancel(self, task_ids: Sequence[str], *, now: float) -> list[str]:
        """Cancel the ``PENDING`` tasks among ``task_ids`` and ask the ``ACTIVE`` ones to stop, in one atomic
        call; see :meth:`Backend.cancel`. A running task keeps its running slots (``max_running``) until its
        worker settles it; the worker hears of it at once through a ``"cancel"`` notice (pub/sub), or at its
        next :meth:`cancel_requests` check."""
        return await admin.cancel(self._run(), task_ids, now, self._call_id)

    async def requeue(
        self, task_ids: Sequence[str] | None = None, *, queue: str | None = None, now: float
    ) -> int:
        """Move ``DEAD``/``CANCELLED`` tasks back to ``PENDING``; see :meth:`Backend.requeue`.

        With ``task_ids`` it is one atomic call (and ``queue``, when given, is not consulted). Without, dead
        tasks move in batches of 500 until none is left.
        """
        return await admin.requeue(self._run(), task_ids, queue, now, self._call_id)

    async def purge(
        self,
        *,
        states: Collection[TaskState],
        queue: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete records in ``states``; see :meth:`Backend.purge`. Works in batches of 500 records, so a
        large purge never blocks the server for long (and is not atomic as a whole). With ``queue=None``,
        the groups that ended in one of ``states`` (before ``before``) are deleted too; they do not count in
        the number returned."""
        return await admin.purge(self._run(), states, queue, before, limit)

    async def clear(self) -> int:
        """Delete every key under this prefix: all tasks of all queues, in any state. Returns how many keys
        were deleted. For tests and for decommissioning an application; workers must be stopped first."""
        return await admin.clear(self._run())


async def _server_info(client: aioredis.Redis) -> dict[str, Any]:
    """The server's version and eviction policy, or nothing when the ACL user may not run INFO."""
    try:
        return {**(await client.info("server")), **(await client.info("memory"))}
    except ResponseError as exc:  # NOPERM: a restricted user; the checks are a courtesy, not a need
        _log.debug("cannot read INFO from Redis (%s); skipping the version and eviction checks", exc)
        return {}


def _refilled(stored: bytes | None, limits: FlowLimits, now: float) -> float:
    """The tokens of a stored bucket (``b"tokens as_of"``, or ``None`` for one never used) refilled to ``now``
    with ``limits``, by the claim script's arithmetic (the same float operations, in the same order)."""
    rate = float(limits.rate or 0)
    tokens, at = rate, now
    if stored is not None:
        try:
            tokens, at = (float(part) for part in stored.split(b" "))
        except ValueError:  # unreadable: the claim treats it as never used
            tokens, at = rate, now
        if not (math.isfinite(tokens) and math.isfinite(at)):
            tokens, at = rate, now
        elif now > at and limits.per:
            tokens = tokens + (now - at) * rate / limits.per
    return min(rate, tokens)


def _checked(args: Sequence[str | bytes], count: int) -> list[str | bytes]:
    """The enqueue script's arguments ``args`` (mode, call id, count, then each task's values) with every
    task's sixth flag (the engine generated its id) taken off, for a repeat of the call: it looks for a record
    with each id, so it finds the ones the first attempt stored."""
    checked = list(args)
    for index in range(3 + 8, 3 + count * NEW_TASK_VALUES, NEW_TASK_VALUES):
        flags = checked[index]
        assert isinstance(flags, str)
        checked[index] = flags[:5]
    return checked


def _fresh(task: NewTask) -> bool:
    """Whether ``task`` may be stored by the lean single-task script: an id the engine generated, and nothing
    that needs a look at other keys first (a uniqueness window, a group)."""
    window = task.unique_key is not None and task.unique_until is not None
    return task.generated_id and task.group_id is None and not window


def _version(text: str) -> tuple[int, int]:
    parts = [*text.split("."), "0", "0"][:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return (0, 0)
