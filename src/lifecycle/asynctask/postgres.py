"""``lifecycle.asynctask.postgres``: the public home of :class:`PostgresBackend` (extra ``postgres``:
``pip install "anyio-lifecycle[postgres]"``)."""

from ._backends.postgres import PostgresBackend as PostgresBackend

__all__ = ("PostgresBackend",)
