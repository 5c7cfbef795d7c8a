"""The module name that stands for ``__main__`` in stored names, so a script and the processes that import
it as a module name its functions and classes alike."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["public_module"]


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
