"""lifecycle.asynctask: durable asynchronous tasks as one managed lifecycle Task."""

from ._backend import Backend as Backend
from ._backend import TransactionalBackend as TransactionalBackend
from ._errors import BackendError as BackendError
from ._errors import DuplicateTaskError as DuplicateTaskError
from ._records import ClaimedTask as ClaimedTask
from ._records import NewTask as NewTask
from ._records import Settlement as Settlement
from ._records import TaskRecord as TaskRecord
from ._records import TaskState as TaskState

__all__ = (
    "Backend",
    "BackendError",
    "ClaimedTask",
    "DuplicateTaskError",
    "NewTask",
    "Settlement",
    "TaskRecord",
    "TaskState",
    "TransactionalBackend",
)
