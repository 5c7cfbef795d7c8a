"""taskiq-nats with ``pull_consume_batch`` = the concurrency (its default is 1): the drain only, since a lone
task then waits for a full batch or the fetch timeout (see ``benchmarks.peers.taskiq_nats``). Runs in the
``taskiq_nats`` virtualenv."""

from __future__ import annotations

from benchmarks.peers._common import main
from benchmarks.peers.taskiq_nats import TaskiqNatsAdapter


class BatchedAdapter(TaskiqNatsAdapter):
    settings = "PullBasedJetStreamBroker, pull_consume_batch=concurrency, max_async_tasks=concurrency"
    batch = 2  # any value above 1: fetch the scenario's concurrency at a time


if __name__ == "__main__":
    main(BatchedAdapter, __spec__.name)
