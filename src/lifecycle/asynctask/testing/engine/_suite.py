"""The public :class:`EngineConformance` suite: AsyncTasks end to end on a backend, as pytest tests."""

from __future__ import annotations

from ._rules_compose import ComposeRules
from ._rules_control import ControlRules
from ._rules_flow import FlowRules
from ._rules_groups import FanInRules
from ._rules_ops import OperationRules
from ._rules_run import RunRules
from ._rules_running import RunningWorkRules

__all__ = ["EngineConformance"]


class EngineConformance(
    RunRules, FlowRules, OperationRules, ComposeRules, ControlRules, RunningWorkRules, FanInRules
):
    """End-to-end tests of :class:`~lifecycle.asynctask.AsyncTasks` over a backend, to subclass in a pytest
    test module: the engine's promises (results, retries and dead tasks, Retry/Abort, timeouts, delays,
    poisoned payloads and tasks raising ``KeyboardInterrupt`` failing alone while the worker goes on,
    strict and weighted queues, idempotent ids, cancel/requeue/purge, recovery of a dead worker's tasks,
    retention, the concurrency limit, graceful shutdown, chains passing results on and stopping at a dead
    step, schedules firing once per fire time across schedulers sharing the storage; flow control: priorities,
    debounce, expiry, paused queues, rate and concurrency limits, uniqueness windows; control of running
    work: cancelling running tasks, in this process or another, async or plain ``def``, progress reports,
    groups fanning in once with their results in call order, groups as chain steps) must hold on every
    backend.

    Provide the same ``backend_factory`` fixture as for
    :class:`~lifecycle.asynctask.testing.BackendConformance`: an async callable that opens and returns a new
    backend object over the test's (initially empty) storage on every call. Each test builds its
    ``AsyncTasks`` with a manual clock and short poll intervals, runs workers the way a ``TaskManager`` does
    (``execute`` in the background, cancelled at shutdown), and synchronises on events and on
    ``AsyncTasks.wait``, never on sleeps.

    Example::

        import pytest
        from lifecycle.asynctask.testing import EngineConformance
        from mypackage import MyBackend

        class TestMyBackendEngine(EngineConformance):
            @pytest.fixture
            def backend_factory(self, tmp_path):
                async def open_backend():
                    backend = MyBackend(tmp_path / "tasks.db")
                    await backend.open()
                    return backend

                return open_backend
    """
