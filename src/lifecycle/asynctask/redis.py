"""``lifecycle.asynctask.redis``: the public home of :class:`RedisBackend` (extra ``redis``:
``pip install "anyio-lifecycle[redis]"``)."""

from ._backends.redis import RedisBackend as RedisBackend

__all__ = ("RedisBackend",)
