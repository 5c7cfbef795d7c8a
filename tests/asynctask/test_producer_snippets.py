"""The Flask and Django snippets of docs/asynctask.md ("Synchronous producers") work as written.

The blocks are taken from the page by their first line (``# app/tasks.py``, ``# app/web.py``,
``# app/views.py``), written to an ``app`` package in a temporary directory, and driven in a fresh
interpreter (Django's settings are process-wide): Flask's test client from eight threads at once, Django's
test client, then a worker over the same SQLite file runs every task the views enqueued.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "asynctask.md").read_text()

DRIVER = textwrap.dedent(
    """
    import concurrent.futures
    import json
    import sys

    import anyio

    from app.tasks import tasks


    def flask_requests():
        from app.web import app

        def request(user_id):
            response = app.test_client().post(f"/users/{user_id}/welcome")
            assert response.status_code == 202, response.data
            return response.get_json()["task_id"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(request, range(40)))


    def django_requests():
        import django
        from django.conf import settings

        settings.configure(ROOT_URLCONF="app.urls", ALLOWED_HOSTS=["testserver"], MIDDLEWARE=[])
        django.setup()
        from django.test import Client

        ids = []
        for user_id in (7, 8):
            response = Client().post(f"/users/{user_id}/welcome")
            assert response.status_code == 202, response.content
            ids.append(response.json()["task_id"])
        return ids


    async def run_worker(ids):
        async with tasks, anyio.create_task_group() as group:
            group.start_soon(tasks.execute)
            states = [(await tasks.wait(task_id, timeout=60)).state.value for task_id in ids]
            group.cancel_scope.cancel()
        return states


    ids = flask_requests() if sys.argv[1] == "flask" else django_requests()
    print(json.dumps({"ids": ids, "states": anyio.run(run_worker, ids)}))
    """
)

URLS = textwrap.dedent(
    """
    from django.urls import path

    from app import views

    urlpatterns = [path("users/<int:user_id>/welcome", views.welcome)]
    """
)


def snippet(first_line: str) -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)\n```", DOCS, flags=re.S)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"docs/asynctask.md must hold one python block starting with {first_line!r}"
    return found[0] + "\n"


@pytest.mark.parametrize("framework", ["flask", "django"])
def test_the_documented_views_enqueue_from_synchronous_code(framework: str, tmp_path: Path) -> None:
    if framework == "django":
        pytest.importorskip("django", reason="Django is in the test extra: pip install -e '.[test]'")
    app = tmp_path / "app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "tasks.py").write_text(snippet("# app/tasks.py"))
    (app / "web.py").write_text(snippet("# app/web.py"))
    (app / "views.py").write_text(snippet("# app/views.py"))
    (app / "urls.py").write_text(URLS)
    env = {**os.environ, "TASKS_URL": f"sqlite:///{tmp_path / 'tasks.db'}", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, framework], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    expected = 40 if framework == "flask" else 2
    assert len(set(report["ids"])) == expected
    assert report["states"] == ["succeeded"] * expected
