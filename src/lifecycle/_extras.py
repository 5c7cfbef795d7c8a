"""The hint for an optional dependency that is not installed: which extra brings it, and the pip command.

It sits at the bottom of the house (it imports nothing of the package), so ``lifecycle.tasks`` can use it
without importing ``lifecycle.asynctask`` (whose backends have a helper of the same shape for their extras).
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["raise_missing_extra"]


def raise_missing_extra(
    exc: ModuleNotFoundError, what: str, extra: str, packages: tuple[str, ...]
) -> NoReturn:
    """Raise ``ImportError`` naming ``what`` needs, the missing package and ``pip install
    "anyio-lifecycle[EXTRA]"`` when ``exc`` is about one of ``packages``; re-raise ``exc`` unchanged when it
    is about anything else (a bug inside an installed package must not pass for a missing extra).

    Example::

        try:
            import hypercorn
        except ModuleNotFoundError as exc:
            raise_missing_extra(exc, "ASGIServer(server='hypercorn')", "asgi", ("hypercorn",))
    """
    missing = (exc.name or "").partition(".")[0]
    if missing in packages:
        raise ImportError(
            f"{what} needs the optional dependency {missing!r}, which is not installed: "
            f'pip install "anyio-lifecycle[{extra}]"'
        ) from exc
    raise exc
