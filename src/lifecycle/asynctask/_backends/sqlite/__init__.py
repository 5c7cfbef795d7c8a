"""The embedded default: one SQLite file, several processes."""

from ._backend import SQLiteBackend as SQLiteBackend

__all__ = ("SQLiteBackend",)
