"""The public :class:`BackendConformance` suite: every rule of the Backend protocol as a pytest test."""

from __future__ import annotations

from ._rules_admin import AdminRules
from ._rules_batches import BatchRules
from ._rules_claim import ClaimRules
from ._rules_damage import DamageRules
from ._rules_data import DataRules
from ._rules_enqueue import EnqueueRules
from ._rules_flow import FlowRules
from ._rules_groups import GroupRules
from ._rules_inspect import InspectRules
from ._rules_leases import LeaseRules
from ._rules_races import RaceRules
from ._rules_running import RunningRules
from ._rules_settle import SettleRules
from ._rules_wait import WaitRules

__all__ = ["BackendConformance"]


class BackendConformance(
    EnqueueRules,
    ClaimRules,
    LeaseRules,
    SettleRules,
    WaitRules,
    InspectRules,
    AdminRules,
    DataRules,
    BatchRules,
    RaceRules,
    DamageRules,
    FlowRules,
    RunningRules,
    GroupRules,
):
    """Conformance tests for a :class:`~lifecycle.asynctask.Backend`, to subclass in a pytest test module.

    This is a pytest test base class, so it imports pytest: pytest (and anyio's pytest plugin, which ships
    with anyio) is a test-time dependency only, never needed to *use* a backend.

    Provide a fixture ``backend_factory``: an async callable that opens and returns a new backend object over
    the same storage on every call (several objects stand for several worker processes sharing one
    database). The storage must be empty at the start of every test, so make the fixture function-scoped
    over fresh storage (a ``tmp_path`` file, a unique key prefix or schema). A backend without shared
    storage (an in-process one) may return the same opened object every time. The suite closes every object
    it obtained after each test, so ``close`` must be idempotent.

    The tests are ``async def`` and marked for anyio's pytest plugin, so they run once per value of the
    ``anyio_backend`` fixture (anyio's default: every installed async library). Parametrise it over
    ``"asyncio"`` and ``"trio"`` when the backend supports both, or return ``"asyncio"`` for an asyncio-only
    one. State-changing calls use explicit times (``T0 = 1_000_000.0`` plus offsets), so no test waits for
    the clock; only the ``wait_for_work`` tests use real time, with generous bounds.

    Example::

        import pytest
        from lifecycle.asynctask.testing import BackendConformance
        from mypackage import MyBackend

        class TestMyBackend(BackendConformance):
            @pytest.fixture
            def backend_factory(self, tmp_path):
                async def open_backend():
                    backend = MyBackend(tmp_path / "tasks.db")
                    await backend.open()
                    return backend

                return open_backend

    The damaged-record rules (a record the storage holds but the backend cannot read whole comes back with
    ``TaskRecord.fault``, never blocks its batch and ends dead) run only when the class also implements
    ``async def corrupt_field(self, backend, task_id, field, raw_value) -> bool``, which writes a raw value
    into storage past the backend's checks (see :meth:`corrupt_field`); they skip otherwise.

    Where the protocol's docstrings leave room, the suite takes the stricter reading, so that the engine can
    rely on it: claimed tasks come back in claim order; a lease is lost by a new token or by leaving
    ``ACTIVE``, never by the clock; ``lease_until`` is ``None`` once a task left ``ACTIVE``; requeued tasks
    have ``finished_at = None``; an id repeated inside one batch is a duplicate; ``wait_for_work`` returns
    promptly when work is already due when it is called; an empty ``states`` collection matches nothing;
    ``meta=""`` and ``meta=None`` stay distinct; times keep microsecond precision; every batch method takes
    thousands of items; ``cancel_requested`` is cleared only by ``requeue`` (a task settled back to pending
    keeps it, so its next claim is settled cancelled); ``purge`` counts task records, not the groups it
    removes. ``docs/backend-protocol.md`` lists every rule.

    The notice rules (``wait_for_notices``) run only for a :class:`~lifecycle.asynctask.NotifyingBackend`,
    and skip otherwise.
    """
