"""OpenTelemetry tracing of tasks (the ``otel`` extra: ``opentelemetry-api``).

``enqueue`` stores the trace context of the current span with the task (the ``"trace"`` section of its
meta: W3C ``traceparent``, and ``tracestate``/``baggage`` when set, written by the configured propagator),
and the worker runs each attempt in a span ``lifecycle.task <name>`` whose parent is that span. A chain's
next step is enqueued under the span of the step that succeeded; a retry's attempt has the enqueuer's span
as parent again, so a task's attempts and steps stay in one trace.

Nothing here imports OpenTelemetry: a tracer provider can only have been configured, and a span can only be
current, once the application imported ``opentelemetry.trace``. So every function first looks it up in
``sys.modules`` (a dict lookup), and without it, or without a configured tracer provider (the API's
default no-op/proxy one), does nothing else: no cost when the extra is not installed or not used.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import ModuleType
from typing import Any

from .._version import __version__
from ._meta import add_sections, read_meta
from ._records import NewTask, Settlement, TaskRecord, TaskState

__all__ = ["ATTEMPT_SPAN", "AttemptSpan", "Tracing", "current_trace", "with_trace"]

ATTEMPT_SPAN = "lifecycle.task"
"""The span name of an attempt is this, a space, and the task's name."""

SECTION = "trace"
"""The meta section holding the enqueuer's trace context."""

_SCOPE = "lifecycle.asynctask"


def _configured() -> tuple[ModuleType, Any] | None:
    """``opentelemetry.trace`` and the tracer provider, when the application has imported it and
    configured a provider."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None  # the API's defaults: spans would be no-ops
    return trace, provider


def current_trace() -> dict[str, str] | None:
    """The trace context of the current span, to store with an enqueued task; ``None`` when tracing is off
    or no span is current."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    # An empty context holds no span: what most enqueues find once OpenTelemetry is imported (redis-py 8
    # imports it), at a third of the cost of get_current_span() and its span context.
    context = sys.modules.get("opentelemetry.context")  # imported by opentelemetry.trace
    if context is not None and not context.get_current():
        return None
    # Then the current span: a context variable read, where the provider check reads the environment.
    if not trace.get_current_span().get_span_context().is_valid or _configured() is None:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def with_trace(tasks: Sequence[NewTask], carrier: dict[str, str] | None) -> list[NewTask]:
    """``tasks`` with ``carrier`` (from :func:`current_trace`) in their meta (unchanged when ``None``)."""
    if carrier is None:
        return list(tasks)
    return [replace(task, meta=add_sections(task.meta, **{SECTION: carrier})) for task in tasks]


class Tracing:
    """The tracer of one worker's runner, fetched again when the application replaces its provider."""

    __slots__ = ("_provider", "_tracer")

    def __init__(self) -> None:
        self._provider: object = None
        self._tracer: Any = None

    def tracer(self) -> Any:
        """The tracer to start attempt spans with, or ``None`` when tracing is off."""
        configured = _configured()
        if configured is None:
            return None
        provider = configured[1]
        if provider is not self._provider:
            self._tracer = provider.get_tracer(_SCOPE, __version__)
            self._provider = provider
        return self._tracer


class AttemptSpan:
    """The span of one attempt, as :func:`attempt_span` yields it."""

    __slots__ = ("_span", "_trace")

    def __init__(self, trace: ModuleType, span: Any) -> None:
        self._trace = trace
        self._span = span

    def finish(self, verdict: Settlement | None, error: BaseException | None) -> Settlement | None:
        """Record the attempt's outcome (and ``error``) on the span; return ``verdict`` with the chain's next
        step (if any) enqueued under this span."""
        span = self._span
        outcome = _outcome(verdict)
        span.set_attribute("lifecycle.task.outcome", outcome)
        if error is not None and outcome in ("failed", "dead"):
            span.record_exception(error)
        if outcome in ("failed", "dead"):
            description = f"{type(error).__name__}: {error}" if error is not None else outcome
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description[:200]))
        if verdict is not None and verdict.then:
            from opentelemetry import propagate

            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=self._trace.set_span_in_context(span))
            verdict = replace(verdict, then=tuple(with_trace(verdict.then, carrier or None)))
        return verdict


@contextmanager
def attempt_span(tracer: Any, record: TaskRecord) -> Iterator[AttemptSpan]:
    """Run an attempt of ``record`` in its span (current while the task runs, so the task's own spans are
    its children), parented by the enqueuer's span stored with the task."""
    trace = sys.modules["opentelemetry.trace"]
    parent = None
    carrier = _stored_trace(record)
    if carrier is not None:
        from opentelemetry import propagate

        parent = propagate.extract(carrier)
    with tracer.start_as_current_span(
        f"{ATTEMPT_SPAN} {record.name}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "lifecycle.task.id": record.id,
            "lifecycle.task.name": record.name,
            "lifecycle.task.queue": record.queue,
            "lifecycle.task.attempt": record.attempts,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield AttemptSpan(trace, span)


def _stored_trace(record: TaskRecord) -> dict[str, str] | None:
    try:
        section = read_meta(record.meta).get(SECTION)
    except ValueError:  # damaged meta: the attempt runs without a parent; the engine decides the rest
        return None
    if not isinstance(section, dict):
        return None
    return {str(key): str(value) for key, value in section.items()}


def _outcome(verdict: Settlement | None) -> str:
    """``succeeded``, ``failed`` (a retry follows), ``dead``, ``released`` (shutdown: back to pending, the
    attempt not counted) or ``lost`` (the lease was taken over: the verdict is not ours)."""
    if verdict is None:
        return "lost"
    if verdict.state is TaskState.PENDING:
        return "released" if verdict.refund_attempt else "failed"
    return str(verdict.state.value)
