"""lifecycle.asynctask.testing: the public conformance suites every backend runs unchanged.

- :class:`BackendConformance` checks a :class:`~lifecycle.asynctask.Backend` implementation against every
  rule of the protocol (``docs/backend-protocol.md``).
- :class:`EngineConformance` runs :class:`~lifecycle.asynctask.AsyncTasks` end to end over a backend.

Both are pytest test base classes: subclass them in a test module and provide a ``backend_factory`` fixture.
Importing this package needs pytest, a test-time dependency only.
"""

from .._names import publish as _publish
from ._support import T0 as T0
from ._support import BackendFactory as BackendFactory
from .backend._suite import BackendConformance as BackendConformance
from .engine._suite import EngineConformance as EngineConformance

__all__ = ("BackendConformance", "BackendFactory", "EngineConformance", "T0")

_publish(globals())  # the suites name this module, as every public object does
del _publish
