"""`lifecycle --version` and `lifecycle run MODULE:ATTR [--backend ...]`: real runs (a few smoke tests as a
subprocess: the console script, logging set up by the command, the exit status) and clear load errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lifecycle
from lifecycle.cli import main
from lifecycle.cli._load import LoadError, load_manager, load_object
from tests.cli.cli_support import lifecycle as lifecycle_in_process

SERVICE = textwrap.dedent(
    """
    import anyio
    import lifecycle


    class Database:
        async def initialize(self) -> None:
            print("db open", flush=True)

        async def execute(self) -> None:
            await anyio.sleep_forever()

        async def cleanup(self) -> None:
            print("db closed", flush=True)


    async def job() -> None:
        print("job done", flush=True)


    async def broken() -> None:
        raise RuntimeError("the job broke")


    def build(fail: bool = False) -> lifecycle.TaskManager:
        manager = lifecycle.TaskManager(name="cli-service")
        manager.add_task("db", Database())
        manager.add_execute_task("job", broken if fail else job, lifecycle.TaskType.STOP_GROUP)
        return manager


    manager = build()
    failing = build(fail=True)
    not_a_manager = 42


    def returns_wrong_thing() -> int:
        return 1


    def raises_on_call() -> lifecycle.TaskManager:
        raise ValueError("cannot build")
    """
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding `svc_app.py`, made the current directory (as a user would run the command)."""
    (tmp_path / "svc_app.py").write_text(SERVICE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "svc_app", raising=False)
    return tmp_path


def lifecycle_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("lifecycle")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lifecycle.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_version_from_the_console_script(tmp_path: Path) -> None:
    result = lifecycle_command("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"lifecycle {lifecycle.__version__}"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_starts_the_manager_from_the_current_directory_and_exits_0(project: Path, backend: str) -> None:
    result = lifecycle_command("run", "svc_app:manager", "--backend", backend, cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["db open", "job done", "db closed"]
    assert "cli-service: stopped" in result.stderr  # rich logging was configured


def test_run_accepts_a_zero_argument_factory(project: Path) -> None:
    result = lifecycle_in_process("run", "svc_app:build", cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["db open", "job done", "db closed"]


def test_run_returns_1_with_a_report_when_a_task_fails(project: Path) -> None:
    result = lifecycle_command("run", "svc_app:failing", "--backend", "trio", cwd=project)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["db open", "db closed"]
    assert "cli-service: task 'job' failed in execute after " in result.stderr  # stderr is a pipe: log lines
    assert "RuntimeError: the job broke" in result.stderr
    assert ", in broken" in result.stderr  # the traceback names the failing function
    assert "task manager 'cli-service': 1 task error: job in execute (RuntimeError)" in result.stderr


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("svc_app", "'svc_app' is not a MODULE:ATTR target; write it like 'myservice.main:manager'"),
        ("svc_app:", "is not a MODULE:ATTR target"),
        ("no_such_module:manager", "there is no module named 'no_such_module'"),
        (
            "svc_app:missing",
            "'svc_app' has no attribute 'missing'; TaskManagers found there: failing, manager",
        ),
        ("svc_app:manager.nope", "'svc_app.manager' has no attribute 'nope'"),
        ("svc_app:not_a_manager", "it is an int, not a lifecycle.TaskManager"),
        ("svc_app:returns_wrong_thing", "calling it returned an int, expected a lifecycle.TaskManager"),
        ("svc_app:raises_on_call", "calling it raised ValueError: cannot build"),
    ],
)
def test_load_errors_say_what_is_wrong_and_exit_2(
    project: Path, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    assert main(["run", target]) == 2
    err = capsys.readouterr().err
    assert "error: " in err
    assert message in err


def test_an_import_that_fails_inside_the_module_shows_its_traceback(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "svc_broken.py").write_text("import json\nraise ImportError('missing native library')\n")
    assert main(["run", "svc_broken:manager"]) == 2
    err = capsys.readouterr().err
    assert "importing 'svc_broken' raised ImportError: missing native library" in err
    assert "Traceback" in err


def test_load_helpers_resolve_dotted_attributes(project: Path) -> None:
    assert isinstance(load_manager("svc_app:manager"), lifecycle.TaskManager)
    assert load_object("svc_app:manager.name") == "cli-service"
    with pytest.raises(LoadError) as caught:
        load_object("svc_app:manager.missing")
    assert caught.value.__cause__ is None


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "run" in capsys.readouterr().out


def test_unknown_backend_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "svc_app:manager", "--backend", "curio"])
    assert caught.value.code == 2
    assert "invalid choice: 'curio'" in capsys.readouterr().err


def test_lifecycle_run_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match="TaskManager"):
        lifecycle.run(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend 'curio'"):
        lifecycle.run(lifecycle.TaskManager(), backend="curio")
