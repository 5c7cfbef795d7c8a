"""lifecycle.asynctask: durable asynchronous tasks as one managed lifecycle Task."""

from ._async_tasks import AsyncTasks as AsyncTasks
from ._backend import Backend as Backend
from ._backend import NotifyingBackend as NotifyingBackend
from ._backend import TransactionalBackend as TransactionalBackend
from ._backends.memory._backend import MemoryBackend as MemoryBackend
from ._backends.sqlite._backend import SQLiteBackend as SQLiteBackend
from ._blocking import BlockingProducer as BlockingProducer
from ._clock import ManualClock as ManualClock
from ._encoding import Encoding as Encoding
from ._encoding import JSONEncoding as JSONEncoding
from ._encoding import PickleEncoding as PickleEncoding
from ._errors import BackendError as BackendError
from ._errors import DuplicateTaskError as DuplicateTaskError
from ._errors import WorkerLostError as WorkerLostError
from ._model import Abort as Abort
from ._model import Call as Call
from ._model import ChainInfo as ChainInfo
from ._model import ChainStep as ChainStep
from ._model import FlowStats as FlowStats
from ._model import Group as Group
from ._model import GroupInfo as GroupInfo
from ._model import QueueStats as QueueStats
from ._model import Retry as Retry
from ._model import TaskContext as TaskContext
from ._model import TaskFlow as TaskFlow
from ._model import TaskInfo as TaskInfo
from ._names import publish as _publish
from ._observer import TaskObserver as TaskObserver
from ._records import ClaimedTask as ClaimedTask
from ._records import FlowLimits as FlowLimits
from ._records import FlowState as FlowState
from ._records import GroupRecord as GroupRecord
from ._records import NewGroup as NewGroup
from ._records import NewTask as NewTask
from ._records import Notice as Notice
from ._records import ProgressUpdate as ProgressUpdate
from ._records import Settlement as Settlement
from ._records import TaskRecord as TaskRecord
from ._records import TaskState as TaskState
from ._schedule import ScheduleInfo as ScheduleInfo
from ._urls import backend_from_url as backend_from_url

__all__ = (
    "Abort",
    "AsyncTasks",
    "Backend",
    "BackendError",
    "BlockingProducer",
    "Call",
    "ChainInfo",
    "ChainStep",
    "ClaimedTask",
    "DuplicateTaskError",
    "Encoding",
    "FlowLimits",
    "FlowState",
    "FlowStats",
    "Group",
    "GroupInfo",
    "GroupRecord",
    "JSONEncoding",
    "ManualClock",
    "MemoryBackend",
    "NewGroup",
    "NewTask",
    "Notice",
    "NotifyingBackend",
    "PickleEncoding",
    "ProgressUpdate",
    "QueueStats",
    "Retry",
    "SQLiteBackend",
    "ScheduleInfo",
    "Settlement",
    "TaskContext",
    "TaskFlow",
    "TaskInfo",
    "TaskObserver",
    "TaskRecord",
    "TaskState",
    "TransactionalBackend",
    "WorkerLostError",
    "backend_from_url",
)

# Every public object names this module (reprs, tracebacks, pickles, docs), as in anyio and trio.
_publish(globals())
del _publish
