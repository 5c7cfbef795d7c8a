"""lifecycle.asynctask.testing: the public conformance suites every backend runs unchanged.

``BackendConformance`` checks a :class:`~lifecycle.asynctask.Backend` implementation against the protocol.
Both are pytest test base classes: importing this package needs pytest (a test-time dependency only).
"""

from ._backend_suite import BackendConformance as BackendConformance
from ._support import T0 as T0
from ._support import BackendFactory as BackendFactory

__all__ = ("BackendConformance", "BackendFactory", "T0")
