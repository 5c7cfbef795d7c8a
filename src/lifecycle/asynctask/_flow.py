"""Flow control on the engine's side: the options checked at ``register`` and ``enqueue`` (rate limits,
concurrency limits, priorities, concurrency keys, uniqueness windows, debounce, expiry) and the reasons a
due task waits, read back for inspection. The rules themselves are enforced by the backends, in the claim.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta

from .._checks import check_count, check_name, check_seconds
from ._backend import Backend
from ._clock import as_epoch
from ._model import FlowStats, TaskFlow
from ._records import FlowLimits, FlowState, TaskRecord, TaskState

__all__ = [
    "PRIORITY_BOUND",
    "WAITING_REASONS",
    "build_limits",
    "check_concurrency_key",
    "check_priority",
    "expiry_time",
    "flow_stats",
    "parse_rate",
    "rate_text",
    "unique_key",
    "waiting_on",
]

PRIORITY_BOUND = 10**15
"""Priorities lie strictly between ``-PRIORITY_BOUND`` and ``PRIORITY_BOUND`` (exact in every store)."""

WAITING_REASONS = ("paused", "rate_limit", "max_running", "max_running_per_key")
"""What can hold back a due task, in the order :func:`waiting_on` checks them."""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"(\d+)?/(\d+(?:\.\d+)?)?([smh])")
_RATE_HELP = (
    'a number of starts per period, like "100/s", "30/m", "1000/h" or "100/10s" (a whole number >= 1, '
    'then "/", an optional length and s, m or h)'
)


def parse_rate(text: object, where: str) -> tuple[int, float]:
    """``"100/s"`` -> ``(100, 1.0)``; ``"/m"`` -> ``(1, 60.0)``; ``"100/10s"`` -> ``(100, 10.0)``.

    Raises ``TypeError`` for a non-string, ``ValueError`` naming ``where``, the value and the accepted form.
    """
    if not isinstance(text, str):
        raise TypeError(f"{where}: rate_limit must be a string such as '100/s', got {text!r}")
    match = _RATE.fullmatch(text.replace(" ", ""))
    if match is None:
        raise ValueError(f"{where}: rate_limit must be {_RATE_HELP}; got {text!r}")
    count = 1 if match.group(1) is None else int(match.group(1))
    length = 1.0 if match.group(2) is None else float(match.group(2))
    per = length * _UNITS[match.group(3)]
    if count < 1 or not per > 0:
        raise ValueError(
            f"{where}: rate_limit must allow at least 1 start in a period longer than 0; got {text!r}"
        )
    return count, per


def rate_text(limits: FlowLimits) -> str | None:
    """The rate of ``limits`` as the text ``register`` takes (``"100/s"``, ``"100/10s"``), or ``None``."""
    if limits.rate is None or limits.per is None:
        return None
    per = limits.per
    for unit, seconds in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if per == seconds:
            return f"{limits.rate}/{unit}"
    return f"{limits.rate}/{per:g}s"


def build_limits(
    rate_limit: object, max_running: object, max_running_per_key: object, where: str
) -> FlowLimits | None:
    """The :class:`FlowLimits` of a registration, every value checked; ``None`` when it sets none."""
    rate = per = None
    if rate_limit is not None:
        rate, per = parse_rate(rate_limit, where)
    running = None if max_running is None else check_count(max_running, f"{where}: max_running", minimum=1)
    per_key = (
        None
        if max_running_per_key is None
        else check_count(max_running_per_key, f"{where}: max_running_per_key", minimum=1)
    )
    if rate is None and running is None and per_key is None:
        return None
    return FlowLimits(rate=rate, per=per, max_running=running, max_running_per_key=per_key)


def check_priority(value: object, where: str) -> int:
    """``value`` as a priority: an ``int`` (not ``bool``) strictly between -10**15 and 10**15."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: priority must be a whole number (higher runs first), got {value!r}")
    if not -PRIORITY_BOUND < value < PRIORITY_BOUND:
        raise ValueError(
            f"{where}: priority must lie strictly between -{PRIORITY_BOUND} and {PRIORITY_BOUND} (higher "
            f"runs first), got {value!r}"
        )
    return value


def check_concurrency_key(value: object, where: str) -> str:
    """``value`` as a concurrency key: a non-empty string without NUL."""
    return check_name(value, f"{where}: concurrency_key")


def expiry_time(expires: object, now: float, run_at: float, where: str) -> float:
    """The ``expires_at`` of an enqueue: ``now`` plus seconds (a number or ``timedelta``), or an aware
    ``datetime``; ``ValueError`` when it is not after the task's start time (it could never run)."""
    if isinstance(expires, datetime):
        expires_at = as_epoch(expires, f"{where}: expires")
    elif isinstance(expires, int | float | timedelta) and not isinstance(expires, bool):
        expires_at = now + check_seconds(expires, f"{where}: expires")
    else:
        raise TypeError(
            f"{where}: expires must be seconds from now (a number or timedelta) or an aware datetime, "
            f"got {expires!r}"
        )
    if expires_at <= run_at:
        raise ValueError(
            f"{where}: expires ({expires!r}) is not after the task's start time, so it could never run: "
            "make expires later than delay/at/debounce"
        )
    return expires_at


def unique_key(task_id: str | None, name: str, payload: bytes) -> str:
    """The key of a uniqueness window: the task id when given, else the name and a hash of the payload."""
    if task_id is not None:
        return f"id:{task_id}"
    return f"call:{name}:{hashlib.sha256(payload).hexdigest()}"


def waiting_on(
    record: TaskRecord,
    now: float,
    paused: Collection[str],
    limits: FlowLimits | None,
    state: FlowState | None,
) -> str | None:
    """Why the due pending task ``record`` has not started: one of :data:`WAITING_REASONS`, or ``None``
    (not due, not pending, or nothing holds it back). ``state`` is :meth:`Backend.flow_state` for its
    name and key under ``limits``."""
    if record.state is not TaskState.PENDING or record.run_at > now:
        return None
    if record.queue in paused:
        return "paused"
    if limits is None or state is None:
        return None
    if limits.rate is not None and state.tokens is not None and state.tokens < 1.0:
        return "rate_limit"
    if limits.max_running is not None and state.running >= limits.max_running:
        return "max_running"
    if (
        limits.max_running_per_key is not None
        and record.concurrency_key is not None
        and state.running_for_key >= limits.max_running_per_key
    ):
        return "max_running_per_key"
    return None


async def flow_stats(
    backend: Backend, limits: Mapping[str, FlowLimits], now: float, sample: int
) -> FlowStats:
    """Paused queues, and per task name the limits in force and how many due tasks wait on each (read from
    the ``sample`` most recently enqueued pending tasks); see :meth:`AsyncTasks.flow`."""
    paused = await backend.paused()
    names: dict[str, FlowState] = {}
    for name, name_limits in sorted(limits.items()):
        names[name] = await backend.flow_state(name, None, now=now, limits=name_limits)
    running_keys: dict[tuple[str, str], int] = {}
    if any(each.max_running_per_key is not None for each in limits.values()):
        for record in await backend.list_records(states=[TaskState.ACTIVE], limit=100_000):
            if record.concurrency_key is not None and record.name in limits:
                key = (record.name, record.concurrency_key)
                running_keys[key] = running_keys.get(key, 0) + 1
    pending = await backend.list_records(states=[TaskState.PENDING], limit=sample)
    waiting: dict[str, dict[str, int]] = {}
    for record in pending:
        flow = limits.get(record.name)
        state = names.get(record.name)
        if state is not None and record.concurrency_key is not None:
            count = running_keys.get((record.name, record.concurrency_key), 0)
            state = FlowState(state.running, count, state.tokens, state.refused)
        reason = waiting_on(record, now, paused, flow, state)
        if reason is not None:
            per_name = waiting.setdefault(record.name, {})
            per_name[reason] = per_name.get(reason, 0) + 1
    tasks: dict[str, TaskFlow] = {}
    for name in sorted(set(names) | set(waiting)):
        flow = limits.get(name)
        state = names.get(name)
        tasks[name] = TaskFlow(
            name=name,
            rate_limit=None if flow is None else rate_text(flow),
            max_running=None if flow is None else flow.max_running,
            max_running_per_key=None if flow is None else flow.max_running_per_key,
            running=None if state is None else state.running,
            tokens=None if state is None else state.tokens,
            refused=None if state is None else state.refused,
            waiting=dict(
                sorted(waiting.get(name, {}).items(), key=lambda item: WAITING_REASONS.index(item[0]))
            ),
        )
    return FlowStats(
        paused=frozenset(paused), tasks=tasks, sampled=len(pending), complete=len(pending) < sample
    )
