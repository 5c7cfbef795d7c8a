"""Module names: the one that stands for ``__main__`` in stored names (so a script and the processes that
import it as a module name its functions and classes alike), and the public module each public object
reports (:func:`publish`)."""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from types import FunctionType, GenericAlias
from typing import Any

__all__ = ["public_module", "publish"]


def public_module(module: str) -> str:
    """``module``, or for ``"__main__"`` the name the running script has when imported: its module name
    under ``python -m package.module``, its file name without ``.py`` under ``python path/service.py``.

    So ``@tasks.register`` in ``service.py`` names a function ``service.send_welcome`` both in
    ``python service.py`` and in ``lifecycle worker service:tasks``, which imports ``service``. When the
    script has no file (an interactive session, ``python -c``) the name stays ``"__main__"``.
    """
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name:
        return name
    path = getattr(main, "__file__", None)
    if isinstance(path, str):
        stem = Path(path).stem
        if stem.isidentifier():
            return stem
    return module


def publish(namespace: dict[str, Any]) -> None:
    """Make every class and function a public module re-exports (its ``__all__``) report that module as its
    ``__module__``, as anyio, trio and httpx do: reprs, tracebacks, pickles and documentation then name the
    public path (``lifecycle.asynctask.TaskInfo``), never the private module that defines it.

    A class's own string annotations (``from __future__ import annotations``) are resolved first, where they
    were written, so ``typing.get_type_hints`` (pydantic, FastAPI, cattrs) still works on it afterwards.
    Constants and type aliases in ``__all__`` are left alone: they have no module of their own.
    """
    module = namespace["__name__"]
    for name in namespace["__all__"]:
        value = namespace[name]
        if isinstance(value, GenericAlias):  # an alias such as Callable[...] (a "type" on Python 3.10)
            continue
        if isinstance(value, type):
            own = inspect.get_annotations(value)
            if own:
                hints = typing.get_type_hints(value, include_extras=True)
                value.__annotations__ = {key: hints[key] for key in own}
        elif not isinstance(value, FunctionType):
            continue
        value.__module__ = module
