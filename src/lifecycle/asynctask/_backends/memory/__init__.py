"""The in-process reference backend (tests, single-process tools)."""

from ._backend import MemoryBackend as MemoryBackend

__all__ = ("MemoryBackend",)
