"""PostgreSQL (extra ``postgres``): psycopg 3, ``FOR UPDATE SKIP LOCKED`` claims."""

from ._backend import PostgresBackend as PostgresBackend

__all__ = ("PostgresBackend",)
