"""Redis (extra ``redis``): Lua scripts for every state change."""

from ._backend import RedisBackend as RedisBackend

__all__ = ("RedisBackend",)
