"""lifecycle: one well-behaved ``main()`` for a Python service, on anyio (asyncio and trio)."""

from ._backoff import Backoff as Backoff
from ._errors import TaskError as TaskError
from ._errors import TaskManagerError as TaskManagerError
from ._errors import UnexpectedStopError as UnexpectedStopError
from ._events import EventKind as EventKind
from ._events import LifecycleEvent as LifecycleEvent
from ._handle import ExecuteHandle as ExecuteHandle
from ._manager import TaskManager as TaskManager
from ._metrics import Metrics as Metrics
from ._readiness import Health as Health
from ._readiness import TaskHealth as TaskHealth
from ._restart import Restart as Restart
from ._run import run as run
from ._status import TaskStatus as TaskStatus
from ._task import ExecuteTask as ExecuteTask
from ._task import ManagerState as ManagerState
from ._task import Stage as Stage
from ._task import Task as Task
from ._task import TaskType as TaskType
from ._version import __version__ as __version__

__all__ = (
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
