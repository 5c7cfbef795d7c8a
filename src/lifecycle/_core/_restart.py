"""Restart policies: when a failed (or returned) execute is run again, how often, and after what delay.

:class:`Restart` is the public policy. :class:`RestartWindow` applies its intensity (at most ``max_restarts``
restarts within a sliding window of ``within`` seconds, as in Erlang/OTP supervisors). The time they are
measured in comes from the manager's ``clock`` (``TaskManager(clock=..., sleep=..., rng=...)``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from .._checks import check_count, check_seconds
from ._backoff import Backoff

__all__ = ["Restart", "RestartMode", "RestartWindow"]

#: ``"on-failure"``: restart when execute raises (or a STRICT execute returns before shutdown);
#: ``"always"``: also restart an execute that returned.
RestartMode = Literal["on-failure", "always"]

_MODES = ("on-failure", "always")
_DEFAULT_BACKOFF = Backoff(initial=0.1, cap=30.0)


@dataclass(frozen=True, slots=True, init=False)
class Restart:
    """A restart policy for one task: ``add_task(..., restart=)`` or ``add_execute_task(..., restart=)``.

    When the task's ``execute`` fails before shutdown (it raises, or a ``STRICT`` execute returns), the
    manager waits ``backoff.delay(n)`` (``n``: restarts in the current window) and runs it again: a
    :class:`~lifecycle.Task` gets ``cleanup``, ``initialize`` and ``execute`` again, an execute task gets
    ``execute`` again. A failure of that ``cleanup`` or ``initialize`` counts as one more failure of the task.
    With ``mode="always"`` an ``execute`` that returned is restarted too.

    At most ``max_restarts`` restarts may happen within any ``within`` seconds (a sliding window: a restart
    leaves the window exactly ``within`` seconds after it happened). The failure that would exceed it is
    handled as the task's :class:`~lifecycle.TaskType` says without a policy (a raise stops the manager; a
    ``STRICT`` early return is an :class:`~lifecycle.UnexpectedStopError`), and its
    :class:`~lifecycle.TaskError` says how many restarts happened (``error.restarts``). Nothing is restarted
    once shutdown has begun, nor after the task was cancelled through its handle or ``manager.cancel()``.

    ``within`` is a number of seconds or a ``timedelta`` (kept as a ``float`` of seconds).

    Raises ``ValueError`` for an unknown ``mode``, a negative ``max_restarts``, or a ``within`` that is not a
    finite number of seconds greater than zero; ``TypeError`` for a ``max_restarts`` that is not an ``int``,
    a ``within`` that is not a number (``bool`` is not one), or a ``backoff`` that is not a
    :class:`~lifecycle.Backoff`.

    Example::

        manager.add_task("consumer", Consumer(), restart=lifecycle.Restart(max_restarts=3, within=30))
    """

    mode: RestartMode
    max_restarts: int
    within: float
    backoff: Backoff

    # An __init__ of its own (not the dataclass's): it takes a timedelta where the field keeps a float.
    def __init__(
        self,
        mode: RestartMode = "on-failure",
        max_restarts: int = 5,
        within: float | timedelta = 60.0,
        backoff: Backoff = _DEFAULT_BACKOFF,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"Restart mode must be 'on-failure' or 'always', got {mode!r}")
        check_count(max_restarts, "Restart max_restarts")
        seconds = check_seconds(within, "Restart within")
        if not isinstance(backoff, Backoff):
            raise TypeError(f"Restart backoff must be a lifecycle.Backoff, got {backoff!r}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "max_restarts", max_restarts)
        object.__setattr__(self, "within", seconds)
        object.__setattr__(self, "backoff", backoff)

    def describe(self) -> str:
        """A short human-readable form, used in error messages."""
        return f"Restart(mode={self.mode!r}, max_restarts={self.max_restarts}, within={self.within:g})"


class RestartWindow:
    """The restarts of one task within its policy's sliding window.

    A restart recorded at time ``t`` counts against the intensity while ``now - t < within``.
    """

    __slots__ = ("_policy", "_times")

    def __init__(self, policy: Restart) -> None:
        self._policy = policy
        self._times: deque[float] = deque()

    def in_window(self, now: float) -> int:
        """How many restarts happened within the last ``within`` seconds (forgetting older ones)."""
        horizon = now - self._policy.within
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        return len(self._times)

    def allows(self, now: float) -> bool:
        """Whether one more restart at ``now`` stays within ``max_restarts``."""
        return self.in_window(now) < self._policy.max_restarts

    def record(self, now: float) -> int:
        """Record a restart at ``now``; returns its number within the window (1 for the first)."""
        self._times.append(now)
        return self.in_window(now)
