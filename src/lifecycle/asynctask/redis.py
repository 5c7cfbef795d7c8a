"""``lifecycle.asynctask.redis``: the public home of :class:`RedisBackend` (extra ``redis``:
``pip install "anyio-lifecycle[redis]"``)."""

from ._backends.redis import RedisBackend as RedisBackend
from ._names import publish as _publish

__all__ = ("RedisBackend",)

_publish(globals())  # RedisBackend.__module__ is this module, as for every public object
del _publish
