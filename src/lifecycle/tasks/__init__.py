"""Ready-made tasks for a :class:`~lifecycle.TaskManager`.

- :class:`Repeat`: call an async function every ``interval`` seconds (an ExecuteTask).
- :class:`Timer`: return after some seconds; add it as ``STOP_GROUP`` to run a service for a while.
- :class:`Interruptible`: reload a Task (cleanup, initialize, execute again) on SIGHUP.
- :class:`Subprocess`: run an OS child process as a Task, with a readiness check and a graceful stop.
- :class:`HealthServer`: serve a manager's liveness, readiness, status and metrics over HTTP.
- :class:`ASGIServer`: serve an ASGI application (FastAPI, Starlette...) with hypercorn or uvicorn.

They log through the ``lifecycle.tasks`` logger. Each reports ``lifecycle.tasks`` as its ``__module__`` (its
private module is an implementation detail), so reprs, pickles and documentation name the public path.
"""

from ._asgi import ASGIServer as ASGIServer
from ._health import HealthServer as HealthServer
from ._interruptible import Interruptible as Interruptible
from ._repeat import Repeat as Repeat
from ._subprocess import ProcessExitedError as ProcessExitedError
from ._subprocess import Subprocess as Subprocess
from ._timer import Timer as Timer

__all__ = (
    "ASGIServer",
    "HealthServer",
    "Interruptible",
    "ProcessExitedError",
    "Repeat",
    "Subprocess",
    "Timer",
)

for _public in __all__:
    if getattr(globals()[_public], "__module__", "").startswith(f"{__name__}._"):
        globals()[_public].__module__ = __name__
del _public
