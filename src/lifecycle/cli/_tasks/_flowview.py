"""What ``stats``, ``watch`` and ``--json`` show of flow control: the paused queues and, per task name, the
limits in force and how many due tasks wait on each.

The limits are registered in code, so they are known only with ``--app MODULE:ATTR`` (the app's
registrations); with ``--backend`` alone the paused queues and the tasks waiting on them still show. The
waiting counts are read from the most recently enqueued pending tasks (:data:`SAMPLE` of them); the JSON says
whether that was all of them.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ...asynctask import AsyncTasks, FlowStats
from ...asynctask._backend import supports_flow_control
from ...asynctask._flow import WAITING_REASONS, flow_stats

__all__ = ["SAMPLE", "flow_to_json", "read_flow", "render_flow"]

#: How many pending tasks (the most recently enqueued) the waiting counts are read from.
SAMPLE = 1000


async def read_flow(tasks: AsyncTasks, app: AsyncTasks | None) -> FlowStats:
    """The flow of the store of ``tasks``, with the limits registered in ``app`` (``--app``; none without
    it)."""
    if not supports_flow_control(tasks.backend):
        return FlowStats(paused=frozenset(), tasks={}, sampled=0, complete=True)
    registered = app if app is not None else tasks
    limits = registered._registry.flow_limits()
    return await flow_stats(tasks.backend, limits, registered._clock(), SAMPLE)


def flow_to_json(flow: FlowStats, *, limits_known: bool) -> dict[str, Any]:
    """The ``paused`` queues and the ``flow`` per task name, as JSON members."""
    return {
        "paused": sorted(flow.paused),
        "flow": {
            name: {
                "rate_limit": each.rate_limit,
                "max_running": each.max_running,
                "max_running_per_key": each.max_running_per_key,
                "running": each.running,
                "tokens": each.tokens,
                "refused_by_rate_limit": each.refused,
                "waiting": {reason: each.waiting.get(reason, 0) for reason in WAITING_REASONS},
            }
            for name, each in flow.tasks.items()
        },
        "flow_read": {"pending_tasks": flow.sampled, "complete": flow.complete, "limits_known": limits_known},
    }


def render_flow(flow: FlowStats, *, limits_known: bool) -> RenderableType | None:
    """The paused queues and a table of the limited (or waiting) task names; ``None`` when there is
    nothing to show."""
    parts: list[RenderableType] = []
    if flow.paused:
        parts.append(Text.assemble(("paused queues: ", "bold yellow"), ", ".join(sorted(flow.paused))))
    if flow.tasks:
        table = Table(title="flow control per task", title_justify="left")
        table.add_column("task")
        table.add_column("rate limit", justify="right")
        table.add_column("max running", justify="right")
        table.add_column("per key", justify="right")
        table.add_column("running", justify="right")
        table.add_column("tokens", justify="right")
        table.add_column("waiting on", overflow="fold")
        for name, each in flow.tasks.items():
            waiting = ", ".join(f"{reason} {count}" for reason, count in each.waiting.items() if count)
            table.add_row(
                name,
                each.rate_limit or "-",
                "-" if each.max_running is None else str(each.max_running),
                "-" if each.max_running_per_key is None else str(each.max_running_per_key),
                "-" if each.running is None else str(each.running),
                "-" if each.tokens is None else f"{each.tokens:.1f}",
                waiting or "nothing",
            )
        parts.append(table)
        if not flow.complete:
            parts.append(
                Text(f"(waiting counts read from the {flow.sampled} newest pending tasks)", style="dim")
            )
    if not limits_known and (parts or flow.sampled):
        parts.append(Text("limits are registered in code: pass --app MODULE:ATTR to see them", style="dim"))
    return Group(*parts) if parts else None
