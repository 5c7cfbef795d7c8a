"""Serving the dashboard: from ``HealthServer(dashboard=...)`` on the probes' port (asyncio and trio), and
from ``lifecycle tasks web`` (its URL, its refusals, SIGTERM, requests for other host names)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import httpx
import pytest

import lifecycle
from lifecycle.asynctask import AsyncTasks, SQLiteBackend, TaskState
from lifecycle.asynctask.web import dashboard
from lifecycle.tasks import HealthServer
from tests.cli.cli_support import lifecycle as run_cli
from tests.web.web_support import Planned, store, store_at, web_server

TOKEN = "serving-token"
ACT = {"X-Lifecycle-Dashboard": "1", "Content-Type": "application/json"}


async def test_the_health_server_serves_the_dashboard_beside_the_probes(tmp_path: Path) -> None:
    tasks = AsyncTasks(SQLiteBackend(str(tmp_path / "tasks.db")), execution=False)
    manager = lifecycle.TaskManager(name="svc")
    health = HealthServer(manager, port=0, dashboard=dashboard(tasks, token=TOKEN))
    read_only = HealthServer(manager, port=0, dashboard=tasks)
    manager.add_task("health", health)
    manager.add_task("health-read-only", read_only)
    manager.add_task("tasks", tasks)
    ready = anyio.Event()
    manager.add_listener(lambda event: ready.set() if event.kind is lifecycle.EventKind.READY else None)
    failure: list[BaseException] = []

    async def run() -> None:
        try:
            await manager.run()
        except Exception as exc:
            failure.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        with anyio.fail_after(20):
            await ready.wait()
            await store(tasks.backend, [Planned("d", "app.d", (), state=TaskState.DEAD, error="E: boom")])
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{health.port}") as http:
                assert (await http.get("/readyz")).status_code == 200
                overview = await http.get("/tasks/")
                task = await http.get("/tasks/task", params={"id": "d"})
                script = await http.get("/tasks/static/dashboard.js")
                refused = await http.post(
                    "/tasks/api/action", json={"action": "requeue", "task": "d"}, headers=ACT
                )
                acted = await http.post(
                    "/tasks/api/action",
                    json={"action": "requeue", "task": "d"},
                    headers={**ACT, "X-Lifecycle-Token": TOKEN},
                )
                other = await http.post("/livez")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{read_only.port}") as http:
                plain = await http.get("/tasks")
                off = await http.post(
                    "/tasks/api/action",
                    json={"action": "requeue_dead", "queue": "default"},
                    headers={**ACT, "X-Lifecycle-Token": TOKEN},
                )
        manager.shutdown()
    assert failure == []
    assert overview.status_code == 200
    assert 'tr data-queue="default"' in overview.text
    assert 'href="/tasks/task?id=d"' in overview.text
    assert overview.headers["content-security-policy"].startswith("default-src 'none'")
    assert "E: boom" in task.text
    assert script.status_code == 200
    assert refused.status_code == 401
    assert acted.json() == {"ok": True, "message": "requeued task d: it is pending again"}
    assert other.status_code == 405
    assert plain.status_code == 200
    assert "data-action" not in plain.text
    assert off.status_code == 403


def test_the_health_server_refuses_a_dashboard_it_cannot_serve() -> None:
    manager = lifecycle.TaskManager()
    with pytest.raises(TypeError, match="dashboard= must be an AsyncTasks, a Backend or the ASGI app"):
        HealthServer(manager, dashboard="sqlite:///tasks.db")  # type: ignore[arg-type]


# -- lifecycle tasks web ------------------------------------------------------------------------------------


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    store_at(url, [Planned("d", "app.d", (), state=TaskState.DEAD, error="E: x")])
    return url


def test_the_web_command_serves_until_sigterm(store_url: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    with web_server(
        "tasks", "--backend", store_url, "web", "--port", "0", "--token-file", str(token_file)
    ) as server:
        page = httpx.get(server.url, timeout=10)
        acted = httpx.post(
            f"{server.url}api/action",
            json={"action": "requeue", "task": "d"},
            headers={**ACT, "X-Lifecycle-Token": TOKEN},
            timeout=10,
        )
        rebound = httpx.get(server.url, headers={"Host": "evil.example:8181"}, timeout=10)
        local = httpx.get(server.url.replace("127.0.0.1", "localhost"), timeout=10)
        assert server.stop() == 0
    assert page.status_code == 200
    assert acted.status_code == 200
    assert rebound.status_code == 421
    assert local.status_code == 200


def test_the_web_command_without_a_token_is_read_only(store_url: str) -> None:
    with web_server("tasks", "--backend", store_url, "web", "--port", "0") as server:
        assert "read-only: pass --token or --token-file to allow actions" in server.banner
        refused = httpx.post(
            f"{server.url}api/action", json={"action": "requeue", "task": "d"}, headers=ACT, timeout=10
        )
    assert refused.status_code == 403
    with web_server(
        "tasks", "--backend", store_url, "web", "--port", "0", "--token", TOKEN, "--read-only"
    ) as server:
        assert "(read-only)" in server.banner
        refused = httpx.post(
            f"{server.url}api/action",
            json={"action": "requeue", "task": "d"},
            headers={**ACT, "X-Lifecycle-Token": TOKEN},
            timeout=10,
        )
    assert refused.status_code == 403


def test_the_web_command_says_what_is_wrong(store_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = run_cli("tasks", "--backend", store_url, "web", "--port", port)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    no_token = run_cli("tasks", "--backend", store_url, "web", "--token-file", str(empty))
    missing_file = run_cli("tasks", "--backend", store_url, "web", "--token-file", str(tmp_path / "nope"))
    spaced = run_cli("tasks", "--backend", store_url, "web", "--token", "two words")
    both = run_cli("tasks", "--backend", store_url, "web", "--token", "a", "--token-file", str(empty))
    no_store = run_cli("tasks", "--backend", f"sqlite:///{tmp_path / 'absent.db'}", "web")
    assert (busy.returncode, no_token.returncode, missing_file.returncode, spaced.returncode) == (2, 2, 2, 2)
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "is empty: put the token on its first line" in no_token.stderr
    assert "cannot read --token-file" in missing_file.stderr
    assert "--token must be non-empty printable text without spaces" in spaced.stderr
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr
    assert no_store.returncode == 2
    assert "there is no SQLite database" in no_store.stderr


def test_the_dashboard_needs_no_extra_and_the_command_names_the_one_it_needs(store_url: str) -> None:
    probe = textwrap.dedent(
        f"""
        import sys
        sys.modules["hypercorn"] = None  # as if the web extra were not installed
        import lifecycle.asynctask.web
        from lifecycle.cli import main
        sys.exit(main(["tasks", "--backend", {store_url!r}, "web", "--port", "0"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "the web command needs the ASGI server hypercorn" in result.stderr
    assert 'pip install "anyio-lifecycle[web]"' in " ".join(result.stderr.split())
