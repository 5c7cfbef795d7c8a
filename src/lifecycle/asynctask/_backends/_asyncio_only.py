"""The check the asyncio-only backends (Redis, PostgreSQL) run in ``open()``."""

from __future__ import annotations

from .._errors import BackendError

__all__ = ["require_asyncio"]


def _current_async_library() -> str:
    """``"asyncio"``, ``"trio"`` or ``"none"`` (called outside an event loop)."""
    try:
        import sniffio
    except ImportError:  # trio depends on sniffio, so without it only asyncio can be running
        return "asyncio"
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return "none"


def require_asyncio(backend: str, reason: str) -> None:
    """Raise :class:`BackendError` unless running under asyncio; ``reason`` says why ``backend`` needs it."""
    library = _current_async_library()
    if library != "asyncio":
        raise BackendError(
            f"{backend} needs asyncio, but it runs under {library}: {reason}; run this service with anyio's "
            "asyncio backend (the default), or use SQLiteBackend, which works under trio"
        )
