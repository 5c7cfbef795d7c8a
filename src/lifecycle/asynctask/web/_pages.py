"""The dashboard's pages as HTML, built with :func:`render` (every value escaped unless it is markup).

Each page is whole and readable without JavaScript; the parts that change (marked ``data-live``, each with
an ``id``) are what the page's script replaces when it polls the same URL. Times are written in UTC inside
``<time>`` elements (with the UTC time as their title); the script shows them in the viewer's time zone.
Texts that may quote a connection string (errors, arguments, results) pass through ``redact``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from urllib.parse import urlencode

from ..._redact import redact
from ...asynctask import ChainInfo, GroupInfo, QueueStats, ScheduleInfo, TaskInfo, TaskRecord, TaskState
from ._access import Mode
from ._data import (
    CHART_BUCKETS,
    FINAL_STATES,
    Decoded,
    Overview,
    QueueRow,
    TaskDetail,
    TaskPage,
    Throughput,
)
from ._html import Markup, html_join, render

__all__ = ["Layout", "error_page", "not_found_page", "overview_page", "task_page", "tasks_page"]

_STATES = tuple(state.value for state in TaskState)
_ACTION_LABELS = {
    Mode.READ_ONLY: "read-only",
    Mode.TOKEN: "actions need the token",
    Mode.LOOPBACK: "actions from this machine",
}


class Layout:
    """What every page shares: the title, the URL prefix the app is mounted at, the access mode, the
    backend's (redacted) description and the static files' version."""

    def __init__(self, *, title: str, base: str, mode: Mode, backend: str, asset_version: str) -> None:
        self.title = title
        self.base = base
        self.mode = mode
        self.backend = backend
        self.asset_version = asset_version

    @property
    def actions(self) -> bool:
        """Whether the pages show action buttons."""
        return self.mode is not Mode.READ_ONLY

    def url(self, path: str, **query: object) -> str:
        """``path`` under the app's prefix, with the query parameters that are not ``None``/empty."""
        pairs = [(key, str(value)) for key, value in query.items() if value not in (None, "")]
        return f"{self.base}{path}" + (f"?{urlencode(pairs)}" if pairs else "")

    def page(self, heading: str, body: Markup, *, nav: str, status: int = 200) -> tuple[int, Markup]:
        """The whole document around ``body``."""
        token_box = Markup("")
        if self.mode is Mode.TOKEN:
            token_box = render(
                '<form id="token-form" class="token needs-js" autocomplete="off">'
                '<label for="token-input">Token</label>'
                '<input id="token-input" name="token" type="password" autocomplete="off" '
                'placeholder="token for actions">'
                '<button type="submit" id="token-unlock">Unlock actions</button>'
                '<button type="button" id="token-lock" hidden>Lock</button></form>'
            )
        document = render(
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">'
            "<title>{page_title}</title>"
            '<link rel="stylesheet" href="{css}"><script src="{js}" defer></script></head>'
            '<body data-mode="{mode}" data-base="{base}">'
            '<header><a class="brand" href="{home}">{title}</a><nav>'
            '<a href="{home}"{overview_current}>Overview</a>'
            '<a href="{list}"{tasks_current}>Tasks</a></nav>'
            '<form class="search" method="get" action="{task_url}" role="search">'
            '<input name="id" placeholder="task id" aria-label="task id" required>'
            "<button>Find</button></form>{token_box}</header>"
            '<main><div id="flash" role="status" aria-live="polite"></div>'
            '<noscript><p class="note">Without JavaScript the page does not update itself and actions '
            "are off; reload to refresh.</p></noscript>"
            "<h1>{heading}</h1>{body}</main>"
            '<footer><span class="backend">{backend}</span> · <span class="mode">{mode_label}</span> · '
            '<span id="live-status">updated <time datetime="{now_iso}" title="{now_utc}">{now_utc}</time>'
            "</span></footer>"
            '<dialog id="confirm"><form method="dialog"><p id="confirm-text"></p><div class="buttons">'
            '<button value="cancel" id="confirm-cancel">Cancel</button>'
            '<button value="ok" id="confirm-ok" class="danger">Confirm</button></div></form></dialog>'
            "</body></html>\n",
            page_title=f"{heading} · {self.title}",
            css=self.url("/static/dashboard.css", v=self.asset_version),
            js=self.url("/static/dashboard.js", v=self.asset_version),
            mode=self.mode.value,
            base=self.base,
            home=self.url("/"),
            list=self.url("/tasks"),
            task_url=self.url("/task"),
            title=self.title,
            overview_current=Markup(' aria-current="page"' if nav == "overview" else ""),
            tasks_current=Markup(' aria-current="page"' if nav == "tasks" else ""),
            token_box=token_box,
            heading=heading,
            body=body,
            backend=self.backend,
            mode_label=_ACTION_LABELS[self.mode],
            now_iso=_iso(time.time()),
            now_utc=_utc(time.time()),
        )
        return status, document


# -- the overview -------------------------------------------------------------------------------------------


def overview_page(layout: Layout, overview: Overview) -> tuple[int, Markup]:
    """Counts per queue, the chart of the last hour, running tasks, recent failures and schedules."""
    body = html_join(
        [
            _queues_section(layout, overview),
            _chart_section(overview.throughput),
            _active_section(layout, overview.active, overview.now),
            _failures_section(layout, overview.failures),
            _schedules_section(layout, overview.schedules, overview.now),
        ]
    )
    return layout.page("Overview", body, nav="overview")


def _queues_section(layout: Layout, overview: Overview) -> Markup:
    if not overview.queues:
        rows = render('<tr><td colspan="11" class="empty">no tasks are stored</td></tr>')
    else:
        rows = html_join(_queue_row(layout, row) for row in overview.queues)
    totals = overview.totals
    pauses = any(row.paused is not None for row in overview.queues)
    return render(
        '<section id="queues" data-live><h2>Queues</h2><div class="scroll"><table class="queues">'
        "<thead><tr><th>Queue</th>"
        '<th class="num">Pending</th>'
        '<th class="num sub" title="pending tasks waiting for their delay or time">scheduled</th>'
        '<th class="num sub" title="pending tasks waiting to retry after a failed attempt">retrying</th>'
        '<th class="num">Active</th><th class="num">Dead</th><th class="num">Succeeded</th>'
        '<th class="num">Cancelled</th><th>Paused</th><th>Actions</th></tr></thead>'
        "<tbody>{rows}</tbody>"
        '<tfoot><tr data-queue-total><th>all queues</th><td class="num" data-count="pending">{pending}</td>'
        '<td></td><td></td><td class="num" data-count="active">{active}</td>'
        '<td class="num" data-count="dead">{dead}</td><td class="num" data-count="succeeded">{succeeded}</td>'
        '<td class="num" data-count="cancelled">{cancelled}</td><td></td><td></td></tr></tfoot>'
        "</table></div>{note}</section>",
        rows=rows,
        pending=totals.pending,
        active=totals.active,
        dead=totals.dead,
        succeeded=totals.succeeded,
        cancelled=totals.cancelled,
        note=Markup("")
        if pauses
        else render('<p class="note">Pausing queues is not available in this version of the store.</p>'),
    )


def _queue_row(layout: Layout, row: QueueRow) -> Markup:
    counts = row.counts

    def count(state: str) -> Markup:
        number = counts[state]
        link = layout.url("/tasks", queue=row.name, state=state)
        return render(
            '<td class="num{zero}" data-count="{state}"><a href="{link}">{number}</a></td>',
            zero=" zero" if number == 0 else "",
            state=state,
            link=link,
            number=number,
        )

    bound = "" if row.breakdown_exact else "≥ "
    lower = "" if row.breakdown_exact else " (at least: counted among the newest pending tasks)"
    if row.paused is None:
        paused = render('<td class="paused unknown" title="pausing is not available">&ndash;</td>')
    else:
        paused = render(
            '<td class="paused" data-paused="{flag}">{text}</td>',
            flag="yes" if row.paused else "no",
            text="paused" if row.paused else "no",
        )
    return render(
        '<tr data-queue="{name}"><th scope="row"><a href="{link}">{name}</a></th>{pending}'
        '<td class="num sub" data-count="scheduled" title="{scheduled_title}">{bound}{scheduled}</td>'
        '<td class="num sub" data-count="retrying" title="{retrying_title}">{bound}{retrying}</td>'
        '{active}{dead}{succeeded}{cancelled}{paused}<td class="actions">{actions}</td></tr>',
        name=row.name,
        link=layout.url("/tasks", queue=row.name),
        pending=count("pending"),
        bound=bound,
        scheduled=row.scheduled,
        scheduled_title=f"delayed pending tasks{lower}",
        retrying=row.retrying,
        retrying_title=f"pending tasks waiting for a retry{lower}",
        active=count("active"),
        dead=count("dead"),
        succeeded=count("succeeded"),
        cancelled=count("cancelled"),
        paused=paused,
        actions=_queue_actions(layout, row),
    )


def _queue_actions(layout: Layout, row: QueueRow) -> Markup:
    if not layout.actions:
        return Markup("")
    counts = row.counts
    buttons: list[Markup] = []
    if counts.dead:
        buttons.append(
            _button(
                "requeue_dead",
                "Requeue dead",
                f"Requeue all {counts.dead} dead task(s) of queue {row.name!r}? They run again from "
                "attempt 1.",
                queue=row.name,
            )
        )
    finished = counts.succeeded + counts.dead + counts.cancelled
    if finished:
        buttons.append(
            _button(
                "purge_finished",
                "Purge finished",
                f"Delete the finished tasks of queue {row.name!r} for good: {counts.succeeded} succeeded, "
                f"{counts.dead} dead and {counts.cancelled} cancelled?",
                queue=row.name,
                danger=True,
            )
        )
    if row.paused is not None:  # the store can pause queues
        if row.paused:
            buttons.append(_button("resume", "Resume", f"Resume queue {row.name!r}?", queue=row.name))
        else:
            buttons.append(
                _button(
                    "pause",
                    "Pause",
                    f"Pause queue {row.name!r}? No worker starts its tasks until it is resumed.",
                    queue=row.name,
                )
            )
    return html_join(buttons, " ")


def _button(action: str, label: str, confirm: str, *, danger: bool = False, **target: str) -> Markup:
    attributes = html_join(
        (render(' data-{key}="{value}"', key=key, value=value) for key, value in target.items())
    )
    return render(
        '<button type="button" class="action{danger}" data-action="{action}" data-confirm="{confirm}"'
        "{attributes}>{label}</button>",
        danger=" danger" if danger else "",
        action=action,
        confirm=confirm,
        attributes=attributes,
        label=label,
    )


def _chart_section(throughput: Throughput) -> Markup:
    return render(
        '<section id="throughput" data-live><h2>Last hour</h2>{summary}{chart}</section>',
        summary=_chart_summary(throughput),
        chart=chart_svg(throughput),
    )


def _chart_summary(throughput: Throughput) -> Markup:
    finished = throughput.finished
    at_least = "" if throughput.complete else "at least "
    rate = throughput.failure_rate
    failure: Markup | str = Markup("&ndash;") if rate is None else f"{rate * 100:.1f} %"
    note = Markup("")
    if not throughput.complete:
        note = render(
            ' <span class="note">(counted among the {read} newest finished tasks)</span>',
            read=throughput.read,
        )
    return render(
        '<p class="summary"><span data-metric="finished">{at_least}{finished}</span> finished '
        '(<span data-metric="per-minute">{per_minute}</span>/min), '
        '<span data-metric="dead">{dead}</span> dead: failure rate '
        '<span data-metric="failure-rate">{failure}</span>{note}</p>',
        at_least=at_least,
        finished=finished,
        per_minute=f"{finished / 60:.1f}",
        dead=sum(throughput.dead),
        failure=failure,
        note=note,
    )


def chart_svg(throughput: Throughput) -> Markup:
    """A bar chart of the finished tasks per bucket (succeeded below, dead on top), with a title per bar."""
    width, height, gap, top, bottom = 600, 130, 4, 18, 18
    bar = (width - gap * (CHART_BUCKETS + 1)) / CHART_BUCKETS
    highest = max((s + d for s, d in zip(throughput.succeeded, throughput.dead, strict=True)), default=0)
    scale = (height - top - bottom) / highest if highest else 0.0
    bars: list[Markup] = []
    for index, (succeeded, dead) in enumerate(zip(throughput.succeeded, throughput.dead, strict=True)):
        x = gap + index * (bar + gap)
        start = throughput.start + index * throughput.bucket
        ok_height = succeeded * scale
        dead_height = dead * scale
        base = height - bottom
        title = (
            f"{_clock(start)} to {_clock(start + throughput.bucket)} UTC: {succeeded} succeeded, {dead} dead"
        )
        bars.append(
            render(
                "<g><title>{title}</title>"
                '<rect class="bucket" x="{x}" y="{top}" width="{w}" height="{full}"></rect>'
                '<rect class="ok" x="{x}" y="{ok_y}" width="{w}" height="{ok_h}"></rect>'
                '<rect class="dead" x="{x}" y="{dead_y}" width="{w}" height="{dead_h}"></rect></g>',
                title=title,
                x=f"{x:.1f}",
                top=top,
                w=f"{bar:.1f}",
                full=height - top - bottom,
                ok_y=f"{base - ok_height:.1f}",
                ok_h=f"{ok_height:.1f}",
                dead_y=f"{base - ok_height - dead_height:.1f}",
                dead_h=f"{dead_height:.1f}",
            )
        )
    return render(
        '<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{label}">{bars}'
        '<text x="{gap}" y="{text_y}" class="axis">&minus;60 min</text>'
        '<text x="{right}" y="{text_y}" class="axis" text-anchor="end">now</text>'
        '<text x="{gap}" y="{top_y}" class="axis">highest bar: {highest} tasks in 5 min</text></svg>',
        width=width,
        height=height,
        label=f"tasks finished per 5 minutes over the last hour: {throughput.finished}",
        bars=html_join(bars),
        gap=gap,
        right=width - gap,
        text_y=height - 4,
        top_y=top - 6,
        highest=highest,
    )


def _active_section(layout: Layout, records: Sequence[TaskRecord], now: float) -> Markup:
    if not records:
        rows = render('<tr><td colspan="6" class="empty">no task is running</td></tr>')
    else:
        rows = html_join(
            render(
                '<tr data-task="{id}"><td>{link}</td><td>{name}</td><td>{queue}</td><td>{attempts}</td>'
                "<td>{started}</td><td>{lease}</td></tr>",
                id=record.id,
                link=_task_link(layout, record.id),
                name=record.name,
                queue=record.queue,
                attempts=f"{record.attempts} / {record.max_retries + 1}",
                started=_time(record.started_at, now),
                lease=_lease(record.lease_until, now),
            )
            for record in records
        )
    return render(
        '<section id="active" data-live><h2>Running now</h2><p class="note">Workers are not listed by the '
        "store; each running task's lease is renewed by its worker's heartbeat (an expired lease means the "
        "worker stopped: the task is recovered).</p>"
        '<div class="scroll"><table><thead><tr><th>Task</th><th>Name</th><th>Queue</th><th>Attempt</th>'
        "<th>Started</th><th>Lease (heartbeat)</th></tr></thead><tbody>{rows}</tbody></table></div>"
        "</section>",
        rows=rows,
    )


def _lease(lease_until: float | None, now: float) -> Markup:
    if lease_until is None:
        return Markup("&ndash;")
    if lease_until < now:
        return render(
            '<span class="expired">expired</span> at {time}',
            time=_time(lease_until, now),
        )
    return render("renewed until {time}", time=_time(lease_until, now))


def _failures_section(layout: Layout, failures: Sequence[TaskInfo]) -> Markup:
    if not failures:
        rows = render('<tr><td colspan="5" class="empty">no dead tasks</td></tr>')
    else:
        rows = html_join(
            render(
                '<tr data-task="{id}"><td>{link}</td><td>{name}</td><td>{queue}</td><td>{finished}</td>'
                '<td class="error">{error}</td></tr>',
                id=info.id,
                link=_task_link(layout, info.id),
                name=info.name,
                queue=info.queue,
                finished=_time(info.finished_at, None),
                error=error_summary(info.last_error),
            )
            for info in failures
        )
    return render(
        '<section id="failures" data-live><h2>Recent failures</h2><div class="scroll"><table><thead><tr>'
        "<th>Task</th><th>Name</th><th>Queue</th><th>Died</th><th>Error</th></tr></thead><tbody>{rows}"
        '</tbody></table></div><p><a href="{all}">all dead tasks</a></p></section>',
        rows=rows,
        all=layout.url("/tasks", state="dead"),
    )


def _schedules_section(layout: Layout, schedules: Sequence[ScheduleInfo], now: float) -> Markup:
    if not schedules:
        return render(
            '<section id="schedules" data-live><h2>Schedules</h2><p class="note">No schedules are declared '
            "here: schedules live in code, so the dashboard lists them when it is given the AsyncTasks that "
            "declares them (<code>dashboard(tasks)</code>, or <code>lifecycle tasks --app MODULE:ATTR web"
            "</code>).</p></section>"
        )
    rows = html_join(
        render(
            '<tr data-schedule="{name}"><td>{name}</td><td>{task}</td><td>{queue}</td><td>{trigger}</td>'
            "<td>{next}</td><td>{last}</td></tr>",
            name=info.name,
            task=info.task_name,
            queue=info.queue,
            trigger=f"cron {info.spec} ({info.timezone})" if info.kind == "cron" else f"every {info.spec} s",
            next=_time(info.next_fire, now),
            last=Markup("&ndash;")
            if info.last_fire is None
            else render(
                '<a href="{link}">{time}</a>',
                link=layout.url("/task", id=info.task_id(info.last_fire)),
                time=_time(info.last_fire, None),
            ),
        )
        for info in schedules
    )
    return render(
        '<section id="schedules" data-live><h2>Schedules</h2><div class="scroll"><table><thead><tr>'
        "<th>Name</th><th>Task</th><th>Queue</th><th>When</th><th>Next fire</th><th>Last fire</th></tr>"
        "</thead><tbody>{rows}</tbody></table></div></section>",
        rows=rows,
    )


# -- task lists ---------------------------------------------------------------------------------------------


def tasks_page(
    layout: Layout,
    page: TaskPage,
    *,
    queues: Iterable[str],
    queue: str | None,
    state: str | None,
    name: str | None,
    stats: QueueStats | None,
) -> tuple[int, Markup]:
    """A filter form, one page of tasks (newest first) and the links to the next page."""
    queue_options = html_join(
        render('<option value="{value}"{selected}>{value}</option>', value=q, selected=_selected(q == queue))
        for q in sorted({*queues, *([queue] if queue else [])})
    )
    state_options = html_join(
        render('<option value="{value}"{selected}>{value}</option>', value=s, selected=_selected(s == state))
        for s in _STATES
    )
    form = render(
        '<form class="filters" method="get" action="{action}">'
        '<label>Queue <select name="queue"><option value="">any</option>{queues}</select></label>'
        '<label>State <select name="state"><option value="">any</option>{states}</select></label>'
        '<label>Name <input name="name" value="{name}" placeholder="part of the task name"></label>'
        "<button>Filter</button></form>",
        action=layout.url("/tasks"),
        queues=queue_options,
        states=state_options,
        name=name or "",
    )
    if page.rows:
        rows = html_join(_task_row(layout, info) for info in page.rows)
    else:
        rows = render('<tr><td colspan="9" class="empty">no tasks match</td></tr>')
    links: list[Markup] = []
    if page.offset:
        links.append(
            render(
                '<a href="{href}">newest</a>', href=layout.url("/tasks", queue=queue, state=state, name=name)
            )
        )
    if page.next_offset is not None:
        links.append(
            render(
                '<a href="{href}" rel="next">older →</a>',
                href=layout.url("/tasks", queue=queue, state=state, name=name, offset=page.next_offset),
            )
        )
    scanned = Markup("")
    if name:
        scanned = render(
            '<p class="note">The name filter reads the tasks newest first: {count} read for this page.</p>',
            count=page.scanned,
        )
    bulk = _bulk_actions(layout, queue, state, stats)
    body = render(
        '{form}<section id="task-list" data-live>{bulk}<div class="scroll"><table class="tasks"><thead><tr>'
        "<th>Task</th><th>Name</th><th>Queue</th><th>State</th><th>Attempts</th><th>Enqueued</th>"
        "<th>Finished</th><th>Last error</th><th>Actions</th></tr></thead><tbody>{rows}</tbody></table></div>"
        '<nav class="pager">{links}</nav>{scanned}</section>',
        form=form,
        bulk=bulk,
        rows=rows,
        links=html_join(links, " · "),
        scanned=scanned,
    )
    heading = "Tasks" + (f" of queue {queue}" if queue else "") + (f" · {state}" if state else "")
    return layout.page(heading, body, nav="tasks")


def _bulk_actions(layout: Layout, queue: str | None, state: str | None, stats: QueueStats | None) -> Markup:
    if not layout.actions or queue is None or stats is None:
        return Markup("")
    buttons: list[Markup] = []
    if state == TaskState.DEAD.value and stats.dead:
        buttons.append(
            _button(
                "requeue_dead",
                f"Requeue all {stats.dead} dead",
                f"Requeue all {stats.dead} dead task(s) of queue {queue!r}?",
                queue=queue,
            )
        )
    if state in {s.value for s in FINAL_STATES} and stats[state]:
        buttons.append(
            _button(
                "purge_finished",
                f"Purge all {stats[state]} {state}",
                f"Delete all {stats[state]} {state} task(s) of queue {queue!r} for good?",
                queue=queue,
                state=state,
                danger=True,
            )
        )
    return render('<p class="bulk">{buttons}</p>', buttons=html_join(buttons, " ")) if buttons else Markup("")


def _task_row(layout: Layout, info: TaskInfo) -> Markup:
    return render(
        '<tr data-task="{id}"><td>{link}</td><td>{name}</td><td>{queue}</td><td>{state}</td>'
        '<td>{attempts}</td><td>{enqueued}</td><td>{finished}</td><td class="error">{error}</td>'
        '<td class="actions">{actions}</td></tr>',
        id=info.id,
        link=_task_link(layout, info.id),
        name=info.name,
        queue=info.queue,
        state=_state(info.state),
        attempts=f"{info.attempts} / {info.max_retries + 1}",
        enqueued=_time(info.enqueued_at, None),
        finished=_time(info.finished_at, None),
        error=error_summary(info.last_error),
        actions=_task_actions(layout, info),
    )


def _task_actions(layout: Layout, info: TaskInfo) -> Markup:
    if not layout.actions:
        return Markup("")
    if info.state in (TaskState.DEAD, TaskState.CANCELLED):
        return _button("requeue", "Requeue", f"Requeue task {info.id} ({info.name})?", task=info.id)
    if info.state is TaskState.PENDING:
        return _button("cancel", "Cancel", f"Cancel task {info.id} ({info.name})?", task=info.id, danger=True)
    if info.state is TaskState.ACTIVE:
        return _button(
            "cancel",
            "Cancel",
            f"Stop the running task {info.id} ({info.name})? Its worker stops it and it ends cancelled, "
            "not retried.",
            task=info.id,
            danger=True,
        )
    return Markup("")


# -- one task -----------------------------------------------------------------------------------------------


def task_page(layout: Layout, detail: TaskDetail, now: float) -> tuple[int, Markup]:
    """Every field of one task, its arguments, result, last error and chain."""
    info = detail.info
    attempts = f"{info.attempts} of {info.max_retries + 1}"
    if not info.state.is_final:
        attempts += f" ({info.retries_left} retries left)"
    fields: list[tuple[str, Markup | str]] = [
        ("id", render('<code data-field="id">{id}</code>', id=info.id)),
        ("name", info.name),
        (
            "queue",
            render(
                '<a href="{href}">{queue}</a>', href=layout.url("/tasks", queue=info.queue), queue=info.queue
            ),
        ),
        ("state", _state(info.state)),
        ("attempts", attempts),
        ("timeout", Markup("&ndash;") if info.timeout is None else f"{info.timeout:g} s"),
        ("enqueued", _time(info.enqueued_at, None)),
        ("next run" if info.state is TaskState.PENDING else "run at", _time(info.run_at, now)),
        ("started", _time(info.started_at, None)),
        ("finished", _time(info.finished_at, None)),
    ]
    if info.progress is not None or info.progress_message is not None:
        fields.append(("progress", _progress(info)))
    if info.group_id is not None:
        fields.append(("group", _group_field(detail.group, info)))
    if info.schedule:
        fields.append(("schedule", info.schedule))
    if info.chain_id:
        fields.append(
            (
                "chain",
                render(
                    '<a href="{href}">{id}</a> step {step}',
                    href=layout.url("/task", id=info.chain_id),
                    id=info.chain_id,
                    step=info.chain_step,
                ),
            )
        )
    field_rows = html_join(
        render('<tr data-field="{key}"><th scope="row">{key}</th><td>{value}</td></tr>', key=key, value=value)
        for key, value in fields
    )
    parts: list[Markup] = [
        render('<p class="task-actions">{actions}</p>', actions=_task_actions(layout, info)),
        render('<table class="fields">{rows}</table>', rows=field_rows),
    ]
    if info.damaged:
        parts.append(
            render(
                '<section class="damaged"><h2>Damaged record</h2><pre>{text}</pre></section>',
                text=info.damaged,
            )
        )
    parts.append(_value_section("Arguments", "arguments", detail.arguments))
    if detail.result is not None or info.state is TaskState.SUCCEEDED:
        parts.append(_value_section("Result", "result", detail.result))
    if info.last_error:
        title = (
            "Last error" if info.state is not TaskState.SUCCEEDED else "Last error (of an earlier attempt)"
        )
        parts.append(
            render(
                '<section class="error-box"><h2>{title}</h2><pre class="traceback" data-field="last-error">'
                "{text}</pre></section>",
                title=title,
                text=redact(info.last_error),
            )
        )
    if info.chain is not None:
        parts.append(_chain_section(layout, info.chain, info.id))
    body = render(
        '<section id="task" data-live data-state="{state}">{parts}</section>',
        state=info.state.value,
        parts=html_join(parts),
    )
    return layout.page(f"Task {info.name}", body, nav="tasks")


def _progress(info: TaskInfo) -> Markup:
    """``done / total`` with a bar when both are known, and the message."""
    done, total = info.progress if info.progress is not None else (None, None)
    parts: list[Markup] = []
    if done is not None and total is not None and total > 0:
        share = min(max(done / total, 0.0), 1.0)
        parts.append(
            render(
                '<progress data-field="progress" max="1" value="{share}">{percent}</progress> '
                "{done:g} / {total:g} ({percent})",
                share=f"{share:.4f}",
                percent=f"{share:.0%}",
                done=done,
                total=total,
            )
        )
    elif done is not None or total is not None:
        parts.append(
            render(
                '<span data-field="progress">{done} / {total}</span>',
                done="?" if done is None else f"{done:g}",
                total="?" if total is None else f"{total:g}",
            )
        )
    if info.progress_message:
        parts.append(
            render('<span data-field="progress-message">{message}</span>', message=info.progress_message)
        )
    return html_join(parts, " · ")


def _group_field(group: GroupInfo | None, info: TaskInfo) -> Markup:
    """The group a member belongs to: its id, its state, how many members succeeded, and this task's place."""
    if group is None:
        return render(
            '<code data-field="group">{id}</code> <span class="note">(no longer stored)</span>',
            id=info.group_id,
        )
    place = group.task_ids.index(info.id) + 1 if info.id in group.task_ids else None
    then = render(" · then {id}", id=group.then_id) if group.then_id else Markup("")
    return render(
        '<code data-field="group">{id}</code> {state} · member {place} of {count} · {done} succeeded{then}',
        id=group.id,
        state=_state(group.state),
        place="?" if place is None else place,
        count=len(group.task_ids),
        done=group.counts[TaskState.SUCCEEDED],
        then=then,
    )


def _value_section(title: str, key: str, value: Decoded | None) -> Markup:
    if value is None:
        return render(
            '<section><h2>{title}</h2><pre data-field="{key}">None</pre></section>', title=title, key=key
        )
    note = Markup("")
    if value.error is not None:
        note = render(
            '<p class="note warn">cannot be decoded with the store\'s encoding ({error}); the raw bytes are '
            "shown</p>",
            error=redact(value.error),
        )
    cut = render('<p class="note">(cut: too long to show whole)</p>') if value.truncated else Markup("")
    return render(
        '<section><h2>{title}</h2>{note}<pre data-field="{key}">{text}</pre>{cut}</section>',
        title=title,
        note=note,
        key=key,
        text=redact(value.text),
        cut=cut,
    )


def _chain_section(layout: Layout, chain: ChainInfo, current_id: str) -> Markup:
    rows = html_join(
        render(
            "<tr{current}><td>{index}</td><td>{link}</td><td>{name}</td><td>{state}</td>"
            '<td class="error">{error}</td></tr>',
            current=Markup(' class="current"' if step.task_id == current_id else ""),
            index=step.index,
            link=_task_link(layout, step.task_id) if step.state is not None else step.task_id,
            name=step.name,
            state=_state(step.state)
            if step.state is not None
            else Markup('<span class="note">not yet</span>'),
            error=error_summary(step.last_error),
        )
        for step in chain.steps
    )
    return render(
        '<section class="chain"><h2>Chain {id}</h2><p>{state} · step {current} of {count} · '
        "{done} succeeded</p><table><thead><tr><th>#</th><th>Task</th><th>Name</th><th>State</th>"
        "<th>Error</th></tr></thead><tbody>{rows}</tbody></table></section>",
        id=chain.id,
        state=_state(chain.state),
        current=chain.current + 1,
        count=len(chain.steps),
        done=chain.succeeded_steps,
        rows=rows,
    )


def not_found_page(layout: Layout, task_id: str) -> tuple[int, Markup]:
    """The page for a task id that is not stored."""
    body = render(
        '<section id="task" data-live><p class="empty">There is no task with id <code>{id}</code> (never '
        "stored, or removed by retention or a purge).</p></section>",
        id=task_id,
    )
    return layout.page("Task not found", body, nav="tasks", status=404)


def error_page(layout: Layout, heading: str, message: str, status: int) -> tuple[int, Markup]:
    """A page that says what went wrong (the message is redacted)."""
    body = render(
        '<section id="error" data-live><p class="empty">{message}</p></section>', message=redact(message)
    )
    return layout.page(heading, body, nav="", status=status)


# -- small pieces -------------------------------------------------------------------------------------------


def error_summary(error: str | None) -> str:
    """The last non-empty line of an error text (the exception line of a traceback), redacted."""
    if not error:
        return ""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    return redact(summary if len(summary) <= 160 else summary[:159] + "…")


def _task_link(layout: Layout, task_id: str) -> Markup:
    return render('<a class="id" href="{href}">{id}</a>', href=layout.url("/task", id=task_id), id=task_id)


def _state(state: TaskState) -> Markup:
    return render('<span class="state state-{value}">{value}</span>', value=state.value)


def _selected(flag: bool) -> Markup:
    return Markup(" selected" if flag else "")


def _time(moment: float | None, now: float | None) -> Markup:
    """A ``<time>`` in UTC (the script shows it in the viewer's zone; the title keeps UTC), with how far
    it is from ``now`` when given."""
    if moment is None or not math.isfinite(moment):
        return Markup("&ndash;")
    tag = render('<time datetime="{iso}" title="{utc}">{utc}</time>', iso=_iso(moment), utc=_utc(moment))
    if now is None:
        return tag
    delta = moment - now
    if abs(delta) < 1:
        relative = "now"
    else:
        relative = f"in {_duration(delta)}" if delta > 0 else f"{_duration(-delta)} ago"
    return render('{tag} <span class="relative">({relative})</span>', tag=tag, relative=relative)


def _iso(moment: float) -> str:
    return _datetime(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc(moment: float) -> str:
    return _datetime(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


def _datetime(moment: float) -> datetime:
    try:
        return datetime.fromtimestamp(moment, timezone.utc)
    except (OverflowError, OSError, ValueError):  # a damaged record's time: shown at the nearest limit
        return (
            datetime.max.replace(tzinfo=timezone.utc)
            if moment > 0
            else datetime.min.replace(tzinfo=timezone.utc)
        )


def _clock(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%H:%M")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "1 s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
