"""The one hint for an optional dependency that is not installed: which extra brings it, and the pip command.

Used by the backend modules' imports (``lifecycle.asynctask.redis``, ``.postgres``) and by
``backend_from_url``, so every way in says the same thing.
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["EXTRA_PACKAGES", "raise_missing_extra"]

#: The top-level packages each extra installs (the ones an import of its backend needs).
EXTRA_PACKAGES: dict[str, tuple[str, ...]] = {
    "redis": ("redis",),
    "postgres": ("psycopg", "psycopg_pool"),
    "nats": ("nats",),
}


def raise_missing_extra(exc: ModuleNotFoundError, extra: str) -> NoReturn:
    """Raise ``ImportError`` naming the missing package and ``pip install "anyio-lifecycle[EXTRA]"`` when
    ``exc`` is about one of ``extra``'s packages; re-raise ``exc`` unchanged when it is about anything else.

    Example::

        try:
            import redis.asyncio
        except ModuleNotFoundError as exc:
            raise_missing_extra(exc, "redis")
    """
    missing = (exc.name or "").partition(".")[0]
    if missing in EXTRA_PACKAGES[extra]:
        raise ImportError(
            f"the {extra} backend needs the optional dependency {missing!r}, which is not installed: "
            f'pip install "anyio-lifecycle[{extra}]"'
        ) from exc
    raise exc
