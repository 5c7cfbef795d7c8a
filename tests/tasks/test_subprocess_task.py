"""Subprocess: real child processes started, made ready, watched, and stopped (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import lifecycle
from lifecycle.tasks import ProcessExitedError, Subprocess


def python(code: str) -> list[str]:
    """A command running ``code`` in a fresh, unbuffered Python."""
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


SERVER = python(
    """
    import time
    print("booting")
    print("listening on port 1234")
    time.sleep(3600)
    """
)


def output_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The child's output lines as logged (``name[pid] | line``), without the prefix."""
    return [
        r.getMessage().split(" | ", 1)[1]
        for r in caplog.records
        if r.name == "lifecycle.tasks" and " | " in r.getMessage()
    ]


@pytest.fixture(autouse=True)
def _capture_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lifecycle")


def gone(pid: int) -> bool:
    """Whether no process with this id exists any more (it was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_waits_for_ready_then_sigterm_stops_it(caplog: pytest.LogCaptureFixture) -> None:
    child = Subprocess(SERVER, ready=lambda line: line.startswith("listening"), name="server")
    with anyio.fail_after(20):
        await child.initialize()
        pid = child.pid
        assert pid is not None
        code_while_running = child.returncode
        assert code_while_running is None
        assert output_lines(caplog) == ["booting", "listening on port 1234"]
        await child.cleanup()
    assert child.returncode == -signal.SIGTERM
    assert child.pid is None
    assert gone(pid)
    messages = [r.getMessage() for r in caplog.records if r.name == "lifecycle.tasks"]
    assert f"server[{pid}] | booting" in messages
    assert any("stopped (was killed by SIGTERM)" in m for m in messages)


async def test_sigkill_after_stop_timeout_when_sigterm_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    stubborn = python(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(3600)
        """
    )
    child = Subprocess(stubborn, ready=lambda line: line == "ready", stop_timeout=0.2)
    with anyio.fail_after(20):
        await child.initialize()
        await child.cleanup()
    assert child.returncode == -signal.SIGKILL
    assert any("sending SIGKILL" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_exit_before_ready_is_an_error_with_exit_code_and_last_lines() -> None:
    broken = python(
        """
        import sys
        print("loading configuration")
        print("error: DATABASE_URL is not set", file=sys.stderr)
        sys.exit(3)
        """
    )
    child = Subprocess(broken, ready=lambda line: "listening" in line, name="api")
    with anyio.fail_after(20), pytest.raises(ProcessExitedError) as caught:
        await child.initialize()
    error = caught.value
    assert isinstance(error, lifecycle.UnexpectedStopError)
    assert error.returncode == 3
    assert error.output == ("loading configuration", "error: DATABASE_URL is not set")
    message = str(error)
    assert "api: the child process exited with code 3 before it was ready" in message
    assert "DATABASE_URL is not set" in message
    assert child.pid is None
    assert child.returncode == 3


async def test_unexpected_exit_while_running_raises_with_the_exit_code() -> None:
    crashing = python(
        """
        import sys
        print("ready")
        sys.stdin.read()  # stdin is /dev/null: returns at once
        print("fatal: lost the connection")
        sys.exit(2)
        """
    )
    child = Subprocess(crashing, ready=lambda line: line == "ready", name="worker")
    with anyio.fail_after(20):
        await child.initialize()
        with pytest.raises(ProcessExitedError) as caught:
            await child.execute()
        await child.cleanup()  # the child has exited already: nothing to stop, nothing fails
    assert caught.value.returncode == 2
    assert "worker: the child process exited with code 2 while the service was running" in str(caught.value)
    assert "fatal: lost the connection" in str(caught.value)


async def test_killed_by_a_signal_is_named_in_the_error() -> None:
    child = Subprocess(python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    with anyio.fail_after(20):
        await child.initialize()
        with pytest.raises(ProcessExitedError, match="was killed by SIGKILL") as caught:
            await child.execute()
        await child.cleanup()
    assert caught.value.returncode == -signal.SIGKILL
    assert "it wrote no output" in str(caught.value)


async def test_exit_code_zero_returns_and_all_output_is_logged_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    child = Subprocess(python("for i in range(5): print(f'line {i}')"))
    with anyio.fail_after(20):
        await child.initialize()  # no ready: returns once started
        await child.execute()
        await child.cleanup()
    assert output_lines(caplog) == [f"line {i}" for i in range(5)]
    assert child.returncode == 0


async def test_env_and_cwd_are_passed_to_the_child(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    child = Subprocess(
        python("import os; print(os.environ['GREETING']); print(os.getcwd())"),
        env={"GREETING": "hello child", "PATH": os.environ.get("PATH", "")},
        cwd=tmp_path,
    )
    with anyio.fail_after(20):
        await child.initialize()
        await child.execute()
        await child.cleanup()
    assert output_lines(caplog) == ["hello child", str(tmp_path.resolve())]


async def test_a_failing_ready_check_stops_the_child_and_propagates() -> None:
    def ready(line: str) -> bool:
        raise ValueError(f"cannot parse {line!r}")

    child = Subprocess(SERVER, ready=ready)
    with anyio.fail_after(20), pytest.raises(ValueError, match="cannot parse 'booting'"):
        await child.initialize()
    assert child.pid is None
    assert child.returncode == -signal.SIGTERM


async def test_cancelled_initialize_stops_the_child() -> None:
    asked = anyio.Event()

    def never_ready(line: str) -> bool:
        asked.set()
        return False

    child = Subprocess(SERVER, ready=never_ready)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(child.initialize)
            await asked.wait()
            task_group.cancel_scope.cancel()
    assert child.pid is None
    assert child.returncode == -signal.SIGTERM


async def test_output_is_drained_while_stopping_so_a_chatty_child_exits() -> None:
    # On SIGTERM the child writes far more than a pipe buffer holds; unread, it would block and be killed.
    chatty = python(
        """
        import signal, sys, time
        def goodbye(*_):
            for i in range(4000):
                print(f"flushing record {i:05d} " + "x" * 60)
            sys.exit(0)
        signal.signal(signal.SIGTERM, goodbye)
        print("ready")
        time.sleep(3600)
        """
    )
    child = Subprocess(chatty, ready=lambda line: line == "ready", stop_timeout=15)
    with anyio.fail_after(30):
        await child.initialize()
        await child.cleanup()
    assert child.returncode == 0
    assert child.output[-1].startswith("flushing record 03999")


async def test_initialize_twice_without_cleanup_is_refused() -> None:
    child = Subprocess(SERVER, ready=lambda line: line == "booting")
    with anyio.fail_after(20):
        await child.initialize()
        try:
            with pytest.raises(RuntimeError, match="already running"):
                await child.initialize()
        finally:
            await child.cleanup()
        await child.initialize()  # a new child after cleanup (what a hot reload does)
        await child.cleanup()


async def test_execute_before_initialize_is_refused() -> None:
    with pytest.raises(RuntimeError, match="call initialize"):
        await Subprocess(SERVER).execute()


async def test_missing_program_fails_initialize_clearly() -> None:
    with pytest.raises(FileNotFoundError):
        await Subprocess(["/nonexistent/program-for-lifecycle-tests"]).initialize()


async def test_strict_child_exit_fails_the_manager_with_the_exit_code() -> None:
    manager = lifecycle.TaskManager(name="subprocess-test")
    manager.add_task("worker", Subprocess(python("import sys; print('ready'); sys.exit(4)")))
    with anyio.fail_after(20), pytest.raises(lifecycle.TaskManagerError) as caught:
        await manager.run()
    (error,) = caught.value.errors
    assert (error.task_name, error.stage) == ("worker", lifecycle.Stage.EXECUTE)
    assert isinstance(error.__cause__, ProcessExitedError)
    assert error.__cause__.returncode == 4


async def test_stop_group_child_that_finishes_stops_the_manager_cleanly() -> None:
    manager = lifecycle.TaskManager(name="subprocess-test")
    server = Subprocess(SERVER, ready=lambda line: line.startswith("listening"))
    manager.add_task("server", server)
    manager.add_task("job", Subprocess(python("print('job done')")), lifecycle.TaskType.STOP_GROUP)
    with anyio.fail_after(20):
        await manager.run()  # the job's exit 0 ends the STOP_GROUP; the server is then stopped by cleanup
    assert server.returncode == -signal.SIGTERM


async def test_shutdown_stops_a_running_child_through_cleanup() -> None:
    manager = lifecycle.TaskManager(name="subprocess-test")
    server = Subprocess(SERVER, ready=lambda line: line.startswith("listening"))
    manager.add_task("server", server)

    async def stop() -> None:
        assert server.pid is not None
        manager.shutdown()

    manager.add_execute_task("stop", stop, lifecycle.TaskType.ERROR)
    with anyio.fail_after(20):
        await manager.run()
    assert server.returncode == -signal.SIGTERM


def test_process_exited_error_survives_pickling() -> None:
    error = ProcessExitedError("x exited with code 1", 1, ["a", "b"])
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.returncode, copy.output) == ("x exited with code 1", 1, ("a", "b"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"args": []}, ValueError, "args is empty"),
        ({"args": "   "}, ValueError, "args is empty"),
        ({"args": b"ls"}, TypeError, "list of program and arguments"),
        ({"args": ["ls"], "stop_timeout": 0}, ValueError, "stop_timeout must be a finite number of seconds"),
        ({"args": ["ls"], "stop_timeout": float("inf")}, ValueError, "stop_timeout must be a finite number"),
        ({"args": ["ls"], "stop_timeout": "10"}, TypeError, "stop_timeout must be a number of seconds"),
        ({"args": ["ls"], "name": ""}, ValueError, "Subprocess name must be a non-empty string"),
        ({"args": ["ls"], "ready": "ready"}, TypeError, "ready must be a callable"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Subprocess(**kwargs)  # type: ignore[arg-type]


def test_names_default_to_the_program() -> None:
    assert Subprocess(["/usr/bin/redis-server", "--port", "1"]).name == "redis-server"
    assert Subprocess("nginx -g 'daemon off;'").name == "nginx"
    assert Subprocess(["x"], name="cache").name == "cache"
    assert isinstance(Subprocess(["x"]), lifecycle.Task)
    assert repr(Subprocess(["x"])) == "<Subprocess x (not running)>"


async def test_long_lines_are_split_and_odd_bytes_survive(caplog: pytest.LogCaptureFixture) -> None:
    child = Subprocess(
        python(r"""
        import sys
        sys.stdout.buffer.write(b"a" * 70000 + b"\nwindows\r\n\xff\xfe bad\nno newline at the end")
        """)
    )
    with anyio.fail_after(20):
        await child.initialize()
        await child.execute()
        await child.cleanup()
    assert output_lines(caplog) == [
        "a" * 65536,
        "a" * 4464,
        "windows",
        "\ufffd\ufffd bad",
        "no newline at the end",
    ]
