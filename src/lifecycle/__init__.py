"""lifecycle: one well-behaved ``main()`` for a Python service, on anyio (asyncio and trio).

The public face: every name is defined in a private module and re-exported here. Each public object reports
``lifecycle`` as its ``__module__`` (as anyio, trio and httpx do), so reprs, pickles and documentation name
the path users import from, never a private module.
"""

from ._core._backoff import Backoff as Backoff
from ._core._errors import TaskError as TaskError
from ._core._errors import TaskManagerError as TaskManagerError
from ._core._errors import UnexpectedStopError as UnexpectedStopError
from ._core._events import EventKind as EventKind
from ._core._events import LifecycleEvent as LifecycleEvent
from ._core._handle import ExecuteHandle as ExecuteHandle
from ._core._manager import TaskManager as TaskManager
from ._core._readiness import Health as Health
from ._core._readiness import TaskHealth as TaskHealth
from ._core._restart import Restart as Restart
from ._core._status import TaskStatus as TaskStatus
from ._core._task import ExecuteTask as ExecuteTask
from ._core._task import ManagerState as ManagerState
from ._core._task import Stage as Stage
from ._core._task import Task as Task
from ._core._task import TaskType as TaskType
from ._metrics import AsyncTasksMetrics as AsyncTasksMetrics
from ._metrics import Metrics as Metrics
from ._run import run as run
from ._version import __version__ as __version__

__all__ = (
    "AsyncTasksMetrics",
    "Backoff",
    "EventKind",
    "ExecuteHandle",
    "ExecuteTask",
    "Health",
    "LifecycleEvent",
    "ManagerState",
    "Metrics",
    "Restart",
    "Stage",
    "Task",
    "TaskError",
    "TaskHealth",
    "TaskManager",
    "TaskManagerError",
    "TaskStatus",
    "TaskType",
    "UnexpectedStopError",
    "__version__",
    "run",
)

for _public in __all__:
    if getattr(globals()[_public], "__module__", "").startswith(f"{__name__}._"):
        globals()[_public].__module__ = __name__
del _public
