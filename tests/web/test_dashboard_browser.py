"""The dashboard in a real browser (Debian's chromium, driven by Playwright), served by ``lifecycle tasks
web`` in its own process over a store the test fills through the public API: the counts match ``stats()``,
a dead task's traceback shows, a requeue from the page changes the store and the page without a reload, a
task enqueued by another process appears within 2 s, nothing can act without the token, markup in a task is
inert, times are the viewer's, and the page stops polling while hidden. Playwright's expectations wait by
themselves (no sleeps)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from anyio.from_thread import start_blocking_portal
from psycopg import sql

import lifecycle
from lifecycle.asynctask import AsyncTasks, QueueStats, TaskState, backend_from_url
from lifecycle.asynctask.web import dashboard
from lifecycle.tasks import HealthServer
from tests.asynctask.redis.redis_servers import delete_prefix
from tests.web.web_support import (
    Planned,
    Server,
    demo_plan,
    run_async,
    store_at,
    traceback_text,
    web_server,
    with_tasks,
)

pytest.importorskip("hypercorn")
expect: Any = pytest.importorskip("playwright.sync_api").expect

pytestmark = pytest.mark.timeout(300)

TOKEN = "correct-horse-battery-staple"
STATES = ("pending", "active", "dead", "succeeded", "cancelled")


def ui_plan() -> list[Planned]:
    """Tasks the tests act on, in a queue of their own."""
    return [
        *(
            Planned(
                f"ui-dead-{i}",
                "app.jobs.fragile",
                (i,),
                queue="ui",
                state=TaskState.DEAD,
                error=traceback_text(f"fragile #{i} broke", "RuntimeError"),
            )
            for i in range(4)
        ),
        Planned("ui-pending", "app.jobs.later", (), queue="ui", run_in=3600),
        Planned(
            "ui-evil",
            "<script>window.__pwned = 1</script>",
            ("<script>window.__pwned = 2</script>", '<img src=x onerror="window.__pwned = 3">'),
            queue="evil",
            state=TaskState.DEAD,
            error='<script>window.__pwned = 4</script>\nValueError: "<b>bold</b>"',
        ),
    ]


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store with the demo tasks and the tasks the tests act on."""
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'tasks.db'}"
    store_at(url, [*demo_plan(), *ui_plan()])
    return url


@pytest.fixture(scope="module")
def served(store_url: str) -> Iterator[Server]:
    """``lifecycle tasks web`` with a token."""
    with web_server("tasks", "--backend", store_url, "web", "--port", "0", "--token", TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def read_only(store_url: str) -> Iterator[Server]:
    """``lifecycle tasks web`` without a token: read-only."""
    with web_server("tasks", "--backend", store_url, "web", "--port", "0") as server:
        yield server


def stats_of(url: str) -> dict[str, QueueStats]:
    async def read(tasks: AsyncTasks) -> dict[str, QueueStats]:
        return await tasks.stats()

    return with_tasks(url, read)


def state_of(url: str, task_id: str) -> TaskState | None:
    async def read(tasks: AsyncTasks) -> TaskState | None:
        info = await tasks.info(task_id)
        return None if info is None else info.state

    return with_tasks(url, read)


def unlock(page: Any, token: str = TOKEN) -> None:
    page.fill("#token-input", token)
    page.click("#token-unlock")


def act(page: Any, button: Any) -> None:
    """Click an action button and confirm it in the page's dialog."""
    button.click()
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-ok")


def test_the_overview_counts_match_stats(
    page: Any, served: Server, store_url: str, screenshots: Path
) -> None:
    page.goto(served.url)
    stats = stats_of(store_url)
    assert {"default", "emails", "reports", "ui", "evil"} <= set(stats)
    for queue, counts in stats.items():
        row = page.locator(f'tr[data-queue="{queue}"]')
        for state in STATES:
            expect(row.locator(f'td[data-count="{state}"]')).to_have_text(str(counts[state]))
    total = page.locator("tr[data-queue-total]")
    for state in STATES:
        expect(total.locator(f'td[data-count="{state}"]')).to_have_text(
            str(sum(c[state] for c in stats.values()))
        )
    # The last hour: 118 demo tasks succeeded and 4 died in it (the ui tasks died just now).
    expect(page.locator('[data-metric="finished"]')).to_have_text(str(118 + 4 + 5))
    expect(page.locator('[data-metric="dead"]')).to_have_text(str(4 + 5))
    expect(page.locator("#active tr[data-task]")).to_have_count(3)
    page.screenshot(path=str(screenshots / "overview.png"), full_page=True)


def test_a_dead_tasks_page_shows_its_traceback(page: Any, served: Server, screenshots: Path) -> None:
    page.goto(f"{served.url}task?id=img-dead-2")
    error = page.locator('pre[data-field="last-error"]')
    expect(error).to_contain_text("Traceback (most recent call last):")
    expect(error).to_contain_text('File "/srv/app/images.py", line 12, in decode')
    expect(error).to_contain_text("ValueError: cannot decode uploads/broken-2.png: truncated PNG chunk")
    expect(page.locator('pre[data-field="arguments"]')).to_have_text("[0] 'uploads/broken-2.png'\n[1] 512")
    expect(page.locator("#task")).to_have_attribute("data-state", "dead")
    page.screenshot(path=str(screenshots / "task.png"), full_page=True)


def test_requeue_from_the_page_changes_the_store_and_the_page_without_reload(
    page: Any, served: Server, store_url: str
) -> None:
    page.goto(f"{served.url}task?id=ui-dead-0")
    unlock(page)
    expect(page.locator("#flash")).to_have_text("token accepted: actions unlocked")
    page.evaluate("window.__sameDocument = 42")
    act(page, page.locator('#task button[data-action="requeue"]'))
    expect(page.locator("#flash")).to_have_text("requeued task ui-dead-0: it is pending again")
    expect(page.locator("#task")).to_have_attribute("data-state", "pending")
    expect(page.locator('tr[data-field="state"]')).to_contain_text("pending")
    assert state_of(store_url, "ui-dead-0") is TaskState.PENDING
    assert page.evaluate("window.__sameDocument") == 42, "the page was reloaded"

    # The overview's bulk action, confirmed in the dialog; cancelling the dialog does nothing.
    page.goto(served.url)
    button = page.locator('tr[data-queue="ui"] button[data-action="requeue_dead"]')
    button.click()
    page.click("#confirm-cancel")
    expect(page.locator("#confirm")).to_be_hidden()
    assert state_of(store_url, "ui-dead-1") is TaskState.DEAD
    act(page, button)
    expect(page.locator("#flash")).to_have_text("requeued 3 dead task(s) of queue 'ui'")
    expect(page.locator('tr[data-queue="ui"] td[data-count="dead"]')).to_have_text("0")
    assert state_of(store_url, "ui-dead-1") is TaskState.PENDING


def paused_of(url: str) -> set[str]:
    async def read(tasks: AsyncTasks) -> set[str]:
        return await tasks.paused()

    return with_tasks(url, read)


def test_pause_and_resume_a_queue_from_the_page(page: Any, served: Server, store_url: str) -> None:
    page.goto(served.url)
    unlock(page)
    row = page.locator('tr[data-queue="reports"]')
    expect(row.locator("td.paused")).to_have_attribute("data-paused", "no")
    act(page, row.locator('button[data-action="pause"]'))
    expect(page.locator("#flash")).to_have_text(
        "paused queue 'reports': no worker starts its tasks until it is resumed"
    )
    expect(row.locator("td.paused")).to_have_attribute("data-paused", "yes")
    assert paused_of(store_url) == {"reports"}, "the pause is stored, for every worker"
    act(page, row.locator('button[data-action="resume"]'))
    expect(page.locator("#flash")).to_have_text("resumed queue 'reports': workers start its tasks again")
    expect(row.locator("td.paused")).to_have_attribute("data-paused", "no")
    assert paused_of(store_url) == set()


def test_a_task_enqueued_by_another_process_appears_within_2_s(
    page: Any, served: Server, store_url: str
) -> None:
    page.goto(f"{served.url}tasks?queue=arrivals")
    expect(page.locator("#task-list")).to_contain_text("no tasks match")
    page.goto(served.url)
    expect(page.locator('tr[data-queue="arrivals"]')).to_have_count(0)
    producer = textwrap.dedent(
        f"""
        import anyio
        from lifecycle.asynctask import AsyncTasks, backend_from_url

        async def main():
            async with AsyncTasks(backend_from_url({store_url!r}), execution=False) as tasks:
                await tasks.enqueue("app.jobs.arrived", 1, queue="arrivals", task_id="arrived-1")

        anyio.run(main)
        """
    )
    subprocess.run([sys.executable, "-c", producer], check=True, timeout=60)
    stored = time.monotonic()
    expect(page.locator('tr[data-queue="arrivals"] td[data-count="pending"]')).to_have_text("1", timeout=2000)
    assert time.monotonic() - stored < 2.5


def test_without_the_token_no_action_succeeds(page: Any, served: Server, store_url: str) -> None:
    page.goto(f"{served.url}task?id=img-dead-1")
    # No token entered: the page offers the action, the server refuses it.
    act(page, page.locator('#task button[data-action="requeue"]'))
    expect(page.locator("#flash")).to_have_text(
        "actions need the dashboard's token: enter it at the top of the page"
    )
    expect(page.locator("#flash")).to_have_class("error")
    # A wrong token is refused at once and not kept.
    unlock(page, "not-the-token")
    expect(page.locator("#flash")).to_have_text("wrong token: actions refused")
    expect(page.locator("#token-lock")).to_be_hidden()
    act(page, page.locator('#task button[data-action="requeue"]'))
    expect(page.locator("#flash")).to_have_text(
        "actions need the dashboard's token: enter it at the top of the page"
    )
    page.goto(f"{served.url}task?id=ui-pending")
    act(page, page.locator('#task button[data-action="cancel"]'))
    expect(page.locator("#flash")).to_contain_text("actions need the dashboard's token")
    page.goto(served.url)
    act(page, page.locator('tr[data-queue="default"] button[data-action="purge_finished"]'))
    expect(page.locator("#flash")).to_contain_text("actions need the dashboard's token")
    assert state_of(store_url, "img-dead-1") is TaskState.DEAD
    assert state_of(store_url, "ui-pending") is TaskState.PENDING
    assert stats_of(store_url)["default"].succeeded == 48


def test_a_read_only_dashboard_offers_no_action_and_refuses_them(
    page: Any, read_only: Server, store_url: str
) -> None:
    page.goto(f"{read_only.url}task?id=img-dead-0")
    expect(page.locator('pre[data-field="last-error"]')).to_contain_text("truncated PNG chunk")
    expect(page.locator("button[data-action]")).to_have_count(0)
    expect(page.locator("#token-form")).to_have_count(0)
    expect(page.locator("footer .mode")).to_have_text("read-only")
    # Even a same-origin request written by hand, with the custom header, is refused.
    answer = page.evaluate(
        """async () => {
            const response = await fetch("api/action", {method: "POST", body: JSON.stringify(
                {action: "requeue", task: "img-dead-0"}), headers: {"Content-Type": "application/json",
                "X-Lifecycle-Dashboard": "1", "X-Lifecycle-Token": "anything"}});
            return [response.status, (await response.json()).message];
        }"""
    )
    assert answer == [403, "this dashboard is read-only: actions are off"]
    assert state_of(store_url, "img-dead-0") is TaskState.DEAD


def test_markup_in_a_task_is_shown_as_text_and_never_runs(page: Any, served: Server) -> None:
    dialogs: list[str] = []

    def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    for path in ("task?id=ui-evil", "tasks?queue=evil", ""):
        page.goto(f"{served.url}{path}")
        expect(page.locator("body")).to_contain_text("<script>window.__pwned = 1</script>")
        assert page.evaluate("window.__pwned") is None
        assert page.locator("script").count() == 1  # the dashboard's own
        assert page.locator("main img").count() == 0
    page.goto(f"{served.url}task?id=ui-evil")
    expect(page.locator('pre[data-field="arguments"]')).to_contain_text(
        """[1] '<img src=x onerror="window.__pwned = 3">'"""
    )
    expect(page.locator('pre[data-field="last-error"]')).to_contain_text('ValueError: "<b>bold</b>"')
    assert page.locator("main b").count() == 0
    assert dialogs == []


def test_times_are_shown_in_the_viewers_time_zone_with_utc_on_hover(browser: Any, served: Server) -> None:
    context = browser.new_context(timezone_id="Asia/Tokyo", locale="en-GB")
    try:
        page = context.new_page()
        page.goto(f"{served.url}task?id=img-dead-0")
        moment = page.locator('tr[data-field="finished"] time')
        expect(moment).to_contain_text("GMT+9")
        utc = moment.get_attribute("title")
        assert utc is not None
        assert utc.endswith(" UTC")
        hour = int(utc.split(" ")[1].split(":")[0])
        expect(moment).to_contain_text(f"{(hour + 9) % 24:02d}:")
    finally:
        context.close()


def test_live_updates_stop_while_the_tab_is_hidden(page: Any, served: Server) -> None:
    live: list[float] = []
    page.on("request", lambda request: live.append(1) if request.headers.get("x-lifecycle-live") else None)
    page.clock.install()
    page.goto(served.url)
    with page.expect_request(lambda request: request.headers.get("x-lifecycle-live") == "1"):
        page.clock.run_for(1500)  # the page polls every second while visible
    page.evaluate(
        """() => {
            Object.defineProperty(document, "hidden", {configurable: true, get: () => true});
            document.dispatchEvent(new Event("visibilitychange"));
        }"""
    )
    expect(page.locator("#live-status")).to_have_text("paused while the tab is hidden")
    before = len(live)
    page.clock.run_for(30_000)
    with page.expect_request(lambda request: request.headers.get("x-lifecycle-live") == "1"):
        page.evaluate(
            """() => {
                Object.defineProperty(document, "hidden", {configurable: true, get: () => false});
                document.dispatchEvent(new Event("visibilitychange"));
            }"""
        )
    # Requests are reported in order: none was made during the 30 hidden seconds.
    assert len(live) == before + 1


def test_the_page_reads_without_javascript(browser: Any, served: Server) -> None:
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(f"{served.url}tasks?queue=default&state=dead")
        expect(page.locator("tr[data-task]")).to_have_count(3)
        page.click("text=img-dead-0")
        expect(page.locator('pre[data-field="last-error"]')).to_contain_text("truncated PNG chunk")
        expect(page.locator('tr[data-field="finished"] time')).to_contain_text(" UTC")
        page.fill("input[name=id]", "mail-dead-0")
        page.click("form.search button")
        expect(page.locator('pre[data-field="last-error"]')).to_contain_text("SMTP 554")
    finally:
        context.close()


def small_plan() -> list[Planned]:
    return [
        Planned("ok-1", "app.ok", (1,), state=TaskState.SUCCEEDED, result=2),
        Planned("ok-2", "app.ok", (2,), queue="other", state=TaskState.SUCCEEDED, result=4),
        Planned("dead-1", "app.boom", (3,), state=TaskState.DEAD, error=traceback_text("server store broke")),
        Planned("later-1", "app.ok", (4,), queue="other", run_in=600),
    ]


def check_server_store(page: Any, url: str) -> None:
    """Fill the store at ``url``, serve it, and check the counts and a dead task's traceback in the page."""
    store_at(url, small_plan())
    with web_server("tasks", "--backend", url, "web", "--port", "0", "--token", TOKEN) as server:
        page.goto(server.url)
        stats = stats_of(url)
        assert set(stats) == {"default", "other"}
        for queue, counts in stats.items():
            for state in STATES:
                cell = page.locator(f'tr[data-queue="{queue}"] td[data-count="{state}"]')
                expect(cell).to_have_text(str(counts[state]))
        page.click("text=dead-1")
        expect(page.locator('pre[data-field="last-error"]')).to_contain_text("ValueError: server store broke")
        unlock(page)
        act(page, page.locator('#task button[data-action="requeue"]'))
        expect(page.locator("#task")).to_have_attribute("data-state", "pending")
    assert state_of(url, "dead-1") is TaskState.PENDING


def test_a_redis_store(page: Any, redis_url: str, unique_name: str) -> None:
    try:
        check_server_store(page, f"{redis_url}?prefix={unique_name}")
    finally:
        run_async(delete_prefix, redis_url, unique_name)


def test_a_postgresql_store(page: Any, postgres_dsn: str, unique_name: str) -> None:
    try:
        check_server_store(page, f"{postgres_dsn}?schema={unique_name}")
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique_name))
            )


@contextmanager
def health_server_dashboard(url: str) -> Iterator[str]:
    """A TaskManager in a thread of its own running a HealthServer that serves the dashboard of an
    AsyncTasks (with two schedules) over the store at ``url``; yields the dashboard's URL."""
    ready = threading.Event()
    with start_blocking_portal(backend="asyncio") as portal:
        tasks = AsyncTasks(backend_from_url(url), execution=False)
        tasks.every("app.cache.refresh", 300, name="refresh-cache", queue="default")
        tasks.schedule(
            "app.reports.monthly", "0 6 1 * *", "last-month", name="monthly-report", timezone="Europe/Paris"
        )
        manager = lifecycle.TaskManager(name="orders")
        health = HealthServer(
            manager, port=0, dashboard=dashboard(tasks, token=TOKEN, title="orders service")
        )
        manager.add_task("health", health)
        manager.add_task("tasks", tasks)
        manager.add_listener(lambda event: ready.set() if event.kind is lifecycle.EventKind.READY else None)
        running = portal.start_task_soon(manager.run)
        try:
            assert ready.wait(30), "the manager did not get ready in 30 s"
            yield f"http://127.0.0.1:{health.port}/tasks/"
        finally:
            portal.call(manager.shutdown)
            running.result(timeout=30)


def test_the_health_servers_dashboard_with_schedules(page: Any, tmp_path: Path, screenshots: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    store_at(url, demo_plan())
    with health_server_dashboard(url) as address:
        page.goto(address)
        expect(page.locator('tr[data-schedule="refresh-cache"]')).to_contain_text("every 300 s")
        expect(page.locator('tr[data-schedule="monthly-report"]')).to_contain_text(
            "cron 0 6 1 * * (Europe/Paris)"
        )
        expect(page.locator('tr[data-queue="emails"] td[data-count="succeeded"]')).to_have_text("70")
        expect(page.locator("header .brand")).to_have_text("orders service")
        unlock(page)
        expect(page.locator("#token-form")).to_have_class(re.compile("unlocked"))
        page.locator("#flash").evaluate("element => element.replaceChildren()")
        page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)
        page.click('tr[data-queue="default"] td[data-count="dead"] a')
        expect(page.locator("tr[data-task]")).to_have_count(3)
        page.click("text=img-dead-2")
        expect(page.locator('pre[data-field="last-error"]')).to_contain_text("truncated PNG chunk")
        page.screenshot(path=str(screenshots / "dashboard-task.png"), full_page=True)
