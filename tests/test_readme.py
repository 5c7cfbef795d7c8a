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
