"""A child process for the logging tests: `python logging_child.py BACKEND SCENARIO`.

It runs, under lifecycle.run, a manager whose execute task fails with a message far longer than 80 columns.
Scenarios: default (lifecycle.run configures logging), own (the application configured logging itself
before lifecycle.run), silenced (the application configured logging and silenced the ``lifecycle`` logger).
"""

from __future__ import annotations

import logging
import sys

import lifecycle

LONG = "the upstream refused the request " + "and said why at length " * 6


async def fail_with_a_long_message() -> None:
    raise RuntimeError(LONG.strip())


def main(backend: str, scenario: str) -> int:
    if scenario in ("own", "silenced"):
        logging.basicConfig(level=logging.INFO, format="APP %(levelname)s %(name)s %(message)s")
    if scenario == "silenced":
        logging.getLogger("lifecycle").setLevel(logging.CRITICAL)
    manager = lifecycle.TaskManager(name="a-service-with-a-rather-long-name-for-the-logs")
    manager.add_execute_task("a-worker-with-a-long-name-too", fail_with_a_long_message)
    return lifecycle.run(manager, backend=backend)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
