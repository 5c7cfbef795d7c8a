"""What ``pause`` and ``resume`` share: checking the queue name, changing the stored pause, and the report
(which says when the queue holds no tasks, as a typo would)."""

from __future__ import annotations

import argparse

from ...asynctask._backend import supports_flow_control
from ...asynctask._registry import check_queue
from ._format import CliError, option, print_json
from ._session import Session

__all__ = ["change_pause"]


async def change_pause(args: argparse.Namespace, session: Session, *, pause: bool) -> int:
    """Pause (or resume) ``args.queue``; exit status 0, 2 for a bad name or a store that cannot pause."""
    verb = "pause" if pause else "resume"
    queue = option(check_queue, args.queue, f"lifecycle tasks {verb}")
    tasks = session.tasks
    if not supports_flow_control(tasks.backend):
        raise CliError(f"{type(tasks.backend).__name__} cannot pause queues (it has no flow control)")
    before = await tasks.paused()
    if pause:
        await tasks.pause(queue)
    else:
        await tasks.resume(queue)
    after = await tasks.paused()
    counts = (await tasks.stats()).get(queue)
    if args.json:
        print_json(
            {
                "queue": queue,
                "paused": queue in after,
                "changed": (queue in before) != (queue in after),
                "paused_queues": sorted(after),
                "pending": 0 if counts is None else counts.pending,
            }
        )
        return 0
    console = session.console
    if pause:
        already = " (it was paused already)" if queue in before else ""
        console.print(
            f"paused queue {queue!r}{already}: no worker starts its tasks until `lifecycle tasks resume "
            f"{queue}`; running tasks finish, enqueues are kept"
        )
    else:
        already = "" if queue in before else " (it was not paused)"
        console.print(f"resumed queue {queue!r}{already}: workers start its tasks again")
    if counts is None:
        console.print(f"note: no tasks are stored in queue {queue!r} (yet): check its name")
    elif counts.pending:
        console.print(f"{counts.pending} pending task(s) in queue {queue!r}")
    return 0
