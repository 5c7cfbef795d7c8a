"""A child process for the logging tests: `python logging_child.py BACKEND SCENARIO`.

It runs, under lifecycle.run, a manager whose execute task fails with a message far longer than 80 columns.
Scenarios: default (lifecycle.run configures logging), own (the application configured logging itself
before lifecycle.run), silenced (the application configured logging and silenced the ``lifecycle`` logger);
secret, secret-own, secret-silenced: the task fails with connection strings holding a password.
"""

from __future__ import annotations

import logging
import sys

import lifecycle

LONG = "the upstream refused the request " + "and said why at length " * 6
SECRET = "S3cret-Pa55word"


async def fail_with_a_secret() -> None:
    try:
        raise ConnectionError(f"cannot reach postgresql://app:{SECRET}@db.internal/app")
    except ConnectionError as exc:
        raise RuntimeError(f"the database at redis://:{SECRET}@cache:6379/0 is gone") from exc


async def fail_with_a_long_message() -> None:
    raise RuntimeError(LONG.strip())


def main(backend: str, scenario: str) -> int:
    if scenario in ("own", "silenced", "secret-own", "secret-silenced"):
        logging.basicConfig(level=logging.INFO, format="APP %(levelname)s %(name)s %(message)s")
    if scenario in ("silenced", "secret-silenced"):
        logging.getLogger("lifecycle").setLevel(logging.CRITICAL)
    manager = lifecycle.TaskManager(name="a-service-with-a-rather-long-name-for-the-logs")
    failing = fail_with_a_secret if scenario.startswith("secret") else fail_with_a_long_message
    manager.add_execute_task("a-worker-with-a-long-name-too", failing)
    return lifecycle.run(manager, backend=backend)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
