"""The README's first screen: its two commands are what CI runs, and its example service really works."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_ci_script_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(commands) >= 2, "the README's first screen must hold the demo and the test command"
    demo, test = commands[0], commands[1]
    assert "examples/tasks_sqlite.py" in demo
    assert "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text(), ".ci/run must call the README's test command verbatim"


def test_the_extras_table_lists_every_extra_with_what_it_installs() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    # Each extra's first requirement (the multi-line ``test`` list is not one users install).
    declared = dict(re.findall(r'^([a-z]+) = \["([A-Za-z0-9_.\-]+)', section, flags=re.M))
    rows = dict(re.findall(r"^\| `([a-z]+)` \| ([^|]+?) \|", README, flags=re.M))
    assert sorted(rows) == sorted(declared), "README's extras table and pyproject's extras differ"
    for extra, requirement in declared.items():
        package = re.split(r"[\[<>=]", requirement)[0]
        assert package.replace("-", "").lower() in rows[extra].replace("-", "").replace(" ", "").lower(), (
            f"README says the {extra!r} extra installs {rows[extra]!r}; pyproject: {requirement!r}"
        )


@pytest.mark.slow
def test_the_readme_example_service_runs_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    code = re.search(r"```python\n(.*?)\n```", README, flags=re.S)
    assert code is not None
    script = tmp_path / "service.py"
    script.write_text(code.group(1))
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )
    assert process.stdout is not None
    welcomed: set[str] = set()
    output: list[str] = []
    try:
        for line in process.stdout:  # the child's own log lines are the synchronisation
            output.append(line)
            welcomed.update(re.findall(r"welcoming user (\d)", line))
            if welcomed == {"0", "1", "2"}:
                break
        assert welcomed == {"0", "1", "2"}, "".join(output)
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    output.append(rest)
    assert process.returncode == 0, "".join(output)
    assert "cleaned up" in rest, "".join(output)
