"""Without an extra installed, importing its backend module and ``backend_from_url`` give the same hint: the
missing package and ``pip install "anyio-lifecycle[EXTRA]"``. The missing package is simulated in a fresh
interpreter by a ``None`` entry in ``sys.modules`` (which makes its import fail as if it were absent)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import sys
    for name in sys.argv[2].split(","):
        sys.modules[name] = None  # as if the package were not installed
    try:
        {action}
    except ImportError as exc:
        print(type(exc).__name__, exc, sep=": ")
    else:
        print("imported")
    """
)


def probe(action: str, hidden: str) -> str:
    """Run ``action`` in a fresh interpreter where the packages ``hidden`` (comma-separated) are missing."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(action=action), "-", hidden],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def hint(extra: str, package: str) -> str:
    return (
        f"ImportError: the {extra} backend needs the optional dependency {package!r}, which is not "
        f'installed: pip install "anyio-lifecycle[{extra}]"'
    )


@pytest.mark.parametrize(
    ("extra", "hidden", "package"),
    [
        ("redis", "redis", "redis"),
        ("postgres", "psycopg", "psycopg"),
        ("postgres", "psycopg_pool", "psycopg_pool"),
        ("nats", "nats", "nats"),
    ],
)
def test_importing_a_backend_module_without_its_extra_says_what_to_install(
    extra: str, hidden: str, package: str
) -> None:
    assert probe(f"import lifecycle.asynctask.{extra}", hidden) == hint(extra, package)


@pytest.mark.parametrize(
    ("url", "extra", "hidden"),
    [
        ("redis://127.0.0.1:6379/0", "redis", "redis"),
        ("postgresql://postgres@127.0.0.1:5432/test", "postgres", "psycopg"),
        ("nats://127.0.0.1:4222", "nats", "nats"),
    ],
)
def test_backend_from_url_gives_the_same_hint(url: str, extra: str, hidden: str) -> None:
    action = f"from lifecycle.asynctask import backend_from_url; backend_from_url({url!r})"
    assert probe(action, hidden) == hint(extra, hidden)


def test_the_core_and_the_sqlite_backend_need_no_extra() -> None:
    action = "import lifecycle, lifecycle.asynctask, lifecycle.tasks, lifecycle.cli"
    assert probe(action, "redis,psycopg,psycopg_pool,nats,croniter,prometheus_client") == "imported"
