"""lifecycle.asynctask.testing: the public conformance suites every backend runs unchanged.

- :class:`BackendConformance` checks a :class:`~lifecycle.asynctask.Backend` implementation against every
  rule of the protocol (``docs/backend-protocol.md``).
- :class:`EngineConformance` runs :class:`~lifecycle.asynctask.AsyncTasks` end to end over a backend.

Both are pytest test base classes: subclass them in a test module and provide a ``backend_factory`` fixture.
Importing this package needs pytest, a test-time dependency only.
"""

from ._backend_suite import BackendConformance as BackendConformance
from ._engine_suite import EngineConformance as EngineConformance
from ._support import T0 as T0
from ._support import BackendFactory as BackendFactory

__all__ = ("BackendConformance", "BackendFactory", "EngineConformance", "T0")
