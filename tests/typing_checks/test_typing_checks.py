"""mypy and pyright report exactly the lines of ``enqueue_checks.py`` marked ``# error``: typed task calls
flag a wrong argument count or type at the call site, and correct calls are clean.

The checkers run as subprocesses on that file, with the project's settings (``pyproject.toml``: mypy
``strict``), so a change to the typing of ``enqueue``, ``Call`` or the producer that loses an error, or
reports one on a correct call, fails here and in CI.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.asynctask import AsyncTasks, BlockingProducer, Call
from lifecycle.asynctask._model import CallOptions, EnqueueOptions

ROOT = Path(__file__).resolve().parents[2]
CHECKED = Path(__file__).with_name("enqueue_checks.py")


def expected_lines() -> set[int]:
    lines = CHECKED.read_text().splitlines()
    marked = {number for number, line in enumerate(lines, start=1) if line.rstrip().endswith("# error")}
    assert len(marked) >= 20, "the checked file lost its wrong calls"
    return marked


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_mypy_reports_exactly_the_wrong_calls(tmp_path: Path) -> None:
    result = run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "--no-error-summary", str(CHECKED)]
    )
    reported: set[int] = set()
    for line in result.stdout.splitlines():
        path, _, rest = line.partition(":")
        number, _, message = rest.partition(":")
        if path.endswith("enqueue_checks.py") and message.strip().startswith("error"):
            reported.add(int(number))
        elif ": error:" in line:
            pytest.fail(f"mypy reports an error outside the checked file: {line}")
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert sorted(reported - expected_lines()) == [], "correct calls that mypy flags:\n" + result.stdout
    assert sorted(expected_lines() - reported) == [], "wrong calls that mypy misses:\n" + result.stdout


@pytest.mark.slow
def test_pyright_reports_exactly_the_wrong_calls() -> None:
    pyright = shutil.which("pyright", path=os.path.dirname(sys.executable)) or shutil.which("pyright")
    assert pyright is not None, 'pyright is part of the test extra: pip install -e ".[test]"'
    result = run([pyright, "--outputjson", "--pythonpath", sys.executable, str(CHECKED)])
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not run: {result.stdout}\n{result.stderr}")
    errors = [item for item in report["generalDiagnostics"] if item["severity"] == "error"]
    reported = {item["range"]["start"]["line"] + 1 for item in errors}
    text = "\n".join(f"{item['range']['start']['line'] + 1}: {item['message']}" for item in errors)
    assert sorted(reported - expected_lines()) == [], "correct calls that pyright flags:\n" + text
    assert sorted(expected_lines() - reported) == [], "wrong calls that pyright misses:\n" + text


def keyword_only(function: object) -> set[str]:
    parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    return {parameter.name for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY}


def test_the_typed_options_are_the_run_time_keyword_options() -> None:
    """The overloads take ``**options: Unpack[...]``: the TypedDicts must list what the run-time signatures
    take, or type checkers would refuse a real option (or accept a missing one)."""
    assert set(CallOptions.__annotations__) == keyword_only(Call.__init__)
    enqueue_options = set(EnqueueOptions.__annotations__) | set(CallOptions.__annotations__)
    assert enqueue_options == keyword_only(AsyncTasks.enqueue)
    assert enqueue_options == keyword_only(BlockingProducer.enqueue)
