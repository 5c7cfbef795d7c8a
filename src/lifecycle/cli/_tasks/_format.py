"""Formatting helpers of the ``lifecycle tasks`` commands: durations, times, error summaries, JSON rows, and
the table of counts per queue and state (``stats`` and ``watch`` both show it)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from rich.table import Table

from ..._redact import redact, redact_tree
from ...asynctask import QueueStats, TaskInfo, TaskState

__all__ = [
    "STATE_STYLES",
    "CliError",
    "attempts_text",
    "error_note",
    "error_summary",
    "format_age",
    "format_time",
    "info_to_json",
    "option",
    "parse_duration",
    "plain_help",
    "print_json",
    "progress_text",
    "progress_to_json",
    "stats_table",
    "stats_to_json",
]

#: Exit status of a usage error (bad option, bad URL, missing extra): argparse uses 2 as well.
EXIT_USAGE = 2
#: Exit status when a task id given on the command line does not exist.
EXIT_NOT_FOUND = 3
#: Exit status when a task exists but the operation does not apply to its state.
EXIT_REFUSED = 4

#: The colour of each state in tables.
STATE_STYLES: Mapping[str, str] = {
    TaskState.PENDING.value: "cyan",
    TaskState.ACTIVE.value: "yellow",
    TaskState.SUCCEEDED.value: "green",
    TaskState.DEAD.value: "bold red",
    TaskState.CANCELLED.value: "dim",
}


class CliError(Exception):
    """An error the command reports as one line (``error: ...``) and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_T = TypeVar("_T")


def option(check: Callable[..., _T], value: object, what: str, **rules: Any) -> _T:
    """``check(value, what, **rules)`` (one of the library's validators, so an option follows the same rule
    as the argument it becomes) with a refusal turned into a :class:`CliError`: a usage error, status 2."""
    try:
        return check(value, what, **rules)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds (``90``) or amounts with units s, m, h, d, w (``7d``,
    ``1h30m``, ``1.5h``). Raises :class:`CliError` naming the accepted forms."""
    cleaned = text.strip().lower()
    try:
        seconds = float(cleaned)
    except ValueError:
        seconds = -1.0
        position = 0
        total = 0.0
        for match in _PART.finditer(cleaned):
            if match.start() != position:
                break
            total += float(match.group(1)) * _UNITS[match.group(2)]
            position = match.end()
        else:
            if position == len(cleaned) and position > 0:
                seconds = total
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise CliError(
            f"{text!r} is not a duration: write seconds (90) or amounts with units s, m, h, d, w "
            "(30m, 12h, 7d, 1h30m)"
        )
    return seconds


def format_span(seconds: float) -> str:
    """A short human span: ``45s``, ``12m``, ``3h``, ``2d``."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h".replace(".0h", "h")
    return f"{seconds / 86400:.1f}d".replace(".0d", "d")


def format_age(when: float | None, now: float | None = None) -> str:
    """``when`` relative to ``now``: ``12s ago`` or ``in 5m``; ``-`` for ``None``."""
    if when is None:
        return "-"
    now = time.time() if now is None else now
    delta = now - when
    if abs(delta) < 1:
        return "now"
    return f"{format_span(delta)} ago" if delta > 0 else f"in {format_span(delta)}"


def format_time(when: float | None, now: float | None = None) -> str:
    """Local date and time of ``when`` with its age, e.g. ``2025-03-01 12:00:05 (3m ago)``; ``-`` for
    ``None``."""
    if when is None:
        return "-"
    stamp = datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({format_age(when, now)})"


def error_summary(error: str | None) -> str:
    """One line of a stored error: the exception line of a traceback (its last line), else the first line;
    passwords of URLs and DSNs in it masked."""
    if not error:
        return ""
    lines = [line for line in redact(error).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Traceback"):
        # The exception line follows the last frame; frames and source lines are indented.
        exception_lines = [line for line in lines[1:] if not line.startswith((" ", "\t"))]
        return exception_lines[-1].strip() if exception_lines else lines[-1].strip()
    return lines[0].strip()


def error_note(info: TaskInfo) -> str:
    """The error summary of a task as a listing shows it: labelled by what it means for the task's state.

    A dead task's error is why it died; a pending or running task with an error is being retried (or was
    requeued by hand, when its attempts are back at 0); a cancelled one was cancelled after it. A
    succeeded task's error is from an earlier attempt and is left out (``show`` still has it). A record the
    backend could not read whole says so first, whatever its state.
    """
    if info.damaged:
        return f"damaged: {info.damaged}"
    summary = error_summary(info.last_error)
    if not summary or info.state is TaskState.SUCCEEDED:
        return ""
    if info.state is TaskState.DEAD:
        return summary
    if info.state is TaskState.CANCELLED:
        return f"before it was cancelled: {summary}"
    if info.attempts == 0:
        return f"requeued after: {summary}"
    if info.state is TaskState.ACTIVE:
        return f"retrying after: {summary}"
    return f"will retry after: {summary}"


def attempts_text(info: TaskInfo) -> str:
    """``"2 of 6 (4 retries left)"``: attempts made (the running one included) of the attempts allowed
    (the first run and ``max_retries`` retries); the retries left only while the task can still run."""
    text = f"{info.attempts} of {info.max_retries + 1}"
    if info.state.is_final:
        return text
    left = info.retries_left
    return f"{text} ({left} {'retry' if left == 1 else 'retries'} left)"


def plain_help(text: str) -> str:
    """A docstring made fit for ``--help``: reStructuredText markup (````code````, ``:class:`X```) removed."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("`", "")


def iso(when: float | None) -> str | None:
    """``when`` as an ISO 8601 UTC string (``None`` stays ``None``)."""
    if when is None:
        return None
    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds")


def info_to_json(info: TaskInfo, **extra: Any) -> dict[str, Any]:
    """A task as a JSON object: every :class:`TaskInfo` field (times as epoch seconds) plus ``extra``."""
    return {
        "id": info.id,
        "name": info.name,
        "queue": info.queue,
        "state": info.state.value,
        "attempts": info.attempts,
        "max_retries": info.max_retries,
        "retries_left": info.retries_left,
        "timeout": info.timeout,
        "enqueued_at": info.enqueued_at,
        "run_at": info.run_at,
        "started_at": info.started_at,
        "finished_at": info.finished_at,
        "last_error": info.last_error,
        "error_summary": error_summary(info.last_error) or None,
        "result": info.result,
        "damaged": info.damaged,
        "progress": progress_to_json(info),
        "group_id": info.group_id,
        **extra,
    }


def progress_to_json(info: TaskInfo) -> dict[str, Any] | None:
    """A task's last progress report as ``{"done", "total", "message"}``, or ``None`` before any."""
    if info.progress is None and info.progress_message is None:
        return None
    done, total = info.progress if info.progress is not None else (None, None)
    return {"done": done, "total": total, "message": info.progress_message}


def progress_text(info: TaskInfo) -> str:
    """A task's last progress report as text: ``"3 / 10 (30%) copying rows"``; ``""`` before any."""
    parts: list[str] = []
    if info.progress is not None:
        done, total = info.progress
        if done is not None and total is not None:
            parts.append(f"{done:g} / {total:g}" + (f" ({done / total:.0%})" if total > 0 else ""))
        elif done is not None or total is not None:
            parts.append(f"{'?' if done is None else f'{done:g}'} / {'?' if total is None else f'{total:g}'}")
    if info.progress_message:
        parts.append(info.progress_message)
    return " ".join(parts)


def stats_to_json(stats: Mapping[str, QueueStats]) -> dict[str, Any]:
    """Counts per queue and state, and their totals, as a JSON object."""
    states = [state.value for state in TaskState]
    queues = {queue: {state: counts[state] for state in states} for queue, counts in stats.items()}
    total = {state: sum(counts[state] for counts in queues.values()) for state in states}
    return {"queues": queues, "total": total}


def print_json(value: Any, *, indent: int | None = 2) -> None:
    """Print ``value`` as JSON on stdout (values JSON cannot hold are written as their ``repr``), with the
    passwords of any URL or DSN in its strings masked; ``indent=None``: one line (JSON lines)."""
    document = redact_tree(json.loads(json.dumps(value, default=repr)))
    print(json.dumps(document, indent=indent, ensure_ascii=False), flush=True)


def stats_table(stats: Mapping[str, QueueStats], title: str | None = None) -> Table:
    """Counts per queue (rows) and state (columns), with a total row when there are several queues."""
    table = Table(title=title, title_justify="left", show_footer=len(stats) > 1)
    totals = {state.value: sum(counts[state] for counts in stats.values()) for state in TaskState}
    table.add_column("queue", footer="total")
    for state in TaskState:
        table.add_column(
            state.value, justify="right", style=STATE_STYLES[state.value], footer=str(totals[state.value])
        )
    table.add_column("total", justify="right", style="bold", footer=str(sum(totals.values())))
    for queue, counts in stats.items():
        table.add_row(queue, *(str(counts[state]) for state in TaskState), str(counts.total))
    return table
