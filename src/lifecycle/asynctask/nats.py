"""``lifecycle.asynctask.nats``: the public home of :class:`NatsBackend` (extra ``nats``:
``pip install "anyio-lifecycle[nats]"``)."""

from ._backends.nats import NatsBackend as NatsBackend
from ._names import publish as _publish

__all__ = ("NatsBackend",)

_publish(globals())  # NatsBackend.__module__ is this module, as for every public object
del _publish
