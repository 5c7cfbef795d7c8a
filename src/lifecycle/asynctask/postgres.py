"""``lifecycle.asynctask.postgres``: the public home of :class:`PostgresBackend` (extra ``postgres``:
``pip install "anyio-lifecycle[postgres]"``)."""

from ._backends.postgres import PostgresBackend as PostgresBackend
from ._names import publish as _publish

__all__ = ("PostgresBackend",)

_publish(globals())  # PostgresBackend.__module__ is this module, as for every public object
del _publish
