"""The dashboard over plain HTTP (httpx against the ASGI app, in this process; asyncio and trio): the pages
and what they show, every action, and the security rules: read-only without a token, the token in a header
only, no cross-site action, loopback-only actions without a token, escaping, no secret on any page."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lifecycle.asynctask import AsyncTasks, Call, NewTask, ProgressUpdate, SQLiteBackend, TaskState
from lifecycle.asynctask.web import dashboard
from tests.web.web_support import Planned, demo_plan, store, traceback_text

TOKEN = "t0ken-for-the-http-tests"
ACT = {"X-Lifecycle-Dashboard": "1", "Content-Type": "application/json"}
LOCAL = "http://127.0.0.1:8181"


@pytest.fixture
async def tasks(tmp_path: Path) -> AsyncIterator[AsyncTasks]:
    """An open AsyncTasks over a new SQLite store."""
    async with AsyncTasks(SQLiteBackend(str(tmp_path / "tasks.db")), execution=False) as opened:
        yield opened


def client(app: Any, *, address: str = "127.0.0.1", base: str = LOCAL) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 50000)), base_url=base)


def count(html: str, queue: str, state: str) -> int:
    row = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', html, re.S)
    assert row, f"no row for queue {queue!r}"
    cell = re.search(rf'data-count="{state}"[^>]*>(?:<a [^>]*>)?(?:≥ )?(\d+)<', row.group(1))
    assert cell, f"no {state} count in the row of {queue!r}"
    return int(cell.group(1))


def task_ids(html: str) -> list[str]:
    return re.findall(r'<tr data-task="([^"]+)">', html)


async def action(http: httpx.AsyncClient, token: str | None = TOKEN, **request: str) -> httpx.Response:
    headers = dict(ACT)
    if token is not None:
        headers["X-Lifecycle-Token"] = token
    return await http.post("/api/action", json=request, headers=headers)


# -- what the pages show ------------------------------------------------------------------------------------


async def test_the_overview_shows_the_counts_of_stats_and_the_last_hour(tasks: AsyncTasks) -> None:
    await store(tasks.backend, demo_plan())
    async with client(dashboard(tasks)) as http:
        response = await http.get("/")
    assert response.status_code == 200
    html = response.text
    stats = await tasks.stats()
    assert set(stats) == {"default", "emails", "reports"}
    for queue, counts in stats.items():
        for state in ("pending", "active", "dead", "succeeded", "cancelled"):
            assert count(html, queue, state) == counts[state], (queue, state)
    assert count(html, "default", "retrying") == 1
    assert count(html, "reports", "scheduled") == 2
    assert '<span data-metric="finished">122</span>' in html
    assert '<span data-metric="dead">4</span>' in html
    assert '<span data-metric="failure-rate">3.3 %</span>' in html
    assert len(re.findall(r'<rect class="ok"', html)) == 12
    assert html.count('<tr data-task="') == 3 + 4  # running now, recent failures
    assert "renewed until" in html


async def test_task_lists_are_pages_of_the_newest_tasks_filtered_by_name(tasks: AsyncTasks) -> None:
    calls = [
        Call("app.even" if i % 2 == 0 else "app.odd", i, queue="bulk", task_id=f"b{i:03d}")
        for i in range(120)
    ]
    for call in calls:  # one by one: each its own enqueue time, so the order is known
        await tasks.enqueue_many([call])
    async with client(dashboard(tasks)) as http:
        first = (await http.get("/tasks", params={"queue": "bulk"})).text
        last = (await http.get("/tasks", params={"queue": "bulk", "offset": "100"})).text
        odd = (await http.get("/tasks", params={"queue": "bulk", "name": "ODD"})).text
        deeper = (await http.get("/tasks", params={"queue": "bulk", "name": "odd", "offset": "99"})).text
        pending = (await http.get("/tasks", params={"state": "pending", "queue": "nothing-here"})).text
    assert task_ids(first) == [f"b{i:03d}" for i in range(119, 69, -1)]
    assert 'href="/tasks?queue=bulk&amp;offset=50" rel="next"' in first
    assert task_ids(last) == [f"b{i:03d}" for i in range(19, -1, -1)]
    assert 'rel="next"' not in last
    assert task_ids(odd) == [f"b{i:03d}" for i in range(119, 19, -2)]
    assert 'href="/tasks?queue=bulk&amp;name=ODD&amp;offset=99" rel="next"' in odd
    assert task_ids(deeper) == [f"b{i:03d}" for i in range(19, 0, -2)]
    assert "no tasks match" in pending


async def test_the_task_page_decodes_arguments_and_results_and_shows_raw_bytes_safely(
    tasks: AsyncTasks,
) -> None:
    await store(
        tasks.backend,
        [
            Planned("ok", "app.ok", ("x", [1, 2], {"k": None}), state=TaskState.SUCCEEDED, result={"n": 3}),
            Planned("boom", "app.boom", (1,), state=TaskState.DEAD, error=traceback_text("no luck")),
        ],
    )
    garbage = NewTask("raw", "app.raw", "default", b"\xff\x00<b>not json", 0, None, 1.0, 1.0)
    await tasks.backend.enqueue_many([garbage])
    async with client(dashboard(tasks)) as http:
        ok = (await http.get("/task", params={"id": "ok"})).text
        boom = (await http.get("/task", params={"id": "boom"})).text
        raw = (await http.get("/task", params={"id": "raw"})).text
    assert "[0] &#x27;x&#x27;\n[1] [1, 2]\n[2] {&#x27;k&#x27;: None}" in ok
    assert '<pre data-field="result">{&#x27;n&#x27;: 3}</pre>' in ok
    assert "<td>1 of 3</td>" in ok
    assert "ValueError: no luck</pre>" in boom
    assert "Traceback (most recent call last):" in boom
    assert "cannot be decoded with the store's encoding" in raw
    assert "b&#x27;\\xff\\x00&lt;b&gt;not json&#x27;" in raw
    assert "<b>not json" not in raw


async def test_a_chain_step_shows_the_chain(tasks: AsyncTasks) -> None:
    chain_id = await tasks.enqueue_chain([Call("app.fetch", "u"), Call("app.parse")])
    async with client(dashboard(tasks)) as http:
        html = (await http.get("/task", params={"id": chain_id})).text
    assert f"<h2>Chain {chain_id}</h2>" in html
    assert "<td>app.fetch</td>" in html
    assert "<td>app.parse</td>" in html
    assert "not yet" in html


async def test_a_running_member_shows_its_progress_and_group_and_can_be_cancelled(tasks: AsyncTasks) -> None:
    group_id = await tasks.enqueue_group([Call("app.part", 1), Call("app.part", 2)], then=Call("app.join"))
    info = await tasks.group_info(group_id)
    assert info is not None
    backend = tasks.backend
    now = time.time()
    claimed = await backend.claim(["default"], 1, now=now, lease_until=now + 600)
    assert [c.record.id for c in claimed] == [info.task_ids[0]]
    update = ProgressUpdate(info.task_ids[0], claimed[0].token, 3.0, 4.0, "almost <there>")
    assert await backend.save_progress([update]) == set()
    async with client(dashboard(tasks, token=TOKEN)) as http:
        html = (await http.get("/task", params={"id": info.task_ids[0]})).text
        other = (await http.get("/task", params={"id": info.task_ids[1]})).text
        stop = await action(http, action="cancel", task=info.task_ids[0])
    assert '<progress data-field="progress" max="1" value="0.7500">75%</progress> 3 / 4 (75%)' in html
    assert '<span data-field="progress-message">almost &lt;there&gt;</span>' in html
    assert f'<code data-field="group">{group_id}</code>' in html
    assert "member 1 of 2 · 0 succeeded" in html
    assert 'data-action="cancel"' in html, "a running task has a Cancel button"
    assert "member 2 of 2" in other
    assert 'data-field="progress"' not in other
    assert (stop.status_code, stop.json()["message"]) == (
        200,
        f"asked the running task {info.task_ids[0]} to stop: it ends cancelled",
    )
    record = await backend.get(info.task_ids[0])
    assert record is not None
    assert (record.state, record.cancel_requested) == (TaskState.ACTIVE, True)


async def test_unknown_pages_tasks_and_filters_say_so(tasks: AsyncTasks) -> None:
    async with client(dashboard(tasks)) as http:
        missing = await http.get("/task", params={"id": "nope<"})
        no_id = await http.get("/task")
        state = await http.get("/tasks", params={"state": "sleeping"})
        offset = await http.get("/tasks", params={"offset": "-1"})
        page = await http.get("/admin")
        static = await http.get("/static/dashboard.js")
        nothing = await http.get("/static/../_app.py")
        head = await http.head("/")
        post = await http.post("/", content=b"x")
    assert missing.status_code == 404
    assert "no task with id <code>nope&lt;</code>" in missing.text
    assert no_id.status_code == 400
    assert state.status_code == 400
    assert offset.status_code == 400
    assert page.status_code == 404
    assert static.status_code == 200
    assert static.headers["content-type"].startswith("text/javascript")
    assert nothing.status_code == 404
    assert head.status_code == 200
    assert head.content == b""
    assert post.status_code == 405


async def test_a_store_that_fails_gives_a_503_page_without_its_password(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    from lifecycle.asynctask.redis import RedisBackend

    # Nothing listens on port 1: opening fails; the page says so, the password never shows.
    app = dashboard(RedisBackend("redis://:hunter2-secret@127.0.0.1:1/0"))
    async with client(app) as http:
        response = await http.get("/")
    assert response.status_code == 503
    assert "the task store cannot be read" in response.text
    assert "hunter2" not in response.text


# -- actions ------------------------------------------------------------------------------------------------


async def test_every_action_with_the_token(tasks: AsyncTasks) -> None:
    plans = [Planned(f"d{i}", "app.d", (i,), queue="q", state=TaskState.DEAD, error="E: x") for i in range(3)]
    plans += [Planned(f"s{i}", "app.s", (i,), queue="q", state=TaskState.SUCCEEDED) for i in range(2)]
    plans += [Planned("p", "app.p", (), queue="q", run_in=600)]
    await store(tasks.backend, plans)
    async with client(dashboard(tasks, token=TOKEN)) as http:
        requeued = await action(http, action="requeue", task="d0")
        again = await action(http, action="requeue", task="d0")
        unknown = await action(http, action="requeue", task="nope")
        cancelled = await action(http, action="cancel", task="p")
        cancel_dead = await action(http, action="cancel", task="d1")
        all_dead = await action(http, action="requeue_dead", queue="q")
        purge_one = await action(http, action="purge_finished", queue="q", state="cancelled")
        purge = await action(http, action="purge_finished", queue="q")
        active = await action(http, action="purge_finished", queue="q", state="active")
        pause = await action(http, action="pause", queue="q")
        paused_page = (await http.get("/")).text
        pause_again = await action(http, action="pause", queue="q")
        paused = await tasks.paused()
        resume = await action(http, action="resume", queue="q")
        resumed_page = (await http.get("/")).text
        resume_again = await action(http, action="resume", queue="q")
        strange = await action(http, action="explode")
        bad = await http.post("/api/action", content=b"[1", headers={**ACT, "X-Lifecycle-Token": TOKEN})
    assert (requeued.status_code, requeued.json()) == (
        200,
        {"ok": True, "message": "requeued task d0: it is pending again"},
    )
    assert again.status_code == 409
    assert "only dead or cancelled tasks can be requeued" in again.json()["message"]
    assert unknown.status_code == 404
    assert cancelled.status_code == 200
    assert cancel_dead.status_code == 409
    assert all_dead.json()["message"] == "requeued 2 dead task(s) of queue 'q'"
    assert purge_one.json()["message"] == "deleted 1 cancelled task(s) of queue 'q'"
    assert purge.json()["message"] == "deleted 2 succeeded/dead/cancelled task(s) of queue 'q'"
    assert active.status_code == 400
    assert (pause.status_code, pause.json()["message"]) == (
        200,
        "paused queue 'q': no worker starts its tasks until it is resumed",
    )
    assert pause_again.json()["message"] == "queue 'q' was paused already"
    assert paused == {"q"}, "the dashboard's pause is stored"
    assert 'data-paused="yes"' in paused_page
    assert 'data-action="resume"' in paused_page
    assert (resume.status_code, resume.json()["message"]) == (
        200,
        "resumed queue 'q': workers start its tasks again",
    )
    assert 'data-paused="no"' in resumed_page
    assert 'data-action="pause"' in resumed_page
    assert resume_again.json()["message"] == "queue 'q' was not paused"
    assert await tasks.paused() == set()
    assert strange.status_code == 400
    assert bad.status_code == 400
    stats = await tasks.stats()
    assert (stats["q"].pending, stats["q"].succeeded, stats["q"].dead, stats["q"].cancelled) == (3, 0, 0, 0)


# -- security -----------------------------------------------------------------------------------------------


async def test_read_only_by_default_no_buttons_and_every_action_refused(tasks: AsyncTasks) -> None:
    await store(tasks.backend, [Planned("d", "app.d", (), state=TaskState.DEAD, error="E: x")])
    async with client(dashboard(tasks)) as http:
        html = (await http.get("/task", params={"id": "d"})).text + (await http.get("/")).text
        refused = [await action(http, token=token, action="requeue", task="d") for token in (None, TOKEN, "")]
        probe = await http.post("/api/token", json={}, headers=ACT)
    assert "data-action" not in html
    assert "token-form" not in html
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert refused[0].json()["message"] == "this dashboard is read-only: actions are off"
    assert probe.status_code == 403
    assert (await tasks.info("d")).state is TaskState.DEAD  # type: ignore[union-attr]


async def test_with_a_token_only_the_right_header_acts(tasks: AsyncTasks) -> None:
    await store(tasks.backend, [Planned("d", "app.d", (), state=TaskState.DEAD, error="E: x")])
    app = dashboard(tasks, token=TOKEN)
    async with client(app) as http:
        pages = (await http.get("/")).text + (await http.get("/task", params={"id": "d"})).text
        attempts = {
            "no custom header": await http.post(
                "/api/action", json={"action": "requeue", "task": "d"}, headers={"X-Lifecycle-Token": TOKEN}
            ),
            "a form post": await http.post(
                "/api/action",
                data={"action": "requeue", "task": "d", "token": TOKEN},
                headers={"X-Lifecycle-Dashboard": "1", "X-Lifecycle-Token": TOKEN},
            ),
            "no token": await action(http, token=None, action="requeue", task="d"),
            "a wrong token": await action(http, token=TOKEN + "x", action="requeue", task="d"),
            "a token prefix": await action(http, token=TOKEN[:-1], action="requeue", task="d"),
            "the token in the URL": await http.post(
                f"/api/action?token={TOKEN}", json={"action": "requeue", "task": "d"}, headers=ACT
            ),
            "a cross-site fetch": await http.post(
                "/api/action",
                json={"action": "requeue", "task": "d"},
                headers={**ACT, "X-Lifecycle-Token": TOKEN, "Sec-Fetch-Site": "cross-site"},
            ),
            "a same-site page of another origin": await http.post(
                "/api/action",
                json={"action": "requeue", "task": "d"},
                headers={**ACT, "X-Lifecycle-Token": TOKEN, "Sec-Fetch-Site": "same-site"},
            ),
            "another Origin": await http.post(
                "/api/action",
                json={"action": "requeue", "task": "d"},
                headers={**ACT, "X-Lifecycle-Token": TOKEN, "Origin": "http://evil.example"},
            ),
            "a GET": await http.get("/api/action", headers={**ACT, "X-Lifecycle-Token": TOKEN}),
        }
        assert (await tasks.info("d")).state is TaskState.DEAD  # type: ignore[union-attr]
        good = await http.post(
            "/api/action",
            json={"action": "requeue", "task": "d"},
            headers={**ACT, "X-Lifecycle-Token": TOKEN, "Origin": LOCAL, "Sec-Fetch-Site": "same-origin"},
        )
        check = await http.post("/api/token", json={}, headers={**ACT, "X-Lifecycle-Token": TOKEN})
    statuses = {name: response.status_code for name, response in attempts.items()}
    assert statuses == {
        "no custom header": 403,
        "a form post": 403,
        "no token": 401,
        "a wrong token": 401,
        "a token prefix": 401,
        "the token in the URL": 401,
        "a cross-site fetch": 403,
        "a same-site page of another origin": 403,
        "another Origin": 403,
        "a GET": 405,
    }
    assert good.status_code == 200
    assert check.json() == {"ok": True, "message": "token accepted: actions unlocked"}
    assert (await tasks.info("d")).state is TaskState.PENDING  # type: ignore[union-attr]
    assert TOKEN not in pages
    assert 'data-action="requeue"' in pages


async def test_read_only_true_wins_over_a_token(tasks: AsyncTasks) -> None:
    async with client(dashboard(tasks, token=TOKEN, read_only=True)) as http:
        response = await action(http, action="requeue_dead", queue="default")
        html = (await http.get("/")).text
    assert response.status_code == 403
    assert "token-form" not in html


async def test_without_a_token_read_only_false_acts_from_loopback_only(tasks: AsyncTasks) -> None:
    app = dashboard(tasks, read_only=False)
    async with client(app) as local, client(app, address="::1", base="http://[::1]:8181") as local6:
        assert (await action(local, token=None, action="requeue_dead", queue="q")).status_code == 200
        assert (await action(local6, token=None, action="requeue_dead", queue="q")).status_code == 200
        forwarded = await local.post(
            "/api/action",
            json={"action": "requeue_dead", "queue": "q"},
            headers={**ACT, "X-Forwarded-For": "1.2.3.4"},
        )
        rebound = await local.post(
            "/api/action",
            json={"action": "requeue_dead", "queue": "q"},
            headers={**ACT, "Host": "evil.example"},
        )
        bare = await local.post("/api/action", json={"action": "requeue_dead", "queue": "q"})
    async with client(app, address="203.0.113.7", base="http://203.0.113.1:8181") as remote:
        far = await action(remote, token=None, action="requeue_dead", queue="q")
    assert [forwarded.status_code, rebound.status_code, bare.status_code, far.status_code] == [403] * 4
    assert "only from this machine" in far.json()["message"]


async def test_every_response_forbids_framing_sniffing_and_foreign_scripts(tasks: AsyncTasks) -> None:
    async with client(dashboard(tasks, token=TOKEN)) as http:
        responses = [await http.get("/"), await http.get("/tasks"), await action(http, action="x")]
    for response in responses:
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"


async def test_every_value_is_escaped_and_no_password_is_shown(tasks: AsyncTasks) -> None:
    evil = '<script>alert("x")</script>'
    await store(
        tasks.backend,
        [
            Planned(
                "e1",
                evil,
                (evil, "postgresql://app:hunter2-secret@db:5432/app"),
                queue='q"><script>alert(1)</script>',
                state=TaskState.DEAD,
                error=f"{evil}\nOSError: cannot reach redis://:hunter2-secret@cache:6379/0",
            )
        ],
    )
    app = dashboard(tasks, token=TOKEN, title="<b>ops</b>")
    async with client(app) as http:
        pages = [
            (await http.get(path, params=params)).text
            for path, params in [
                ("/", {}),
                ("/tasks", {"queue": 'q"><script>alert(1)</script>'}),
                ("/tasks", {"name": evil}),
                ("/task", {"id": "e1"}),
            ]
        ]
    for html in pages:
        assert "<script>alert" not in html
        assert "<b>ops</b>" not in html
        assert "hunter2" not in html
        assert html.count("<script") == 1
    task = pages[3]
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in task
    assert "postgresql://app:***@db:5432/app" in task
    assert "redis://:***@cache:6379/0" in task


def test_the_dashboard_refuses_a_bad_source_token_or_flag(tmp_path: Path) -> None:
    backend = SQLiteBackend(str(tmp_path / "x.db"))
    with pytest.raises(TypeError, match="needs an AsyncTasks or a Backend"):
        dashboard("sqlite:///x.db")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token must be a str"):
        dashboard(backend, token=123)  # type: ignore[arg-type]
    for token in ("", "   ", "two words", "line\nbreak"):
        with pytest.raises(ValueError, match="token must be non-empty printable text"):
            dashboard(backend, token=token)
    with pytest.raises(TypeError, match="read_only must be True, False or None"):
        dashboard(backend, read_only="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="title must be a str"):
        dashboard(backend, title=None)  # type: ignore[arg-type]


# -- serving it -------------------------------------------------------------------------------------------


async def test_a_bare_backend_is_opened_at_the_first_request_and_closed_at_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with AsyncTasks(SQLiteBackend(str(path))) as producer:
        await producer.enqueue("app.x", 1, task_id="x1")
    app: Any = dashboard(SQLiteBackend(str(path)))
    async with client(app) as http:
        assert 'data-task="x1"' in (await http.get("/tasks")).text
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    with pytest.raises(RuntimeError, match="before the backend is open"):
        await app.tasks.stats()


async def test_mounted_in_starlette_every_link_and_action_is_under_the_mount(tasks: AsyncTasks) -> None:
    starlette_routing = pytest.importorskip("starlette.routing")
    from starlette.applications import Starlette

    await store(tasks.backend, [Planned("d", "app.d", (), state=TaskState.DEAD, error="E: x")])
    app = Starlette(routes=[starlette_routing.Mount("/ops/tasks", app=dashboard(tasks, token=TOKEN))])
    async with client(app) as http:
        overview = await http.get("/ops/tasks/")
        task = await http.get("/ops/tasks/task", params={"id": "d"})
        script = await http.get("/ops/tasks/static/dashboard.js")
        acted = await http.post(
            "/ops/tasks/api/action",
            json={"action": "requeue", "task": "d"},
            headers={**ACT, "X-Lifecycle-Token": TOKEN},
        )
    assert overview.status_code == 200
    links = re.findall(r' (?:href|src|action)="([^"#]+)"', overview.text + task.text)
    assert links
    assert [link for link in links if not link.startswith(("/ops/tasks/", "data:"))] == []
    assert 'data-base="/ops/tasks"' in overview.text
    assert script.status_code == 200
    assert acted.status_code == 200
    assert (await tasks.info("d")).state is TaskState.PENDING  # type: ignore[union-attr]
