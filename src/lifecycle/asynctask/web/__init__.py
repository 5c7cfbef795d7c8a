"""``lifecycle.asynctask.web``: a web dashboard of a task store, as an ASGI application.

:func:`dashboard` needs nothing beyond the package: plain ASGI, server-rendered pages, a little hand-written
JavaScript and CSS shipped inside it. The ``web`` extra (``pip install "anyio-lifecycle[web]"``) brings the
ASGI server that ``lifecycle tasks --backend URL web`` serves it with.
"""

from ._app import dashboard as dashboard

__all__ = ("dashboard",)

dashboard.__module__ = __name__  # the public home, in reprs and docs
