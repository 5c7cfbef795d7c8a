"""lifecycle: one well-behaved ``main()`` for a Python service, on anyio (asyncio and trio)."""

from ._backoff import Backoff as Backoff
from ._task import ExecuteTask as ExecuteTask
from ._task import ManagerState as ManagerState
from ._task import Stage as Stage
from ._task import Task as Task
from ._task import TaskType as TaskType
from ._version import __version__ as __version__

__all__ = (
    "Backoff",
    "ExecuteTask",
    "ManagerState",
    "Stage",
    "Task",
    "TaskType",
    "__version__",
)
